//! Carries a redirected connection's original destination from the app's
//! socket to the proxy's accepted socket, and forgets it when sockets close.
//!
//! The client's connect() completes (ACTIVE_ESTABLISHED) before the proxy's
//! side of the handshake does (PASSIVE_ESTABLISHED): the client publishes the
//! destination under the connection's 4-tuple in `IN_FLIGHT`, the proxy's new
//! socket takes it into its own storage and removes the entry. If the proxy
//! side never appears, the entry goes when the client socket closes.
use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_storage_get},
    macros::sock_ops,
    programs::SockOpsContext,
};
use meshlane_common::{role, stat, FlowKey, OrigDst};

use crate::maps::{count, orig_dst_map, IN_FLIGHT};

const AF_INET: u32 = 2;

#[sock_ops]
pub fn track_redirected(ctx: SockOpsContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's duration.
    unsafe { track(&ctx) };
    1
}

/// Reads one context field with a single load of its own size: the verifier
/// rejects the wider loads the compiler would merge neighbours into.
macro_rules! field {
    ($ops:expr, $($f:tt)+) => {
        unsafe { core::ptr::read_volatile(&raw const (*$ops).$($f)+) }
    };
}

/// The connection's key as the client sees it: local = client.
#[inline(always)]
fn flow_key(ops: *const bpf_sock_ops, netns_cookie: u64, local_is_client: bool) -> FlowKey {
    // local_port is host order; remote_port is network order in the upper
    // half of a u32 on little-endian (u32::from_be yields the port).
    let local_port_be = (field!(ops, local_port) as u16).to_be();
    let remote_port_be = (u32::from_be(field!(ops, remote_port)) as u16).to_be();
    let local_ip4 = field!(ops, local_ip4);
    let remote_ip4 = field!(ops, remote_ip4);
    if local_is_client {
        FlowKey {
            netns_cookie,
            client_addr_be: local_ip4,
            server_addr_be: remote_ip4,
            client_port_be: local_port_be,
            server_port_be: remote_port_be,
            _pad: 0,
        }
    } else {
        FlowKey {
            netns_cookie,
            client_addr_be: remote_ip4,
            server_addr_be: local_ip4,
            client_port_be: remote_port_be,
            server_port_be: local_port_be,
            _pad: 0,
        }
    }
}

#[inline(always)]
unsafe fn track(ctx: &SockOpsContext) {
    let ops: *const bpf_sock_ops = ctx.ops;
    if field!(ops, family) != AF_INET {
        return;
    }
    match field!(ops, op) {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let sk = field!(ops, __bindgen_anon_2.sk);
            if sk.is_null() {
                return;
            }
            let st =
                unsafe { bpf_sk_storage_get(orig_dst_map(), sk.cast(), core::ptr::null_mut(), 0) }
                    as *const OrigDst;
            if st.is_null() {
                return;
            }
            let orig = unsafe { *st };
            if orig.role != role::REDIRECTED_CLIENT {
                return;
            }
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
            let key = flow_key(ops, netns_cookie, true);
            if IN_FLIGHT.insert(key, orig, 0).is_err() {
                count(stat::RECORD_FAILED);
                return;
            }
            // Ask for state changes of this socket so the entry is removed
            // when it closes, whether or not the proxy side took it.
            let _ = ctx.set_cb_flags(
                (field!(ops, bpf_sock_ops_cb_flags) | BPF_SOCK_OPS_STATE_CB_FLAG) as i32,
            );
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
            let key = flow_key(ops, netns_cookie, false);
            // SAFETY: copied out at once.
            let Some(orig) = (unsafe { IN_FLIGHT.get(key) }) else {
                return;
            };
            let mut mine = OrigDst {
                role: role::PROXY_ACCEPTED,
                ..*orig
            };
            let sk = field!(ops, __bindgen_anon_2.sk);
            if sk.is_null() {
                return;
            }
            let st = unsafe {
                bpf_sk_storage_get(
                    orig_dst_map(),
                    sk.cast(),
                    core::ptr::from_mut(&mut mine).cast(),
                    BPF_SK_STORAGE_GET_F_CREATE.into(),
                )
            };
            if st.is_null() {
                count(stat::RECORD_FAILED);
            }
            let _ = IN_FLIGHT.remove(key);
        }
        BPF_SOCK_OPS_STATE_CB if field!(ops, __bindgen_anon_1.args[1]) == BPF_TCP_CLOSE => {
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
            let _ = IN_FLIGHT.remove(flow_key(ops, netns_cookie, true));
        }
        _ => {}
    }
}

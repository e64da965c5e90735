//! The same-node shortcut: a send on one end of a proxy-to-proxy leg between
//! pods of this node goes straight into the receive queue of the other end
//! (bpf_msg_redirect_hash), skipping the veth, bridge and TCP stack.
//!
//! Why only the proxies' legs, not app <-> sidecar: a socket in a sockmap
//! reads through tcp_bpf_recvmsg, which on the kernels we test (6.18) returns
//! EAGAIN to a *blocking* read that is woken without data, e.g. by another
//! thread writing on the same socket. Proxies use non-blocking sockets and
//! retry; applications that read in one thread and write in another would
//! see errors. Found by the shortcut tests (tests/tests/shortcut.rs) when app
//! sockets were included: their blocking echo client failed with EAGAIN.
//!
//! Correctness rule: one direction of a byte stream never mixes the TCP
//! path and the redirect, or bytes could overtake each other. A socket's
//! first send decides (the peer is in `SOCKS`: redirect; it is not: TCP) and
//! the decision is latched in the socket's storage for its whole life. The
//! accepting side always finds its peer (the connecting side joined at
//! ACTIVE_ESTABLISHED, before the accepting side exists), so only the
//! connecting side can meet a missing peer, and then only at its first send.
use aya_ebpf::{
    bindings::{sk_action, sk_msg_md, BPF_F_INGRESS, BPF_SK_STORAGE_GET_F_CREATE},
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_storage_get},
    macros::sk_msg,
    programs::SkMsgContext,
};
use meshlane_common::{shortcut_state, stat, ConnKey};

use crate::maps::{count, SHORTCUT_STATE, SOCKS};

const AF_INET: u32 = 2;

macro_rules! field {
    ($m:expr, $($f:tt)+) => {
        unsafe { core::ptr::read_volatile(&raw const (*$m).$($f)+) }
    };
}

#[sk_msg]
pub fn shortcut_send(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's duration.
    unsafe { send(&ctx) };
    // Never drop: without a redirect the message takes the TCP path.
    sk_action::SK_PASS
}

#[inline(always)]
unsafe fn send(ctx: &SkMsgContext) {
    let md: *const sk_msg_md = ctx.msg;
    if field!(md, family) != AF_INET {
        return;
    }
    let sk = field!(md, __bindgen_anon_3.sk);
    if sk.is_null() {
        return;
    }
    let state = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SHORTCUT_STATE).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    } as *mut u32;
    if state.is_null() {
        return;
    }
    let decided = unsafe { *state };
    if decided == shortcut_state::TCP {
        return;
    }
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.msg.cast()) };
    let peer = ConnKey::new(
        netns_cookie,
        field!(md, local_ip4),
        field!(md, local_port) as u16,
        field!(md, remote_ip4),
        u32::from_be(field!(md, remote_port)) as u16,
    )
    .peer();
    let verdict = SOCKS.redirect_msg(ctx, peer, BPF_F_INGRESS.into());
    if verdict == i64::from(sk_action::SK_PASS) {
        if decided == shortcut_state::UNDECIDED {
            unsafe { *state = shortcut_state::REDIRECT };
        }
        count(stat::SHORTCUT_REDIRECTED);
    } else if decided == shortcut_state::UNDECIDED {
        // No peer at the first send: TCP for this socket's whole life.
        unsafe { *state = shortcut_state::TCP };
        count(stat::SHORTCUT_NO_PEER);
    }
    // Latched REDIRECT but the peer is gone: it closed, so the stream is
    // over; the TCP path reports that to the sender as it would without us.
}

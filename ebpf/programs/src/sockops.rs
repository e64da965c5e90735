//! Per-socket bookkeeping at TCP state changes, for every socket of the
//! attached cgroup:
//!
//! - original destinations: the client's connect() completes
//!   (ACTIVE_ESTABLISHED) before the proxy's side of the handshake does
//!   (PASSIVE_ESTABLISHED): the client publishes the destination under the
//!   connection's 4-tuple in `IN_FLIGHT`, the proxy's new socket takes it
//!   into its own storage and removes the entry. If the proxy side never
//!   appears, the entry goes when the client socket closes. An inbound
//!   connection captured by sk_lookup has its original destination as its
//!   local address; it is recorded the same way for SO_ORIGINAL_DST.
//! - proxy listeners: at listen() on a capture port, the listener goes into
//!   `LISTENERS`, where sk_lookup and connect4 find it.
//! - the same-node shortcut: both ends of a proxy-to-proxy leg between pods
//!   of this node go into `SOCKS`; in pods with `meshlane.io/shortcut-app`,
//!   both ends of the app <-> sidecar legs too (see `shortcut.rs` for why
//!   those are opt-in).
use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_netns_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use meshlane_common::{
    decide::{decide_inbound, registers_listener, Arrival, InboundVerdict},
    flags, ip, pod_stat, role, setting, stat, ConnKey, FlowKey, FlowKey6, ListenerKey, OrigDst,
    OrigDst6, V6,
};

use crate::{
    bind::{is_capture_port, proxy_uid_of},
    ctx::{field, v6_field, AF_INET, AF_INET6},
    maps::{
        count, is_proxy_leg, listen_owner_of, orig_dst6_of, orig_dst6_slot, orig_dst_of,
        orig_dst_slot, pod_count, setting_on, MapLists, IN_FLIGHT, IN_FLIGHT6, LISTENERS, PODS,
        SOCKS, SOCK_ADDRS,
    },
};

#[sock_ops]
pub fn track_redirected(ctx: SockOpsContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's duration.
    unsafe { track(&ctx) };
    1
}

/// The socket's ports: local in host order, remote in network order in the
/// upper half of a u32 on little-endian (u32::from_be yields the port).
#[inline(always)]
fn ports_of(ops: *const bpf_sock_ops) -> (u16, u16) {
    (
        field!(ops, local_port) as u16,
        u32::from_be(field!(ops, remote_port)) as u16,
    )
}

/// The connection's key as the client sees it: local = client.
#[inline(always)]
fn flow_key(ops: *const bpf_sock_ops, netns_cookie: u64, local_is_client: bool) -> FlowKey {
    let (local_port, remote_port) = ports_of(ops);
    let local_ip4 = field!(ops, local_ip4);
    let remote_ip4 = field!(ops, remote_ip4);
    if local_is_client {
        FlowKey {
            netns_cookie,
            client_addr_be: local_ip4,
            server_addr_be: remote_ip4,
            client_port_be: local_port.to_be(),
            server_port_be: remote_port.to_be(),
            _pad: 0,
        }
    } else {
        FlowKey {
            netns_cookie,
            client_addr_be: remote_ip4,
            server_addr_be: local_ip4,
            client_port_be: remote_port.to_be(),
            server_port_be: local_port.to_be(),
            _pad: 0,
        }
    }
}

#[inline(always)]
unsafe fn track(ctx: &SockOpsContext) {
    let ops: *const bpf_sock_ops = ctx.ops;
    let op = field!(ops, op);
    if op == BPF_SOCK_OPS_TCP_LISTEN_CB {
        unsafe { register_listener(ctx) };
        return;
    }
    let family = field!(ops, family);
    if family == AF_INET6 && remote_ip6(ops).mapped_v4().is_none() {
        unsafe { track6(ctx, op) };
        return;
    }
    // AF_INET, or an AF_INET6 socket of an IPv4 connection (an IPv4-mapped
    // peer): its IPv4 addresses are in local_ip4 and remote_ip4 all the
    // same. The shortcut takes AF_INET sockets only.
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    let shortcut = family == AF_INET;
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
            let redirected = unsafe { publish_orig_dst(ctx, netns_cookie) };
            if !shortcut {
                return;
            }
            if unsafe { proxy_leg(ctx) } {
                unsafe { join_shortcut(ctx, netns_cookie, Leg::Proxy) };
            } else if redirected || field!(ops, local_ip4) == INBOUND_PASSTHROUGH_BE {
                // The app's connection to its sidecar, or the sidecar's
                // connection to its app from 127.0.0.6.
                unsafe { join_shortcut(ctx, netns_cookie, Leg::App) };
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
            match unsafe { take_orig_dst(ctx, netns_cookie) } {
                _ if !shortcut => {}
                Accepted::InboundCaptured => unsafe {
                    join_shortcut(ctx, netns_cookie, Leg::Proxy)
                },
                Accepted::Redirected => unsafe { join_shortcut(ctx, netns_cookie, Leg::App) },
                Accepted::Other if field!(ops, remote_ip4) == INBOUND_PASSTHROUGH_BE => unsafe {
                    join_shortcut(ctx, netns_cookie, Leg::App)
                },
                Accepted::Other => {}
            }
        }
        BPF_SOCK_OPS_STATE_CB if field!(ops, __bindgen_anon_1.args[1]) == BPF_TCP_CLOSE => {
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
            let _ = IN_FLIGHT.remove(flow_key(ops, netns_cookie, true));
            let _ = SOCK_ADDRS.remove(conn_key(ops, netns_cookie));
        }
        _ => {}
    }
}

/// The remote address of an AF_INET6 socket.
#[inline(always)]
fn remote_ip6(ops: *const bpf_sock_ops) -> V6 {
    v6_field!(ops, remote_ip6)
}

/// The local address of an AF_INET6 socket.
#[inline(always)]
fn local_ip6(ops: *const bpf_sock_ops) -> V6 {
    v6_field!(ops, local_ip6)
}

/// [`flow_key`] of a native IPv6 connection.
#[inline(always)]
fn flow_key6(ops: *const bpf_sock_ops, netns_cookie: u64, local_is_client: bool) -> FlowKey6 {
    let (local_port, remote_port) = ports_of(ops);
    let (local, remote) = (local_ip6(ops), remote_ip6(ops));
    let (client_addr, server_addr, client_port, server_port) = if local_is_client {
        (local, remote, local_port, remote_port)
    } else {
        (remote, local, remote_port, local_port)
    };
    FlowKey6 {
        netns_cookie,
        client_addr,
        server_addr,
        client_port_be: client_port.to_be(),
        server_port_be: server_port.to_be(),
        _pad: 0,
    }
}

/// The original-destination hand-over of native IPv6 connections: the same
/// steps as the IPv4 ones in [`track`], over `IN_FLIGHT6` and `ORIG_DST6`.
#[inline(always)]
unsafe fn track6(ctx: &SockOpsContext, op: u32) {
    let ops: *const bpf_sock_ops = ctx.ops;
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let sk = field!(ops, __bindgen_anon_2.sk);
            if sk.is_null() {
                return;
            }
            let Some(orig) = orig_dst6_of(sk.cast()) else {
                return;
            };
            if orig.role != role::REDIRECTED_CLIENT {
                return;
            }
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
            if IN_FLIGHT6
                .insert(flow_key6(ops, netns_cookie, true), orig, 0)
                .is_err()
            {
                count(stat::RECORD_FAILED);
                return;
            }
            let _ = ctx.set_cb_flags(
                (field!(ops, bpf_sock_ops_cb_flags) | BPF_SOCK_OPS_STATE_CB_FLAG) as i32,
            );
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
            let key = flow_key6(ops, netns_cookie, false);
            // SAFETY: copied out at once.
            let mut mine = match unsafe { IN_FLIGHT6.get(key) } {
                Some(orig) => OrigDst6 {
                    role: role::PROXY_ACCEPTED,
                    ..*orig
                },
                None => {
                    let Some(cfg) = (unsafe { PODS.get(netns_cookie) }).copied() else {
                        return;
                    };
                    let (local_port, _) = ports_of(ops);
                    if local_port == cfg.inbound_capture_port {
                        return;
                    }
                    let arrival = Arrival {
                        tcp: true,
                        src_addr: remote_ip6(ops),
                        dst_addr: local_ip6(ops),
                        dst_port: local_port,
                        // Not known here; see `accepted`.
                        ifindex: 0,
                    };
                    if decide_inbound(&cfg, &MapLists { netns_cookie }, &arrival)
                        != InboundVerdict::Capture
                        && !cfg.has(flags::INTERFACES)
                    {
                        return;
                    }
                    OrigDst6 {
                        addr: local_ip6(ops),
                        port_be: local_port.to_be(),
                        role: role::PROXY_ACCEPTED,
                    }
                }
            };
            let sk = field!(ops, __bindgen_anon_2.sk);
            if sk.is_null() {
                return;
            }
            if orig_dst6_slot(sk.cast(), Some(&mut mine)).is_null() {
                count(stat::RECORD_FAILED);
            }
            let _ = IN_FLIGHT6.remove(key);
        }
        BPF_SOCK_OPS_STATE_CB if field!(ops, __bindgen_anon_1.args[1]) == BPF_TCP_CLOSE => {
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
            let _ = IN_FLIGHT6.remove(flow_key6(ops, netns_cookie, true));
        }
        _ => {}
    }
}

/// Client side of a redirected connection: publish its original destination
/// for the proxy's side. True when this socket was redirected (by connect4)
/// to its own pod's proxy.
#[inline(always)]
unsafe fn publish_orig_dst(ctx: &SockOpsContext, netns_cookie: u64) -> bool {
    let ops: *const bpf_sock_ops = ctx.ops;
    let sk = field!(ops, __bindgen_anon_2.sk);
    if sk.is_null() {
        return false;
    }
    let Some(orig) = orig_dst_of(sk.cast()) else {
        return false;
    };
    if orig.role != role::REDIRECTED_CLIENT {
        return false;
    }
    let key = flow_key(ops, netns_cookie, true);
    if IN_FLIGHT.insert(key, orig, 0).is_err() {
        count(stat::RECORD_FAILED);
        return true;
    }
    // Ask for state changes of this socket so the entry is removed when it
    // closes, whether or not the proxy side took it.
    let _ =
        ctx.set_cb_flags((field!(ops, bpf_sock_ops_cb_flags) | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    true
}

/// True when connect4 marked this socket as a proxy dialling a pod of this
/// node.
#[inline(always)]
unsafe fn proxy_leg(ctx: &SockOpsContext) -> bool {
    let sk = field!(ctx.ops, __bindgen_anon_2.sk);
    !sk.is_null() && is_proxy_leg(sk.cast())
}

/// Accepted side: the proxy's end of a redirected connection takes the
/// original destination from `IN_FLIGHT`; an inbound connection sk_lookup
/// captured records its own local address. Returns true for the latter (the
/// proxy's end of a connection from outside the pod).
#[inline(always)]
unsafe fn take_orig_dst(ctx: &SockOpsContext, netns_cookie: u64) -> Accepted {
    let ops: *const bpf_sock_ops = ctx.ops;
    let key = flow_key(ops, netns_cookie, false);
    let mut taken = Accepted::Redirected;
    // SAFETY: copied out at once.
    let mut mine = match unsafe { IN_FLIGHT.get(key) } {
        Some(orig) => OrigDst {
            role: role::PROXY_ACCEPTED,
            ..*orig
        },
        None => {
            let Some(cfg) = (unsafe { PODS.get(netns_cookie) }).copied() else {
                return Accepted::Other;
            };
            let (local_port, _) = ports_of(ops);
            // Addressed to the capture port itself, or REDIRECTed there by
            // iptables rules still in the pod (a migration in progress):
            // conntrack, not us, knows the original destination.
            if local_port == cfg.inbound_capture_port {
                return Accepted::Other;
            }
            // The arrival interface is not known to sockops, so for a pod
            // whose annotations name interfaces every accepted connection
            // is recorded with its local address as original destination:
            // right for one sk_lookup rerouted to the outbound listener
            // (whatever its port), and what conntrack would answer for one
            // left to the app too (which then counts as captured).
            let arrival = Arrival {
                tcp: true,
                src_addr: u32::from_be(field!(ops, remote_ip4)),
                dst_addr: u32::from_be(field!(ops, local_ip4)),
                dst_port: local_port,
                ifindex: 0,
            };
            if decide_inbound(&cfg, &MapLists { netns_cookie }, &arrival) != InboundVerdict::Capture
                && !cfg.has(flags::INTERFACES)
            {
                return Accepted::Other;
            }
            taken = Accepted::InboundCaptured;
            OrigDst {
                addr_be: field!(ops, local_ip4),
                port_be: local_port.to_be(),
                role: role::PROXY_ACCEPTED,
            }
        }
    };
    let sk = field!(ops, __bindgen_anon_2.sk);
    if sk.is_null() {
        return Accepted::Other;
    }
    if orig_dst_slot(sk.cast(), Some(&mut mine)).is_null() {
        count(stat::RECORD_FAILED);
    }
    let _ = IN_FLIGHT.remove(key);
    taken
}

/// A listener on a capture port becomes findable by sk_lookup (inbound) and
/// the connect hooks (is the proxy ready?). Registered whether or not the
/// agent knows the pod yet: the proxy often listens before the pod's IP
/// reaches the agent. An AF_INET listener serves IPv4 lookups; an AF_INET6
/// one IPv6 lookups, and, when it listens on `[::]`, IPv4 ones too unless
/// an AF_INET listener has the port (sockops cannot see v6only; such a
/// listener refuses IPv4 at assignment and an AF_INET one takes over).
#[inline(always)]
unsafe fn register_listener(ctx: &SockOpsContext) {
    let ops: *const bpf_sock_ops = ctx.ops;
    let family = field!(ops, family);
    let (v4, v6) = if family == AF_INET {
        (
            !ip::is_loopback(u32::from_be(field!(ops, local_ip4))),
            false,
        )
    } else if family == AF_INET6 {
        let local = local_ip6(ops);
        let any = local.is_unspecified();
        (
            any,
            any || !(local.same(V6::LOCALHOST) || local.mapped_v4().is_some()),
        )
    } else {
        (false, false)
    };
    if !v4 && !v6 {
        return;
    }
    let port = field!(ops, local_port) as u16;
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    if !is_capture_port(netns_cookie, port) {
        return;
    }
    // Registered under the uid that bound it (bind.rs); a listener whose
    // bind was not seen (bound before the programs were attached) is left
    // to the agent, which reads its owner from procfs.
    let sk = field!(ops, __bindgen_anon_2.sk);
    if sk.is_null() {
        return;
    }
    let Some(owner) = listen_owner_of(sk.cast()) else {
        count(stat::LISTENERS_UNOWNED);
        return;
    };
    if !registers_listener(owner, proxy_uid_of(netns_cookie)) {
        count(stat::LISTENERS_NOT_PROXY);
        return;
    }
    let ops_mut = unsafe { &mut *ctx.ops };
    if v4 {
        let how = if family == AF_INET {
            BPF_ANY
        } else {
            BPF_NOEXIST
        };
        let key = ListenerKey::serving(netns_cookie, port, ListenerKey::IPV4, owner);
        match LISTENERS.update(key, &mut *ops_mut, how.into()) {
            Ok(()) => count(stat::LISTENERS_REGISTERED),
            // An AF_INET listener has the IPv4 lookups already.
            Err(_) if how == BPF_NOEXIST => {}
            Err(_) => count(stat::UPDATE_FAILED),
        }
    }
    if v6 {
        let key = ListenerKey::serving(netns_cookie, port, ListenerKey::IPV6, owner);
        match LISTENERS.update(key, ops_mut, BPF_ANY.into()) {
            Ok(()) => count(stat::LISTENERS_REGISTERED),
            Err(_) => count(stat::UPDATE_FAILED),
        }
    }
}

/// The 127.0.0.6 a sidecar connects to its app from (Istio's inbound
/// passthrough source), as sockops sees addresses (network byte order).
const INBOUND_PASSTHROUGH_BE: u32 = 0x7f00_0006u32.to_be();

/// What an accepted connection turned out to be.
enum Accepted {
    /// The proxy's end of an app's connection redirected to it (connect4).
    Redirected,
    /// The proxy's end of a connection sk_lookup captured from outside.
    InboundCaptured,
    Other,
}

/// Which leg of the mesh path a socket is on.
#[derive(PartialEq, Eq)]
enum Leg {
    /// Sidecar to sidecar, between pods of this node.
    Proxy,
    /// App to its own sidecar, or sidecar to its own app from 127.0.0.6:
    /// only for pods with `meshlane.io/shortcut-app: "true"`.
    App,
}

/// One end of a leg goes into the shortcut sockhash, unless the shortcut is
/// off (node-wide or for the pod).
#[inline(always)]
unsafe fn join_shortcut(ctx: &SockOpsContext, netns_cookie: u64, leg: Leg) {
    if !setting_on(setting::SHORTCUT) {
        return;
    }
    let Some(cfg) = (unsafe { PODS.get(netns_cookie) }) else {
        return;
    };
    if cfg.has(flags::NO_SHORTCUT) || (leg == Leg::App && !cfg.has(flags::SHORTCUT_APP)) {
        return;
    }
    let ops: *const bpf_sock_ops = ctx.ops;
    let sk = field!(ops, __bindgen_anon_2.sk);
    if sk.is_null() {
        return;
    }
    let key = conn_key(ops, netns_cookie);
    // The socket's address as a number, for the sender's backlog check.
    // Storing a pointer in a map is allowed to privileged loaders only,
    // which the agent is; it is never dereferenced but through
    // bpf_probe_read_kernel.
    if SOCK_ADDRS.insert(key, sk as u64, 0).is_err() {
        count(stat::UPDATE_FAILED);
        return;
    }
    let ops_mut = unsafe { &mut *ctx.ops };
    match SOCKS.update(key, ops_mut, BPF_ANY.into()) {
        Ok(()) => {
            count(stat::SHORTCUT_SOCKETS);
            pod_count(netns_cookie, pod_stat::SHORTCUT_SOCKETS);
            // The close callback removes the SOCK_ADDRS entry.
            let _ = ctx.set_cb_flags(
                (field!(ops, bpf_sock_ops_cb_flags) | BPF_SOCK_OPS_STATE_CB_FLAG) as i32,
            );
        }
        Err(_) => {
            let _ = SOCK_ADDRS.remove(key);
            count(stat::UPDATE_FAILED);
        }
    }
}

#[inline(always)]
fn conn_key(ops: *const bpf_sock_ops, netns_cookie: u64) -> ConnKey {
    let (local_port, remote_port) = ports_of(ops);
    ConnKey::new(
        netns_cookie,
        field!(ops, local_ip4),
        local_port,
        field!(ops, remote_ip4),
        remote_port,
    )
}

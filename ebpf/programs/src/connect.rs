//! What happens at connect() and at an unconnected UDP sendmsg(): the one
//! place a pod's outbound connection (or DNS query) is sent to its sidecar.
//!
//! For a socket in a meshed pod (its network namespace is in `PODS`) the
//! decision is `meshlane_common::decide`, the same function the host tests
//! exercise, for both families:
//! - AF_INET sockets: `decide_connect` on the IPv4 destination;
//! - AF_INET6 sockets to an IPv4-mapped address (`::ffff:a.b.c.d`): exactly
//!   the IPv4 decision (the packets are IPv4, Istio's iptables catch them),
//!   redirected to `::ffff:127.0.0.1`;
//! - AF_INET6 sockets to a native IPv6 address, in pods with an IPv6
//!   address: Istio's ip6tables decision, redirected to `::1`.
//!
//! TCP goes to the capture ports; UDP only when the pod asks for DNS capture
//! and the port is 53, to the DNS proxy (connected sockets here at connect,
//! unconnected ones at each sendmsg). The original destination is kept in
//! the socket's storage: sockops hands a TCP one to the proxy's side,
//! getpeername and recvmsg give it back to the app. As iptables' REDIRECT
//! does, a redirected TCP connection keeps the source address the kernel
//! would have chosen for the original destination, so the proxy sees the
//! pod's IP, not loopback.
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, sockaddr},
    helpers::generated::{
        bpf_bind, bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_map_lookup_elem,
        bpf_sk_release,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use meshlane_common::{
    decide::{decide_connect, source_for, source_for6, Capture, Connect, Pass, Verdict},
    flags, ip, pod_stat, ports, role, setting, stat, ListenerKey, OrigDst, OrigDst6, PodConfig, V6,
};

use crate::{
    ctx::{field, set_field, set_v6_field, v6_field, AF_INET, AF_INET6},
    maps::{
        count, mark_proxy_leg, orig_dst6_slot, orig_dst_slot, pod_count, setting_on, MapLists,
        LISTENERS, PODS, POD_BY_IP,
    },
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

/// `struct sockaddr_in`, for bpf_bind().
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr_be: u32,
    zero: [u8; 8],
}

/// `struct sockaddr_in6`, for bpf_bind().
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port_be: u16,
    flowinfo: u32,
    addr: V6,
    scope_id: u32,
}

/// Which hook runs: a connect() may bind the socket (bpf_bind is allowed
/// there only); a sendmsg() rewrites one datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
enum At {
    Connect,
    SendMsg,
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer comes from the kernel and is valid for the
    // duration of the program.
    unsafe { redirect4(&ctx, At::Connect) };
    // Never refuse a connect: meshlane only ever changes where it goes.
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn redirect_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    unsafe { redirect4(&ctx, At::SendMsg) };
    1
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    unsafe { redirect6(&ctx, At::Connect) };
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn redirect_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    unsafe { redirect6(&ctx, At::SendMsg) };
    1
}

/// The socket's pod, when it is meshed, and what the hook sees of it.
struct Meshed {
    netns_cookie: u64,
    cfg: PodConfig,
    sk: *mut bpf_sock,
    tcp: bool,
    uid: u32,
    gid: u32,
    /// The destination port, network order.
    port_be: u16,
}

/// The meshed pod of the socket in `ctx`, or None: not meshed, not TCP or
/// UDP, or UDP in a pod without DNS capture or to another port than 53 (the
/// fast way out for every datagram of the node).
#[inline(always)]
unsafe fn meshed(ctx: &SockAddrContext, at: At) -> Option<Meshed> {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    let ty = field!(sa, type_);
    let tcp = ty == SOCK_STREAM;
    if !tcp && ty != SOCK_DGRAM {
        return None;
    }
    // Every datagram of the node passes here: the port first, before any
    // lookup.
    let port_be = field!(sa, user_port) as u16;
    if !tcp && u16::from_be(port_be) != ports::DNS {
        return None;
    }
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only use of a map value the agent may replace at any
    // time; copied before use.
    let cfg = *(unsafe { PODS.get(netns_cookie) })?;
    if !tcp && !cfg.has(flags::DNS_CAPTURE) {
        return None;
    }
    if at == At::Connect {
        count(stat::CONNECT_MESHED);
    }
    let sk = field!(sa, __bindgen_anon_1.sk);
    if sk.is_null() {
        return None;
    }
    let uid_gid = unsafe { bpf_get_current_uid_gid() };
    Some(Meshed {
        netns_cookie,
        cfg,
        sk,
        tcp,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        port_be,
    })
}

#[inline(always)]
unsafe fn redirect4(ctx: &SockAddrContext, at: At) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let Some(m) = (unsafe { meshed(ctx, at) }) else {
        return;
    };
    let mut dst = u32::from_be(field!(sa, user_ip4));
    // connect() to 0.0.0.0 is routed to loopback: the rules see 127.0.0.1.
    if dst == 0 {
        dst = ip::LOCALHOST;
    }
    let (bound_be, bound_port) = (field!(m.sk, src_ip4), field!(m.sk, src_port));
    let unbound = bound_be == 0 && bound_port == 0;
    unsafe { redirect_ipv4_dst(ctx, &m, at, u32::from_be(bound_be), unbound, dst, false) };
}

#[inline(always)]
unsafe fn redirect6(ctx: &SockAddrContext, at: At) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let Some(m) = (unsafe { meshed(ctx, at) }) else {
        return;
    };
    let dst = v6_field!(sa, user_ip6);
    let bound = v6_field!(m.sk, src_ip6);
    let unbound = bound.is_unspecified() && field!(m.sk, src_port) == 0;
    match dst.mapped_v4() {
        // An IPv4-mapped destination: its packets are IPv4, and so is the
        // decision (a mapped 0.0.0.0 is routed to loopback too).
        Some(v4) => {
            let v4 = if v4 == 0 { ip::LOCALHOST } else { v4 };
            let bound4 = bound.mapped_v4().unwrap_or(0);
            unsafe { redirect_ipv4_dst(ctx, &m, at, bound4, unbound, v4, true) };
        }
        // Native IPv6 only in pods with an IPv6 address, as Istio writes
        // ip6tables rules for those only.
        None if m.cfg.has(flags::IPV6) => unsafe {
            redirect_ipv6_dst(ctx, &m, at, bound, unbound, dst)
        },
        None => passed(&m, Verdict::Pass(Pass::Ipv4OnlyPod)),
    }
}

/// An IPv4 destination, from an AF_INET socket or an IPv4-mapped one of an
/// AF_INET6 socket (`mapped`: the address is written back mapped).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn redirect_ipv4_dst(
    ctx: &SockAddrContext,
    m: &Meshed,
    at: At,
    bound: u32,
    unbound: bool,
    dst: u32,
    mapped: bool,
) {
    let port_be = m.port_be;
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let lists = MapLists {
        netns_cookie: m.netns_cookie,
    };
    let facts = Connect {
        uid: m.uid,
        gid: m.gid,
        bound_addr: bound,
        dst_addr: dst,
        dst_port: u16::from_be(port_be),
        tcp: m.tcp,
    };
    let verdict = decide_connect(&m.cfg, &lists, &facts);
    passed(m, verdict);
    let Some(capture_port) = verdict.port(&m.cfg) else {
        // The proxy dialling a pod of this node: a leg the shortcut may take.
        if m.tcp
            && !mapped
            && verdict == Verdict::Pass(Pass::ProxyUid)
            && setting_on(setting::SHORTCUT)
            && !m.cfg.has(flags::NO_SHORTCUT)
            && unsafe { POD_BY_IP.get(dst) }.is_some()
            && !mark_proxy_leg(m.sk.cast())
        {
            count(stat::UPDATE_FAILED);
        }
        return;
    };
    if !ready(m, capture_port, ListenerKey::IPV4) {
        return;
    }
    // Remember where the app wanted to go. Without it the proxy cannot
    // forward; we still redirect (a capture that fails is better than a
    // silent bypass of the mesh) and count the failure.
    let storage = orig_dst_slot(m.sk.cast(), None);
    if storage.is_null() {
        count(stat::RECORD_FAILED);
    } else {
        unsafe {
            *storage = OrigDst {
                addr_be: dst.to_be(),
                port_be,
                role: role::REDIRECTED_CLIENT,
            };
        }
    }
    if m.tcp && at == At::Connect && unbound {
        if let Some(src) = source_for(&m.cfg, &lists, dst) {
            let rc = if mapped {
                unsafe { bind6(ctx, V6::mapped(src)) }
            } else {
                let mut addr = SockaddrIn {
                    family: AF_INET as u16,
                    port_be: 0,
                    addr_be: src.to_be(),
                    zero: [0; 8],
                };
                unsafe {
                    bpf_bind(
                        ctx.sock_addr,
                        core::ptr::from_mut(&mut addr).cast::<sockaddr>(),
                        core::mem::size_of::<SockaddrIn>() as i32,
                    )
                }
            };
            if rc != 0 {
                count(stat::BIND_FAILED);
            }
        }
    }
    if mapped {
        set_v6_field!(sa, user_ip6, V6::mapped(ip::LOCALHOST));
    } else {
        set_field!(sa, user_ip4, ip::LOCALHOST.to_be());
    }
    set_field!(sa, user_port, u32::from(capture_port.to_be()));
    counted(m.netns_cookie, verdict);
}

/// A native IPv6 destination of an AF_INET6 socket.
#[inline(always)]
unsafe fn redirect_ipv6_dst(
    ctx: &SockAddrContext,
    m: &Meshed,
    at: At,
    bound: V6,
    unbound: bool,
    dst: V6,
) {
    let port_be = m.port_be;
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let lists = MapLists {
        netns_cookie: m.netns_cookie,
    };
    // connect() to :: is routed to loopback: the rules see ::1.
    let dst = if dst.is_unspecified() {
        V6::LOCALHOST
    } else {
        dst
    };
    let facts = Connect {
        uid: m.uid,
        gid: m.gid,
        bound_addr: bound,
        dst_addr: dst,
        dst_port: u16::from_be(port_be),
        tcp: m.tcp,
    };
    let verdict = decide_connect(&m.cfg, &lists, &facts);
    passed(m, verdict);
    // The shortcut carries IPv4 legs only: no proxy leg to mark here.
    let Some(capture_port) = verdict.port(&m.cfg) else {
        return;
    };
    if !ready(m, capture_port, ListenerKey::IPV6) {
        return;
    }
    let storage = orig_dst6_slot(m.sk.cast(), None);
    if storage.is_null() {
        count(stat::RECORD_FAILED);
    } else {
        unsafe {
            *storage = OrigDst6 {
                addr: dst,
                port_be,
                role: role::REDIRECTED_CLIENT,
            };
        }
    }
    if m.tcp && at == At::Connect && unbound {
        if let Some(src) = source_for6(&m.cfg, &lists, dst) {
            if unsafe { bind6(ctx, src) } != 0 {
                count(stat::BIND_FAILED);
            }
        }
    }
    set_v6_field!(sa, user_ip6, V6::LOCALHOST);
    set_field!(sa, user_port, u32::from(capture_port.to_be()));
    counted(m.netns_cookie, verdict);
}

/// A pod that opted into `meshlane.io/bypass-until-ready` is not sent to a
/// TCP listener that is not there yet (iptables would: connection refused).
/// UDP has no listener to look for: always captured.
#[inline(always)]
fn ready(m: &Meshed, capture_port: u16, serves: u32) -> bool {
    if !m.tcp
        || !m.cfg.has(flags::BYPASS_UNTIL_READY)
        || listening(m.netns_cookie, capture_port, serves, m.cfg.proxy_uid)
        || listening(m.netns_cookie, capture_port, serves, 0)
    {
        return true;
    }
    count(stat::NOT_READY_BYPASSED);
    pod_count(m.netns_cookie, pod_stat::NOT_READY_BYPASSED);
    false
}

/// Counts a connection a rule left alone on its pod's row for the rule.
#[inline(always)]
fn passed(m: &Meshed, verdict: Verdict) {
    if let Verdict::Pass(p) = verdict {
        pod_count(m.netns_cookie, p.pod_stat());
    }
}

#[inline(always)]
fn counted(netns_cookie: u64, verdict: Verdict) {
    let (global, per_pod) = match verdict {
        Verdict::Redirect(Capture::Inbound) => (stat::REDIRECT_INBOUND, pod_stat::REDIRECT_INBOUND),
        Verdict::Redirect(Capture::Dns) => (stat::REDIRECT_DNS, pod_stat::REDIRECT_DNS),
        _ => (stat::REDIRECT_OUTBOUND, pod_stat::REDIRECT_OUTBOUND),
    };
    count(global);
    pod_count(netns_cookie, per_pod);
}

/// Binds the AF_INET6 socket of `ctx` to `src` (port chosen by the kernel).
#[inline(always)]
unsafe fn bind6(ctx: &SockAddrContext, src: V6) -> i64 {
    let mut addr = SockaddrIn6 {
        family: AF_INET6 as u16,
        port_be: 0,
        flowinfo: 0,
        addr: src,
        scope_id: 0,
    };
    unsafe {
        bpf_bind(
            ctx.sock_addr,
            core::ptr::from_mut(&mut addr).cast::<sockaddr>(),
            core::mem::size_of::<SockaddrIn6>() as i32,
        )
    }
}

/// True when the pod's proxy (uid `owner`) listens on `port` for lookups
/// of `serves`.
#[inline(always)]
fn listening(netns_cookie: u64, port: u16, serves: u32, owner: u32) -> bool {
    let key = ListenerKey::serving(netns_cookie, port, serves, owner);
    // SAFETY: a sockhash lookup returns a referenced socket, released here.
    unsafe {
        let sk = bpf_map_lookup_elem(
            core::ptr::from_ref(&LISTENERS).cast_mut().cast(),
            core::ptr::from_ref(&key).cast(),
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

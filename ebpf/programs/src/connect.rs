//! What happens at connect(): the one place a pod's outbound TCP connection is
//! sent to its sidecar.
//!
//! For a socket in a meshed pod (its network namespace is in `PODS`) the
//! decision is `meshlane_common::decide::decide_connect`, the same function
//! the host tests exercise. A redirected connect goes to 127.0.0.1 on the
//! capture port; the original destination is kept in the socket's storage
//! (sockops hands it to the proxy's side) and, as iptables' REDIRECT does,
//! the connection keeps the source address the kernel would have chosen for
//! the original destination, so the proxy sees the pod's IP, not 127.0.0.1.
use aya_ebpf::{
    bindings::{bpf_sock_addr, sockaddr},
    helpers::generated::{
        bpf_bind, bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_map_lookup_elem,
        bpf_sk_release,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use meshlane_common::{
    decide::{decide_connect, source_for, Capture, Connect, Pass, Verdict},
    flags, ip, pod_stat, role, setting, stat, ListenerKey, OrigDst,
};

use crate::{
    ctx::AF_INET,
    maps::{
        count, mark_proxy_leg, orig_dst_slot, pod_count, setting_on, MapLists, LISTENERS, PODS,
        POD_BY_IP,
    },
};

const SOCK_STREAM: u32 = 1;

/// `struct sockaddr_in`, for bpf_bind().
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr_be: u32,
    zero: [u8; 8],
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer comes from the kernel and is valid for the
    // duration of the program.
    unsafe { redirect(&ctx) };
    // Never refuse a connect: meshlane only ever changes where it goes.
    1
}

#[inline(always)]
unsafe fn redirect(ctx: &SockAddrContext) {
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return;
    }
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only use of a map value the agent may replace at any time;
    // we copy it before use.
    let Some(cfg) = (unsafe { PODS.get(netns_cookie) }) else {
        return;
    };
    let cfg = *cfg;
    count(stat::CONNECT_MESHED);

    let uid_gid = unsafe { bpf_get_current_uid_gid() };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let (bound_be, bound_port) = unsafe { ((*sk).src_ip4, (*sk).src_port) };
    let mut dst = u32::from_be(sa.user_ip4);
    // connect() to 0.0.0.0 is routed to loopback: the rules see 127.0.0.1.
    if dst == 0 {
        dst = ip::LOCALHOST;
    }
    let orig_port_be = sa.user_port as u16;
    let facts = Connect {
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        bound_addr: u32::from_be(bound_be),
        dst_addr: dst,
        dst_port: u16::from_be(orig_port_be),
        tcp: true,
    };
    let verdict = decide_connect(&cfg, &MapLists { netns_cookie }, &facts);
    let Some(capture_port) = verdict.port(&cfg) else {
        // The proxy dialling a pod of this node: a leg the shortcut may take.
        if verdict == Verdict::Pass(Pass::ProxyUid)
            && setting_on(setting::SHORTCUT)
            && !cfg.has(flags::NO_SHORTCUT)
            && unsafe { POD_BY_IP.get(dst) }.is_some()
        {
            if !mark_proxy_leg(sk.cast()) {
                count(stat::UPDATE_FAILED);
            }
        }
        return;
    };
    // A pod that opted into `meshlane.io/bypass-until-ready` is not sent to a
    // proxy that does not listen yet (iptables would: connection refused).
    if cfg.has(flags::BYPASS_UNTIL_READY) && !listening(netns_cookie, capture_port) {
        count(stat::NOT_READY_BYPASSED);
        pod_count(netns_cookie, pod_stat::NOT_READY_BYPASSED);
        return;
    }

    // Remember where the app wanted to go. Without it the proxy cannot
    // forward; we still redirect (a capture that fails is better than a
    // silent bypass of the mesh) and count the failure.
    let storage = orig_dst_slot(sk.cast(), None);
    if storage.is_null() {
        count(stat::RECORD_FAILED);
    } else {
        unsafe {
            *storage = OrigDst {
                addr_be: dst.to_be(),
                port_be: orig_port_be,
                role: role::REDIRECTED_CLIENT,
            };
        }
    }

    if bound_be == 0 && bound_port == 0 {
        if let Some(src) = source_for(&cfg, dst) {
            let mut addr = SockaddrIn {
                family: AF_INET as u16,
                port_be: 0,
                addr_be: src.to_be(),
                zero: [0; 8],
            };
            let rc = unsafe {
                bpf_bind(
                    ctx.sock_addr,
                    core::ptr::from_mut(&mut addr).cast::<sockaddr>(),
                    core::mem::size_of::<SockaddrIn>() as i32,
                )
            };
            if rc != 0 {
                count(stat::BIND_FAILED);
            }
        }
    }

    unsafe {
        core::ptr::write_volatile(&raw mut sa.user_ip4, ip::LOCALHOST.to_be());
        core::ptr::write_volatile(&raw mut sa.user_port, u32::from(capture_port.to_be()));
    }
    let (global, per_pod) = match verdict {
        Verdict::Redirect(Capture::Inbound) => (stat::REDIRECT_INBOUND, pod_stat::REDIRECT_INBOUND),
        Verdict::Redirect(Capture::Dns) => (stat::REDIRECT_DNS, pod_stat::REDIRECT_DNS),
        _ => (stat::REDIRECT_OUTBOUND, pod_stat::REDIRECT_OUTBOUND),
    };
    count(global);
    pod_count(netns_cookie, per_pod);
}

/// True when the pod's proxy listens on `port` (its listener is registered).
#[inline(always)]
fn listening(netns_cookie: u64, port: u16) -> bool {
    let key = ListenerKey::new(netns_cookie, port);
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

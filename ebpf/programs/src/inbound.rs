//! Inbound capture: a connection arriving at a meshed pod goes to the proxy's
//! inbound listener, with no NAT and no conntrack.
//!
//! The program runs at socket lookup (sk_lookup), attached to each meshed
//! pod's network namespace. For a connection that iptables would send to
//! 15006 (`decide_inbound`: rows 9-11 and the inbound annotations), it hands
//! the proxy's listening socket to the kernel as the lookup result. The
//! accepted socket keeps the original destination as its local address, as
//! TPROXY does; sockops records it for SO_ORIGINAL_DST.
//!
//! Why sk_lookup and not a rewrite: inbound connections have no connect() in
//! the pod to hook, and a packet rewrite (tc) would need NAT state per
//! connection, the very cost meshlane removes.
use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use meshlane_common::{
    decide::{decide_inbound, Addr, Arrival, InboundVerdict},
    flags, pod_stat, stat, ListenerKey,
};

use crate::{
    ctx::{field, v6_field, AF_INET, AF_INET6, IPPROTO_TCP},
    maps::{count, pod_count, MapLists, LISTENERS, PODS, POD_BY_IP, POD_BY_IP6},
};

/// 1 when the kernel gives sk_lookup the arrival interface
/// (`ingress_ifindex`, Linux 5.17), set by the agent at load time. The
/// object is loaded with this read-only and frozen, so the verifier knows
/// its value and never checks the field's access on an older kernel, which
/// would refuse it.
#[no_mangle]
static HAS_INGRESS_IFINDEX: u32 = 0;

/// The interface a lookup's packet arrived on, or 0 where the kernel
/// cannot tell.
#[inline(always)]
unsafe fn ingress_ifindex(l: *const bpf_sk_lookup) -> u32 {
    // SAFETY: a read of the program's own read-only global.
    if unsafe { core::ptr::read_volatile(&raw const HAS_INGRESS_IFINDEX) } != 0 {
        field!(l, ingress_ifindex)
    } else {
        0
    }
}

#[sk_lookup]
pub fn capture_inbound(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's duration.
    unsafe { lookup(&ctx) }
}

#[inline(always)]
unsafe fn lookup(ctx: &SkLookupContext) -> u32 {
    let l: *const bpf_sk_lookup = ctx.lookup;
    let family = field!(l, family);
    let tcp = field!(l, protocol) == IPPROTO_TCP;
    let dst_port = field!(l, local_port) as u16;
    if family == AF_INET {
        let dst = u32::from_be(field!(l, local_ip4));
        // SAFETY: copied out at once.
        let Some(cookie) = (unsafe { POD_BY_IP.get(dst) }).copied() else {
            return sk_action::SK_PASS;
        };
        let arrival = Arrival {
            tcp,
            src_addr: u32::from_be(field!(l, remote_ip4)),
            dst_addr: dst,
            dst_port,
            ifindex: unsafe { ingress_ifindex(l) },
        };
        capture(ctx, cookie, &arrival, ListenerKey::IPV4)
    } else if family == AF_INET6 {
        let dst = v6_field!(l, local_ip6);
        // SAFETY: copied out at once.
        let Some(cookie) = (unsafe { POD_BY_IP6.get(dst) }).copied() else {
            return sk_action::SK_PASS;
        };
        let arrival = Arrival {
            tcp,
            src_addr: v6_field!(l, remote_ip6),
            dst_addr: dst,
            dst_port,
            ifindex: unsafe { ingress_ifindex(l) },
        };
        capture(ctx, cookie, &arrival, ListenerKey::IPV6)
    } else {
        sk_action::SK_PASS
    }
}

/// Hands a connection to pod `cookie` that its rules capture to the proxy's
/// inbound listener for the lookup's family.
#[inline(always)]
fn capture<A: Addr>(ctx: &SkLookupContext, cookie: u64, arrival: &Arrival<A>, serves: u32) -> u32 {
    // SAFETY: copied out at once.
    let Some(cfg) = (unsafe { PODS.get(cookie) }).copied() else {
        return sk_action::SK_PASS;
    };
    // Row 10 goes to the inbound listener; a rerouted virtual interface's
    // traffic to the outbound one.
    let port = match decide_inbound(
        &cfg,
        &MapLists {
            netns_cookie: cookie,
        },
        arrival,
    ) {
        InboundVerdict::Capture => cfg.inbound_capture_port,
        InboundVerdict::Outbound => cfg.outbound_capture_port,
        InboundVerdict::Pass(p) => {
            if let Some(row) = p.pod_stat() {
                pod_count(cookie, row);
            }
            return sk_action::SK_PASS;
        }
    };
    // Only the proxy's own listener (its uid's, or root's: a proxy may bind
    // as root and drop privileges, as transparent ones do): an app's on the
    // same port is never it.
    let key = ListenerKey::serving(cookie, port, serves, cfg.proxy_uid);
    let root = ListenerKey::serving(cookie, port, serves, 0);
    if LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok()
        || LISTENERS.redirect_sk_lookup(ctx, root, 0).is_ok()
    {
        count(stat::INBOUND_CAPTURED);
        pod_count(cookie, pod_stat::INBOUND_CAPTURED);
        return sk_action::SK_PASS;
    }
    // The proxy does not listen (yet). iptables would redirect to a closed
    // port: the client gets a reset. A pod may opt out of that.
    if cfg.has(flags::BYPASS_UNTIL_READY) {
        count(stat::NOT_READY_BYPASSED);
        pod_count(cookie, pod_stat::NOT_READY_BYPASSED);
        sk_action::SK_PASS
    } else {
        count(stat::NOT_READY_REFUSED);
        pod_count(cookie, pod_stat::NOT_READY_REFUSED);
        sk_action::SK_DROP
    }
}

//! Where does a connect() go? The decision iptables would take, as one pure
//! function over plain values.
//!
//! The order is the order of the rules Istio writes into `nat ISTIO_OUTPUT`
//! (first match wins): excludeOutboundPorts; 127.0.0.6 source; proxy uid
//! rules; proxy gid rules; DNS; 127.0.0.1; excludeOutboundIPRanges;
//! includeOutboundPorts; includeOutboundIPRanges. Each step below names the
//! rule it stands for.

use crate::{flags, ip, ports, PodConfig};

/// Per-pod lists that are too long to live in [`PodConfig`]; the kernel
/// answers these from maps, the host from vectors.
pub trait PodLists {
    fn outbound_port_excluded(&self, port: u16) -> bool;
    fn outbound_port_included(&self, port: u16) -> bool;
    fn outbound_cidr_excluded(&self, addr: u32) -> bool;
    fn outbound_cidr_included(&self, addr: u32) -> bool;
    fn inbound_port_excluded(&self, port: u16) -> bool;
    fn inbound_port_included(&self, port: u16) -> bool;
}

/// What the kernel knows at connect() time. Addresses in host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    /// Owner uid and gid of the connecting socket.
    pub uid: u32,
    pub gid: u32,
    /// Address the socket is bound to, 0 when unbound.
    pub bound_addr: u32,
    /// Destination as the app asked for it (0.0.0.0 already normalised to
    /// 127.0.0.1, as the kernel routes it).
    pub dst_addr: u32,
    pub dst_port: u16,
    /// TCP (SOCK_STREAM); everything else is UDP or raw and never redirected
    /// here.
    pub tcp: bool,
}

/// Why a connection is left alone; names the iptables rule that returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    NotTcp,
    /// Bound to a loopback address but dialling off the pod: the kernel
    /// refuses the route before any rule sees a packet.
    LoopbackSourceOffPod,
    ExcludedOutboundPort,
    InboundPassthroughSource,
    ProxyUid,
    ProxyGid,
    AppToLocal,
    Localhost,
    ExcludedCidr,
    NotIncluded,
}

/// Which proxy listener a redirected connection goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    /// `ISTIO_REDIRECT`: the outbound listener (15001).
    Outbound,
    /// `ISTIO_IN_REDIRECT`: the inbound listener (15006), for the proxy
    /// calling its own pod.
    Inbound,
    /// `ISTIO_OUTPUT_DNS`: the DNS proxy (15053).
    Dns,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass(Pass),
    Redirect(Capture),
}

impl Verdict {
    /// The local port a redirected connect goes to, if any.
    #[inline(always)]
    pub fn port(&self, cfg: &PodConfig) -> Option<u16> {
        match self {
            Verdict::Pass(_) => None,
            Verdict::Redirect(Capture::Outbound) => Some(cfg.outbound_capture_port),
            Verdict::Redirect(Capture::Inbound) => Some(cfg.inbound_capture_port),
            Verdict::Redirect(Capture::Dns) => Some(cfg.dns_proxy_port),
        }
    }
}

/// The decision for one connect() in a meshed pod (decision table rows 1-8
/// and the outbound annotations).
#[inline(always)]
pub fn decide_connect<L: PodLists>(cfg: &PodConfig, lists: &L, c: &Connect) -> Verdict {
    let v = decide_nat(cfg, lists, c);
    // TPROXY mode adds Istio's mangle rules: the proxy's uid or gid sending
    // to a local address other than 127.0.0.1 is marked in OUTPUT and, on
    // its way in over lo, TPROXY'd to the inbound listener, unless its port
    // is one the inbound rules return (status, health, stats, excluded).
    // This reaches what the nat rules leave alone: the tunnel port, and the
    // gid-only owner (row 8 becomes a capture).
    if cfg.has(flags::TPROXY)
        && matches!(
            v,
            Verdict::Pass(
                Pass::ProxyUid | Pass::ProxyGid | Pass::AppToLocal | Pass::ExcludedOutboundPort
            )
        )
        && (c.uid == cfg.proxy_uid || c.gid == cfg.proxy_gid)
        && cfg.is_local(c.dst_addr)
        && c.dst_addr != ip::LOCALHOST
        && capture_inbound(cfg, lists, c.dst_port)
    {
        return Verdict::Redirect(Capture::Inbound);
    }
    v
}

/// Rows 1-8 as Istio's `nat` rules decide them.
#[inline(always)]
fn decide_nat<L: PodLists>(cfg: &PodConfig, lists: &L, c: &Connect) -> Verdict {
    if !c.tcp {
        return Verdict::Pass(Pass::NotTcp);
    }
    let dst = c.dst_addr;
    let port = c.dst_port;
    let local = cfg.is_local(dst);
    let dns = cfg.has(flags::DNS_CAPTURE) && port == ports::DNS;
    // The "app to a local address" RETURN rules are omitted by Istio when the
    // include list names a loopback range.
    let app_local_returns = !cfg.has(flags::INCLUDE_OUTBOUND_HAS_LOOPBACK);

    if ip::is_loopback(c.bound_addr) && !local {
        return Verdict::Pass(Pass::LoopbackSourceOffPod);
    }
    // -p tcp --dport P -j RETURN (excludeOutboundPorts)
    if lists.outbound_port_excluded(port) {
        return Verdict::Pass(Pass::ExcludedOutboundPort);
    }
    // -o lo -s 127.0.0.6/32 -j RETURN
    if local && c.bound_addr == ip::INBOUND_PASSTHROUGH_SRC {
        return Verdict::Pass(Pass::InboundPassthroughSource);
    }
    // The proxy calling back into its own pod goes to the inbound listener:
    // -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 [! 53] -m owner --{uid,gid}-owner P -j ISTIO_IN_REDIRECT
    let to_own_inbound = local && dst != ip::LOCALHOST && port != cfg.tunnel_port;
    if c.uid == cfg.proxy_uid {
        if to_own_inbound && !dns {
            return Verdict::Redirect(Capture::Inbound);
        }
        // -m owner --uid-owner P -j RETURN
        return Verdict::Pass(Pass::ProxyUid);
    }
    // -o lo [-p tcp ! --dport 53] -m owner ! --uid-owner P -j RETURN
    if local && app_local_returns && !dns {
        return Verdict::Pass(Pass::AppToLocal);
    }
    if c.gid == cfg.proxy_gid {
        if to_own_inbound {
            return Verdict::Redirect(Capture::Inbound);
        }
        return Verdict::Pass(Pass::ProxyGid);
    }
    // (the gid variant of "app to local" can no longer match: the uid one
    // above already returned for every such socket whose uid differs)
    if dns {
        return Verdict::Redirect(Capture::Dns);
    }
    // -d 127.0.0.1/32 -j RETURN
    if dst == ip::LOCALHOST {
        return Verdict::Pass(Pass::Localhost);
    }
    // -d CIDR -j RETURN (excludeOutboundIPRanges)
    if lists.outbound_cidr_excluded(dst) {
        return Verdict::Pass(Pass::ExcludedCidr);
    }
    // -p tcp --dport P -j ISTIO_REDIRECT (includeOutboundPorts)
    if lists.outbound_port_included(port) {
        return Verdict::Redirect(Capture::Outbound);
    }
    // -j ISTIO_REDIRECT or -d CIDR -j ISTIO_REDIRECT (includeOutboundIPRanges)
    if cfg.has(flags::INCLUDE_ALL_OUTBOUND_CIDRS) || lists.outbound_cidr_included(dst) {
        return Verdict::Redirect(Capture::Outbound);
    }
    Verdict::Pass(Pass::NotIncluded)
}

/// What the kernel knows when a connection request arrives at a pod's
/// address (sk_lookup). Addresses in host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub tcp: bool,
    pub src_addr: u32,
    pub dst_port: u16,
}

/// Why an arriving connection is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundPass {
    /// Row 11: only TCP is captured.
    NotTcp,
    /// The connection starts inside the pod itself (loopback or the pod's
    /// own address): connect() already took its decision (rows 2, 4, 7, and
    /// the proxy's 127.0.0.6 passthrough to its app).
    FromInsidePod,
    /// Row 9: the tunnel port (REDIRECT mode only: Istio's TPROXY rules
    /// capture it).
    Tunnel,
    /// Row 9: excludeInboundPorts, Istio's own ports, the status port.
    ExcludedPort,
    /// includeInboundPorts names other ports.
    NotIncluded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundVerdict {
    Pass(InboundPass),
    /// Row 10: to the proxy's inbound listener, keeping the destination as
    /// the accepted socket's local address.
    Capture,
}

/// The decision for a connection arriving at a meshed pod (rows 9-11 and
/// the inbound annotations).
#[inline(always)]
pub fn decide_inbound<L: PodLists>(cfg: &PodConfig, lists: &L, a: &Arrival) -> InboundVerdict {
    if !a.tcp {
        return InboundVerdict::Pass(InboundPass::NotTcp);
    }
    if cfg.is_local(a.src_addr) {
        return InboundVerdict::Pass(InboundPass::FromInsidePod);
    }
    if capture_inbound(cfg, lists, a.dst_port) {
        InboundVerdict::Capture
    } else if a.dst_port == cfg.tunnel_port && !cfg.has(flags::TPROXY) {
        InboundVerdict::Pass(InboundPass::Tunnel)
    } else if cfg.has(flags::INCLUDE_ALL_INBOUND_PORTS) {
        InboundVerdict::Pass(InboundPass::ExcludedPort)
    } else {
        InboundVerdict::Pass(InboundPass::NotIncluded)
    }
}

/// The port rule of rows 9-10: true when a TCP connection from outside the
/// pod to `dst_port` goes to the inbound listener. Istio's REDIRECT rules
/// return the tunnel port first; its TPROXY rules do not.
#[inline(always)]
pub fn capture_inbound<L: PodLists>(cfg: &PodConfig, lists: &L, dst_port: u16) -> bool {
    if dst_port == cfg.tunnel_port && !cfg.has(flags::TPROXY) {
        return false;
    }
    if cfg.has(flags::INCLUDE_ALL_INBOUND_PORTS) {
        !lists.inbound_port_excluded(dst_port)
    } else {
        lists.inbound_port_included(dst_port)
    }
}

/// The source address the kernel would have picked for the original
/// destination, which iptables' REDIRECT keeps and a connect() rewrite to
/// 127.0.0.1 would lose. `None`: let the kernel choose (127.0.0.1).
#[inline(always)]
pub fn source_for(cfg: &PodConfig, orig_dst: u32) -> Option<u32> {
    if ip::is_loopback(orig_dst) {
        return None;
    }
    if cfg.is_pod_ip(orig_dst) {
        return Some(orig_dst);
    }
    if cfg.ip_count > 0 {
        Some(cfg.ips[0])
    } else {
        None
    }
}

#[cfg(test)]
mod tests;

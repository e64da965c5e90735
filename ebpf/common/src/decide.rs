//! Where does a connect() go? The decision iptables would take, as one pure
//! function over plain values.
//!
//! The order is the order of the rules Istio writes into `nat ISTIO_OUTPUT`
//! (first match wins): excludeOutboundPorts; 127.0.0.6 source; proxy uid
//! rules; proxy gid rules; DNS; 127.0.0.1; excludeOutboundIPRanges;
//! includeOutboundPorts; includeOutboundIPRanges. Each step below names the
//! rule it stands for.

use crate::{flags, iface_role, ip, ports, PodConfig, V6};

/// Per-pod lists that are too long to live in [`PodConfig`]; the kernel
/// answers these from maps, the host from vectors.
pub trait PodLists {
    fn outbound_port_excluded(&self, port: u16) -> bool;
    fn outbound_port_included(&self, port: u16) -> bool;
    fn outbound_cidr_excluded(&self, addr: u32) -> bool;
    fn outbound_cidr_included(&self, addr: u32) -> bool;
    fn outbound_cidr_excluded6(&self, addr: V6) -> bool;
    fn outbound_cidr_included6(&self, addr: V6) -> bool;
    fn inbound_port_excluded(&self, port: u16) -> bool;
    fn inbound_port_included(&self, port: u16) -> bool;
    /// True when `addr` (host order) is one of the pod's IPv4 addresses
    /// beyond those in [`PodConfig::ips`] (a pod may have any number).
    fn is_pod_ip4(&self, addr: u32) -> bool;
    /// True when `addr` is one of the pod's IPv6 addresses.
    fn is_pod_ip6(&self, addr: V6) -> bool;
    /// The pod's IPv6 source address for destinations off the pod: what
    /// the kernel picks, and so what iptables' REDIRECT keeps.
    fn pod_src6(&self) -> Option<V6>;
    /// [`crate::iface_role`] bits of interface `ifindex` of the pod's
    /// namespace (0: the annotations name it not).
    fn iface_roles(&self, ifindex: u32) -> u32;
    /// The ifindex of the device of the pod's route to `addr` (longest
    /// prefix of its main table; 0: no route known).
    fn route_dev4(&self, addr: u32) -> u32;
    fn route_dev6(&self, addr: V6) -> u32;
}

/// An address family's addresses, as the decision needs them: Istio writes
/// the same rules for both families with ::1 for 127.0.0.1, ::6 for
/// 127.0.0.6, and IPv6 ranges in the IPv6 rules.
pub trait Addr: Copy + PartialEq {
    /// 127.0.0.1 / ::1: the address Istio's `-d 127.0.0.1/32` names.
    const LOCALHOST: Self;
    /// 127.0.0.6 / ::6: the source of the proxy's inbound passthrough.
    const PASSTHROUGH_SRC: Self;
    /// 127.0.0.0/8 / ::1: a source that cannot leave the pod.
    fn is_loopback(self) -> bool;
    /// Routed through `lo` in a meshed pod: loopback, and for IPv6 also
    /// `::6`, which the pod's set-up assigns to `lo` (127.0.0.6 is in
    /// 127.0.0.0/8 already).
    #[inline(always)]
    fn is_on_lo(self) -> bool {
        self.is_loopback()
    }
    /// The source the kernel gives an unbound socket (`bound` unspecified)
    /// connecting to `dst`, as far as the rules can tell: for `::6` (a
    /// local address) that is `::6` itself, which `-s ::6/128` matches;
    /// an unbound IPv4 socket to 127.0.0.6 gets 127.0.0.1.
    #[inline(always)]
    fn source(bound: Self, _dst: Self) -> Self {
        bound
    }
    fn is_pod_ip<L: PodLists>(self, cfg: &PodConfig, lists: &L) -> bool;
    fn cidr_excluded<L: PodLists>(self, lists: &L) -> bool;
    fn cidr_included<L: PodLists>(self, lists: &L) -> bool;
    fn route_dev<L: PodLists>(self, lists: &L) -> u32;
}

impl Addr for u32 {
    const LOCALHOST: u32 = ip::LOCALHOST;
    const PASSTHROUGH_SRC: u32 = ip::INBOUND_PASSTHROUGH_SRC;
    #[inline(always)]
    fn is_loopback(self) -> bool {
        ip::is_loopback(self)
    }
    #[inline(always)]
    fn is_pod_ip<L: PodLists>(self, cfg: &PodConfig, lists: &L) -> bool {
        cfg.is_pod_ip(self) || lists.is_pod_ip4(self)
    }
    #[inline(always)]
    fn cidr_excluded<L: PodLists>(self, lists: &L) -> bool {
        lists.outbound_cidr_excluded(self)
    }
    #[inline(always)]
    fn cidr_included<L: PodLists>(self, lists: &L) -> bool {
        lists.outbound_cidr_included(self)
    }
    #[inline(always)]
    fn route_dev<L: PodLists>(self, lists: &L) -> u32 {
        lists.route_dev4(self)
    }
}

impl Addr for V6 {
    const LOCALHOST: V6 = V6::LOCALHOST;
    const PASSTHROUGH_SRC: V6 = V6::PASSTHROUGH_SRC;
    #[inline(always)]
    fn is_loopback(self) -> bool {
        self.same(V6::LOCALHOST)
    }
    #[inline(always)]
    fn is_on_lo(self) -> bool {
        self.same(V6::LOCALHOST) | self.same(V6::PASSTHROUGH_SRC)
    }
    #[inline(always)]
    fn source(bound: V6, dst: V6) -> V6 {
        if bound.is_unspecified() && dst.same(V6::PASSTHROUGH_SRC) {
            V6::PASSTHROUGH_SRC
        } else {
            bound
        }
    }
    #[inline(always)]
    fn is_pod_ip<L: PodLists>(self, _cfg: &PodConfig, lists: &L) -> bool {
        lists.is_pod_ip6(self)
    }
    #[inline(always)]
    fn cidr_excluded<L: PodLists>(self, lists: &L) -> bool {
        lists.outbound_cidr_excluded6(self)
    }
    #[inline(always)]
    fn cidr_included<L: PodLists>(self, lists: &L) -> bool {
        lists.outbound_cidr_included6(self)
    }
    #[inline(always)]
    fn route_dev<L: PodLists>(self, lists: &L) -> u32 {
        lists.route_dev6(self)
    }
}

/// What iptables' `-o lo` amounts to in a pod: the destination is routed
/// through the loopback device (a loopback address or the pod's own).
#[inline(always)]
pub fn is_local<A: Addr, L: PodLists>(cfg: &PodConfig, lists: &L, a: A) -> bool {
    a.is_on_lo() || a.is_pod_ip(cfg, lists)
}

/// What the kernel knows at connect() (or, for UDP, sendmsg()) time.
/// IPv4 addresses in host byte order; an IPv4-mapped IPv6 destination is
/// decided as the IPv4 address it maps (its packets are IPv4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect<A = u32> {
    /// Owner uid and gid of the connecting socket.
    pub uid: u32,
    pub gid: u32,
    /// Address the socket is bound to, unspecified (0, ::) when unbound.
    pub bound_addr: A,
    /// Destination as the app asked for it (0.0.0.0 already normalised to
    /// 127.0.0.1, as the kernel routes it).
    pub dst_addr: A,
    pub dst_port: u16,
    /// TCP (SOCK_STREAM); false: UDP, which only DNS capture redirects.
    pub tcp: bool,
}

/// Why a connection is left alone; names the iptables rule that returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Not TCP, and not a UDP DNS query DNS capture takes.
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
    /// Native IPv6 from a pod without IPv6 addresses: Istio writes no
    /// ip6tables rules for it (IPv4-mapped destinations are IPv4 packets
    /// and meet the IPv4 rules).
    Ipv4OnlyPod,
    /// Leaves by an interface `excludeInterfaces` names (`-A OUTPUT -o IF
    /// -j RETURN`, ahead of every other rule).
    ExcludedInterface,
}

impl Pass {
    /// The pod counter of the rule ([`crate::pod_stat`]).
    #[inline(always)]
    pub const fn pod_stat(self) -> usize {
        use crate::pod_stat::*;
        match self {
            Pass::NotTcp => PASS_NOT_TCP,
            Pass::LoopbackSourceOffPod => PASS_LOOPBACK_SOURCE_OFF_POD,
            Pass::ExcludedOutboundPort => PASS_EXCLUDED_OUTBOUND_PORT,
            Pass::InboundPassthroughSource => PASS_INBOUND_PASSTHROUGH_SOURCE,
            Pass::ProxyUid => PASS_PROXY_UID,
            Pass::ProxyGid => PASS_PROXY_GID,
            Pass::AppToLocal => PASS_APP_TO_LOCAL,
            Pass::Localhost => PASS_LOCALHOST,
            Pass::ExcludedCidr => PASS_EXCLUDED_CIDR,
            Pass::NotIncluded => PASS_NOT_INCLUDED,
            Pass::Ipv4OnlyPod => PASS_IPV4_ONLY_POD,
            Pass::ExcludedInterface => PASS_EXCLUDED_INTERFACE,
        }
    }
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
pub fn decide_connect<A: Addr, L: PodLists>(cfg: &PodConfig, lists: &L, c: &Connect<A>) -> Verdict {
    if leaves_by_excluded(cfg, lists, c.dst_addr) {
        return Verdict::Pass(Pass::ExcludedInterface);
    }
    let v = decide_nat(cfg, lists, c);
    // TPROXY mode adds Istio's mangle rules: the proxy's uid or gid sending
    // to a local address other than 127.0.0.1 is marked in OUTPUT and, on
    // its way in over lo, TPROXY'd to the inbound listener, unless its port
    // is one the inbound rules return (status, health, stats, excluded).
    // This reaches what the nat rules leave alone: the tunnel port, and the
    // gid-only owner (row 8 becomes a capture).
    if cfg.has(flags::TPROXY)
        && c.tcp
        && matches!(
            v,
            Verdict::Pass(
                Pass::ProxyUid | Pass::ProxyGid | Pass::AppToLocal | Pass::ExcludedOutboundPort
            )
        )
        && (c.uid == cfg.proxy_uid || c.gid == cfg.proxy_gid)
        // ISTIO_INBOUND's `-s 127.0.0.6/32 -i lo -j RETURN` (::6 for IPv6)
        // comes before the TPROXY rule.
        && A::source(c.bound_addr, c.dst_addr) != A::PASSTHROUGH_SRC
        && is_local(cfg, lists, c.dst_addr)
        && c.dst_addr != A::LOCALHOST
        && capture_inbound(cfg, lists, c.dst_port)
    {
        return Verdict::Redirect(Capture::Inbound);
    }
    v
}

/// True when a packet to `dst` leaves the pod by an interface its
/// `excludeInterfaces` names: by `lo` for the pod's own addresses, else by
/// the device of the pod's route to it.
#[inline(always)]
pub fn leaves_by_excluded<A: Addr, L: PodLists>(cfg: &PodConfig, lists: &L, dst: A) -> bool {
    if !cfg.has(flags::INTERFACES) {
        return false;
    }
    let dev = if is_local(cfg, lists, dst) {
        crate::LOOPBACK_IFINDEX
    } else {
        dst.route_dev(lists)
    };
    dev != 0 && lists.iface_roles(dev) & iface_role::EXCLUDE != 0
}

/// The decision for an AF_INET6 socket: an IPv4-mapped destination is
/// decided exactly as the IPv4 address (with an IPv4-mapped or unspecified
/// bound address as its IPv4 form); a native one by the IPv6 rules, which
/// Istio writes only for pods with IPv6 addresses.
#[inline(always)]
pub fn decide_connect6<L: PodLists>(cfg: &PodConfig, lists: &L, c: &Connect<V6>) -> Verdict {
    match c.dst_addr.mapped_v4() {
        Some(dst) => decide_connect(cfg, lists, &mapped_connect(c, dst)),
        None if cfg.has(flags::IPV6) => decide_connect(cfg, lists, c),
        None => Verdict::Pass(Pass::Ipv4OnlyPod),
    }
}

/// The IPv4 view of an AF_INET6 socket's connect to `::ffff:dst`.
#[inline(always)]
pub fn mapped_connect(c: &Connect<V6>, dst: u32) -> Connect<u32> {
    Connect {
        uid: c.uid,
        gid: c.gid,
        // Unbound (::) is 0; a socket bound to a native IPv6 address cannot
        // reach an IPv4 destination at all (the kernel refuses), so its
        // value does not matter.
        bound_addr: c.bound_addr.mapped_v4().unwrap_or(0),
        dst_addr: if dst == 0 { ip::LOCALHOST } else { dst },
        dst_port: c.dst_port,
        tcp: c.tcp,
    }
}

/// Rows 1-8 as Istio's `nat` rules decide them.
#[inline(always)]
fn decide_nat<A: Addr, L: PodLists>(cfg: &PodConfig, lists: &L, c: &Connect<A>) -> Verdict {
    let dst = c.dst_addr;
    let port = c.dst_port;
    let dns = cfg.has(flags::DNS_CAPTURE) && port == ports::DNS;
    // UDP meets only the rules without `-p tcp`: Istio writes UDP rules for
    // DNS alone (the port exclusions get a `-p udp` twin when DNS capture is
    // on, the owner and 127.0.0.6 returns name no protocol).
    if !c.tcp && !dns {
        return Verdict::Pass(Pass::NotTcp);
    }
    let local = is_local(cfg, lists, dst);
    // The "app to a local address" RETURN rules are omitted by Istio when the
    // include list names a loopback range.
    let app_local_returns = !cfg.has(flags::INCLUDE_OUTBOUND_HAS_LOOPBACK);

    let bound = A::source(c.bound_addr, dst);
    if bound.is_loopback() && !local {
        return Verdict::Pass(Pass::LoopbackSourceOffPod);
    }
    // -p tcp --dport P -j RETURN (excludeOutboundPorts)
    if lists.outbound_port_excluded(port) {
        return Verdict::Pass(Pass::ExcludedOutboundPort);
    }
    // -o lo -s 127.0.0.6/32 -j RETURN
    if local && bound == A::PASSTHROUGH_SRC {
        return Verdict::Pass(Pass::InboundPassthroughSource);
    }
    // The proxy calling back into its own pod goes to the inbound listener:
    // -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 [! 53] -m owner --{uid,gid}-owner P -j ISTIO_IN_REDIRECT
    let to_own_inbound = c.tcp && local && dst != A::LOCALHOST && port != cfg.tunnel_port;
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
    if dst == A::LOCALHOST {
        return Verdict::Pass(Pass::Localhost);
    }
    // -d CIDR -j RETURN (excludeOutboundIPRanges)
    if dst.cidr_excluded(lists) {
        return Verdict::Pass(Pass::ExcludedCidr);
    }
    // -p tcp --dport P -j ISTIO_REDIRECT (includeOutboundPorts)
    if lists.outbound_port_included(port) {
        return Verdict::Redirect(Capture::Outbound);
    }
    // -j ISTIO_REDIRECT or -d CIDR -j ISTIO_REDIRECT (includeOutboundIPRanges)
    if cfg.has(flags::INCLUDE_ALL_OUTBOUND_CIDRS) || dst.cidr_included(lists) {
        return Verdict::Redirect(Capture::Outbound);
    }
    Verdict::Pass(Pass::NotIncluded)
}

/// What the kernel knows when a connection request arrives at a pod's
/// address (sk_lookup). IPv4 addresses in host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival<A = u32> {
    pub tcp: bool,
    pub src_addr: A,
    pub dst_addr: A,
    pub dst_port: u16,
    /// The interface it arrived on in the pod's namespace; 0: unknown (a
    /// kernel before 5.17 does not tell sk_lookup).
    pub ifindex: u32,
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
    /// Arrived on an interface `excludeInterfaces` names.
    ExcludedInterface,
    /// Arrived on a rerouted virtual interface, for a destination outside
    /// the pod's outbound ranges (`-I PREROUTING 1 -i IF -j RETURN`).
    VirtualInterface,
}

impl InboundPass {
    /// The pod counter of the rule; `None` for UDP, which is not counted
    /// (every datagram to a pod is looked up).
    #[inline(always)]
    pub const fn pod_stat(self) -> Option<usize> {
        use crate::pod_stat::*;
        Some(match self {
            InboundPass::NotTcp => return None,
            InboundPass::FromInsidePod => IN_PASS_FROM_INSIDE_POD,
            InboundPass::Tunnel => IN_PASS_TUNNEL,
            InboundPass::ExcludedPort => IN_PASS_EXCLUDED_PORT,
            InboundPass::NotIncluded => IN_PASS_NOT_INCLUDED,
            InboundPass::ExcludedInterface => IN_PASS_EXCLUDED_INTERFACE,
            InboundPass::VirtualInterface => IN_PASS_VIRTUAL_INTERFACE,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundVerdict {
    Pass(InboundPass),
    /// Row 10: to the proxy's inbound listener, keeping the destination as
    /// the accepted socket's local address.
    Capture,
    /// Arrived on a rerouted virtual interface for a destination the pod's
    /// outbound ranges include: to the proxy's outbound listener
    /// (`-I PREROUTING 1 -i IF [-d CIDR] -j ISTIO_REDIRECT`).
    Outbound,
}

/// The decision for a connection arriving at a meshed pod (rows 9-11 and
/// the inbound annotations).
#[inline(always)]
pub fn decide_inbound<A: Addr, L: PodLists>(
    cfg: &PodConfig,
    lists: &L,
    a: &Arrival<A>,
) -> InboundVerdict {
    if !a.tcp {
        return InboundVerdict::Pass(InboundPass::NotTcp);
    }
    if is_local(cfg, lists, a.src_addr) {
        return InboundVerdict::Pass(InboundPass::FromInsidePod);
    }
    let roles = if cfg.has(flags::INTERFACES) && a.ifindex != 0 {
        lists.iface_roles(a.ifindex)
    } else {
        0
    };
    // Istio's interface rules are in nat PREROUTING: reroute first (they
    // are inserted at the top), then the excluded interfaces' RETURN, then
    // REDIRECT-mode capture. TPROXY capture is in mangle PREROUTING, which
    // comes before nat and which an excluded interface's RETURN leaves
    // first; what it does not take still meets the nat rules.
    let tproxy_capture = cfg.has(flags::TPROXY)
        && roles & iface_role::EXCLUDE == 0
        && capture_inbound(cfg, lists, a.dst_port);
    if !tproxy_capture {
        if roles & iface_role::REROUTE != 0 {
            return if cfg.has(flags::INCLUDE_ALL_OUTBOUND_CIDRS) || a.dst_addr.cidr_included(lists)
            {
                InboundVerdict::Outbound
            } else {
                InboundVerdict::Pass(InboundPass::VirtualInterface)
            };
        }
        if roles & iface_role::EXCLUDE != 0 {
            return InboundVerdict::Pass(InboundPass::ExcludedInterface);
        }
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
pub fn source_for<L: PodLists>(cfg: &PodConfig, lists: &L, orig_dst: u32) -> Option<u32> {
    if ip::is_loopback(orig_dst) {
        return None;
    }
    if orig_dst.is_pod_ip(cfg, lists) {
        return Some(orig_dst);
    }
    if cfg.ip_count > 0 {
        Some(cfg.ips[0])
    } else {
        None
    }
}

/// [`source_for`] for IPv6: the original destination itself when it is
/// one of the pod's addresses, else the pod's IPv6 source; `None` for ::1.
#[inline(always)]
pub fn source_for6<L: PodLists>(cfg: &PodConfig, lists: &L, orig_dst: V6) -> Option<V6> {
    if orig_dst.is_loopback() {
        return None;
    }
    if orig_dst.is_pod_ip(cfg, lists) {
        return Some(orig_dst);
    }
    lists.pod_src6()
}

/// Whether a listener on a capture port, bound by `owner`, is registered in
/// `LISTENERS` for a pod whose proxy runs as `proxy_uid`: only the owners
/// capture ever asks for (the proxy's uid, or root for a proxy that binds
/// before dropping privileges). An app's listeners are never used, so
/// registering them would only let a pod that can change uid fill the map
/// the node's proxies share.
pub const fn registers_listener(owner: u32, proxy_uid: u32) -> bool {
    owner == 0 || owner == proxy_uid
}

#[cfg(test)]
mod tests;

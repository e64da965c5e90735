//! Table-driven tests of the decision, one row per line of the decision table
//! in ebpf/README.md plus the annotation cases. The golden-rule oracle lives
//! in the agent's tests (it needs the rules files and std).
extern crate std;

use std::vec::Vec;

use super::*;
use crate::{PodConfig, V6};

const POD: u32 = 0x0af4_0105; // 10.244.1.5
const REMOTE: u32 = 0x0af4_0207; // 10.244.2.7
const APP: u32 = 1000;
const PROXY: u32 = 1337;

#[derive(Clone, Debug, Default)]
struct Lists {
    out_excl_ports: Vec<u16>,
    out_incl_ports: Vec<u16>,
    out_excl_cidrs: Vec<(u32, u8)>,
    out_incl_cidrs: Vec<(u32, u8)>,
    in_excl_ports: Vec<u16>,
    in_incl_ports: Vec<u16>,
    out_excl_cidrs6: Vec<(V6, u8)>,
    out_incl_cidrs6: Vec<(V6, u8)>,
    pod_ips4: Vec<u32>,
    pod_ips6: Vec<V6>,
    /// (ifindex, iface_role bits).
    ifaces: Vec<(u32, u32)>,
    /// (network, prefix length, device ifindex).
    routes4: Vec<(u32, u8, u32)>,
}

fn in_prefix6(a: V6, net: V6, len: u8) -> bool {
    let (a, n) = (
        u128::from_be_bytes(a.octets()),
        u128::from_be_bytes(net.octets()),
    );
    len == 0 || (len >= 128 && a == n) || (len < 128 && (a ^ n) >> (128 - len as u32) == 0)
}

impl PodLists for Lists {
    fn outbound_port_excluded(&self, port: u16) -> bool {
        self.out_excl_ports.contains(&port)
    }
    fn outbound_port_included(&self, port: u16) -> bool {
        self.out_incl_ports.contains(&port)
    }
    fn outbound_cidr_excluded(&self, addr: u32) -> bool {
        self.out_excl_cidrs
            .iter()
            .any(|&(n, l)| ip::in_prefix(addr, n, l))
    }
    fn outbound_cidr_included(&self, addr: u32) -> bool {
        self.out_incl_cidrs
            .iter()
            .any(|&(n, l)| ip::in_prefix(addr, n, l))
    }
    fn inbound_port_excluded(&self, port: u16) -> bool {
        self.in_excl_ports.contains(&port)
    }
    fn inbound_port_included(&self, port: u16) -> bool {
        self.in_incl_ports.contains(&port)
    }
    fn outbound_cidr_excluded6(&self, addr: V6) -> bool {
        self.out_excl_cidrs6
            .iter()
            .any(|&(n, l)| in_prefix6(addr, n, l))
    }
    fn outbound_cidr_included6(&self, addr: V6) -> bool {
        self.out_incl_cidrs6
            .iter()
            .any(|&(n, l)| in_prefix6(addr, n, l))
    }
    fn is_pod_ip4(&self, addr: u32) -> bool {
        self.pod_ips4.contains(&addr)
    }
    fn is_pod_ip6(&self, addr: V6) -> bool {
        self.pod_ips6.contains(&addr)
    }
    fn pod_src6(&self) -> Option<V6> {
        self.pod_ips6.first().copied()
    }
    fn iface_roles(&self, ifindex: u32) -> u32 {
        self.ifaces
            .iter()
            .find(|(i, _)| *i == ifindex)
            .map_or(0, |(_, r)| *r)
    }
    fn route_dev4(&self, addr: u32) -> u32 {
        self.routes4
            .iter()
            .filter(|&&(n, l, _)| ip::in_prefix(addr, n, l))
            .max_by_key(|&&(_, l, _)| l)
            .map_or(0, |&(_, _, d)| d)
    }
    fn route_dev6(&self, _addr: V6) -> u32 {
        0
    }
}

fn pod() -> PodConfig {
    let mut cfg = PodConfig::istio_default();
    cfg.ip_count = 1;
    cfg.ips[0] = POD;
    cfg
}

fn default_lists() -> Lists {
    Lists {
        out_excl_ports: std::vec![15020],
        in_excl_ports: std::vec![15020, 15021, 15090],
        ..Default::default()
    }
}

fn conn(uid: u32, gid: u32, bound: u32, dst: u32, port: u16) -> Connect {
    Connect {
        uid,
        gid,
        bound_addr: bound,
        dst_addr: dst,
        dst_port: port,
        tcp: true,
    }
}

use Capture::*;
use Verdict::{Pass as P, Redirect as R};

#[test]
fn decision_table_rows_1_to_8_default_pod() {
    let cfg = pod();
    let l = default_lists();
    let rows: &[(&str, Connect, Verdict)] = &[
        (
            "1 app to remote",
            conn(APP, APP, 0, REMOTE, 9080),
            R(Outbound),
        ),
        (
            "1 app to remote 443",
            conn(APP, APP, 0, 0x0808_0808, 443),
            R(Outbound),
        ),
        (
            "2 app to own pod ip",
            conn(APP, APP, 0, POD, 9080),
            P(Pass::AppToLocal),
        ),
        (
            "2 app to 127.0.0.1",
            conn(APP, APP, 0, ip::LOCALHOST, 9080),
            P(Pass::AppToLocal),
        ),
        (
            "2 app to 127.0.0.5",
            conn(APP, APP, 0, 0x7f00_0005, 9080),
            P(Pass::AppToLocal),
        ),
        (
            "3 proxy to remote",
            conn(PROXY, PROXY, 0, REMOTE, 9080),
            P(Pass::ProxyUid),
        ),
        (
            "4 proxy to own pod ip",
            conn(PROXY, PROXY, 0, POD, 9080),
            R(Inbound),
        ),
        (
            "4 proxy to 127.0.0.5",
            conn(PROXY, PROXY, 0, 0x7f00_0005, 9080),
            R(Inbound),
        ),
        (
            "4 istio-validation probe",
            conn(PROXY, PROXY, 0, 0x7f00_0006, 15002),
            R(Inbound),
        ),
        (
            "5 proxy to 127.0.0.1",
            conn(PROXY, PROXY, 0, ip::LOCALHOST, 15000),
            P(Pass::ProxyUid),
        ),
        (
            "6 proxy to pod ip 15008",
            conn(PROXY, PROXY, 0, POD, 15008),
            P(Pass::ProxyUid),
        ),
        (
            "7 bound 127.0.0.6 to pod ip",
            conn(PROXY, PROXY, ip::INBOUND_PASSTHROUGH_SRC, POD, 9080),
            P(Pass::InboundPassthroughSource),
        ),
        (
            "7 app bound 127.0.0.6",
            conn(APP, APP, ip::INBOUND_PASSTHROUGH_SRC, POD, 9080),
            P(Pass::InboundPassthroughSource),
        ),
        (
            "8 gid only to remote",
            conn(APP, PROXY, 0, REMOTE, 9080),
            P(Pass::ProxyGid),
        ),
        (
            "8 gid only to pod ip",
            conn(APP, PROXY, 0, POD, 9080),
            P(Pass::AppToLocal),
        ),
        (
            "excluded 15020",
            conn(APP, APP, 0, REMOTE, 15020),
            P(Pass::ExcludedOutboundPort),
        ),
        (
            "15020 from proxy to pod ip",
            conn(PROXY, PROXY, 0, POD, 15020),
            P(Pass::ExcludedOutboundPort),
        ),
    ];
    for (name, c, want) in rows {
        assert_eq!(decide_connect(&cfg, &l, c), *want, "row {name}: {c:?}");
    }
}

#[test]
fn udp_is_redirected_only_for_dns_capture() {
    let mut cfg = pod();
    let udp = |uid, dst, port| Connect {
        tcp: false,
        ..conn(uid, uid, 0, dst, port)
    };
    let l = default_lists();
    assert_eq!(
        decide_connect(&cfg, &l, &udp(APP, REMOTE, 9080)),
        P(Pass::NotTcp)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &udp(APP, REMOTE, 53)),
        P(Pass::NotTcp)
    );
    cfg.flags |= flags::DNS_CAPTURE;
    // -p udp --dport 53 -j REDIRECT --to-port 15053, for any server, local
    // ones (127.0.0.53) included.
    assert_eq!(decide_connect(&cfg, &l, &udp(APP, REMOTE, 53)), R(Dns));
    assert_eq!(decide_connect(&cfg, &l, &udp(APP, 0x7f00_0035, 53)), R(Dns));
    assert_eq!(decide_connect(&cfg, &l, &udp(APP, POD, 53)), R(Dns));
    // Other UDP ports stay untouched; the proxy's own queries too.
    assert_eq!(
        decide_connect(&cfg, &l, &udp(APP, REMOTE, 5353)),
        P(Pass::NotTcp)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &udp(PROXY, REMOTE, 53)),
        P(Pass::ProxyUid)
    );
    // The gid too (-m owner --gid-owner P -j RETURN names no protocol).
    let mut g = udp(APP, REMOTE, 53);
    g.gid = PROXY;
    assert_eq!(decide_connect(&cfg, &l, &g), P(Pass::ProxyGid));
    // 127.0.0.6 as source: -o lo -s 127.0.0.6/32 -j RETURN.
    let mut s6 = udp(APP, POD, 53);
    s6.bound_addr = ip::INBOUND_PASSTHROUGH_SRC;
    assert_eq!(
        decide_connect(&cfg, &l, &s6),
        P(Pass::InboundPassthroughSource)
    );
    // excludeOutboundPorts naming 53 gets its -p udp twin.
    let ex = Lists {
        out_excl_ports: std::vec![53],
        ..default_lists()
    };
    assert_eq!(
        decide_connect(&cfg, &ex, &udp(APP, REMOTE, 53)),
        P(Pass::ExcludedOutboundPort)
    );
}

const POD6: V6 = V6::from_octets([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 5]);
const REMOTE6: V6 = V6::from_octets([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 7]);

fn pod6() -> (PodConfig, Lists) {
    let mut cfg = pod();
    cfg.flags |= flags::IPV6;
    let l = Lists {
        pod_ips6: std::vec![POD6],
        ..default_lists()
    };
    (cfg, l)
}

fn conn6(uid: u32, bound: V6, dst: V6, port: u16) -> Connect<V6> {
    Connect {
        uid,
        gid: uid,
        bound_addr: bound,
        dst_addr: dst,
        dst_port: port,
        tcp: true,
    }
}

#[test]
fn ipv6_rows_as_istios_ip6tables() {
    let (cfg, l) = pod6();
    let u = V6::UNSPECIFIED;
    let d = |c: Connect<V6>| decide_connect6(&cfg, &l, &c);
    // Row 1: app to a remote address: ISTIO_REDIRECT.
    assert_eq!(d(conn6(APP, u, REMOTE6, 80)), R(Outbound));
    // App to ::1 and to its own IPv6 address: -o lo ... RETURN.
    assert_eq!(d(conn6(APP, u, V6::LOCALHOST, 80)), P(Pass::AppToLocal));
    assert_eq!(d(conn6(APP, u, POD6, 80)), P(Pass::AppToLocal));
    // The proxy to its own pod's IPv6 address: ISTIO_IN_REDIRECT; to ::1
    // and remote: RETURN.
    assert_eq!(d(conn6(PROXY, u, POD6, 80)), R(Inbound));
    assert_eq!(d(conn6(PROXY, u, V6::LOCALHOST, 80)), P(Pass::ProxyUid));
    assert_eq!(d(conn6(PROXY, u, REMOTE6, 80)), P(Pass::ProxyUid));
    // ::6 passthrough source.
    assert_eq!(
        d(conn6(PROXY, V6::PASSTHROUGH_SRC, POD6, 80)),
        P(Pass::InboundPassthroughSource)
    );
    // IPv6 ranges of the annotations.
    let ex = Lists {
        out_excl_cidrs6: std::vec![(REMOTE6, 64)],
        ..pod6().1
    };
    assert_eq!(
        decide_connect6(&cfg, &ex, &conn6(APP, u, REMOTE6, 80)),
        P(Pass::ExcludedCidr)
    );
    let mut only = cfg;
    only.flags &= !flags::INCLUDE_ALL_OUTBOUND_CIDRS;
    let inc = Lists {
        out_incl_cidrs6: std::vec![(REMOTE6, 120)],
        ..pod6().1
    };
    assert_eq!(
        decide_connect6(&only, &inc, &conn6(APP, u, REMOTE6, 80)),
        R(Outbound)
    );
    assert_eq!(
        decide_connect6(&only, &pod6().1, &conn6(APP, u, REMOTE6, 80)),
        P(Pass::NotIncluded)
    );
    // An IPv4-only pod: no IPv6 rules at all.
    assert_eq!(
        decide_connect6(&pod(), &default_lists(), &conn6(APP, u, REMOTE6, 80)),
        P(Pass::Ipv4OnlyPod)
    );
    // The IPv6 source the kernel would pick.
    assert_eq!(source_for6(&cfg, &l, REMOTE6), Some(POD6));
    assert_eq!(source_for6(&cfg, &l, POD6), Some(POD6));
    assert_eq!(source_for6(&cfg, &l, V6::LOCALHOST), None);
}

#[test]
fn ipv6_inbound_from_inside_the_pod_is_not_captured() {
    let (cfg, l) = pod6();
    let a = |src: V6| Arrival {
        tcp: true,
        src_addr: src,
        dst_addr: V6::UNSPECIFIED,
        dst_port: 9080,
        ifindex: 0,
    };
    assert_eq!(
        decide_inbound(&cfg, &l, &a(REMOTE6)),
        InboundVerdict::Capture
    );
    assert_eq!(
        decide_inbound(&cfg, &l, &a(POD6)),
        InboundVerdict::Pass(InboundPass::FromInsidePod)
    );
    assert_eq!(
        decide_inbound(&cfg, &l, &a(V6::LOCALHOST)),
        InboundVerdict::Pass(InboundPass::FromInsidePod)
    );
}

#[test]
fn include_exclude_ip_case() {
    // includeOutboundIPRanges 127.0.0.0/8, excludeOutboundIPRanges 10.0.0.0/8
    let mut cfg = pod();
    cfg.flags &= !flags::INCLUDE_ALL_OUTBOUND_CIDRS;
    cfg.flags |= flags::INCLUDE_OUTBOUND_HAS_LOOPBACK;
    let mut l = default_lists();
    l.out_incl_cidrs.push((0x7f00_0000, 8));
    l.out_excl_cidrs.push((0x0a00_0000, 8));
    // Loopback in the include list removes the "app to local" return: an app
    // reaching 127.0.0.5 is captured, 127.0.0.1 still is not.
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, 0x7f00_0005, 80)),
        R(Outbound)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, ip::LOCALHOST, 80)),
        P(Pass::Localhost)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, REMOTE, 80)),
        P(Pass::ExcludedCidr)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, 0xc0a8_0001, 80)),
        P(Pass::NotIncluded)
    );
    // The pod IP is in 10/8: excluded.
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, POD, 80)),
        P(Pass::ExcludedCidr)
    );
    // With the app-local return gone, gid-only sockets reach the gid redirect.
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, PROXY, 0, POD, 80)),
        R(Inbound)
    );
}

#[test]
fn exclude_and_include_ports() {
    let cfg = pod();
    let mut l = Lists {
        out_excl_ports: std::vec![5555, 6666],
        ..Default::default()
    };
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, REMOTE, 5555)),
        P(Pass::ExcludedOutboundPort)
    );
    // 15020 is only excluded by default; an explicit list replaces the default.
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, REMOTE, 15020)),
        R(Outbound)
    );
    // includeOutboundPorts beats the CIDR rules but not the exclusions.
    let mut cfg2 = cfg;
    cfg2.flags &= !flags::INCLUDE_ALL_OUTBOUND_CIDRS;
    l.out_incl_ports.push(7777);
    l.out_excl_cidrs.push((0x0a00_0000, 8));
    assert_eq!(
        decide_connect(&cfg2, &l, &conn(APP, APP, 0, 0x0808_0808, 7777)),
        R(Outbound)
    );
    assert_eq!(
        decide_connect(&cfg2, &l, &conn(APP, APP, 0, 0x0808_0808, 80)),
        P(Pass::NotIncluded)
    );
    assert_eq!(
        decide_connect(&cfg2, &l, &conn(APP, APP, 0, REMOTE, 7777)),
        P(Pass::ExcludedCidr)
    );
}

#[test]
fn custom_proxy_identity() {
    let mut cfg = pod();
    cfg.proxy_uid = 1_000_670_000;
    cfg.proxy_gid = 1_000_670_001;
    let l = default_lists();
    assert_eq!(
        decide_connect(&cfg, &l, &conn(PROXY, PROXY, 0, REMOTE, 80)),
        R(Outbound)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &conn(1_000_670_000, 5, 0, REMOTE, 80)),
        P(Pass::ProxyUid)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &conn(5, 1_000_670_001, 0, REMOTE, 80)),
        P(Pass::ProxyGid)
    );
}

#[test]
fn dns_capture() {
    let mut cfg = pod();
    cfg.flags |= flags::DNS_CAPTURE;
    let l = default_lists();
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, REMOTE, 53)),
        R(Dns)
    );
    // Local DNS servers are captured too (the app-local return skips 53)...
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, ip::LOCALHOST, 53)),
        R(Dns)
    );
    // ...but not the proxy's own queries, nor proxy to own pod on 53.
    assert_eq!(
        decide_connect(&cfg, &l, &conn(PROXY, PROXY, 0, REMOTE, 53)),
        P(Pass::ProxyUid)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &conn(PROXY, PROXY, 0, POD, 53)),
        P(Pass::ProxyUid)
    );
}

#[test]
fn inbound_ports() {
    let cfg = pod();
    let l = default_lists();
    assert!(capture_inbound(&cfg, &l, 9080));
    for p in [15008, 15020, 15021, 15090] {
        assert!(!capture_inbound(&cfg, &l, p), "{p}");
    }
    let mut cfg2 = cfg;
    cfg2.flags &= !flags::INCLUDE_ALL_INBOUND_PORTS;
    let l2 = Lists {
        in_incl_ports: std::vec![1111, 2222],
        ..Default::default()
    };
    assert!(capture_inbound(&cfg2, &l2, 1111));
    assert!(!capture_inbound(&cfg2, &l2, 9080));
}

#[test]
fn source_follows_kernel_choice() {
    let cfg = pod();
    let l = default_lists();
    assert_eq!(source_for(&cfg, &l, REMOTE), Some(POD));
    assert_eq!(source_for(&cfg, &l, POD), Some(POD));
    assert_eq!(source_for(&cfg, &l, 0x7f00_0005), None);
}

fn arrival(src: u32, port: u16) -> Arrival {
    Arrival {
        tcp: true,
        src_addr: src,
        dst_addr: POD,
        dst_port: port,
        ifindex: 0,
    }
}

const ETH0: u32 = 2;
const ETH1: u32 = 3;

/// A pod whose annotations name interfaces: `roles` by ifindex, routes
/// 10.244.0.0/16 by eth0 and 192.168.0.0/16 by eth1.
fn iface_pod(roles: &[(u32, u32)]) -> (PodConfig, Lists) {
    let mut cfg = pod();
    cfg.flags |= flags::INTERFACES;
    let mut l = default_lists();
    l.ifaces = roles.to_vec();
    l.routes4 = std::vec![(0x0af4_0000, 16, ETH0), (0xc0a8_0000, 16, ETH1)];
    (cfg, l)
}

#[test]
fn excluded_interface_is_left_alone_both_ways() {
    let (cfg, l) = iface_pod(&[(ETH0, iface_role::EXCLUDE)]);
    let on = |ifindex| Arrival {
        ifindex,
        ..arrival(REMOTE, 9080)
    };
    assert_eq!(
        decide_inbound(&cfg, &l, &on(ETH0)),
        InboundVerdict::Pass(InboundPass::ExcludedInterface)
    );
    assert_eq!(decide_inbound(&cfg, &l, &on(ETH1)), InboundVerdict::Capture);
    // Unknown arrival interface (a kernel before 5.17): captured.
    assert_eq!(decide_inbound(&cfg, &l, &on(0)), InboundVerdict::Capture);
    // Outbound: by the route's device, ahead of every other rule (the
    // proxy's own and DNS too); the pod's own addresses leave by lo.
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, REMOTE, 9080)),
        P(Pass::ExcludedInterface)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, 0xc0a8_0101, 9080)),
        R(Outbound)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &conn(PROXY, PROXY, 0, POD, 9080)),
        R(Inbound)
    );
    // Without the flag the lists are not consulted.
    let plain = pod();
    assert_eq!(
        decide_connect(&plain, &l, &conn(APP, APP, 0, REMOTE, 9080)),
        R(Outbound)
    );
}

#[test]
fn excluding_lo_leaves_the_pods_own_traffic_alone() {
    let (cfg, l) = iface_pod(&[(crate::LOOPBACK_IFINDEX, iface_role::EXCLUDE)]);
    assert_eq!(
        decide_connect(&cfg, &l, &conn(PROXY, PROXY, 0, POD, 9080)),
        P(Pass::ExcludedInterface)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, REMOTE, 9080)),
        R(Outbound)
    );
}

#[test]
fn rerouted_virtual_interface_goes_to_the_outbound_listener_when_included() {
    let on = |ifindex, port| Arrival {
        ifindex,
        ..arrival(REMOTE, port)
    };
    // includeOutboundIPRanges '*': everything arriving on it.
    let (cfg, l) = iface_pod(&[(ETH1, iface_role::REROUTE)]);
    for port in [9080, 15008, 15020] {
        assert_eq!(
            decide_inbound(&cfg, &l, &on(ETH1, port)),
            InboundVerdict::Outbound,
            "{port}"
        );
    }
    assert_eq!(
        decide_inbound(&cfg, &l, &on(ETH0, 9080)),
        InboundVerdict::Capture
    );
    // A range list without the destination: left alone.
    let (mut cfg, mut l) = iface_pod(&[(ETH1, iface_role::REROUTE | iface_role::EXCLUDE)]);
    cfg.flags &= !flags::INCLUDE_ALL_OUTBOUND_CIDRS;
    l.out_incl_cidrs = std::vec![(0x0a00_0000, 24)];
    assert_eq!(
        decide_inbound(&cfg, &l, &on(ETH1, 9080)),
        InboundVerdict::Pass(InboundPass::VirtualInterface)
    );
    // ... and with it, to the outbound listener (reroute comes first).
    l.out_incl_cidrs.push((POD, 32));
    assert_eq!(
        decide_inbound(&cfg, &l, &on(ETH1, 9080)),
        InboundVerdict::Outbound
    );
}

#[test]
fn tproxy_capture_comes_before_reroute_but_not_before_exclusion() {
    let on = |ifindex| Arrival {
        ifindex,
        ..arrival(REMOTE, 9080)
    };
    let (mut cfg, l) = iface_pod(&[(ETH0, iface_role::REROUTE), (ETH1, iface_role::EXCLUDE)]);
    cfg.flags |= flags::TPROXY;
    assert_eq!(decide_inbound(&cfg, &l, &on(ETH0)), InboundVerdict::Capture);
    assert_eq!(
        decide_inbound(&cfg, &l, &on(ETH1)),
        InboundVerdict::Pass(InboundPass::ExcludedInterface)
    );
    // An excluded port TPROXY leaves: the nat reroute rule takes it.
    assert_eq!(
        decide_inbound(
            &cfg,
            &l,
            &Arrival {
                ifindex: ETH0,
                ..arrival(REMOTE, 15020)
            }
        ),
        InboundVerdict::Outbound
    );
}

#[test]
fn inbound_rows_9_to_11() {
    use InboundPass as IP;
    let cfg = pod();
    let l = default_lists();
    let cap = |a: Arrival| decide_inbound(&cfg, &l, &a);
    // Row 10: any other TCP port from another pod or node.
    assert_eq!(cap(arrival(REMOTE, 9080)), InboundVerdict::Capture);
    assert_eq!(cap(arrival(REMOTE, 15001)), InboundVerdict::Capture);
    // Row 9: tunnel, Istio's own ports, the status port.
    assert_eq!(
        cap(arrival(REMOTE, 15008)),
        InboundVerdict::Pass(IP::Tunnel)
    );
    for p in [15020, 15021, 15090] {
        assert_eq!(
            cap(arrival(REMOTE, p)),
            InboundVerdict::Pass(IP::ExcludedPort),
            "{p}"
        );
    }
    // Row 11.
    let udp = Arrival {
        tcp: false,
        ..arrival(REMOTE, 9080)
    };
    assert_eq!(cap(udp), InboundVerdict::Pass(IP::NotTcp));
    // Connections that start inside the pod were decided at connect().
    for src in [POD, ip::LOCALHOST, ip::INBOUND_PASSTHROUGH_SRC] {
        assert_eq!(
            cap(arrival(src, 9080)),
            InboundVerdict::Pass(IP::FromInsidePod)
        );
    }
}

#[test]
fn tproxy_captures_the_tunnel_port() {
    let mut cfg = pod();
    cfg.flags |= flags::TPROXY;
    let l = default_lists();
    assert_eq!(
        decide_inbound(&cfg, &l, &arrival(REMOTE, 15008)),
        InboundVerdict::Capture
    );
    assert_eq!(
        decide_inbound(&cfg, &l, &arrival(REMOTE, 15020)),
        InboundVerdict::Pass(InboundPass::ExcludedPort)
    );
}

#[test]
fn include_inbound_ports_limits_capture() {
    let mut cfg = pod();
    cfg.flags &= !flags::INCLUDE_ALL_INBOUND_PORTS;
    let l = Lists {
        in_incl_ports: std::vec![1111],
        ..Default::default()
    };
    assert_eq!(
        decide_inbound(&cfg, &l, &arrival(REMOTE, 1111)),
        InboundVerdict::Capture
    );
    assert_eq!(
        decide_inbound(&cfg, &l, &arrival(REMOTE, 9080)),
        InboundVerdict::Pass(InboundPass::NotIncluded)
    );
}

#[test]
fn tproxy_mode_captures_the_proxys_local_traffic_nat_leaves_alone() {
    let mut cfg = pod();
    cfg.flags |= flags::TPROXY;
    let l = default_lists();
    let r = Verdict::Redirect(Capture::Inbound);
    // The tunnel port: nat returns it, mangle TPROXYs it.
    assert_eq!(
        decide_connect(&cfg, &l, &conn(PROXY, PROXY, 0, POD, 15008)),
        r
    );
    // Row 8 in TPROXY mode: the gid-only owner to a local address.
    assert_eq!(decide_connect(&cfg, &l, &conn(APP, PROXY, 0, POD, 9080)), r);
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, PROXY, 0, 0x7f00_0005, 9080)),
        r
    );
    // Not: 127.0.0.1, the inbound-excluded ports, a 127.0.0.6 source, the app.
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, PROXY, 0, ip::LOCALHOST, 9080)),
        Verdict::Pass(Pass::AppToLocal)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, PROXY, 0, POD, 15021)),
        Verdict::Pass(Pass::AppToLocal)
    );
    assert_eq!(
        decide_connect(
            &cfg,
            &l,
            &conn(PROXY, PROXY, ip::INBOUND_PASSTHROUGH_SRC, POD, 9080)
        ),
        Verdict::Pass(Pass::InboundPassthroughSource)
    );
    assert_eq!(
        decide_connect(&cfg, &l, &conn(APP, APP, 0, POD, 9080)),
        Verdict::Pass(Pass::AppToLocal)
    );
    // ISTIO_INBOUND returns `-s 127.0.0.6 -i lo` before TPROXY, also when
    // nat let the packet through for an excluded port (found by the
    // ip6tables property test for ::6).
    let mut l = default_lists();
    l.out_excl_ports.push(80);
    assert_eq!(
        decide_connect(
            &cfg,
            &l,
            &conn(PROXY, PROXY, ip::INBOUND_PASSTHROUGH_SRC, POD, 80)
        ),
        Verdict::Pass(Pass::ExcludedOutboundPort)
    );
}

/// The IPv6 twin of an IPv4 address in these tests: loopback and
/// passthrough to their IPv6 counterparts, everything else into fd00::/96.
fn twin(a: u32) -> V6 {
    match a {
        ip::LOCALHOST => V6::LOCALHOST,
        ip::INBOUND_PASSTHROUGH_SRC => V6::PASSTHROUGH_SRC,
        0 => V6::UNSPECIFIED,
        a => {
            let b = a.to_be_bytes();
            V6::from_octets([
                0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b[0], b[1], b[2], b[3],
            ])
        }
    }
}

mod families {
    use proptest::prelude::*;

    use super::*;

    fn addr() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(POD),
            Just(REMOTE),
            Just(ip::LOCALHOST),
            Just(ip::INBOUND_PASSTHROUGH_SRC),
            Just(0x0a00_0000u32),
            Just(0x0bad_cafeu32),
        ]
    }

    fn lists() -> impl Strategy<Value = (Lists, u32)> {
        (
            prop::collection::vec(
                prop_oneof![Just(53u16), Just(80), Just(15020), Just(9080)],
                0..3,
            ),
            prop::collection::vec(prop_oneof![Just(80u16), Just(9080)], 0..2),
            prop::collection::vec((addr(), 8u8..=32), 0..2),
            prop::collection::vec((addr(), 8u8..=32), 0..2),
            any::<u32>(),
        )
            .prop_map(|(ex_p, in_p, ex_c, in_c, flags)| {
                (
                    Lists {
                        out_excl_ports: ex_p,
                        out_incl_ports: in_p,
                        out_excl_cidrs: ex_c.clone(),
                        out_incl_cidrs: in_c.clone(),
                        ..Default::default()
                    },
                    flags,
                )
            })
    }

    fn config(flag_bits: u32) -> PodConfig {
        let mut cfg = pod();
        for f in [
            flags::INCLUDE_ALL_OUTBOUND_CIDRS,
            flags::DNS_CAPTURE,
            flags::TPROXY,
        ] {
            if flag_bits & f == 0 {
                cfg.flags &= !f;
            } else {
                cfg.flags |= f;
            }
        }
        cfg
    }

    proptest! {
        /// An AF_INET6 socket dialling `::ffff:a.b.c.d` gets exactly the
        /// IPv4 decision: its packets are IPv4 and meet iptables' IPv4 rules.
        #[test]
        fn mapped_is_the_ipv4_decision(
            (l, flag_bits) in lists(),
            uid in prop_oneof![Just(APP), Just(PROXY)],
            gid in prop_oneof![Just(APP), Just(PROXY)],
            bound in prop_oneof![Just(0u32), Just(ip::INBOUND_PASSTHROUGH_SRC), Just(POD)],
            dst in addr(),
            port in prop_oneof![Just(53u16), Just(80), Just(15008), Just(9080)],
            tcp in any::<bool>(),
        ) {
            let cfg = config(flag_bits);
            let v4 = Connect { uid, gid, bound_addr: bound, dst_addr: dst, dst_port: port, tcp };
            let bound6 = if bound == 0 { V6::UNSPECIFIED } else { V6::mapped(bound) };
            let v6 = Connect { uid, gid, bound_addr: bound6, dst_addr: V6::mapped(dst), dst_port: port, tcp };
            prop_assert_eq!(decide_connect6(&cfg, &l, &v6), decide_connect(&cfg, &l, &v4));
        }

        /// A dual-stack pod's native IPv6 connections play the IPv4 table:
        /// the same rules with ::1, ::6, the pod's IPv6 address and IPv6
        /// ranges in place of their IPv4 counterparts.
        #[test]
        fn ipv6_plays_the_ipv4_table(
            (l, flag_bits) in lists(),
            uid in prop_oneof![Just(APP), Just(PROXY)],
            gid in prop_oneof![Just(APP), Just(PROXY)],
            bound in prop_oneof![Just(0u32), Just(ip::INBOUND_PASSTHROUGH_SRC), Just(POD)],
            dst in addr(),
            port in prop_oneof![Just(53u16), Just(80), Just(15008), Just(9080)],
            tcp in any::<bool>(),
        ) {
            let mut cfg = config(flag_bits);
            cfg.flags |= flags::IPV6;
            // A prefix keeps its meaning across the twin when it lies in the
            // low 32 bits of fd00::/96; shorter ones would also cover
            // loopback twins differently, so lengths stay at 8..=32.
            let l6 = Lists {
                out_excl_cidrs6: l.out_excl_cidrs.iter().map(|&(a, n)| (twin(a), 96 + n)).collect(),
                out_incl_cidrs6: l.out_incl_cidrs.iter().map(|&(a, n)| (twin(a), 96 + n)).collect(),
                pod_ips6: std::vec![twin(POD)],
                out_excl_ports: l.out_excl_ports.clone(),
                out_incl_ports: l.out_incl_ports.clone(),
                ..Default::default()
            };
            // 127.0.0.0/8 beyond .1 and .6 has no IPv6 twin; those are not
            // generated. CIDRs naming the loopback twins are skipped.
            prop_assume!(!l.out_excl_cidrs.iter().chain(&l.out_incl_cidrs).any(|&(a, _)| ip::is_loopback(a)));
            let v4 = Connect { uid, gid, bound_addr: bound, dst_addr: dst, dst_port: port, tcp };
            let v6 = Connect { uid, gid, bound_addr: twin(bound), dst_addr: twin(dst), dst_port: port, tcp };
            // Unbound to 127.0.0.6 leaves from 127.0.0.1; unbound to ::6
            // leaves from ::6 (Addr::source): the twins part there.
            prop_assume!(!(bound == 0 && dst == ip::INBOUND_PASSTHROUGH_SRC));
            let want = decide_connect(&cfg, &l, &v4);
            // 127.0.0.6 is a loopback address, ::6 is not: a socket bound to
            // it may leave the pod, and Istio's ip6tables (`-o lo -s ::6`)
            // lets only its lo traffic through, so the rest is captured.
            prop_assume!(want != Verdict::Pass(Pass::LoopbackSourceOffPod) || bound != ip::INBOUND_PASSTHROUGH_SRC);
            prop_assert_eq!(decide_connect6(&cfg, &l6, &v6), want);
        }
    }
}

#[test]
fn only_the_proxy_and_root_register_listeners() {
    assert!(registers_listener(1337, 1337));
    assert!(registers_listener(0, 1337));
    assert!(!registers_listener(1000, 1337));
    assert!(registers_listener(1500, 1500));
    assert!(!registers_listener(1337, 1500));
}

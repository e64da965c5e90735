//! Table-driven tests of the decision, one row per line of the decision table
//! in ebpf/README.md plus the annotation cases. The golden-rule oracle lives
//! in the agent's tests (it needs the rules files and std).
extern crate std;

use std::vec::Vec;

use super::*;
use crate::PodConfig;

const POD: u32 = 0x0af4_0105; // 10.244.1.5
const REMOTE: u32 = 0x0af4_0207; // 10.244.2.7
const APP: u32 = 1000;
const PROXY: u32 = 1337;

#[derive(Default)]
struct Lists {
    out_excl_ports: Vec<u16>,
    out_incl_ports: Vec<u16>,
    out_excl_cidrs: Vec<(u32, u8)>,
    out_incl_cidrs: Vec<(u32, u8)>,
    in_excl_ports: Vec<u16>,
    in_incl_ports: Vec<u16>,
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
fn udp_is_never_redirected() {
    let cfg = pod();
    let mut c = conn(APP, APP, 0, REMOTE, 9080);
    c.tcp = false;
    assert_eq!(decide_connect(&cfg, &default_lists(), &c), P(Pass::NotTcp));
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
    assert_eq!(source_for(&cfg, REMOTE), Some(POD));
    assert_eq!(source_for(&cfg, POD), Some(POD));
    assert_eq!(source_for(&cfg, 0x7f00_0005), None);
}

fn arrival(src: u32, port: u16) -> Arrival {
    Arrival {
        tcp: true,
        src_addr: src,
        dst_port: port,
    }
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
}

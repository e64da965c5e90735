//! The iptables-restore text Istio's CNI plugin would write for a pod, from
//! meshlane's own parsed config (`meshlane iptables`). It shows that meshlane
//! reads a pod exactly as Istio does, and lets users compare and migrate.
//!
//! Rules are emitted in the order Istio's rule builder receives them (appends
//! and inserts alike); the text groups them per table (mangle, nat, raw) and
//! declares each custom chain in the order it first receives a rule.
//!
//! Istio writes the same rules for IPv6 (ip6tables) with `::1` for
//! 127.0.0.1, `::6` for 127.0.0.6, and only the IPv6 entries of the IP-range
//! annotations ([`render6`]); the IPv4 rules get only the IPv4 entries.
use std::fmt::Write as _;

use meshlane_common::ports;

use crate::podconfig::{Cidr, MeshConfig, Mode, Set};

/// Which of Istio's two rule sets to render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// iptables-restore input.
    Ipv4,
    /// ip6tables-restore input.
    Ipv6,
}

impl Family {
    /// Istio's `-d 127.0.0.1/32` and its IPv6 twin.
    fn localhost(self) -> &'static str {
        match self {
            Family::Ipv4 => "127.0.0.1/32",
            Family::Ipv6 => "::1/128",
        }
    }
    /// The proxy's inbound-passthrough source.
    fn passthrough_src(self) -> &'static str {
        match self {
            Family::Ipv4 => "127.0.0.6/32",
            Family::Ipv6 => "::6/128",
        }
    }
    fn has(self, c: &Cidr) -> bool {
        c.is_ipv6() == (self == Family::Ipv6)
    }
}

const TABLES: [&str; 3] = ["mangle", "nat", "raw"];
const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
/// Istio's TPROXY marks.
const INBOUND_MARK: &str = "1337";
const OUTBOUND_MARK: &str = "1338";

enum Op {
    Append,
    Insert(u32),
}

struct Rule {
    table: &'static str,
    chain: &'static str,
    op: Op,
    spec: String,
}

#[derive(Default)]
struct Builder {
    rules: Vec<Rule>,
}

impl Builder {
    fn append(&mut self, table: &'static str, chain: &'static str, spec: impl Into<String>) {
        self.rules.push(Rule {
            table,
            chain,
            op: Op::Append,
            spec: spec.into(),
        });
    }
    fn insert(
        &mut self,
        table: &'static str,
        chain: &'static str,
        pos: u32,
        spec: impl Into<String>,
    ) {
        self.rules.push(Rule {
            table,
            chain,
            op: Op::Insert(pos),
            spec: spec.into(),
        });
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for table in TABLES {
            let rules: Vec<&Rule> = self.rules.iter().filter(|r| r.table == table).collect();
            if rules.is_empty() {
                continue;
            }
            let _ = writeln!(out, "* {table}");
            let mut chains: Vec<&str> = Vec::new();
            for r in &rules {
                if !BUILTIN.contains(&r.chain) && !chains.contains(&r.chain) {
                    chains.push(r.chain);
                }
            }
            for c in chains {
                let _ = writeln!(out, "-N {c}");
            }
            for r in rules {
                match r.op {
                    Op::Append => {
                        let _ = writeln!(out, "-A {} {}", r.chain, r.spec);
                    }
                    Op::Insert(pos) => {
                        let _ = writeln!(out, "-I {} {pos} {}", r.chain, r.spec);
                    }
                }
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// Istio's iptables (IPv4) rules for a pod with this config. `None` for
/// `interceptionMode: NONE`, where Istio writes no rules at all.
pub fn render(cfg: &MeshConfig) -> Option<String> {
    render_family(cfg, Family::Ipv4)
}

/// Istio's ip6tables rules for a pod with this config that has an IPv6
/// address (Istio writes none for a pod without). `None` for NONE.
pub fn render6(cfg: &MeshConfig) -> Option<String> {
    render_family(cfg, Family::Ipv6)
}

/// The rules of one family.
pub fn render_family(cfg: &MeshConfig, fam: Family) -> Option<String> {
    if cfg.mode == Mode::None {
        return None;
    }
    let tproxy = cfg.mode == Mode::Tproxy;
    let (uid, gid) = (cfg.proxy_uid, cfg.proxy_gid);
    let (out_port, in_port, tunnel) = (
        cfg.outbound_capture_port,
        cfg.inbound_capture_port,
        ports::TUNNEL,
    );
    let (localhost, passthrough) = (fam.localhost(), fam.passthrough_src());
    let reroute = &cfg.reroute_virtual_interfaces;
    let mut b = Builder::default();

    // Excluded interfaces: nothing arriving on or leaving by them is
    // touched (appended first, so ahead of every later PREROUTING and
    // OUTPUT rule; in mangle too for TPROXY).
    for i in &cfg.exclude_interfaces {
        b.append("nat", "PREROUTING", format!("-i {i} -j RETURN"));
        b.append("nat", "OUTPUT", format!("-o {i} -j RETURN"));
    }
    if tproxy {
        for i in &cfg.exclude_interfaces {
            b.append("mangle", "PREROUTING", format!("-i {i} -j RETURN"));
            b.append("mangle", "OUTPUT", format!("-o {i} -j RETURN"));
        }
    }
    // Traffic arriving from the rerouted virtual interfaces is left to the
    // rules below (the include-range inserts), not the inbound capture.
    for i in reroute {
        b.insert("nat", "PREROUTING", 1, format!("-i {i} -j RETURN"));
    }

    if cfg.invalid_drop {
        b.append(
            "mangle",
            "PREROUTING",
            "-m conntrack --ctstate INVALID -j ISTIO_DROP",
        );
        b.append("mangle", "ISTIO_DROP", "-j DROP");
    }
    b.append(
        "nat",
        "ISTIO_INBOUND",
        format!("-p tcp --dport {tunnel} -j RETURN"),
    );
    b.append(
        "nat",
        "ISTIO_REDIRECT",
        format!("-p tcp -j REDIRECT --to-ports {out_port}"),
    );
    b.append(
        "nat",
        "ISTIO_IN_REDIRECT",
        format!("-p tcp -j REDIRECT --to-ports {in_port}"),
    );

    // Inbound.
    let inbound_some = !matches!(&cfg.include_inbound_ports, Set::Only(p) if p.is_empty());
    if inbound_some {
        let table = if tproxy {
            b.append(
                "mangle",
                "ISTIO_DIVERT",
                format!("-j MARK --set-mark {INBOUND_MARK}"),
            );
            b.append("mangle", "ISTIO_DIVERT", "-j ACCEPT");
            b.append(
                "mangle",
                "ISTIO_TPROXY",
                format!("! -d {localhost} -p tcp -j TPROXY --tproxy-mark {INBOUND_MARK}/0xffffffff --on-port {in_port}"),
            );
            "mangle"
        } else {
            "nat"
        };
        b.append(table, "PREROUTING", "-p tcp -j ISTIO_INBOUND");
        match &cfg.include_inbound_ports {
            Set::All => {
                for p in &cfg.exclude_inbound_ports {
                    b.append(
                        table,
                        "ISTIO_INBOUND",
                        format!("-p tcp --dport {p} -j RETURN"),
                    );
                }
                if tproxy {
                    b.append(
                        "mangle",
                        "ISTIO_INBOUND",
                        "-p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
                    );
                    b.append("mangle", "ISTIO_INBOUND", "-p tcp -j ISTIO_TPROXY");
                } else {
                    b.append("nat", "ISTIO_INBOUND", "-p tcp -j ISTIO_IN_REDIRECT");
                }
            }
            Set::Only(list) => {
                for p in list {
                    if tproxy {
                        b.append(
                            "mangle",
                            "ISTIO_INBOUND",
                            format!("-p tcp --dport {p} -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT"),
                        );
                        b.append(
                            "mangle",
                            "ISTIO_INBOUND",
                            format!("-p tcp --dport {p} -j ISTIO_TPROXY"),
                        );
                    } else {
                        b.append(
                            "nat",
                            "ISTIO_INBOUND",
                            format!("-p tcp --dport {p} -j ISTIO_IN_REDIRECT"),
                        );
                    }
                }
            }
        }
    }

    // Outbound.
    b.append("nat", "OUTPUT", "-j ISTIO_OUTPUT");
    for p in &cfg.exclude_outbound_ports {
        b.append(
            "nat",
            "ISTIO_OUTPUT",
            format!("-p tcp --dport {p} -j RETURN"),
        );
        b.append(
            "nat",
            "ISTIO_OUTPUT",
            format!("-p udp --dport {p} -j RETURN"),
        );
    }
    b.append(
        "nat",
        "ISTIO_OUTPUT",
        format!("-o lo -s {passthrough} -j RETURN"),
    );
    let dns = cfg.dns_capture;
    let loopback_included = cfg.include_outbound_has_loopback;
    for (kind, id) in [("uid", uid), ("gid", gid)] {
        let to_self = if dns && kind == "uid" {
            format!("-m multiport ! --dports 53,{tunnel}")
        } else {
            format!("! --dport {tunnel}")
        };
        b.append(
            "nat",
            "ISTIO_OUTPUT",
            format!("-o lo ! -d {localhost} -p tcp {to_self} -m owner --{kind}-owner {id} -j ISTIO_IN_REDIRECT"),
        );
        if !loopback_included {
            let spec = if dns {
                format!("-o lo -p tcp ! --dport 53 -m owner ! --{kind}-owner {id} -j RETURN")
            } else {
                format!("-o lo -m owner ! --{kind}-owner {id} -j RETURN")
            };
            b.append("nat", "ISTIO_OUTPUT", spec);
        }
        b.append(
            "nat",
            "ISTIO_OUTPUT",
            format!("-m owner --{kind}-owner {id} -j RETURN"),
        );
    }
    if dns {
        let dns_port = ports::DNS_PROXY;
        b.append("raw", "OUTPUT", "-j ISTIO_OUTPUT_DNS");
        b.append("nat", "ISTIO_OUTPUT", "-j ISTIO_OUTPUT_DNS");
        b.append(
            "nat",
            "ISTIO_OUTPUT_DNS",
            format!("-p tcp --dport 53 -j REDIRECT --to-ports {dns_port}"),
        );
        b.append(
            "nat",
            "ISTIO_OUTPUT_DNS",
            format!("-p udp --dport 53 -j REDIRECT --to-port {dns_port}"),
        );
        for (kind, id) in [("uid", uid), ("gid", gid)] {
            b.append(
                "raw",
                "ISTIO_OUTPUT_DNS",
                format!("-p udp --dport 53 -m owner --{kind}-owner {id} -j CT --zone 1"),
            );
            b.append(
                "raw",
                "ISTIO_OUTPUT_DNS",
                format!("-p udp --sport {dns_port} -m owner --{kind}-owner {id} -j CT --zone 2"),
            );
        }
        b.append("raw", "PREROUTING", "-j ISTIO_INBOUND");
        b.append(
            "raw",
            "ISTIO_OUTPUT_DNS",
            "-p udp --dport 53 -j CT --zone 2",
        );
        b.append("raw", "ISTIO_INBOUND", "-p udp --sport 53 -j CT --zone 1");
    }
    b.append("nat", "ISTIO_OUTPUT", format!("-d {localhost} -j RETURN"));
    for c in cfg.exclude_outbound_cidrs.iter().filter(|c| fam.has(c)) {
        b.append("nat", "ISTIO_OUTPUT", format!("-d {c} -j RETURN"));
    }
    for p in &cfg.include_outbound_ports {
        b.append(
            "nat",
            "ISTIO_OUTPUT",
            format!("-p tcp --dport {p} -j ISTIO_REDIRECT"),
        );
    }
    match &cfg.include_outbound_cidrs {
        Set::All => {
            b.append("nat", "ISTIO_OUTPUT", "-j ISTIO_REDIRECT");
            for i in reroute {
                b.insert("nat", "PREROUTING", 1, format!("-i {i} -j ISTIO_REDIRECT"));
            }
        }
        Set::Only(list) => {
            for c in list.iter().filter(|c| fam.has(c)) {
                for i in reroute {
                    b.insert(
                        "nat",
                        "PREROUTING",
                        1,
                        format!("-i {i} -d {c} -j ISTIO_REDIRECT"),
                    );
                }
                b.append("nat", "ISTIO_OUTPUT", format!("-d {c} -j ISTIO_REDIRECT"));
            }
        }
    }

    if tproxy {
        b.append(
            "mangle",
            "PREROUTING",
            format!("-p tcp -m mark --mark {INBOUND_MARK} -j CONNMARK --save-mark"),
        );
        b.append(
            "mangle",
            "OUTPUT",
            format!("-p tcp -o lo -m mark --mark {INBOUND_MARK} -j RETURN"),
        );
        for (kind, id) in [("uid", uid), ("gid", gid)] {
            b.append(
                "mangle",
                "OUTPUT",
                format!("! -d {localhost} -p tcp -o lo -m owner --{kind}-owner {id} -j MARK --set-mark {OUTBOUND_MARK}"),
            );
        }
        b.append(
            "mangle",
            "OUTPUT",
            format!("-p tcp -m connmark --mark {INBOUND_MARK} -j CONNMARK --restore-mark"),
        );
        b.insert(
            "mangle",
            "ISTIO_INBOUND",
            1,
            format!("-p tcp -m mark --mark {INBOUND_MARK} -j RETURN"),
        );
        b.insert(
            "mangle",
            "ISTIO_INBOUND",
            2,
            format!("-p tcp -s {passthrough} -i lo -j RETURN"),
        );
        b.insert(
            "mangle",
            "ISTIO_INBOUND",
            3,
            format!("-p tcp -i lo -m mark ! --mark {OUTBOUND_MARK} -j RETURN"),
        );
    }
    Some(b.render())
}

//! How a pod's annotations become map entries.
//!
//! `MeshConfig::from_pod` parses Istio's annotations once into typed values,
//! with defaults exactly as Istio's CNI plugin applies them; a bad value is
//! reported (naming the annotation and the value) and that one setting falls
//! back to its default, which always captures at least as much as the bad
//! value could have (never a silent bypass). `MeshConfig::entries` turns the
//! config into the keys and values the kernel programs read.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use meshlane_common::{
    cidr6_key_data, cidr_key_data, cidr_list, decide::PodLists, flags, iface_role, ip, port_list,
    ports, Cidr6KeyData, CidrKeyData, IfaceKey, PodConfig, PortKey, CIDR_KEY_FIXED_BITS,
    MAX_POD_IPS, V6,
};
use serde::Serialize;

use crate::{
    istio::{annotation, DNS_CAPTURE_ENV, INVALID_DROP_ENV},
    pods::Pod,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Mode {
    Redirect,
    Tproxy,
    /// `interceptionMode: NONE`: the pod is meshed but not captured.
    None,
}

/// A [`Cidr`]'s key in `CIDRS` or `CIDRS6`: (LPM prefix length, key data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LpmKey {
    V4(u32, CidrKeyData),
    V6(u32, Cidr6KeyData),
}

/// One entry of an IP-range annotation, of either family, as written (host
/// bits are kept for display and cleared in map keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    /// 0..=32 for IPv4, 0..=128 for IPv6.
    pub len: u8,
}

impl Cidr {
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// True when `a` is of this CIDR's family and lies in it.
    pub fn contains(&self, a: IpAddr) -> bool {
        match (self.addr, a) {
            (IpAddr::V4(net), IpAddr::V4(a)) => ip::in_prefix(a.to_bits(), net.to_bits(), self.len),
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = prefix_mask6(self.len);
                a.to_bits() & mask == net.to_bits() & mask
            }
            _ => false,
        }
    }

    /// Its key in the pod's `list` of `CIDRS` (IPv4) or `CIDRS6` (IPv6):
    /// the trie matches on the prefix bits only, so the host bits are
    /// cleared and two spellings of one network are one key.
    pub fn lpm_key(&self, list: u32, netns_cookie: u64) -> LpmKey {
        let len = CIDR_KEY_FIXED_BITS + u32::from(self.len);
        match self.network() {
            IpAddr::V4(net) => LpmKey::V4(len, cidr_key_data(list, netns_cookie, net.to_bits())),
            IpAddr::V6(net) => {
                LpmKey::V6(len, cidr6_key_data(list, netns_cookie, V6::from_std(net)))
            }
        }
    }

    /// The network address: host bits cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len.min(32)))
                };
                IpAddr::V4(Ipv4Addr::from_bits(a.to_bits() & mask))
            }
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from_bits(a.to_bits() & prefix_mask6(self.len))),
        }
    }

    /// True for a range inside the family's loopback (127.0.0.0/8, ::1).
    fn is_loopback(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => ip::is_loopback(a.to_bits()),
            IpAddr::V6(a) => a.is_loopback(),
        }
    }
}

fn prefix_mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len.min(128)))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A list that may be the wildcard `*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Set<T> {
    All,
    Only(Vec<T>),
}

/// A setting whose annotation could not be used; the setting took its default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigError {
    pub annotation: String,
    pub value: String,
    pub reason: String,
    /// What meshlane does instead ("using the default" unless said otherwise).
    pub instead: String,
}

/// A value as errors quote it: whole up to 120 characters, else its start
/// and its length (a list annotation may be hundreds of kilobytes).
fn shortened(v: &str) -> String {
    const MAX: usize = 120;
    if v.len() <= MAX {
        return v.to_string();
    }
    let mut end = MAX;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &v[..end], v.len())
}

/// What a rejected setting falls back to.
const USING_DEFAULT: &str = "using the default";

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "annotation {}={:?}: {}; {}",
            self.annotation, self.value, self.reason, self.instead
        )
    }
}

/// The ports Istio excludes from every pod's inbound capture, whatever its
/// annotation lists; the pod's status port (which it may move) is added too.
pub const ISTIO_INBOUND_EXCLUDED: [u16; 3] = [ports::STATUS, ports::HEALTH, ports::STATS];
/// Most inbound exclusions added to those a pod's annotation lists.
pub const ADDED_INBOUND_EXCLUSIONS: usize = ISTIO_INBOUND_EXCLUDED.len() + 1;

/// Node-wide defaults for every pod on the node (`meshlane run --proxy-uid
/// --outbound-capture-port --inbound-capture-port`). What a pod says for
/// itself wins where Istio lets it: the istio-proxy container's
/// `runAsUser`/`runAsGroup` (0 or unset falls back to these). The capture
/// ports have no per-pod setting in Istio, so they are node-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NodeDefaults {
    pub proxy_uid: u32,
    pub outbound_capture_port: u16,
    pub inbound_capture_port: u16,
    /// Most entries of one list annotation (`--max-list-entries`).
    pub max_list_entries: usize,
}

impl NodeDefaults {
    /// Istio's own: uid 1337, 15001 and 15006.
    pub const ISTIO: Self = Self {
        proxy_uid: ports::PROXY_UID,
        outbound_capture_port: ports::OUTBOUND_CAPTURE,
        inbound_capture_port: ports::INBOUND_CAPTURE,
        max_list_entries: Self::DEFAULT_MAX_LIST_ENTRIES,
    };

    /// A list annotation's entries at most, by default: far more than any
    /// real port or range list. The node-wide maps are sized for every pod
    /// at this limit on every list (`bpf::capacity`, `--max-pods`).
    pub const DEFAULT_MAX_LIST_ENTRIES: usize = 256;

    /// These defaults with another limit on list entries.
    pub fn with_max_list_entries(self, n: usize) -> Result<Self, String> {
        if n == 0 {
            return Err("--max-list-entries 0: every list annotation would be refused".into());
        }
        Ok(Self {
            max_list_entries: n,
            ..self
        })
    }

    /// Validated defaults; the error names the flag and the value.
    pub fn new(
        proxy_uid: u32,
        outbound_capture_port: u16,
        inbound_capture_port: u16,
    ) -> Result<Self, String> {
        if proxy_uid == 0 {
            return Err("--proxy-uid 0: uid 0 would make every root process the proxy, whose connections are never captured".into());
        }
        for (flag, port) in [
            ("--outbound-capture-port", outbound_capture_port),
            ("--inbound-capture-port", inbound_capture_port),
        ] {
            if port == 0 {
                return Err(format!("{flag} 0: the proxy cannot listen on port 0"));
            }
        }
        if outbound_capture_port == inbound_capture_port {
            return Err(format!(
                "--outbound-capture-port and --inbound-capture-port are both {outbound_capture_port}: the proxy tells outbound from inbound by the port"
            ));
        }
        Ok(Self {
            proxy_uid,
            outbound_capture_port,
            inbound_capture_port,
            max_list_entries: Self::DEFAULT_MAX_LIST_ENTRIES,
        })
    }
}

impl Default for NodeDefaults {
    fn default() -> Self {
        Self::ISTIO
    }
}

/// One pod's interception settings, typed and validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MeshConfig {
    pub mode: Mode,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// The proxy's listeners redirected connections go to (node-wide).
    pub outbound_capture_port: u16,
    pub inbound_capture_port: u16,
    /// Entries of both families: IPv4 ones feed the IPv4 decision (and
    /// iptables), IPv6 ones the IPv6 decision (and ip6tables). A list with
    /// entries of one family only includes nothing of the other, as Istio's
    /// per-family rules do; `*` includes everything of both.
    pub include_outbound_cidrs: Set<Cidr>,
    /// The include list names a loopback range of either family: Istio then
    /// omits its "app to a local address" RETURN rules in both families.
    pub include_outbound_has_loopback: bool,
    /// Entries of both families, as `include_outbound_cidrs`.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    pub include_outbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub include_inbound_ports: Set<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    pub status_port: u16,
    /// `istio.io/reroute-virtual-interfaces` (or the older
    /// `traffic.sidecar.istio.io/kubevirtInterfaces`): connections arriving
    /// on them for the pod go to the outbound listener when the outbound
    /// ranges include their destination, else to the app.
    pub reroute_virtual_interfaces: Vec<String>,
    /// `traffic.sidecar.istio.io/excludeInterfaces`: nothing arriving on or
    /// leaving by them is captured.
    pub exclude_interfaces: Vec<String>,
    pub dns_capture: bool,
    /// `INVALID_DROP=true`: Istio drops conntrack-INVALID packets. meshlane
    /// keeps no conntrack state, so there is nothing to drop; kept for the
    /// rules rendering.
    pub invalid_drop: bool,
    /// `meshlane.io/bypass-until-ready`.
    pub bypass_until_ready: bool,
    /// `meshlane.io/shortcut` (default true; the node-wide switch still rules).
    pub shortcut: bool,
    /// `meshlane.io/shortcut-app` (default false).
    pub shortcut_app: bool,
    pub errors: Vec<ConfigError>,
}

fn split_list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .map_err(|_| format!("port {s:?} is not a number from 0 to 65535"))
}

/// Refuses a list of more than `max` entries before anything is parsed.
fn within(v: &str, max: usize) -> Result<(), String> {
    let n = split_list(v).count();
    if n > max {
        return Err(format!(
            "{n} entries, more than a pod may list ({max}, the agent's --max-list-entries)"
        ));
    }
    Ok(())
}

fn parse_ports(v: &str, max: usize) -> Result<Vec<u16>, String> {
    within(v, max)?;
    let mut out = Vec::new();
    for p in split_list(v) {
        let p = parse_port(p)?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// Parses `a.b.c.d/n` or `a:b::/n` (a bare address is /32 or /128).
fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let (addr, max) = if a.contains(':') {
        let a6: Ipv6Addr = a
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (bad IPv6 address {a:?})"))?;
        (IpAddr::V6(a6), 128u8)
    } else {
        let a4: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (bad address {a:?})"))?;
        (IpAddr::V4(a4), 32u8)
    };
    let len =
        match len {
            None => max,
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
                format!("{s:?} is not a CIDR (prefix length {l:?} is not 0-{max})")
            })?,
        };
    Ok(Cidr { addr, len })
}

fn parse_cidrs(v: &str, max: usize) -> Result<Vec<Cidr>, String> {
    within(v, max)?;
    split_list(v).map(parse_cidr).collect()
}

/// Go's strconv.ParseBool, as Istio reads its booleans.
fn parse_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

impl MeshConfig {
    /// Istio's defaults for a pod with no annotations.
    pub fn istio_default() -> Self {
        Self {
            mode: Mode::Redirect,
            proxy_uid: ports::PROXY_UID,
            proxy_gid: ports::PROXY_UID,
            outbound_capture_port: ports::OUTBOUND_CAPTURE,
            inbound_capture_port: ports::INBOUND_CAPTURE,
            include_outbound_cidrs: Set::All,
            include_outbound_has_loopback: false,
            exclude_outbound_cidrs: Vec::new(),
            include_outbound_ports: Vec::new(),
            exclude_outbound_ports: vec![ports::STATUS],
            include_inbound_ports: Set::All,
            exclude_inbound_ports: ISTIO_INBOUND_EXCLUDED.to_vec(),
            status_port: ports::STATUS,
            reroute_virtual_interfaces: Vec::new(),
            exclude_interfaces: Vec::new(),
            dns_capture: false,
            invalid_drop: false,
            bypass_until_ready: false,
            shortcut: true,
            shortcut_app: false,
            errors: Vec::new(),
        }
    }

    /// The pod's settings with Istio's defaults where it says nothing.
    pub fn from_pod(pod: &Pod) -> Self {
        Self::from_pod_with(pod, &NodeDefaults::ISTIO)
    }

    /// The pod's settings with the node's defaults where it says nothing.
    pub fn from_pod_with(pod: &Pod, node: &NodeDefaults) -> Self {
        let mut cfg = Self::istio_default();
        cfg.proxy_uid = node.proxy_uid;
        cfg.outbound_capture_port = node.outbound_capture_port;
        cfg.inbound_capture_port = node.inbound_capture_port;
        let ann = &pod.annotations;
        let mut errors = Vec::new();
        let mut err = |annotation: &str, value: &str, reason: String| {
            errors.push(ConfigError {
                annotation: annotation.to_string(),
                value: shortened(value),
                reason,
                instead: USING_DEFAULT.into(),
            });
        };

        if let Some(uid) = pod.proxy_run_as_user.filter(|u| *u != 0) {
            match u32::try_from(uid) {
                Ok(u) => cfg.proxy_uid = u,
                Err(_) => err(
                    "istio-proxy securityContext.runAsUser",
                    &uid.to_string(),
                    "not a valid uid".into(),
                ),
            }
        }
        // Istio's CNI uses the proxy uid as gid unless runAsGroup says otherwise.
        cfg.proxy_gid = cfg.proxy_uid;
        if let Some(gid) = pod.proxy_run_as_group.filter(|g| *g != 0) {
            match u32::try_from(gid) {
                Ok(g) => cfg.proxy_gid = g,
                Err(_) => err(
                    "istio-proxy securityContext.runAsGroup",
                    &gid.to_string(),
                    "not a valid gid".into(),
                ),
            }
        }

        if let Some(v) = ann.get(annotation::INTERCEPTION_MODE) {
            match v.trim() {
                "REDIRECT" => cfg.mode = Mode::Redirect,
                "TPROXY" => cfg.mode = Mode::Tproxy,
                "NONE" => cfg.mode = Mode::None,
                _ => err(
                    annotation::INTERCEPTION_MODE,
                    v,
                    "expected REDIRECT, TPROXY or NONE".into(),
                ),
            }
        }

        // IPv6 entries for a pod that has addresses but no IPv6 one: Istio
        // writes no ip6tables rules for it, so they cannot apply; the IPv4
        // entries still do. (A pod without addresses yet keeps them: it is
        // read again once it has its addresses.)
        let no_ipv6 = !pod.ips.is_empty() && !pod.ips.iter().any(IpAddr::is_ipv6);
        let mut v6_ignored = Vec::new();
        let mut keep_family = |key: &'static str, v: &str, list: Vec<Cidr>| -> Vec<Cidr> {
            if !no_ipv6 || !list.iter().any(Cidr::is_ipv6) {
                return list;
            }
            let (v6, v4): (Vec<Cidr>, Vec<Cidr>) = list.into_iter().partition(Cidr::is_ipv6);
            let names: Vec<String> = v6.iter().map(ToString::to_string).collect();
            v6_ignored.push(ConfigError {
                annotation: key.to_string(),
                value: shortened(v),
                reason: format!(
                    "the pod has no IPv6 address, so the IPv6 entries {} cannot apply",
                    names.join(",")
                ),
                instead: "they are ignored; the IPv4 entries apply".into(),
            });
            v4
        };
        if let Some(v) = ann.get(annotation::INCLUDE_OUTBOUND_IP_RANGES) {
            if v.trim() == "*" {
                cfg.include_outbound_cidrs = Set::All;
            } else {
                match parse_cidrs(v, node.max_list_entries) {
                    Ok(list) => {
                        // Istio decides "loopback included" from both
                        // families' lists, whether or not IPv6 is on.
                        cfg.include_outbound_has_loopback = list.iter().any(Cidr::is_loopback);
                        let list = keep_family(annotation::INCLUDE_OUTBOUND_IP_RANGES, v, list);
                        cfg.include_outbound_cidrs = Set::Only(list);
                    }
                    Err(e) => err(annotation::INCLUDE_OUTBOUND_IP_RANGES, v, e),
                }
            }
        }
        if let Some(v) = ann.get(annotation::EXCLUDE_OUTBOUND_IP_RANGES) {
            match parse_cidrs(v, node.max_list_entries) {
                Ok(list) => {
                    cfg.exclude_outbound_cidrs =
                        keep_family(annotation::EXCLUDE_OUTBOUND_IP_RANGES, v, list);
                }
                Err(e) => err(annotation::EXCLUDE_OUTBOUND_IP_RANGES, v, e),
            }
        }
        let port_list =
            |key: &str, wildcard_ok: bool| -> Option<Result<Set<u16>, (String, String)>> {
                let v = ann.get(key)?;
                if v.trim() == "*" {
                    return Some(if wildcard_ok {
                        Ok(Set::All)
                    } else {
                        Err((v.clone(), "\"*\" is not allowed here".into()))
                    });
                }
                Some(
                    parse_ports(v, node.max_list_entries)
                        .map(Set::Only)
                        .map_err(|e| (v.clone(), e)),
                )
            };
        match port_list(annotation::EXCLUDE_OUTBOUND_PORTS, false) {
            Some(Ok(Set::Only(p))) => cfg.exclude_outbound_ports = p,
            Some(Err((v, e))) => err(annotation::EXCLUDE_OUTBOUND_PORTS, &v, e),
            _ => {}
        }
        match port_list(annotation::INCLUDE_OUTBOUND_PORTS, false) {
            Some(Ok(Set::Only(p))) => cfg.include_outbound_ports = p,
            Some(Err((v, e))) => err(annotation::INCLUDE_OUTBOUND_PORTS, &v, e),
            _ => {}
        }
        match port_list(annotation::INCLUDE_INBOUND_PORTS, true) {
            Some(Ok(set)) => cfg.include_inbound_ports = set,
            Some(Err((v, e))) => err(annotation::INCLUDE_INBOUND_PORTS, &v, e),
            None => {}
        }
        if let Some(v) = ann.get(annotation::STATUS_PORT) {
            match parse_port(v.trim()) {
                Ok(p) => cfg.status_port = p,
                Err(e) => err(annotation::STATUS_PORT, v, e),
            }
        }
        // Istio appends its own ports to whatever the annotation lists.
        let mut excl_in = match port_list(annotation::EXCLUDE_INBOUND_PORTS, false) {
            Some(Ok(Set::Only(p))) => p,
            Some(Err((v, e))) => {
                err(annotation::EXCLUDE_INBOUND_PORTS, &v, e);
                Vec::new()
            }
            _ => Vec::new(),
        };
        for p in ISTIO_INBOUND_EXCLUDED.into_iter().chain([cfg.status_port]) {
            if !excl_in.contains(&p) {
                excl_in.push(p);
            }
        }
        cfg.exclude_inbound_ports = excl_in;

        for (var, field) in [
            (DNS_CAPTURE_ENV, &mut cfg.dns_capture),
            (INVALID_DROP_ENV, &mut cfg.invalid_drop),
        ] {
            if let Some(v) = pod.proxy_env.get(var) {
                match parse_bool(v) {
                    Some(b) => *field = b,
                    None => err(
                        &format!("istio-proxy env {var}"),
                        v,
                        "expected true or false".into(),
                    ),
                }
            }
        }
        for (key, field) in [
            (annotation::BYPASS_UNTIL_READY, &mut cfg.bypass_until_ready),
            (annotation::SHORTCUT, &mut cfg.shortcut),
            (annotation::SHORTCUT_APP, &mut cfg.shortcut_app),
        ] {
            if let Some(v) = ann.get(key) {
                match parse_bool(v) {
                    Some(b) => *field = b,
                    None => err(key, v, "expected \"true\" or \"false\"".into()),
                }
            }
        }
        // Interface lists are held to the quota too: each named interface
        // the namespace has is an IFACES entry, and a pod that may add
        // interfaces (NET_ADMIN) could otherwise fill the node's map. Over
        // the quota the default (none) applies: every interface captured.
        if let Some(v) = ann.get(annotation::EXCLUDE_INTERFACES) {
            match within(v, node.max_list_entries) {
                Ok(()) => cfg.exclude_interfaces = split_list(v).map(str::to_string).collect(),
                Err(e) => err(annotation::EXCLUDE_INTERFACES, v, e),
            }
        }
        // Istio's newer name wins over its older one.
        let reroute = [
            annotation::REROUTE_VIRTUAL_INTERFACES,
            annotation::KUBEVIRT_INTERFACES,
        ]
        .into_iter()
        .find_map(|a| ann.get(a).map(|v| (a, v)));
        if let Some((a, v)) = reroute {
            match within(v, node.max_list_entries) {
                Ok(()) => {
                    cfg.reroute_virtual_interfaces = split_list(v).map(str::to_string).collect();
                }
                Err(e) => err(a, v, e),
            }
        }
        errors.extend(v6_ignored);
        cfg.errors = errors;
        cfg
    }

    /// The kernel's view of this pod in network namespace `netns_cookie`.
    pub fn pod_config(&self, ips: &[IpAddr]) -> PodConfig {
        let mut p = PodConfig::istio_default();
        p.proxy_uid = self.proxy_uid;
        p.proxy_gid = self.proxy_gid;
        p.outbound_capture_port = self.outbound_capture_port;
        p.inbound_capture_port = self.inbound_capture_port;
        p.flags = 0;
        if self.include_outbound_cidrs == Set::All {
            p.flags |= flags::INCLUDE_ALL_OUTBOUND_CIDRS;
        }
        if self.include_outbound_has_loopback {
            p.flags |= flags::INCLUDE_OUTBOUND_HAS_LOOPBACK;
        }
        if self.dns_capture {
            p.flags |= flags::DNS_CAPTURE;
        }
        if self.include_inbound_ports == Set::All {
            p.flags |= flags::INCLUDE_ALL_INBOUND_PORTS;
        }
        if self.mode == Mode::Tproxy {
            p.flags |= flags::TPROXY;
        }
        if self.bypass_until_ready {
            p.flags |= flags::BYPASS_UNTIL_READY;
        }
        if !self.shortcut {
            p.flags |= flags::NO_SHORTCUT;
        }
        if self.shortcut_app {
            p.flags |= flags::SHORTCUT_APP;
        }
        let v4 = ips.iter().filter_map(|a| match a {
            IpAddr::V4(a) => Some(a.to_bits()),
            IpAddr::V6(_) => None,
        });
        for (i, a) in v4.take(MAX_POD_IPS).enumerate() {
            p.ips[i] = a;
            p.ip_count = i as u32 + 1;
        }
        // IPv6 capture is for pods with an IPv6 address, as Istio writes
        // ip6tables rules for those only.
        if ips.iter().any(IpAddr::is_ipv6) {
            p.flags |= flags::IPV6;
        }
        if !self.reroute_virtual_interfaces.is_empty() || !self.exclude_interfaces.is_empty() {
            p.flags |= flags::INTERFACES;
        }
        p
    }

    /// [`iface_role`] bits of the interface named `name`.
    pub fn iface_roles(&self, name: &str) -> u32 {
        let mut r = 0;
        if self.reroute_virtual_interfaces.iter().any(|i| i == name) {
            r |= iface_role::REROUTE;
        }
        if self.exclude_interfaces.iter().any(|i| i == name) {
            r |= iface_role::EXCLUDE;
        }
        r
    }

    /// What the pod's namespace `net` adds to its map entries: the
    /// interfaces the annotations name, by index, and (when one is
    /// excluded) the routes that tell which one a connection leaves by.
    /// Names the namespace lacks are listed in `missing`: like Istio's
    /// `-i IF` rules, they match nothing until such an interface appears.
    ///
    /// The routes are held to the per-pod quota `max_routes` per family (a
    /// pod that may add routes chooses how many): a family with more has
    /// none written, so its outbound connections find no route to an
    /// excluded interface and stay captured (more capture, never less), and
    /// `routes_over_quota` says so.
    pub fn net_entries(&self, netns_cookie: u64, net: &NetView, max_routes: usize) -> NetEntries {
        let mut out = NetEntries::default();
        for name in self
            .reroute_virtual_interfaces
            .iter()
            .chain(&self.exclude_interfaces)
        {
            match net.ifaces.iter().find(|(n, _)| n == name) {
                Some((_, ifindex)) => {
                    let e = (
                        IfaceKey::new(netns_cookie, *ifindex),
                        self.iface_roles(name),
                    );
                    if !out.ifaces.contains(&e) {
                        out.ifaces.push(e);
                    }
                }
                None if !out.missing.contains(name) => out.missing.push(name.clone()),
                None => {}
            }
        }
        if out.ifaces.iter().any(|(_, r)| r & iface_role::EXCLUDE != 0) {
            for (c, dev) in &net.routes {
                match c.lpm_key(cidr_list::ROUTE, netns_cookie) {
                    LpmKey::V4(len, data) => out.routes.push((len, data, *dev)),
                    LpmKey::V6(len, data) => out.routes6.push((len, data, *dev)),
                }
            }
            for (family, n) in [("IPv4", out.routes.len()), ("IPv6", out.routes6.len())] {
                if n > max_routes {
                    out.routes_over_quota.push(format!(
                        "the pod's network namespace has {n} {family} routes, more than a pod \
                         may have written ({max_routes}, the agent's --max-list-entries): none \
                         are, so its {family} connections leaving by an excluded interface are \
                         captured"
                    ));
                }
            }
            if out.routes.len() > max_routes {
                out.routes.clear();
            }
            if out.routes6.len() > max_routes {
                out.routes6.clear();
            }
        }
        out
    }

    /// Everything the kernel needs for this pod, keyed by its netns cookie.
    pub fn entries(&self, netns_cookie: u64, ips: &[IpAddr]) -> MapEntries {
        let mut ports = Vec::new();
        let mut add = |list: u16, ps: &[u16]| {
            ports.extend(ps.iter().map(|&p| PortKey::new(netns_cookie, list, p)));
        };
        add(port_list::OUTBOUND_EXCLUDE, &self.exclude_outbound_ports);
        add(port_list::OUTBOUND_INCLUDE, &self.include_outbound_ports);
        add(port_list::INBOUND_EXCLUDE, &self.exclude_inbound_ports);
        if let Set::Only(ps) = &self.include_inbound_ports {
            add(port_list::INBOUND_INCLUDE, ps);
        }
        let mut cidrs = Vec::new();
        let mut cidrs6 = Vec::new();
        let mut add_cidrs = |list: u32, cs: &[Cidr]| {
            for c in cs {
                match c.lpm_key(list, netns_cookie) {
                    LpmKey::V4(len, data) => cidrs.push((len, data)),
                    LpmKey::V6(len, data) => cidrs6.push((len, data)),
                }
            }
        };
        add_cidrs(cidr_list::OUTBOUND_EXCLUDE, &self.exclude_outbound_cidrs);
        if let Set::Only(cs) = &self.include_outbound_cidrs {
            add_cidrs(cidr_list::OUTBOUND_INCLUDE, cs);
        }
        MapEntries {
            pod: self.pod_config(ips),
            ports,
            cidrs,
            cidrs6,
        }
    }
}

/// The host's answer to the per-pod lists (what the kernel reads from its
/// maps), for tests of the shared decision: a pod's config with its
/// addresses. Like the kernel's `POD_BY_IP`/`POD_BY_IP6`, every address of
/// the pod counts as its own.
#[derive(Clone, Copy, Debug)]
pub struct HostLists<'a> {
    pub cfg: &'a MeshConfig,
    pub ips: &'a [IpAddr],
    /// The pod's namespace, where interfaces matter.
    pub net: Option<&'a NetView>,
}

impl MeshConfig {
    /// The per-pod lists of this config for a pod with addresses `ips`.
    pub fn lists<'a>(&'a self, ips: &'a [IpAddr]) -> HostLists<'a> {
        HostLists {
            cfg: self,
            ips,
            net: None,
        }
    }
}

impl HostLists<'_> {
    fn excluded(&self, a: IpAddr) -> bool {
        self.cfg
            .exclude_outbound_cidrs
            .iter()
            .any(|c| c.contains(a))
    }
    fn included(&self, a: IpAddr) -> bool {
        match &self.cfg.include_outbound_cidrs {
            Set::All => true,
            Set::Only(cs) => cs.iter().any(|c| c.contains(a)),
        }
    }
}

impl PodLists for HostLists<'_> {
    fn outbound_port_excluded(&self, port: u16) -> bool {
        self.cfg.exclude_outbound_ports.contains(&port)
    }
    fn outbound_port_included(&self, port: u16) -> bool {
        self.cfg.include_outbound_ports.contains(&port)
    }
    fn outbound_cidr_excluded(&self, addr: u32) -> bool {
        self.excluded(IpAddr::V4(Ipv4Addr::from_bits(addr)))
    }
    fn outbound_cidr_included(&self, addr: u32) -> bool {
        self.included(IpAddr::V4(Ipv4Addr::from_bits(addr)))
    }
    fn outbound_cidr_excluded6(&self, addr: V6) -> bool {
        self.excluded(IpAddr::V6(addr.to_std()))
    }
    fn outbound_cidr_included6(&self, addr: V6) -> bool {
        self.included(IpAddr::V6(addr.to_std()))
    }
    fn inbound_port_excluded(&self, port: u16) -> bool {
        self.cfg.exclude_inbound_ports.contains(&port)
    }
    fn inbound_port_included(&self, port: u16) -> bool {
        match &self.cfg.include_inbound_ports {
            Set::All => true,
            Set::Only(ps) => ps.contains(&port),
        }
    }
    fn is_pod_ip4(&self, addr: u32) -> bool {
        self.ips.contains(&IpAddr::V4(Ipv4Addr::from_bits(addr)))
    }
    fn is_pod_ip6(&self, addr: V6) -> bool {
        self.ips.contains(&IpAddr::V6(addr.to_std()))
    }
    fn pod_src6(&self) -> Option<V6> {
        self.ips.iter().find_map(|a| match a {
            IpAddr::V6(a) => Some(V6::from_std(*a)),
            IpAddr::V4(_) => None,
        })
    }
    fn iface_roles(&self, ifindex: u32) -> u32 {
        self.net
            .and_then(|n| n.ifaces.iter().find(|(_, i)| *i == ifindex))
            .map_or(0, |(name, _)| self.cfg.iface_roles(name))
    }
    fn route_dev4(&self, addr: u32) -> u32 {
        self.net
            .map_or(0, |n| n.route_dev(IpAddr::V4(Ipv4Addr::from_bits(addr))))
    }
    fn route_dev6(&self, addr: V6) -> u32 {
        self.net
            .map_or(0, |n| n.route_dev(IpAddr::V6(addr.to_std())))
    }
}

/// A pod namespace's interfaces and routes, as the agent reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetView {
    /// Interface names and their indexes.
    pub ifaces: Vec<(String, u32)>,
    /// The main table's routes: destination and the ifindex of its device.
    pub routes: Vec<(Cidr, u32)>,
}

impl NetView {
    /// The device of the longest route to `a` (0: none), as the kernel's
    /// main table would pick it.
    pub fn route_dev(&self, a: IpAddr) -> u32 {
        self.routes
            .iter()
            .filter(|(c, _)| c.contains(a))
            .max_by_key(|(c, _)| c.len)
            .map_or(0, |(_, dev)| *dev)
    }
}

/// [`MeshConfig::net_entries`]: the pod's `IFACES` entries and its routes
/// in `CIDRS`/`CIDRS6` (list `ROUTE`, valued by ifindex).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetEntries {
    pub ifaces: Vec<(IfaceKey, u32)>,
    pub routes: Vec<(u32, CidrKeyData, u32)>,
    pub routes6: Vec<(u32, Cidr6KeyData, u32)>,
    /// Interface names the namespace does not have.
    pub missing: Vec<String>,
    /// Why a family's routes were not written (more than the quota).
    pub routes_over_quota: Vec<String>,
}

/// The map contents for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntries {
    pub pod: PodConfig,
    pub ports: Vec<PortKey>,
    /// (LPM prefix length, key data).
    pub cidrs: Vec<(u32, CidrKeyData)>,
    /// The IPv6 CIDR lists: (LPM prefix length, key data) of `CIDRS6`.
    pub cidrs6: Vec<(u32, Cidr6KeyData)>,
}

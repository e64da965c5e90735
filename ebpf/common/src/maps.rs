//! Every map of the object, once: name (the static's name in
//! `ebpf/programs/src/maps.rs`, its name in the object and its pin), kind,
//! key and value sizes (from the contract types, checked against the kernel
//! statics at compile time), capacity, and the key under which `meshlane
//! status` and `/metrics` report its occupancy. The agent opens, pins, adopts
//! and reports by walking [`ALL`]; `agent/tests/shape.rs` fails if the built
//! object disagrees.
use core::mem::size_of;

use crate::{
    Cidr6KeyData, CidrKeyData, ConnKey, FlowKey, FlowKey6, IfaceKey, ListenerKey, OrigDst,
    OrigDst6, PodConfig, PodCounters, PortKey, V6,
};

/// The kind of a map, as the kernel knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hash,
    Array,
    PerCpuArray,
    PerCpuHash,
    LpmTrie,
    SkStorage,
    SockHash,
}

impl Kind {
    /// `enum bpf_map_type` of the kernel.
    pub const fn map_type(self) -> u32 {
        match self {
            Kind::Hash => 1,
            Kind::Array => 2,
            Kind::PerCpuHash => 5,
            Kind::PerCpuArray => 6,
            Kind::LpmTrie => 11,
            Kind::SockHash => 18,
            Kind::SkStorage => 24,
        }
    }
}

/// One map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Map {
    pub name: &'static str,
    pub kind: Kind,
    pub key_size: u32,
    /// Per CPU for per-CPU maps, as the kernel counts it.
    pub value_size: u32,
    /// Most entries (0 for socket storage, which has one per socket).
    pub capacity: u32,
    /// Key of its entry count in `meshlane status` (`maps`) and the `map`
    /// label of `meshlane_map_entries`; `None`: not reported.
    pub occupancy: Option<&'static str>,
}

const fn sz<T>() -> u32 {
    size_of::<T>() as u32
}

/// Meshed pods by network-namespace cookie. Written by the agent.
pub const PODS: Map = Map {
    name: "PODS",
    kind: Kind::Hash,
    key_size: sz::<u64>(),
    value_size: sz::<PodConfig>(),
    capacity: 16_384,
    occupancy: Some("pods"),
};
/// Membership of a port in a pod's port lists. Written by the agent.
pub const PORTS: Map = Map {
    name: "PORTS",
    kind: Kind::Hash,
    key_size: sz::<PortKey>(),
    value_size: sz::<u32>(),
    capacity: 65_536,
    occupancy: Some("ports"),
};
/// A pod's CIDR lists, longest-prefix matched. Written by the agent.
pub const CIDRS: Map = Map {
    name: "CIDRS",
    kind: Kind::LpmTrie,
    // The trie key: a u32 prefix length before the data.
    key_size: sz::<u32>() + sz::<CidrKeyData>(),
    value_size: sz::<u32>(),
    capacity: 65_536,
    occupancy: Some("cidrs"),
};
/// Original destination of a redirected connection, on both of its sockets.
pub const ORIG_DST: Map = Map {
    name: "ORIG_DST",
    kind: Kind::SkStorage,
    key_size: sz::<i32>(),
    value_size: sz::<OrigDst>(),
    capacity: 0,
    occupancy: None,
};
/// Redirected connections between the client's connect() and the proxy's accept.
pub const IN_FLIGHT: Map = Map {
    name: "IN_FLIGHT",
    kind: Kind::Hash,
    key_size: sz::<FlowKey>(),
    value_size: sz::<OrigDst>(),
    capacity: 65_536,
    occupancy: Some("in_flight"),
};
/// Node-wide per-CPU counters (`crate::counters::NODE`).
pub const STATS: Map = Map {
    name: "STATS",
    kind: Kind::PerCpuArray,
    key_size: sz::<u32>(),
    value_size: sz::<u64>(),
    capacity: crate::counters::stat::COUNT,
    occupancy: None,
};
/// Per-pod per-CPU counters (`crate::counters::POD`), keyed by netns cookie.
pub const POD_STATS: Map = Map {
    name: "POD_STATS",
    kind: Kind::PerCpuHash,
    key_size: sz::<u64>(),
    value_size: sz::<PodCounters>(),
    capacity: 16_384,
    occupancy: None,
};
/// A pod's IPv4 addresses (host order) to its netns cookie, for sk_lookup.
pub const POD_BY_IP: Map = Map {
    name: "POD_BY_IP",
    kind: Kind::Hash,
    key_size: sz::<u32>(),
    value_size: sz::<u64>(),
    capacity: 65_536,
    occupancy: Some("pod_by_ip"),
};
/// The proxies' listeners on capture ports, registered at listen().
pub const LISTENERS: Map = Map {
    name: "LISTENERS",
    kind: Kind::SockHash,
    key_size: sz::<ListenerKey>(),
    value_size: sz::<u64>(),
    capacity: 65_536,
    occupancy: Some("listeners"),
};
/// Both ends of every connection between meshed sockets of this node.
pub const SOCKS: Map = Map {
    name: "SOCKS",
    kind: Kind::SockHash,
    key_size: sz::<ConnKey>(),
    value_size: sz::<u64>(),
    capacity: 262_144,
    occupancy: Some("shortcut_sockets"),
};
/// Kernel address of each socket in `SOCKS` (the shortcut's backpressure).
pub const SOCK_ADDRS: Map = Map {
    name: "SOCK_ADDRS",
    kind: Kind::Hash,
    key_size: sz::<ConnKey>(),
    value_size: sz::<u64>(),
    capacity: SOCKS.capacity,
    occupancy: Some("shortcut_addrs"),
};
/// The shortcut decision of a socket, latched at its first send.
pub const SHORTCUT_STATE: Map = Map {
    name: "SHORTCUT_STATE",
    kind: Kind::SkStorage,
    key_size: sz::<i32>(),
    value_size: sz::<u32>(),
    capacity: 0,
    occupancy: None,
};
/// Marks a proxy's socket that connects to a pod of this node.
pub const PROXY_LEG: Map = Map {
    name: "PROXY_LEG",
    kind: Kind::SkStorage,
    key_size: sz::<i32>(),
    value_size: sz::<u32>(),
    capacity: 0,
    occupancy: None,
};
/// The uid that bound a socket to a capture port, plus one (0: none), set
/// at bind(): sockops registers a listener under its owner, and capture
/// uses only the listeners of the pod's proxy uid.
pub const LISTEN_OWNER: Map = Map {
    name: "LISTEN_OWNER",
    kind: Kind::SkStorage,
    key_size: sz::<i32>(),
    value_size: sz::<u32>(),
    capacity: 0,
    occupancy: None,
};
/// Node-wide switches written by the agent (`crate::setting`).
pub const SETTINGS: Map = Map {
    name: "SETTINGS",
    kind: Kind::Array,
    key_size: sz::<u32>(),
    value_size: sz::<u32>(),
    capacity: crate::setting::COUNT,
    occupancy: None,
};

/// A pod's IPv6 addresses to its netns cookie (sk_lookup, locality).
pub const POD_BY_IP6: Map = Map {
    name: "POD_BY_IP6",
    kind: Kind::Hash,
    key_size: sz::<V6>(),
    value_size: sz::<u64>(),
    capacity: 65_536,
    occupancy: Some("pod_by_ip6"),
};
/// A pod's IPv6 source address by netns cookie (what REDIRECT would keep).
pub const POD_SRC6: Map = Map {
    name: "POD_SRC6",
    kind: Kind::Hash,
    key_size: sz::<u64>(),
    value_size: sz::<V6>(),
    capacity: 16_384,
    occupancy: None,
};
/// A pod's IPv6 CIDR lists, longest-prefix matched. Written by the agent.
pub const CIDRS6: Map = Map {
    name: "CIDRS6",
    kind: Kind::LpmTrie,
    key_size: sz::<u32>() + sz::<Cidr6KeyData>(),
    value_size: sz::<u32>(),
    capacity: 65_536,
    occupancy: Some("cidrs6"),
};
/// IPv6 original destination of a redirected connection, on its sockets.
pub const ORIG_DST6: Map = Map {
    name: "ORIG_DST6",
    kind: Kind::SkStorage,
    key_size: sz::<i32>(),
    value_size: sz::<OrigDst6>(),
    capacity: 0,
    occupancy: None,
};
/// [`IN_FLIGHT`] for native IPv6 connections.
pub const IN_FLIGHT6: Map = Map {
    name: "IN_FLIGHT6",
    kind: Kind::Hash,
    key_size: sz::<FlowKey6>(),
    value_size: sz::<OrigDst6>(),
    capacity: 65_536,
    occupancy: Some("in_flight6"),
};

/// Interfaces of a pod's namespace its annotations name, to their
/// [`crate::iface_role`] bits. Written by the agent (names resolved in the
/// pod's namespace).
pub const IFACES: Map = Map {
    name: "IFACES",
    kind: Kind::Hash,
    key_size: sz::<IfaceKey>(),
    value_size: sz::<u32>(),
    capacity: 16_384,
    occupancy: Some("ifaces"),
};

/// Every map of the kernel object.
pub const ALL: &[Map] = &[
    PODS,
    PORTS,
    CIDRS,
    ORIG_DST,
    IN_FLIGHT,
    STATS,
    POD_STATS,
    POD_BY_IP,
    LISTENERS,
    SOCKS,
    SHORTCUT_STATE,
    SETTINGS,
    PROXY_LEG,
    LISTEN_OWNER,
    SOCK_ADDRS,
    POD_BY_IP6,
    POD_SRC6,
    CIDRS6,
    ORIG_DST6,
    IN_FLIGHT6,
    IFACES,
];

/// The row of map `name`.
pub fn by_name(name: &str) -> Option<&'static Map> {
    ALL.iter().find(|m| m.name.as_bytes() == name.as_bytes())
}

crate::assert_unique_names!(ALL);

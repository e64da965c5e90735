//! The contract between meshlane's kernel programs and its agent.
//!
//! Every map key and value is defined here once, `#[repr(C)]` with no implicit
//! padding, so the BPF object and user space agree on layout by construction.
//! The question "where does this connect() go?" is answered by
//! [`decide::decide_connect`], a pure function that compiles for the BPF target
//! and for the host, so the same code is unit- and property-tested on the host
//! and run by the kernel.
#![no_std]

pub mod counters;
pub mod decide;
pub mod maps;
pub mod programs;

pub use counters::{pod_stat, stat, PodCounters};

/// Fails the build when two rows of a contract table share a name.
#[macro_export]
macro_rules! assert_unique_names {
    ($table:expr) => {
        const _: () = {
            let t = $table;
            let mut i = 0;
            while i < t.len() {
                let mut j = i + 1;
                while j < t.len() {
                    assert!(
                        !$crate::const_str_eq(t[i].name, t[j].name),
                        "two rows of a contract table share a name"
                    );
                    j += 1;
                }
                i += 1;
            }
        };
    };
}

/// `a == b`, usable in const context.
pub const fn const_str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Istio's well-known sidecar ports and identities (ebpf/README.md, decision table).
pub mod ports {
    /// Outbound capture: the proxy's listener for redirected app connections.
    pub const OUTBOUND_CAPTURE: u16 = 15001;
    /// Inbound capture: the proxy's listener for traffic to the pod.
    pub const INBOUND_CAPTURE: u16 = 15006;
    /// HBONE tunnel port: never captured.
    pub const TUNNEL: u16 = 15008;
    /// pilot-agent status port (default of `status.sidecar.istio.io/port`).
    pub const STATUS: u16 = 15020;
    /// Envoy health.
    pub const HEALTH: u16 = 15021;
    /// Envoy Prometheus stats.
    pub const STATS: u16 = 15090;
    /// DNS proxy of the istio-agent when DNS capture is on.
    pub const DNS_PROXY: u16 = 15053;
    /// DNS.
    pub const DNS: u16 = 53;
    /// Default proxy uid and gid.
    pub const PROXY_UID: u32 = 1337;
}

/// Host-order IPv4 helpers shared by both sides.
pub mod ip {
    /// 127.0.0.1 in host byte order.
    pub const LOCALHOST: u32 = 0x7f00_0001;
    /// 127.0.0.6, the source the proxy binds to reach its own app.
    pub const INBOUND_PASSTHROUGH_SRC: u32 = 0x7f00_0006;

    /// True for 127.0.0.0/8.
    #[inline(always)]
    pub const fn is_loopback(addr: u32) -> bool {
        addr >> 24 == 127
    }

    /// True when `addr` lies in `net/len` (host byte order, `len` 0..=32).
    #[inline(always)]
    pub const fn in_prefix(addr: u32, net: u32, len: u8) -> bool {
        if len == 0 {
            return true;
        }
        if len >= 32 {
            return addr == net;
        }
        let mask = u32::MAX << (32 - len as u32);
        addr & mask == net & mask
    }
}

/// An IPv6 address as the kernel's contexts hold it (`user_ip6`,
/// `local_ip6`, ...): four u32 words in memory order, each word's bytes in
/// network order. Copied to and from the kernel unchanged; compared word by
/// word without branches (the verifier follows every branch).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct V6(pub [u32; 4]);

impl V6 {
    pub const UNSPECIFIED: V6 = V6([0; 4]);
    /// ::1, Istio's `-d ::1/128`.
    pub const LOCALHOST: V6 = V6::from_octets([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    /// ::6, the proxy's inbound-passthrough source (Istio's IPv6 127.0.0.6).
    pub const PASSTHROUGH_SRC: V6 =
        V6::from_octets([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6]);
    const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    pub const fn from_octets(b: [u8; 16]) -> V6 {
        V6([
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
        ])
    }

    pub const fn octets(self) -> [u8; 16] {
        let [a, b, c, d] = [
            self.0[0].to_ne_bytes(),
            self.0[1].to_ne_bytes(),
            self.0[2].to_ne_bytes(),
            self.0[3].to_ne_bytes(),
        ];
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }

    /// Equality without a branch per word.
    #[inline(always)]
    pub const fn same(self, o: V6) -> bool {
        ((self.0[0] ^ o.0[0]) | (self.0[1] ^ o.0[1]) | (self.0[2] ^ o.0[2]) | (self.0[3] ^ o.0[3]))
            == 0
    }

    /// The IPv4 address (host order) of `::ffff:a.b.c.d`.
    #[inline(always)]
    pub const fn mapped_v4(self) -> Option<u32> {
        if (self.0[0] | self.0[1]) == 0 && self.0[2] == V6::MAPPED_PREFIX {
            Some(u32::from_be_bytes(self.0[3].to_ne_bytes()))
        } else {
            None
        }
    }

    /// `::ffff:a.b.c.d` for an IPv4 address in host order.
    #[inline(always)]
    pub const fn mapped(v4: u32) -> V6 {
        V6([
            0,
            0,
            V6::MAPPED_PREFIX,
            u32::from_ne_bytes(v4.to_be_bytes()),
        ])
    }

    /// True for `::` (an unbound socket's address).
    #[inline(always)]
    pub const fn is_unspecified(self) -> bool {
        (self.0[0] | self.0[1] | self.0[2] | self.0[3]) == 0
    }

    pub fn to_std(self) -> core::net::Ipv6Addr {
        core::net::Ipv6Addr::from(self.octets())
    }

    pub const fn from_std(a: core::net::Ipv6Addr) -> V6 {
        V6::from_octets(a.octets())
    }
}

/// How many IPv4 addresses of a pod [`PodConfig::ips`] holds: the first is
/// the source for traffic leaving the pod. Every address of a pod, of both
/// families and any number, is in `POD_BY_IP`/`POD_BY_IP6`.
pub const MAX_POD_IPS: usize = 4;

/// `PodConfig::flags` bits.
pub mod flags {
    /// `includeOutboundIPRanges` is `*`: every remaining destination goes to the proxy.
    pub const INCLUDE_ALL_OUTBOUND_CIDRS: u32 = 1 << 0;
    /// `includeOutboundIPRanges` names a loopback range: Istio then omits its
    /// "app to a local address is untouched" rules.
    pub const INCLUDE_OUTBOUND_HAS_LOOPBACK: u32 = 1 << 1;
    /// The proxy has `ISTIO_META_DNS_CAPTURE=true`: DNS goes to 15053.
    pub const DNS_CAPTURE: u32 = 1 << 2;
    /// `includeInboundPorts` is `*`.
    pub const INCLUDE_ALL_INBOUND_PORTS: u32 = 1 << 3;
    /// `sidecar.istio.io/interceptionMode: TPROXY`.
    pub const TPROXY: u32 = 1 << 4;
    /// `meshlane.io/bypass-until-ready: "true"`: while the proxy does not
    /// listen on a capture port, connections pass untouched instead of being
    /// refused as iptables would refuse them.
    pub const BYPASS_UNTIL_READY: u32 = 1 << 5;
    /// `meshlane.io/shortcut: "false"`: this pod's sockets never take the
    /// same-node socket shortcut.
    pub const NO_SHORTCUT: u32 = 1 << 6;
    /// `meshlane.io/shortcut-app: "true"`: the app's own sockets join the
    /// shortcut too (app <-> its sidecar; the sidecar's 127.0.0.6 leg).
    pub const SHORTCUT_APP: u32 = 1 << 7;
    /// The pod has IPv6 addresses: Istio writes ip6tables rules for it, so
    /// native IPv6 is captured (an IPv4-only pod gets only the IPv4 rules,
    /// which IPv4-mapped AF_INET6 sockets meet too).
    pub const IPV6: u32 = 1 << 8;
    /// The pod's annotations name interfaces of its namespace
    /// (`excludeInterfaces`, `reroute-virtual-interfaces`): look them up in
    /// `IFACES`, and for excluded ones the pod's routes in `CIDRS`.
    pub const INTERFACES: u32 = 1 << 9;
}

/// One meshed pod, as the kernel sees it. Keyed by the pod's network
/// namespace cookie in the `PODS` map. Addresses are host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// [`flags`] bits.
    pub flags: u32,
    pub outbound_capture_port: u16,
    pub inbound_capture_port: u16,
    pub tunnel_port: u16,
    pub dns_proxy_port: u16,
    /// How many of `ips` are valid.
    pub ip_count: u32,
    /// The pod's IPv4 addresses; `ips[0]` is the one the kernel would pick as
    /// source for traffic leaving the pod.
    pub ips: [u32; MAX_POD_IPS],
}

impl PodConfig {
    /// A default Istio pod (REDIRECT, uid/gid 1337, capture everything).
    pub const fn istio_default() -> Self {
        Self {
            proxy_uid: ports::PROXY_UID,
            proxy_gid: ports::PROXY_UID,
            flags: flags::INCLUDE_ALL_OUTBOUND_CIDRS | flags::INCLUDE_ALL_INBOUND_PORTS,
            outbound_capture_port: ports::OUTBOUND_CAPTURE,
            inbound_capture_port: ports::INBOUND_CAPTURE,
            tunnel_port: ports::TUNNEL,
            dns_proxy_port: ports::DNS_PROXY,
            ip_count: 0,
            ips: [0; MAX_POD_IPS],
        }
    }

    #[inline(always)]
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// True when `addr` (host order) is one of the pod's own addresses.
    #[inline(always)]
    pub fn is_pod_ip(&self, addr: u32) -> bool {
        let mut i = 0;
        while i < MAX_POD_IPS {
            if (i as u32) < self.ip_count && self.ips[i] == addr {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Which per-pod port list a [`PortKey`] belongs to.
pub mod port_list {
    pub const OUTBOUND_EXCLUDE: u16 = 1;
    pub const OUTBOUND_INCLUDE: u16 = 2;
    pub const INBOUND_EXCLUDE: u16 = 3;
    pub const INBOUND_INCLUDE: u16 = 4;
}

/// Key of the `PORTS` map: membership of `port` in one of a pod's port lists.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub netns_cookie: u64,
    pub port: u16,
    /// One of [`port_list`].
    pub list: u16,
    pub _pad: u32,
}

impl PortKey {
    pub const fn new(netns_cookie: u64, list: u16, port: u16) -> Self {
        Self {
            netns_cookie,
            port,
            list,
            _pad: 0,
        }
    }
}

/// Which per-pod CIDR list a CIDR key belongs to.
pub mod cidr_list {
    pub const OUTBOUND_EXCLUDE: u32 = 1;
    pub const OUTBOUND_INCLUDE: u32 = 2;
    /// The routes of the pod's main table, valued by the ifindex of their
    /// device: which interface a connection leaves by (written only for
    /// pods with excluded interfaces).
    pub const ROUTE: u32 = 3;
}

/// `lo`: every network namespace's first interface.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Data part of the `CIDRS` LPM-trie key: list, netns cookie, then the
/// address in network byte order so prefix bits line up with the trie's.
/// The prefix length of a stored CIDR `a.b.c.d/n` is `CIDR_KEY_FIXED_BITS + n`.
pub type CidrKeyData = [u8; 16];
/// Bits of [`CidrKeyData`] before the address: always matched exactly.
pub const CIDR_KEY_FIXED_BITS: u32 = 96;

/// Builds the LPM data for (list, netns, host-order address).
#[inline(always)]
pub const fn cidr_key_data(list: u32, netns_cookie: u64, addr: u32) -> CidrKeyData {
    let l = list.to_be_bytes();
    let c = netns_cookie.to_be_bytes();
    let a = addr.to_be_bytes();
    [
        l[0], l[1], l[2], l[3], c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], a[0], a[1], a[2],
        a[3],
    ]
}

/// Data part of the `CIDRS6` LPM-trie key: list, netns cookie, then the
/// IPv6 address in network byte order. The prefix length of a stored CIDR
/// `a::/n` is `CIDR_KEY_FIXED_BITS + n`.
pub type Cidr6KeyData = [u8; 28];

/// Builds the LPM data for (list, netns, IPv6 address).
#[inline(always)]
pub const fn cidr6_key_data(list: u32, netns_cookie: u64, addr: V6) -> Cidr6KeyData {
    let l = list.to_be_bytes();
    let c = netns_cookie.to_be_bytes();
    let a = addr.octets();
    let mut k = [0u8; 28];
    let mut i = 0;
    while i < 4 {
        k[i] = l[i];
        i += 1;
    }
    while i < 12 {
        k[i] = c[i - 4];
        i += 1;
    }
    while i < 28 {
        k[i] = a[i - 12];
        i += 1;
    }
    k
}

/// What a pod's annotations make of one of its namespace's interfaces
/// (the value of the `IFACES` map, bits).
pub mod iface_role {
    /// `istio.io/reroute-virtual-interfaces` (or its older name): what
    /// arrives on it goes to the outbound listener when the pod's outbound
    /// ranges include its destination, else is left alone (Istio's
    /// `-I PREROUTING 1 -i IF [-d CIDR] -j ISTIO_REDIRECT` and
    /// `-I PREROUTING 1 -i IF -j RETURN`).
    pub const REROUTE: u32 = 1 << 0;
    /// `traffic.sidecar.istio.io/excludeInterfaces`: what arrives on it, and
    /// what leaves by it, is left alone (`-A PREROUTING -i IF -j RETURN`,
    /// `-A OUTPUT -o IF -j RETURN`).
    pub const EXCLUDE: u32 = 1 << 1;
}

/// Key of the `IFACES` map: an interface (by index) of a pod's network
/// namespace that the pod's annotations name.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfaceKey {
    pub netns_cookie: u64,
    pub ifindex: u32,
    pub _pad: u32,
}

impl IfaceKey {
    #[inline(always)]
    pub const fn new(netns_cookie: u64, ifindex: u32) -> Self {
        Self {
            netns_cookie,
            ifindex,
            _pad: 0,
        }
    }
}

/// Role of a socket that carries an original destination in socket storage.
pub mod role {
    /// The app's connecting socket whose connect() was redirected.
    pub const REDIRECTED_CLIENT: u16 = 1;
    /// The proxy's accepted socket of a redirected connection, or of an
    /// inbound connection captured by sk_lookup (then the original
    /// destination is also the socket's own local address).
    pub const PROXY_ACCEPTED: u16 = 2;
}

/// The original destination of a redirected connection, kept in socket
/// storage of both ends. Network byte order, exactly as `sockaddr_in` wants.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    pub addr_be: u32,
    pub port_be: u16,
    /// One of [`role`].
    pub role: u16,
}

/// Key of the `IN_FLIGHT` map: a redirected connection between the client's
/// `connect()` completing and the proxy's side of it being created, as seen
/// from the client (local = client, remote = proxy listener). Addresses and
/// ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub netns_cookie: u64,
    pub client_addr_be: u32,
    pub server_addr_be: u32,
    pub client_port_be: u16,
    pub server_port_be: u16,
    pub _pad: u32,
}

/// The IPv6 original destination of a redirected connection (native IPv6;
/// an IPv4-mapped one is an IPv4 [`OrigDst`]), in socket storage.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst6 {
    pub addr: V6,
    pub port_be: u16,
    /// One of [`role`].
    pub role: u16,
}

/// Key of the `IN_FLIGHT6` map: [`FlowKey`] for native IPv6 connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub netns_cookie: u64,
    pub client_addr: V6,
    pub server_addr: V6,
    pub client_port_be: u16,
    pub server_port_be: u16,
    pub _pad: u32,
}

/// Indexes into the `SETTINGS` array, written by the agent.
pub mod setting {
    /// 1: new connections between meshed sockets on this node take the
    /// sockhash shortcut; 0: they do not (connections already shortcut keep
    /// it until they close, so no byte is reordered or lost).
    pub const SHORTCUT: u32 = 0;
    /// Most bytes a shortcut socket may leave queued on its peer, unread,
    /// before the sender moves to TCP (and TCP's own flow control) for good.
    /// Redirected messages are queued on the receiver without regard to its
    /// receive buffer, so without this a reader that stops would let a sender
    /// fill the node's memory.
    pub const SHORTCUT_MAX_QUEUED: u32 = 1;
    /// Byte offset of `sk_user_data` in the kernel's `struct sock`, from the
    /// running kernel's BTF; 0: unknown.
    pub const OFFSET_SK_USER_DATA: u32 = 2;
    /// Byte offset of `msg_tot_len` (bytes queued on the ingress list) in the
    /// kernel's `struct sk_psock`, from its BTF; 0: unknown. With either
    /// offset unknown the shortcut cannot see a peer's backlog and does not
    /// redirect at all.
    pub const OFFSET_PSOCK_QUEUED: u32 = 3;
    /// The node's capture ports (`--outbound-capture-port`,
    /// `--inbound-capture-port`), for namespaces not in `PODS` yet: a proxy
    /// often listens before the agent knows its pod. 0: Istio's.
    pub const OUTBOUND_CAPTURE_PORT: u32 = 4;
    pub const INBOUND_CAPTURE_PORT: u32 = 5;
    /// The node's proxy uid (`--proxy-uid`) plus one, for namespaces not in
    /// `PODS` yet: the only owner besides root whose listener on a capture
    /// port sockops registers there. 0: Istio's 1337.
    pub const PROXY_UID: u32 = 6;
    pub const COUNT: u32 = 7;
}

/// Key of the `LISTENERS` sockhash: a TCP listener in a network namespace.
/// sockops registers every listener of the cgroup at listen(), so a proxy
/// that listens before the agent knows its pod is found all the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    /// Host byte order.
    pub port: u32,
    /// Which lookups the listener can take: [`ListenerKey::IPV4`] (an
    /// AF_INET listener, or an AF_INET6 one that is not v6only) or
    /// [`ListenerKey::IPV6`] (an AF_INET6 listener).
    pub serves: u32,
    /// The uid that bound the listener (the `LISTEN_OWNER` record): capture
    /// asks for the pod's proxy uid (or root, for proxies that bind before
    /// dropping privileges), so an app's listener on a capture port is never
    /// used, and cannot replace or remove the proxy's.
    pub owner: u32,
    pub _pad: u32,
}

impl ListenerKey {
    pub const IPV4: u32 = 0;
    pub const IPV6: u32 = 6;

    #[inline(always)]
    pub const fn serving(netns_cookie: u64, port: u16, serves: u32, owner: u32) -> Self {
        Self {
            netns_cookie,
            port: port as u32,
            serves,
            owner,
            _pad: 0,
        }
    }
}

/// Key of the `SOCKS` sockhash (the same-node shortcut): one end of a TCP
/// connection, named by its own 4-tuple. The other end of the connection is
/// at [`ConnKey::peer`]. Pod addresses are unique on a node, so the tuple
/// alone names a connection between pods; a loopback address is only
/// meaningful inside one network namespace, so then the namespace is part of
/// the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Netns cookie when either address is loopback, else 0.
    pub scope: u64,
    pub local_addr_be: u32,
    pub remote_addr_be: u32,
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    pub _pad: u32,
}

impl ConnKey {
    /// Addresses in network order, ports in host order.
    #[inline(always)]
    pub const fn new(
        netns_cookie: u64,
        local_addr_be: u32,
        local_port: u16,
        remote_addr_be: u32,
        remote_port: u16,
    ) -> Self {
        let loopback = ip::is_loopback(u32::from_be(local_addr_be))
            || ip::is_loopback(u32::from_be(remote_addr_be));
        Self {
            scope: if loopback { netns_cookie } else { 0 },
            local_addr_be,
            remote_addr_be,
            local_port,
            remote_port,
            _pad: 0,
        }
    }

    /// The key under which the other end of this connection is stored.
    #[inline(always)]
    pub const fn peer(&self) -> Self {
        Self {
            scope: self.scope,
            local_addr_be: self.remote_addr_be,
            remote_addr_be: self.local_addr_be,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Per-socket shortcut decision, latched at a socket's first send so one
/// direction of a byte stream never mixes the TCP path and the redirect.
pub mod shortcut_state {
    pub const UNDECIDED: u32 = 0;
    pub const REDIRECT: u32 = 1;
    pub const TCP: u32 = 2;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)], Copy, and have no padding (checked
    // by the size assertions in the tests below).
    unsafe impl aya::Pod for super::PodConfig {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::V6 {}
    unsafe impl aya::Pod for super::OrigDst6 {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::IfaceKey {}
}

#[cfg(test)]
mod layout_tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn contract_types_have_no_padding() {
        assert_eq!(size_of::<PodConfig>(), 4 * 3 + 2 * 4 + 4 + 4 * MAX_POD_IPS);
        assert_eq!(size_of::<PortKey>(), 16);
        assert_eq!(size_of::<IfaceKey>(), 16);
        assert_eq!(size_of::<OrigDst>(), 8);
        assert_eq!(size_of::<FlowKey>(), 24);
        assert_eq!(size_of::<ListenerKey>(), 24);
        assert_eq!(size_of::<ConnKey>(), 24);
        assert_eq!(size_of::<V6>(), 16);
        assert_eq!(size_of::<OrigDst6>(), 20);
        assert_eq!(size_of::<FlowKey6>(), 48);
        assert_eq!(size_of::<Cidr6KeyData>(), 28);
    }

    #[test]
    fn conn_key_peer_is_the_other_end() {
        // Pod to pod: no scope, and the peer of the peer is the key itself.
        let a = ConnKey::new(7, 0x0a00_0001u32.to_be(), 40000, 0x0a00_0002u32.to_be(), 80);
        assert_eq!(a.scope, 0);
        let b = ConnKey::new(9, 0x0a00_0002u32.to_be(), 80, 0x0a00_0001u32.to_be(), 40000);
        assert_eq!(a.peer(), b);
        assert_eq!(a.peer().peer(), a);
        // Inside a pod over loopback: scoped by the namespace.
        let c = ConnKey::new(
            7,
            0x0a00_0001u32.to_be(),
            40000,
            ip::LOCALHOST.to_be(),
            15001,
        );
        assert_eq!(c.scope, 7);
        let d = ConnKey::new(
            7,
            ip::LOCALHOST.to_be(),
            15001,
            0x0a00_0001u32.to_be(),
            40000,
        );
        assert_eq!(c.peer(), d);
        let other_pod = ConnKey::new(
            8,
            ip::LOCALHOST.to_be(),
            15001,
            0x0a00_0001u32.to_be(),
            40000,
        );
        assert_ne!(c.peer(), other_pod);
    }

    #[test]
    fn prefix_matching() {
        assert!(ip::in_prefix(0x0a01_0203, 0x0a00_0000, 8));
        assert!(!ip::in_prefix(0x0b01_0203, 0x0a00_0000, 8));
        assert!(ip::in_prefix(0xdead_beef, 0, 0));
        assert!(ip::in_prefix(0x0a00_0001, 0x0a00_0001, 32));
        assert!(!ip::in_prefix(0x0a00_0002, 0x0a00_0001, 32));
    }

    #[test]
    fn cidr_key_puts_address_last_in_network_order() {
        let k = cidr_key_data(
            cidr_list::OUTBOUND_EXCLUDE,
            0x0102_0304_0506_0708,
            0x0a00_0001,
        );
        assert_eq!(&k[12..], &[10, 0, 0, 1]);
        assert_eq!(&k[..4], &[0, 0, 0, 1]);
    }

    #[test]
    fn ipv6_words_are_network_order_bytes() {
        let a = V6::from_octets([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(a.octets()[0], 0xfd);
        assert_eq!(a.octets()[15], 5);
        assert!(V6::LOCALHOST.same(V6::LOCALHOST));
        assert!(!V6::LOCALHOST.same(V6::PASSTHROUGH_SRC));
        let m = V6::mapped(0x0a00_0001);
        assert_eq!(
            m.octets(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]
        );
        assert_eq!(m.mapped_v4(), Some(0x0a00_0001));
        assert_eq!(a.mapped_v4(), None);
        assert!(V6::UNSPECIFIED.is_unspecified());
        let k = cidr6_key_data(cidr_list::OUTBOUND_INCLUDE, 7, a);
        assert_eq!(&k[12..], &a.octets());
        assert_eq!(&k[..4], &[0, 0, 0, 2]);
    }
}

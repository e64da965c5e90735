//! The contract between meshlane's kernel programs and its agent.
//!
//! Every map key and value is defined here once, `#[repr(C)]` with no implicit
//! padding, so the BPF object and user space agree on layout by construction.
//! The question "where does this connect() go?" is answered by
//! [`decide::decide_connect`], a pure function that compiles for the BPF target
//! and for the host, so the same code is unit- and property-tested on the host
//! and run by the kernel.
#![no_std]

pub mod decide;

/// Istio's well-known sidecar ports and identities (INTERCEPTION.md).
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

/// How many IPv4 addresses of a pod the kernel knows (status.podIPs; a pod
/// has one IPv4 address in every CNI we know of, dual-stack adds one IPv6).
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

    /// What iptables' `-o lo` amounts to in a pod: the destination is routed
    /// through the loopback device (the pod's own address or 127.0.0.0/8).
    #[inline(always)]
    pub fn is_local(&self, addr: u32) -> bool {
        ip::is_loopback(addr) || self.is_pod_ip(addr)
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
}

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

/// Role of a socket that carries an original destination in socket storage.
pub mod role {
    /// The app's connecting socket whose connect() was redirected.
    pub const REDIRECTED_CLIENT: u16 = 1;
    /// The proxy's accepted socket of such a connection.
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

/// Indexes into the per-CPU `STATS` array.
pub mod stat {
    /// connect() calls inspected in meshed pods.
    pub const CONNECT_MESHED: u32 = 0;
    /// Redirected to the outbound capture port.
    pub const REDIRECT_OUTBOUND: u32 = 1;
    /// Redirected to the inbound capture port (proxy to its own pod, row 4).
    pub const REDIRECT_INBOUND: u32 = 2;
    /// Redirected to the DNS proxy.
    pub const REDIRECT_DNS: u32 = 3;
    /// SO_ORIGINAL_DST answered.
    pub const ORIG_DST_ANSWERED: u32 = 4;
    /// SO_ORIGINAL_DST asked on a socket we know nothing of.
    pub const ORIG_DST_MISS: u32 = 5;
    /// Could not record an original destination (map full, no storage).
    pub const RECORD_FAILED: u32 = 6;
    /// bpf_bind() to the pod address failed (source falls back to 127.0.0.1).
    pub const BIND_FAILED: u32 = 7;
    pub const COUNT: u32 = 16;
}

/// Names of the pinned objects under the agent's bpffs directory.
pub mod names {
    pub const PODS: &str = "PODS";
    pub const PORTS: &str = "PORTS";
    pub const CIDRS: &str = "CIDRS";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const IN_FLIGHT: &str = "IN_FLIGHT";
    pub const STATS: &str = "STATS";
}

/// Map capacities, shared so the agent can report occupancy.
pub mod capacity {
    pub const PODS: u32 = 16_384;
    pub const PORTS: u32 = 65_536;
    pub const CIDRS: u32 = 65_536;
    pub const IN_FLIGHT: u32 = 65_536;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)], Copy, and have no padding (checked
    // by the size assertions in the tests below).
    unsafe impl aya::Pod for super::PodConfig {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::FlowKey {}
}

#[cfg(test)]
mod layout_tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn contract_types_have_no_padding() {
        assert_eq!(size_of::<PodConfig>(), 4 * 3 + 2 * 4 + 4 + 4 * MAX_POD_IPS);
        assert_eq!(size_of::<PortKey>(), 16);
        assert_eq!(size_of::<OrigDst>(), 8);
        assert_eq!(size_of::<FlowKey>(), 24);
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
}

//! Istio's names meshlane reads: pod annotations (and meshlane's own beside
//! them), the proxy's environment variables, the proxy container's name.
//! The numbers (ports, proxy uid) live in `meshlane_common::ports`, shared
//! with the kernel programs.

pub mod annotation {
    pub const STATUS: &str = "sidecar.istio.io/status";
    pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    pub const STATUS_PORT: &str = "status.sidecar.istio.io/port";
    pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
    pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
    pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
    /// meshlane's own: `"true"` lets connections pass untouched while the
    /// proxy does not listen yet, instead of being refused as iptables does.
    pub const BYPASS_UNTIL_READY: &str = "meshlane.io/bypass-until-ready";
    /// meshlane's own: `"false"` keeps this pod's sockets off the same-node
    /// socket shortcut.
    pub const SHORTCUT: &str = "meshlane.io/shortcut";
    /// meshlane's own: `"true"` lets the app's own sockets join the shortcut
    /// too (app <-> its sidecar, and the sidecar's 127.0.0.6 leg to the app).
    /// Only for apps that read with non-blocking sockets: the kernel's
    /// sockmap read path can wake a *blocking* read with EAGAIN.
    pub const SHORTCUT_APP: &str = "meshlane.io/shortcut-app";
}

/// Proxy environment variable that turns DNS capture on.
pub const DNS_CAPTURE_ENV: &str = "ISTIO_META_DNS_CAPTURE";
/// Proxy environment variable that makes Istio drop conntrack-INVALID packets.
pub const INVALID_DROP_ENV: &str = "INVALID_DROP";

/// The istio-proxy container's name in injected pods.
pub const PROXY_CONTAINER: &str = "istio-proxy";

//! Every counter of the kernel programs, once: its index (the constants in
//! [`stat`] and [`pod_stat`], which the programs count with), the name
//! `meshlane status` shows, and its Prometheus family with help text.
//! `status` and `/metrics` render by walking [`NODE`] and [`POD`]; the const
//! checks below fail the build when a row is missing or out of order.

/// Indexes into the per-CPU `STATS` array.
pub mod stat {
    pub const CONNECT_MESHED: u32 = 0;
    pub const REDIRECT_OUTBOUND: u32 = 1;
    pub const REDIRECT_INBOUND: u32 = 2;
    pub const REDIRECT_DNS: u32 = 3;
    pub const ORIG_DST_ANSWERED: u32 = 4;
    pub const ORIG_DST_MISS: u32 = 5;
    pub const RECORD_FAILED: u32 = 6;
    pub const BIND_FAILED: u32 = 7;
    pub const INBOUND_CAPTURED: u32 = 8;
    pub const NOT_READY_REFUSED: u32 = 9;
    pub const NOT_READY_BYPASSED: u32 = 10;
    pub const SHORTCUT_SOCKETS: u32 = 11;
    pub const SHORTCUT_REDIRECTED: u32 = 12;
    pub const SHORTCUT_NO_PEER: u32 = 13;
    pub const LISTENERS_REGISTERED: u32 = 14;
    pub const UPDATE_FAILED: u32 = 15;
    pub const SHORTCUT_FELL_BACK: u32 = 16;
    pub const LISTENERS_UNOWNED: u32 = 17;
    pub const LISTENERS_NOT_PROXY: u32 = 18;
    pub const COUNT: u32 = 19;
}

/// Indexes into a pod's per-CPU counters in `POD_STATS` (keyed by netns cookie).
pub mod pod_stat {
    pub const REDIRECT_OUTBOUND: usize = 0;
    pub const REDIRECT_INBOUND: usize = 1;
    pub const REDIRECT_DNS: usize = 2;
    pub const INBOUND_CAPTURED: usize = 3;
    pub const NOT_READY_REFUSED: usize = 4;
    pub const NOT_READY_BYPASSED: usize = 5;
    pub const ORIG_DST_ANSWERED: usize = 6;
    pub const SHORTCUT_SOCKETS: usize = 7;
    // Connections each rule left alone (decision table rows; as
    // `iptables -v` counts per rule): outbound, then inbound.
    pub const PASS_NOT_TCP: usize = 8;
    pub const PASS_LOOPBACK_SOURCE_OFF_POD: usize = 9;
    pub const PASS_EXCLUDED_OUTBOUND_PORT: usize = 10;
    pub const PASS_INBOUND_PASSTHROUGH_SOURCE: usize = 11;
    pub const PASS_PROXY_UID: usize = 12;
    pub const PASS_PROXY_GID: usize = 13;
    pub const PASS_APP_TO_LOCAL: usize = 14;
    pub const PASS_LOCALHOST: usize = 15;
    pub const PASS_EXCLUDED_CIDR: usize = 16;
    pub const PASS_NOT_INCLUDED: usize = 17;
    pub const PASS_IPV4_ONLY_POD: usize = 18;
    pub const PASS_EXCLUDED_INTERFACE: usize = 19;
    pub const IN_PASS_FROM_INSIDE_POD: usize = 20;
    pub const IN_PASS_TUNNEL: usize = 21;
    pub const IN_PASS_EXCLUDED_PORT: usize = 22;
    pub const IN_PASS_NOT_INCLUDED: usize = 23;
    pub const IN_PASS_EXCLUDED_INTERFACE: usize = 24;
    pub const IN_PASS_VIRTUAL_INTERFACE: usize = 25;
    pub const COUNT: usize = 26;
}

/// The per-CPU value of `POD_STATS`.
pub type PodCounters = [u64; pod_stat::COUNT];

/// One counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    /// Index in `STATS` ([`stat`]) or in a pod's `POD_STATS` value ([`pod_stat`]).
    pub index: usize,
    /// Key in `meshlane status` (`counters`, or a pod's `counters`).
    pub name: &'static str,
    /// Prometheus family (`meshlane_..._total`, a counter).
    pub metric: &'static str,
    /// A label that tells this counter from others of the same family.
    pub label: Option<(&'static str, &'static str)>,
    /// Help text of the family (the first row of a family gives it).
    pub help: &'static str,
}

const REDIRECTS_HELP: &str = "Connections handed to the proxy, by direction: outbound (app to \
     15001), inbound (from outside the pod to 15006), own_pod (the proxy to its own pod, to \
     15006), dns (to 15053).";
const POD_REDIRECTS_HELP: &str =
    "Connections handed to a pod's proxy, by pod and direction (as meshlane_redirects_total).";

const fn row(
    index: usize,
    name: &'static str,
    metric: &'static str,
    label: Option<(&'static str, &'static str)>,
    help: &'static str,
) -> Counter {
    Counter {
        index,
        name,
        metric,
        label,
        help,
    }
}

/// The node-wide counters, in [`stat`] order.
pub const NODE: &[Counter] = {
    use stat::*;
    const fn dir(d: &'static str) -> Option<(&'static str, &'static str)> {
        Some(("direction", d))
    }
    &[
        row(CONNECT_MESHED as usize, "connect_meshed", "meshlane_connects_inspected_total", None,
            "TCP connect() calls in meshed pods that the connect4 program decided on."),
        row(REDIRECT_OUTBOUND as usize, "redirect_outbound", "meshlane_redirects_total",
            dir("outbound"), REDIRECTS_HELP),
        row(REDIRECT_INBOUND as usize, "redirect_inbound", "meshlane_redirects_total",
            dir("own_pod"), REDIRECTS_HELP),
        row(REDIRECT_DNS as usize, "redirect_dns", "meshlane_redirects_total", dir("dns"),
            REDIRECTS_HELP),
        row(ORIG_DST_ANSWERED as usize, "orig_dst_answered", "meshlane_orig_dst_answered_total",
            None, "getsockopt(SO_ORIGINAL_DST) answered with a recorded original destination."),
        row(ORIG_DST_MISS as usize, "orig_dst_miss", "meshlane_orig_dst_misses_total", None,
            "getsockopt(SO_ORIGINAL_DST) on a socket meshlane did not redirect (the caller gets the kernel's answer)."),
        row(RECORD_FAILED as usize, "record_failed", "meshlane_orig_dst_record_failures_total",
            None, "Redirected connections whose original destination could not be recorded (map full, no socket storage)."),
        row(BIND_FAILED as usize, "bind_failed", "meshlane_source_bind_failures_total", None,
            "Redirects where binding the pod's address as source failed (the proxy then sees 127.0.0.1)."),
        row(INBOUND_CAPTURED as usize, "inbound_captured", "meshlane_redirects_total",
            dir("inbound"), REDIRECTS_HELP),
        row(NOT_READY_REFUSED as usize, "not_ready_refused", "meshlane_not_ready_refused_total",
            None, "Captured connections refused because the proxy did not listen yet (as iptables would)."),
        row(NOT_READY_BYPASSED as usize, "not_ready_bypassed", "meshlane_not_ready_bypassed_total",
            None, "Captured connections passed untouched because the proxy did not listen yet (meshlane.io/bypass-until-ready)."),
        row(SHORTCUT_SOCKETS as usize, "shortcut_sockets", "meshlane_shortcut_sockets_total",
            None, "Sockets put into the same-node shortcut."),
        row(SHORTCUT_REDIRECTED as usize, "shortcut_redirected", "meshlane_shortcut_redirects_total",
            None, "Messages the same-node shortcut delivered straight into the peer socket."),
        row(SHORTCUT_NO_PEER as usize, "shortcut_no_peer", "meshlane_shortcut_no_peer_total",
            None, "Shortcut sockets whose peer was not there at their first send (they use TCP for life)."),
        row(LISTENERS_REGISTERED as usize, "listeners_registered",
            "meshlane_listeners_registered_total", None,
            "Proxy listeners registered at listen() for inbound capture."),
        row(UPDATE_FAILED as usize, "update_failed", "meshlane_kernel_map_update_errors_total",
            None, "Map updates the kernel programs could not make (a sockhash full, ...)."),
        row(SHORTCUT_FELL_BACK as usize, "shortcut_fell_back", "meshlane_shortcut_fell_back_total",
            None, "Shortcut sockets moved to TCP for life because their peer left too many redirected bytes unread."),
        row(LISTENERS_UNOWNED as usize, "listeners_unowned", "meshlane_listeners_unowned_total",
            None, "Listeners on a capture port whose bind() was not seen (bound before the programs were attached): left to the agent."),
        row(LISTENERS_NOT_PROXY as usize, "listeners_not_proxy", "meshlane_listeners_not_proxy_total",
            None, "Listeners on a capture port bound by neither the pod's proxy uid nor root: not registered (capture never uses them)."),
    ]
};

const POD_OUTBOUND_PASSED_HELP: &str = "A pod's connections (and DNS datagrams) left alone at \
     connect, by the rule that returned them (decision table rows 1-8).";
const POD_INBOUND_PASSED_HELP: &str = "Connections arriving at a pod left to its app, by the rule \
     that returned them (decision table rows 9-11; UDP is not counted).";

/// A pod's counters, in [`pod_stat`] order; every family has a `pod` label too.
pub const POD: &[Counter] = {
    use pod_stat::*;
    const fn dir(d: &'static str) -> Option<(&'static str, &'static str)> {
        Some(("direction", d))
    }
    const fn rule(r: &'static str) -> Option<(&'static str, &'static str)> {
        Some(("rule", r))
    }
    &[
        row(
            REDIRECT_OUTBOUND,
            "redirect_outbound",
            "meshlane_pod_redirects_total",
            dir("outbound"),
            POD_REDIRECTS_HELP,
        ),
        row(
            REDIRECT_INBOUND,
            "redirect_inbound",
            "meshlane_pod_redirects_total",
            dir("own_pod"),
            POD_REDIRECTS_HELP,
        ),
        row(
            REDIRECT_DNS,
            "redirect_dns",
            "meshlane_pod_redirects_total",
            dir("dns"),
            POD_REDIRECTS_HELP,
        ),
        row(
            INBOUND_CAPTURED,
            "inbound_captured",
            "meshlane_pod_redirects_total",
            dir("inbound"),
            POD_REDIRECTS_HELP,
        ),
        row(
            NOT_READY_REFUSED,
            "not_ready_refused",
            "meshlane_pod_not_ready_refused_total",
            None,
            "A pod's captured connections refused while its proxy did not listen.",
        ),
        row(
            NOT_READY_BYPASSED,
            "not_ready_bypassed",
            "meshlane_pod_not_ready_bypassed_total",
            None,
            "A pod's captured connections passed while its proxy did not listen.",
        ),
        row(
            ORIG_DST_ANSWERED,
            "orig_dst_answered",
            "meshlane_pod_orig_dst_answered_total",
            None,
            "getsockopt(SO_ORIGINAL_DST) answered for a pod's sockets.",
        ),
        row(
            SHORTCUT_SOCKETS,
            "shortcut_sockets",
            "meshlane_pod_shortcut_sockets_total",
            None,
            "A pod's sockets put into the same-node shortcut.",
        ),
        row(
            PASS_NOT_TCP,
            "passed_not_tcp",
            "meshlane_pod_outbound_passed_total",
            rule("not_tcp"),
            POD_OUTBOUND_PASSED_HELP,
        ),
        row(
            PASS_LOOPBACK_SOURCE_OFF_POD,
            "passed_loopback_source_off_pod",
            "meshlane_pod_outbound_passed_total",
            rule("loopback_source_off_pod"),
            POD_OUTBOUND_PASSED_HELP,
        ),
        row(
            PASS_EXCLUDED_OUTBOUND_PORT,
            "passed_excluded_outbound_port",
            "meshlane_pod_outbound_passed_total",
            rule("excluded_outbound_port"),
            POD_OUTBOUND_PASSED_HELP,
        ),
        row(
            PASS_INBOUND_PASSTHROUGH_SOURCE,
            "passed_inbound_passthrough_source",
            "meshlane_pod_outbound_passed_total",
            rule("inbound_passthrough_source"),
            POD_OUTBOUND_PASSED_HELP,
        ),
        row(
            PASS_PROXY_UID,
            "passed_proxy_uid",
            "meshlane_pod_outbound_passed_total",
            rule("proxy_uid"),
            POD_OUTBOUND_PASSED_HELP,
        ),
        row(
            PASS_PROXY_GID,
            "passed_proxy_gid",
            "meshlane_pod_outbound_passed_total",
            rule("proxy_gid"),
            POD_OUTBOUND_PASSED_HELP,
        ),
        row(
            PASS_APP_TO_LOCAL,
            "passed_app_to_local",
            "meshlane_pod_outbound_passed_total",
            rule("app_to_local"),
            POD_OUTBOUND_PASSED_HELP,
        ),
        row(
            PASS_LOCALHOST,
            "passed_localhost",
            "meshlane_pod_outbound_passed_total",
            rule("localhost"),
            POD_OUTBOUND_PASSED_HELP,
        ),
        row(
            PASS_EXCLUDED_CIDR,
            "passed_excluded_cidr",
            "meshlane_pod_outbound_passed_total",
            rule("excluded_cidr"),
            POD_OUTBOUND_PASSED_HELP,
        ),
        row(
            PASS_NOT_INCLUDED,
            "passed_not_included",
            "meshlane_pod_outbound_passed_total",
            rule("not_included"),
            POD_OUTBOUND_PASSED_HELP,
        ),
        row(
            PASS_IPV4_ONLY_POD,
            "passed_ipv4_only_pod",
            "meshlane_pod_outbound_passed_total",
            rule("ipv4_only_pod"),
            POD_OUTBOUND_PASSED_HELP,
        ),
        row(
            PASS_EXCLUDED_INTERFACE,
            "passed_excluded_interface",
            "meshlane_pod_outbound_passed_total",
            rule("excluded_interface"),
            POD_OUTBOUND_PASSED_HELP,
        ),
        row(
            IN_PASS_FROM_INSIDE_POD,
            "inbound_passed_from_inside_pod",
            "meshlane_pod_inbound_passed_total",
            rule("from_inside_pod"),
            POD_INBOUND_PASSED_HELP,
        ),
        row(
            IN_PASS_TUNNEL,
            "inbound_passed_tunnel",
            "meshlane_pod_inbound_passed_total",
            rule("tunnel"),
            POD_INBOUND_PASSED_HELP,
        ),
        row(
            IN_PASS_EXCLUDED_PORT,
            "inbound_passed_excluded_port",
            "meshlane_pod_inbound_passed_total",
            rule("excluded_port"),
            POD_INBOUND_PASSED_HELP,
        ),
        row(
            IN_PASS_NOT_INCLUDED,
            "inbound_passed_not_included",
            "meshlane_pod_inbound_passed_total",
            rule("not_included"),
            POD_INBOUND_PASSED_HELP,
        ),
        row(
            IN_PASS_EXCLUDED_INTERFACE,
            "inbound_passed_excluded_interface",
            "meshlane_pod_inbound_passed_total",
            rule("excluded_interface"),
            POD_INBOUND_PASSED_HELP,
        ),
        row(
            IN_PASS_VIRTUAL_INTERFACE,
            "inbound_passed_virtual_interface",
            "meshlane_pod_inbound_passed_total",
            rule("virtual_interface"),
            POD_INBOUND_PASSED_HELP,
        ),
    ]
};

/// Every row's index is its position and every index has a row.
const fn in_order(rows: &[Counter], count: usize) -> bool {
    if rows.len() != count {
        return false;
    }
    let mut i = 0;
    while i < rows.len() {
        if rows[i].index != i {
            return false;
        }
        i += 1;
    }
    true
}

const _: () = assert!(
    in_order(NODE, stat::COUNT as usize),
    "counters::NODE vs stat"
);
const _: () = assert!(in_order(POD, pod_stat::COUNT), "counters::POD vs pod_stat");
crate::assert_unique_names!(NODE);
crate::assert_unique_names!(POD);

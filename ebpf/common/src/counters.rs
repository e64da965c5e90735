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
    pub const COUNT: u32 = 18;
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
    pub const COUNT: usize = 8;
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
    ]
};

/// A pod's counters, in [`pod_stat`] order; every family has a `pod` label too.
pub const POD: &[Counter] = {
    use pod_stat::*;
    const fn dir(d: &'static str) -> Option<(&'static str, &'static str)> {
        Some(("direction", d))
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

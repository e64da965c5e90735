//! The Prometheus text exposition of `/metrics`: the kernel's counters (per
//! CPU, summed; node-wide and per pod, the latter keyed by netns cookie and
//! labelled with the pod's name), the maps' occupancy, and the agent's view
//! of its pods.
//!
//! Counters are `meshlane_<what>_total`; pods by state and map occupancy are
//! gauges. Kernel counters start from zero when the agent installs the
//! programs (a restart of the agent is a counter reset, as Prometheus
//! expects).
use std::{collections::BTreeMap, fmt::Write};

use meshlane_common::{capacity, names, pod_stat, stat, PodCounters};

use crate::{bpf::Maps, http::Health, status::PodState};

/// Every state a pod can be in, so each gauge series exists (at 0) from the
/// first scrape on.
const STATES: &[PodState] = &[
    PodState::Active,
    PodState::NotMeshed,
    PodState::HostNetwork,
    PodState::InterceptionNone,
    PodState::WaitingForIp,
    PodState::WaitingForNetns,
    PodState::Error,
];

fn state_name(s: PodState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", l.join(","));
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// The whole `/metrics` page. `kernel` is `None` when the pinned maps could
/// not be opened; the kernel's families are then left out (absent, not 0).
pub fn render(h: &Health, kernel: Option<&Maps>) -> String {
    let mut o = Out(String::new());

    o.family(
        "meshlane_ready",
        "gauge",
        "1 once the programs are attached and the first pod list is applied.",
    );
    o.sample(
        "meshlane_ready",
        &[],
        u8::from(crate::http::readiness(h).is_ok()),
    );

    let mut by_state: BTreeMap<String, usize> =
        STATES.iter().map(|s| (state_name(*s), 0)).collect();
    for p in &h.pods {
        *by_state.entry(state_name(p.state)).or_default() += 1;
    }
    o.family(
        "meshlane_pods",
        "gauge",
        "Pods on this node by meshlane state (active = captured).",
    );
    for (state, n) in &by_state {
        o.sample("meshlane_pods", &[("state", state)], n);
    }
    o.family(
        "meshlane_pod_info",
        "gauge",
        "One series per pod of this node: its state and network namespace cookie.",
    );
    for p in &h.pods {
        let cookie = p.netns_cookie.map(|c| c.to_string()).unwrap_or_default();
        o.sample(
            "meshlane_pod_info",
            &[
                ("pod", &p.name),
                ("state", &state_name(p.state)),
                ("netns_cookie", &cookie),
            ],
            1,
        );
    }

    o.family(
        "meshlane_map_update_errors_total",
        "counter",
        "Map writes the agent could not make (the pod is then not captured).",
    );
    o.sample("meshlane_map_update_errors_total", &[], h.map_update_errors);
    o.family(
        "meshlane_pod_source_errors_total",
        "counter",
        "Errors reading pods: a pods file that did not read or parse, API watch errors.",
    );
    o.sample("meshlane_pod_source_errors_total", &[], h.source_errors);

    let Some(maps) = kernel else {
        return o.0;
    };
    if let Ok(c) = maps.counters() {
        kernel_counters(&mut o, &|i: u32| c.get(i as usize).copied().unwrap_or(0));
    }
    pod_counters(&mut o, h, maps);
    if let Ok(on) = maps.shortcut() {
        o.family(
            "meshlane_shortcut_enabled",
            "gauge",
            "1 when new connections between meshed sockets on this node take the same-node shortcut.",
        );
        o.sample("meshlane_shortcut_enabled", &[], u8::from(on));
    }
    let occ = maps.occupancy();
    let maps_list = [
        (names::PODS, occ.pods, capacity::PODS),
        (names::PORTS, occ.ports, capacity::PORTS),
        (names::CIDRS, occ.cidrs, capacity::CIDRS),
        (names::IN_FLIGHT, occ.in_flight, capacity::IN_FLIGHT),
        (names::POD_BY_IP, occ.pod_by_ip, capacity::POD_BY_IP),
        (names::LISTENERS, occ.listeners, capacity::LISTENERS),
        (names::SOCKS, occ.shortcut_sockets, capacity::SOCKS),
        (names::SOCK_ADDRS, occ.shortcut_addrs, capacity::SOCKS),
    ];
    o.family(
        "meshlane_map_entries",
        "gauge",
        "Entries in each of meshlane's maps.",
    );
    for (name, n, _) in maps_list {
        o.sample("meshlane_map_entries", &[("map", name)], n);
    }
    o.family(
        "meshlane_map_capacity",
        "gauge",
        "Maximum entries of each of meshlane's maps.",
    );
    for (name, _, cap) in maps_list {
        o.sample("meshlane_map_capacity", &[("map", name)], cap);
    }
    o.0
}

/// The node-wide counters of the kernel programs (`STATS`).
fn kernel_counters(o: &mut Out, at: &dyn Fn(u32) -> u64) {
    let simple: &[(&str, u32, &str)] = &[
        (
            "meshlane_connects_inspected_total",
            stat::CONNECT_MESHED,
            "TCP connect() calls in meshed pods that the connect4 program decided on.",
        ),
        (
            "meshlane_orig_dst_misses_total",
            stat::ORIG_DST_MISS,
            "getsockopt(SO_ORIGINAL_DST) on a socket meshlane did not redirect (the caller gets the kernel's answer).",
        ),
        (
            "meshlane_orig_dst_record_failures_total",
            stat::RECORD_FAILED,
            "Redirected connections whose original destination could not be recorded (map full, no socket storage).",
        ),
        (
            "meshlane_source_bind_failures_total",
            stat::BIND_FAILED,
            "Redirects where binding the pod's address as source failed (the proxy then sees 127.0.0.1).",
        ),
        (
            "meshlane_not_ready_refused_total",
            stat::NOT_READY_REFUSED,
            "Captured connections refused because the proxy did not listen yet (as iptables would).",
        ),
        (
            "meshlane_not_ready_bypassed_total",
            stat::NOT_READY_BYPASSED,
            "Captured connections passed untouched because the proxy did not listen yet (meshlane.io/bypass-until-ready).",
        ),
        (
            "meshlane_shortcut_sockets_total",
            stat::SHORTCUT_SOCKETS,
            "Sockets put into the same-node shortcut.",
        ),
        (
            "meshlane_shortcut_redirects_total",
            stat::SHORTCUT_REDIRECTED,
            "Messages the same-node shortcut delivered straight into the peer socket.",
        ),
        (
            "meshlane_shortcut_no_peer_total",
            stat::SHORTCUT_NO_PEER,
            "Shortcut sockets whose peer was not there at their first send (they use TCP for life).",
        ),
        (
            "meshlane_shortcut_fell_back_total",
            stat::SHORTCUT_FELL_BACK,
            "Shortcut sockets moved to TCP for life because their peer left too many redirected bytes unread.",
        ),
        (
            "meshlane_listeners_registered_total",
            stat::LISTENERS_REGISTERED,
            "Proxy listeners registered at listen() for inbound capture.",
        ),
        (
            "meshlane_kernel_map_update_errors_total",
            stat::UPDATE_FAILED,
            "Map updates the kernel programs could not make (a sockhash full, ...).",
        ),
    ];
    for &(name, i, help) in simple {
        o.family(name, "counter", help);
        o.sample(name, &[], at(i));
    }
    o.family(
        "meshlane_redirects_total",
        "counter",
        "Connections handed to the proxy, by direction: outbound (app to 15001), inbound (from \
         outside the pod to 15006), own_pod (the proxy to its own pod, to 15006), dns (to 15053).",
    );
    for (dir, i) in [
        ("outbound", stat::REDIRECT_OUTBOUND),
        ("inbound", stat::INBOUND_CAPTURED),
        ("own_pod", stat::REDIRECT_INBOUND),
        ("dns", stat::REDIRECT_DNS),
    ] {
        o.sample("meshlane_redirects_total", &[("direction", dir)], at(i));
    }
    o.family(
        "meshlane_orig_dst_lookups_total",
        "counter",
        "getsockopt(SO_ORIGINAL_DST) calls, answered or not.",
    );
    o.sample(
        "meshlane_orig_dst_lookups_total",
        &[],
        at(stat::ORIG_DST_ANSWERED) + at(stat::ORIG_DST_MISS),
    );
}

/// The per-pod counters (`POD_STATS`, keyed by netns cookie) of the pods the
/// agent captures, labelled with the pod's name.
fn pod_counters(o: &mut Out, h: &Health, maps: &Maps) {
    let pods: Vec<(&str, PodCounters)> = h
        .pods
        .iter()
        .filter(|p| p.state == PodState::Active)
        .filter_map(|p| Some((p.name.as_str(), maps.pod_counters(p.netns_cookie?))))
        .collect();
    o.family(
        "meshlane_pod_redirects_total",
        "counter",
        "Connections handed to a pod's proxy, by pod and direction (as meshlane_redirects_total).",
    );
    for (pod, c) in &pods {
        for (dir, i) in [
            ("outbound", pod_stat::REDIRECT_OUTBOUND),
            ("inbound", pod_stat::INBOUND_CAPTURED),
            ("own_pod", pod_stat::REDIRECT_INBOUND),
            ("dns", pod_stat::REDIRECT_DNS),
        ] {
            o.sample(
                "meshlane_pod_redirects_total",
                &[("pod", pod), ("direction", dir)],
                c[i],
            );
        }
    }
    for (name, i, help) in [
        (
            "meshlane_pod_orig_dst_answered_total",
            pod_stat::ORIG_DST_ANSWERED,
            "getsockopt(SO_ORIGINAL_DST) answered for a pod's sockets.",
        ),
        (
            "meshlane_pod_not_ready_refused_total",
            pod_stat::NOT_READY_REFUSED,
            "A pod's captured connections refused while its proxy did not listen.",
        ),
        (
            "meshlane_pod_not_ready_bypassed_total",
            pod_stat::NOT_READY_BYPASSED,
            "A pod's captured connections passed while its proxy did not listen.",
        ),
        (
            "meshlane_pod_shortcut_sockets_total",
            pod_stat::SHORTCUT_SOCKETS,
            "A pod's sockets put into the same-node shortcut.",
        ),
    ] {
        o.family(name, "counter", help);
        for (pod, c) in &pods {
            o.sample(name, &[("pod", pod)], c[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::PodStatus;

    fn pod(name: &str, state: PodState) -> PodStatus {
        PodStatus {
            name: name.into(),
            ips: Vec::new(),
            state,
            netns_cookie: (state == PodState::Active).then_some(4097),
            netns: None,
            config_errors: Vec::new(),
            notes: Vec::new(),
            inbound_attached: false,
            proxy_listening: None,
            config: None,
        }
    }

    #[test]
    fn agent_side_families() {
        let h = Health {
            attached: true,
            synced: true,
            map_update_errors: 3,
            source_errors: 2,
            pods: vec![
                pod("default/a", PodState::Active),
                pod("default/b", PodState::Active),
                pod("x/\"odd\"", PodState::WaitingForNetns),
            ],
            ..Health::default()
        };
        let m = render(&h, None);
        for line in [
            "meshlane_ready 1",
            "meshlane_pods{state=\"active\"} 2",
            "meshlane_pods{state=\"waiting-for-netns\"} 1",
            "meshlane_pods{state=\"error\"} 0",
            "meshlane_pod_info{pod=\"default/a\",state=\"active\",netns_cookie=\"4097\"} 1",
            "meshlane_pod_info{pod=\"x/\\\"odd\\\"\",state=\"waiting-for-netns\",netns_cookie=\"\"} 1",
            "meshlane_map_update_errors_total 3",
            "meshlane_pod_source_errors_total 2",
            "# TYPE meshlane_map_update_errors_total counter",
        ] {
            assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
        }
        // Without the maps, no kernel family pretends to be zero.
        assert!(!m.contains("meshlane_redirects_total"), "{m}");
        let not_ready = render(&Health::default(), None);
        assert!(not_ready.lines().any(|l| l == "meshlane_ready 0"));
    }
}

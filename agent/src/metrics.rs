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

use meshlane_common::{counters, maps, stat, PodCounters};

use crate::{
    bpf::Maps,
    health::{readiness, Health},
    status::PodState,
};

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
    PodState::ProxyIdUnknown,
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
    o.sample("meshlane_ready", &[], u8::from(readiness(h).is_ok()));

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
        "meshlane_pod_address_conflicts",
        "gauge",
        "Per pod: other network namespaces holding one of its addresses, or pods whose address \
         its namespace holds (the pod stays bound to its own namespace).",
    );
    for p in h.pods.iter().filter(|p| !p.conflicts.is_empty()) {
        o.sample(
            "meshlane_pod_address_conflicts",
            &[("pod", &p.name)],
            p.conflicts.len(),
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
    let counted: Vec<(&str, usize, u32)> = maps::ALL
        .iter()
        .filter_map(|m| Some((m.name, *occ.get(m.occupancy?)?, m.capacity)))
        .collect();
    o.family(
        "meshlane_map_entries",
        "gauge",
        "Entries in each of meshlane's maps.",
    );
    for (name, n, _) in &counted {
        o.sample("meshlane_map_entries", &[("map", name)], n);
    }
    o.family(
        "meshlane_map_capacity",
        "gauge",
        "Maximum entries of each of meshlane's maps.",
    );
    for (name, _, cap) in &counted {
        o.sample("meshlane_map_capacity", &[("map", name)], cap);
    }
    o.0
}

/// Renders the counter table `rows`, one family per metric name (in the
/// order of its first row), with `value(row, series)` for each series.
fn counter_families<S>(
    o: &mut Out,
    rows: &[counters::Counter],
    series: &[(Vec<(&str, &str)>, S)],
    value: impl Fn(&counters::Counter, &S) -> u64,
) {
    let mut done: Vec<&str> = Vec::new();
    for first in rows {
        if done.contains(&first.metric) {
            continue;
        }
        done.push(first.metric);
        o.family(first.metric, "counter", first.help);
        for (labels, s) in series {
            for r in rows.iter().filter(|r| r.metric == first.metric) {
                let mut l = labels.clone();
                l.extend(r.label);
                o.sample(first.metric, &l, value(r, s));
            }
        }
    }
}

/// The node-wide counters of the kernel programs (`STATS`).
fn kernel_counters(o: &mut Out, at: &dyn Fn(u32) -> u64) {
    counter_families(o, counters::NODE, &[(Vec::new(), ())], |r, ()| {
        at(r.index as u32)
    });
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
    let pods: Vec<(Vec<(&str, &str)>, PodCounters)> = h
        .pods
        .iter()
        .filter(|p| p.state == PodState::Active)
        .filter_map(|p| {
            Some((
                vec![("pod", p.name.as_str())],
                maps.pod_counters(p.netns_cookie?),
            ))
        })
        .collect();
    counter_families(o, counters::POD, &pods, |r, c| c[r.index]);
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
            conflicts: Vec::new(),
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
                PodStatus {
                    conflicts: vec!["conflict: one".into(), "conflict: two".into()],
                    ..pod("default/a", PodState::Active)
                },
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
            "meshlane_pod_address_conflicts{pod=\"default/a\"} 2",
            "# TYPE meshlane_map_update_errors_total counter",
        ] {
            assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
        }
        // Without the maps, no kernel family pretends to be zero.
        assert!(!m.contains("meshlane_redirects_total"), "{m}");
        let not_ready = render(&Health::default(), None);
        assert!(not_ready.lines().any(|l| l == "meshlane_ready 0"));
    }

    /// Every row of the counter tables is a sample of its family, with its
    /// labels and its own value: the table and the page cannot disagree.
    #[test]
    fn every_counter_row_is_rendered_with_its_value() {
        let mut o = Out(String::new());
        kernel_counters(&mut o, &|i| 1000 + u64::from(i));
        for r in counters::NODE {
            let labels = r
                .label
                .map(|(k, v)| format!("{{{k}=\"{v}\"}}"))
                .unwrap_or_default();
            let line = format!("{}{labels} {}", r.metric, 1000 + r.index);
            assert!(
                o.0.lines().any(|l| l == line),
                "missing {line:?} in\n{}",
                o.0
            );
            assert!(o.0.contains(&format!("# TYPE {} counter", r.metric)));
        }
        let families = o.0.lines().filter(|l| l.starts_with("# TYPE")).count();
        let distinct: std::collections::BTreeSet<&str> =
            counters::NODE.iter().map(|r| r.metric).collect();
        // One family per metric name, plus the derived lookups total.
        assert_eq!(families, distinct.len() + 1, "{}", o.0);
    }
}

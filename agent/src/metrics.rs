//! The Prometheus text exposition of `/metrics`: the kernel's counters (per
//! CPU, summed; node-wide and per pod, the latter keyed by netns cookie and
//! labelled with the pod's name), the maps' occupancy, and the agent's view
//! of its pods.
//!
//! Counters are `meshlane_<what>_total`; pods by state and map occupancy are
//! gauges. Kernel counters start from zero when the agent installs the
//! programs (a restart of the agent is a counter reset, as Prometheus
//! expects).
use std::collections::BTreeMap;

use meshlane_common::{counters, maps, stat, PodCounters};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

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

/// The page being built: every family registered with prometheus-client,
/// which encodes it (OpenMetrics text). Values are snapshots (kernel
/// counters read from the maps), so counters are created at their value.
struct Out {
    reg: Registry,
    counters: BTreeMap<String, Family<Labels, Counter>>,
    gauges: BTreeMap<String, Family<Labels, Gauge>>,
}

type Labels = Vec<(String, String)>;

impl Out {
    fn new() -> Self {
        Self {
            reg: Registry::default(),
            counters: BTreeMap::new(),
            gauges: BTreeMap::new(),
        }
    }

    /// Registers family `name` (a counter's name ends in `_total`, which
    /// the encoder adds back to its samples).
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        if kind == "counter" {
            let f = Family::<Labels, Counter>::default();
            let base = name.strip_suffix("_total").unwrap_or(name);
            self.reg.register(base, help, f.clone());
            self.counters.insert(name.to_string(), f);
        } else {
            let f = Family::<Labels, Gauge>::default();
            self.reg.register(name, help, f.clone());
            self.gauges.insert(name.to_string(), f);
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        let l: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(f) = self.counters.get(name) {
            f.get_or_create(&l).inc_by(value);
        } else if let Some(f) = self.gauges.get(name) {
            f.get_or_create(&l)
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    fn encode(self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut s, &self.reg);
        s
    }
}

/// A pod's `namespace` and `pod` labels, from its `NAMESPACE/NAME` key, so
/// series join kube-state-metrics' on both.
fn pod_labels(key: &str) -> [(&str, &str); 2] {
    let (ns, name) = key.split_once('/').unwrap_or(("", key));
    [("namespace", ns), ("pod", name)]
}

/// The agent's own process, as Prometheus' client libraries export it:
/// CPU time, resident memory, open descriptors and start time, from /proc.
fn process_metrics(o: &mut Out) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command (which may hold spaces), from field 3 on.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let (tick, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as u64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    o.family(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time of the agent, in seconds (whole seconds).",
    );
    o.sample("process_cpu_seconds_total", &[], (num(14) + num(15)) / tick);
    o.family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of the agent in bytes.",
    );
    o.sample("process_resident_memory_bytes", &[], num(24) * page);
    o.family(
        "process_open_fds",
        "gauge",
        "Open file descriptors of the agent.",
    );
    o.sample("process_open_fds", &[], fds);
    o.family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the agent since the Unix epoch, in seconds.",
    );
    o.sample("process_start_time_seconds", &[], boot + num(22) / tick);
}

/// The git commit the agent was built from (`MESHLANE_GIT_COMMIT`, set by
/// the build script; "unknown" outside a checkout).
const COMMIT: &str = match option_env!("MESHLANE_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

/// The whole `/metrics` page. `kernel` is `None` when the pinned maps could
/// not be opened; the kernel's families are then left out (absent, not 0).
pub fn render(h: &Health, kernel: Option<&Maps>) -> String {
    let mut o = Out::new();
    o.family(
        "meshlane_build_info",
        "gauge",
        "1, labelled with the agent's version and the git commit it was built from.",
    );
    o.sample(
        "meshlane_build_info",
        &[("version", env!("CARGO_PKG_VERSION")), ("commit", COMMIT)],
        1,
    );
    process_metrics(&mut o);

    o.family(
        "meshlane_ready",
        "gauge",
        "1 once the programs are attached and the first pod list is applied.",
    );
    o.sample("meshlane_ready", &[], u64::from(readiness(h).is_ok()));

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
        o.sample("meshlane_pods", &[("state", state)], *n as u64);
    }
    o.family(
        "meshlane_pod_info",
        "gauge",
        "One series per pod of this node: its state and network namespace cookie.",
    );
    for p in &h.pods {
        let cookie = p.netns_cookie.map(|c| c.to_string()).unwrap_or_default();
        let [ns, pod] = pod_labels(&p.name);
        o.sample(
            "meshlane_pod_info",
            &[
                ns,
                pod,
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
            &pod_labels(&p.name),
            p.conflicts.len() as u64,
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
        return o.encode();
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
        o.sample("meshlane_shortcut_enabled", &[], u64::from(on));
    }
    let occ = maps.occupancy();
    let caps = maps.capacities();
    let counted: Vec<(&str, usize, Option<usize>)> = maps::ALL
        .iter()
        .filter_map(|m| {
            let key = m.occupancy?;
            Some((m.name, *occ.get(key)?, caps.get(key).copied()))
        })
        .collect();
    o.family(
        "meshlane_map_entries",
        "gauge",
        "Entries in each of meshlane's maps.",
    );
    for (name, n, _) in &counted {
        o.sample("meshlane_map_entries", &[("map", name)], *n as u64);
    }
    o.family(
        "meshlane_map_capacity",
        "gauge",
        "Maximum entries of each of meshlane's maps, as the kernel created it (the maps of \
         pods are sized by --max-pods and --max-list-entries).",
    );
    for (name, _, cap) in &counted {
        if let Some(cap) = cap {
            o.sample("meshlane_map_capacity", &[("map", name)], *cap as u64);
        }
    }
    o.encode()
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
                pod_labels(&p.name).to_vec(),
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
            "meshlane_pod_info{namespace=\"default\",pod=\"a\",state=\"active\",netns_cookie=\"4097\"} 1",
            "meshlane_pod_info{namespace=\"x\",pod=\"\\\"odd\\\"\",state=\"waiting-for-netns\",netns_cookie=\"\"} 1",
            "meshlane_map_update_errors_total 3",
            "meshlane_pod_source_errors_total 2",
            "meshlane_pod_address_conflicts{namespace=\"default\",pod=\"a\"} 2",
            "# TYPE meshlane_map_update_errors counter",
            "meshlane_build_info{version=\"0.1.0\",commit=\"COMMIT\"} 1",
            "# EOF",
        ] {
            let line = line.replace("0.1.0", env!("CARGO_PKG_VERSION"));
            let line = line.replace("COMMIT", COMMIT);
            assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
        }
        for family in ["process_resident_memory_bytes", "process_open_fds"] {
            assert!(
                m.lines()
                    .any(|l| l.starts_with(family) && !l.ends_with(" 0")),
                "{family} in\n{m}"
            );
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
        let mut o = Out::new();
        kernel_counters(&mut o, &|i| 1000 + u64::from(i));
        let page = o.encode();
        for r in counters::NODE {
            let labels = r
                .label
                .map(|(k, v)| format!("{{{k}=\"{v}\"}}"))
                .unwrap_or_default();
            let line = format!("{}{labels} {}", r.metric, 1000 + r.index);
            assert!(
                page.lines().any(|l| l == line),
                "missing {line:?} in\n{page}"
            );
            let family = r.metric.strip_suffix("_total").unwrap_or(r.metric);
            assert!(page.contains(&format!("# TYPE {family} counter")));
        }
        let families = page.lines().filter(|l| l.starts_with("# TYPE")).count();
        let distinct: std::collections::BTreeSet<&str> =
            counters::NODE.iter().map(|r| r.metric).collect();
        // One family per metric name, plus the derived lookups total.
        assert_eq!(families, distinct.len() + 1, "{page}");
    }
}

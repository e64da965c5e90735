//! From raw [`Results`] to what people read: medians and spread per shape and
//! mode, ratios against iptables and against explicit, the issue's goals
//! judged on this run, the scale table, a Markdown page, a JSON summary and
//! one SVG bar chart per shape.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{
    client::Report,
    run::{Bench, Mode, Results, ScaleResult, Snapshot},
};

/// One number computed from a client report.
#[derive(Clone, Copy)]
pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    pub higher_is_better: bool,
    value: fn(&Report) -> Option<f64>,
}

fn per_op(r: &Report, us: f64) -> Option<f64> {
    (r.ops > 0).then(|| us / r.ops as f64)
}

fn rate(r: &Report) -> Option<f64> {
    (r.elapsed_s > 0.0 && r.ops > 0).then(|| r.ops as f64 / r.elapsed_s)
}

fn positive(v: f64) -> Option<f64> {
    (v > 0.0).then_some(v)
}

const CPU: Metric = Metric {
    key: "cpu_us_per_op",
    label: "CPU µs per request (all processes)",
    higher_is_better: false,
    value: |r| per_op(r, r.cpu_client_us + r.cpu_others_us),
};
const SOFTIRQ: Metric = Metric {
    key: "softirq_us_per_op",
    label: "softirq µs per request (whole machine)",
    higher_is_better: false,
    value: |r| per_op(r, r.softirq_us),
};
const P50: Metric = Metric {
    key: "p50_us",
    label: "p50 latency µs",
    higher_is_better: false,
    value: |r| positive(r.p50_us),
};
const P99: Metric = Metric {
    key: "p99_us",
    label: "p99 latency µs",
    higher_is_better: false,
    value: |r| positive(r.p99_us),
};

const CTXSW: Metric = Metric {
    key: "ctxsw_per_op",
    label: "context switches per request (sidecars, server, agent)",
    higher_is_better: false,
    value: |r| (r.ops > 0).then(|| r.ctxsw_others as f64 / r.ops as f64),
};

/// The metrics of a shape; the first is the one charted and judged.
pub fn metrics(bench: Bench) -> Vec<Metric> {
    match bench {
        Bench::Crr => vec![
            Metric {
                key: "conn_per_s",
                label: "connections/s",
                higher_is_better: true,
                value: rate,
            },
            P50,
            P99,
            Metric {
                label: "CPU µs per connection (all processes)",
                ..CPU
            },
            Metric {
                label: "softirq µs per connection (whole machine)",
                ..SOFTIRQ
            },
            Metric {
                label: "context switches per connection (sidecars, server, agent)",
                ..CTXSW
            },
        ],
        Bench::Rr64 | Bench::Rr16k => vec![
            P50,
            P99,
            Metric {
                key: "req_per_s",
                label: "requests/s",
                higher_is_better: true,
                value: rate,
            },
            CPU,
            SOFTIRQ,
            CTXSW,
        ],
        Bench::Dns => vec![
            Metric {
                key: "queries_per_s",
                label: "queries/s",
                higher_is_better: true,
                value: rate,
            },
            P50,
            P99,
            Metric {
                label: "CPU µs per query (client, stand-in, server, agent)",
                ..CPU
            },
        ],
        Bench::UdpSend => vec![
            Metric {
                key: "datagrams_per_s",
                label: "datagrams sent/s",
                higher_is_better: true,
                value: rate,
            },
            Metric {
                label: "CPU µs per datagram (sender, receiver, agent)",
                ..CPU
            },
        ],
        Bench::Sockopt => vec![
            Metric {
                key: "calls_per_s",
                label: "getsockopt calls/s",
                higher_is_better: true,
                value: |r| rate(r).map(|x| x * super::client::SOCKOPT_CALLS as f64),
            },
            Metric {
                key: "cpu_ns_per_call",
                label: "CPU ns per getsockopt call (client)",
                higher_is_better: false,
                value: |r| {
                    (r.ops > 0).then(|| {
                        r.cpu_client_us * 1e3 / (r.ops * super::client::SOCKOPT_CALLS) as f64
                    })
                },
            },
        ],
        Bench::Stream1k | Bench::Stream64k => vec![
            Metric {
                key: "gbit_per_s",
                label: "Gbit/s",
                higher_is_better: true,
                value: |r| (r.elapsed_s > 0.0).then(|| r.bytes as f64 * 8.0 / r.elapsed_s / 1e9),
            },
            Metric {
                key: "cpu_s_per_gb",
                label: "CPU s per GB (all processes)",
                higher_is_better: false,
                value: |r| {
                    (r.bytes > 0)
                        .then(|| (r.cpu_client_us + r.cpu_others_us) / 1e6 / (r.bytes as f64 / 1e9))
                },
            },
            Metric {
                key: "ctxsw_per_mb",
                label: "context switches per MB (sidecars, server, agent)",
                higher_is_better: false,
                value: |r| (r.bytes > 0).then(|| r.ctxsw_others as f64 / (r.bytes as f64 / 1e6)),
            },
        ],
    }
}

/// Median and range of one metric over the repetitions.
#[derive(Clone, Debug, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(mut v: Vec<f64>) -> Option<Stat> {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// Half the range as a percentage of the median.
    pub fn spread_pct(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / 2.0 / self.median.abs() * 100.0
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub shape: &'static str,
    pub metric: &'static str,
    pub label: &'static str,
    pub higher_is_better: bool,
    pub stats: BTreeMap<Mode, Stat>,
    /// "meshlane / iptables" and friends: ratio of medians.
    pub ratios: BTreeMap<String, f64>,
}

/// The (subject, reference) pairs every row compares.
const RATIOS: [(Mode, Mode); 6] = [
    (Mode::Meshlane, Mode::Iptables),
    (Mode::Meshlane, Mode::Explicit),
    (Mode::MeshlaneShortcut, Mode::Iptables),
    (Mode::MeshlaneShortcut, Mode::Explicit),
    (Mode::MeshlaneShortcutApp, Mode::Iptables),
    (Mode::MeshlaneShortcutApp, Mode::Explicit),
];

/// The comparisons of the second table: (subject, reference, what it
/// asks). Each is judged on the first metric of every shape both ran, and
/// for the DNS shape on its latencies too.
const PAIRS: [(Mode, Mode, &str); 3] = [
    (
        Mode::MeshlaneV6,
        Mode::Ip6tables,
        "IPv6: meshlane not slower than ip6tables",
    ),
    (
        Mode::MeshlaneDns,
        Mode::IptablesDns,
        "UDP DNS: meshlane not slower than Istio's DNS rules",
    ),
    (
        Mode::Unmeshed,
        Mode::Direct,
        "unmeshed pods on a meshlane node: within 1% of no agent",
    ),
];

/// How fast `a` is relative to `b` on `row` (>1: faster), from the ratio of
/// medians.
fn speed(row: &Row, a: Mode, b: Mode) -> Option<f64> {
    let x = *row.ratios.get(&ratio_key(a, b))?;
    Some(if row.higher_is_better { x } else { 1.0 / x })
}

/// The metrics a pair's goal is judged on, for `bench`.
fn judged(bench: Bench) -> Vec<&'static str> {
    match bench {
        Bench::Dns => vec!["queries_per_s", "p50_us", "p99_us"],
        Bench::Rr64 | Bench::Rr16k => vec!["p50_us", "p99_us"],
        b => vec![metrics(b)[0].key],
    }
}

fn ratio_key(a: Mode, b: Mode) -> String {
    format!("{} / {}", a.name(), b.name())
}

pub fn rows(res: &Results) -> Vec<Row> {
    let mut out = Vec::new();
    for sr in &res.shapes {
        for m in metrics(sr.bench) {
            let stats: BTreeMap<Mode, Stat> = sr
                .runs
                .iter()
                .filter_map(|(mode, runs)| {
                    let vals = runs.reports.iter().filter_map(|r| (m.value)(r)).collect();
                    Some((*mode, Stat::of(vals)?))
                })
                .collect();
            let ratios = RATIOS
                .iter()
                .copied()
                .chain(PAIRS.iter().map(|&(a, b, _)| (a, b)))
                .filter_map(|(a, b)| {
                    let (x, y) = (stats.get(&a)?, stats.get(&b)?);
                    (y.median != 0.0).then(|| (ratio_key(a, b), x.median / y.median))
                })
                .collect();
            out.push(Row {
                shape: sr.bench.name(),
                metric: m.key,
                label: m.label,
                higher_is_better: m.higher_is_better,
                stats,
                ratios,
            });
        }
    }
    out
}

#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    pub verdict: &'static str,
}

fn find<'a>(rows: &'a [Row], bench: Bench, metric: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.shape == bench.name() && r.metric == metric)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// The issue's goals, judged on this run's ratios.
pub fn goals(res: &Results, rows: &[Row]) -> Vec<Goal> {
    let mut out = Vec::new();
    let mut ratio_goal =
        |goal: &str, bench: Bench, metric: &str, a: Mode, b: Mode, ok: fn(f64) -> bool| {
            let r = find(rows, bench, metric).and_then(|r| r.ratios.get(&ratio_key(a, b)).copied());
            out.push(match r {
                Some(x) => Goal {
                    goal: goal.into(),
                    measured: format!("{x:.2}x"),
                    verdict: verdict(ok(x)),
                },
                None => Goal {
                    goal: goal.into(),
                    measured: "no data".into(),
                    verdict: "not measured",
                },
            });
        };
    ratio_goal(
        "connection rate: meshlane >= 1.25x iptables",
        Bench::Crr,
        "conn_per_s",
        Mode::Meshlane,
        Mode::Iptables,
        |x| x >= 1.25,
    );
    ratio_goal(
        "connection rate: meshlane >= 0.98x explicit",
        Bench::Crr,
        "conn_per_s",
        Mode::Meshlane,
        Mode::Explicit,
        |x| x >= 0.98,
    );
    ratio_goal(
        "64 B request/response p50: meshlane+shortcut <= 0.6x iptables",
        Bench::Rr64,
        "p50_us",
        Mode::MeshlaneShortcut,
        Mode::Iptables,
        |x| x <= 0.6,
    );
    ratio_goal(
        "64 KB streaming: meshlane+shortcut >= 1.8x iptables",
        Bench::Stream64k,
        "gbit_per_s",
        Mode::MeshlaneShortcut,
        Mode::Iptables,
        |x| x >= 1.8,
    );
    ratio_goal(
        "64 B request/response p50: meshlane+shortcut-app <= 0.6x iptables",
        Bench::Rr64,
        "p50_us",
        Mode::MeshlaneShortcutApp,
        Mode::Iptables,
        |x| x <= 0.6,
    );
    ratio_goal(
        "64 KB streaming: meshlane+shortcut-app >= 1.8x iptables",
        Bench::Stream64k,
        "gbit_per_s",
        Mode::MeshlaneShortcutApp,
        Mode::Iptables,
        |x| x >= 1.8,
    );
    for mode in [
        Mode::Meshlane,
        Mode::MeshlaneShortcut,
        Mode::MeshlaneShortcutApp,
    ] {
        let mut worst: Option<(f64, &str)> = None;
        for b in Bench::ALL {
            let key = metrics(b)[0].key;
            let Some(row) = find(rows, b, key) else {
                continue;
            };
            let Some(&x) = row.ratios.get(&ratio_key(mode, Mode::Iptables)) else {
                continue;
            };
            // As "how fast relative to iptables": >1 is faster.
            let speed = if row.higher_is_better { x } else { 1.0 / x };
            if worst.is_none_or(|(w, _)| speed < w) {
                worst = Some((speed, b.name()));
            }
        }
        let goal = format!(
            "no shape slower than iptables by more than 5% ({})",
            mode.name()
        );
        out.push(match worst {
            Some((w, shape)) => Goal {
                goal,
                measured: format!("slowest: {shape} at {w:.2}x iptables' speed"),
                verdict: verdict(w >= 0.95),
            },
            None => Goal {
                goal,
                measured: "no data".into(),
                verdict: "not measured",
            },
        });
    }
    out.extend(pair_goals(rows));
    for s in res.scale.iter().filter(|s| {
        matches!(
            s.mode,
            Mode::Meshlane | Mode::MeshlaneShortcut | Mode::MeshlaneShortcutApp
        )
    }) {
        let added = |pick: fn(&Snapshot) -> u64| {
            [&s.held, &s.churned]
                .iter()
                .map(|x| pick(x).saturating_sub(pick(&s.baseline)))
                .max()
                .unwrap_or(0)
        };
        let a = added(|x| x.conntrack_a.entries);
        let b = added(|x| x.conntrack_b.entries);
        let b_by_iptables = res
            .modes
            .iter()
            .any(|i| i.mode == s.mode && i.notes.iter().any(|n| n.contains("through iptables")));
        out.push(Goal {
            goal: format!(
                "conntrack entries added by meshlane: 0 ({}, pod A)",
                s.mode.name()
            ),
            measured: format!("{a}"),
            verdict: verdict(a == 0),
        });
        out.push(Goal {
            goal: format!(
                "conntrack entries added by meshlane: 0 ({}, pod B)",
                s.mode.name()
            ),
            measured: if b_by_iptables {
                format!("{b} (pod B's inbound goes through iptables in this run)")
            } else {
                format!("{b}")
            },
            verdict: if b_by_iptables {
                "not measurable"
            } else {
                verdict(b == 0)
            },
        });
        let (base, after) = (s.baseline.map_entries(), s.settled.map_entries());
        out.push(Goal {
            goal: format!(
                "map entries after churn back to baseline ({})",
                s.mode.name()
            ),
            measured: match (base, after, s.settle_s) {
                (Some(b), Some(a), Some(t)) => format!("{b} -> {a} (after {t:.1} s)"),
                (Some(b), Some(a), None) => format!("{b} -> {a}"),
                _ => "no data".into(),
            },
            verdict: match (base, after) {
                (Some(b), Some(a)) => verdict(a == b && s.churn.is_some()),
                _ => "not measured",
            },
        });
    }
    out
}

/// The goals of the [`PAIRS`]: one per shape and judged metric both modes
/// of a pair ran.
fn pair_goals(rows: &[Row]) -> Vec<Goal> {
    let mut out = Vec::new();
    for (a, b, what) in PAIRS {
        // "Not slower" is a speed of at least 1; "within 1%" at least 0.99.
        let floor = if b == Mode::Direct { 0.99 } else { 1.0 };
        for bench in Bench::ALL {
            if !(bench.applies(a) && bench.applies(b)) {
                continue;
            }
            for key in judged(bench) {
                let Some(row) = find(rows, bench, key) else {
                    continue;
                };
                let goal = format!("{what}: {}, {}", bench.name(), row.label);
                out.push(match speed(row, a, b) {
                    Some(x) => Goal {
                        goal,
                        measured: format!("{x:.3}x {}'s speed", b.name()),
                        verdict: verdict(x >= floor),
                    },
                    None => Goal {
                        goal,
                        measured: "no data".into(),
                        verdict: "not measured",
                    },
                });
            }
        }
    }
    out
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 10_000.0 {
        let s = format!("{v:.0}");
        // Thousands separators for readability.
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A count, with thousands separators from 10,000 on.
fn fmt_count(v: u64) -> String {
    if v >= 10_000 {
        fmt_num(v as f64)
    } else {
        v.to_string()
    }
}

fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else if b >= 1024.0 {
        format!("{:.0} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "–".to_string(), f)
}

/// The Markdown page: machine, results with ratios, goals, scale, notes.
pub fn markdown(res: &Results) -> String {
    let rows = rows(res);
    let goals = goals(res, &rows);
    let modes: Vec<Mode> = res
        .modes
        .iter()
        .map(|i| i.mode)
        .filter(|m| m.is_main())
        .collect();
    let mut s = String::new();
    let m = &res.machine;
    let _ = writeln!(
        s,
        "Run of {} ({}), proxy: {}, {} repetitions per shape and mode (modes interleaved), \
         {} ms measured after {} ms of warm-up each.\n",
        res.started_utc,
        if res.quick { "`--quick`" } else { "full" },
        match res.proxy {
            super::run::Proxy::Test => "the test sidecar (`mtest sidecar`)",
            super::run::Proxy::Haproxy => "HAProxy",
        },
        res.plan.reps,
        res.plan.duration_ms,
        res.plan.warmup_ms
    );
    let _ = writeln!(
        s,
        "Machine: {}, {} CPUs, {} GiB, Linux {}, nf_conntrack_max {}; load average {:.2} at the \
         start and {:.2} at the end{}.{}\n",
        m.cpu,
        m.cpus,
        m.memory_gib,
        m.kernel,
        opt(m.nf_conntrack_max, |v| v.to_string()),
        m.load_start,
        m.load_end,
        opt(m.git_commit.clone(), |c| format!("; commit {c}")),
        if m.cpu_idle.is_empty() {
            String::new()
        } else {
            format!(" CPU idle: {}.", m.cpu_idle)
        }
    );
    let _ = writeln!(
        s,
        "Median of the repetitions, ± half their range. Ratios are medians divided; for \
         latency and CPU lower is better, for rates higher is better.\n"
    );
    // Results table.
    let mut head = String::from("| shape | metric |");
    let mut sep = String::from("|---|---|");
    for md in &modes {
        let _ = write!(head, " {} |", md.name());
        sep.push_str("---:|");
    }
    for (a, b) in RATIOS {
        if modes.contains(&a) && modes.contains(&b) {
            let _ = write!(head, " {} ÷ {} |", a.name(), b.name());
            sep.push_str("---:|");
        }
    }
    let _ = writeln!(s, "{head}\n{sep}");
    let main_shapes: Vec<&str> = Bench::MAIN.iter().map(|b| b.name()).collect();
    for r in rows.iter().filter(|r| main_shapes.contains(&r.shape)) {
        let mut line = format!("| {} | {} |", r.shape, r.label);
        for md in &modes {
            let cell = match (r.stats.get(md), unavailable(res, *md)) {
                (Some(st), _) => format!("{} ±{:.0}%", fmt_num(st.median), st.spread_pct()),
                (None, true) => "n/a".into(),
                (None, false) => "–".into(),
            };
            let _ = write!(line, " {cell} |");
        }
        for (a, b) in RATIOS {
            if modes.contains(&a) && modes.contains(&b) {
                let cell = r
                    .ratios
                    .get(&ratio_key(a, b))
                    .map_or("–".into(), |x| format!("{x:.2}"));
                let _ = write!(line, " {cell} |");
            }
        }
        let _ = writeln!(s, "{line}");
    }
    pairs_table(res, &rows, &mut s);
    // Goals.
    let _ = writeln!(s, "\nGoals, judged on this run:\n");
    let _ = writeln!(s, "| goal | measured | verdict |\n|---|---|---|");
    for g in &goals {
        let _ = writeln!(s, "| {} | {} | {} |", g.goal, g.measured, g.verdict);
    }
    // Scale.
    if !res.scale.is_empty() {
        let _ = writeln!(
            s,
            "\nScale: {} kept connections, then {} short ones ({} threads). Conntrack columns are \
             the entries in pod A / pod B (and table-full drops when any).\n",
            fmt_count(u64::from(res.plan.hold_conns)),
            fmt_count(res.plan.churn_conns),
            res.plan.churn_threads
        );
        let _ = writeln!(
            s,
            "| mode | phase | agent RSS | BPF map memory | map entries | conntrack A / B | sidecars RSS |\n|---|---|---:|---:|---:|---:|---:|"
        );
        for sc in &res.scale {
            for (phase, snap) in phases(sc) {
                let ct = |c: &super::sys::Conntrack| {
                    if c.drops > 0 {
                        format!("{} ({} drops)", fmt_count(c.entries), c.drops)
                    } else {
                        fmt_count(c.entries)
                    }
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} / {} | {} |",
                    sc.mode.name(),
                    phase,
                    opt(snap.agent_rss, fmt_bytes),
                    opt(snap.map_bytes(), fmt_bytes),
                    opt(snap.map_entries(), fmt_count),
                    ct(&snap.conntrack_a),
                    ct(&snap.conntrack_b),
                    opt(snap.sidecar_rss, fmt_bytes),
                );
            }
        }
        let _ = writeln!(
            s,
            "\n| mode | kept connections opened | open time | churn connections/s | churn errors | churn time | maps back to baseline |\n|---|---:|---:|---:|---:|---:|---|"
        );
        for sc in &res.scale {
            let hold = sc.hold.as_ref();
            let churn = sc.churn.as_ref();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                sc.mode.name(),
                opt(hold, |h| fmt_count(h.ops)),
                opt(hold, |h| format!("{:.1} s", h.elapsed_s)),
                opt(churn.and_then(rate), fmt_num),
                opt(churn, |c| c.errors.to_string()),
                opt(churn, |c| format!("{:.1} s", c.elapsed_s)),
                match (sc.baseline.map_entries(), sc.settle_s) {
                    (None, _) => "no maps".into(),
                    (Some(_), Some(t)) => format!("yes, {t:.1} s after"),
                    (Some(b), None) => format!(
                        "NO: {} vs {b}",
                        opt(sc.settled.map_entries(), |v| v.to_string())
                    ),
                }
            );
        }
    }
    cost_table(res, &rows, &mut s);
    bpf_table(res, &mut s);
    // Notes.
    let mut notes: Vec<String> = Vec::new();
    for i in &res.modes {
        if let Some(why) = &i.unavailable {
            notes.push(format!("**{} unavailable**: {why}", i.mode.name()));
        }
        for n in &i.notes {
            notes.push(format!("{}: {n}", i.mode.name()));
        }
    }
    for sr in &res.shapes {
        for (mode, runs) in &sr.runs {
            for f in &runs.failures {
                notes.push(format!(
                    "{} in {} failed: {f}",
                    sr.bench.name(),
                    mode.name()
                ));
            }
            let drops: u64 = runs.conntrack_drops.iter().sum();
            if drops > 0 {
                notes.push(format!(
                    "{} in {}: {drops} packets dropped by conntrack (table full) during the runs",
                    sr.bench.name(),
                    mode.name()
                ));
            }
            let errors: u64 = runs.reports.iter().map(|r| r.errors).sum();
            if errors > 0 {
                let first = runs
                    .reports
                    .iter()
                    .find_map(|r| r.first_error.clone())
                    .unwrap_or_default();
                notes.push(format!(
                    "{} in {}: {errors} failed requests or connections (first: {first})",
                    sr.bench.name(),
                    mode.name()
                ));
            }
        }
    }
    for (sr, mode) in res
        .shapes
        .iter()
        .flat_map(|sr| [Mode::MeshlaneShortcut, Mode::MeshlaneShortcutApp].map(|m| (sr, m)))
    {
        if let Some(runs) = sr.runs.get(&mode) {
            let msgs: u64 = runs.shortcut_msgs.iter().sum();
            let (ops, bytes): (u64, u64) = runs
                .reports
                .iter()
                .fold((0, 0), |(o, b), r| (o + r.ops_total, b + r.bytes_total));
            if let Some(avg) = bytes.checked_div(msgs) {
                let per = if bytes > 0 {
                    format!("{} payload bytes per message", fmt_count(avg))
                } else {
                    format!(
                        "{:.2} messages per request",
                        msgs as f64 / ops.max(1) as f64
                    )
                };
                notes.push(format!(
                    "{} in {}: {} messages redirected by the shortcut, {per}",
                    sr.bench.name(),
                    mode.name(),
                    fmt_count(msgs)
                ));
            }
        }
    }
    for sc in &res.scale {
        for f in &sc.failures {
            notes.push(format!("scale in {}: {f}", sc.mode.name()));
        }
        if let Some(c) = sc.churn.as_ref().filter(|c| c.errors > 0) {
            notes.push(format!(
                "churn in {}: {} errors (first: {})",
                sc.mode.name(),
                c.errors,
                c.first_error.clone().unwrap_or_default()
            ));
        }
    }
    notes.extend(res.notes.iter().cloned());
    if !notes.is_empty() {
        let _ = writeln!(s, "\nNotes:\n");
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// The IPv6, DNS and unmeshed comparisons: one line per shape and metric
/// both modes of a pair ran, with the ratio of medians and the speed it
/// means (>1: the subject is faster).
fn pairs_table(res: &Results, rows: &[Row], s: &mut String) {
    let ran = |m: Mode| res.modes.iter().any(|i| i.mode == m);
    let pairs: Vec<_> = PAIRS
        .iter()
        .filter(|(a, b, _)| ran(*a) || ran(*b))
        .collect();
    if pairs.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nIPv6, UDP DNS and the cost to unmeshed pods (same repetitions; \
         `unmeshed` is `direct` with the agent running, its programs attached to the node \
         cgroup above the unmeshed pods). Speed: the ratio as \"how fast\", above 1 is faster.\n"
    );
    let _ = writeln!(
        s,
        "| comparison | shape | metric | reference | subject | subject ÷ reference | speed |\n|---|---|---|---:|---:|---:|---:|"
    );
    for (a, b, _) in pairs {
        for r in rows {
            let Some(bench) = Bench::ALL.into_iter().find(|x| x.name() == r.shape) else {
                continue;
            };
            if !(bench.applies(*a) && bench.applies(*b)) {
                continue;
            }
            let cell = |m: &Mode| match (r.stats.get(m), unavailable(res, *m)) {
                (Some(st), _) => format!("{} ±{:.0}%", fmt_num(st.median), st.spread_pct()),
                (None, true) => "n/a".into(),
                (None, false) => "–".into(),
            };
            let _ = writeln!(
                s,
                "| {} vs {} | {} | {} | {} | {} | {} | {} |",
                a.name(),
                b.name(),
                r.shape,
                r.label,
                cell(b),
                cell(a),
                r.ratios
                    .get(&ratio_key(*a, *b))
                    .map_or("–".into(), |x| format!("{x:.3}")),
                speed(r, *a, *b).map_or("–".into(), |x| format!("{x:.3}")),
            );
        }
    }
}

/// What each interception adds to the floor (explicit: the same sidecars,
/// dialled directly): the part of a number that is the interception's own,
/// which the plain ratios dilute with the sidecars' cost.
const COSTS: [(Bench, &str, &[&str]); 7] = [
    (
        Bench::Crr,
        "CPU + softirq µs per connection",
        &["cpu_us_per_op", "softirq_us_per_op"],
    ),
    (Bench::Crr, "p50 latency µs", &["p50_us"]),
    (
        Bench::Rr64,
        "CPU + softirq µs per request",
        &["cpu_us_per_op", "softirq_us_per_op"],
    ),
    (Bench::Rr64, "p50 latency µs", &["p50_us"]),
    (
        Bench::Rr16k,
        "CPU + softirq µs per request",
        &["cpu_us_per_op", "softirq_us_per_op"],
    ),
    (Bench::Stream1k, "CPU s per GB", &["cpu_s_per_gb"]),
    (Bench::Stream64k, "CPU s per GB", &["cpu_s_per_gb"]),
];

/// Sum of the medians of `keys` for `mode` (None when any is missing).
fn summed(rows: &[Row], bench: Bench, keys: &[&str], mode: Mode) -> Option<f64> {
    keys.iter()
        .map(|k| Some(find(rows, bench, k)?.stats.get(&mode)?.median))
        .sum()
}

fn cost_table(res: &Results, rows: &[Row], s: &mut String) {
    let measured = |m: Mode| res.modes.iter().any(|i| i.mode == m) && !unavailable(res, m);
    let modes: Vec<Mode> = [
        Mode::Iptables,
        Mode::Meshlane,
        Mode::MeshlaneShortcut,
        Mode::MeshlaneShortcutApp,
    ]
    .into_iter()
    .filter(|m| measured(*m))
    .collect();
    if !measured(Mode::Explicit) || modes.is_empty() {
        return;
    }
    let mut body = String::new();
    for (bench, what, keys) in COSTS {
        let Some(floor) = summed(rows, bench, keys, Mode::Explicit) else {
            continue;
        };
        let ipt = summed(rows, bench, keys, Mode::Iptables).map(|v| v - floor);
        let mut line = format!("| {} | {what} | {} |", bench.name(), fmt_num(floor));
        for m in &modes {
            let cell = match summed(rows, bench, keys, *m) {
                None => "–".to_string(),
                Some(v) => {
                    let d = v - floor;
                    let sign = if d < 0.0 { "−" } else { "+" };
                    let mut c = format!("{sign}{}", fmt_num(d.abs()));
                    // A share of iptables' cost only reads right when both
                    // add something.
                    if *m != Mode::Iptables && d >= 0.0 {
                        if let Some(i) = ipt.filter(|i| *i > 0.0) {
                            let _ = write!(c, " ({:.2}x iptables')", d / i);
                        }
                    }
                    c
                }
            };
            let _ = write!(line, " {cell} |");
        }
        let _ = writeln!(body, "{line}");
    }
    if body.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nWhat the interception itself adds to the floor (each mode's median minus explicit's, \
         same sidecars dialled directly; a minus is cheaper than no interception, and a \
         difference within the spreads above is noise):\n"
    );
    let mut head = "| shape | measure | explicit |".to_string();
    let mut rule = "|---|---|---:|".to_string();
    for m in &modes {
        let _ = write!(head, " {} adds |", m.name());
        rule.push_str("---:|");
    }
    let _ = writeln!(s, "{head}\n{rule}\n{body}");
}

/// With `--bpf-stats`: what meshlane's programs cost per request (or per
/// MB streamed), from the kernel's own run-time accounting.
fn bpf_table(res: &Results, s: &mut String) {
    let mut lines = Vec::new();
    for sr in &res.shapes {
        for (mode, runs) in &sr.runs {
            if runs.bpf.is_empty() {
                continue;
            }
            let mut by_prog: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
            for run in &runs.bpf {
                for (k, &(n, t)) in run {
                    let e = by_prog.entry(k.as_str()).or_default();
                    e.0 += n;
                    e.1 += t;
                }
            }
            let (ops, bytes): (u64, u64) = runs
                .reports
                .iter()
                .fold((0, 0), |(o, b), r| (o + r.ops_total, b + r.bytes_total));
            let per = if bytes > 0 {
                bytes as f64 / 1e6
            } else {
                ops as f64
            };
            if per == 0.0 {
                continue;
            }
            let unit = if bytes > 0 { "MB" } else { "request" };
            let total_ns: u64 = by_prog.values().map(|v| v.1).sum();
            let total_runs: u64 = by_prog.values().map(|v| v.0).sum();
            let detail: Vec<String> = by_prog
                .iter()
                .filter(|(_, v)| v.0 > 0)
                .map(|(k, &(n, t))| {
                    format!(
                        "{k}: {:.2} runs, {:.0} ns each",
                        n as f64 / per,
                        t as f64 / n as f64
                    )
                })
                .collect();
            lines.push(format!(
                "| {} | {} | {:.0} ns per {unit} | {:.2} | {} |",
                sr.bench.name(),
                mode.name(),
                total_ns as f64 / per,
                total_runs as f64 / per,
                detail.join("; ")
            ));
        }
    }
    if !lines.is_empty() {
        let _ = writeln!(
            s,
            "\nmeshlane's BPF programs, from the kernel's run-time accounting (`--bpf-stats`, warm-up included):\n\n| shape | mode | program time | program runs per request or MB | by program |\n|---|---|---:|---:|---|"
        );
        for l in lines {
            let _ = writeln!(s, "{l}");
        }
    }
}

fn unavailable(res: &Results, mode: Mode) -> bool {
    res.modes
        .iter()
        .any(|i| i.mode == mode && i.unavailable.is_some())
}

fn phases(sc: &ScaleResult) -> [(&'static str, &Snapshot); 5] {
    [
        ("baseline", &sc.baseline),
        ("connections held", &sc.held),
        ("after closing them", &sc.released),
        ("right after churn", &sc.churned),
        ("settled", &sc.settled),
    ]
}

/// One bar chart: the shape's first metric, a bar per mode (median) with a
/// whisker from the lowest to the highest repetition.
pub fn svg(res: &Results, bench: Bench) -> String {
    let metric = metrics(bench)[0];
    let rows = rows(res);
    let row = find(&rows, bench, metric.key);
    let modes: Vec<Mode> = res
        .modes
        .iter()
        .map(|i| i.mode)
        .filter(|&m| bench.applies(m))
        .collect();
    let (w, h) = (640.0, 340.0);
    let (left, right, top, bottom) = (60.0, 20.0, 50.0, 60.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let max = row
        .map(|r| r.stats.values().map(|s| s.max).fold(0.0, f64::max))
        .unwrap_or(0.0)
        .max(f64::MIN_POSITIVE);
    let scale = nice_ceiling(max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}: {} ({})</text>"#,
        w / 2.0,
        xml(bench.name()),
        xml(metric.label),
        if metric.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        }
    );
    // Axis and grid.
    for i in 0..=4 {
        let v = scale * f64::from(i) / 4.0;
        let y = top + plot_h - plot_h * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + plot_w,
            left - 6.0,
            y + 4.0,
            fmt_num(v)
        );
    }
    let n = modes.len().max(1) as f64;
    let slot = plot_w / n;
    let bar = slot * 0.6;
    for (i, md) in modes.iter().enumerate() {
        let x = left + slot * i as f64 + (slot - bar) / 2.0;
        let cx = x + bar / 2.0;
        let colour = match md {
            Mode::Direct => "#9e9e9e",
            Mode::Explicit => "#607d8b",
            Mode::Iptables => "#e57373",
            Mode::Meshlane => "#42a5f5",
            Mode::MeshlaneShortcut => "#1565c0",
            Mode::MeshlaneShortcutApp => "#0d2c6b",
            Mode::Unmeshed => "#bdbdbd",
            Mode::Ip6tables => "#c62828",
            Mode::MeshlaneV6 => "#26a69a",
            Mode::IptablesDns => "#ef9a9a",
            Mode::MeshlaneDns => "#7e57c2",
        };
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            top + plot_h + 18.0,
            xml(md.name())
        );
        match row.and_then(|r| r.stats.get(md)) {
            Some(st) => {
                let y_of = |v: f64| top + plot_h - plot_h * (v / scale);
                let y = y_of(st.median);
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{y:.1}" width="{bar:.1}" height="{:.1}" fill="{colour}"/>"#,
                    top + plot_h - y
                );
                let (y1, y2) = (y_of(st.max), y_of(st.min));
                let _ = writeln!(
                    s,
                    r#"<line x1="{cx:.1}" y1="{y1:.1}" x2="{cx:.1}" y2="{y2:.1}" stroke="black"/><line x1="{:.1}" y1="{y1:.1}" x2="{:.1}" y2="{y1:.1}" stroke="black"/><line x1="{:.1}" y1="{y2:.1}" x2="{:.1}" y2="{y2:.1}" stroke="black"/>"#,
                    cx - 5.0,
                    cx + 5.0,
                    cx - 5.0,
                    cx + 5.0
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                    y1 - 6.0,
                    fmt_num(st.median)
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" fill="#888">n/a</text>"##,
                    top + plot_h - 8.0
                );
            }
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{:.1}" text-anchor="middle" fill="#555">median of {} runs, whiskers: lowest to highest; {}</text>"##,
        w / 2.0,
        h - 16.0,
        res.plan.reps,
        xml(&res.started_utc)
    );
    s.push_str("</svg>\n");
    s
}

/// The smallest of 1, 2, 2.5, 5 times a power of ten at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[derive(Serialize)]
struct Summary<'a> {
    rows: Vec<Row>,
    goals: Vec<Goal>,
    results: &'a Results,
}

/// Writes results.json (raw runs plus the computed rows and goals),
/// results.md and one SVG per shape into `dir`; returns the Markdown.
pub fn write_all(res: &Results, dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let rows = rows(res);
    let goals = goals(res, &rows);
    let json = serde_json::to_string_pretty(&Summary {
        rows,
        goals,
        results: res,
    })?;
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    write("results.json", &json)?;
    let md = markdown(res);
    write("results.md", &md)?;
    for b in Bench::ALL {
        write(&format!("{}.svg", b.key()), &svg(res, b))?;
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_and_spread() {
        let s = Stat::of(vec![3.0, 1.0, 2.0, f64::NAN]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert!((s.spread_pct() - 50.0).abs() < 1e-9);
        assert_eq!(Stat::of(vec![1.0, 2.0]).unwrap().median, 1.5);
        assert!(Stat::of(vec![]).is_none());
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(fmt_num(123_456.0), "123,456");
        assert_eq!(fmt_num(1234.4), "1234");
        assert_eq!(fmt_num(12.345), "12.3");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn interception_cost_sums_medians_of_one_mode() {
        let row = |metric: &'static str, explicit: f64, iptables: f64| Row {
            shape: Bench::Crr.name(),
            metric,
            label: "",
            higher_is_better: false,
            stats: [(Mode::Explicit, explicit), (Mode::Iptables, iptables)]
                .into_iter()
                .map(|(m, v)| (m, Stat::of(vec![v, v + 2.0, v - 2.0]).unwrap()))
                .collect(),
            ratios: BTreeMap::new(),
        };
        let rows = vec![
            row("cpu_us_per_op", 200.0, 230.0),
            row("softirq_us_per_op", 50.0, 70.0),
        ];
        let keys = ["cpu_us_per_op", "softirq_us_per_op"];
        assert_eq!(
            summed(&rows, Bench::Crr, &keys, Mode::Explicit),
            Some(250.0)
        );
        assert_eq!(
            summed(&rows, Bench::Crr, &keys, Mode::Iptables),
            Some(300.0)
        );
        // A mode or a metric the run lacks gives no number, not a partial sum.
        assert_eq!(summed(&rows, Bench::Crr, &keys, Mode::Meshlane), None);
        assert_eq!(
            summed(
                &rows,
                Bench::Crr,
                &["cpu_us_per_op", "p50_us"],
                Mode::Explicit
            ),
            None
        );
        assert_eq!(summed(&rows, Bench::Rr64, &keys, Mode::Explicit), None);
    }

    #[test]
    fn pair_goals_judge_speed_with_the_pairs_floor() {
        let row = |bench: Bench, metric: &'static str, hib: bool, a: Mode, b: Mode, x: f64| {
            let stats: BTreeMap<Mode, Stat> = [(b, 100.0), (a, 100.0 * x)]
                .into_iter()
                .map(|(m, v)| (m, Stat::of(vec![v]).unwrap()))
                .collect();
            Row {
                shape: bench.name(),
                metric,
                label: metric,
                higher_is_better: hib,
                stats,
                ratios: [(ratio_key(a, b), x)].into_iter().collect(),
            }
        };
        let rows = vec![
            // 0.5% fewer calls: within 1% of no agent.
            row(
                Bench::Sockopt,
                "calls_per_s",
                true,
                Mode::Unmeshed,
                Mode::Direct,
                0.995,
            ),
            // 2% more latency: not within 1%.
            row(
                Bench::Rr64,
                "p50_us",
                false,
                Mode::Unmeshed,
                Mode::Direct,
                1.02,
            ),
            // 0.5% fewer queries than iptables: slower, so missed.
            row(
                Bench::Dns,
                "queries_per_s",
                true,
                Mode::MeshlaneDns,
                Mode::IptablesDns,
                0.995,
            ),
            // More connections/s than ip6tables: met (a real run has one
            // row per shape and metric, holding every mode).
            row(
                Bench::Crr,
                "conn_per_s",
                true,
                Mode::MeshlaneV6,
                Mode::Ip6tables,
                1.2,
            ),
        ];
        let goals = pair_goals(&rows);
        let verdict_of = |needle: &str| {
            goals
                .iter()
                .find(|g| g.goal.contains(needle))
                .map(|g| g.verdict)
                .unwrap_or_else(|| panic!("no goal {needle:?} in {goals:?}"))
        };
        assert_eq!(verdict_of("within 1% of no agent: getsockopt loop"), "met");
        assert_eq!(
            verdict_of("within 1% of no agent: request/response 64 B, p50_us"),
            "MISSED"
        );
        assert_eq!(verdict_of("UDP DNS: meshlane not slower than Istio's DNS rules: UDP DNS query/answer, queries_per_s"), "MISSED");
        assert_eq!(
            verdict_of("IPv6: meshlane not slower than ip6tables: connection rate, conn_per_s"),
            "met"
        );
        // A shape the run did not have gives no goal lines (the markdown
        // lists what ran); a mode without numbers gives "not measured".
        assert!(
            !goals.iter().any(|g| g.goal.contains("p99_us")),
            "{goals:?}"
        );
    }

    #[test]
    fn shapes_run_in_their_modes_only() {
        assert!(Bench::Crr.applies(Mode::MeshlaneV6));
        assert!(!Bench::Rr16k.applies(Mode::Ip6tables));
        assert!(Bench::Dns.applies(Mode::MeshlaneDns));
        assert!(!Bench::Dns.applies(Mode::Direct));
        assert!(!Bench::Crr.applies(Mode::IptablesDns));
        assert!(Bench::Sockopt.applies(Mode::Unmeshed));
        assert!(Bench::UdpSend.applies(Mode::Direct));
        assert!(!Bench::Sockopt.applies(Mode::Meshlane));
        for b in Bench::MAIN {
            assert!(b.applies(Mode::Unmeshed) && b.applies(Mode::Iptables));
        }
    }

    #[test]
    fn axis_ceiling() {
        assert_eq!(nice_ceiling(7.3), 10.0);
        assert_eq!(nice_ceiling(23.0), 25.0);
        assert_eq!(nice_ceiling(180.0), 200.0);
        assert_eq!(nice_ceiling(0.42), 0.5);
    }
}

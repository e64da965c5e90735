//! What the agent reports: per pod (name, IPs, netns cookie, state, config
//! errors), written by `meshlane run` to its state directory and shown by
//! `meshlane status` together with the attached programs and map occupancy,
//! and the verdict on all of it ([`Report::problems`]) that sets the exit code.
use std::{net::IpAddr, path::Path};

use anyhow::{Context, Result};
use meshlane_common::{
    counters,
    programs::{self, Target},
};
use serde::{Deserialize, Serialize};

use crate::{
    bpf::{self, Layout, Maps, Occupancy},
    podconfig::MeshConfig,
    pods::Pod,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PodState {
    /// Captured: its entries are in the maps.
    Active,
    /// No istio-proxy container and no sidecar status annotation.
    NotMeshed,
    /// Meshed, but hostNetwork: never captured (it would capture the node).
    HostNetwork,
    /// `sidecar.istio.io/interceptionMode: NONE`.
    InterceptionNone,
    /// No pod IP yet.
    WaitingForIp,
    /// Has an IP no network namespace on this node holds (yet).
    WaitingForNetns,
    /// Not captured because of an error named in `config_errors`.
    Error,
    /// `hostUsers: false`, and the node's ids of its proxy cannot be told
    /// (why: in `config_errors`): captured with nobody as the proxy and its
    /// connections refused, never passed and never looping, until they can.
    ProxyIdUnknown,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodStatus {
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub state: PodState,
    pub netns_cookie: Option<u64>,
    pub netns: Option<String>,
    pub config_errors: Vec<String>,
    pub notes: Vec<String>,
    /// Another network namespace holds an address of this pod (it stays
    /// bound to its own), or this pod's namespace holds another pod's.
    #[serde(default)]
    pub conflicts: Vec<String>,
    /// Inbound capture (sk_lookup) is attached to the pod's namespace.
    #[serde(default)]
    pub inbound_attached: bool,
    /// The proxy listens on the pod's inbound capture port (None: not known,
    /// the pod is not active).
    #[serde(default)]
    pub proxy_listening: Option<bool>,
    /// The pod's configuration as the agent applies it: in the status file
    /// only (`meshlane status` does not read it back).
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub config: Option<MeshConfig>,
}

impl PodStatus {
    pub fn new(pod: &Pod) -> Self {
        Self {
            name: pod.key(),
            ips: pod.ips.clone(),
            state: PodState::NotMeshed,
            netns_cookie: None,
            netns: None,
            config_errors: Vec::new(),
            notes: Vec::new(),
            conflicts: Vec::new(),
            inbound_attached: false,
            proxy_listening: None,
            config: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    /// The pods file (empty for another source).
    pub pods_file: String,
    /// Where pods come from: `file PATH` or `kubernetes (node NAME)`.
    #[serde(default)]
    pub pod_source: String,
    /// Where /healthz and /readyz are served (the bound address), and
    /// /metrics unless `metrics_addr` differs.
    #[serde(default)]
    pub http_addr: Option<String>,
    /// Where /metrics is served (the bound address).
    #[serde(default)]
    pub metrics_addr: Option<String>,
    pub cgroup: String,
    pub bpffs: String,
    pub file_error: Option<String>,
    /// The last error watching the API server, until it answers again (the
    /// last known pods stay in force meanwhile).
    #[serde(default)]
    pub api_error: Option<String>,
    pub map_update_errors: u64,
    /// The pod source has given a complete view (the file parsed, the first
    /// list from the API server applied): before that `pods` is not the
    /// node's. Missing in files of agents before this field (read as
    /// false).
    #[serde(default)]
    pub synced: bool,
    pub pods: Vec<PodStatus>,
}

const FILE: &str = "status.json";

impl AgentStatus {
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join(format!("{FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(FILE))?;
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<Option<Self>> {
        Ok(Self::load_with_document(dir)?.map(|(s, _)| s))
    }

    /// [`AgentStatus::load`], with the file's whole JSON document too
    /// (`describe` reads what `status` does not, such as each pod's
    /// recorded configuration).
    pub fn load_with_document(dir: &Path) -> Result<Option<(Self, serde_json::Value)>> {
        let p = dir.join(FILE);
        match std::fs::read(&p) {
            Ok(b) => {
                let doc: serde_json::Value = serde_json::from_slice(&b)
                    .with_context(|| format!("parsing {}", p.display()))?;
                let st = serde_json::from_value(doc.clone())
                    .with_context(|| format!("parsing {}", p.display()))?;
                Ok(Some((st, doc)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn agent_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// A map fuller than this (in percent of its capacity) is warned about.
pub const NEARLY_FULL_PERCENT: usize = 90;

/// `schema` of `meshlane status -o json|yaml`.
pub const SCHEMA: &str = "meshlane/status/v1";

/// The whole picture for `meshlane status`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// No problems: every program attached, the agent running and in touch
    /// with its pod source, every meshed pod that can be captured captured.
    pub healthy: bool,
    /// What is wrong; any makes `meshlane status` exit 1.
    pub problems: Vec<Finding>,
    /// Worth a look, but interception is in place.
    pub warnings: Vec<Finding>,
    pub bpffs: String,
    pub state_dir: String,
    pub programs: Vec<ProgramReport>,
    pub agent: Option<AgentReport>,
    /// Entries of each map, by occupancy key.
    pub maps: Option<Occupancy>,
    /// Capacity of each map of `maps`, as the kernel created it.
    pub map_capacity: Option<Occupancy>,
    pub counters: Option<std::collections::BTreeMap<&'static str, u64>>,
    /// The node-wide shortcut switch as the kernel sees it.
    pub shortcut: Option<bool>,
    /// Most bytes a shortcut socket may leave unread on its peer.
    pub shortcut_max_queued: Option<u32>,
    /// Per-pod counters, by pod name.
    pub pod_counters:
        std::collections::BTreeMap<String, std::collections::BTreeMap<&'static str, u64>>,
}

/// One thing `meshlane status` found wrong or worth a look.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    /// What it is about: a program's name, a pod (NAMESPACE/NAME), a
    /// directory, the pod source.
    pub subject: String,
    /// In plain words, with what to do where there is something.
    pub message: String,
}

/// Stable names of what `meshlane status` checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// A program is not attached to its hook (problem).
    ProgramNotAttached,
    /// The maps are not pinned: nothing is installed (problem).
    MapsNotPinned,
    /// No agent has written its status to the state directory (problem).
    NoAgentStatus,
    /// The agent that wrote the status is gone (problem).
    AgentNotRunning,
    /// Watching the API server fails; the last known pods stay in force
    /// (problem).
    ApiServerUnreachable,
    /// The pods file does not parse; the last good one stays in force
    /// (problem).
    PodsFileError,
    /// A meshed pod is not captured because of an error (problem).
    PodError,
    /// A captured pod's inbound capture is not attached (problem).
    InboundNotAttached,
    /// A captured pod's proxy does not listen on its inbound capture port:
    /// inbound connections are refused (problem).
    ProxyNotListening,
    /// A pod's annotation was rejected and its default used (warning).
    PodConfigError,
    /// Map writes failed since the agent started (warning).
    MapUpdateErrors,
    /// A map is over 90% full: new entries fail once it is (warning).
    MapNearlyFull,
}

impl Finding {
    fn new(kind: FindingKind, subject: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            subject: subject.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ProgramReport {
    pub name: &'static str,
    pub hook: &'static str,
    pub attached: bool,
}

#[derive(Debug, Serialize)]
pub struct AgentReport {
    pub pid: u32,
    pub running: bool,
    pub pods_file: String,
    pub pod_source: String,
    pub http_addr: Option<String>,
    pub cgroup: String,
    pub file_error: Option<String>,
    pub api_error: Option<String>,
    pub map_update_errors: u64,
    pub pods: Vec<PodStatus>,
}

/// Reads what is pinned under `layout` and what the agent recorded in
/// `state_dir`. An error means the state cannot be read (permissions, a
/// status file that does not parse); something absent is a problem in the
/// report instead.
pub fn report(layout: &Layout, state_dir: &Path) -> Result<Report> {
    for dir in [&layout.root, &layout.links()] {
        if let Err(e) = std::fs::read_dir(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e).with_context(|| format!("reading {}", dir.display()));
            }
        }
    }
    let links = layout.link_names();
    let programs = bpf::program_hooks()
        .map(|(name, hook)| ProgramReport {
            name,
            hook,
            // Cgroup programs have a link of their name; the others are
            // attached per pod or to a map once loaded and pinned.
            attached: links.iter().any(|l| l == name)
                || programs::by_name(name).is_some_and(|p| p.hook.target() != Target::Cgroup)
                    && layout.prog(name).exists(),
        })
        .collect();
    let maps_open = Maps::open(layout).ok();
    let map_capacity = maps_open.as_ref().map(Maps::capacities);
    let (maps, counters) = match &maps_open {
        Some(m) => {
            let c = m.counters().ok().map(|c| {
                counters::NODE
                    .iter()
                    .map(|r| (r.name, c.get(r.index).copied().unwrap_or(0)))
                    .collect()
            });
            (Some(m.occupancy()), c)
        }
        None => (None, None),
    };
    let shortcut = maps_open.as_ref().and_then(|m| m.shortcut().ok());
    let shortcut_max_queued = maps_open
        .as_ref()
        .and_then(|m| m.shortcut_max_queued().ok());
    let loaded = AgentStatus::load(state_dir)?;
    let mut pod_counters = std::collections::BTreeMap::new();
    if let (Some(m), Some(st)) = (&maps_open, &loaded) {
        for p in &st.pods {
            if let Some(cookie) = p.netns_cookie {
                let c = m.pod_counters(cookie);
                pod_counters.insert(
                    p.name.clone(),
                    counters::POD.iter().map(|r| (r.name, c[r.index])).collect(),
                );
            }
        }
    }
    let agent = loaded.map(|mut s| {
        // Whether each captured pod's inbound link is pinned now, not at the
        // agent's last round.
        for p in &mut s.pods {
            if let (PodState::Active, Some(c)) = (p.state, p.netns_cookie) {
                p.inbound_attached = layout.netns_link(c).exists();
            }
        }
        AgentReport {
            running: s.agent_alive(),
            pid: s.pid,
            pods_file: s.pods_file,
            pod_source: s.pod_source,
            http_addr: s.http_addr,
            cgroup: s.cgroup,
            file_error: s.file_error,
            api_error: s.api_error,
            map_update_errors: s.map_update_errors,
            pods: s.pods,
        }
    });
    let mut r = Report {
        schema: SCHEMA,
        healthy: false,
        problems: Vec::new(),
        warnings: Vec::new(),
        bpffs: layout.root.display().to_string(),
        state_dir: state_dir.display().to_string(),
        programs,
        agent,
        maps,
        map_capacity,
        counters,
        shortcut,
        shortcut_max_queued,
        pod_counters,
    };
    (r.problems, r.warnings) = r.findings();
    r.healthy = r.problems.is_empty();
    Ok(r)
}

impl Report {
    /// A warning for each map over [`NEARLY_FULL_PERCENT`] of its capacity.
    fn nearly_full_maps(&self) -> Vec<Finding> {
        let (Some(entries), Some(caps)) = (&self.maps, &self.map_capacity) else {
            return Vec::new();
        };
        meshlane_common::maps::ALL
            .iter()
            .filter_map(|m| {
                let key = m.occupancy?;
                let (n, cap) = (*entries.get(key)?, *caps.get(key)?);
                (cap > 0 && n * 100 > cap * NEARLY_FULL_PERCENT).then(|| {
                    let why = if bpf::capacity::sized_by_pods(m) {
                        "sized by --max-pods and --max-list-entries: is either below what this \
                         node runs?"
                    } else {
                        "a fixed capacity"
                    };
                    Finding::new(
                        FindingKind::MapNearlyFull,
                        m.name,
                        format!(
                            "map {} is {}% full ({n} of {cap} entries; {why}): new entries fail \
                             once it is full",
                            m.name,
                            n * 100 / cap
                        ),
                    )
                })
            })
            .collect()
    }

    /// The problems and warnings in what was read.
    fn findings(&self) -> (Vec<Finding>, Vec<Finding>) {
        use FindingKind as K;
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        for p in self.programs.iter().filter(|p| !p.attached) {
            problems.push(Finding::new(
                K::ProgramNotAttached,
                p.name,
                format!("program {} is NOT attached to {}", p.name, p.hook),
            ));
        }
        warnings.extend(self.nearly_full_maps());
        if self.maps.is_none() {
            problems.push(Finding::new(
                K::MapsNotPinned,
                &self.bpffs,
                format!(
                    "no meshlane maps under {} (is the agent installed, and is --bpffs its?)",
                    self.bpffs
                ),
            ));
        }
        let Some(a) = &self.agent else {
            problems.push(Finding::new(
                K::NoAgentStatus,
                &self.state_dir,
                format!(
                    "no agent status in {}: no agent has run there (is --state-dir the agent's?)",
                    self.state_dir
                ),
            ));
            return (problems, warnings);
        };
        if !a.running {
            problems.push(Finding::new(
                K::AgentNotRunning,
                a.pid.to_string(),
                format!(
                    "the agent (pid {}) is not running: interception stays as it left it, \
                     but pod changes are not applied",
                    a.pid
                ),
            ));
        }
        if let Some(e) = &a.api_error {
            problems.push(Finding::new(
                K::ApiServerUnreachable,
                &a.pod_source,
                // The agent clears the error once the API server answers
                // again (its next retry, at most 16 s apart).
                format!("API server unreachable (the last known pods stay in force): {e}"),
            ));
        }
        if let Some(e) = &a.file_error {
            problems.push(Finding::new(
                K::PodsFileError,
                &a.pods_file,
                format!("pods file error (the last good file stays in force): {e}"),
            ));
        }
        for p in &a.pods {
            match p.state {
                PodState::Error => problems.push(Finding::new(
                    K::PodError,
                    &p.name,
                    format!(
                        "pod {} is in error, NOT captured: {}",
                        p.name,
                        p.config_errors.join("; ")
                    ),
                )),
                PodState::Active if !p.inbound_attached => problems.push(Finding::new(
                    K::InboundNotAttached,
                    &p.name,
                    format!("pod {}: inbound capture is NOT attached", p.name),
                )),
                PodState::Active if p.proxy_listening == Some(false) => {
                    problems.push(Finding::new(
                        K::ProxyNotListening,
                        &p.name,
                        format!(
                            "pod {}: its proxy is NOT listening on the inbound capture port \
                             yet, so inbound connections are refused",
                            p.name
                        ),
                    ));
                }
                _ => {}
            }
            if p.state != PodState::Error {
                for e in &p.config_errors {
                    warnings.push(Finding::new(
                        K::PodConfigError,
                        &p.name,
                        format!("pod {}: {e}", p.name),
                    ));
                }
            }
        }
        if a.map_update_errors > 0 {
            warnings.push(Finding::new(
                K::MapUpdateErrors,
                a.pid.to_string(),
                format!(
                    "{} map updates failed since the agent started (its log says which)",
                    a.map_update_errors
                ),
            ));
        }
        (problems, warnings)
    }
}

pub fn print(r: &Report) {
    println!("bpffs: {}", r.bpffs);
    println!("programs:");
    for p in &r.programs {
        println!(
            "  {:<20} {:<22} {}",
            p.name,
            p.hook,
            if p.attached {
                "attached"
            } else {
                "NOT attached"
            }
        );
    }
    match &r.agent {
        None => println!("agent: no status recorded"),
        Some(a) => {
            println!(
                "agent: pid {} ({}), cgroup {}, pods from {}",
                a.pid,
                if a.running { "running" } else { "not running" },
                a.cgroup,
                if a.pod_source.is_empty() {
                    &a.pods_file
                } else {
                    &a.pod_source
                }
            );
            if let Some(h) = &a.http_addr {
                println!("  health and metrics: http://{h}/metrics");
            }
            if let Some(e) = &a.file_error {
                println!("  pods file error: {e}");
            }
            if let Some(e) = &a.api_error {
                println!("  API server: {e} (last known pods in force)");
            }
            println!("pods:");
            println!(
                "  {:<32} {:<18} {:<20} {:<20}",
                "NAME", "IPS", "STATE", "NETNS COOKIE"
            );
            for p in &a.pods {
                let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
                let state = serde_json::to_value(p.state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                println!(
                    "  {:<32} {:<18} {:<20} {:<20}",
                    p.name,
                    ips.join(","),
                    state,
                    p.netns_cookie
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into())
                );
                if p.state == PodState::Active {
                    println!(
                        "      inbound capture {}, proxy {}",
                        if p.inbound_attached {
                            "attached"
                        } else {
                            "NOT attached"
                        },
                        match p.proxy_listening {
                            Some(true) => "listening",
                            Some(false) => "NOT listening yet",
                            None => "unknown",
                        }
                    );
                }
                for e in &p.config_errors {
                    println!("      error: {e}");
                }
                for n in &p.notes {
                    println!("      note: {n}");
                }
                for c in &p.conflicts {
                    println!("      {c}");
                }
            }
        }
    }
    if let Some(m) = &r.maps {
        let caps = r.map_capacity.as_ref();
        let counts: Vec<String> = meshlane_common::maps::ALL
            .iter()
            .filter_map(|d| {
                let key = d.occupancy?;
                Some((d.name, m.get(key)?, caps.and_then(|c| c.get(key))))
            })
            .enumerate()
            .map(|(i, (name, n, cap))| {
                let of = cap.map(|c| format!("/{c}")).unwrap_or_default();
                let unit = if i == 0 { " entries" } else { "" };
                format!("{name} {n}{of}{unit}")
            })
            .collect();
        println!("maps (entries/capacity): {}", counts.join(", "));
    }
    if let Some(on) = r.shortcut {
        println!(
            "shortcut: {}{}",
            if on { "on" } else { "off" },
            r.shortcut_max_queued
                .map(|b| format!(" (at most {b} bytes unread on a peer)"))
                .unwrap_or_default()
        );
    }
    if let Some(c) = &r.counters {
        let line: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("counters: {}", line.join(" "));
    }
    if r.healthy {
        println!("health: OK");
    } else {
        println!("health: UNHEALTHY");
    }
    for p in &r.problems {
        println!("  problem: {}", p.message);
    }
    for w in &r.warnings {
        println!("  warning: {}", w.message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, state: PodState) -> PodStatus {
        PodStatus {
            name: name.into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
            state,
            netns_cookie: (state == PodState::Active).then_some(7),
            netns: None,
            config_errors: Vec::new(),
            notes: Vec::new(),
            conflicts: Vec::new(),
            inbound_attached: state == PodState::Active,
            proxy_listening: (state == PodState::Active).then_some(true),
            config: None,
        }
    }

    /// Everything in place: one program, the maps, a running agent with a
    /// captured pod and a plain one.
    fn healthy() -> Report {
        Report {
            schema: SCHEMA,
            healthy: false,
            problems: Vec::new(),
            warnings: Vec::new(),
            bpffs: "/sys/fs/bpf/meshlane".into(),
            state_dir: "/run/meshlane".into(),
            programs: vec![ProgramReport {
                name: "connect4",
                hook: "cgroup/connect4",
                attached: true,
            }],
            agent: Some(AgentReport {
                pid: 1,
                running: true,
                pods_file: String::new(),
                pod_source: "kubernetes (node n1)".into(),
                http_addr: None,
                cgroup: "/sys/fs/cgroup".into(),
                file_error: None,
                api_error: None,
                map_update_errors: 0,
                pods: vec![
                    pod("ns/a", PodState::Active),
                    pod("ns/plain", PodState::NotMeshed),
                    pod("ns/new", PodState::WaitingForNetns),
                ],
            }),
            maps: Some(Occupancy::new()),
            map_capacity: Some(Occupancy::new()),
            counters: None,
            shortcut: None,
            shortcut_max_queued: None,
            pod_counters: std::collections::BTreeMap::new(),
        }
    }

    fn kinds(f: &[Finding]) -> Vec<(FindingKind, &str)> {
        f.iter().map(|f| (f.kind, f.subject.as_str())).collect()
    }

    fn agent(r: &mut Report) -> &mut AgentReport {
        r.agent.as_mut().unwrap()
    }

    #[test]
    fn healthy_has_no_findings() {
        assert_eq!(healthy().findings(), (vec![], vec![]));
    }

    #[test]
    fn each_problem_is_named() {
        use FindingKind as K;
        let mut r = healthy();
        r.programs[0].attached = false;
        r.maps = None;
        agent(&mut r).running = false;
        agent(&mut r).api_error = Some("connection refused".into());
        agent(&mut r).pods_file = "/p.yaml".into();
        agent(&mut r).file_error = Some("line 3".into());
        let mut broken = pod("ns/broken", PodState::Error);
        broken
            .config_errors
            .push("map update failed: ENOENT".into());
        let mut deaf = pod("ns/deaf", PodState::Active);
        deaf.proxy_listening = Some(false);
        let mut unlinked = pod("ns/unlinked", PodState::Active);
        unlinked.inbound_attached = false;
        agent(&mut r).pods.extend([broken, deaf, unlinked]);
        let (problems, warnings) = r.findings();
        assert_eq!(
            kinds(&problems),
            vec![
                (K::ProgramNotAttached, "connect4"),
                (K::MapsNotPinned, "/sys/fs/bpf/meshlane"),
                (K::AgentNotRunning, "1"),
                (K::ApiServerUnreachable, "kubernetes (node n1)"),
                (K::PodsFileError, "/p.yaml"),
                (K::PodError, "ns/broken"),
                (K::ProxyNotListening, "ns/deaf"),
                (K::InboundNotAttached, "ns/unlinked"),
            ]
        );
        assert!(problems[5].message.contains("ENOENT"), "{problems:?}");
        // The error's reason is in the problem, not repeated as a warning.
        assert_eq!(warnings, vec![]);
    }

    #[test]
    fn no_agent_status_is_a_problem() {
        let mut r = healthy();
        r.agent = None;
        let (problems, _) = r.findings();
        assert_eq!(
            kinds(&problems),
            vec![(FindingKind::NoAgentStatus, "/run/meshlane")]
        );
    }

    #[test]
    fn rejected_annotations_and_failed_writes_are_warnings() {
        let mut r = healthy();
        agent(&mut r).pods[0]
            .config_errors
            .push("bad excludeOutboundPorts".into());
        agent(&mut r).map_update_errors = 2;
        let (problems, warnings) = r.findings();
        assert_eq!(problems, vec![]);
        assert_eq!(
            kinds(&warnings),
            vec![
                (FindingKind::PodConfigError, "ns/a"),
                (FindingKind::MapUpdateErrors, "1")
            ]
        );
    }

    #[test]
    fn a_map_over_ninety_percent_full_is_a_warning_naming_it() {
        let occ = |v: &[(&str, usize)]| -> Occupancy {
            v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        let mut r = healthy();
        r.maps = Some(occ(&[("pods", 198), ("ports", 9_001), ("in_flight", 0)]));
        r.map_capacity = Some(occ(&[("pods", 220), ("ports", 10_000), ("in_flight", 0)]));
        let (problems, warnings) = r.findings();
        assert_eq!(problems, vec![]);
        assert_eq!(
            kinds(&warnings),
            vec![(FindingKind::MapNearlyFull, "PORTS")]
        );
        let m = &warnings[0].message;
        assert!(
            m.contains("map PORTS is 90% full (9001 of 10000 entries") && m.contains("--max-pods"),
            "{m}"
        );
        // At 90% exactly, or without capacities, nothing is said.
        r.maps = Some(occ(&[("pods", 198), ("ports", 9_000)]));
        assert_eq!(r.findings().1, vec![]);
        r.maps = Some(occ(&[("ports", 10_000)]));
        r.map_capacity = None;
        assert_eq!(r.findings().1, vec![]);
    }
}

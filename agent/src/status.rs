//! What the agent reports: per pod (name, IPs, netns cookie, state, config
//! errors), written by `meshlane run` to its state directory and shown by
//! `meshlane status` together with the attached programs and map occupancy.
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
    /// Inbound capture (sk_lookup) is attached to the pod's namespace.
    #[serde(default)]
    pub inbound_attached: bool,
    /// The proxy listens on the pod's inbound capture port (None: not known,
    /// the pod is not active).
    #[serde(default)]
    pub proxy_listening: Option<bool>,
    #[serde(skip_deserializing)]
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
    /// Where /healthz, /readyz and /metrics are served (the bound address).
    #[serde(default)]
    pub http_addr: Option<String>,
    pub cgroup: String,
    pub bpffs: String,
    pub file_error: Option<String>,
    /// The last error watching the API server, until the next pod event
    /// (the last known pods stay in force meanwhile).
    #[serde(default)]
    pub api_error: Option<String>,
    pub map_update_errors: u64,
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
        let p = dir.join(FILE);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn agent_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// The whole picture for `meshlane status`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub bpffs: String,
    pub programs: Vec<ProgramReport>,
    pub agent: Option<AgentReport>,
    pub maps: Option<Occupancy>,
    pub counters: Option<std::collections::BTreeMap<&'static str, u64>>,
    /// The node-wide shortcut switch as the kernel sees it.
    pub shortcut: Option<bool>,
    /// Most bytes a shortcut socket may leave unread on its peer.
    pub shortcut_max_queued: Option<u32>,
    /// Per-pod counters, by pod name.
    pub pod_counters:
        std::collections::BTreeMap<String, std::collections::BTreeMap<&'static str, u64>>,
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

pub fn report(layout: &Layout, state_dir: &Path) -> Result<Report> {
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
    let agent = loaded.map(|s| AgentReport {
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
    });
    Ok(Report {
        bpffs: layout.root.display().to_string(),
        programs,
        agent,
        maps,
        counters,
        shortcut,
        shortcut_max_queued,
        pod_counters,
    })
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
            }
        }
    }
    if let Some(m) = &r.maps {
        let counts: Vec<String> = meshlane_common::maps::ALL
            .iter()
            .filter_map(|d| Some((d.name, m.get(d.occupancy?)?)))
            .enumerate()
            .map(|(i, (name, n))| {
                let unit = if i == 0 { " entries" } else { "" };
                format!("{name} {n}{unit}")
            })
            .collect();
        println!("maps: {}", counts.join(", "));
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
}

//! `meshlane run`: keeps the kernel's maps true to the node's pods.
//!
//! Each round: take the pods the source (a pods file or the API server, see
//! `source.rs`) last reported, find each meshed pod's network namespace by
//! its IP, and write the difference between what the maps hold and what they
//! should hold. A new snapshot from the source starts a round at once. A
//! pod's problems (bad annotation, no namespace yet, a failed map write) are
//! reported for that pod and never touch the others.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::lpm_trie::Key;
use meshlane_common::{CidrKeyData, ListenerKey, PortKey};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    bpf::{self, Layout, Maps},
    http, listeners, netns,
    podconfig::{MapEntries, MeshConfig, Mode, NodeDefaults},
    pods::Pod,
    source::{Snapshot, Source},
    status::{AgentStatus, PodState, PodStatus},
};

/// Everything `meshlane run` was told, parsed. `--print-options` prints it as
/// JSON with one key per flag (the flag's name in snake case), so a test can
/// check that a deployment's settings reach the agent.
#[derive(serde::Serialize)]
pub struct Options {
    /// Printed by main as `pods`, `node_name`, `kubeconfig` (the flags).
    #[serde(skip)]
    pub source: Source,
    pub cgroup: PathBuf,
    #[serde(rename = "bpffs")]
    pub layout: Layout,
    pub state_dir: PathBuf,
    pub ebpf_object: Option<PathBuf>,
    /// The node-wide same-node shortcut switch (`--shortcut`).
    pub shortcut: bool,
    /// `--shortcut-max-queued` (None: the default, 4 MiB).
    pub shortcut_max_queued: Option<u32>,
    /// Proxy identity and capture ports for pods that do not say otherwise.
    #[serde(flatten)]
    pub defaults: NodeDefaults,
}

/// How often the loop looks whether a netns retry or recheck is due.
const TICK: Duration = Duration::from_millis(200);
/// How often pods without a namespace yet are looked for again.
const RETRY_WAITING: Duration = Duration::from_secs(1);
/// How often namespaces of active pods are checked to still be there.
const RECHECK: Duration = Duration::from_secs(5);

struct Applied {
    cookie: u64,
    netns: PathBuf,
    ips: Vec<Ipv4Addr>,
    entries: MapEntries,
}

pub struct Agent {
    opts: Options,
    maps: Maps,
    /// The source's last good pods.
    pods: Vec<Pod>,
    source_error: Option<String>,
    source_errors: u64,
    /// The source has delivered a complete pod list.
    synced: bool,
    health: http::Shared,
    http_addr: Option<std::net::SocketAddr>,
    applied: BTreeMap<String, Applied>,
    status: Vec<PodStatus>,
    map_errors: u64,
    /// Entries left by an earlier agent for pods that are gone were swept
    /// (once, after the first complete pod list).
    swept: bool,
}

impl Agent {
    pub fn start(opts: Options) -> Result<Self> {
        crate::probe::require(
            &bpf::object_bytes(opts.ebpf_object.as_deref())?,
            &opts.cgroup,
        )?;
        bpf::ensure_bpffs(&opts.layout.root)?;
        let object = bpf::object_bytes(opts.ebpf_object.as_deref())?;
        let adopted = opts.layout.has_links()
            && match bpf::adopt(&object, &opts.layout) {
                Ok(()) => {
                    info!(bpffs = %opts.layout.root.display(), "adopted the interception an earlier agent pinned: programs replaced in place, maps kept, no gap");
                    true
                }
                Err(e) => {
                    warn!(bpffs = %opts.layout.root.display(), "cannot adopt the pinned interception ({e:#}); replacing it");
                    bpf::uninstall(&opts.layout)?;
                    bpf::ensure_bpffs(&opts.layout.root)?;
                    false
                }
            };
        if !adopted {
            if let Err(e) = bpf::install(&object, &opts.cgroup, &opts.layout) {
                // Leave nothing half-attached behind.
                let _ = bpf::uninstall(&opts.layout);
                return Err(e);
            }
        }
        info!(cgroup = %opts.cgroup.display(), bpffs = %opts.layout.root.display(), "programs attached");
        let mut maps = Maps::open(&opts.layout)?;
        let max_queued = match opts.shortcut_max_queued {
            Some(b) => b,
            None => bpf::default_shortcut_max_queued(),
        };
        maps.set_shortcut_max_queued(max_queued)?;
        match maps.set_shortcut(opts.shortcut) {
            Ok(()) => info!(
                shortcut = opts.shortcut,
                max_queued, "same-node shortcut for new connections"
            ),
            // Interception does not depend on the shortcut: run without it.
            Err(e) => {
                error!("--shortcut on refused, running with the shortcut off: {e:#}");
                maps.set_shortcut(false)?;
            }
        }
        std::fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("creating state dir {}", opts.state_dir.display()))?;
        Ok(Self {
            opts,
            maps,
            pods: Vec::new(),
            source_error: None,
            source_errors: 0,
            synced: false,
            health: http::Shared::default(),
            http_addr: None,
            applied: BTreeMap::new(),
            status: Vec::new(),
            map_errors: 0,
            swept: false,
        })
    }

    /// Runs until SIGTERM or SIGINT, reconciling on each snapshot from
    /// `pods`. Interception stays in place after exit.
    pub async fn run(
        mut self,
        mut pods: watch::Receiver<Snapshot>,
        server: http::Server,
    ) -> Result<()> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        self.http_addr = Some(server.addr);
        self.health.lock().expect("not poisoned").attached = true;
        server.start(self.health.clone(), self.opts.layout.clone());
        let mut tick = tokio::time::interval(TICK);
        let mut last_full = Instant::now() - RECHECK;
        loop {
            let mut changed = false;
            tokio::select! {
                r = pods.changed() => {
                    r.context("the pod source stopped")?;
                    changed = true;
                }
                _ = tick.tick() => {}
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
            if changed {
                let snap = pods.borrow_and_update().clone();
                self.pods = snap.pods;
                self.synced = snap.synced;
                self.source_error = snap.error;
                self.source_errors = snap.errors;
            }
            let waiting = self
                .status
                .iter()
                .any(|p| p.state == PodState::WaitingForNetns);
            let due = last_full.elapsed() >= if waiting { RETRY_WAITING } else { RECHECK };
            if changed || due {
                last_full = Instant::now();
                if let Err(e) = self.reconcile() {
                    error!("reconcile failed: {e:#}");
                }
                self.write_status();
            }
            self.publish();
        }
        info!("stopping; interception stays in place (`meshlane cleanup` removes it)");
        Ok(())
    }

    /// What /healthz, /readyz and /metrics show.
    fn publish(&self) {
        let mut h = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        h.heartbeat = Instant::now();
        h.synced = self.synced;
        h.source_error.clone_from(&self.source_error);
        h.source_errors = self.source_errors;
        h.map_update_errors = self.map_errors;
        h.pods.clone_from(&self.status);
    }

    fn reconcile(&mut self) -> Result<()> {
        let mut status = Vec::new();
        let mut want: BTreeMap<String, Applied> = BTreeMap::new();

        // Which pods need a namespace, and which namespaces exist.
        let needs_netns = self
            .pods
            .iter()
            .any(|p| p.meshed && !p.host_network && !p.ips.is_empty());
        let spaces = if needs_netns {
            netns::inspect(netns::candidates().into_iter().collect())?
        } else {
            Vec::new()
        };
        let mut by_ip: BTreeMap<Ipv4Addr, Vec<&netns::Netns>> = BTreeMap::new();
        for ns in &spaces {
            for a in &ns.addrs {
                by_ip.entry(*a).or_default().push(ns);
            }
        }

        for pod in &self.pods {
            let mut st = PodStatus::new(pod);
            if !pod.meshed {
                st.state = PodState::NotMeshed;
                status.push(st);
                continue;
            }
            let cfg = MeshConfig::from_pod_with(pod, &self.opts.defaults);
            for e in &cfg.errors {
                warn!(pod = %pod.key(), "{e}");
            }
            st.config_errors = cfg.errors.iter().map(ToString::to_string).collect();
            st.notes = cfg.unsupported.clone();
            st.config = Some(cfg.clone());
            if pod.host_network {
                st.state = PodState::HostNetwork;
            } else if cfg.mode == Mode::None {
                st.state = PodState::InterceptionNone;
            } else if pod.ips.is_empty() {
                st.state = PodState::WaitingForIp;
            } else {
                let found: BTreeSet<(u64, PathBuf)> = pod
                    .ips
                    .iter()
                    .filter_map(|ip| by_ip.get(ip))
                    .flatten()
                    .map(|ns| (ns.cookie, ns.path.clone()))
                    .collect();
                match found.len() {
                    0 => st.state = PodState::WaitingForNetns,
                    1 => {
                        let (cookie, path) = found.into_iter().next().expect("one");
                        st.netns_cookie = Some(cookie);
                        st.netns = Some(path.display().to_string());
                        st.state = PodState::Active;
                        if want.values().any(|a| a.cookie == cookie) {
                            st.state = PodState::Error;
                            st.config_errors.push(format!(
                                "network namespace {} is claimed by another pod",
                                path.display()
                            ));
                        } else {
                            want.insert(
                                pod.key(),
                                Applied {
                                    cookie,
                                    netns: path.clone(),
                                    ips: pod.ips.clone(),
                                    entries: cfg.entries(cookie, &pod.ips),
                                },
                            );
                        }
                    }
                    _ => {
                        st.state = PodState::Error;
                        st.config_errors.push(format!(
                            "pod IPs {:?} are in {} network namespaces ({}); not capturing until that is resolved",
                            pod.ips,
                            found.len(),
                            found.iter().map(|(_, p)| p.display().to_string()).collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
            }
            status.push(st);
        }

        // Remove what is no longer wanted, then write what is.
        let old = std::mem::take(&mut self.applied);
        for (key, a) in &old {
            let keep = want.get(key);
            self.remove_stale(a, keep);
            if keep.is_none() {
                info!(pod = %key, cookie = a.cookie, "pod entries removed");
            }
        }
        for (key, a) in want {
            let unchanged = old
                .get(&key)
                .is_some_and(|o| o.cookie == a.cookie && o.entries == a.entries && o.ips == a.ips)
                && self.opts.layout.netns_link(a.cookie).exists();
            if unchanged {
                self.applied.insert(key, a);
                continue;
            }
            match self.write(&a) {
                Ok(()) => {
                    info!(pod = %key, cookie = a.cookie, "pod entries written");
                    self.applied.insert(key, a);
                }
                Err(e) => {
                    self.map_errors += 1;
                    error!(pod = %key, "writing maps: {e:#}");
                    if let Some(st) = status.iter_mut().find(|s| s.name == key) {
                        st.state = PodState::Error;
                        st.config_errors.push(format!("map update failed: {e:#}"));
                    }
                    // Whatever part was written is removed so the kernel
                    // never sees half a pod.
                    self.remove_stale(&a, None);
                }
            }
        }
        if !self.swept && self.synced {
            self.sweep();
            self.swept = true;
        }
        self.check_listeners(&mut status);
        for st in &status {
            let was = self.status.iter().find(|o| o.name == st.name);
            if st.state == PodState::WaitingForNetns
                && was.is_none_or(|o| o.state != PodState::WaitingForNetns)
            {
                info!(pod = %st.name, ips = ?st.ips, "no network namespace on this node holds the pod's IP yet; looking again every {RETRY_WAITING:?}");
            }
        }
        self.status = status;
        Ok(())
    }

    /// Removes whatever the maps hold that no current pod wants: what an
    /// earlier agent wrote for pods deleted or changed while no agent ran.
    fn sweep(&mut self) {
        let cookies: BTreeSet<u64> = self.applied.values().map(|a| a.cookie).collect();
        let ports: BTreeSet<PortKey> = self
            .applied
            .values()
            .flat_map(|a| a.entries.ports.iter().copied())
            .collect();
        let cidrs: BTreeSet<(u32, CidrKeyData)> = self
            .applied
            .values()
            .flat_map(|a| a.entries.cidrs.iter().copied())
            .collect();
        let ips: BTreeSet<(u32, u64)> = self
            .applied
            .values()
            .flat_map(|a| a.ips.iter().map(|ip| (ip.to_bits(), a.cookie)))
            .collect();
        let mut removed = 0usize;
        for c in self.maps.pods.keys().flatten().collect::<Vec<_>>() {
            if !cookies.contains(&c) {
                let _ = self.maps.pods.remove(&c);
                let _ = self.maps.pod_stats.remove(&c);
                let _ = bpf::detach_netns(&self.opts.layout, c);
                removed += 1;
            }
        }
        for k in self.maps.ports.keys().flatten().collect::<Vec<_>>() {
            if !ports.contains(&k) {
                let _ = self.maps.ports.remove(&k);
                removed += 1;
            }
        }
        for k in self.maps.cidrs.keys().flatten().collect::<Vec<_>>() {
            if !cidrs.contains(&(k.prefix_len(), k.data())) {
                let _ = self.maps.cidrs.remove(&k);
                removed += 1;
            }
        }
        let by_ip: Vec<(u32, u64)> = self.maps.pod_by_ip.iter().flatten().collect();
        for (ip, c) in by_ip {
            if !ips.contains(&(ip, c)) {
                let _ = self.maps.pod_by_ip.remove(&ip);
                removed += 1;
            }
        }
        if removed > 0 {
            info!(removed, "swept map entries of pods that are gone");
        }
    }

    /// Reports whether each active pod's proxy listens, and registers
    /// listeners that predate the programs (sockops only sees new ones).
    fn check_listeners(&mut self, status: &mut [PodStatus]) {
        let registered: BTreeSet<ListenerKey> = self.maps.listeners.keys().flatten().collect();
        for (key, a) in &self.applied {
            let p = &a.entries.pod;
            let want = [p.inbound_capture_port, p.outbound_capture_port];
            let missing: Vec<u16> = want
                .into_iter()
                .filter(|port| !registered.contains(&ListenerKey::new(a.cookie, *port)))
                .collect();
            let mut found = Vec::new();
            if !missing.is_empty() {
                match listeners::register_existing(&mut self.maps, a.cookie, &a.netns, &missing) {
                    Ok(ports) => {
                        for port in &ports {
                            info!(pod = %key, port, "registered a proxy listener that predates the programs");
                        }
                        found = ports;
                    }
                    Err(e) => warn!(pod = %key, "looking for the proxy's listeners: {e:#}"),
                }
            }
            if let Some(st) = status.iter_mut().find(|s| &s.name == key) {
                st.inbound_attached = self.opts.layout.netns_link(a.cookie).exists();
                st.proxy_listening = Some(
                    !missing.contains(&p.inbound_capture_port)
                        || found.contains(&p.inbound_capture_port),
                );
            }
        }
    }

    /// Removes the entries of `old` that `new` (for `new_cookie`) does not
    /// have. The pod entry goes first so the kernel stops using the lists.
    fn remove_stale(&mut self, old: &Applied, new: Option<&Applied>) {
        let new_cookie = new.map(|n| n.cookie);
        let new_ips = new.map(|n| n.ips.as_slice()).unwrap_or_default();
        let new = new.map(|n| &n.entries);
        if new_cookie != Some(old.cookie) {
            let _ = self.maps.pods.remove(&old.cookie);
            if let Err(e) = bpf::detach_netns(&self.opts.layout, old.cookie) {
                warn!(cookie = old.cookie, "{e:#}");
            }
            let _ = self.maps.pod_stats.remove(&old.cookie);
        }
        for ip in &old.ips {
            if new_cookie != Some(old.cookie) || !new_ips.contains(ip) {
                let _ = self.maps.pod_by_ip.remove(&ip.to_bits());
            }
        }
        let keep_ports: BTreeSet<PortKey> = new
            .map(|n| n.ports.iter().copied().collect())
            .unwrap_or_default();
        for k in &old.entries.ports {
            if !keep_ports.contains(k) {
                let _ = self.maps.ports.remove(k);
            }
        }
        let keep_cidrs: BTreeSet<(u32, CidrKeyData)> = new
            .map(|n| n.cidrs.iter().copied().collect())
            .unwrap_or_default();
        for (len, data) in &old.entries.cidrs {
            if !keep_cidrs.contains(&(*len, *data)) {
                let _ = self.maps.cidrs.remove(&Key::new(*len, *data));
            }
        }
    }

    /// Lists first, pod entry last: the kernel only acts on a pod once all of
    /// its lists are there.
    fn write(&mut self, a: &Applied) -> Result<()> {
        for k in &a.entries.ports {
            self.maps
                .ports
                .insert(k, 1, 0)
                .with_context(|| format!("PORTS insert {k:?}"))?;
        }
        for (len, data) in &a.entries.cidrs {
            self.maps
                .cidrs
                .insert(&Key::new(*len, *data), 1, 0)
                .context("CIDRS insert")?;
        }
        for ip in &a.ips {
            self.maps
                .pod_by_ip
                .insert(ip.to_bits(), a.cookie, 0)
                .with_context(|| format!("POD_BY_IP insert {ip}"))?;
        }
        self.maps
            .add_pod_stats(a.cookie)
            .context("POD_STATS insert")?;
        self.maps
            .pods
            .insert(a.cookie, a.entries.pod, 0)
            .context("PODS insert")?;
        bpf::attach_netns(&self.opts.layout, a.cookie, &a.netns)?;
        Ok(())
    }

    fn write_status(&self) {
        let st = AgentStatus {
            pid: std::process::id(),
            pods_file: self
                .opts
                .source
                .file()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            pod_source: self.opts.source.describe(),
            http_addr: self.http_addr.map(|a| a.to_string()),
            cgroup: self.opts.cgroup.display().to_string(),
            bpffs: self.opts.layout.root.display().to_string(),
            file_error: self.opts.source.file().and(self.source_error.clone()),
            api_error: match self.opts.source {
                Source::Kubernetes(_) => self.source_error.clone(),
                Source::File(_) => None,
            },
            map_update_errors: self.map_errors,
            pods: self.status.clone(),
        };
        if let Err(e) = st.save(&self.opts.state_dir) {
            warn!("writing status to {}: {e:#}", self.opts.state_dir.display());
        }
    }
}

/// The cgroup-v2 mount point from /proc/mounts (`/sys/fs/cgroup` on unified
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .context("no cgroup2 filesystem in /proc/mounts (meshlane needs cgroup v2)")
}

pub fn default_state_dir() -> &'static Path {
    Path::new("/run/meshlane")
}

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
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use meshlane_common::ListenerKey;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    bpf::{self, Layout, Maps},
    cni::{self, proto::Reply, Registry},
    health, http, listeners, netns,
    podconfig::NodeDefaults,
    pods::Pod,
    reconcile::{self, Plan, Wanted},
    sampler::Sampler,
    source::{Snapshot, Source},
    status::{AgentStatus, PodState, PodStatus},
    userns,
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
    /// `--max-pods` and the capacities of the per-pod maps derived from it
    /// and `--max-list-entries`.
    #[serde(flatten)]
    pub capacities: bpf::Capacities,
    /// Where /metrics is served and how often it reads the kernel's maps.
    #[serde(flatten)]
    pub metrics: http::MetricsOptions,
}

/// How often the loop looks whether a netns retry or recheck is due.
const TICK: Duration = Duration::from_millis(200);
/// How often pods without a namespace yet are looked for again.
const RETRY_WAITING: Duration = Duration::from_secs(1);
/// How often namespaces of active pods are checked to still be there.
const RECHECK: Duration = Duration::from_secs(5);

pub struct Agent {
    opts: Options,
    maps: Maps,
    /// The source's last good pods.
    pods: Vec<Pod>,
    source_error: Option<String>,
    source_errors: u64,
    /// The source has delivered a complete pod list.
    synced: bool,
    health: health::Shared,
    http_addr: Option<std::net::SocketAddr>,
    metrics_addr: Option<std::net::SocketAddr>,
    applied: BTreeMap<String, Wanted>,
    status: Vec<PodStatus>,
    map_errors: u64,
    /// Entries left by an earlier agent for pods that are gone were swept
    /// (once, after the first complete pod list).
    swept: bool,
    /// An upgrade across a map layout change, finished once the first
    /// complete pod list is in the new maps.
    migration: Option<bpf::Migration>,
    /// Pods the runtime registered through `meshlane-cni`.
    cni: Registry,
}

impl Agent {
    pub fn start(opts: Options) -> Result<Self> {
        crate::probe::require(
            &bpf::object_bytes(opts.ebpf_object.as_deref())?,
            &opts.cgroup,
        )?;
        bpf::ensure_bpffs(&opts.layout.root)?;
        let object = bpf::object_bytes(opts.ebpf_object.as_deref())?;
        // An earlier agent's interception is taken over, never removed: on
        // error its programs keep running and this agent exits.
        let migration = if opts.layout.has_links() {
            let m = bpf::adopt(&object, &opts.layout, &opts.cgroup, &opts.capacities)
                .context("taking over the pinned interception (left as it was)")?;
            let at = opts.layout.root.display();
            match &m {
                None => {
                    info!(bpffs = %at, "adopted the interception an earlier agent pinned: programs replaced in place, maps kept, no gap")
                }
                Some(m) => {
                    info!(bpffs = %at, changed = %m.describe(), "the pinned maps have another layout: migrating; the pinned programs keep running until the first pod list is in the new maps")
                }
            }
            m
        } else {
            if let Err(e) = bpf::install(&object, &opts.cgroup, &opts.layout, &opts.capacities) {
                // Leave nothing half-attached behind.
                let _ = bpf::uninstall(&opts.layout);
                return Err(e);
            }
            None
        };
        info!(cgroup = %opts.cgroup.display(), bpffs = %opts.layout.root.display(), "programs attached");
        let mut maps = Maps::open(
            migration
                .as_ref()
                .map_or(&opts.layout, bpf::Migration::staged),
        )?;
        maps.set_node_defaults(
            opts.defaults.outbound_capture_port,
            opts.defaults.inbound_capture_port,
            opts.defaults.proxy_uid,
        )?;
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
            maps,
            pods: Vec::new(),
            source_error: None,
            source_errors: 0,
            synced: false,
            health: health::Shared::default(),
            http_addr: None,
            metrics_addr: None,
            applied: BTreeMap::new(),
            status: Vec::new(),
            map_errors: 0,
            swept: false,
            migration,
            cni: Registry::load(&opts.state_dir),
            opts,
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
        self.metrics_addr = Some(server.metrics_addr);
        self.publish();
        let pages = Sampler::start(
            self.opts.layout.clone(),
            self.health.clone(),
            self.opts.metrics.metrics_interval,
        )?;
        let status = Sampler::start_status(
            self.opts.layout.clone(),
            self.opts.state_dir.clone(),
            self.opts.metrics.metrics_interval,
        )?;
        server.start(self.health.clone(), pages, status)?;
        // After the programs are attached: a plugin that reaches the agent
        // can be answered "captured" truthfully.
        let mut calls = cni::server::serve(&self.opts.state_dir)?;
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
                Some(call) = calls.recv() => {
                    let reply = self.cni_call(call.request);
                    let _ = call.reply.send(reply);
                    self.publish();
                    self.write_status();
                    continue;
                }
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
            let waiting = self.status.iter().any(|p| {
                matches!(
                    p.state,
                    PodState::WaitingForNetns | PodState::ProxyIdUnknown
                )
            });
            let due = last_full.elapsed() >= if waiting { RETRY_WAITING } else { RECHECK };
            let round = changed || due;
            if round {
                last_full = Instant::now();
                match self.reconcile() {
                    Err(e) => error!("reconcile failed: {e:#}"),
                    Ok(()) if self.synced => self.finish_migration()?,
                    Ok(()) => {}
                }
            }
            // Before the status file: whoever has read the file finds the
            // endpoints at least as far along.
            self.publish();
            if round {
                self.write_status();
            }
        }
        info!("stopping; interception stays in place (`meshlane cleanup` removes it)");
        Ok(())
    }

    /// Swaps in the programs of a migration whose maps are now filled. On
    /// error the previous programs keep running and the agent stops.
    fn finish_migration(&mut self) -> Result<()> {
        let Some(m) = self.migration.take() else {
            return Ok(());
        };
        let t = Instant::now();
        m.finish(&self.opts.layout)
            .context("finishing the migration to the new map layout")?;
        info!(took = ?t.elapsed(), "migrated: every link runs this build's programs on the new maps, the old maps are unpinned");
        Ok(())
    }

    /// What /healthz, /readyz and /metrics show.
    fn publish(&self) {
        self.health.set(health::Health {
            attached: true,
            synced: self.synced,
            source_error: self.source_error.clone(),
            source_errors: self.source_errors,
            map_update_errors: self.map_errors,
            pods: self.status.clone(),
            heartbeat: Instant::now(),
        });
    }

    fn reconcile(&mut self) -> Result<()> {
        if self.synced {
            self.cni.retain_listed(&self.pods);
        }
        let scanned = if reconcile::needs_netns(&self.pods) || !self.cni.is_empty() {
            netns::inspect(netns::candidates().into_iter().collect())?
        } else {
            Vec::new()
        };
        let mut spaces = self.cni.spaces(scanned, |p| cni::inspect(p).ok());
        let pods = self.cni.overlay(&self.pods, &spaces);
        reconcile::look_up_user_ns(&pods, &mut spaces, |path| {
            userns::of_netns(path, netns::pids_in(path).map_err(|e| format!("{e:#}"))?)
        });
        let mut bound = reconcile::bindings(&self.applied);
        self.cni.bind(&mut bound);
        let Plan { want, mut status } =
            reconcile::plan(&pods, &spaces, &self.opts.defaults, &bound);

        // Remove what is no longer wanted, then write what is.
        let old = std::mem::take(&mut self.applied);
        for (key, a) in &old {
            let keep = want.get(key);
            self.remove_stale(a, keep);
            if keep.is_none() {
                info!(pod = %key, cookie = a.entries.cookie, "pod entries removed");
            }
        }
        for (key, a) in want {
            let unchanged = old.get(&key).is_some_and(|o| o == &a)
                && self.opts.layout.netns_link(a.entries.cookie).exists();
            if unchanged {
                self.applied.insert(key, a);
                continue;
            }
            match self.write(&a) {
                Ok(()) => {
                    info!(pod = %key, cookie = a.entries.cookie, "pod entries written");
                    self.applied.insert(key, a);
                }
                Err(e) => {
                    self.map_errors += 1;
                    error!(pod = %key, "writing maps: {e:#}");
                    // Whatever part of the new entries was written is
                    // removed so the kernel never sees half a pod; a pod
                    // that was captured keeps its previous entries (written
                    // again, as the new ones may have replaced some).
                    let previous = old.get(&key);
                    self.remove_stale(&a, previous);
                    let kept = previous.is_some_and(|p| match self.write(p) {
                        Ok(()) => true,
                        Err(e2) => {
                            error!(pod = %key, "restoring the previous entries: {e2:#}");
                            self.remove_stale(p, None);
                            false
                        }
                    });
                    if let Some(st) = status.iter_mut().find(|s| s.name == key) {
                        st.config_errors.push(format!("map update failed: {e:#}"));
                        if !kept {
                            st.state = PodState::Error;
                        }
                    }
                    if kept {
                        let p = previous.expect("kept").clone();
                        self.applied.insert(key, p);
                    }
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
            if st.state == PodState::ProxyIdUnknown
                && was.is_none_or(|o| o.state != PodState::ProxyIdUnknown)
            {
                error!(pod = %st.name, "{}; looking again every {RETRY_WAITING:?}", st.config_errors.join("; "));
            }
        }
        self.status = status;
        Ok(())
    }

    /// Serves one `meshlane-cni` request: ADD registers the pod's sandbox
    /// and runs a round at once, CHECK looks, DEL releases; ADD and CHECK
    /// say "captured" only when the maps hold the pod for that namespace.
    fn cni_call(&mut self, req: cni::proto::Request) -> Reply {
        use cni::proto::Request;
        let (pod, netns, add) = match req {
            Request::Del { pod, container_id } => {
                let key = pod.map(|p| p.key());
                if let Some(r) = self.cni.release(key.as_deref(), &container_id) {
                    info!(pod = ?key, container_id, cookie = r.cookie, "sandbox deleted by the runtime: entries released");
                    if let Err(e) = self.reconcile() {
                        error!("reconcile failed: {e:#}");
                    }
                }
                return Reply::Released;
            }
            Request::Add {
                pod,
                container_id,
                netns,
                ips,
            } => (pod, netns, Some((container_id, ips))),
            Request::Check { pod, netns, .. } => (pod, netns, None),
        };
        let key = pod.key();
        let Some(known) = self.pods.iter().find(|p| p.key() == key) else {
            return Reply::Unknown {
                source: self.opts.source.describe(),
                synced: self.synced,
            };
        };
        if let (Some(runtime), Some(listed)) = (&pod.uid, &known.uid) {
            if runtime != listed {
                // The source still has an earlier pod of this name: wait
                // for this one rather than apply the other's settings.
                return Reply::Pending {
                    why: format!(
                        "the pod source lists {key} with uid {listed}, the runtime's sandbox is \
                         for uid {runtime}"
                    ),
                };
            }
        }
        if !known.meshed {
            return Reply::NotCaptured {
                why: "the pod is not meshed".into(),
            };
        }
        let ns = match cni::inspect(&netns) {
            Ok(ns) => ns,
            Err(e) => {
                return Reply::Error {
                    msg: format!("{e:#}"),
                }
            }
        };
        if let Some((container_id, ips)) = add {
            info!(pod = %key, container_id, netns = %netns.display(), cookie = ns.cookie, ?ips, "sandbox added by the runtime");
            self.cni.register(
                key.clone(),
                cni::Registration {
                    container_id,
                    uid: pod.uid,
                    netns,
                    cookie: ns.cookie,
                    ips,
                },
            );
            if let Err(e) = self.reconcile() {
                error!("reconcile failed: {e:#}");
            }
        }
        Registry::answer(&key, ns.cookie, &self.applied, &self.status, |c| {
            self.opts.layout.netns_link(c).exists()
        })
    }

    /// Removes whatever the maps hold that no current pod wants: what an
    /// earlier agent wrote for pods deleted or changed while no agent ran.
    fn sweep(&mut self) {
        self.maps
            .sweep(&self.opts.layout, self.applied.values().map(|a| &a.entries));
    }

    /// Reports whether each active pod's proxy listens, and registers
    /// listeners that predate the programs (sockops only sees new ones).
    fn check_listeners(&mut self, status: &mut [PodStatus]) {
        let registered: BTreeSet<ListenerKey> = self.maps.listener_keys();
        for (key, a) in &self.applied {
            let cookie = a.entries.cookie;
            let p = &a.entries.entries.pod;
            let want = [p.inbound_capture_port, p.outbound_capture_port];
            let missing: Vec<u16> = want
                .into_iter()
                .filter(|port| {
                    let key = |owner| ListenerKey::serving(cookie, *port, ListenerKey::IPV4, owner);
                    !registered.contains(&key(p.proxy_uid)) && !registered.contains(&key(0))
                })
                .collect();
            let mut found = Vec::new();
            if !missing.is_empty() {
                match listeners::register_existing(
                    &mut self.maps,
                    cookie,
                    &a.netns,
                    &missing,
                    p.proxy_uid,
                ) {
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
                st.inbound_attached = self.opts.layout.netns_link(cookie).exists();
                st.proxy_listening = Some(
                    !missing.contains(&p.inbound_capture_port)
                        || found.contains(&p.inbound_capture_port),
                );
            }
        }
    }

    /// Removes the entries of `old` that `new` does not have.
    fn remove_stale(&mut self, old: &Wanted, new: Option<&Wanted>) {
        self.maps
            .remove_stale(&self.opts.layout, &old.entries, new.map(|n| &n.entries));
    }

    /// The pod's entries, then its inbound link.
    fn write(&mut self, a: &Wanted) -> Result<()> {
        self.maps.write_pod(&a.entries)?;
        bpf::attach_netns(&self.opts.layout, a.entries.cookie, &a.netns)?;
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
            metrics_addr: self.metrics_addr.map(|a| a.to_string()),
            cgroup: self.opts.cgroup.display().to_string(),
            bpffs: self.opts.layout.root.display().to_string(),
            file_error: self.opts.source.file().and(self.source_error.clone()),
            api_error: match self.opts.source {
                Source::Kubernetes(_) => self.source_error.clone(),
                Source::File(_) => None,
            },
            map_update_errors: self.map_errors,
            synced: self.synced,
            pods: self.status.clone(),
        };
        if let Err(e) = st.save(&self.opts.state_dir) {
            warn!("writing status to {}: {e:#}", self.opts.state_dir.display());
        }
    }
}

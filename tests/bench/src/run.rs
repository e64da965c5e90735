//! `mbench run`: builds one sandbox node per kind of interception, runs every
//! shape in every mode with the modes interleaved per repetition, then the
//! scale runs, and hands the raw results to [`super::report`].
//!
//! Testbeds (two pods, same node, each a sandbox of its own so nothing of one
//! mode is present in another):
//!
//! | testbed | modes | pod A | pod B |
//! |---|---|---|---|
//! | plain | `direct`, `explicit` | sidecar dials B:15006 itself | sidecar forwards to B:9080 |
//! | iptables | `iptables` | Istio's basic.rules | Istio's basic.rules |
//! | meshlane | `meshlane` | agent, `--shortcut=off` | agent (sk_lookup inbound capture) |
//! | shortcut | `meshlane+shortcut` | agent, `--shortcut=on` | agent (sk_lookup inbound capture) |
//!
//! An agent without inbound capture gets Istio's PREROUTING rules in pod B
//! instead, and the run says so in its notes.
//!
//! Each pod's namespace gets the same TCP settings (ephemeral range
//! 1024-65535, tcp_tw_reuse=1) so hundreds of thousands of short connections
//! do not run out of ports; the settings are the same in every mode.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{
    client::{Report, Shape},
    sys::{self, Conntrack, MapUsage},
};
use meshlane_tests::{data_dir, Agent, Pod, PodSpec, Proc, Sandbox, APP_UID, PROXY_UID};

/// The application's port in pod B.
pub const APP_PORT: u16 = 9080;
/// Pod B's UDP receiver of the UDP send-rate shape.
pub const UDP_PORT: u16 = 9081;
/// Where the DNS shape's queries go (pod B's "DNS server").
pub const DNS_PORT: u16 = 53;
/// Istio's DNS proxy port, where the stand-in in pod A answers.
pub const DNS_PROXY_PORT: u16 = 15053;
const READY: Duration = Duration::from_secs(15);
/// Descriptors a sidecar needs besides two per connection (the kept
/// connections are sized with this).
const FD_HEADROOM: u64 = 100;
/// HAProxy's own descriptors besides two per connection (it asks for
/// 2 x maxconn + 18 with our two listeners).
const HAPROXY_FDS: u64 = 40;

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    clap::ValueEnum,
    Serialize,
    Deserialize,
)]
pub enum Mode {
    /// App to app, no sidecar: the scale of the whole picture.
    #[value(name = "direct")]
    #[serde(rename = "direct")]
    Direct,
    /// Sidecars, no interception: the app dials 15001, sidecar A dials B:15006.
    #[value(name = "explicit")]
    #[serde(rename = "explicit")]
    Explicit,
    /// Istio's rules (basic.rules) in both pods.
    #[value(name = "iptables")]
    #[serde(rename = "iptables")]
    Iptables,
    /// The meshlane agent, shortcut off.
    #[value(name = "meshlane")]
    #[serde(rename = "meshlane")]
    Meshlane,
    /// The meshlane agent, shortcut on.
    #[value(name = "meshlane+shortcut")]
    #[serde(rename = "meshlane+shortcut")]
    MeshlaneShortcut,
    /// The agent, shortcut on, and both pods annotated
    /// `meshlane.io/shortcut-app: "true"`: all three legs redirected.
    #[value(name = "meshlane+shortcut-app")]
    #[serde(rename = "meshlane+shortcut-app")]
    MeshlaneShortcutApp,
    /// Like `direct` (app to app, no sidecar in the path), with the agent
    /// running and its programs attached to the node cgroup above both pods,
    /// which are not meshed (a third, meshed pod gives the agent work).
    #[value(name = "unmeshed")]
    #[serde(rename = "unmeshed")]
    Unmeshed,
    /// Dual-stack pods, the app dials B's IPv6 address: Istio's rules in
    /// both families (basic.rules and its ip6tables form) in both pods.
    #[value(name = "ip6tables")]
    #[serde(rename = "ip6tables")]
    Ip6tables,
    /// Dual-stack pods, the app dials B's IPv6 address: the agent, shortcut
    /// off.
    #[value(name = "meshlane-v6")]
    #[serde(rename = "meshlane-v6")]
    MeshlaneV6,
    /// UDP DNS from pod A under Istio's dns.rules (ISTIO_META_DNS_CAPTURE).
    #[value(name = "iptables-dns")]
    #[serde(rename = "iptables-dns")]
    IptablesDns,
    /// UDP DNS from pod A, the agent with DNS capture for pod A.
    #[value(name = "meshlane-dns")]
    #[serde(rename = "meshlane-dns")]
    MeshlaneDns,
}

impl Mode {
    pub const ALL: [Mode; 11] = [
        Mode::Direct,
        Mode::Explicit,
        Mode::Iptables,
        Mode::Meshlane,
        Mode::MeshlaneShortcut,
        Mode::MeshlaneShortcutApp,
        Mode::Unmeshed,
        Mode::Ip6tables,
        Mode::MeshlaneV6,
        Mode::IptablesDns,
        Mode::MeshlaneDns,
    ];

    /// The modes of the main table and the scale runs: the IPv4 TCP path
    /// with each kind of interception.
    pub const MAIN: [Mode; 6] = [
        Mode::Direct,
        Mode::Explicit,
        Mode::Iptables,
        Mode::Meshlane,
        Mode::MeshlaneShortcut,
        Mode::MeshlaneShortcutApp,
    ];

    pub fn is_main(self) -> bool {
        Mode::MAIN.contains(&self)
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Explicit => "explicit",
            Mode::Iptables => "iptables",
            Mode::Meshlane => "meshlane",
            Mode::MeshlaneShortcut => "meshlane+shortcut",
            Mode::MeshlaneShortcutApp => "meshlane+shortcut-app",
            Mode::Unmeshed => "unmeshed",
            Mode::Ip6tables => "ip6tables",
            Mode::MeshlaneV6 => "meshlane-v6",
            Mode::IptablesDns => "iptables-dns",
            Mode::MeshlaneDns => "meshlane-dns",
        }
    }

    fn bed(self) -> BedKind {
        match self {
            Mode::Direct | Mode::Explicit => BedKind::Plain,
            Mode::Iptables => BedKind::Iptables,
            Mode::Meshlane => BedKind::Agent {
                shortcut: false,
                app_legs: false,
            },
            Mode::MeshlaneShortcut => BedKind::Agent {
                shortcut: true,
                app_legs: false,
            },
            Mode::MeshlaneShortcutApp => BedKind::Agent {
                shortcut: true,
                app_legs: true,
            },
            Mode::Unmeshed => BedKind::Unmeshed,
            Mode::Ip6tables => BedKind::Iptables6,
            Mode::MeshlaneV6 => BedKind::Agent6,
            Mode::IptablesDns => BedKind::IptablesDns,
            Mode::MeshlaneDns => BedKind::AgentDns,
        }
    }

    /// Whether the path has sidecars (or, for the DNS modes, the DNS proxy
    /// stand-in): all but `direct` and `unmeshed`.
    fn proxied(self) -> bool {
        !matches!(self, Mode::Direct | Mode::Unmeshed)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Proxy {
    /// `mtest sidecar`, the test sidecar.
    Test,
    /// HAProxy from Debian (SO_ORIGINAL_DST via `server orig 0.0.0.0:0`).
    Haproxy,
}

/// The repeated shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Bench {
    Crr,
    Rr64,
    Rr16k,
    Stream1k,
    Stream64k,
    Dns,
    UdpSend,
    Sockopt,
}

impl Bench {
    pub const ALL: [Bench; 8] = [
        Bench::Crr,
        Bench::Rr64,
        Bench::Rr16k,
        Bench::Stream1k,
        Bench::Stream64k,
        Bench::Dns,
        Bench::UdpSend,
        Bench::Sockopt,
    ];

    /// The shapes of the main table (TCP through the mesh path).
    pub const MAIN: [Bench; 5] = [
        Bench::Crr,
        Bench::Rr64,
        Bench::Rr16k,
        Bench::Stream1k,
        Bench::Stream64k,
    ];

    /// Whether the shape runs in `mode`: the TCP shapes in the IPv4 modes,
    /// connection rate and 64 B request/response also over IPv6, DNS only
    /// in the DNS modes, and the UDP send-rate and getsockopt shapes (costs
    /// to workloads meshlane does not serve) in direct and unmeshed.
    pub fn applies(self, mode: Mode) -> bool {
        match mode {
            Mode::Ip6tables | Mode::MeshlaneV6 => matches!(self, Bench::Crr | Bench::Rr64),
            Mode::IptablesDns | Mode::MeshlaneDns => self == Bench::Dns,
            Mode::Direct | Mode::Unmeshed => self != Bench::Dns,
            _ => Bench::MAIN.contains(&self),
        }
    }

    /// Whether the shape is one of those added for the IPv6, DNS and
    /// unmeshed comparisons (kept tiny in `--quick`).
    fn is_extra(self, mode: Mode) -> bool {
        !Bench::MAIN.contains(&self) || !mode.is_main()
    }

    pub fn name(self) -> &'static str {
        match self {
            Bench::Crr => "connection rate",
            Bench::Rr64 => "request/response 64 B",
            Bench::Rr16k => "request/response 16 KB",
            Bench::Stream1k => "streaming 1 KB writes",
            Bench::Stream64k => "streaming 64 KB writes",
            Bench::Dns => "UDP DNS query/answer",
            Bench::UdpSend => "UDP send rate 64 B",
            Bench::Sockopt => "getsockopt loop",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Bench::Crr => "crr",
            Bench::Rr64 => "rr64",
            Bench::Rr16k => "rr16k",
            Bench::Stream1k => "stream1k",
            Bench::Stream64k => "stream64k",
            Bench::Dns => "dns",
            Bench::UdpSend => "udpsend",
            Bench::Sockopt => "sockopt",
        }
    }

    /// Client shape, size, and threads/connections.
    fn client(self, plan: &Plan) -> (Shape, u32, u32) {
        match self {
            Bench::Crr => (Shape::Crr, 64, plan.crr_threads),
            Bench::Rr64 => (Shape::Rr, 64, 1),
            Bench::Rr16k => (Shape::Rr, 16 * 1024, 1),
            Bench::Stream1k => (Shape::Stream, 1024, 1),
            Bench::Stream64k => (Shape::Stream, 64 * 1024, 1),
            Bench::Dns => (Shape::Dns, 64, 1),
            Bench::UdpSend => (Shape::UdpSend, 64, 1),
            Bench::Sockopt => (Shape::Sockopt, 64, 1),
        }
    }
}

/// Sizes and durations of one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub reps: usize,
    pub warmup_ms: u64,
    pub duration_ms: u64,
    /// A first, discarded run of each shape in each mode.
    pub shape_warmup_ms: u64,
    pub crr_threads: u32,
    pub hold_conns: u32,
    pub churn_conns: u64,
    pub churn_threads: u32,
    pub churn_limit_ms: u64,
    /// How long to wait for map entries to return to their baseline.
    pub settle_ms: u64,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            reps: 5,
            warmup_ms: 500,
            duration_ms: 3000,
            shape_warmup_ms: 1000,
            crr_threads: 4,
            hold_conns: 10_000,
            churn_conns: 200_000,
            churn_threads: 4,
            churn_limit_ms: 180_000,
            settle_ms: 10_000,
        }
    }

    pub fn quick() -> Plan {
        Plan {
            reps: 2,
            warmup_ms: 150,
            duration_ms: 500,
            shape_warmup_ms: 200,
            crr_threads: 4,
            hold_conns: 1_000,
            churn_conns: 5_000,
            churn_threads: 4,
            churn_limit_ms: 30_000,
            settle_ms: 3_000,
        }
    }
}

#[derive(Clone)]
pub struct Options {
    pub plan: Plan,
    pub quick: bool,
    pub proxy: Proxy,
    pub modes: Vec<Mode>,
    pub shapes: Vec<Bench>,
    pub skip_scale: bool,
    /// Account BPF program run time (BPF_ENABLE_STATS) during the runs; it
    /// adds two clock reads to every program run, so it is off by default.
    pub bpf_stats: bool,
    /// The test sidecar's relay read size (None: its default).
    pub relay_buffer: Option<u32>,
    /// The open-file limit the run's processes inherit (set by [`run`]).
    pub nofile: u64,
    /// Keep idle CPUs polling during the run ([`sys::IdleHold`]).
    pub idle_poll: bool,
}

/// How a mode came out.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModeInfo {
    pub mode: Mode,
    /// Why the mode could not run (then it has no numbers).
    pub unavailable: Option<String>,
    pub notes: Vec<String>,
}

/// Every run of one shape in one mode.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Runs {
    pub reports: Vec<Report>,
    /// Conntrack drops in pods A and B during each run.
    pub conntrack_drops: Vec<u64>,
    /// Messages the shortcut redirected during each run (agent modes).
    #[serde(default)]
    pub shortcut_msgs: Vec<u64>,
    /// Per run, each meshlane program's runs and run time in ns (agent
    /// modes with `--bpf-stats`).
    #[serde(default)]
    pub bpf: Vec<BTreeMap<String, (u64, u64)>>,
    pub failures: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShapeResult {
    pub bench: Bench,
    pub runs: BTreeMap<Mode, Runs>,
}

/// Memory and state at one moment of a scale run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub agent_rss: Option<u64>,
    pub maps: Option<BTreeMap<String, MapUsage>>,
    pub conntrack_a: Conntrack,
    pub conntrack_b: Conntrack,
    pub sidecar_rss: Option<u64>,
    pub server_rss: Option<u64>,
}

impl Snapshot {
    /// Kernel memory of all maps.
    pub fn map_bytes(&self) -> Option<u64> {
        self.maps
            .as_ref()
            .map(|m| m.values().map(|u| u.bytes).sum())
    }

    /// Entries of every map that holds per-connection or per-pod state
    /// (arrays are always full and socket storage cannot be iterated).
    pub fn map_entries(&self) -> Option<u64> {
        self.maps.as_ref().map(|m| {
            m.values()
                .filter(|u| !u.kind.contains("array"))
                .filter_map(|u| u.entries)
                .sum()
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScaleResult {
    pub mode: Mode,
    pub baseline: Snapshot,
    pub held: Snapshot,
    pub released: Snapshot,
    pub churned: Snapshot,
    pub settled: Snapshot,
    pub hold: Option<Report>,
    pub churn: Option<Report>,
    /// Seconds until the map entries were back at their baseline after the
    /// churn (None: not within the settle time, or no maps).
    pub settle_s: Option<f64>,
    pub failures: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub machine: sys::Machine,
    pub started_utc: String,
    pub proxy: Proxy,
    pub quick: bool,
    pub plan: Plan,
    pub modes: Vec<ModeInfo>,
    pub shapes: Vec<ShapeResult>,
    pub scale: Vec<ScaleResult>,
    pub notes: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum BedKind {
    Plain,
    Iptables,
    Agent { shortcut: bool, app_legs: bool },
    Unmeshed,
    Iptables6,
    Agent6,
    IptablesDns,
    AgentDns,
}

/// One sandbox node with pods A (client) and B (server), their sidecars and
/// whatever intercepts. Fields drop in order: the agent detaches before the
/// processes and the sandbox go.
struct Testbed {
    agent: Option<Agent>,
    _procs: Vec<Proc>,
    sb: Sandbox,
    a: Pod,
    b: Pod,
    server_pid: u32,
    sidecar_pids: Vec<u32>,
    /// Other processes in every path of this testbed (the UDP servers).
    extra_pids: Vec<u32>,
    notes: Vec<String>,
}

impl Testbed {
    fn agent_pid(&self) -> Option<u32> {
        let st = self.agent.as_ref()?.status().ok()?;
        st.get("pid")?.as_u64().map(|p| p as u32)
    }

    /// Processes in `mode`'s path whose CPU time counts.
    fn cpu_pids(&self, mode: Mode) -> Vec<u32> {
        let mut v = vec![self.server_pid];
        if mode.proxied() {
            v.extend(&self.sidecar_pids);
        }
        v.extend(&self.extra_pids);
        v.extend(self.agent_pid());
        v
    }

    /// What the client in pod A dials (for `bench`; None: a TCP shape).
    fn target(&self, mode: Mode, bench: Option<Bench>) -> SocketAddr {
        match (mode, bench) {
            (_, Some(Bench::Dns)) => SocketAddr::from((self.b.ip, DNS_PORT)),
            (_, Some(Bench::UdpSend)) => SocketAddr::from((self.b.ip, UDP_PORT)),
            (Mode::Explicit, _) => {
                SocketAddr::from(([127, 0, 0, 1], meshlane_tests::OUTBOUND_PORT))
            }
            (Mode::Ip6tables | Mode::MeshlaneV6, _) => SocketAddr::from((self.b.v6(), APP_PORT)),
            _ => SocketAddr::from((self.b.ip, APP_PORT)),
        }
    }

    fn snapshot(&self, mode: Mode) -> Snapshot {
        let ct = |p: &Pod| sys::conntrack(&self.sb, p).unwrap_or_default();
        let sidecar_rss = if mode.proxied() {
            self.sidecar_pids
                .iter()
                .map(|&p| sys::rss_bytes(p))
                .sum::<Option<u64>>()
        } else {
            None
        };
        Snapshot {
            agent_rss: self.agent_pid().and_then(sys::rss_bytes),
            maps: self
                .agent
                .as_ref()
                .and_then(|a| sys::bpf_maps(&a.bpffs).ok()),
            conntrack_a: ct(&self.a),
            conntrack_b: ct(&self.b),
            sidecar_rss,
            server_rss: sys::rss_bytes(self.server_pid),
        }
    }

    fn bpf_stats(&self) -> Option<BTreeMap<String, (u64, u64)>> {
        sys::bpf_prog_stats(&self.agent.as_ref()?.bpffs).ok()
    }

    /// The agent's count of messages redirected by the shortcut so far.
    fn shortcut_msgs(&self) -> Option<u64> {
        let st = self.agent.as_ref()?.status_cmd().ok()?;
        st["counters"]["shortcut_redirected"].as_u64()
    }

    fn conntrack_drops(&self) -> u64 {
        [&self.a, &self.b]
            .iter()
            .map(|p| sys::conntrack(&self.sb, p).map_or(0, |c| c.drops))
            .sum()
    }
}

fn mbench_bin() -> PathBuf {
    meshlane_tests::sandbox::sibling_bin(
        "mbench",
        "MESHLANE_MBENCH",
        "cargo build -p meshlane-bench",
    )
}

/// The HAProxy configuration for one pod: forward to the original
/// destination, or to fixed addresses when nothing intercepts.
fn haproxy_cfg(
    outbound_to: Option<SocketAddr>,
    inbound_to: Option<SocketAddr>,
    maxconn: u64,
) -> String {
    let out = outbound_to.map_or("0.0.0.0:0".to_string(), |a| a.to_string());
    let inb = inbound_to.map_or("0.0.0.0:0".to_string(), |a| a.to_string());
    // Without an original destination HAProxy dials the listener's own
    // address: refuse instead of looping (the test sidecar does the same).
    // With a fixed upstream (explicit mode) the app dials 15001 itself.
    let guard = |fixed: Option<SocketAddr>, port: u16| match fixed {
        None => format!("    tcp-request connection reject if {{ dst_port {port} }}\n"),
        Some(_) => String::new(),
    };
    let (out_guard, in_guard) = (guard(outbound_to, 15001), guard(inbound_to, 15006));
    format!(
        "global
    maxconn {maxconn}
    nbthread 2
defaults
    mode tcp
    timeout connect 3s
    timeout client 300s
    timeout server 300s
frontend outbound
    bind 0.0.0.0:15001
{out_guard}    default_backend outbound
backend outbound
    server orig {out}
frontend inbound
    bind 0.0.0.0:15006
{in_guard}    default_backend inbound
backend inbound
    server app {inb} source 127.0.0.6
"
    )
}

fn start_sidecar(
    sb: &Sandbox,
    pod: &Pod,
    opts: &Options,
    outbound_to: Option<SocketAddr>,
    inbound_to: Option<SocketAddr>,
    dual: bool,
) -> Result<Proc> {
    match opts.proxy {
        Proxy::Test => {
            let mut args = vec!["sidecar".to_string(), "--log".into(), "/dev/null".into()];
            if dual {
                // One [::] socket per port taking both families (Envoy's
                // dual-stack listener).
                args.extend(["--listen".into(), "dual".into()]);
            }
            if let Some(n) = opts.relay_buffer {
                args.extend(["--relay-buffer".into(), n.to_string()]);
            }
            if let Some(a) = outbound_to {
                args.extend(["--outbound-to".into(), a.to_string()]);
            }
            if let Some(a) = inbound_to {
                args.extend(["--inbound-to".into(), a.to_string()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut p = sb.spawn(
                pod,
                PROXY_UID,
                PROXY_UID,
                &meshlane_tests::mtest_bin(),
                &args,
            )?;
            p.wait_ready(READY)?;
            Ok(p)
        }
        Proxy::Haproxy => {
            let cfg = sb.dir().join(format!("haproxy-{}.cfg", pod.name));
            // HAProxy refuses to start when maxconn needs more descriptors
            // than the limit allows (two per connection plus a few of its
            // own), and must take every kept connection: one left in the
            // accept queue past the client's patience loses its conntrack
            // entry, and with it its original destination.
            let maxconn = (opts.nofile.saturating_sub(HAPROXY_FDS) / 2).clamp(1000, 100_000);
            std::fs::write(&cfg, haproxy_cfg(outbound_to, inbound_to, maxconn))
                .with_context(|| format!("writing {}", cfg.display()))?;
            let cfg_s = cfg.to_str().context("sandbox paths are UTF-8")?.to_string();
            let p = sb.spawn(
                pod,
                PROXY_UID,
                PROXY_UID,
                Path::new("/usr/sbin/haproxy"),
                &["-db", "-f", &cfg_s],
            )?;
            sb.wait_listening(pod, meshlane_tests::OUTBOUND_PORT, READY)?;
            sb.wait_listening(pod, meshlane_tests::INBOUND_PORT, READY)?;
            Ok(p)
        }
    }
}

/// Istio's basic.rules reduced to the inbound part (PREROUTING to 15006),
/// for pod B while the agent cannot capture inbound itself.
fn inbound_only_rules(basic: &str) -> String {
    basic
        .lines()
        .filter(|l| {
            l.starts_with('*')
                || *l == "COMMIT"
                || ((l.contains("ISTIO_INBOUND") || l.contains("ISTIO_IN_REDIRECT"))
                    && !l.contains("OUTPUT"))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The first line of an agent's failure that says what went wrong.
fn agent_error(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let line = text
        .lines()
        .find(|l| l.contains("error") || l.contains("Error"))
        .unwrap_or_else(|| text.lines().next().unwrap_or(""));
    line.trim().chars().take(300).collect()
}

fn build(kind: BedKind, opts: &Options) -> Result<Testbed> {
    let tag = match kind {
        BedKind::Plain => "bench-pl",
        BedKind::Iptables => "bench-ipt",
        BedKind::Agent {
            shortcut: false, ..
        } => "bench-ml",
        BedKind::Agent {
            app_legs: false, ..
        } => "bench-mls",
        BedKind::Agent { .. } => "bench-mla",
        BedKind::Unmeshed => "bench-um",
        BedKind::Iptables6 => "bench-ip6",
        BedKind::Agent6 => "bench-ml6",
        BedKind::IptablesDns => "bench-ipd",
        BedKind::AgentDns => "bench-mld",
    };
    let dual = matches!(kind, BedKind::Iptables6 | BedKind::Agent6);
    if dual && opts.proxy != Proxy::Test {
        bail!("the IPv6 modes run with the test sidecar only (the HAProxy configuration here listens on IPv4)");
    }
    let mut sb = if dual {
        Sandbox::new_dual_stack(tag)?
    } else {
        Sandbox::new(tag)?
    };
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    for p in [&a, &b] {
        sb.netns_exec(
            &p.netns,
            "sysctl",
            &[
                "-q",
                "-w",
                "net.ipv4.ip_local_port_range=1024 65535",
                "net.ipv4.tcp_tw_reuse=1",
            ],
            None,
        )?;
    }
    if matches!(kind, BedKind::IptablesDns | BedKind::AgentDns) {
        return build_dns(kind, sb, a, b);
    }
    // `[::]` takes IPv4 too (bindv6only is 0 in the pods).
    let listen = if dual {
        format!("[::]:{APP_PORT}")
    } else {
        format!("0.0.0.0:{APP_PORT}")
    };
    let mut server = sb.spawn(
        &b,
        APP_UID,
        APP_UID,
        &mbench_bin(),
        &["server", "--listen", &listen],
    )?;
    server.wait_ready(READY)?;
    let server_pid = server.pid();
    let mut procs = vec![server];
    let mut extra_pids = Vec::new();
    if matches!(kind, BedKind::Plain | BedKind::Unmeshed) {
        // The receiver of the UDP send-rate shape (it drops the datagrams).
        let mut udp = udp_server(&sb, &b, APP_UID, &format!("0.0.0.0:{UDP_PORT}"), "S")?;
        udp.wait_ready(READY)?;
        extra_pids.push(udp.pid());
        procs.push(udp);
    }
    let b_app = SocketAddr::from((b.ip, APP_PORT));
    let b_inbound = SocketAddr::from((b.ip, meshlane_tests::INBOUND_PORT));
    let (a_to, b_to) = match kind {
        BedKind::Plain | BedKind::Unmeshed => ((Some(b_inbound), None), (None, Some(b_app))),
        _ => ((None, None), (None, None)),
    };
    let sidecar_a = start_sidecar(&sb, &a, opts, a_to.0, a_to.1, dual)?;
    let sidecar_b = start_sidecar(&sb, &b, opts, b_to.0, b_to.1, dual)?;
    let sidecar_pids = vec![sidecar_a.pid(), sidecar_b.pid()];
    procs.extend([sidecar_a, sidecar_b]);
    let mut notes = Vec::new();
    let basic = data_dir().join("istio-cni/basic.rules");
    let basic_text =
        std::fs::read_to_string(&basic).with_context(|| format!("reading {}", basic.display()))?;
    let agent = match kind {
        BedKind::Plain => None,
        BedKind::Iptables => {
            sb.iptables_restore(&a, &basic, false)?;
            sb.iptables_restore(&b, &basic, false)?;
            None
        }
        BedKind::Iptables6 => {
            // What istio-iptables installs in a dual-stack pod: the same
            // rules in both families.
            let v6 = sb.dir().join("basic.v6.rules");
            std::fs::write(&v6, meshlane_tests::istio_v6_rules(&basic_text)?)?;
            for p in [&a, &b] {
                sb.iptables_restore(p, &basic, false)?;
                sb.ip6tables_restore(p, &v6)?;
            }
            None
        }
        BedKind::Unmeshed => {
            // A meshed pod on the node, so the agent is as it would be on a
            // node with both kinds; A and B are listed, not meshed.
            let c = sb.add_pod("c")?;
            let pods = [PodSpec::plain(&a), PodSpec::plain(&b), PodSpec::meshed(&c)];
            notes.push(
                "pods A and B are not meshed; the agent (default flags: shortcut off) runs with \
                 its programs on the node cgroup above them and one meshed pod C beside them"
                    .into(),
            );
            Some(
                Agent::start_on(&sb, 1, &pods, &[])
                    .map_err(|e| anyhow::anyhow!("the agent did not start: {}", agent_error(&e)))?,
            )
        }
        BedKind::Agent6 => {
            let pods = [PodSpec::meshed(&a), PodSpec::meshed(&b)];
            let agent = Agent::start_on(&sb, 1, &pods, &["--shortcut=off"])
                .map_err(|e| anyhow::anyhow!("the agent did not start: {}", agent_error(&e)))?;
            if !inbound_attached(&agent, &b) {
                let path = sb.dir().join("inbound-only.rules");
                let rules = inbound_only_rules(&basic_text);
                std::fs::write(&path, &rules)?;
                sb.iptables_restore(&b, &path, false)?;
                let path6 = sb.dir().join("inbound-only.v6.rules");
                std::fs::write(&path6, meshlane_tests::istio_v6_rules(&rules)?)?;
                sb.ip6tables_restore(&b, &path6)?;
                notes.push(
                    "pod B's inbound goes through Istio's PREROUTING rules (both families): \
                     this agent has no inbound capture"
                        .into(),
                );
            }
            Some(agent)
        }
        BedKind::Agent { shortcut, app_legs } => {
            let pods = [&a, &b].map(|p| {
                let spec = PodSpec::meshed(p);
                if app_legs {
                    spec.annotate("meshlane.io/shortcut-app", "true")
                } else {
                    spec
                }
            });
            let flag = if shortcut {
                "--shortcut=on"
            } else {
                "--shortcut=off"
            };
            let agent = match Agent::start_on(&sb, 1, &pods, &[flag]) {
                Ok(agent) => agent,
                // An agent from before the switch has no shortcut at all:
                // without the flag it is exactly "shortcut off".
                Err(e) if !shortcut && agent_error(&e).contains("--shortcut") => {
                    notes.push(format!(
                        "the agent refused `{flag}` ({}), so it has no shortcut: ran without the flag",
                        agent_error(&e)
                    ));
                    Agent::start(&sb, &pods)?
                }
                Err(e) => bail!(
                    "the agent refused to start with `{flag}`: {}",
                    agent_error(&e)
                ),
            };
            if !inbound_attached(&agent, &b) {
                let rules = inbound_only_rules(&basic_text);
                let path = sb.dir().join("inbound-only.rules");
                std::fs::write(&path, rules)?;
                sb.iptables_restore(&b, &path, false)?;
                notes.push(
                    "pod B's inbound (sidecar A -> B:9080 to sidecar B's 15006) goes through \
                     iptables (Istio's PREROUTING rules only): this agent has no inbound capture \
                     (no sk_lookup program); pod B's conntrack entries come from those rules"
                        .into(),
                );
            }
            Some(agent)
        }
        BedKind::IptablesDns | BedKind::AgentDns => unreachable!("built by build_dns"),
    };
    Ok(Testbed {
        agent,
        _procs: procs,
        sb,
        a,
        b,
        server_pid,
        sidecar_pids,
        extra_pids,
        notes,
    })
}

/// Inbound capture (sk_lookup) is attached per pod once the agent sees the
/// pod's namespace; an agent without it never attaches.
fn inbound_attached(agent: &Agent, pod: &Pod) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attached = agent.status().ok().is_some_and(|st| {
            meshlane_tests::pod_entry(&st, &format!("default/{}", pod.name))
                .is_some_and(|p| p["inbound_attached"].as_bool() == Some(true))
        });
        if attached || Instant::now() >= deadline {
            return attached;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `mbench udp-server` in `pod`, answering with `tag` as the first byte.
fn udp_server(sb: &Sandbox, pod: &Pod, uid: u32, listen: &str, tag: &str) -> Result<Proc> {
    sb.spawn(
        pod,
        uid,
        uid,
        &mbench_bin(),
        &["udp-server", "--listen", listen, "--tag", tag],
    )
}

/// The DNS testbed: a "DNS server" on B:53 that answers with
/// [`super::client::DNS_SERVER_TAG`], the DNS proxy stand-in on
/// 127.0.0.1:15053 in pod A (as the proxy's uid) that answers with
/// [`super::client::DNS_PROXY_TAG`], and pod A's DNS capture: Istio's
/// dns.rules, or the agent with `ISTIO_META_DNS_CAPTURE=true` in A's
/// istio-proxy env. No TCP sidecars: nothing in the DNS shape uses them.
fn build_dns(kind: BedKind, sb: Sandbox, a: Pod, b: Pod) -> Result<Testbed> {
    let mut server = udp_server(&sb, &b, 0, &format!("0.0.0.0:{DNS_PORT}"), "S")?;
    server.wait_ready(READY)?;
    let mut proxy = udp_server(
        &sb,
        &a,
        PROXY_UID,
        &format!("127.0.0.1:{DNS_PROXY_PORT}"),
        "P",
    )?;
    proxy.wait_ready(READY)?;
    let (server_pid, proxy_pid) = (server.pid(), proxy.pid());
    let agent = match kind {
        BedKind::IptablesDns => {
            sb.iptables_restore(&a, &data_dir().join("istio-cni/dns.rules"), false)?;
            None
        }
        _ => {
            let pods = [
                PodSpec::meshed(&a).proxy_env("ISTIO_META_DNS_CAPTURE", "true"),
                PodSpec::plain(&b),
            ];
            Some(
                Agent::start_on(&sb, 1, &pods, &["--shortcut=off"])
                    .map_err(|e| anyhow::anyhow!("the agent did not start: {}", agent_error(&e)))?,
            )
        }
    };
    Ok(Testbed {
        agent,
        _procs: vec![server, proxy],
        sb,
        a,
        b,
        server_pid,
        sidecar_pids: vec![proxy_pid],
        extra_pids: Vec::new(),
        notes: Vec::new(),
    })
}

fn client_args(bed: &Testbed, mode: Mode, bench: Option<Bench>, extra: &[String]) -> Vec<String> {
    let pids: Vec<String> = bed.cpu_pids(mode).iter().map(u32::to_string).collect();
    let mut v = vec![
        "client".to_string(),
        "--connect".into(),
        bed.target(mode, bench).to_string(),
        "--cpu-pids".into(),
        pids.join(","),
    ];
    v.extend_from_slice(extra);
    v
}

fn run_client(
    bed: &Testbed,
    mode: Mode,
    bench: Option<Bench>,
    extra: &[String],
    limit: Duration,
) -> Result<Report> {
    let args = client_args(bed, mode, bench, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = bed
        .sb
        .run_timeout(&bed.a, APP_UID, APP_UID, &mbench_bin(), &args, limit)?;
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("the client printed no report: {out:?}"))?;
    serde_json::from_str(line).with_context(|| format!("parsing the client's report {line:?}"))
}

fn shape_args(bench: Bench, plan: &Plan, warmup_ms: u64, duration_ms: u64) -> Vec<String> {
    let (shape, size, conns) = bench.client(plan);
    vec![
        "--shape".into(),
        clap::ValueEnum::to_possible_value(&shape)
            .expect("every shape has a name")
            .get_name()
            .to_string(),
        "--size".into(),
        size.to_string(),
        "--conns".into(),
        conns.to_string(),
        "--warmup-ms".into(),
        warmup_ms.to_string(),
        "--duration-ms".into(),
        duration_ms.to_string(),
    ]
}

fn say(msg: &str) {
    eprintln!("mbench: {msg}");
}

/// The whole run. Testbeds that cannot be built make their modes
/// unavailable (with the reason); the others still run.
pub fn run(opts: &Options) -> Result<Results> {
    let root = meshlane_tests::workspace_root();
    let nofile = sys::raise_nofile(1 << 20)?;
    let mut opts = opts.clone();
    opts.nofile = nofile;
    let opts = &opts;
    let mut machine = sys::machine(&root);
    // Held until the run returns.
    let idle = sys::IdleHold::new(opts.idle_poll);
    machine.cpu_idle = idle.description.clone();
    say(&format!("CPU idle: {}", idle.description));
    let started_utc = utc_now();
    let mut notes = Vec::new();
    // A sidecar holds two sockets per connection; leave room for its
    // listeners, log, runtime and standard streams.
    let fits = (nofile.saturating_sub(FD_HEADROOM) / 2).min(u64::from(u32::MAX)) as u32;
    let mut plan = opts.plan.clone();
    if plan.hold_conns > fits {
        notes.push(format!(
            "the kept-connection run holds {fits} connections, not {}: the open-file limit here \
             is {nofile} (the hard limit cannot be raised without CAP_SYS_RESOURCE) and each \
             sidecar needs two descriptors per connection",
            plan.hold_conns
        ));
        plan.hold_conns = fits;
    }
    let plan = &plan;

    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| opts.modes.contains(m))
        .collect();
    // One testbed per kind of interception; a kind that cannot be built
    // makes its modes unavailable, with the reason.
    let mut beds: BTreeMap<BedKind, std::result::Result<Testbed, String>> = BTreeMap::new();
    for &m in &modes {
        beds.entry(m.bed()).or_insert_with(|| {
            say(&format!("building the {:?} testbed", m.bed()));
            build(m.bed(), opts).map_err(|e| {
                let why: String = format!("{e:#}").chars().take(400).collect();
                say(&format!("{} unavailable: {why}", m.name()));
                why
            })
        });
    }
    let infos: BTreeMap<Mode, ModeInfo> = modes
        .iter()
        .map(|&m| {
            let info = match &beds[&m.bed()] {
                Ok(bed) => ModeInfo {
                    mode: m,
                    unavailable: None,
                    notes: bed.notes.clone(),
                },
                Err(why) => ModeInfo {
                    mode: m,
                    unavailable: Some(why.clone()),
                    notes: Vec::new(),
                },
            };
            (m, info)
        })
        .collect();
    let live: Vec<Mode> = modes
        .iter()
        .copied()
        .filter(|m| beds[&m.bed()].is_ok())
        .collect();
    let bed_of = |m: Mode| beds[&m.bed()].as_ref().expect("live modes have a testbed");

    let bpf_stats = if opts.bpf_stats {
        Some(sys::enable_bpf_stats()?)
    } else {
        None
    };
    let mut shapes = Vec::new();
    for bench in Bench::ALL.into_iter().filter(|b| opts.shapes.contains(b)) {
        let here: Vec<Mode> = live.iter().copied().filter(|&m| bench.applies(m)).collect();
        if here.is_empty() {
            continue;
        }
        // In --quick (the smoke run of `cargo xtask test`) the shapes and
        // modes added for IPv6, DNS and unmeshed pods only prove they run.
        let tiny = opts.quick && here.iter().all(|&m| bench.is_extra(m));
        let (reps, warmup_ms, duration_ms) = if tiny {
            (1, 50, 200)
        } else {
            (plan.reps, plan.warmup_ms, plan.duration_ms)
        };
        let mut runs: BTreeMap<Mode, Runs> = here.iter().map(|&m| (m, Runs::default())).collect();
        if !tiny {
            say(&format!("{}: warm-up", bench.name()));
            for &m in &here {
                let args = shape_args(
                    bench,
                    plan,
                    plan.shape_warmup_ms,
                    plan.duration_ms.min(1000),
                );
                if let Err(e) = run_client(bed_of(m), m, Some(bench), &args, limit_for(plan)) {
                    say(&format!("{} warm-up in {}: {e:#}", bench.name(), m.name()));
                }
            }
        }
        for rep in 0..reps {
            // Rotating the order spreads any drift over all modes alike.
            let mut order = here.clone();
            if !order.is_empty() {
                let k = rep % order.len();
                order.rotate_left(k);
            }
            for m in order {
                let bed = bed_of(m);
                let drops0 = bed.conntrack_drops();
                let msgs0 = bed.shortcut_msgs();
                let bpf0 = bpf_stats.as_ref().and_then(|_| bed.bpf_stats());
                let args = shape_args(bench, plan, warmup_ms, duration_ms);
                let r = runs.get_mut(&m).expect("every live mode has runs");
                match run_client(bed, m, Some(bench), &args, limit_for(plan)) {
                    Ok(report) => {
                        say(&format!(
                            "{} rep {}/{} {}: {}",
                            bench.name(),
                            rep + 1,
                            reps,
                            m.name(),
                            brief(bench, &report)
                        ));
                        r.reports.push(report);
                    }
                    Err(e) => {
                        say(&format!("{} in {}: {e:#}", bench.name(), m.name()));
                        r.failures
                            .push(format!("{e:#}").chars().take(400).collect());
                    }
                }
                r.conntrack_drops
                    .push(bed.conntrack_drops().saturating_sub(drops0));
                if let (Some(a), Some(b)) = (msgs0, bed.shortcut_msgs()) {
                    r.shortcut_msgs.push(b.saturating_sub(a));
                }
                if let (Some(a), Some(b)) = (bpf0, bed.bpf_stats()) {
                    r.bpf.push(
                        b.iter()
                            .map(|(k, &(n, t))| {
                                let (n0, t0) = a.get(k).copied().unwrap_or((0, 0));
                                (k.clone(), (n.saturating_sub(n0), t.saturating_sub(t0)))
                            })
                            .collect(),
                    );
                }
            }
        }
        shapes.push(ShapeResult { bench, runs });
    }

    let mut scale = Vec::new();
    if !opts.skip_scale {
        drop(bpf_stats);
        for &m in live.iter().filter(|m| m.is_main()) {
            say(&format!(
                "scale in {}: {} kept connections, then {} short ones",
                m.name(),
                plan.hold_conns,
                plan.churn_conns
            ));
            scale.push(scale_run(bed_of(m), m, plan));
        }
    }

    machine.load_end = sys::loadavg();
    let modes = modes.iter().map(|m| infos[m].clone()).collect();
    Ok(Results {
        machine,
        started_utc,
        proxy: opts.proxy,
        quick: opts.quick,
        plan: plan.clone(),
        modes,
        shapes,
        scale,
        notes,
    })
}

fn limit_for(plan: &Plan) -> Duration {
    Duration::from_millis(plan.warmup_ms.max(plan.shape_warmup_ms) + plan.duration_ms + 40_000)
}

fn brief(bench: Bench, r: &Report) -> String {
    let errs = if r.errors > 0 {
        format!(", {} errors", r.errors)
    } else {
        String::new()
    };
    match bench {
        Bench::Crr => format!(
            "{:.0} conn/s, p50 {:.0} us, p99 {:.0} us{errs}",
            r.ops as f64 / r.elapsed_s,
            r.p50_us,
            r.p99_us
        ),
        Bench::Rr64 | Bench::Rr16k => format!(
            "p50 {:.1} us, p99 {:.1} us, {:.0} req/s{errs}",
            r.p50_us,
            r.p99_us,
            r.ops as f64 / r.elapsed_s
        ),
        Bench::Stream1k | Bench::Stream64k => {
            format!(
                "{:.2} Gbit/s{errs}",
                r.bytes as f64 * 8.0 / r.elapsed_s / 1e9
            )
        }
        Bench::Dns => format!(
            "{:.0} queries/s, p50 {:.1} us, p99 {:.1} us{errs}",
            r.ops as f64 / r.elapsed_s,
            r.p50_us,
            r.p99_us
        ),
        Bench::UdpSend => format!("{:.0} datagrams/s{errs}", r.ops as f64 / r.elapsed_s),
        Bench::Sockopt => format!(
            "{:.0} getsockopt calls/s{errs}",
            (r.ops * super::client::SOCKOPT_CALLS) as f64 / r.elapsed_s
        ),
    }
}

fn scale_run(bed: &Testbed, mode: Mode, plan: &Plan) -> ScaleResult {
    let mut failures = Vec::new();
    let baseline = bed.snapshot(mode);
    let release = bed.sb.dir().join(format!("release-{}", mode.name()));
    let _ = std::fs::remove_file(&release);

    // Hold.
    let hold_limit_ms = 300_000u64;
    let extra = vec![
        "--shape".to_string(),
        "hold".into(),
        "--size".into(),
        "64".into(),
        "--conns".into(),
        plan.hold_conns.to_string(),
        "--duration-ms".into(),
        hold_limit_ms.to_string(),
        "--release-file".into(),
        release.to_string_lossy().into_owned(),
    ];
    let args = client_args(bed, mode, None, &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut held = Snapshot::default();
    let mut hold = None;
    match bed.sb.spawn(&bed.a, APP_UID, APP_UID, &mbench_bin(), &args) {
        Err(e) => failures.push(format!("hold: {e:#}")),
        Ok(mut p) => {
            let deadline = Instant::now() + Duration::from_millis(hold_limit_ms);
            let mut got_held = false;
            while Instant::now() < deadline {
                match p.next_line(Duration::from_secs(1)) {
                    Some(l) if l.starts_with("held") => {
                        got_held = true;
                        break;
                    }
                    Some(_) => {}
                    None if !p.running() => break,
                    None => {}
                }
            }
            if got_held {
                held = bed.snapshot(mode);
            } else {
                failures.push("hold: the client never reported its connections held".into());
            }
            let _ = std::fs::write(&release, b"");
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                match p.next_line(Duration::from_secs(1)) {
                    Some(l) if l.starts_with('{') => {
                        match serde_json::from_str::<Report>(&l) {
                            Ok(r) => hold = Some(r),
                            Err(e) => failures.push(format!("hold report {l:?}: {e}")),
                        }
                        break;
                    }
                    Some(_) => {}
                    None if !p.running() => {
                        failures.push("hold: the client exited without a report".into());
                        break;
                    }
                    None => {}
                }
            }
        }
    }
    let (released, _) = settle(bed, mode, &baseline, plan);

    // Churn.
    let extra = vec![
        "--shape".to_string(),
        "churn".into(),
        "--size".into(),
        "64".into(),
        "--conns".into(),
        plan.churn_threads.to_string(),
        "--max-count".into(),
        plan.churn_conns.to_string(),
        "--duration-ms".into(),
        plan.churn_limit_ms.to_string(),
    ];
    let limit = Duration::from_millis(plan.churn_limit_ms + 30_000);
    let churn = match run_client(bed, mode, None, &extra, limit) {
        Ok(r) => Some(r),
        Err(e) => {
            failures.push(format!("churn: {e:#}"));
            None
        }
    };
    let churned = bed.snapshot(mode);
    let (settled, settle_s) = settle(bed, mode, &baseline, plan);
    ScaleResult {
        mode,
        baseline,
        held,
        released,
        churned,
        settled,
        hold,
        churn,
        settle_s,
        failures,
    }
}

/// Waits (up to the plan's settle time) for the map entries to return to
/// `baseline`; returns the last snapshot and how long it took.
fn settle(bed: &Testbed, mode: Mode, baseline: &Snapshot, plan: &Plan) -> (Snapshot, Option<f64>) {
    let t0 = Instant::now();
    let limit = Duration::from_millis(plan.settle_ms);
    loop {
        let s = bed.snapshot(mode);
        let back = s.map_entries() == baseline.map_entries();
        if back && baseline.map_entries().is_some() {
            return (s, Some(t0.elapsed().as_secs_f64()));
        }
        if back || t0.elapsed() >= limit {
            // No maps (nothing to wait for), or not back in time.
            return (s, None);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// "YYYY-MM-DD HH:MM UTC" now, without a date library.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn inbound_rules_keep_only_prerouting_capture() {
        let basic = std::fs::read_to_string(data_dir().join("istio-cni/basic.rules"))
            .expect("shared goldens");
        let r = inbound_only_rules(&basic);
        assert!(r.starts_with("* nat\n"), "{r}");
        assert!(r.contains("-A PREROUTING -p tcp -j ISTIO_INBOUND"));
        assert!(r.contains("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
        assert!(!r.contains("OUTPUT"), "{r}");
        assert!(!r.contains("15001"), "{r}");
        assert!(r.trim_end().ends_with("COMMIT"));
    }

    #[test]
    fn haproxy_config_names_fixed_upstreams() {
        let c = haproxy_cfg(None, None, 9000);
        assert!(c.contains("maxconn 9000\n"));
        assert!(c.contains("server orig 0.0.0.0:0\n"));
        assert!(c.contains("reject if { dst_port 15001 }"));
        assert!(c.contains("server app 0.0.0.0:0 source 127.0.0.6\n"));
        let c = haproxy_cfg(
            Some("10.0.0.3:15006".parse().unwrap()),
            Some("10.0.0.3:9080".parse().unwrap()),
            9000,
        );
        assert!(c.contains("server orig 10.0.0.3:15006\n"));
        assert!(c.contains("server app 10.0.0.3:9080 source 127.0.0.6\n"));
        assert!(!c.contains("reject"), "{c}");
    }
}

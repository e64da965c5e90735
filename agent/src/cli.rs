//! The command line: parses the flags and wires each command to the
//! library's modules.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::{
    agent, bpf, check, describe, host, http, iptables, logging, output, podconfig, pods, probe,
    source, status,
};

/// The command succeeded (`status`: healthy).
pub const EXIT_OK: u8 = 0;
/// The command failed (`status`: something is wrong, and it says what).
pub const EXIT_FAILED: u8 = 1;
/// The command line is wrong (`status`: also the state cannot be read).
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "meshlane",
    version,
    about = "eBPF sidecar interception, a drop-in for Istio's iptables init container",
    after_help = "Exit codes: 0 success; 1 the command failed (`status`: something is wrong, \
                  named in its output); 2 the command line is wrong (`status`: also the state \
                  cannot be read).\n\
                  Logs go to stderr, coloured only on a terminal (and without NO_COLOR)."
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. info or meshlane=debug.
    /// The first set of: this flag, MESHLANE_LOG, RUST_LOG; else info.
    #[arg(long, global = true, env = "MESHLANE_LOG", value_name = "FILTER")]
    log_level: Option<String>,
    /// Log lines as text, or as JSON objects (one per line) for log collectors.
    #[arg(
        long,
        global = true,
        env = "MESHLANE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: logging::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Where {
    /// bpffs directory holding meshlane's pinned programs, links and maps.
    #[arg(long, default_value = "/sys/fs/bpf/meshlane")]
    bpffs: PathBuf,
    /// Directory for the agent's status file.
    #[arg(long, default_value = host::default_state_dir().as_os_str())]
    state_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
enum OnOff {
    On,
    Off,
}

/// Which of Istio's rule sets `meshlane iptables` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
enum FamilyArg {
    /// The iptables-restore input.
    Ipv4,
    /// The ip6tables-restore input (pods with an IPv6 address).
    Ipv6,
    /// Both, each after a `#` comment line naming the tool that loads it.
    Both,
}

#[derive(Subcommand)]
enum DescribeWhat {
    /// A pod of this node.
    Pod {
        /// NAMESPACE/NAME (or NAME when only one pod has it).
        name: String,
        #[command(flatten)]
        at: Where,
        #[command(flatten)]
        output: output::Args,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Attach the programs and keep the maps true to this node's pods: from
    /// the Kubernetes API server, or from FILE with --pods.
    Run {
        /// Kubernetes Pod objects (YAML or JSON: a PodList, a list or single pods), watched for
        /// changes, instead of the API server (tests, VMs).
        #[arg(long, value_name = "FILE")]
        pods: Option<PathBuf>,
        /// This node's name (the downward API's spec.nodeName): the pods to capture are those
        /// scheduled here. Required without --pods.
        #[arg(long, env = "NODE_NAME", value_name = "NAME")]
        node_name: Option<String>,
        /// kubeconfig to reach the API server (default: KUBECONFIG, then the in-cluster service
        /// account).
        #[arg(long, value_name = "PATH", conflicts_with = "pods")]
        kubeconfig: Option<PathBuf>,
        /// Where /healthz, /readyz, /status (JSON, for `meshlane check`) and (without
        /// --metrics-addr) /metrics are served.
        #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:15030")]
        http_addr: std::net::SocketAddr,
        #[command(flatten)]
        metrics: Box<http::MetricsOptions>,
        /// cgroup-v2 directory to attach to (default: the cgroup2 root from /proc/mounts).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[command(flatten)]
        at: Where,
        /// Load this eBPF object instead of the one built into the binary.
        #[arg(long)]
        ebpf_object: Option<PathBuf>,
        /// Same-node socket shortcut for new connections between meshed
        /// sockets (a pod opts out with `meshlane.io/shortcut: "false"`).
        /// `meshlane shortcut on|off` flips it while running.
        #[arg(long, value_enum, default_value = "off", env = "MESHLANE_SHORTCUT")]
        shortcut: OnOff,
        /// Most bytes a shortcut socket may leave unread on its peer before
        /// it moves to TCP (and TCP's flow control) for the rest of the
        /// connection. Default 4 MiB, a TCP send buffer's default maximum.
        #[arg(long, value_name = "BYTES")]
        shortcut_max_queued: Option<u32>,
        /// Proxy uid for pods whose istio-proxy container sets no runAsUser
        /// (the container's runAsUser/runAsGroup still win). The gid follows
        /// the uid unless runAsGroup says otherwise.
        #[arg(long, value_name = "UID", default_value_t = meshlane_common::ports::PROXY_UID)]
        proxy_uid: u32,
        /// The proxy's listener for redirected outbound connections.
        #[arg(long, value_name = "PORT", default_value_t = meshlane_common::ports::OUTBOUND_CAPTURE)]
        outbound_capture_port: u16,
        /// The proxy's listener for redirected inbound connections.
        #[arg(long, value_name = "PORT", default_value_t = meshlane_common::ports::INBOUND_CAPTURE)]
        inbound_capture_port: u16,
        /// Most entries one pod's list annotation (ports, IP ranges) may
        /// have. A longer list is reported and falls back to its default,
        /// which captures at least as much: the node-wide maps are shared, so
        /// one pod must not fill them (or stall the agent) for the others.
        #[arg(long, value_name = "N", default_value_t = podconfig::NodeDefaults::DEFAULT_MAX_LIST_ENTRIES)]
        max_list_entries: usize,
        /// The most pods this node runs (kubelet's maxPods). Sizes the maps
        /// the node's pods share: room for every pod (twice over, for pods
        /// still terminating beside their replacements) with every list at
        /// --max-list-entries, so a pod within its quota never fills them.
        #[arg(
            long,
            env = "MESHLANE_MAX_PODS",
            value_name = "N",
            default_value_t = bpf::capacity::DEFAULT_MAX_PODS,
            value_parser = bpf::capacity::parse_max_pods
        )]
        max_pods: u32,
        /// Print the parsed options as JSON and exit, without touching the
        /// kernel (to check what a deployment really passes).
        #[arg(long)]
        print_options: bool,
    },
    /// Turn the same-node shortcut on or off for new connections, without
    /// restarting anything (connections already shortcut keep it until they close).
    Shortcut {
        #[arg(value_enum)]
        state: OnOff,
        #[command(flatten)]
        at: Where,
        #[command(flatten)]
        output: output::Args,
    },
    /// Attached programs, pods and their state, map occupancy, and what is
    /// wrong: exits 0 when healthy, 1 naming each problem, 2 when the state
    /// cannot be read (or the command line is wrong).
    #[command(
        after_help = "Exit codes: 0 healthy: every program attached, the agent running and \
                  in touch with its pod source, every meshed pod that can be captured captured \
                  with its proxy listening. 1 unhealthy: each problem is listed (text: \
                  `problem:` lines; JSON/YAML: `problems`, with a stable `kind`). 2 the \
                  command line is wrong, or the state cannot be read (permissions, a status \
                  file that does not parse)."
    )]
    Status {
        /// Same as `-o json` (kept for scripts written before `-o`).
        #[arg(long, conflicts_with = "format")]
        json: bool,
        #[command(flatten)]
        at: Where,
        #[command(flatten)]
        output: output::Args,
    },
    /// Print a shell completion script (e.g. `meshlane completions bash >
    /// /etc/bash_completion.d/meshlane`).
    Completions { shell: clap_complete::Shell },
    /// One pod as the agent and the kernel see it: state, namespace,
    /// effective capture configuration, map entries, counters, and why it
    /// is or is not captured. Exits 1 when the agent does not know the pod.
    Describe {
        #[command(subcommand)]
        what: DescribeWhat,
    },
    /// Print the iptables-restore rules Istio would write for a pod, from
    /// meshlane's reading of it (to compare with, or migrate from, Istio).
    Iptables {
        /// Kubernetes Pod objects (YAML or JSON), `-` for stdin.
        #[arg(long, value_name = "FILE", required_unless_present = "kubeconfig")]
        pods: Option<PathBuf>,
        /// Read the pod from the API server this kubeconfig names (then
        /// --pod is NAMESPACE/NAME, NAME meaning default/NAME).
        #[arg(long, value_name = "PATH", conflicts_with = "pods")]
        kubeconfig: Option<PathBuf>,
        /// The pod: NAME or NAMESPACE/NAME.
        #[arg(long)]
        pod: String,
        /// IPv4 (iptables), IPv6 (ip6tables) or both.
        #[arg(long, value_enum, default_value = "ipv4")]
        family: FamilyArg,
        #[command(flatten)]
        output: output::Args,
    },
    /// Check every kernel feature the programs need (yes/no each); exits non-zero naming what is missing.
    Probe {
        /// cgroup-v2 directory to probe cgroup links under (default: the cgroup2 root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Probe for this eBPF object instead of the one built into the binary.
        #[arg(long)]
        ebpf_object: Option<PathBuf>,
        #[command(flatten)]
        output: output::Args,
    },
    /// Is meshlane working on every node of the cluster (or, with --pre,
    /// can it)? Asked through the API server a kubeconfig names; exits 0
    /// when nothing failed (warnings allowed), 1 naming each failure.
    #[command(
        after_help = "After install: meshlane's DaemonSet rolled out, a ready agent on \
                  every node it should run on, each agent's own status (programs attached, \
                  pods in error, proxies not listening yet, its API watch) read from /status on \
                  its http port through the API server's pod proxy, and no meshed namespace \
                  also under Istio's CNI plugin.\n\
                  Before install (--pre): a short-lived privileged probe pod on every Ready \
                  node runs `meshlane probe` of --image there (kernel features, cgroup v2, \
                  bpffs, other programs on meshlane's cgroup hooks such as Cilium's socket load \
                  balancer) and is deleted.\n\
                  Needs: list nodes, pods, daemonsets, configmaps; get pods/proxy; with --pre \
                  also create and delete pods and get pods/log in --namespace.\n\
                  Exit codes: 0 no failure; 1 at least one failure (each is listed); 2 the \
                  command line is wrong."
    )]
    Check {
        /// Before install: probe every node instead of checking the agents.
        #[arg(long, requires = "image")]
        pre: bool,
        /// kubeconfig to reach the API server (default: KUBECONFIG, then
        /// ~/.kube/config, then the in-cluster service account).
        #[arg(long, value_name = "PATH")]
        kubeconfig: Option<PathBuf>,
        /// meshlane's namespace (its DaemonSet; --pre's probe pods).
        #[arg(long, short = 'n', default_value = "meshlane")]
        namespace: String,
        /// Labels of meshlane's DaemonSet.
        #[arg(long, default_value = "app.kubernetes.io/name=meshlane")]
        selector: String,
        /// --pre: the meshlane image the chart will run (REPOSITORY:TAG or
        /// REPOSITORY@DIGEST); its `meshlane probe` runs on every node.
        #[arg(long, value_name = "IMAGE")]
        image: Option<String>,
        /// --pre: the nodes' cgroup filesystem (the chart's host.cgroup2);
        /// its cgroup v2 part is found for either layout.
        #[arg(long, value_name = "PATH", default_value = "/sys/fs/cgroup")]
        host_cgroup: String,
        /// --pre: the nodes' bpffs (the chart's host.bpffs).
        #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf")]
        host_bpffs: String,
        /// Longest wait, in seconds, for the API server, an agent's answer,
        /// or a probe pod to run.
        #[arg(long, value_name = "SECONDS", default_value_t = 120)]
        timeout: u64,
        #[command(flatten)]
        output: output::Args,
    },
    /// Stop the agent, detach and unpin everything meshlane owns.
    Cleanup {
        #[command(flatten)]
        at: Where,
        #[command(flatten)]
        output: output::Args,
    },
}

/// Runs the command line of the `meshlane` binary; its exit code.
pub fn main() -> ExitCode {
    // Exits 2 on a wrong command line.
    let cli = Cli::parse();
    let filter = logging::choose(
        cli.log_level.as_deref(),
        std::env::var("RUST_LOG").ok().as_deref(),
    );
    if let Err(e) = logging::init(&filter, cli.log_format) {
        eprintln!("Error: {e:#}");
        return ExitCode::from(EXIT_USAGE);
    }
    match run(cli, &filter) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn run(cli: Cli, filter: &logging::Filter) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            pods,
            node_name,
            kubeconfig,
            http_addr,
            metrics,
            cgroup,
            at,
            ebpf_object,
            shortcut,
            shortcut_max_queued,
            proxy_uid,
            outbound_capture_port,
            inbound_capture_port,
            max_list_entries,
            max_pods,
            print_options,
        } => {
            let cgroup = match cgroup {
                Some(c) => c,
                None => host::cgroup2_root()?,
            };
            let defaults = podconfig::NodeDefaults::new(
                proxy_uid,
                outbound_capture_port,
                inbound_capture_port,
            )
            .and_then(|d| d.with_max_list_entries(max_list_entries))
            .map_err(anyhow::Error::msg)?;
            let capacities = bpf::capacity::derive(max_pods, defaults.max_list_entries)
                .map_err(anyhow::Error::msg)?;
            let flags = serde_json::json!({
                "pods": pods,
                "node_name": node_name,
                "kubeconfig": kubeconfig,
                "http_addr": http_addr.to_string(),
            });
            let source = match (pods, node_name) {
                (Some(file), _) => source::Source::File(file),
                (None, Some(node_name)) => source::Source::Kubernetes(source::kube::Options {
                    node_name,
                    kubeconfig,
                }),
                (None, None) if !print_options => anyhow::bail!(
                    "the kubernetes pod source needs this node's name: pass --node-name or set \
                     NODE_NAME (from the downward API, spec.nodeName); or pass --pods FILE"
                ),
                (None, None) => source::Source::File(PathBuf::new()),
            };
            let opts = agent::Options {
                source,
                cgroup,
                layout: bpf::Layout::new(at.bpffs),
                state_dir: at.state_dir,
                ebpf_object,
                shortcut: shortcut == OnOff::On,
                shortcut_max_queued,
                defaults,
                capacities,
                metrics: *metrics,
            };
            if print_options {
                let mut v = serde_json::to_value(&opts)?;
                for (k, val) in flags.as_object().expect("object") {
                    v[k] = val.clone();
                }
                v["log_level"] = filter.directives.clone().into();
                v["log_format"] = serde_json::to_value(cli.log_format)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async move {
                    // Port and API configuration first: a mistake there stops
                    // the agent before it attaches anything.
                    let server = http::Server::bind(http_addr, &opts.metrics)?;
                    let pods = opts.source.spawn().await?;
                    agent::Agent::start(opts)?.run(pods, server).await
                })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json, at, output } => {
            let r = match status::report(&bpf::Layout::new(&at.bpffs), &at.state_dir) {
                Ok(r) => r,
                // Neither healthy nor unhealthy: cannot tell.
                Err(e) => {
                    eprintln!("Error: {e:?}");
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            };
            let format = if json {
                output::Format::Json
            } else {
                output.format
            };
            output::emit(format, &r, status::print)?;
            Ok(ExitCode::from(if r.healthy {
                EXIT_OK
            } else {
                EXIT_FAILED
            }))
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "meshlane", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe {
            what: DescribeWhat::Pod { name, at, output },
        } => match describe::describe(&bpf::Layout::new(&at.bpffs), &at.state_dir, &name) {
            Ok(Some(d)) => {
                output::emit(output.format, &d, describe::print)?;
                Ok(ExitCode::from(EXIT_OK))
            }
            Ok(None) => {
                eprintln!("Error: the agent knows no pod {name:?} on this node");
                Ok(ExitCode::from(EXIT_FAILED))
            }
            Err(e) => {
                eprintln!("Error: {e:?}");
                Ok(ExitCode::from(EXIT_USAGE))
            }
        },
        Command::Iptables {
            pods,
            kubeconfig,
            pod,
            family,
            output,
        } => {
            let p = match pods {
                Some(file) => pod_from_file(&file, &pod)?,
                None => {
                    let (ns, name) = pod.split_once('/').unwrap_or(("default", &pod));
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                        .block_on(source::kube::get_pod(kubeconfig, ns, name))?
                        .with_context(|| format!("the API server has no pod {ns}/{name}"))?
                }
            };
            print_iptables(&p, family, output.format)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Shortcut { state, at, output } => {
            let mut maps = bpf::Maps::open(&bpf::Layout::new(&at.bpffs)).with_context(|| {
                format!(
                    "no meshlane maps under {} (is the agent installed?)",
                    at.bpffs.display()
                )
            })?;
            maps.set_shortcut(state == OnOff::On)?;
            let doc = ShortcutDoc {
                schema: "meshlane/shortcut/v1",
                shortcut: state,
            };
            output::emit(output.format, &doc, |d| {
                eprintln!(
                    "shortcut {} for new connections",
                    if d.shortcut == OnOff::On { "on" } else { "off" }
                );
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cleanup { at, output } => {
            let doc = cleanup(&at)?;
            output::emit(output.format, &doc, |d| {
                if let Some(pid) = d.stopped_agent_pid {
                    eprintln!("stopped agent pid {pid}");
                }
                eprintln!(
                    "removed {} pinned objects under {}",
                    d.removed.len(),
                    d.bpffs
                );
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            pre,
            kubeconfig,
            namespace,
            selector,
            image,
            host_cgroup,
            host_bpffs,
            timeout,
            output,
        } => {
            let opts = check::cluster::Options {
                kubeconfig,
                namespace,
                selector,
                pre,
                image,
                host_cgroup,
                host_bpffs,
                timeout: Duration::from_secs(timeout.max(1)),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(check::cluster::run(&opts));
            output::emit(output.format, &report, check::print)?;
            Ok(ExitCode::from(if report.healthy {
                EXIT_OK
            } else {
                EXIT_FAILED
            }))
        }
        Command::Probe {
            cgroup,
            ebpf_object,
            output,
        } => {
            probe::run_cli(
                &bpf::object_bytes(ebpf_object.as_deref())?,
                cgroup.as_deref(),
                output.format,
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `meshlane shortcut -o json|yaml`.
#[derive(Serialize)]
struct ShortcutDoc {
    schema: &'static str,
    /// The switch as now set for new connections.
    shortcut: OnOff,
}

/// `meshlane cleanup -o json|yaml`.
#[derive(Serialize)]
struct CleanupDoc {
    schema: &'static str,
    bpffs: String,
    /// The agent stopped first, if one ran with this bpffs directory.
    stopped_agent_pid: Option<u32>,
    /// Every pinned object removed (its link, program or map path).
    removed: Vec<PathBuf>,
}

fn cleanup(at: &Where) -> Result<CleanupDoc> {
    let mut stopped_agent_pid = None;
    if let Some(st) = status::AgentStatus::load(&at.state_dir)? {
        if st.agent_alive() && st.bpffs == at.bpffs.display().to_string() {
            let pid = nix::unistd::Pid::from_raw(st.pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            for _ in 0..50 {
                if !st.agent_alive() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if st.agent_alive() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            stopped_agent_pid = Some(st.pid);
        }
        let _ = std::fs::remove_file(at.state_dir.join("status.json"));
    }
    let removed = bpf::uninstall(&bpf::Layout::new(&at.bpffs))?;
    Ok(CleanupDoc {
        schema: "meshlane/cleanup/v1",
        bpffs: at.bpffs.display().to_string(),
        stopped_agent_pid,
        removed,
    })
}

/// Pod `name` (NAME or NAMESPACE/NAME) of a pods file, `-` for stdin.
fn pod_from_file(file: &std::path::Path, name: &str) -> Result<pods::Pod> {
    let stdin = file.as_os_str() == "-";
    let shown = if stdin {
        "stdin".to_string()
    } else {
        file.display().to_string()
    };
    let text = if stdin {
        std::io::read_to_string(std::io::stdin()).context("reading pods from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading pods file {shown}"))?
    };
    let all = pods::parse(&text).with_context(|| format!("pods from {shown}"))?;
    let matches: Vec<&pods::Pod> = all
        .iter()
        .filter(|p| p.key() == name || (!name.contains('/') && p.name == name))
        .collect();
    match matches.as_slice() {
        [p] => Ok((*p).clone()),
        [] => anyhow::bail!("no pod {name:?} in {shown}"),
        _ => anyhow::bail!("{name:?} names several pods in {shown}: use NAMESPACE/NAME"),
    }
}

fn print_iptables(pod: &pods::Pod, family: FamilyArg, format: output::Format) -> Result<()> {
    if !pod.meshed {
        anyhow::bail!("pod {} is not meshed (no istio-proxy container, no sidecar.istio.io/status): Istio writes no rules", pod.key());
    }
    let cfg = podconfig::MeshConfig::from_pod(pod);
    for e in &cfg.errors {
        eprintln!("warning: pod {}: {e}", pod.key());
    }
    let doc = iptables_doc(pod, &cfg, family);
    for n in &doc.notes {
        eprintln!("pod {}: {n}", pod.key());
    }
    output::emit(format, &doc, |d| print!("{}", d.text()))
}

/// `meshlane iptables -o json|yaml`.
#[derive(Debug, Serialize)]
struct IptablesDoc {
    schema: &'static str,
    pod: String,
    family: FamilyArg,
    /// `iptables-restore` input, then `ip6tables-restore` input; none when
    /// Istio writes no rules for the pod.
    rule_sets: Vec<RuleSet>,
    /// Why a rule set asked for is missing (also on stderr).
    notes: Vec<String>,
    /// Annotations rejected (their defaults are used; also on stderr).
    config_errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct RuleSet {
    /// `ipv4` or `ipv6`.
    family: &'static str,
    /// The command that loads `rules`.
    tool: &'static str,
    rules: String,
}

impl IptablesDoc {
    /// The text form: the rules, each set after a comment naming its tool
    /// when both were asked for.
    fn text(&self) -> String {
        let mut out = String::new();
        for set in &self.rule_sets {
            if self.family == FamilyArg::Both {
                let label = if set.family == "ipv6" { "IPv6" } else { "IPv4" };
                out.push_str(&format!("# {} ({label})\n", set.tool));
            }
            out.push_str(&set.rules);
        }
        out
    }
}

/// What `meshlane iptables` prints for a meshed pod.
fn iptables_doc(pod: &pods::Pod, cfg: &podconfig::MeshConfig, family: FamilyArg) -> IptablesDoc {
    use iptables::Family;
    let mut doc = IptablesDoc {
        schema: "meshlane/iptables/v1",
        pod: pod.key(),
        family,
        rule_sets: Vec::new(),
        notes: Vec::new(),
        config_errors: cfg.errors.iter().map(ToString::to_string).collect(),
    };
    let notes = &mut doc.notes;
    if cfg.mode == podconfig::Mode::None {
        notes.push("interceptionMode NONE: Istio writes no rules".to_string());
        return doc;
    }
    let has_v6 = pod.ips.iter().any(std::net::IpAddr::is_ipv6);
    let want_v6 = family != FamilyArg::Ipv4;
    if want_v6 && pod.ips.is_empty() {
        notes.push(
            "lists no addresses: the ip6tables rules apply only once it has an IPv6 one".into(),
        );
    } else if want_v6 && !has_v6 {
        notes.push("has no IPv6 address: Istio writes no ip6tables rules".into());
    }
    let v6 = want_v6 && (has_v6 || pod.ips.is_empty());
    let mut add = |fam: Family, family: &'static str, tool: &'static str| {
        doc.rule_sets.push(RuleSet {
            family,
            tool,
            rules: iptables::render_family(cfg, fam).unwrap_or_default(),
        });
    };
    if family != FamilyArg::Ipv6 {
        add(Family::Ipv4, "ipv4", "iptables-restore");
    }
    if v6 {
        add(Family::Ipv6, "ipv6", "ip6tables-restore");
    }
    doc
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::istio::annotation;

    /// The text and notes of `meshlane iptables`.
    fn iptables_text(
        pod: &pods::Pod,
        cfg: &podconfig::MeshConfig,
        family: FamilyArg,
    ) -> (String, Vec<String>) {
        let doc = iptables_doc(pod, cfg, family);
        (doc.text(), doc.notes)
    }

    fn pod(ips: &[&str]) -> pods::Pod {
        pods::Pod::meshed_with(
            ("ns", "p"),
            [(annotation::STATUS.to_string(), "true".to_string())].into(),
            ips.iter().map(|a| a.parse::<IpAddr>().unwrap()).collect(),
        )
    }

    #[test]
    fn iptables_family_selects_the_rule_sets() {
        let dual = pod(&["10.244.1.5", "fd00::5"]);
        let cfg = podconfig::MeshConfig::from_pod(&dual);
        let v4 = iptables::render(&cfg).unwrap();
        let v6 = iptables::render6(&cfg).unwrap();
        assert_eq!(
            iptables_text(&dual, &cfg, FamilyArg::Ipv4),
            (v4.clone(), vec![])
        );
        assert_eq!(
            iptables_text(&dual, &cfg, FamilyArg::Ipv6),
            (v6.clone(), vec![])
        );
        let (both, notes) = iptables_text(&dual, &cfg, FamilyArg::Both);
        assert!(notes.is_empty());
        assert_eq!(
            both,
            format!("# iptables-restore (IPv4)\n{v4}# ip6tables-restore (IPv6)\n{v6}")
        );
        assert!(v6.contains("-o lo -s ::6/128 -j RETURN"), "{v6}");

        // An IPv4-only pod gets no ip6tables rules, and a note saying so.
        let v4only = pod(&["10.244.1.5"]);
        let (text, notes) = iptables_text(&v4only, &cfg, FamilyArg::Ipv6);
        assert_eq!(text, "");
        assert!(notes[0].contains("no IPv6 address"), "{notes:?}");
        let (text, _) = iptables_text(&v4only, &cfg, FamilyArg::Both);
        assert_eq!(text, format!("# iptables-restore (IPv4)\n{v4}"));
    }
}

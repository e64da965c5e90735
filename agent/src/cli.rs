//! The command line: parses the flags and wires each command to the
//! library's modules.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::{agent, bpf, host, http, iptables, podconfig, pods, probe, source, status};

#[derive(Parser)]
#[command(
    name = "meshlane",
    version,
    about = "eBPF sidecar interception, a drop-in for Istio's iptables init container"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. info or meshlane=debug.
    #[arg(long, global = true, env = "MESHLANE_LOG", default_value = "info")]
    log_level: String,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
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
        /// Where /healthz, /readyz and /metrics are served.
        #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:15030")]
        http_addr: std::net::SocketAddr,
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
    },
    /// Attached programs, pods and their state, map occupancy.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: Where,
    },
    /// Print the iptables-restore rules Istio would write for a pod, from
    /// meshlane's reading of it (to compare with, or migrate from, Istio).
    Iptables {
        #[arg(long, value_name = "FILE")]
        pods: PathBuf,
        /// The pod: NAME or NAMESPACE/NAME.
        #[arg(long)]
        pod: String,
    },
    /// Check every kernel feature the programs need (yes/no each); exits non-zero naming what is missing.
    Probe {
        /// cgroup-v2 directory to probe cgroup links under (default: the cgroup2 root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Probe for this eBPF object instead of the one built into the binary.
        #[arg(long)]
        ebpf_object: Option<PathBuf>,
    },
    /// Stop the agent, detach and unpin everything meshlane owns.
    Cleanup {
        #[command(flatten)]
        at: Where,
    },
}

/// Runs the command line of the `meshlane` binary.
pub fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("--log-level")?,
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run {
            pods,
            node_name,
            kubeconfig,
            http_addr,
            cgroup,
            at,
            ebpf_object,
            shortcut,
            shortcut_max_queued,
            proxy_uid,
            outbound_capture_port,
            inbound_capture_port,
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
            };
            if print_options {
                let mut v = serde_json::to_value(&opts)?;
                for (k, val) in flags.as_object().expect("object") {
                    v[k] = val.clone();
                }
                v["log_level"] = cli.log_level.clone().into();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async move {
                    // Port and API configuration first: a mistake there stops
                    // the agent before it attaches anything.
                    let server = http::Server::bind(http_addr).await?;
                    let pods = opts.source.spawn().await?;
                    agent::Agent::start(opts)?.run(pods, server).await
                })
        }
        Command::Status { json, at } => {
            let r = status::report(&bpf::Layout::new(&at.bpffs), &at.state_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                status::print(&r);
            }
            Ok(())
        }
        Command::Iptables { pods, pod } => print_iptables(&pods, &pod),
        Command::Shortcut { state, at } => {
            let mut maps = bpf::Maps::open(&bpf::Layout::new(&at.bpffs)).with_context(|| {
                format!(
                    "no meshlane maps under {} (is the agent installed?)",
                    at.bpffs.display()
                )
            })?;
            maps.set_shortcut(state == OnOff::On)?;
            eprintln!(
                "shortcut {} for new connections",
                if state == OnOff::On { "on" } else { "off" }
            );
            Ok(())
        }
        Command::Cleanup { at } => cleanup(&at),
        Command::Probe {
            cgroup,
            ebpf_object,
        } => probe::run_cli(
            &bpf::object_bytes(ebpf_object.as_deref())?,
            cgroup.as_deref(),
        ),
    }
}

fn cleanup(at: &Where) -> Result<()> {
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
            eprintln!("stopped agent pid {}", st.pid);
        }
        let _ = std::fs::remove_file(at.state_dir.join("status.json"));
    }
    let removed = bpf::uninstall(&bpf::Layout::new(&at.bpffs))?;
    eprintln!(
        "removed {} pinned objects under {}",
        removed.len(),
        at.bpffs.display()
    );
    Ok(())
}

fn print_iptables(file: &std::path::Path, name: &str) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading pods file {}", file.display()))?;
    let all = pods::parse(&text).with_context(|| format!("pods file {}", file.display()))?;
    let matches: Vec<&pods::Pod> = all
        .iter()
        .filter(|p| p.key() == name || (!name.contains('/') && p.name == name))
        .collect();
    let pod = match matches.as_slice() {
        [p] => *p,
        [] => anyhow::bail!("no pod {name:?} in {}", file.display()),
        _ => anyhow::bail!(
            "{name:?} names several pods in {}: use NAMESPACE/NAME",
            file.display()
        ),
    };
    if !pod.meshed {
        anyhow::bail!("pod {} is not meshed (no istio-proxy container, no sidecar.istio.io/status): Istio writes no rules", pod.key());
    }
    let cfg = podconfig::MeshConfig::from_pod(pod);
    for e in &cfg.errors {
        eprintln!("warning: pod {}: {e}", pod.key());
    }
    match iptables::render(&cfg) {
        Some(rules) => print!("{rules}"),
        None => eprintln!(
            "pod {}: interceptionMode NONE: Istio writes no rules",
            pod.key()
        ),
    }
    Ok(())
}

//! `meshlane-cni`: what a runtime runs, last in the pod network's chain.
//!
//! ADD hands the agent the pod (CNI_ARGS), the namespace the runtime made
//! (CNI_NETNS) and the addresses earlier plugins gave it (prevResult), and
//! returns prevResult unchanged once the agent says the pod is captured or
//! that meshlane leaves it alone. The rule when the agent cannot answer
//! (not running, a socket answering garbage, a pod it does not list):
//!
//! - the plugin reads the pod itself from `podSource` (the agent's pods
//!   file, or the API server through a kubeconfig): an unmeshed pod starts
//!   at once, whatever state the agent is in;
//! - a meshed pod, or a pod that cannot be read (no `podSource`, the API
//!   server unreachable, the pod not listed), waits for the agent up to
//!   `timeoutMs` and then fails with code 11 (try again later), naming the
//!   pod and the reason: the runtime retries, and the pod never starts
//!   uncaptured;
//! - a pod in `excludeNamespaces`, or a container the runtime names no pod
//!   for (no K8S_POD_NAME in CNI_ARGS), is not meshlane's and returns at
//!   once (K8S_POD_NAME without K8S_POD_NAMESPACE, as podman passes it, is
//!   a pod in `default`).
//!
//! DEL tells the agent and never fails (the agent's recheck removes what a
//! lost DEL leaves). CHECK asks the agent and fails for a meshed pod it
//! does not hold.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::IpAddr,
    os::{fd::AsFd, unix::net::UnixStream},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use super::{
    proto::{self, PodRef, Reply, Request},
    spec::{self, code, CniError, Command, Env, NetConf, PodSource},
};
use crate::pods::Pod;

/// Pause between two questions to an agent that cannot answer yet.
const RETRY: Duration = Duration::from_millis(100);
/// How long DEL waits for the agent: it never fails, so it need not wait long.
const DEL_TIMEOUT: Duration = Duration::from_secs(2);

/// The binary's main: stdin and the environment in, the result or the
/// spec's error JSON on stdout.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let out = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => run(|k| std::env::var(k).ok(), &stdin),
        Err(e) => Err(CniError::new(code::IO, format!("reading stdin: {e}"))),
    };
    match out {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}", serde_json::to_string(&e).expect("errors serialise"));
            ExitCode::FAILURE
        }
    }
}

/// One invocation: what to print on success.
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<String, CniError> {
    let env = Env::read(env)?;
    if env.command == Command::Version {
        return Ok(spec::version_result().to_string());
    }
    let conf = NetConf::parse(stdin)?;
    let r = match env.command {
        Command::Add => add(&conf, &env),
        Command::Check => check(&conf, &env).map(|()| String::new()),
        Command::Del => {
            del(&conf, &env);
            Ok(String::new())
        }
        Command::Version => unreachable!("answered above"),
    };
    r.map_err(|e| conf.error(e))
}

/// How the pod looks to the plugin's own reading of the pod source.
#[derive(Debug)]
enum Own {
    /// Not meshed, or host network: meshlane leaves it alone.
    Unmeshed,
    Meshed,
    /// Cannot tell (the reason).
    Unknown(String),
}

fn own_lookup(src: Option<&PodSource>, pod: &PodRef) -> Own {
    let Some(src) = src else {
        return Own::Unknown("the network config names no podSource to read the pod from".into());
    };
    let found: Result<Option<Pod>, String> = match (&src.pods_file, &src.kubeconfig) {
        (Some(file), _) => std::fs::read_to_string(file)
            .map_err(|e| format!("reading pods file {}: {e}", file.display()))
            .and_then(|t| {
                crate::pods::parse(&t).map_err(|e| format!("pods file {}: {e:#}", file.display()))
            })
            .map(|ps| ps.into_iter().find(|p| p.key() == pod.key())),
        (None, kubeconfig) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting a runtime: {e}"))
            .and_then(|rt| {
                rt.block_on(crate::source::kube::get_pod(
                    kubeconfig.clone(),
                    &pod.namespace,
                    &pod.name,
                ))
                .map_err(|e| format!("{e:#}"))
            }),
    };
    match found {
        Ok(Some(p)) if p.meshed && !p.host_network => Own::Meshed,
        Ok(Some(_)) => Own::Unmeshed,
        Ok(None) => Own::Unknown("the pod source does not list the pod".into()),
        Err(e) => Own::Unknown(e),
    }
}

/// Why the agent gave no answer.
enum NoAnswer {
    /// Nothing listens (not running, not started yet).
    Down(String),
    /// Something answered that is not a meshlane reply.
    Garbage(String),
}

/// One request, one reply, within `deadline`.
fn ask(socket: &Path, req: &Request, deadline: Instant) -> Result<Reply, NoAnswer> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut s = UnixStream::connect(socket)
        .map_err(|e| NoAnswer::Down(format!("connecting to {}: {e}", socket.display())))?;
    let io = |e: std::io::Error| NoAnswer::Down(format!("talking to {}: {e}", socket.display()));
    s.set_write_timeout(Some(left())).map_err(io)?;
    let mut line = serde_json::to_string(req).expect("requests serialise");
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    s.set_read_timeout(Some(left())).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(s.take(proto::MAX_LINE))
        .read_line(&mut reply)
        .map_err(io)?;
    serde_json::from_str(&reply).map_err(|e| {
        let shown: String = reply.chars().take(120).collect();
        NoAnswer::Garbage(format!(
            "{} answered {shown:?}, which is not a meshlane reply ({e})",
            socket.display()
        ))
    })
}

/// What the plugin concluded for a pod.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Captured,
    LeftAlone,
}

/// Asks the agent until it confirms the pod or the config's timeout passes
/// (once, without waiting for a capture, unless `wait`); falls back on the
/// plugin's own reading of the pod only to let an unmeshed pod through.
fn confirm(conf: &NetConf, pod: &PodRef, req: &Request, wait: bool) -> Result<Verdict, CniError> {
    let socket = proto::socket_path(&conf.state_dir);
    let timeout = conf.timeout;
    let deadline = Instant::now() + timeout;
    let mut own: Option<Own> = None;
    let look = |own: &mut Option<Own>| -> bool {
        matches!(
            own.get_or_insert_with(|| own_lookup(conf.pod_source.as_ref(), pod)),
            Own::Unmeshed
        )
    };
    let key = pod.key();
    let mut last;
    loop {
        match ask(&socket, req, deadline) {
            Ok(Reply::Captured { .. }) => return Ok(Verdict::Captured),
            Ok(Reply::NotCaptured { why }) => {
                eprintln!("meshlane-cni: pod {key}: {why}; left alone");
                return Ok(Verdict::LeftAlone);
            }
            Ok(Reply::Error { msg }) => {
                return Err(CniError::new(
                    code::AGENT_REFUSED,
                    format!("pod {key}: the meshlane agent refused it: {msg}"),
                ))
            }
            Ok(Reply::Pending { why }) => {
                last = format!("the agent has not captured it yet: {why}");
            }
            Ok(Reply::Unknown { source, synced }) => {
                last = format!(
                    "the agent's pod source ({source}) does not list the pod{}",
                    if synced {
                        ""
                    } else {
                        " (it has not synced yet)"
                    }
                );
                if look(&mut own) {
                    return Ok(Verdict::LeftAlone);
                }
            }
            Ok(Reply::Released) => {
                last = format!(
                    "{} answered a DEL reply to another request",
                    socket.display()
                );
            }
            Err(NoAnswer::Down(e)) => {
                last = format!("the meshlane agent is not reachable: {e}");
                if look(&mut own) {
                    eprintln!(
                        "meshlane-cni: pod {key}: {last}; the pod is not meshed, so it starts"
                    );
                    return Ok(Verdict::LeftAlone);
                }
            }
            Err(NoAnswer::Garbage(e)) => {
                if look(&mut own) {
                    eprintln!("meshlane-cni: pod {key}: {e}; the pod is not meshed, so it starts");
                    return Ok(Verdict::LeftAlone);
                }
                return Err(CniError::new(
                    code::AGENT_PROTOCOL,
                    format!("pod {key} not captured: the meshlane agent's socket {e}"),
                )
                .details(own_detail(own.as_ref())));
            }
        }
        if !wait || Instant::now() + RETRY >= deadline {
            break;
        }
        std::thread::sleep(RETRY);
    }
    Err(CniError::new(
        code::TRY_AGAIN,
        format!(
            "pod {key} not confirmed captured{}: {last}",
            if wait {
                format!(" within {} ms", timeout.as_millis())
            } else {
                String::new()
            }
        ),
    )
    .details(own_detail(own.as_ref())))
}

fn own_detail(own: Option<&Own>) -> String {
    match own {
        Some(Own::Meshed) => "the pod source says the pod is meshed: it must not start uncaptured".into(),
        Some(Own::Unknown(why)) => format!(
            "whether the pod is meshed cannot be told without the agent ({why}): it is held, as a meshed pod would be"
        ),
        Some(Own::Unmeshed) | None => String::new(),
    }
}

fn add(conf: &NetConf, env: &Env) -> Result<String, CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "no prevResult: meshlane-cni is chained after the plugin that gives the pod its addresses",
        )
    })?;
    let ips = spec::prev_ips(prev)?;
    let out = prev.to_string();
    let netns = env
        .netns
        .clone()
        .expect("Env::read requires CNI_NETNS for ADD");
    let Some(pod) = env.pod() else {
        eprintln!("meshlane-cni: no K8S_POD_NAME in CNI_ARGS: not a pod, left alone");
        return Ok(out);
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(out);
    }
    let req = Request::Add {
        pod: pod.clone(),
        container_id: env.container_id.clone(),
        netns: netns.clone(),
        ips: ips.clone(),
    };
    if confirm(conf, &pod, &req, true)? == Verdict::Captured && ips.iter().any(IpAddr::is_ipv6) {
        add_passthrough_v6(&netns).map_err(|e| {
            CniError::new(
                code::IO,
                format!(
                    "pod {}: adding ::6/128 to lo in {} (the proxy's IPv6 inbound passthrough source): {e}",
                    pod.key(),
                    netns.display()
                ),
            )
        })?;
    }
    Ok(out)
}

fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    if conf.prev_result.is_none() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "CHECK without prevResult",
        ));
    }
    let Some(pod) = env.pod() else {
        return Ok(());
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(());
    }
    let req = Request::Check {
        pod: pod.clone(),
        container_id: env.container_id.clone(),
        netns: env
            .netns
            .clone()
            .expect("Env::read requires CNI_NETNS for CHECK"),
    };
    // CHECK looks, it does not wait for a capture to happen.
    confirm(conf, &pod, &req, false)
        .map(|_| ())
        .map_err(|mut e| {
            if e.code == code::TRY_AGAIN {
                e.code = code::NOT_CAPTURED;
            }
            e
        })
}

fn del(conf: &NetConf, env: &Env) {
    let req = Request::Del {
        pod: env.pod(),
        container_id: env.container_id.clone(),
    };
    let socket = proto::socket_path(&conf.state_dir);
    match ask(&socket, &req, Instant::now() + DEL_TIMEOUT) {
        Ok(Reply::Released) => {}
        Ok(other) => eprintln!("meshlane-cni: DEL: unexpected reply {other:?}"),
        Err(NoAnswer::Down(e) | NoAnswer::Garbage(e)) => {
            eprintln!("meshlane-cni: DEL: {e}; the agent removes the entries when it finds the namespace gone")
        }
    }
}

/// `ip -6 addr add ::6/128 dev lo` in the pod's namespace: the address
/// Envoy binds for IPv6 inbound passthrough, which istio-iptables adds.
/// Already there is fine.
fn add_passthrough_v6(netns: &Path) -> std::io::Result<()> {
    let path: PathBuf = netns.to_path_buf();
    std::thread::spawn(move || -> std::io::Result<()> {
        let f = std::fs::File::open(&path)?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        let sock = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet6,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let lo = nix::net::if_::if_nametoindex("lo")?;
        let req = libc::in6_ifreq {
            ifr6_addr: libc::in6_addr {
                s6_addr: meshlane_common::V6::PASSTHROUGH_SRC.to_std().octets(),
            },
            ifr6_prefixlen: 128,
            ifr6_ifindex: lo as libc::c_int,
        };
        // SAFETY: a valid socket and a live, correctly sized in6_ifreq.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::SIOCSIFADDR,
                &raw const req,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| std::io::Error::other("the netns thread panicked"))?
}

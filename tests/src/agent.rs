//! Running the real `meshlane` agent against a sandbox: a pods file the test
//! writes (or another pod source, see [`Agent::start_with`]), a bpffs
//! directory and state directory of the sandbox's own, and the programs
//! attached to the sandbox's cgroup only. Its HTTP endpoints listen on a port
//! of 127.0.0.1 the kernel picks ([`Agent::http_get`]). Drop runs
//! `meshlane cleanup`, so nothing stays attached or pinned, also on panic.
use std::{
    ffi::OsString,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{Pod, Sandbox};

/// Path of the `meshlane` binary: $MESHLANE_BIN, else `meshlane` in the
/// profile directory of the running executable.
pub fn meshlane_bin() -> PathBuf {
    crate::sandbox::sibling_bin(
        "meshlane",
        "MESHLANE_BIN",
        "cargo xtask build-ebpf && cargo build -p meshlane",
    )
}

/// Why this kernel cannot have the same-node shortcut (None: it can, or
/// the probe did not say), from `meshlane probe`'s line about it. Tests of
/// the shortcut skip loudly with this reason.
pub fn shortcut_unsupported() -> Option<String> {
    let out = Command::new(meshlane_bin()).arg("probe").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("shortcut backpressure:"))
        .map(str::trim)
        .filter(|rest| rest.starts_with("NO"))
        .map(str::to_string)
}

/// How a test describes a pod for the pods file.
#[derive(Clone, Debug, Default)]
pub struct PodSpec {
    pub name: String,
    pub ip: Option<std::net::Ipv4Addr>,
    /// The IPv6 address, listed after the IPv4 one in status.podIPs.
    pub ip6: Option<std::net::Ipv6Addr>,
    pub meshed: bool,
    pub annotations: Vec<(String, String)>,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub proxy_env: Vec<(String, String)>,
    /// `spec.hostUsers` (None: not written, Kubernetes' default true).
    pub host_users: Option<bool>,
}

impl PodSpec {
    /// A meshed pod with the sandbox pod's addresses (both families for a
    /// dual-stack pod).
    pub fn meshed(pod: &Pod) -> Self {
        Self {
            name: pod.name.clone(),
            ip: pod.ipv4(),
            ip6: pod.ip6,
            meshed: true,
            ..Default::default()
        }
    }
    pub fn plain(pod: &Pod) -> Self {
        Self {
            meshed: false,
            ..Self::meshed(pod)
        }
    }
    /// Lists only the pod's IPv4 address, as Kubernetes does for a pod of a
    /// single-stack IPv4 cluster even where its namespace has IPv6 too.
    pub fn ipv4_only(mut self) -> Self {
        self.ip6 = None;
        self
    }
    /// Sets an environment variable of the istio-proxy container
    /// (`ISTIO_META_DNS_CAPTURE`, say).
    pub fn proxy_env(mut self, k: &str, v: &str) -> Self {
        self.proxy_env.push((k.into(), v.into()));
        self
    }
    /// The pod has an address the pods file lists.
    pub fn has_ip(&self) -> bool {
        self.ip.is_some() || self.ip6.is_some()
    }
    /// `spec.hostUsers: false`: the pod runs in a user namespace of its own.
    pub fn user_namespace(mut self) -> Self {
        self.host_users = Some(false);
        self
    }
    pub fn annotate(mut self, k: &str, v: &str) -> Self {
        self.annotations.push((k.into(), v.into()));
        self
    }

    /// The Pod object as `kubectl get pod -o json` would print it (the parts
    /// meshlane reads, and some it must ignore).
    pub fn to_json(&self) -> Value {
        let mut ann = serde_json::Map::new();
        if self.meshed {
            ann.insert(
                "sidecar.istio.io/status".into(),
                json!("{\"containers\":[\"istio-proxy\"]}"),
            );
        }
        for (k, v) in &self.annotations {
            ann.insert(k.clone(), json!(v));
        }
        let mut containers = vec![
            json!({"name": "app", "image": "example/app:1", "ports": [{"containerPort": 9080}]}),
        ];
        if self.meshed {
            let mut sc = serde_json::Map::new();
            if let Some(u) = self.run_as_user {
                sc.insert("runAsUser".into(), json!(u));
            }
            if let Some(g) = self.run_as_group {
                sc.insert("runAsGroup".into(), json!(g));
            }
            let env: Vec<Value> = self
                .proxy_env
                .iter()
                .map(|(k, v)| json!({"name": k, "value": v}))
                .collect();
            containers.push(json!({"name": "istio-proxy", "image": "istio/proxyv2:1.24", "securityContext": sc, "env": env}));
        }
        // IPv4 first, as Kubernetes lists a dual-stack pod of an
        // IPv4-primary cluster; podIP is the first of podIPs.
        let ips: Vec<String> = self
            .ip
            .map(|a| a.to_string())
            .into_iter()
            .chain(self.ip6.map(|a| a.to_string()))
            .collect();
        let status = match ips.first() {
            Some(first) => {
                let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
                json!({"phase": "Running", "podIP": first, "podIPs": pod_ips})
            }
            None => json!({"phase": "Pending"}),
        };
        let mut spec = json!({"containers": containers, "nodeName": "node-1"});
        if let Some(h) = self.host_users {
            spec["hostUsers"] = json!(h);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": "default", "annotations": ann, "uid": format!("uid-{}", self.name)},
            "spec": spec,
            "status": status,
        })
    }
}

pub fn pod_list(pods: &[PodSpec]) -> String {
    let items: Vec<Value> = pods.iter().map(PodSpec::to_json).collect();
    serde_json::to_string_pretty(&json!({"apiVersion": "v1", "kind": "PodList", "items": items}))
        .expect("json")
}

pub struct Agent {
    child: Option<Child>,
    pub pods_file: PathBuf,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    stderr_log: PathBuf,
    /// `meshlane run` arguments, to start the agent again.
    args: Vec<std::ffi::OsString>,
    /// Command prefix (see [`Launch::wrapper`]).
    wrapper: Vec<String>,
    /// The agent binary (see [`Launch::bin`]).
    bin: PathBuf,
    /// Environment changes (see [`Launch::env`]).
    env: Vec<(String, Option<String>)>,
}

/// How a test starts the agent beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// Command prefix, e.g. `setpriv` with the capability set a deployment grants.
    pub wrapper: Vec<String>,
    /// Attach here instead of the sandbox's cgroup (e.g. a read-only bind mount of it).
    pub cgroup: Option<PathBuf>,
    /// Environment variables to set (Some) or remove (None), applied after
    /// the default `MESHLANE_LOG=info`.
    pub env: Vec<(String, Option<String>)>,
    /// Another `meshlane` binary to run (an earlier commit's, say) instead
    /// of this build's; cleanup always uses this build's.
    pub bin: Option<PathBuf>,
}

impl Agent {
    /// Starts `meshlane run` for the sandbox with these pods and waits until
    /// every meshed pod with an IP is active.
    pub fn start(sb: &Sandbox, pods: &[PodSpec]) -> Result<Agent> {
        Self::start_on(sb, 1, pods, &[])
    }

    /// Starts the agent of node 1 or 2 of the sandbox (each node has its own
    /// cgroup, bpffs directory, state and pods file), with extra `meshlane
    /// run` arguments.
    pub fn start_on(sb: &Sandbox, node: u8, pods: &[PodSpec], extra: &[&str]) -> Result<Agent> {
        let mut agent = Self::spawn_on(sb, node, pods, extra, &Launch::default())?;
        let expect_active: Vec<String> = pods
            .iter()
            .filter(|p| p.meshed && p.has_ip())
            .map(|p| format!("default/{}", p.name))
            .collect();
        agent.wait_active(&expect_active)?;
        Ok(agent)
    }

    /// Starts node 1's `meshlane run ARGS...` (ARGS name the pod source, for
    /// one other than a pods file) and waits until the agent has written its
    /// status and every pod named in `expect_active` is active.
    pub fn start_with(sb: &Sandbox, args: &[OsString], expect_active: &[String]) -> Result<Agent> {
        Self::start_launched(sb, args, expect_active, &Launch::default())
    }

    /// [`Agent::start_with`], started as `launch` says.
    pub fn start_launched(
        sb: &Sandbox,
        args: &[OsString],
        expect_active: &[String],
        launch: &Launch,
    ) -> Result<Agent> {
        let mut agent = Self::launch(sb, 1, args.to_vec(), launch)?;
        agent.wait_active(expect_active)?;
        Ok(agent)
    }

    /// Starts node `node`'s `meshlane run ARGS...` (ARGS name the pod
    /// source) and waits until every pod named in `expect_active` is active.
    pub fn start_on_with(
        sb: &Sandbox,
        node: u8,
        args: &[OsString],
        expect_active: &[String],
    ) -> Result<Agent> {
        let mut agent = Self::launch(sb, node, args.to_vec(), &Launch::default())?;
        agent.wait_active(expect_active)?;
        Ok(agent)
    }

    /// Detaches one cgroup program (its pinned link removed: nothing else
    /// holds it); returns its name.
    pub fn detach_a_program(&self) -> Result<String> {
        let links = self.bpffs.join("links");
        let name = std::fs::read_dir(&links)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .min()
            .context("no pinned links")?;
        std::fs::remove_file(links.join(&name))?;
        Ok(name)
    }

    /// Waits until the agent's status shows every pod in `names` active.
    pub fn wait_active(&mut self, names: &[String]) -> Result<()> {
        self.wait_status(Duration::from_secs(15), |st| {
            names
                .iter()
                .all(|name| pod_state(st, name).as_deref() == Some("active"))
        })?;
        Ok(())
    }

    /// Starts `meshlane run` on node 1 as `launch` says and returns without waiting.
    pub fn spawn_with(sb: &Sandbox, pods: &[PodSpec], launch: &Launch) -> Result<Agent> {
        Self::spawn_on(sb, 1, pods, &[], launch)
    }

    fn spawn_on(
        sb: &Sandbox,
        node: u8,
        pods: &[PodSpec],
        extra: &[&str],
        launch: &Launch,
    ) -> Result<Agent> {
        let pods_file = sb.dir().join(format!("pods{}.json", node_suffix(node)));
        std::fs::write(&pods_file, pod_list(pods))?;
        let mut source: Vec<OsString> = vec!["--pods".into(), pods_file.into_os_string()];
        source.extend(extra.iter().map(OsString::from));
        Self::launch(sb, node, source, launch)
    }

    /// `meshlane run SOURCE... --http-addr 127.0.0.1:0 --cgroup .. --bpffs ..
    /// --state-dir ..` for node 1 or 2, started without waiting.
    fn launch(sb: &Sandbox, node: u8, source: Vec<OsString>, launch: &Launch) -> Result<Agent> {
        let suffix = node_suffix(node);
        let pods_file = sb.dir().join(format!("pods{suffix}.json"));
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/meshlane-test-{}{suffix}", sb.index()));
        let state_dir = sb.dir().join(format!("agent-state{suffix}"));
        let stderr_log = sb.dir().join(format!("agent{suffix}.log"));
        let mut args: Vec<OsString> = vec!["run".into()];
        args.extend(source);
        args.extend([
            // A port of its own, so agents of parallel tests never clash.
            "--http-addr".into(),
            "127.0.0.1:0".into(),
            "--cgroup".into(),
            launch
                .cgroup
                .clone()
                .unwrap_or_else(|| sb.node_cgroup(node).to_path_buf())
                .into(),
            "--bpffs".into(),
            bpffs.clone().into(),
            "--state-dir".into(),
            state_dir.clone().into(),
        ]);
        let mut agent = Agent {
            child: None,
            pods_file,
            bpffs,
            state_dir,
            stderr_log,
            args,
            wrapper: launch.wrapper.clone(),
            bin: launch.bin.clone().unwrap_or_else(meshlane_bin),
            env: launch.env.clone(),
        };
        // A previous run of this sandbox index that was SIGKILLed may have left pins.
        agent.cleanup();
        let _ = std::fs::remove_file(&agent.stderr_log);
        let _ = std::fs::remove_file(agent.state_dir.join("status.json"));
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)?;
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(&self.args).env("MESHLANE_LOG", "info");
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting meshlane run")?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the agent process with `signal` (SIGKILL or SIGTERM) and reaps
    /// it, leaving everything it pinned in place (what a crash or a
    /// DaemonSet rollout does).
    pub fn stop_process(&mut self, signal: i32) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, signal) };
            c.wait()?;
        }
        Ok(())
    }

    /// Starts the agent again on the same pins and waits until it runs with
    /// every meshed pod active.
    pub fn restart(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(self.state_dir.join("status.json"));
        self.spawn()?;
        let pid = self.child.as_ref().map(Child::id).unwrap_or_default();
        self.wait_status(Duration::from_secs(15), |st| {
            st["pid"].as_u64() == Some(u64::from(pid))
                // The pod source read (a status written before that lists
                // no pods), or failing and saying so; an agent of an earlier
                // build does not write `synced`.
                && (st["synced"] != false || !st["api_error"].is_null() || !st["file_error"].is_null())
                && st["pods"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .filter(|p| p["config"].is_object() || p["state"] == "active")
                        .all(|p| p["state"] == "active")
                })
        })?;
        Ok(())
    }

    /// Gives `meshlane run`'s `flag` the value `value` from the next
    /// [`Agent::restart`] on (added when the agent was started without it).
    pub fn set_run_flag(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.into(),
            _ => self.args.extend([flag.into(), value.into()]),
        }
    }

    /// The `max_entries` the kernel gave the pinned map `name`, as bpftool
    /// reads it.
    pub fn kernel_map_capacity(&self, name: &str) -> Result<u64> {
        let pin = self.bpffs.join("maps").join(name);
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&pin)
            .output()
            .context("running bpftool (apt-get install bpftool)")?;
        if !out.status.success() {
            bail!(
                "bpftool map show pinned {}: {}",
                pin.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        v["max_entries"]
            .as_u64()
            .with_context(|| format!("bpftool said no max_entries for {name}: {v}"))
    }

    /// Runs this build's agent from the next [`Agent::restart`] on (an
    /// upgrade from the binary [`Launch::bin`] named).
    pub fn upgrade_to_this_build(&mut self) {
        self.bin = meshlane_bin();
    }

    /// Stops the agent with SIGTERM, as the kubelet does, without cleanup:
    /// interception must stay in place.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let c = self.child.as_mut().context("agent not running")?;
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("agent did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's exit status if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn write_pods(&self, pods: &[PodSpec]) -> Result<()> {
        // Replace atomically, as kubectl-driven tooling and editors do.
        let tmp = self.pods_file.with_extension("tmp");
        std::fs::write(&tmp, pod_list(pods))?;
        std::fs::rename(&tmp, &self.pods_file)?;
        Ok(())
    }

    pub fn write_raw(&self, text: &str) -> Result<()> {
        let tmp = self.pods_file.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.pods_file)?;
        Ok(())
    }

    /// The agent's status.json.
    pub fn status(&self) -> Result<Value> {
        let p = self.state_dir.join("status.json");
        let b = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(serde_json::from_slice(&b)?)
    }

    /// `meshlane status --json` output, healthy or not (exit code 0 or 1).
    pub fn status_cmd(&self) -> Result<Value> {
        let out = Command::new(meshlane_bin())
            .args(["status", "--json", "--bpffs"])
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()?;
        if !matches!(out.status.code(), Some(0 | 1)) {
            bail!(
                "meshlane status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn wait_status(&mut self, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Result<Value> {
        self.wait_status_every(timeout, Duration::from_millis(50), ok)
    }

    /// [`Agent::wait_status`], reading the status every `poll` (a test
    /// that times the agent needs a finer grain).
    pub fn wait_status_every(
        &mut self,
        timeout: Duration,
        poll: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(s) = c.try_wait()? {
                    bail!("meshlane run exited with {s}; its log:\n{}", self.log());
                }
            }
            if let Ok(st) = self.status() {
                if ok(&st) {
                    return Ok(st);
                }
                if start.elapsed() > timeout {
                    bail!("agent status did not reach the expected state in {timeout:?}: {st:#}\nlog:\n{}", self.log());
                }
            } else if start.elapsed() > timeout {
                bail!(
                    "agent wrote no status in {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(poll);
        }
    }

    /// Where the agent serves /healthz, /readyz and (without
    /// `--metrics-addr`) /metrics.
    pub fn http_addr(&self) -> Result<SocketAddr> {
        self.served("http_addr")
    }

    /// Where the agent serves /metrics.
    pub fn metrics_addr(&self) -> Result<SocketAddr> {
        self.served("metrics_addr")
    }

    fn served(&self, key: &str) -> Result<SocketAddr> {
        let st = self.status()?;
        let a = st
            .get(key)
            .and_then(Value::as_str)
            .with_context(|| format!("status.json has no {key}"))?;
        Ok(a.parse()?)
    }

    /// GET `path` from the agent's HTTP endpoint: (status code, body).
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.http_addr()?, path)
    }

    /// The value of the metric sample `series` (as written on the page,
    /// labels included) in a /metrics page.
    pub fn metric(page: &str, series: &str) -> Option<f64> {
        page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    fn cleanup(&mut self) {
        let _ = Command::new(meshlane_bin())
            .args(["cleanup", "--bpffs"])
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.cleanup();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.bpffs.exists() {
            eprintln!(
                "WARNING: {} still exists after meshlane cleanup",
                self.bpffs.display()
            );
        }
    }
}

fn node_suffix(node: u8) -> String {
    if node == 1 {
        String::new()
    } else {
        format!("-n{node}")
    }
}

/// The state of pod `name` in an agent status document.
pub fn pod_state(st: &Value, name: &str) -> Option<String> {
    pod_entry(st, name)?
        .get("state")?
        .as_str()
        .map(String::from)
}

pub fn pod_entry<'a>(st: &'a Value, name: &str) -> Option<&'a Value> {
    st.get("pods")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
}

/// GET `path` from an agent's endpoint at `addr`: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to the agent's {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no HTTP response: {text:?}"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {path}: bad status line in {head:?}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("GET {path}: unexpected chunked answer");
    }
    Ok((code, body.to_string()))
}

/// Replaces `<bpffs>/netns` (where each pod's inbound link is pinned) with a
/// dangling symlink, so the agent cannot capture a new pod; puts the
/// directory back on drop, before the agent's cleanup.
pub struct BrokenNetnsPins(PathBuf);

impl BrokenNetnsPins {
    pub fn new(bpffs: &Path) -> Result<Self> {
        let dir = bpffs.join("netns");
        if dir.exists() {
            std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::os::unix::fs::symlink("/nonexistent/meshlane-test", &dir)
            .with_context(|| format!("symlink at {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for BrokenNetnsPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::create_dir(&self.0);
    }
}

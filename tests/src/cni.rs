//! A container runtime's CNI side, as small as the spec allows: it runs the
//! plugins of a network config list (Debian's containernetworking-plugins
//! from /usr/lib/cni, and `meshlane-cni`) with the CNI environment and stdin
//! the spec gives, in the sandbox's node namespace (the "host"), for pod
//! namespaces it creates. ADD runs the list in order, each plugin getting
//! the previous one's result as prevResult; CHECK runs it in order with the
//! cached result; DEL in reverse with it. Namespaces, cgroups and IPAM state
//! are removed by Drop.
use std::{
    io::Write,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{sandbox::sibling_bin, Pod, Sandbox, Stack};

/// Where Debian's containernetworking-plugins puts the plugins.
pub const DEBIAN_CNI_BIN: &str = "/usr/lib/cni";

/// The `meshlane-cni` binary next to the test binaries.
pub fn meshlane_cni_bin() -> PathBuf {
    sibling_bin(
        "meshlane-cni",
        "MESHLANE_CNI_BIN",
        "cargo build -p meshlane --bins",
    )
}

/// What one plugin (or a whole command) answered.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Outcome {
    /// The spec's error object, or a panic naming what came instead.
    #[track_caller]
    pub fn error(&self) -> meshlane::cni::spec::CniError {
        assert!(!self.ok, "expected a failure, got success: {self:?}");
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not a CNI error object ({e}): {self:?}"))
    }
}

/// A runtime for one sandbox: a conflist, its own IPAM directory, and the
/// pods it made.
pub struct Runtime {
    node_netns: String,
    conflist: Value,
    cni_path: String,
    /// Pod netns names made by [`Runtime::new_netns`], deleted on drop.
    netns: Vec<String>,
    pub ipam_dir: PathBuf,
    index: u8,
}

/// The IPv4 subnet the test conflist hands out: the upper half of the
/// sandbox's /24 (the lower is its own pods'), on bridge `cni0`.
pub fn subnet(sb: &Sandbox) -> String {
    format!("10.200.{}.128/25", sb.index())
}

/// A conflist as a cluster's primary network has it: bridge (with
/// host-local IPAM) and portmap-free, then `extra` plugins chained after
/// (meshlane-cni's entry, say). `dual`: an IPv6 range as well.
pub fn conflist(sb: &Sandbox, dual: bool, extra: &[Value]) -> Value {
    let i = sb.index();
    let mut ranges = vec![json!([{"subnet": subnet(sb), "rangeStart": format!("10.200.{i}.130")}])];
    if dual {
        ranges.push(json!([{"subnet": format!("fd00:{i}:cc::/64")}]));
    }
    let mut plugins = vec![json!({
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "ranges": ranges,
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": sb.dir().join("cni-ipam"),
        }
    })];
    plugins.extend(extra.iter().cloned());
    json!({"cniVersion": "1.0.0", "name": format!("mlt{i}-net"), "plugins": plugins})
}

/// meshlane-cni's entry for the agent whose state directory is `state_dir`.
pub fn meshlane_entry(state_dir: &Path, timeout_ms: u64, pods_file: Option<&Path>) -> Value {
    let mut e = json!({"type": "meshlane-cni", "stateDir": state_dir, "timeoutMs": timeout_ms});
    if let Some(f) = pods_file {
        e["podSource"] = json!({"podsFile": f});
    }
    e
}

/// The environment of one invocation.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub command: &'static str,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: String,
}

impl Invocation {
    /// ADD (or another command) for pod `default/NAME` in netns `netns`.
    pub fn pod(command: &'static str, name: &str, netns: &Path) -> Self {
        Self {
            command,
            container_id: format!("ctr-{name}"),
            netns: Some(netns.to_path_buf()),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};\
                 K8S_POD_INFRA_CONTAINER_ID=ctr-{name};K8S_POD_UID=uid-{name}"
            ),
        }
    }
}

impl Runtime {
    pub fn new(sb: &Sandbox, conflist: Value) -> Result<Runtime> {
        let meshlane = meshlane_cni_bin();
        let dir = meshlane.parent().context("meshlane-cni has a directory")?;
        if !Path::new(DEBIAN_CNI_BIN).join("bridge").exists() {
            bail!("{DEBIAN_CNI_BIN}/bridge is missing: `cargo xtask setup` installs containernetworking-plugins");
        }
        Ok(Runtime {
            node_netns: sb.node_netns().to_string(),
            conflist,
            cni_path: format!("{DEBIAN_CNI_BIN}:{}", dir.display()),
            netns: Vec::new(),
            ipam_dir: sb.dir().join("cni-ipam"),
            index: sb.index(),
        })
    }

    /// A fresh pod namespace (what a runtime makes before ADD), and a pod
    /// cgroup under the sandbox's, as a [`Pod`] that [`Sandbox::spawn`] can
    /// start processes in. Its addresses are filled in by [`Runtime::add`].
    pub fn new_netns(&mut self, sb: &Sandbox, name: &str) -> Result<Pod> {
        let netns = format!("mlt{}-cni-{name}", self.index);
        run("ip", &["netns", "add", &netns])?;
        self.netns.push(netns.clone());
        let cgroup = sb.cgroup().join(format!("cni-{name}"));
        std::fs::create_dir_all(&cgroup)?;
        Ok(Pod {
            name: name.into(),
            netns,
            ip: std::net::Ipv4Addr::UNSPECIFIED,
            ip6: None,
            stack: Stack::V4,
            cgroup,
            node: 1,
        })
    }

    /// Runs one plugin of type `kind` with `conf` on stdin, as the spec says.
    pub fn exec(&self, kind: &str, conf: &Value, inv: &Invocation) -> Result<Outcome> {
        self.exec_raw(kind, conf.to_string().as_bytes(), inv)
    }

    /// [`Runtime::exec`] with arbitrary bytes on stdin.
    pub fn exec_raw(&self, kind: &str, stdin: &[u8], inv: &Invocation) -> Result<Outcome> {
        self.exec_in(kind, stdin, inv, true)
    }

    /// [`Runtime::exec`] in the test's own namespace rather than the node's
    /// (to reach a server on the test's loopback, as a fake API server).
    pub fn exec_here(&self, kind: &str, conf: &Value, inv: &Invocation) -> Result<Outcome> {
        self.exec_in(kind, conf.to_string().as_bytes(), inv, false)
    }

    fn exec_in(
        &self,
        kind: &str,
        stdin: &[u8],
        inv: &Invocation,
        in_node: bool,
    ) -> Result<Outcome> {
        let bin = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(kind))
            .find(|p| p.is_file())
            .with_context(|| format!("plugin {kind} not in CNI_PATH {}", self.cni_path))?;
        let node = std::fs::File::open(format!("/run/netns/{}", self.node_netns))?;
        let node_fd = node.as_raw_fd();
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", inv.command)
            .env("CNI_CONTAINERID", &inv.container_id)
            .env("CNI_IFNAME", &inv.ifname)
            .env("CNI_ARGS", &inv.args)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = &inv.netns {
            cmd.env("CNI_NETNS", ns);
        }
        // The plugins run in the node's namespace: that is the host to them.
        if in_node {
            // SAFETY: setns only, between fork and exec, on an fd kept open.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(node_fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {}", bin.display()))?;
        child.stdin.take().expect("piped").write_all(stdin)?;
        let out = child.wait_with_output()?;
        drop(node);
        Ok(Outcome {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: start.elapsed(),
        })
    }

    /// One plugin's stdin: its entry with the list's cniVersion and name,
    /// and prevResult when there is one.
    fn plugin_conf(&self, entry: &Value, prev: Option<&Value>) -> Value {
        let mut c = entry.clone();
        c["cniVersion"] = self.conflist["cniVersion"].clone();
        c["name"] = self.conflist["name"].clone();
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// ADD through the whole list (loopback first, as runtimes bring up
    /// `lo`): the final result, or the first failure.
    pub fn add(
        &self,
        pod: &mut Pod,
        inv: &Invocation,
    ) -> Result<std::result::Result<Value, Outcome>> {
        let lo =
            json!({"cniVersion": self.conflist["cniVersion"], "name": "lo", "type": "loopback"});
        let o = self.exec("loopback", &lo, inv)?;
        if !o.ok {
            return Ok(Err(o));
        }
        let mut prev: Option<Value> = None;
        for entry in self.plugins() {
            let kind = entry["type"].as_str().context("plugin type")?.to_string();
            let o = self.exec(&kind, &self.plugin_conf(&entry, prev.as_ref()), inv)?;
            if !o.ok {
                return Ok(Err(o));
            }
            prev = Some(
                serde_json::from_str(&o.stdout)
                    .with_context(|| format!("{kind} printed no result: {o:?}"))?,
            );
        }
        let result = prev.context("an empty conflist")?;
        let ips = meshlane::cni::spec::prev_ips(&result)
            .map_err(|e| anyhow::anyhow!("the chain's result: {}", e.msg))?;
        for ip in ips {
            match ip {
                std::net::IpAddr::V4(v4) => pod.ip = v4,
                std::net::IpAddr::V6(v6) => pod.ip6 = Some(v6),
            }
        }
        pod.stack = match (pod.ip.is_unspecified(), pod.ip6.is_some()) {
            (false, true) => Stack::Dual,
            (true, true) => Stack::V6,
            _ => Stack::V4,
        };
        Ok(Ok(result))
    }

    /// CHECK (in order) or DEL (in reverse) through the list with the
    /// cached result; the first failure of CHECK, or every DEL outcome.
    pub fn check_or_del(&self, inv: &Invocation, cached: &Value) -> Result<Vec<Outcome>> {
        let mut plugins = self.plugins();
        if inv.command == "DEL" {
            plugins.reverse();
        }
        let mut outs = Vec::new();
        for entry in plugins {
            let kind = entry["type"].as_str().context("plugin type")?.to_string();
            let o = self.exec(&kind, &self.plugin_conf(&entry, Some(cached)), inv)?;
            let failed = !o.ok;
            outs.push(o);
            if failed && inv.command == "CHECK" {
                break;
            }
        }
        Ok(outs)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for ns in self.netns.iter().rev() {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                eprintln!("meshlane-tests: cleanup: {e:#}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.ipam_dir);
    }
}

fn run(prog: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(prog).args(args).output()?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

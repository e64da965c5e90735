//! Network-namespace sandbox: a node namespace with a bridge, pods on it, and a
//! cgroup v2 directory for the processes, all torn down by Drop guards. Pods
//! are IPv4 by default; [`Sandbox::new_dual_stack`] and
//! [`Sandbox::add_pod_stack`] give them an IPv6 ULA too, or only that.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Where the per-subnet lock files and per-sandbox work directories live. /run is
/// a tmpfs, so a reboot clears it along with the namespaces.
const STATE_DIR: &str = "/run/meshlane-tests";
/// Subnets 10.200.N.0/24 with N in this range are ours.
const SUBNETS: std::ops::RangeInclusive<u8> = 1..=250;
/// Default limit for [`Sandbox::run`].
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// One simulated node: a network namespace holding bridge `br0`
/// (10.200.N.1/24), pods attached to it, and a cgroup every spawned process is
/// moved into. Dropping it kills those processes and deletes everything.
pub struct Sandbox {
    index: u8,
    tag: String,
    /// Holds flock(LOCK_EX) on the subnet's lock file; closing it releases the
    /// subnet, and the kernel closes it if the process dies.
    lock: Option<File>,
    node_netns: String,
    /// Every namespace created, node first; deleted in reverse.
    netns: Vec<String>,
    cgroup: PathBuf,
    cgroup_created: bool,
    dir: PathBuf,
    next_host: u8,
    pods: Vec<Pod>,
    /// The second node, once [`Sandbox::add_node2`] made it.
    node2: Option<Node2>,
    /// The address families [`Sandbox::add_pod`] and [`Sandbox::add_pod_on`]
    /// give a pod ([`Sandbox::new_dual_stack`] makes it [`Stack::Dual`]).
    default_stack: Stack,
    /// The nodes' IPv6 side (bridge addresses, forwarding, the route between
    /// the nodes) exists: made with the first pod that has an IPv6 address.
    ipv6: bool,
}

/// The address families of a pod's `eth0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stack {
    /// IPv4 only (10.200.N.x/25): every sandbox's default.
    #[default]
    V4,
    /// IPv4 and an IPv6 ULA beside it (fd00:N:node::x/64).
    Dual,
    /// The IPv6 ULA only: no IPv4 address and no IPv4 route.
    V6,
}

impl Stack {
    pub fn has_v4(self) -> bool {
        self != Stack::V6
    }
    pub fn has_v6(self) -> bool {
        self != Stack::V4
    }
}

/// A second node: namespace `mlt{N}-{tag}-n2` with its own bridge
/// (10.200.N.129/25), a veth to the first node, and a cgroup of its own (a
/// sibling of the first node's, so each node's agent sees only its pods).
struct Node2 {
    netns: String,
    cgroup: PathBuf,
    next_host: u8,
}

/// A pod: a network namespace with `lo` and `eth0` (on the node's bridge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    /// The pod's IPv4 address; `0.0.0.0` for an IPv6-only pod, which has
    /// none (see [`Pod::ipv4`]).
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (fd00:N:node::x), for [`Stack::Dual`] and
    /// [`Stack::V6`] pods.
    pub ip6: Option<Ipv6Addr>,
    pub stack: Stack,
    /// The pod's own cgroup, a child of the sandbox cgroup: programs attached to
    /// the sandbox cgroup see it, and per-pod attachment is possible too.
    pub cgroup: PathBuf,
    /// 1 or 2: which node the pod runs on.
    pub node: u8,
}

impl Pod {
    /// The IPv4 address, None for an IPv6-only pod.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.stack.has_v4().then_some(self.ip)
    }

    /// The IPv6 address; panics for a pod without one (a test bug).
    #[track_caller]
    pub fn v6(&self) -> Ipv6Addr {
        self.ip6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address ({:?})", self.name, self.stack))
    }

    /// The pod's IPv4 address as an IPv4-mapped IPv6 address
    /// (`::ffff:10.200.N.x`), what an AF_INET6 socket dials to reach it.
    #[track_caller]
    pub fn mapped(&self) -> Ipv6Addr {
        let v4 = self
            .ipv4()
            .unwrap_or_else(|| panic!("pod {} has no IPv4 address", self.name));
        v4.to_ipv6_mapped()
    }
}

/// The IPv6 address of host `host` on node `node` of sandbox `index`:
/// fd00:INDEX:NODE::HOST, the decimal numbers written as hex digits, so
/// 10.200.17.3 on node 1 is fd00:17:1::3.
fn v6_addr(index: u8, node: u8, host: u8) -> Ipv6Addr {
    let hexish = |n: u8| u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex");
    Ipv6Addr::new(
        0xfd00,
        hexish(index),
        hexish(node),
        0,
        0,
        0,
        0,
        hexish(host),
    )
}

impl Sandbox {
    /// Like [`Sandbox::new`], but [`Sandbox::add_pod`] and
    /// [`Sandbox::add_pod_on`] make dual-stack pods: each gets an IPv6 ULA
    /// (fd00:N:node::x/64, `nodad`, so usable at once) on the same veth
    /// beside its IPv4 address, and `::6/128` on `lo` (Istio's IPv6 inbound
    /// passthrough source, which istio-iptables adds to the pod).
    pub fn new_dual_stack(tag: &str) -> Result<Sandbox> {
        Sandbox::create(tag, Stack::Dual)
    }

    /// Allocates a free 10.200.N.0/24 (flock on /run/meshlane-tests/N.lock held
    /// for the sandbox's life) and creates the node namespace
    /// `mlt{N}-{tag}-node` with bridge br0 = 10.200.N.1/24, and the cgroup
    /// `<cgroup2 root>/meshlane-test-{N}-{tag}`.
    pub fn new(tag: &str) -> Result<Sandbox> {
        Sandbox::create(tag, Stack::V4)
    }

    fn create(tag: &str, default_stack: Stack) -> Result<Sandbox> {
        let tag = sanitize(tag, 10);
        if tag.is_empty() {
            bail!("sandbox tag {tag:?} has no [a-z0-9-] characters");
        }
        std::fs::create_dir_all(STATE_DIR)
            .with_context(|| format!("creating state directory {STATE_DIR}"))?;
        let (index, lock) = allocate_subnet()?;
        // A previous run that was SIGKILLed held this subnet; its leftovers carry
        // the subnet number, and holding the lock makes them ours to remove.
        remove_leftovers(index);

        let root = cgroup2_root()?;
        let node_netns = format!("mlt{index}-{tag}-node");
        let mut sb = Sandbox {
            index,
            cgroup: root.join(format!("meshlane-test-{index}-{tag}")),
            dir: Path::new(STATE_DIR).join(format!("{index}-{tag}")),
            tag,
            lock: Some(lock),
            node_netns: node_netns.clone(),
            netns: Vec::new(),
            cgroup_created: false,
            next_host: 2,
            pods: Vec::new(),
            node2: None,
            default_stack,
            ipv6: false,
        };
        // From here on every early return drops `sb`, which removes what exists.
        std::fs::create_dir_all(&sb.dir)
            .with_context(|| format!("creating sandbox directory {}", sb.dir.display()))?;
        // Sidecars and probes run as non-root uids and write their logs here.
        std::fs::set_permissions(&sb.dir, std::fs::Permissions::from_mode(0o1777))
            .with_context(|| format!("chmod 1777 {}", sb.dir.display()))?;

        std::fs::create_dir(&sb.cgroup)
            .with_context(|| format!("creating cgroup {}", sb.cgroup.display()))?;
        sb.cgroup_created = true;

        sb.add_netns(&node_netns)?;
        // /25: the upper half of the subnet is the second node's, if any.
        let gw = format!("{}/25", sb.gateway());
        ip(&["-n", &node_netns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &node_netns, "addr", "add", &gw, "dev", "br0"])?;
        ip(&["-n", &node_netns, "link", "set", "br0", "up"])?;
        Ok(sb)
    }

    /// Creates pod namespace `mlt{N}-{tag}-{name}` with lo up and eth0 (a veth
    /// whose peer is on br0) = 10.200.N.{next}/25, default route via .1, and a
    /// child cgroup `{name}` of the sandbox cgroup. In a
    /// [`Sandbox::new_dual_stack`] sandbox the pod is dual-stack
    /// ([`Sandbox::add_pod_stack`]).
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        self.add_pod_on(1, name)
    }

    /// The IPv6 address of node `node`'s bridge, its pods' IPv6 gateway.
    pub fn gateway6(&self, node: u8) -> Ipv6Addr {
        v6_addr(self.index, node, 1)
    }

    /// Gives the nodes their IPv6 side, once: br0 = fd00:N:node::1/64 on
    /// each node, and with two nodes fd00:N:255::1 and ::2/64 on the veth
    /// between them, a route each way, and IPv6 forwarding on both.
    fn enable_ipv6(&mut self) -> Result<()> {
        if self.ipv6 {
            return Ok(());
        }
        self.ipv6 = true;
        let n1 = self.node_netns.clone();
        if !self.default_stack.has_v6() {
            // An IPv4 sandbox made dual-stack late: its node links exist,
            // with link-local addresses that may still be in DAD.
            no_dad(&n1)?;
            wait_dad_done(&n1)?;
        }
        let gw1 = format!("{}/64", self.gateway6(1));
        ip(&["-n", &n1, "-6", "addr", "add", &gw1, "dev", "br0", "nodad"])?;
        if self.node2.is_some() {
            self.node2_ipv6()?;
        }
        Ok(())
    }

    /// The IPv6 half of [`Sandbox::add_node2`].
    fn node2_ipv6(&self) -> Result<()> {
        let Some(n2) = &self.node2 else {
            return Ok(());
        };
        let (n1, n2) = (self.node_netns.as_str(), n2.netns.as_str());
        let i = self.index;
        let gw2 = format!("{}/64", self.gateway6(2));
        ip(&["-n", n2, "-6", "addr", "add", &gw2, "dev", "br0", "nodad"])?;
        let (l1, l2) = (v6_addr(i, 0xff, 1), v6_addr(i, 0xff, 2));
        ip(&[
            "-n",
            n1,
            "-6",
            "addr",
            "add",
            &format!("{l1}/64"),
            "dev",
            "tonode2",
            "nodad",
        ])?;
        ip(&[
            "-n",
            n2,
            "-6",
            "addr",
            "add",
            &format!("{l2}/64"),
            "dev",
            "tonode1",
            "nodad",
        ])?;
        let net = |node: u8| format!("{}/64", v6_addr(i, node, 0));
        ip(&[
            "-n",
            n1,
            "-6",
            "route",
            "add",
            &net(2),
            "via",
            &l2.to_string(),
        ])?;
        ip(&[
            "-n",
            n2,
            "-6",
            "route",
            "add",
            &net(1),
            "via",
            &l1.to_string(),
        ])?;
        for ns in [n1, n2] {
            self.netns_exec(
                ns,
                "sysctl",
                &["-q", "-w", "net.ipv6.conf.all.forwarding=1"],
                None,
            )?;
        }
        Ok(())
    }

    /// Creates the second node: namespace `mlt{N}-{tag}-n2` with bridge br0 =
    /// 10.200.N.129/25, joined to the first node by a veth (169.254.N.1 and
    /// .2/30) with routes both ways, and cgroup
    /// `<cgroup2 root>/meshlane-test-{N}-{tag}-n2`.
    pub fn add_node2(&mut self) -> Result<()> {
        if self.node2.is_some() {
            return Ok(());
        }
        let netns = format!("mlt{}-{}-n2", self.index, self.tag);
        let cgroup = self
            .cgroup
            .with_file_name(format!("meshlane-test-{}-{}-n2", self.index, self.tag));
        std::fs::create_dir(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        self.node2 = Some(Node2 {
            netns: netns.clone(),
            cgroup,
            next_host: 130,
        });
        self.add_netns(&netns)?;
        let n1 = self.node_netns.clone();
        let i = self.index;
        ip(&["-n", &netns, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("10.200.{i}.129/25"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &netns, "link", "set", "br0", "up"])?;
        ip(&[
            "-n", &n1, "link", "add", "tonode2", "type", "veth", "peer", "name", "tonode1",
            "netns", &netns,
        ])?;
        ip(&[
            "-n",
            &n1,
            "addr",
            "add",
            &format!("169.254.{i}.1/30"),
            "dev",
            "tonode2",
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("169.254.{i}.2/30"),
            "dev",
            "tonode1",
        ])?;
        ip(&["-n", &n1, "link", "set", "tonode2", "up"])?;
        ip(&["-n", &netns, "link", "set", "tonode1", "up"])?;
        ip(&[
            "-n",
            &n1,
            "route",
            "add",
            &format!("10.200.{i}.128/25"),
            "via",
            &format!("169.254.{i}.2"),
        ])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            &format!("10.200.{i}.0/25"),
            "via",
            &format!("169.254.{i}.1"),
        ])?;
        for ns in [&n1, &netns] {
            self.netns_exec(ns, "sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"], None)?;
        }
        if self.ipv6 {
            self.node2_ipv6()?;
        }
        Ok(())
    }

    /// The cgroup of node 1 (the sandbox cgroup) or node 2.
    pub fn node_cgroup(&self, node: u8) -> &Path {
        match (node, &self.node2) {
            (2, Some(n2)) => &n2.cgroup,
            _ => &self.cgroup,
        }
    }

    /// Creates a pod on node 1 or 2 (see [`Sandbox::add_pod`]; node 2's pods
    /// are 10.200.N.130 and up, default route via .129).
    pub fn add_pod_on(&mut self, node: u8, name: &str) -> Result<Pod> {
        self.add_pod_stack(node, name, self.default_stack)
    }

    /// Creates a pod on node 1 or 2 with the address families of `stack`.
    /// The IPv6 address is fd00:N:node::x/64 (`nodad`) with x the host part
    /// the pod's IPv4 address has (or would have, for [`Stack::V6`]), default
    /// route via the bridge's fd00:N:node::1, and `::6/128` on `lo`. An
    /// IPv6-only pod has no IPv4 address or route; its [`Pod::ip`] is 0.0.0.0.
    pub fn add_pod_stack(&mut self, node: u8, name: &str, stack: Stack) -> Result<Pod> {
        let clean = sanitize(name, 10);
        if clean != name || name.is_empty() || name == "node" {
            bail!("pod name {name:?} must be 1-10 chars of [a-z0-9-] and not \"node\"");
        }
        if self.pods.iter().any(|p| p.name == name) {
            bail!("pod {name:?} already exists in sandbox {}", self.tag);
        }
        if stack.has_v6() {
            self.enable_ipv6()?;
        }
        let (node_ns, gateway, parent_cgroup, host) = match node {
            1 => {
                if self.next_host == 127 {
                    bail!(
                        "sandbox {} has no addresses left for pod {name:?}",
                        self.tag
                    );
                }
                self.next_host += 1;
                (
                    self.node_netns.clone(),
                    self.gateway(),
                    self.cgroup.clone(),
                    self.next_host - 1,
                )
            }
            2 => {
                let Some(n2) = self.node2.as_mut() else {
                    bail!("pod {name:?} on node 2: call add_node2 first");
                };
                if n2.next_host == 255 {
                    bail!(
                        "node 2 of sandbox {} has no addresses left for pod {name:?}",
                        self.tag
                    );
                }
                n2.next_host += 1;
                (
                    n2.netns.clone(),
                    Ipv4Addr::new(10, 200, self.index, 129),
                    n2.cgroup.clone(),
                    n2.next_host - 1,
                )
            }
            _ => bail!("node {node}: the sandbox has nodes 1 and 2"),
        };
        let ip_addr = Ipv4Addr::new(10, 200, self.index, host);
        let netns = format!("mlt{}-{}-{}", self.index, self.tag, name);
        self.add_netns(&netns)?;

        // The node end's name only has to be unique inside the node namespace.
        let node_if = format!("veth{host}");
        let node_index = node;
        let node = node_ns;
        ip(&[
            "-n", &node, "link", "add", &node_if, "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ])?;
        ip(&["-n", &node, "link", "set", &node_if, "master", "br0", "up"])?;
        if stack.has_v4() {
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip_addr}/25"),
                "dev",
                "eth0",
            ])?;
        }
        let ip6 = stack
            .has_v6()
            .then(|| v6_addr(self.index, node_index, host));
        if let Some(a) = ip6 {
            let a = format!("{a}/64");
            ip(&[
                "-n", &netns, "-6", "addr", "add", &a, "dev", "eth0", "nodad",
            ])?;
            ip(&[
                "-n", &netns, "-6", "addr", "add", "::6/128", "dev", "lo", "nodad",
            ])?;
        }
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        if stack.has_v4() {
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
            ])?;
        }
        if ip6.is_some() {
            let gw6 = self.gateway6(node_index).to_string();
            ip(&["-n", &netns, "-6", "route", "add", "default", "via", &gw6])?;
        }

        let cgroup = parent_cgroup.join(name);
        std::fs::create_dir(&cgroup)
            .with_context(|| format!("creating pod cgroup {}", cgroup.display()))?;
        let pod = Pod {
            name: name.to_string(),
            netns,
            ip: if stack.has_v4() {
                ip_addr
            } else {
                Ipv4Addr::UNSPECIFIED
            },
            ip6,
            stack,
            cgroup,
            node: node_index,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// The sandbox cgroup (attach BPF programs here; pods' cgroups are children).
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Name of the node namespace (usable with `ip netns exec` / `ip -n`).
    pub fn node_netns(&self) -> &str {
        &self.node_netns
    }

    /// N of 10.200.N.0/24.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The bridge address, pods' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.index, 1)
    }

    /// A world-writable scratch directory removed with the sandbox (logs etc.).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pods created so far.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Spawns `program args` in `pod`'s network namespace and cgroup as
    /// uid/gid, stdout piped (see [`Proc::wait_ready`]), stderr inherited.
    pub fn spawn(
        &self,
        pod: &Pod,
        uid: u32,
        gid: u32,
        program: &Path,
        args: &[&str],
    ) -> Result<Proc> {
        self.spawn_with(pod, uid, gid, None, program, args, Stdio::inherit())
    }

    /// [`Sandbox::spawn`] as uid and gid `inner` of a user namespace of the
    /// process's own, whose one mapping is `inner` to uid and gid `host` of
    /// the node: a container of a pod with `hostUsers: false`, as the kernel
    /// sees it (its sockets are owned by `host`).
    pub fn spawn_in_userns(
        &self,
        pod: &Pod,
        inner: u32,
        host: u32,
        program: &Path,
        args: &[&str],
    ) -> Result<Proc> {
        self.spawn_with(
            pod,
            host,
            host,
            Some(inner),
            program,
            args,
            Stdio::inherit(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_with(
        &self,
        pod: &Pod,
        uid: u32,
        gid: u32,
        userns_id: Option<u32>,
        program: &Path,
        args: &[&str],
        stderr: Stdio,
    ) -> Result<Proc> {
        let desc = format!(
            "{} {} (pod {}, uid {uid}, gid {gid}{})",
            program.display(),
            args.join(" "),
            pod.name,
            userns_id
                .map(|i| format!(", as {i} in a user namespace"))
                .unwrap_or_default()
        );
        // Written by the child to its own maps: the one line an
        // unprivileged namespace creator may write (its own ids).
        let id_map = userns_id.map(|i| format!("{i} {uid} 1\n").into_bytes());
        let ns_path = format!("/run/netns/{}", pod.netns);
        let ns = File::open(&ns_path).with_context(|| format!("opening netns {ns_path}"))?;
        let procs_path = pod.cgroup.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .with_context(|| format!("opening {}", procs_path.display()))?;
        let (ns_fd, procs_fd) = (ns.as_raw_fd(), procs.as_raw_fd());

        // Unprivileged processes must not depend on the checkout's
        // permissions (a clone under a 0700 directory is common): run from the
        // world-accessible sandbox dir, from a copy of the binary if needed.
        let program = if uid == 0 {
            program.to_path_buf()
        } else {
            self.runnable_copy(program)?
        };
        let mut cmd = Command::new(&program);
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        // std applies Command::uid/gid before pre_exec, after which setns and the
        // cgroup write would be refused; so everything happens here, in order:
        // namespace, cgroup, then drop privileges. Only async-signal-safe libc
        // calls: this runs between fork and exec.
        let pre_exec = move || -> std::io::Result<()> {
            // SAFETY: plain syscalls on fds the parent keeps open until spawn returns.
            unsafe {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                let groups = [gid as libc::gid_t];
                if libc::setgroups(1, groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(map) = &id_map {
                    // Dumpable again after setuid, or /proc/self stays
                    // root's and the maps cannot be written.
                    if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0
                        || libc::unshare(libc::CLONE_NEWUSER) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    let writes: [(&std::ffi::CStr, &[u8]); 3] = [
                        (c"/proc/self/uid_map", map),
                        (c"/proc/self/setgroups", b"deny"),
                        (c"/proc/self/gid_map", map),
                    ];
                    for (path, text) in writes {
                        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                        if fd < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        let n = libc::write(fd, text.as_ptr().cast(), text.len());
                        libc::close(fd);
                        if n != text.len() as isize {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
            }
            Ok(())
        };
        // SAFETY: the closure only makes async-signal-safe syscalls.
        unsafe {
            cmd.pre_exec(pre_exec);
        }
        // ETXTBSY: a fork in another test thread may briefly hold the write fd
        // of a freshly copied binary (until its exec closes it). Retry.
        let mut attempts = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => break r.with_context(|| format!("spawning {desc}"))?,
            }
        };
        drop((ns, procs));

        let stdout = child.stdout.take().expect("stdout was piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Proc {
            child,
            lines: rx,
            desc,
            seen: Vec::new(),
        })
    }

    /// Runs `program args` like [`Sandbox::spawn`] to completion (20 s limit) and
    /// returns its stdout; a non-zero exit is an error carrying stderr.
    pub fn run(
        &self,
        pod: &Pod,
        uid: u32,
        gid: u32,
        program: &Path,
        args: &[&str],
    ) -> Result<String> {
        self.run_timeout(pod, uid, gid, program, args, RUN_TIMEOUT)
    }

    /// [`Sandbox::run`] with an explicit time limit.
    pub fn run_timeout(
        &self,
        pod: &Pod,
        uid: u32,
        gid: u32,
        program: &Path,
        args: &[&str],
        timeout: Duration,
    ) -> Result<String> {
        let mut proc = self.spawn_with(pod, uid, gid, None, program, args, Stdio::piped())?;
        let stderr = proc.child.stderr.take().expect("stderr was piped");
        let err_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = proc
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", proc.desc))?
            {
                break st;
            }
            if Instant::now() >= deadline {
                // Proc's Drop kills and reaps it.
                bail!("{} did not finish within {timeout:?}", proc.desc);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // The process is gone, so the pipes reach EOF once drained.
        let mut out = Vec::new();
        while let Ok(line) = proc.lines.recv_timeout(Duration::from_secs(2)) {
            out.push(line);
        }
        let stdout = out.join("\n");
        let stderr = err_thread.join().unwrap_or_default();
        if !status.success() {
            bail!(
                "{} failed with {status}; stderr: {}; stdout: {}",
                proc.desc,
                stderr.trim(),
                stdout.trim()
            );
        }
        Ok(stdout)
    }

    /// Runs a command as root inside `netns` (via `ip netns exec`, not in the
    /// sandbox cgroup), with stdin from `stdin_file` if given; returns stdout.
    pub fn netns_exec(
        &self,
        netns: &str,
        program: &str,
        args: &[&str],
        stdin_file: Option<&Path>,
    ) -> Result<String> {
        let mut full = vec!["netns", "exec", netns, program];
        full.extend_from_slice(args);
        let mut cmd = Command::new("ip");
        cmd.args(&full);
        if let Some(f) = stdin_file {
            let file = File::open(f).with_context(|| format!("opening {}", f.display()))?;
            cmd.stdin(file);
        } else {
            cmd.stdin(Stdio::null());
        }
        let line = format!(
            "ip {}{}",
            full.join(" "),
            stdin_file
                .map(|f| format!(" < {}", f.display()))
                .unwrap_or_default()
        );
        let out = cmd.output().with_context(|| format!("running {line}"))?;
        if !out.status.success() {
            bail!(
                "{line} failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `program` if every user can reach and run it, else a copy of it in the
    /// sandbox's world-accessible directory (made once per program).
    fn runnable_copy(&self, program: &Path) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let open_to_all =
            |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0);
        if program
            .ancestors()
            .all(|p| p.as_os_str().is_empty() || open_to_all(p))
        {
            return Ok(program.to_path_buf());
        }
        let bin_dir = self.dir.join("bin");
        std::fs::create_dir_all(&bin_dir)?;
        std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755))?;
        let copy = bin_dir.join(program.file_name().context("program has a file name")?);
        if !copy.exists() {
            let tmp = copy.with_extension("partial");
            std::fs::copy(program, &tmp).with_context(|| {
                format!("copying {} for an unprivileged user", program.display())
            })?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
            std::fs::rename(&tmp, &copy)?;
        }
        Ok(copy)
    }

    /// Where [`Sandbox::start_sidecar`] logs `pod`'s connections.
    pub fn sidecar_log(&self, pod: &Pod) -> PathBuf {
        self.dir.join(format!("sidecar-{}.jsonl", pod.name))
    }

    /// Starts `mtest sidecar` in `pod` as the proxy uid/gid 1337, logging to
    /// [`Sandbox::sidecar_log`], and waits until it listens.
    pub fn start_sidecar(&self, pod: &Pod) -> Result<Proc> {
        self.start_sidecar_with(pod, SidecarOpts::default())
    }

    /// [`Sandbox::start_sidecar`] with listeners of the families `opts`
    /// names and, if asked, the DNS-proxy stand-in on UDP 15053.
    pub fn start_sidecar_with(&self, pod: &Pod, opts: SidecarOpts) -> Result<Proc> {
        let log = self.sidecar_log(pod);
        let log = log.to_str().context("sandbox path is not UTF-8")?;
        let mut args = vec!["sidecar", "--log", log, "--listen", opts.listen.arg()];
        if opts.dns {
            args.push("--dns");
        }
        let mut p = self.spawn(pod, crate::PROXY_UID, crate::PROXY_UID, &mtest_bin(), &args)?;
        p.wait_ready(Duration::from_secs(10))?;
        Ok(p)
    }

    /// Starts `mtest udp-echo --name NAME --listen L...` in `pod` as root and
    /// waits until every socket is bound.
    pub fn start_udp_echo(&self, pod: &Pod, name: &str, listens: &[&str]) -> Result<Proc> {
        let mut args = vec!["udp-echo", "--name", name];
        for l in listens {
            args.extend(["--listen", l]);
        }
        let mut p = self.spawn(pod, 0, 0, &mtest_bin(), &args)?;
        p.wait_ready(Duration::from_secs(10))?;
        Ok(p)
    }

    /// Starts `mtest server --name NAME --listen L...` in `pod` as root and
    /// waits until every listener is bound.
    pub fn start_server(&self, pod: &Pod, name: &str, listens: &[&str]) -> Result<Proc> {
        let mut args = vec!["server", "--name", name];
        for l in listens {
            args.extend(["--listen", l]);
        }
        let mut p = self.spawn(pod, 0, 0, &mtest_bin(), &args)?;
        p.wait_ready(Duration::from_secs(10))?;
        Ok(p)
    }

    /// Waits until something in `pod` listens on TCP `port` (any address), as
    /// `ss` shows it; for servers that print no ready line (HAProxy, python).
    pub fn wait_listening(&self, pod: &Pod, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let suffix = format!(":{port}");
        loop {
            let out = self.netns_exec(&pod.netns, "ss", &["-ltnH"], None)?;
            // Columns: State Recv-Q Send-Q Local:Port Peer:Port ...
            let listening = out.lines().any(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|local| local.ends_with(&suffix))
            });
            if listening {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nothing listens on TCP {port} in {} after {timeout:?}",
                    pod.netns
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes every rule and custom chain meshlane's comparisons load into
    /// `pod` (nat, mangle, raw).
    pub fn iptables_flush(&self, pod: &Pod) -> Result<()> {
        for table in ["nat", "mangle", "raw"] {
            self.netns_exec(&pod.netns, "iptables", &["-t", table, "-F"], None)?;
            self.netns_exec(&pod.netns, "iptables", &["-t", table, "-X"], None)?;
        }
        Ok(())
    }

    /// Loads an iptables-save file into `pod`'s namespace with
    /// `iptables-restore` (nf_tables backend) or `iptables-legacy-restore`.
    pub fn iptables_restore(&self, pod: &Pod, rules: &Path, legacy: bool) -> Result<()> {
        let prog = if legacy {
            "iptables-legacy-restore"
        } else {
            "iptables-restore"
        };
        self.netns_exec(&pod.netns, prog, &[], Some(rules))
            .with_context(|| format!("loading {} into pod {}", rules.display(), pod.name))?;
        Ok(())
    }

    /// Removes every IPv6 rule and custom chain (nat, mangle, raw) from `pod`,
    /// the ip6tables counterpart of [`Sandbox::iptables_flush`].
    pub fn ip6tables_flush(&self, pod: &Pod) -> Result<()> {
        for table in ["nat", "mangle", "raw"] {
            self.netns_exec(&pod.netns, "ip6tables", &["-t", table, "-F"], None)?;
            self.netns_exec(&pod.netns, "ip6tables", &["-t", table, "-X"], None)?;
        }
        Ok(())
    }

    /// Loads an ip6tables-save file into `pod`'s namespace with
    /// `ip6tables-restore` (nf_tables backend).
    pub fn ip6tables_restore(&self, pod: &Pod, rules: &Path) -> Result<()> {
        self.netns_exec(&pod.netns, "ip6tables-restore", &[], Some(rules))
            .with_context(|| format!("loading {} into pod {}", rules.display(), pod.name))?;
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.netns.push(name.to_string());
        if self.default_stack.has_v6() || self.ipv6 {
            no_dad(name)?;
        }
        ip(&["-n", name, "link", "set", "lo", "up"])
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(n2) = &self.node2 {
            if let Err(e) = remove_cgroup(&n2.cgroup) {
                eprintln!("meshlane-tests: cleanup: {e:#}");
            }
        }
        if self.cgroup_created {
            if let Err(e) = remove_cgroup(&self.cgroup) {
                eprintln!("meshlane-tests: cleanup: {e:#}");
            }
        }
        for ns in self.netns.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("meshlane-tests: cleanup: {e:#}");
            }
        }
        if self.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                eprintln!(
                    "meshlane-tests: cleanup: removing {}: {e}",
                    self.dir.display()
                );
            }
        }
        // Released last, so nobody reuses the subnet while its names still exist.
        self.lock.take();
    }
}

/// Which sockets `mtest sidecar` listens on (its `--listen`), on each of its
/// capture ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SidecarListen {
    /// `0.0.0.0` only: an IPv4 pod's Envoy.
    #[default]
    V4,
    /// One `[::]` socket with IPV6_V6ONLY off: IPv4 clients arrive as
    /// IPv4-mapped AF_INET6 sockets (Envoy's dual-stack listener).
    Dual,
    /// `0.0.0.0` and a separate `[::]` with IPV6_V6ONLY on (Envoy's
    /// listener with an additional address).
    Split,
    /// `[::]` with IPV6_V6ONLY on only: an IPv6-only pod's Envoy.
    V6,
}

impl SidecarListen {
    /// The value `mtest sidecar --listen` takes.
    pub fn arg(self) -> &'static str {
        match self {
            SidecarListen::V4 => "v4",
            SidecarListen::Dual => "dual",
            SidecarListen::Split => "split",
            SidecarListen::V6 => "v6",
        }
    }
}

/// How [`Sandbox::start_sidecar_with`] starts `mtest sidecar`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SidecarOpts {
    pub listen: SidecarListen,
    /// Also run the DNS-proxy stand-in on UDP 127.0.0.1:15053 and
    /// [::1]:15053 (`--dns`).
    pub dns: bool,
}

/// A process started by [`Sandbox::spawn`]; killed and reaped on drop.
pub struct Proc {
    child: Child,
    lines: Receiver<String>,
    desc: String,
    seen: Vec<String>,
}

impl Proc {
    /// Reads stdout lines until one is exactly `ready`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.trim() == "ready" => return Ok(()),
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{} not ready after {timeout:?}; stdout so far: {:?}",
                    self.desc,
                    self.seen
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    bail!(
                        "{} closed stdout before printing ready (exit status {status:?}); stdout: {:?}",
                        self.desc,
                        self.seen
                    )
                }
            }
        }
    }

    /// The next stdout line, or None at EOF or timeout.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process now (Drop does the same).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub use meshlane::host::cgroup2_root;

/// Path of the `mtest` binary: $MESHLANE_MTEST, else `mtest` in the profile
/// directory of the running executable (target/debug/mtest for
/// target/debug/deps/foo-hash or target/debug/xtask).
pub fn mtest_bin() -> PathBuf {
    sibling_bin("mtest", "MESHLANE_MTEST", "cargo build -p meshlane-tests")
}

/// A binary of this workspace: `$env` if set, else `name` next to the
/// running executable's profile directory, built by `how` if missing.
pub fn sibling_bin(name: &str, env: &str, how: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("cannot read /proc/self/exe");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let candidate = dir.join(name);
    assert!(
        candidate.is_file(),
        "{name} binary not found at {} (next to {}); build it with `{how}` \
         using the same target directory, or set {env}",
        candidate.display(),
        exe.display()
    );
    candidate
}

/// The workspace root (parent of this package's manifest directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The conformance oracles copied into the repository (`tests/data`, see
/// its README for where each file came from).
pub fn data_dir() -> PathBuf {
    workspace_root().join("tests").join("data")
}

/// Istio's ip6tables rules for a dual-stack pod whose IPv4 rules are `v4`:
/// the same chains and rules with `::6/128` for 127.0.0.6/32 and `::1/128`
/// for 127.0.0.1/32. That is how istio-iptables writes the IPv6 family when
/// no IP range or DNS server is involved: the tests/data/istio-ipv6 goldens
/// of that kind are exactly their .v4 file rewritten so
/// (tests/tests/families.rs, `derived_ipv6_rules_match_istio_goldens`). Any other IPv4 literal left
/// is refused.
pub fn istio_v6_rules(v4: &str) -> Result<String> {
    let v6 = v4
        .replace("127.0.0.6/32", "::6/128")
        .replace("127.0.0.1/32", "::1/128");
    if let Some(line) = v6
        .lines()
        .find(|l| l.split_whitespace().any(|w| w.contains('.')))
    {
        bail!("an IPv4 address has no IPv6 counterpart here: {line:?}");
    }
    Ok(v6)
}

fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
        .take(max)
        .collect()
}

/// Turns IPv6 duplicate address detection off in namespace `netns` for
/// links made from now on. Without it every new link's link-local address
/// is "tentative" for a second or two, and until then a node does not
/// resolve its neighbours across the link between the nodes: the first
/// connections from one node to the other stall. (Global addresses are
/// added `nodad` anyway.)
fn no_dad(netns: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-q", "-w"])
        .args([
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])
        .stdin(Stdio::null())
        .output()
        .context("running sysctl")?;
    if !out.status.success() {
        bail!(
            "turning IPv6 DAD off in {netns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Waits (up to 5 s) until namespace `netns` has no tentative IPv6 address.
fn wait_dad_done(netns: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new("ip")
            .args(["-n", netns, "-6", "addr", "show", "tentative"])
            .stdin(Stdio::null())
            .output()
            .context("running ip addr show tentative")?;
        if out.status.success() && out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{netns} still has tentative IPv6 addresses after 5 s: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `ip args`, failing with the command line and ip's stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Takes the first subnet whose lock file we can flock without waiting. The
/// start is spread by pid so parallel test binaries rarely contend.
fn allocate_subnet() -> Result<(u8, File)> {
    let count = SUBNETS.len();
    let start = std::process::id() as usize % count;
    for k in 0..count {
        let index = *SUBNETS.start() + ((start + k) % count) as u8;
        if let Some(file) = try_lock(index)? {
            // The holder's pid, for whoever wonders who owns a subnet.
            let _ = file.set_len(0);
            let _ = writeln!(&file, "{}", std::process::id());
            return Ok((index, file));
        }
    }
    bail!("all {count} test subnets 10.200.N.0/24 are in use (locks in {STATE_DIR})")
}

/// flock(LOCK_EX|LOCK_NB) on subnet `index`'s lock file; None when held elsewhere.
fn try_lock(index: u8) -> Result<Option<File>> {
    let path = Path::new(STATE_DIR).join(format!("{index}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    // SAFETY: flock on an fd we own. Locks belong to the open file description,
    // so threads of this process exclude each other too.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(err).with_context(|| format!("flock {}", path.display()))
}

/// Removes what killed test processes left behind (namespaces, cgroups,
/// directories) for every subnet nobody holds now; returns how many subnets had
/// leftovers. [`Sandbox::new`] already does this for the subnet it takes; this is
/// for a sweep after an interrupted run (e.g. Ctrl-C of `cargo test`).
pub fn cleanup_stale() -> Result<usize> {
    std::fs::create_dir_all(STATE_DIR)
        .with_context(|| format!("creating state directory {STATE_DIR}"))?;
    let mut cleaned = 0;
    for index in SUBNETS {
        // Checked before locking, so a sweep creates no lock files; checked
        // again under the lock, because the holder may have just finished.
        if !has_leftovers(index) {
            continue;
        }
        let Some(lock) = try_lock(index)? else {
            continue;
        };
        if has_leftovers(index) {
            remove_leftovers(index);
            cleaned += 1;
        }
        drop(lock);
    }
    Ok(cleaned)
}

fn has_leftovers(index: u8) -> bool {
    let ns_prefix = format!("mlt{index}-");
    let cg_prefix = format!("meshlane-test-{index}-");
    let dir_prefix = format!("{index}-");
    let any = |dir: &Path, prefix: &str| {
        std::fs::read_dir(dir).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
        })
    };
    any(Path::new("/run/netns"), &ns_prefix)
        || cgroup2_root().is_ok_and(|r| any(&r, &cg_prefix))
        || any(Path::new(STATE_DIR), &dir_prefix)
}

/// Removes namespaces, cgroups and directories of subnet `index` left by a
/// process that died without cleaning up. Best effort: failures only warn.
fn remove_leftovers(index: u8) {
    let ns_prefix = format!("mlt{index}-");
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&ns_prefix) {
                if let Err(e) = ip(&["netns", "del", &name]) {
                    eprintln!("meshlane-tests: removing stale netns: {e:#}");
                }
            }
        }
    }
    if let Ok(root) = cgroup2_root() {
        let cg_prefix = format!("meshlane-test-{index}-");
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&cg_prefix) {
                    if let Err(e) = remove_cgroup(&e.path()) {
                        eprintln!("meshlane-tests: removing stale cgroup: {e:#}");
                    }
                }
            }
        }
    }
    let dir_prefix = format!("{index}-");
    if let Ok(entries) = std::fs::read_dir(STATE_DIR) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&dir_prefix) && e.path().is_dir() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Kills every process in the cgroup subtree, waits for them to leave, and
/// removes the directories bottom-up (rmdir fails while a child cgroup or a
/// live process remains).
fn remove_cgroup(cg: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // cgroup.kill (5.14+) kills the whole subtree atomically, including
        // processes forked while we kill.
        if std::fs::write(cg.join("cgroup.kill"), "1").is_err() {
            kill_listed(cg);
        }
        if subtree_empty(cg) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("processes still in cgroup {} after 10 s", cg.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    rmdir_tree(cg, deadline)
}

fn child_cgroups(cg: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cg)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn kill_listed(cg: &Path) {
    for child in child_cgroups(cg) {
        kill_listed(&child);
    }
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // SAFETY: sending a signal; a pid that already exited just fails.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

fn subtree_empty(cg: &Path) -> bool {
    let own = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
    own.trim().is_empty() && child_cgroups(cg).iter().all(|c| subtree_empty(c))
}

fn rmdir_tree(cg: &Path, deadline: Instant) -> Result<()> {
    for child in child_cgroups(cg) {
        rmdir_tree(&child, deadline)?;
    }
    loop {
        match std::fs::remove_dir(cg) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // EBUSY while killed tasks finish exiting.
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir cgroup {}", cg.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_names() {
        assert_eq!(sanitize("Harness_IPT", 10), "harnessipt");
        assert_eq!(sanitize("abcdefghijklmnop", 10), "abcdefghij");
    }
}

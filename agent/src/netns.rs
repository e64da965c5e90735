//! Finding a pod's network namespace from its IP, and the namespace's cookie
//! (the key the kernel programs look pods up by).
//!
//! Candidates are the named namespaces under /var/run/netns and the
//! namespaces of every process in /proc, deduplicated by inode. The agent's
//! own namespace (the node's) is never a candidate: capturing the host's own
//! traffic by mistake would be far worse than missing a pod.
use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};
use nix::sched::{setns, CloneFlags};

use crate::podconfig::{Cidr, NetView};
use crate::userns::UserNs;

/// A network namespace seen on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub inode: u64,
    /// A path that opens it (a /var/run/netns file or /proc/PID/ns/net).
    pub path: PathBuf,
    pub cookie: u64,
    pub addrs: Vec<IpAddr>,
    /// Its interfaces and main-table routes (for the interface annotations).
    pub net: NetView,
    /// The user namespace of the processes in it, looked up only for the
    /// namespaces of `hostUsers: false` pods (None: not looked up); the
    /// error says why it is not known.
    pub user_ns: Option<Result<UserNs, String>>,
}

/// Directories of named namespaces, as `ip netns` and CNI runtimes make them.
const NAMED_DIRS: &[&str] = &["/var/run/netns", "/run/netns"];

fn inode_of(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Every network namespace visible on the node except our own, by inode.
pub fn candidates() -> BTreeMap<u64, PathBuf> {
    let own = inode_of(Path::new("/proc/self/ns/net"));
    let mut out = BTreeMap::new();
    for dir in NAMED_DIRS {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if let Some(ino) = inode_of(&p) {
                    out.entry(ino).or_insert(p);
                }
            }
        }
    }
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let p = e.path().join("ns/net");
            if let Some(ino) = inode_of(&p) {
                out.entry(ino).or_insert(p);
            }
        }
    }
    if let Some(own) = own {
        out.remove(&own);
    }
    out
}

/// The processes in the network namespace at `netns` that this agent can
/// see (all of them with hostPID, else none but its own).
pub fn pids_in(netns: &Path) -> Result<Vec<u32>> {
    let ns = fs::metadata(netns).with_context(|| format!("stat {}", netns.display()))?;
    let ns_id = (ns.dev(), ns.ino());
    Ok(fs::read_dir("/proc")
        .context("reading /proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == ns_id)
        })
        .collect())
}

/// SO_NETNS_COOKIE (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the namespace the calling thread is in.
fn current_cookie() -> Result<u64> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket() for SO_NETNS_COOKIE")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointers to live locals of the right size.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(anyhow!(
            "getsockopt(SO_NETNS_COOKIE): {} (needs Linux 5.14 or newer)",
            std::io::Error::last_os_error()
        ));
    }
    Ok(cookie)
}

/// The namespace's own addresses that can be a pod's: of both families,
/// without loopback, IPv6 link-local (every interface has one, the same on
/// many pods) and `::6` (the passthrough source a meshed pod puts on lo).
fn current_addrs() -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
        let Some(a) = ifa.address.as_ref() else {
            continue;
        };
        let ip = if let Some(v4) = a.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = a.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if pod_address(ip) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// The interfaces and routes of the namespace the calling thread is in.
/// Routes come from /proc/thread-self/net (the thread's namespace): IPv4's
/// `route` is the main table; of IPv6's `ipv6_route` (every table) routes
/// by `lo` and reject routes are left out, which leaves the main table's in
/// a pod (the TPROXY set-up's table 133 routes by `lo` only), and of one
/// destination the lowest metric is kept, as the kernel picks.
fn current_net() -> NetView {
    let ifaces: Vec<(String, u32)> = nix::net::if_::if_nameindex()
        .map(|l| {
            l.iter()
                .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
                .collect()
        })
        .unwrap_or_default();
    let index = |name: &str| ifaces.iter().find(|(n, _)| n == name).map(|(_, i)| *i);
    let mut best: BTreeMap<(IpAddr, u8), (u32, u32)> = BTreeMap::new();
    let mut keep = |addr: IpAddr, len: u8, metric: u32, dev: &str| {
        if let Some(i) = index(dev) {
            let e = best.entry((addr, len)).or_insert((metric, i));
            if metric < e.0 {
                *e = (metric, i);
            }
        }
    };
    let read =
        |f: &str| fs::read_to_string(format!("/proc/thread-self/net/{f}")).unwrap_or_default();
    for line in read("route").lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let hex = |i: usize| f.get(i).and_then(|v| u32::from_str_radix(v, 16).ok());
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; the
        // addresses are in network order, printed as a host-order number.
        let (Some(dst), Some(metric), Some(mask)) = (hex(1), f.get(6), hex(7)) else {
            continue;
        };
        let dst = std::net::Ipv4Addr::from(dst.to_ne_bytes());
        let len = mask.count_ones() as u8;
        keep(IpAddr::V4(dst), len, metric.parse().unwrap_or(0), f[0]);
    }
    const RTF_REJECT: u32 = 0x0200;
    for line in read("ipv6_route").lines() {
        // dst dst_len src src_len next_hop metric refcnt use flags dev
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[9] == "lo" {
            continue;
        }
        let (Ok(dst), Ok(len), Ok(metric), Ok(flags)) = (
            u128::from_str_radix(f[0], 16),
            u8::from_str_radix(f[1], 16),
            u32::from_str_radix(f[5], 16),
            u32::from_str_radix(f[8], 16),
        ) else {
            continue;
        };
        if flags & RTF_REJECT != 0 {
            continue;
        }
        keep(
            IpAddr::V6(std::net::Ipv6Addr::from_bits(dst)),
            len,
            metric,
            f[9],
        );
    }
    let routes = best
        .into_iter()
        .map(|((addr, len), (_, dev))| (Cidr { addr, len }, dev))
        .collect();
    NetView { ifaces, routes }
}

/// True for an address that may name a pod (see [`current_addrs`]).
pub fn pod_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_unspecified(),
        IpAddr::V6(a) => {
            let link_local = a.segments()[0] & 0xffc0 == 0xfe80;
            !a.is_loopback()
                && !a.is_unspecified()
                && !link_local
                && a.to_ipv4_mapped().is_none()
                && a != meshlane_common::V6::PASSTHROUGH_SRC.to_std()
        }
    }
}

/// Enters each namespace on a short-lived thread of its own (setns changes
/// only the calling thread, and the thread dies with it) and reads its cookie
/// and addresses. Namespaces that vanish meanwhile are skipped.
pub fn inspect(paths: Vec<(u64, PathBuf)>) -> Result<Vec<Netns>> {
    std::thread::Builder::new()
        .name("netns-scan".into())
        .spawn(move || {
            let mut out = Vec::new();
            for (inode, path) in paths {
                let Ok(f) = fs::File::open(&path) else {
                    continue;
                };
                if setns(f.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
                    continue;
                }
                let (Ok(cookie), Ok(addrs)) = (current_cookie(), current_addrs()) else {
                    continue;
                };
                out.push(Netns {
                    inode,
                    path,
                    cookie,
                    addrs,
                    net: current_net(),
                    user_ns: None,
                });
            }
            out
        })
        .context("spawning the netns scan thread")?
        .join()
        .map_err(|_| anyhow!("netns scan thread panicked"))
}

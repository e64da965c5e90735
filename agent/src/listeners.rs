//! Proxy listeners that were listening before meshlane's programs were
//! attached (an agent started on a node with running pods) never passed
//! through sockops' listen() hook, so they are not in `LISTENERS`. This finds
//! them through procfs and registers them: the socket is borrowed from the
//! proxy process with pidfd_getfd(2) (CAP_SYS_PTRACE) and put into the
//! sockhash, which keeps its own reference.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};
use meshlane_common::{decide::registers_listener, ListenerKey};

use crate::{bpf::Maps, netns};

/// Registers the listeners on `ports` found in the network namespace at
/// `netns_path`. Returns the ports registered.
pub fn register_existing(
    maps: &mut Maps,
    cookie: u64,
    netns_path: &Path,
    ports: &[u16],
    proxy_uid: u32,
) -> Result<Vec<u16>> {
    let pids = netns::pids_in(netns_path)?;
    let Some(first) = pids.first() else {
        return Ok(Vec::new());
    };
    // Listening sockets of that namespace on the wanted ports, by inode.
    let mut wanted: BTreeMap<u64, Listener> = BTreeMap::new();
    for file in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{first}/net/{file}")).unwrap_or_default();
        for (inode, l) in listening(&text, file == "tcp6") {
            // Only the proxy's own listeners, as sockops registers them.
            if ports.contains(&l.port) && registers_listener(l.uid, proxy_uid) {
                wanted.insert(inode, l);
            }
        }
    }
    let mut found: Vec<(Listener, u32, i32)> = Vec::new();
    for pid in &pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in fds.flatten() {
            let Ok(target) = fs::read_link(e.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(&l) = wanted.get(&inode) else {
                continue;
            };
            if let Some(fd) = e.file_name().to_str().and_then(|f| f.parse::<i32>().ok()) {
                found.push((l, *pid, fd));
            }
        }
    }
    // AF_INET listeners first: they take the IPv4 lookups of their port, as
    // sockops gives them; a dual-stack `[::]` listener takes those only when
    // no AF_INET one has the port.
    found.sort_by_key(|(l, _, _)| (l.v6, l.port));
    let mut done: BTreeSet<ListenerKey> = BTreeSet::new();
    for (l, pid, fd) in found {
        let mut keys = Vec::new();
        if !l.v6 || l.any {
            keys.push(ListenerKey::serving(
                cookie,
                l.port,
                ListenerKey::IPV4,
                l.uid,
            ));
        }
        if l.v6 {
            keys.push(ListenerKey::serving(
                cookie,
                l.port,
                ListenerKey::IPV6,
                l.uid,
            ));
        }
        keys.retain(|k| !done.contains(k));
        if keys.is_empty() {
            continue;
        }
        let sock = borrow_fd(pid, fd)
            .with_context(|| format!("borrowing listener fd {fd} of pid {pid}"))?;
        for key in keys {
            // A v6only `[::]` listener cannot take IPv4 lookups.
            if l.v6 && key.serves == ListenerKey::IPV4 && v6only(&sock) {
                continue;
            }
            maps.register_listener(key, sock.as_raw_fd())
                .with_context(|| format!("registering listener on port {} of pid {pid}", l.port))?;
            done.insert(key);
        }
    }
    let ports: BTreeSet<u16> = done.iter().map(|k| k.port as u16).collect();
    Ok(ports.into_iter().collect())
}

/// A listening socket of /proc/net/tcp{,6}.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Listener {
    port: u16,
    /// From the tcp6 table (an AF_INET6 socket).
    v6: bool,
    /// On the any-address.
    any: bool,
    /// The socket's owner.
    uid: u32,
}

/// (inode, listener) of the listening sockets in a /proc/net/tcp{,6} table
/// that listen on the any-address or an address that is not loopback.
fn listening(table: &str, v6: bool) -> Vec<(u64, Listener)> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, state, uid, inode) = (f.get(1)?, f.get(3)?, f.get(7)?, f.get(9)?);
            if *state != "0A" {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let any = addr.chars().all(|c| c == '0');
            let usable = if v6 {
                // ::1 is printed as three zero words and 01000000.
                any || addr != "00000000000000000000000001000000"
            } else {
                // The kernel prints the in-memory (network order) address as
                // a native u32: its native bytes are the address bytes.
                let a = u32::from_str_radix(addr, 16).ok()?;
                a.to_ne_bytes()[0] != 127
            };
            let uid = uid.parse().ok()?;
            usable.then_some((inode.parse().ok()?, Listener { port, v6, any, uid }))
        })
        .collect()
}

/// True when the AF_INET6 socket takes IPv6 only (IPV6_V6ONLY).
fn v6only(sock: &OwnedFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a local int.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            std::ptr::from_mut(&mut v).cast(),
            &mut len,
        )
    };
    rc == 0 && v != 0
}

fn borrow_fd(pid: u32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: plain syscalls; each returned fd is new and owned here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error()).context("pidfd_open");
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let sock = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if sock < 0 {
            return Err(std::io::Error::last_os_error())
                .context("pidfd_getfd (needs CAP_SYS_PTRACE)");
        }
        Ok(OwnedFd::from_raw_fd(sock as i32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_sockets() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:3A98 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 4343 1 0000000000000000 100 0 0 10 0\n\
   2: 0501F40A:1F90 0701F40A:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 4444 1 0000000000000000 100 0 0 10 0\n";
        // 0x3A9E = 15006 on any: yes; 127.0.0.1:15000: no; established: no.
        assert_eq!(
            listening(t, false),
            vec![(
                4242,
                Listener {
                    port: 15006,
                    v6: false,
                    any: true,
                    uid: 1337
                }
            )]
        );
    }
}

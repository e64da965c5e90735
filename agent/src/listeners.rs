//! Proxy listeners that were listening before meshlane's programs were
//! attached (an agent started on a node with running pods) never passed
//! through sockops' listen() hook, so they are not in `LISTENERS`. This finds
//! them through procfs and registers them: the socket is borrowed from the
//! proxy process with pidfd_getfd(2) (CAP_SYS_PTRACE) and put into the
//! sockhash, which keeps its own reference.
use std::{
    collections::BTreeMap,
    fs,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::Path,
};

use anyhow::{Context, Result};
use meshlane_common::ListenerKey;

use crate::bpf::Maps;

/// Registers the listeners on `ports` found in the network namespace at
/// `netns`. Returns the ports registered.
pub fn register_existing(
    maps: &mut Maps,
    cookie: u64,
    netns: &Path,
    ports: &[u16],
) -> Result<Vec<u16>> {
    let ns = fs::metadata(netns).with_context(|| format!("stat {}", netns.display()))?;
    let ns_id = (ns.dev(), ns.ino());
    let pids: Vec<u32> = fs::read_dir("/proc")
        .context("reading /proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == ns_id)
        })
        .collect();
    let Some(first) = pids.first() else {
        return Ok(Vec::new());
    };
    // Listening sockets of that namespace on the wanted ports, by inode.
    let mut wanted: BTreeMap<u64, u16> = BTreeMap::new();
    for file in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{first}/net/{file}")).unwrap_or_default();
        for (inode, port) in listening(&text, file == "tcp6") {
            if ports.contains(&port) {
                wanted.insert(inode, port);
            }
        }
    }
    let mut done = Vec::new();
    'pids: for pid in &pids {
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
            let Some(&port) = wanted.get(&inode) else {
                continue;
            };
            if done.contains(&port) {
                continue;
            }
            let Some(fd) = e.file_name().to_str().and_then(|f| f.parse::<i32>().ok()) else {
                continue;
            };
            let sock = borrow_fd(*pid, fd)
                .with_context(|| format!("borrowing listener fd {fd} of pid {pid}"))?;
            maps.register_listener(ListenerKey::new(cookie, port), sock.as_raw_fd())
                .with_context(|| format!("registering listener on port {port} of pid {pid}"))?;
            done.push(port);
            if done.len()
                == wanted
                    .values()
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            {
                break 'pids;
            }
        }
    }
    Ok(done)
}

/// (inode, port) of the listening sockets in a /proc/net/tcp{,6} table that
/// listen on the any-address or a non-loopback address.
fn listening(table: &str, v6: bool) -> Vec<(u64, u16)> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            if *state != "0A" {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let usable = if v6 {
                addr.chars().all(|c| c == '0')
            } else {
                // The kernel prints the in-memory (network order) address as
                // a native u32: its native bytes are the address bytes.
                let a = u32::from_str_radix(addr, 16).ok()?;
                a.to_ne_bytes()[0] != 127
            };
            usable.then_some((inode.parse().ok()?, port))
        })
        .collect()
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
        assert_eq!(listening(t, false), vec![(4242, 15006)]);
    }
}

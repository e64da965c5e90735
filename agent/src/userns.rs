//! Pods with `spec.hostUsers: false` run in a user namespace of their own:
//! their proxy is uid 1337 inside it, but the kernel programs see the uid
//! of the node it maps to (bpf_get_current_uid_gid reports ids as the
//! initial user namespace sees them). This finds the pod's user namespace
//! and maps the proxy's ids through it, so the maps hold what the kernel
//! will compare.
//!
//! The pod's user namespace is the one owning its network namespace when
//! the runtime made it so (NS_GET_USERNS); otherwise the one child of the
//! node's user namespace that the processes in the pod's network namespace
//! are in. A user namespace a pod's process nests inside it is never taken
//! (it could map 1337 to the app's own uid).
use std::{
    collections::BTreeMap,
    fs,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::Path,
};

/// A `/proc/PID/uid_map` or `gid_map`, read by a process of the node's user
/// namespace: each line maps `count` ids from `inside` on to the node's
/// ids from `outside` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdMap {
    ranges: Vec<(u32, u32, u32)>,
}

impl IdMap {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<u32> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|_| format!("id map line {line:?} is not three numbers"))?;
            let [inside, outside, count] = f[..] else {
                return Err(format!("id map line {line:?} is not three numbers"));
            };
            ranges.push((inside, outside, count));
        }
        Ok(Self { ranges })
    }

    /// The node's id for `id` inside the namespace, if the map has it.
    pub fn to_host(&self, id: u32) -> Option<u32> {
        self.ranges.iter().find_map(|&(inside, outside, count)| {
            let off = id.checked_sub(inside).filter(|o| *o < count)?;
            outside.checked_add(off)
        })
    }
}

/// A pod's user namespace and its maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserNs {
    pub inode: u64,
    pub uids: IdMap,
    pub gids: IdMap,
}

impl UserNs {
    /// The node's uid and gid for the proxy's `uid` and `gid`.
    pub fn to_host(&self, uid: u32, gid: u32) -> Result<(u32, u32), String> {
        let u = self.uids.to_host(uid).ok_or_else(|| {
            format!(
                "proxy uid {uid} is not in the uid map of the pod's user namespace ({})",
                self.uids.describe()
            )
        })?;
        let g = self.gids.to_host(gid).ok_or_else(|| {
            format!(
                "proxy gid {gid} is not in the gid map of the pod's user namespace ({})",
                self.gids.describe()
            )
        })?;
        Ok((u, g))
    }
}

impl IdMap {
    fn describe(&self) -> String {
        if self.ranges.is_empty() {
            return "empty".into();
        }
        self.ranges
            .iter()
            .map(|(i, o, c)| format!("{i} {o} {c}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// ioctl(2) requests on namespace files (linux/nsfs.h).
const NS_GET_USERNS: libc::c_ulong = 0xb701;
const NS_GET_PARENT: libc::c_ulong = 0xb702;

/// The inode of the user namespace `req` names for the namespace file `path`.
fn related_userns(path: &Path, req: libc::c_ulong) -> std::io::Result<u64> {
    let f = fs::File::open(path)?;
    // SAFETY: an nsfs ioctl on an open fd; it returns a new fd or -1.
    let fd = unsafe { libc::ioctl(f.as_raw_fd(), req) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd was just returned to us and is owned here.
    let ns = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(fs::File::from(ns).metadata()?.ino())
}

fn inode(path: &str) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// The user namespace of the pod whose network namespace is at `netns`
/// (`pids`: the processes in it), or why it cannot be told.
pub fn of_netns(netns: &Path, pids: Vec<u32>) -> Result<UserNs, String> {
    let own = inode("/proc/self/ns/user")
        .ok_or("cannot read the agent's own user namespace (/proc/self/ns/user)")?;
    let owner = related_userns(netns, NS_GET_USERNS)
        .map_err(|e| format!("NS_GET_USERNS on {}: {e}", netns.display()))?;
    // Each candidate user namespace, with one process in it.
    let mut found: BTreeMap<u64, u32> = BTreeMap::new();
    for pid in pids {
        let path = format!("/proc/{pid}/ns/user");
        let Some(ino) = inode(&path) else { continue };
        let pods = if owner == own {
            ino != own && related_userns(Path::new(&path), NS_GET_PARENT).is_ok_and(|p| p == own)
        } else {
            ino == owner
        };
        if pods {
            found.entry(ino).or_insert(pid);
        }
    }
    let (ino, pid) =
        match found.len() {
            0 => return Err(
                "no process of the pod's user namespace is in its network namespace yet (or the \
                 agent cannot see the pod's processes: it needs hostPID)"
                    .into(),
            ),
            1 => found.into_iter().next().expect("one"),
            n => {
                return Err(format!(
                "processes of {n} user namespaces are in the pod's network namespace: which is \
                 the pod's cannot be told"
            ))
            }
        };
    let read = |what: &str| {
        fs::read_to_string(format!("/proc/{pid}/{what}"))
            .map_err(|e| format!("reading /proc/{pid}/{what}: {e}"))
            .and_then(|t| IdMap::parse(&t))
    };
    let (uids, gids) = (read("uid_map")?, read("gid_map")?);
    // The pid may have been reused meanwhile.
    if inode(&format!("/proc/{pid}/ns/user")) != Some(ino) {
        return Err(format!("process {pid} left while its id maps were read"));
    }
    Ok(UserNs {
        inode: ino,
        uids,
        gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_ids_through_each_range() {
        let m = IdMap::parse("         0     196608      65536\n 70000 1000 1\n").unwrap();
        assert_eq!(m.to_host(0), Some(196_608));
        assert_eq!(m.to_host(1337), Some(197_945));
        assert_eq!(m.to_host(65_535), Some(262_143));
        assert_eq!(m.to_host(65_536), None);
        assert_eq!(m.to_host(70_000), Some(1000));
        assert_eq!(m.to_host(70_001), None);
        // The initial namespace's map is the identity.
        let init = IdMap::parse("0 0 4294967295").unwrap();
        assert_eq!(init.to_host(1337), Some(1337));
        assert_eq!(IdMap::parse("").unwrap().to_host(1337), None);
        assert!(IdMap::parse("1 2").is_err());
        assert!(IdMap::parse("a b c").is_err());
    }

    #[test]
    fn names_the_missing_id_and_the_map() {
        let ns = UserNs {
            inode: 1,
            uids: IdMap::parse("0 196608 1000").unwrap(),
            gids: IdMap::parse("0 196608 65536").unwrap(),
        };
        let e = ns.to_host(1337, 1337).unwrap_err();
        assert!(e.contains("uid 1337") && e.contains("0 196608 1000"), "{e}");
        let ns = UserNs {
            uids: IdMap::parse("0 196608 65536").unwrap(),
            ..ns
        };
        assert_eq!(ns.to_host(1337, 1337), Ok((197_945, 197_945)));
    }
}

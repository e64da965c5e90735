//! Programs of others on the cgroup hooks meshlane attaches to, as the
//! cgroup meshlane would attach to (normally the node's cgroup v2 root) runs
//! them. cgroup programs of one hook all run, in attach order, and each sees
//! what the earlier ones changed: another connect4 program that rewrites
//! the destination (Cilium's socket load balancer, say) decides which
//! address meshlane's redirect records as the original destination.
use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use meshlane_common::programs::{self, Hook, Target};
use serde::Serialize;

use crate::bpf::sys;

/// `CGROUP2_SUPER_MAGIC` of `statfs(2)`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// The cgroup v2 directory at or under `dir`: `dir` itself when it is
/// cgroup2, else its `unified` child (the hybrid layout, where `dir` is the
/// v1 tmpfs), so that a host's `/sys/fs/cgroup` mounted into a container
/// works for either layout.
pub fn cgroup2_dir(dir: &Path) -> Result<PathBuf> {
    let is_v2 = |d: &Path| {
        nix::sys::statfs::statfs(d).is_ok_and(|s| s.filesystem_type().0 == CGROUP2_MAGIC)
    };
    if is_v2(dir) {
        return Ok(dir.to_path_buf());
    }
    let unified = dir.join("unified");
    if is_v2(&unified) {
        return Ok(unified);
    }
    bail!(
        "{} is not a cgroup v2 directory, nor is {} (meshlane needs cgroup v2)",
        dir.display(),
        unified.display()
    )
}

/// One program that runs on a hook meshlane uses.
#[derive(Clone, Debug, Serialize)]
pub struct Attached {
    /// The hook, as meshlane's sections name it (`cgroup/connect4`).
    pub hook: &'static str,
    pub id: u32,
    /// Its name as loaded (the kernel keeps 15 bytes).
    pub name: String,
    /// meshlane's own (a previous install, or the running agent).
    pub meshlane: bool,
    /// What it probably is and what to do, for others' programs.
    pub note: Option<String>,
}

/// Whether a loaded name (cut to 15 bytes) is one of meshlane's programs.
fn is_meshlane(name: &str) -> bool {
    programs::ALL
        .iter()
        .any(|p| !name.is_empty() && p.name.get(..name.len().min(15)) == Some(name))
}

/// What to tell an operator about another program on `hook`, by its name.
pub fn note(hook: Hook, name: &str) -> String {
    if name.starts_with("cil_sock") {
        return "Cilium's socket load balancer: it rewrites service addresses to backends at \
                connect, so the sidecar would see a backend as the original destination; set \
                Cilium's socketLB.hostNamespaceOnly=true (as Cilium documents for Istio)"
            .to_string();
    }
    format!(
        "another program on {}: it runs beside meshlane's for every process under this cgroup; \
         check it does not rewrite or refuse what meshlane redirects",
        hook.section()
    )
}

/// Every program that runs on meshlane's cgroup hooks for processes in
/// `cgroup`.
pub fn on_hooks(cgroup: &Path) -> Result<Vec<Attached>> {
    let dir = std::fs::File::open(cgroup)
        .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let mut hooks: Vec<Hook> = programs::ALL
        .iter()
        .filter(|p| p.hook.target() == Target::Cgroup)
        .map(|p| p.hook)
        .collect();
    hooks.sort_by_key(|h| h.section());
    hooks.dedup();
    let mut found = Vec::new();
    for hook in hooks {
        let at = crate::bpf::load::attach_type(hook);
        let ids = sys::prog_query(dir.as_fd(), at).with_context(|| {
            format!(
                "bpf(BPF_PROG_QUERY) of {} on {}",
                hook.section(),
                cgroup.display()
            )
        })?;
        for id in ids {
            // A program unloaded since the query is gone: nothing to report.
            let Ok(name) = sys::prog_name(id) else {
                continue;
            };
            let meshlane = is_meshlane(&name);
            found.push(Attached {
                hook: hook.section(),
                id,
                note: (!meshlane).then(|| note(hook, &name)),
                name,
                meshlane,
            });
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meshlane_names_are_recognised_as_the_kernel_cuts_them() {
        for p in programs::ALL {
            let cut = &p.name[..p.name.len().min(15)];
            assert!(is_meshlane(cut), "{cut}");
        }
        assert!(!is_meshlane("cil_sock4_conne"));
        assert!(!is_meshlane(""));
    }

    #[test]
    fn cilium_socket_lb_gets_its_setting() {
        assert!(note(Hook::Connect4, "cil_sock4_conne").contains("hostNamespaceOnly"));
        assert!(note(Hook::Connect6, "other").contains("cgroup/connect6"));
    }
}

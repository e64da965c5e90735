//! Where meshlane's objects are pinned, and the bpf filesystem under them.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// Where meshlane's objects are pinned.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(transparent)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn progs(&self) -> PathBuf {
        self.root.join("progs")
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    pub fn link(&self, name: &str) -> PathBuf {
        self.links().join(name)
    }
    /// Per-pod inbound links, named by netns cookie.
    pub fn netns_links(&self) -> PathBuf {
        self.root.join("netns")
    }
    pub fn netns_link(&self, cookie: u64) -> PathBuf {
        self.netns_links().join(cookie.to_string())
    }
    pub fn prog(&self, name: &str) -> PathBuf {
        self.progs().join(name)
    }
    /// Where an upgrade stages the maps and programs of its layout until
    /// they replace these (`upgrade.rs`).
    pub fn staging(&self) -> Layout {
        Layout::new(self.root.join("next"))
    }
    /// True when any link is pinned (interception is in place).
    pub fn has_links(&self) -> bool {
        fs::read_dir(self.links())
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    }
    pub fn link_names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.links())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure `dir` exists on a bpf filesystem, mounting bpffs on
/// /sys/fs/bpf if nobody has.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let sys_bpf = Path::new("/sys/fs/bpf");
    if dir.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
        nix::mount::mount(
            Some("bpf"),
            sys_bpf,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting bpffs on /sys/fs/bpf (needs CAP_SYS_ADMIN)")?;
        tracing::info!("mounted bpffs on /sys/fs/bpf");
    }
    let mut existing = dir.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    if !is_bpffs(&existing) {
        bail!(
            "--bpffs {}: {} is not on a bpf filesystem (mount -t bpf bpf <dir>)",
            dir.display(),
            existing.display()
        );
    }
    for d in [
        dir.to_path_buf(),
        dir.join("maps"),
        dir.join("progs"),
        dir.join("links"),
        dir.join("netns"),
    ] {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(())
}

//! The guest's initramfs: busybox, the modules the tests need (with their
//! dependencies) and an init that chroots into the host's root over 9p.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use super::kernel::Image;
use crate::say;

/// Modules the guest needs, by name; their dependencies are added from each
/// module's own `depends=`. A name the kernel has built in is skipped.
const MODULES: &[&str] = &[
    // the 9p share of the host's root
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    // sandbox nodes and pods
    "veth",
    "bridge",
    // iptables-nft and iptables-legacy for the harness and conformance tests
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    // iptables-nft puts a counter on every rule; built in since 5.13 or so,
    // a module on 5.10 (and the guest has no modprobe to autoload it).
    "nft_counter",
    "nft_ct",
    "nft_nat",
    "nft_redir",
    "nf_nat",
    "nf_conntrack",
    "xt_REDIRECT",
    "xt_TPROXY",
    "xt_owner",
    "xt_mark",
    "xt_tcpudp",
    "xt_multiport",
    "xt_conntrack",
    "xt_socket",
    "xt_connmark",
    "xt_comment",
    // Istio's DNS rules: conntrack zones in the raw table (-j CT --zone).
    "xt_CT",
    "ip_tables",
    "iptable_nat",
    "iptable_mangle",
    "iptable_filter",
];

fn module_name(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(stem.replace('-', "_"))
}

/// A module's bytes, decompressed.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(t) => {
            let out = Command::new(t)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("{t} -dc {}", path.display()))?;
            if !out.status.success() {
                bail!("{t} -dc {} failed", path.display());
            }
            Ok(out.stdout)
        }
    }
}

/// One `key=` value from a module's .modinfo strings.
fn modinfo(bytes: &[u8], key: &str) -> Option<String> {
    let key = format!("{key}=");
    let key = key.as_bytes();
    let mut i = 0;
    while let Some(pos) = bytes[i..].windows(key.len()).position(|w| w == key) {
        let at = i + pos;
        if at == 0 || bytes[at - 1] == 0 {
            let rest = &bytes[at + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            return Some(String::from_utf8_lossy(&rest[..end]).into_owned());
        }
        i = at + 1;
    }
    None
}

/// What a module needs loaded first: its `depends=` and the `pre:` part of
/// its `softdep=` (libcrc32c needs a crc32c implementation, which nf_tables
/// and nf_conntrack need in turn).
fn modinfo_depends(bytes: &[u8]) -> Vec<String> {
    let mut deps: Vec<String> = modinfo(bytes, "depends")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect();
    if let Some(soft) = modinfo(bytes, "softdep") {
        let mut pre = false;
        for w in soft.split_whitespace() {
            match w {
                "pre:" => pre = true,
                "post:" => pre = false,
                m if pre => deps.push(m.replace('-', "_")),
                _ => {}
            }
        }
    }
    deps
}

/// Module files (name, decompressed bytes) in load order.
type ModuleFiles = Vec<(String, Vec<u8>)>;

/// The modules to load, dependencies first, and the names neither built in
/// nor shipped.
fn module_closure(modules_dir: &Path) -> Result<(ModuleFiles, Vec<String>)> {
    let mut index: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)
            .with_context(|| format!("reading {}", d.display()))?
            .flatten()
        {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()).and_then(module_name) {
                index.insert(n, p);
            }
        }
    }
    let builtin: BTreeSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(module_name))
        .collect();
    let mut loaded: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut order = Vec::new();
    let mut absent = Vec::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        loaded: &mut BTreeMap<String, PathBuf>,
        order: &mut Vec<String>,
        absent: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if loaded.contains_key(name) || builtin.contains(name) || depth > 32 {
            return Ok(());
        }
        // A soft dependency may name an algorithm ("crc32c") rather than a
        // module: take its generic implementation.
        let generic = format!("{name}_generic");
        let (name, path) = match (index.get(name), index.get(&generic)) {
            (Some(p), _) => (name, p),
            (None, Some(p)) => (generic.as_str(), p),
            (None, None) => {
                absent.push(name.to_string());
                return Ok(());
            }
        };
        if loaded.contains_key(name) || builtin.contains(name) {
            return Ok(());
        }
        let bytes = module_bytes(path)?;
        let depends = modinfo_depends(&bytes);
        loaded.insert(name.to_string(), path.clone());
        for d in &depends {
            visit(d, index, builtin, loaded, order, absent, depth + 1)?;
        }
        order.push(name.to_string());
        Ok(())
    }
    for m in MODULES {
        visit(m, &index, &builtin, &mut loaded, &mut order, &mut absent, 0)?;
    }
    let mut files = Vec::new();
    for name in &order {
        files.push((format!("{name}.ko"), module_bytes(&loaded[name])?));
    }
    Ok((files, absent))
}

/// A cpio archive in the "newc" format the kernel unpacks as initramfs.
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Self {
        Self {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | mode, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

/// The guest's /init: modules, the host's root over 9p (read-only) with
/// tmpfs where tests write, cgroup2 in the unified layout, then the row's
/// runner script inside a chroot. Powers off when the runner returns.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "meshlane-vm: kernel $(uname -r), loading modules"
while read m; do
  insmod "/modules/$m" || echo "meshlane-vm: insmod $m failed"
done < /modules/order
runner=$(sed -n 's/.*meshlane.runner=\([^ ]*\).*/\1/p' /proc/cmdline)
R=/newroot
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot $R; then
  echo "meshlane-vm: FATAL: cannot mount the host root over 9p"
  poweroff -f
fi
# A checkout under /tmp (a CI runner's mktemp clone) must stay visible
# under the guest's own /tmp: keep the host's directory, bound back in.
mkdir -p /hosttmp
mount -o bind $R/tmp /hosttmp
mount -t tmpfs -o mode=755 tmpfs $R/run
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
case "$runner" in
  /tmp/*)
    top=${runner#/tmp/}
    top=${top%%/*}
    mkdir -p "$R/tmp/$top"
    mount -o bind "/hosttmp/$top" "$R/tmp/$top"
    ;;
esac
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/shm $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
mkdir -p $R/run/vm-results
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=512000 results $R/run/vm-results
echo "meshlane-vm: up after $(cut -d' ' -f1 /proc/uptime) s, running $runner"
chroot $R /bin/sh "$runner"
echo "meshlane-vm: runner finished (exit $?)"
sync
umount $R/run/vm-results
poweroff -f
"#;

pub(super) fn build_initramfs(img: &Image, work: &Path) -> Result<PathBuf> {
    // Rebuilt when the module list or the init script changes.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&(INIT, MODULES), &mut h);
    let key = format!(
        "{}-{:016x}",
        img.release.replace('/', "_"),
        std::hash::Hasher::finish(&h)
    );
    let out = work.join("initramfs").join(format!("{key}.cpio"));
    let busybox = Path::new("/bin/busybox");
    let fresh = |p: &Path| -> bool {
        let (Ok(a), Ok(b)) = (fs::metadata(p), fs::metadata(busybox)) else {
            return false;
        };
        a.modified().ok() >= b.modified().ok()
    };
    if out.is_file() && fresh(&out) {
        return Ok(out);
    }
    say(&format!("building the initramfs for {}", img.release));
    let (modules, absent) = module_closure(&img.modules)?;
    if !absent.is_empty() {
        say(&format!(
            "modules neither built in nor shipped by {}: {} (tests that need them will fail)",
            img.release,
            absent.join(", ")
        ));
    }
    let mut c = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        c.dir(d);
    }
    let bb = fs::read(busybox).context("reading /bin/busybox (busybox-static)")?;
    c.file("bin/busybox", 0o755, &bb);
    c.file("init", 0o755, INIT.as_bytes());
    let mut order = String::new();
    for (name, bytes) in &modules {
        c.file(&format!("modules/{name}"), 0o644, bytes);
        order.push_str(name);
        order.push('\n');
    }
    c.file("modules/order", 0o644, order.as_bytes());
    fs::create_dir_all(out.parent().expect("has parent"))?;
    let tmp = out.with_extension("partial");
    fs::write(&tmp, c.finish())?;
    fs::rename(&tmp, &out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_is_read_from_the_strings() {
        let bytes = b"\x7fELF junk\0license=GPL\0depends=9pnet,fscache,netfs\0retpoline=Y\0";
        assert_eq!(modinfo_depends(bytes), ["9pnet", "fscache", "netfs"]);
        let soft = b"\0softdep=pre: crc32c post: foo\0depends=\0";
        assert_eq!(modinfo_depends(soft), ["crc32c"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert_eq!(module_name("nf-nat.ko.xz").as_deref(), Some("nf_nat"));
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::new();
        c.file("init", 0o755, b"abc");
        let buf = c.finish();
        assert!(buf.starts_with(b"070701"));
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}

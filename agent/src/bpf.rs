//! Loading, attaching and pinning the kernel programs, and opening the pinned
//! maps. Everything meshlane puts in the kernel lives under one bpffs
//! directory:
//!
//! ```text
//! <bpffs>/maps/<MAP>     the maps (pod config, lists, in-flight, stats)
//! <bpffs>/progs/<PROG>   the programs
//! <bpffs>/links/<PROG>   one bpf link per program, attached to the cgroup
//! ```
//!
//! Links are pinned, so interception outlives the agent process; removing the
//! link pins (`meshlane cleanup`) detaches everything.
use std::{
    fs,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray},
    programs::{CgroupSockAddr, CgroupSockopt, SockOps},
    Ebpf, EbpfLoader,
};
use aya_obj::generated::bpf_attach_type;
use meshlane_common::{names, stat, CidrKeyData, FlowKey, OrigDst, PodConfig, PortKey};

/// The object built by `cargo xtask build-ebpf`, embedded at build time.
static EMBEDDED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshlane.bpf.o"));

#[derive(Clone, Copy, Debug)]
enum Kind {
    SockAddr,
    Sockopt,
    SockOps,
}

/// Every program, the hook it attaches to, and why it is there.
const PROGRAMS: &[(&str, Kind, bpf_attach_type, &str)] = &[
    (
        "redirect_connect4",
        Kind::SockAddr,
        bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
        "cgroup/connect4",
    ),
    (
        "restore_peername4",
        Kind::SockAddr,
        bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
        "cgroup/getpeername4",
    ),
    (
        "original_dst",
        Kind::Sockopt,
        bpf_attach_type::BPF_CGROUP_GETSOCKOPT,
        "cgroup/getsockopt",
    ),
    (
        "track_redirected",
        Kind::SockOps,
        bpf_attach_type::BPF_CGROUP_SOCK_OPS,
        "sockops",
    ),
];

/// Program names and hooks, for status output.
pub fn program_hooks() -> impl Iterator<Item = (&'static str, &'static str)> {
    PROGRAMS.iter().map(|(n, _, _, h)| (*n, *h))
}

/// Where meshlane's objects are pinned.
#[derive(Clone, Debug)]
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

pub(crate) fn is_bpffs(path: &Path) -> bool {
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
    ] {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(())
}

/// The kernel object to load: `--ebpf-object` if given, else the embedded one.
pub fn object_bytes(path: Option<&Path>) -> Result<Vec<u8>> {
    match path {
        Some(p) => fs::read(p).with_context(|| format!("reading eBPF object {}", p.display())),
        None if EMBEDDED_OBJECT.is_empty() => Err(anyhow!(
            "this meshlane binary was built without its eBPF object: run `cargo xtask build-ebpf` and rebuild, or pass --ebpf-object"
        )),
        None => Ok(EMBEDDED_OBJECT.to_vec()),
    }
}

/// Loads the object, pins its maps and programs, and attaches every program
/// to `cgroup` with a pinned link.
pub fn install(object: &[u8], cgroup: &Path, layout: &Layout) -> Result<()> {
    let cgroup_dir =
        fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let mut ebpf: Ebpf = EbpfLoader::new()
        .load(object)
        .context("loading the eBPF object (maps)")?;
    for (name, map) in ebpf.maps() {
        let path = layout.map(name);
        map.pin(&path)
            .with_context(|| format!("pinning map {name} at {}", path.display()))?;
    }
    for &(name, kind, attach, hook) in PROGRAMS {
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
        let loaded = match kind {
            Kind::SockAddr => <&mut CgroupSockAddr>::try_from(prog)?.load(),
            Kind::Sockopt => <&mut CgroupSockopt>::try_from(prog)?.load(),
            Kind::SockOps => <&mut SockOps>::try_from(prog)?.load(),
        };
        loaded
            .with_context(|| format!("loading program {name} ({hook}): the kernel refused it"))?;
        let prog = ebpf.program_mut(name).expect("present above");
        let ppath = layout.progs().join(name);
        prog.pin(&ppath)
            .with_context(|| format!("pinning program {name} at {}", ppath.display()))?;
        let fd = prog.fd()?.as_fd();
        let link = link_create(fd, cgroup_dir.as_fd(), attach).with_context(|| {
            format!("attaching {name} to {hook} of cgroup {}", cgroup.display())
        })?;
        let lpath = layout.link(name);
        obj_pin(link.as_fd(), &lpath)
            .with_context(|| format!("pinning link {}", lpath.display()))?;
    }
    Ok(())
}

/// Detaches and unpins everything under `layout`. Links first, so the
/// programs stop running before their maps go.
pub fn uninstall(layout: &Layout) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for dir in [layout.links(), layout.progs(), layout.maps()] {
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                fs::remove_file(e.path())
                    .with_context(|| format!("unpinning {}", e.path().display()))?;
                removed.push(e.path());
            }
        }
        if dir.exists() {
            fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    if layout.root.exists() {
        fs::remove_dir(&layout.root)
            .with_context(|| format!("removing {}", layout.root.display()))?;
    }
    Ok(removed)
}

// The raw bpf(2) calls aya 0.14 does not offer for every program type: a
// cgroup link for any attach type, and pinning an fd.
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 6],
}

#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a live, fully initialised #[repr(C)] bpf_attr prefix of
    // the size we pass; the kernel checks the unused tail is zero.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach: bpf_attach_type,
) -> Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: attach as u32,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr).context("bpf(BPF_LINK_CREATE)")?;
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_OBJ_PIN, &mut attr).context("bpf(BPF_OBJ_PIN)")?;
    Ok(())
}

/// Handles on the pinned maps the agent writes and status reads.
pub struct Maps {
    pub pods: HashMap<MapData, u64, PodConfig>,
    pub ports: HashMap<MapData, PortKey, u32>,
    pub cidrs: LpmTrie<MapData, CidrKeyData, u32>,
    pub in_flight: HashMap<MapData, FlowKey, OrigDst>,
    pub stats: PerCpuArray<MapData, u64>,
}

fn open_map(layout: &Layout, name: &str) -> Result<Map> {
    let path = layout.map(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("map {name}"))
}

impl Maps {
    pub fn open(layout: &Layout) -> Result<Self> {
        Ok(Self {
            pods: HashMap::try_from(open_map(layout, names::PODS)?)?,
            ports: HashMap::try_from(open_map(layout, names::PORTS)?)?,
            cidrs: LpmTrie::try_from(open_map(layout, names::CIDRS)?)?,
            in_flight: HashMap::try_from(open_map(layout, names::IN_FLIGHT)?)?,
            stats: PerCpuArray::try_from(open_map(layout, names::STATS)?)?,
        })
    }

    /// Counters summed over CPUs, indexed by `meshlane_common::stat`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        (0..stat::COUNT)
            .map(|i| Ok(self.stats.get(&i, 0)?.iter().sum()))
            .collect()
    }

    pub fn occupancy(&self) -> Occupancy {
        Occupancy {
            pods: self.pods.keys().count(),
            ports: self.ports.keys().count(),
            cidrs: self.cidrs.keys().count(),
            in_flight: self.in_flight.keys().count(),
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Occupancy {
    pub pods: usize,
    pub ports: usize,
    pub cidrs: usize,
    pub in_flight: usize,
}

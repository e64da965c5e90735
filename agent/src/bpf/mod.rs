//! Loading, attaching and pinning the kernel programs, and opening the pinned
//! maps. Everything meshlane puts in the kernel lives under one bpffs
//! directory:
//!
//! ```text
//! <bpffs>/maps/<MAP>     the maps (pod config, lists, in-flight, stats)
//! <bpffs>/progs/<PROG>   the programs
//! <bpffs>/links/<PROG>   one bpf link per program, attached to the cgroup
//! <bpffs>/netns/<COOKIE> the inbound (sk_lookup) link of one pod's network
//!                        namespace
//! ```
//!
//! The shortcut's sk_msg program is attached to the `SOCKS` map itself and
//! lives as long as that map. Links are pinned, so interception outlives the
//! agent process; removing the pins (`meshlane cleanup`) detaches everything.
use std::{
    fs,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, SockHash,
    },
    programs::{CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use aya_obj::generated::bpf_attach_type;
use meshlane_common::{
    names, setting, stat, CidrKeyData, ConnKey, FlowKey, ListenerKey, OrigDst, PodConfig,
    PodCounters, PortKey,
};

/// The object built by `cargo xtask build-ebpf`, embedded at build time.
static EMBEDDED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshlane.bpf.o"));

#[derive(Clone, Copy, Debug)]
enum Kind {
    SockAddr,
    Sockopt,
    SockOps,
    SkLookup,
    SkMsg,
}

/// The inbound capture program, loaded and pinned; attached per pod netns.
fn load_sk_lookup(ebpf: &mut Ebpf, layout: &Layout) -> Result<OwnedFd> {
    load_and_pin(ebpf, layout, SK_LOOKUP_PROGRAM, Kind::SkLookup, "sk_lookup")
}

/// Loads program `name` (the verifier runs here) and pins it, replacing an
/// older pin of that name. Returns its fd, to attach or swap in.
fn load_and_pin(
    ebpf: &mut Ebpf,
    layout: &Layout,
    name: &str,
    kind: Kind,
    hook: &str,
) -> Result<OwnedFd> {
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    let loaded = match kind {
        Kind::SockAddr => <&mut CgroupSockAddr>::try_from(&mut *prog)?.load(),
        Kind::Sockopt => <&mut CgroupSockopt>::try_from(&mut *prog)?.load(),
        Kind::SockOps => <&mut SockOps>::try_from(&mut *prog)?.load(),
        Kind::SkLookup => <&mut SkLookup>::try_from(&mut *prog)?.load(),
        Kind::SkMsg => <&mut SkMsg>::try_from(&mut *prog)?.load(),
    };
    loaded.with_context(|| format!("loading program {name} ({hook}): the kernel refused it"))?;
    let ppath = layout.prog(name);
    let _ = fs::remove_file(&ppath);
    prog.pin(&ppath)
        .with_context(|| format!("pinning program {name} at {}", ppath.display()))?;
    Ok(prog.fd()?.as_fd().try_clone_to_owned()?)
}

/// Attaches the shortcut's verdict program to the `SOCKS` sockhash. On a
/// sockhash that has one, it is replaced; sockets already in the map keep
/// the one they joined with until they close.
fn attach_shortcut(ebpf: &Ebpf, prog: BorrowedFd<'_>) -> Result<()> {
    let socks = SockHash::<_, ConnKey>::try_from(
        ebpf.map(names::SOCKS)
            .ok_or_else(|| anyhow!("map {} missing from the eBPF object", names::SOCKS))?,
    )?;
    prog_attach(
        prog,
        socks.fd().as_fd(),
        bpf_attach_type::BPF_SK_MSG_VERDICT,
    )
    .context("attaching the shortcut (sk_msg) to the SOCKS sockhash")
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

/// Inbound capture, attached per pod network namespace by the agent.
pub const SK_LOOKUP_PROGRAM: &str = "capture_inbound";
/// The shortcut, attached to the `SOCKS` sockhash.
pub const SK_MSG_PROGRAM: &str = "shortcut_send";

/// Program names and hooks, for status output.
pub fn program_hooks() -> impl Iterator<Item = (&'static str, &'static str)> {
    PROGRAMS.iter().map(|(n, _, _, h)| (*n, *h)).chain([
        (SK_LOOKUP_PROGRAM, "sk_lookup (per pod netns)"),
        (SK_MSG_PROGRAM, "sk_msg (SOCKS sockhash)"),
    ])
}

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
        dir.join("netns"),
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
        let fd = load_and_pin(&mut ebpf, layout, name, kind, hook)?;
        let link = link_create(fd.as_fd(), cgroup_dir.as_fd(), attach).with_context(|| {
            format!("attaching {name} to {hook} of cgroup {}", cgroup.display())
        })?;
        let lpath = layout.link(name);
        obj_pin(link.as_fd(), &lpath)
            .with_context(|| format!("pinning link {}", lpath.display()))?;
    }
    // Inbound capture: loaded and pinned here, attached per pod later.
    load_sk_lookup(&mut ebpf, layout)?;
    // The shortcut: the verdict program lives on the sockhash.
    let fd = load_and_pin(&mut ebpf, layout, SK_MSG_PROGRAM, Kind::SkMsg, "sk_msg")?;
    attach_shortcut(&ebpf, fd.as_fd())
}

/// Takes over the interception an earlier agent pinned, without a moment
/// without it: the programs of `object` are loaded against the pinned maps
/// (their state, socket storage and sockhashes included, carries over) and
/// swapped into the pinned links with BPF_LINK_UPDATE, which the kernel does
/// atomically. Fails, changing nothing attached, when a pinned map is
/// missing or its layout differs from the object's (an upgrade that changed
/// a map: the caller then replaces everything).
pub fn adopt(object: &[u8], layout: &Layout) -> Result<()> {
    let parsed = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    for name in names::ALL {
        let path = layout.map(name);
        let pinned = MapData::from_pin(&path)
            .with_context(|| format!("pinned map {} is missing", path.display()))?;
        let info = pinned.info().context("reading pinned map info")?;
        let def = parsed
            .maps
            .get(*name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
        let same = info.key_size() == def.key_size()
            && info.value_size() == def.value_size()
            && info.max_entries() == def.max_entries()
            && info.map_type().ok().map(|t| t as u32) == Some(def.map_type());
        if !same {
            bail!(
                "pinned map {name} has another layout (key {} value {} entries {}) than this build's (key {} value {} entries {})",
                info.key_size(),
                info.value_size(),
                info.max_entries(),
                def.key_size(),
                def.value_size(),
                def.max_entries()
            );
        }
    }
    for &(name, _, _, _) in PROGRAMS {
        if !layout.link(name).exists() {
            bail!("pinned link {} is missing", layout.link(name).display());
        }
    }
    let mut loader = EbpfLoader::new();
    for name in names::ALL {
        loader.map_pin_path(name, layout.map(name));
    }
    let mut ebpf = loader
        .load(object)
        .context("loading the eBPF object against the pinned maps")?;
    let swap = |fd: &OwnedFd, links: Vec<PathBuf>| -> Result<()> {
        for l in links {
            let link = open_pinned_fd(&l)?;
            link_update(link.as_fd(), fd.as_fd())
                .with_context(|| format!("replacing the program of link {}", l.display()))?;
        }
        Ok(())
    };
    for &(name, kind, _, hook) in PROGRAMS {
        let fd = load_and_pin(&mut ebpf, layout, name, kind, hook)?;
        swap(&fd, vec![layout.link(name)])?;
    }
    let fd = load_sk_lookup(&mut ebpf, layout)?;
    let netns_links: Vec<PathBuf> = fs::read_dir(layout.netns_links())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    swap(&fd, netns_links)?;
    let fd = load_and_pin(&mut ebpf, layout, SK_MSG_PROGRAM, Kind::SkMsg, "sk_msg")?;
    attach_shortcut(&ebpf, fd.as_fd())
}

/// Attaches inbound capture to a pod's network namespace and pins the link
/// under the pod's netns cookie. Idempotent: an existing pin is kept.
pub fn attach_netns(layout: &Layout, cookie: u64, netns: &Path) -> Result<()> {
    let pin = layout.netns_link(cookie);
    if pin.exists() {
        return Ok(());
    }
    let prog = open_pinned_fd(&layout.prog(SK_LOOKUP_PROGRAM))
        .with_context(|| format!("opening pinned program {SK_LOOKUP_PROGRAM}"))?;
    let ns = fs::File::open(netns)
        .with_context(|| format!("opening network namespace {}", netns.display()))?;
    let link = link_create(prog.as_fd(), ns.as_fd(), bpf_attach_type::BPF_SK_LOOKUP).with_context(
        || {
            format!(
                "attaching sk_lookup to network namespace {}",
                netns.display()
            )
        },
    )?;
    obj_pin(link.as_fd(), &pin).with_context(|| format!("pinning link {}", pin.display()))?;
    Ok(())
}

/// Detaches inbound capture from a pod's namespace (a no-op if it is gone).
pub fn detach_netns(layout: &Layout, cookie: u64) -> Result<()> {
    let pin = layout.netns_link(cookie);
    match fs::remove_file(&pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("unpinning {}", pin.display())),
    }
}

/// Detaches and unpins everything under `layout`. Links first, so the
/// programs stop running before their maps go. Something already gone is not
/// an error: two cleanups on one node (the uninstall Job may place two pods
/// there) race, and both must succeed.
pub fn uninstall(layout: &Layout) -> Result<Vec<PathBuf>> {
    fn gone_is_fine(r: std::io::Result<()>) -> std::io::Result<bool> {
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
    let mut removed = Vec::new();
    for dir in [
        layout.links(),
        layout.netns_links(),
        layout.progs(),
        layout.maps(),
    ] {
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                if gone_is_fine(fs::remove_file(e.path()))
                    .with_context(|| format!("unpinning {}", e.path().display()))?
                {
                    removed.push(e.path());
                }
            }
        }
        gone_is_fine(fs::remove_dir(&dir))
            .with_context(|| format!("removing {}", dir.display()))?;
    }
    gone_is_fine(fs::remove_dir(&layout.root))
        .with_context(|| format!("removing {}", layout.root.display()))?;
    Ok(removed)
}

// The raw bpf(2) calls aya 0.14 does not offer for every program type: a
// cgroup link for any attach type, and pinning an fd.
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Swaps the program of a link in one step (no window without a program).
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_LINK_UPDATE, &mut attr).context("bpf(BPF_LINK_UPDATE)")?;
    Ok(())
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _pad: u32,
}

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

pub(crate) fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
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

/// Attaches a program to a map (sk_msg to a sockhash). The attachment lives
/// as long as the map, not the program fd: aya would detach it when its
/// program handle drops.
fn prog_attach(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach: bpf_attach_type,
) -> Result<()> {
    let mut attr = ProgAttachAttr {
        target_fd: target.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: attach as u32,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_ATTACH, &mut attr).context("bpf(BPF_PROG_ATTACH)")?;
    Ok(())
}

/// Opens any pinned object as an fd.
fn open_pinned_fd(path: &Path) -> Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr).context("bpf(BPF_OBJ_GET)")?;
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
    pub pod_stats: PerCpuHashMap<MapData, u64, PodCounters>,
    pub pod_by_ip: HashMap<MapData, u32, u64>,
    pub listeners: SockHash<MapData, ListenerKey>,
    pub socks: SockHash<MapData, ConnKey>,
    sock_addrs: HashMap<MapData, ConnKey, u64>,
    pub settings: Array<MapData, u32>,
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
            pod_stats: PerCpuHashMap::try_from(open_map(layout, names::POD_STATS)?)?,
            pod_by_ip: HashMap::try_from(open_map(layout, names::POD_BY_IP)?)?,
            listeners: SockHash::try_from(open_map(layout, names::LISTENERS)?)?,
            socks: SockHash::try_from(open_map(layout, names::SOCKS)?)?,
            sock_addrs: HashMap::try_from(open_map(layout, names::SOCK_ADDRS)?)?,
            settings: Array::try_from(open_map(layout, names::SETTINGS)?)?,
        })
    }

    /// Turns the same-node shortcut on or off for new connections. On needs
    /// to see a peer socket's unread bytes (to push back on a sender whose
    /// reader lags), so it is refused on a kernel whose BTF does not say
    /// where they are.
    pub fn set_shortcut(&mut self, on: bool) -> Result<()> {
        if on {
            let o = crate::btf::PsockOffsets::of_running_kernel()
                .context("the shortcut cannot be turned on")?;
            self.settings
                .set(setting::OFFSET_SK_USER_DATA, o.sk_user_data, 0)
                .context("writing SETTINGS")?;
            self.settings
                .set(setting::OFFSET_PSOCK_QUEUED, o.msg_tot_len, 0)
                .context("writing SETTINGS")?;
            if self.settings.get(&setting::SHORTCUT_MAX_QUEUED, 0)? == 0 {
                self.set_shortcut_max_queued(default_shortcut_max_queued())?;
            }
        }
        self.settings
            .set(setting::SHORTCUT, u32::from(on), 0)
            .context("writing SETTINGS")?;
        Ok(())
    }

    /// Sets how many bytes a shortcut socket may leave unread on its peer.
    pub fn set_shortcut_max_queued(&mut self, bytes: u32) -> Result<()> {
        if bytes == 0 {
            bail!("--shortcut-max-queued 0: give a number of bytes above zero (0 would leave the limit unset)");
        }
        self.settings
            .set(setting::SHORTCUT_MAX_QUEUED, bytes, 0)
            .context("writing SETTINGS")?;
        Ok(())
    }

    pub fn shortcut_max_queued(&self) -> Result<u32> {
        Ok(self.settings.get(&setting::SHORTCUT_MAX_QUEUED, 0)?)
    }

    pub fn shortcut(&self) -> Result<bool> {
        Ok(self.settings.get(&setting::SHORTCUT, 0)? != 0)
    }

    /// Creates a pod's zeroed per-CPU counters, unless they exist.
    pub fn add_pod_stats(&mut self, cookie: u64) -> Result<()> {
        if self.pod_stats.get(&cookie, 0).is_ok() {
            return Ok(());
        }
        let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero = PerCpuValues::try_from(vec![PodCounters::default(); n])?;
        self.pod_stats.insert(cookie, zero, 0)?;
        Ok(())
    }

    /// A pod's counters summed over CPUs (zero if it has none).
    pub fn pod_counters(&self, cookie: u64) -> PodCounters {
        let mut sum = PodCounters::default();
        if let Ok(v) = self.pod_stats.get(&cookie, 0) {
            for cpu in v.iter() {
                for (s, c) in sum.iter_mut().zip(cpu.iter()) {
                    *s += c;
                }
            }
        }
        sum
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
            pod_by_ip: self.pod_by_ip.keys().count(),
            listeners: self.listeners.keys().count(),
            shortcut_sockets: self.socks.keys().count(),
            shortcut_addrs: self.sock_addrs.keys().count(),
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Occupancy {
    pub pods: usize,
    pub ports: usize,
    pub cidrs: usize,
    pub in_flight: usize,
    #[serde(default)]
    pub pod_by_ip: usize,
    #[serde(default)]
    pub listeners: usize,
    #[serde(default)]
    pub shortcut_sockets: usize,
    /// `SOCK_ADDRS`: follows `shortcut_sockets`, emptied by sockops at close.
    #[serde(default)]
    pub shortcut_addrs: usize,
}

/// The shortcut's default limit on bytes left unread on a peer: 4 MiB, the
/// default maximum of a TCP send buffer (net.ipv4.tcp_wmem), so a stalled
/// reader holds about as much as it would over TCP.
pub fn default_shortcut_max_queued() -> u32 {
    4 << 20
}

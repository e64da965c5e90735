//! Loading, attaching, pinning and adopting the kernel programs, by walking
//! the contract's program and map tables (`meshlane_common::{programs,
//! maps}`): a program or map added there is installed, adopted, reported and
//! removed here without another line.
use std::{
    fs,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::SockHash,
    programs::{CgroupSock, CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use aya_obj::generated::bpf_attach_type;
use meshlane_common::{
    maps,
    programs::{self, Hook, ProgType, Program, Target},
    ConnKey,
};

use super::{
    capacity::Capacities,
    layout::Layout,
    sys::{link_create, obj_pin, open_pinned_fd, prog_attach},
};

/// The object built by `cargo xtask build-ebpf`, embedded at build time.
static EMBEDDED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshlane.bpf.o"));

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

/// The kernel's attach type of a hook.
pub fn attach_type(hook: Hook) -> bpf_attach_type {
    match hook {
        Hook::PostBind4 => bpf_attach_type::BPF_CGROUP_INET4_POST_BIND,
        Hook::PostBind6 => bpf_attach_type::BPF_CGROUP_INET6_POST_BIND,
        Hook::Connect4 => bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
        Hook::Connect6 => bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
        Hook::SendMsg4 => bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG,
        Hook::SendMsg6 => bpf_attach_type::BPF_CGROUP_UDP6_SENDMSG,
        Hook::RecvMsg4 => bpf_attach_type::BPF_CGROUP_UDP4_RECVMSG,
        Hook::RecvMsg6 => bpf_attach_type::BPF_CGROUP_UDP6_RECVMSG,
        Hook::GetPeerName4 => bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
        Hook::GetPeerName6 => bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME,
        Hook::GetSockopt => bpf_attach_type::BPF_CGROUP_GETSOCKOPT,
        Hook::SockOps => bpf_attach_type::BPF_CGROUP_SOCK_OPS,
        Hook::SkLookup => bpf_attach_type::BPF_SK_LOOKUP,
        Hook::SkMsg => bpf_attach_type::BPF_SK_MSG_VERDICT,
    }
}

/// Loads program `p` (the verifier runs here). Returns its fd, to attach
/// or swap in.
pub(super) fn load_program(ebpf: &mut Ebpf, p: &Program) -> Result<OwnedFd> {
    let name = p.name;
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    let loaded = match p.hook.prog_type() {
        ProgType::Sock => <&mut CgroupSock>::try_from(&mut *prog)?.load(),
        ProgType::SockAddr => <&mut CgroupSockAddr>::try_from(&mut *prog)?.load(),
        ProgType::Sockopt => <&mut CgroupSockopt>::try_from(&mut *prog)?.load(),
        ProgType::SockOps => <&mut SockOps>::try_from(&mut *prog)?.load(),
        ProgType::SkLookup => <&mut SkLookup>::try_from(&mut *prog)?.load(),
        ProgType::SkMsg => <&mut SkMsg>::try_from(&mut *prog)?.load(),
    };
    loaded.with_context(|| {
        format!(
            "loading program {name} ({}): the kernel refused it",
            p.hook.section()
        )
    })?;
    Ok(prog.fd()?.as_fd().try_clone_to_owned()?)
}

/// [`load_program`], then pins it.
fn load_and_pin(ebpf: &mut Ebpf, layout: &Layout, p: &Program) -> Result<OwnedFd> {
    let fd = load_program(ebpf, p)?;
    let name = p.name;
    let ppath = layout.prog(name);
    let prog = ebpf.program_mut(name).expect("loaded above");
    let _ = fs::remove_file(&ppath);
    prog.pin(&ppath)
        .with_context(|| format!("pinning program {name} at {}", ppath.display()))?;
    Ok(fd)
}

/// Attaches a verdict program to the sockhash `map`. On a sockhash that has
/// one, it is replaced; sockets already in the map keep the one they joined
/// with until they close.
pub(super) fn attach_to_map(ebpf: &Ebpf, p: &Program, map: &str, prog: &OwnedFd) -> Result<()> {
    let socks = SockHash::<_, ConnKey>::try_from(
        ebpf.map(map)
            .ok_or_else(|| anyhow!("map {map} missing from the eBPF object"))?,
    )?;
    prog_attach(prog.as_fd(), socks.fd().as_fd(), attach_type(p.hook)).with_context(|| {
        format!(
            "attaching {} ({}) to the {map} sockhash",
            p.name,
            p.hook.section()
        )
    })
}

/// The global the sk_lookup program reads to know whether it may read the
/// arrival interface (see `ebpf/programs/src/inbound.rs`).
const HAS_INGRESS_IFINDEX: &str = "HAS_INGRESS_IFINDEX";

/// A loader with the programs' read-only globals set for this kernel and
/// the per-pod maps sized for this node (`capacities`).
pub(super) fn loader<'a>(capacities: &Capacities) -> EbpfLoader<'a> {
    static YES: u32 = 1;
    static NO: u32 = 0;
    let mut l = EbpfLoader::new();
    let has = super::btf::sk_lookup_has_ingress_ifindex();
    if !has {
        tracing::warn!(
            "this kernel does not tell sk_lookup the arrival interface (Linux 5.17): \
             traffic.sidecar.istio.io/excludeInterfaces and istio.io/reroute-virtual-interfaces \
             are not applied to arriving connections, which stay captured"
        );
    }
    l.override_global(HAS_INGRESS_IFINDEX, if has { &YES } else { &NO }, true);
    for (name, n) in capacities.sized() {
        l.map_max_entries(name, n);
    }
    l
}

/// Program names and where they are attached, for status output.
pub fn program_hooks() -> impl Iterator<Item = (&'static str, &'static str)> {
    programs::ALL.iter().map(|p| (p.name, p.attached_to()))
}

/// Loads the object with its per-pod maps sized by `capacities`, pins its
/// maps and programs, and attaches every program to its target: the cgroup
/// with a pinned link, a sockhash, or (sk_lookup) nothing yet: each pod's
/// namespace gets a link when the pod is written.
pub fn install(
    object: &[u8],
    cgroup: &Path,
    layout: &Layout,
    capacities: &Capacities,
) -> Result<()> {
    let cgroup_dir =
        fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let mut ebpf: Ebpf = loader(capacities).load(object).with_context(|| {
        format!(
            "loading the eBPF object (maps sized for {})",
            capacities.flags()
        )
    })?;
    // Only the maps of the contract: the object's read-only globals are
    // the programs' own, set at each load.
    for (name, map) in ebpf
        .maps()
        .filter(|(n, _)| maps::ALL.iter().any(|m| m.name == *n))
    {
        let path = layout.map(name);
        map.pin(&path)
            .with_context(|| format!("pinning map {name} at {}", path.display()))?;
    }
    for p in programs::ALL {
        let fd = load_and_pin(&mut ebpf, layout, p)?;
        match p.hook.target() {
            Target::Cgroup => {
                let link = link_create(fd.as_fd(), cgroup_dir.as_fd(), attach_type(p.hook))
                    .with_context(|| {
                        format!(
                            "attaching {} to {} of cgroup {}",
                            p.name,
                            p.hook.section(),
                            cgroup.display()
                        )
                    })?;
                let lpath = layout.link(p.name);
                obj_pin(link.as_fd(), &lpath)
                    .with_context(|| format!("pinning link {}", lpath.display()))?;
            }
            Target::PodNetns => {}
            Target::Map(map) => attach_to_map(&ebpf, p, map, &fd)?,
        }
    }
    Ok(())
}

/// The program attached to each pod's network namespace.
fn netns_program() -> &'static Program {
    programs::ALL
        .iter()
        .find(|p| p.hook.target() == Target::PodNetns)
        .expect("the programs table has a per-pod-netns program")
}

/// Attaches inbound capture to a pod's network namespace and pins the link
/// under the pod's netns cookie. Idempotent: an existing pin is kept.
pub fn attach_netns(layout: &Layout, cookie: u64, netns: &Path) -> Result<()> {
    let pin = layout.netns_link(cookie);
    if pin.exists() {
        return Ok(());
    }
    let p = netns_program();
    let prog = open_pinned_fd(&layout.prog(p.name))
        .with_context(|| format!("opening pinned program {}", p.name))?;
    let ns = fs::File::open(netns)
        .with_context(|| format!("opening network namespace {}", netns.display()))?;
    let link = link_create(prog.as_fd(), ns.as_fd(), attach_type(p.hook)).with_context(|| {
        format!(
            "attaching {} to network namespace {}",
            p.hook.section(),
            netns.display()
        )
    })?;
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
    // A migration's staged maps and programs first (see `upgrade.rs`).
    let mut removed = if layout.staging().root.exists() {
        uninstall(&layout.staging())?
    } else {
        Vec::new()
    };
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

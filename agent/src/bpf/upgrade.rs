//! Taking over what an earlier agent pinned, whatever its map layout, with
//! every pod captured throughout and nothing ever detached.
//!
//! The order:
//! 1. compare each pinned map with this build's row of it, at the capacity
//!    this node is configured for (`capacity.rs`): the same layout is
//!    reused as is; a map that is missing or differs is created anew,
//!    pinned under `<bpffs>/next/maps`, beside a second pin of each reused
//!    one, so that directory holds this build's complete set of maps;
//! 2. copy into each new map the old one's entries when they carry over
//!    (same kind, key and value: only the capacity changed); a map
//!    configured smaller than the entries its pin holds stops the upgrade
//!    before anything is created, naming the map and the flags: entries are
//!    never dropped to fit;
//! 3. the agent writes its pods into the staged maps (its first pod list
//!    and namespace scan, its proxies' listening sockets into `LISTENERS`)
//!    while the old programs keep running on the old maps;
//!    (this build's programs are loaded against the staged maps before, so
//!    the verifier has spoken before anything is filled);
//! 4. [`Migration::finish`]: swap each program into each cgroup link and
//!    each pod's sk_lookup link with BPF_LINK_UPDATE (a hook new in this
//!    build gets a new link), then pin the programs and rename the staged
//!    maps over the old pins; the old maps go with the last program that
//!    used them.
//!
//! Until the first link is swapped nothing the old programs use has
//! changed; a failure during the swaps puts the old program back into every
//! link already swapped. Either way the error names the step and the
//! object, and the old programs keep running.
//!
//! Without a layout change (a restart, an upgrade of the programs only) the
//! same steps run with nothing to create, and [`adopt`] finishes at once.
use std::{
    fs,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::Ebpf;
use aya_obj::Object;
use meshlane_common::{
    maps::{self, Kind, Map},
    programs::{self, Target},
};
use tracing::info;

use super::{
    capacity::Capacities,
    layout::Layout,
    load::{attach_to_map, attach_type, load_program, loader},
    maps::count_entries,
    sys::{copy_entries, link_create, link_program, link_update, obj_pin, open_pinned_fd},
};

/// How a pinned map compares with this build's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pinned {
    /// Same kind, key, value and capacity: reused as is.
    Same,
    Missing,
    /// Another layout, described.
    Differs {
        was: String,
        carries: bool,
    },
}

/// Kind, key, value and capacity, as the kernel and the object say them.
fn shape(kind: u32, key: u32, value: u32, entries: u32) -> String {
    format!("type {kind} key {key} value {value} entries {entries}")
}

/// Each map of this build, at the capacity `capacities` gives it, against
/// its pin under `layout`. An error when a pinned map holds more entries
/// than its configured capacity.
pub fn compare(
    object: &Object,
    layout: &Layout,
    capacities: &Capacities,
) -> Result<Vec<(&'static Map, Pinned)>> {
    maps::ALL
        .iter()
        .map(|m| {
            let def = object
                .maps
                .get(m.name)
                .ok_or_else(|| anyhow!("map {} missing from the eBPF object", m.name))?;
            let path = layout.map(m.name);
            if !path.exists() {
                return Ok((m, Pinned::Missing));
            }
            let data = aya::maps::MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            let info = data
                .info()
                .with_context(|| format!("reading pinned map {}", path.display()))?;
            let kind = info.map_type().map_or(u32::MAX, |t| t as u32);
            let capacity = capacities.of(m);
            let was = shape(kind, info.key_size(), info.value_size(), info.max_entries());
            let now = shape(def.map_type(), def.key_size(), def.value_size(), capacity);
            if was == now {
                return Ok((m, Pinned::Same));
            }
            // An array that shrinks is not copied: its indices past the
            // end (a counter, a setting this build dropped) have no place.
            let shrinks =
                matches!(m.kind, Kind::Array | Kind::PerCpuArray) && capacity < info.max_entries();
            // A map of entries (copied, or refilled by the agent and the
            // programs) must hold what the pinned one holds.
            if !matches!(m.kind, Kind::Array | Kind::PerCpuArray | Kind::SkStorage)
                && capacity < info.max_entries()
            {
                let entries = count_entries(&data, info.key_size());
                if entries > capacity as usize {
                    bail!(
                        "map {} holds {entries} entries, more than the {capacity} that {} give \
                         it: start with a --max-pods (or --max-list-entries) that holds them; \
                         nothing was changed, the pinned interception keeps running",
                        m.name,
                        capacities.flags()
                    );
                }
            }
            let carries = kind == def.map_type()
                && info.key_size() == def.key_size()
                && info.value_size() == def.value_size()
                && copyable(m.kind)
                && !shrinks;
            Ok((m, Pinned::Differs { was, carries }))
        })
        .collect()
}

/// Maps whose entries user space can read and write back.
fn copyable(kind: Kind) -> bool {
    match kind {
        Kind::Hash | Kind::Array | Kind::PerCpuArray | Kind::PerCpuHash | Kind::LpmTrie => true,
        // Sockets and socket storage: refilled by the agent (listeners) or
        // by the programs as sockets come.
        Kind::SkStorage | Kind::SockHash => false,
    }
}

/// Bytes of one value as user space reads it: per CPU for per-CPU maps.
fn user_value_size(m: &Map) -> Result<usize> {
    let v = m.value_size as usize;
    Ok(match m.kind {
        Kind::PerCpuArray | Kind::PerCpuHash => {
            v.next_multiple_of(8) * aya::util::nr_cpus().map_err(|(_, e)| e)?
        }
        _ => v,
    })
}

/// An upgrade under way: this build's maps are staged (and pinned), its
/// programs not loaded yet; the old programs still run.
pub struct Migration {
    ebpf: Ebpf,
    /// This build's programs, loaded against the staged maps.
    loaded: Vec<(&'static programs::Program, OwnedFd)>,
    staged: Layout,
    cgroup: PathBuf,
    plan: Vec<(&'static Map, Pinned)>,
}

/// Takes over the interception pinned under `layout`, with the per-pod maps
/// sized by `capacities`. With the same map layout everything is swapped at
/// once (None); otherwise the new maps are staged and the [`Migration`] is
/// returned for the agent to fill and finish. On error nothing the old
/// programs use has changed.
pub fn adopt(
    object: &[u8],
    layout: &Layout,
    cgroup: &Path,
    capacities: &Capacities,
) -> Result<Option<Migration>> {
    let m = Migration::prepare(object, layout, cgroup, capacities)?;
    if m.changed().next().is_none() {
        m.finish(layout)?;
        return Ok(None);
    }
    Ok(Some(m))
}

impl Migration {
    fn prepare(
        object: &[u8],
        layout: &Layout,
        cgroup: &Path,
        capacities: &Capacities,
    ) -> Result<Self> {
        let parsed = Object::parse(object).context("parsing the eBPF object")?;
        let plan = compare(&parsed, layout, capacities)?;
        let staged = layout.staging();
        // What a migration that died left: never in use by a program.
        super::load::uninstall(&staged).context("removing a staged migration left over")?;
        let m = Self::stage(object, layout, &staged, plan, cgroup, capacities);
        if m.is_err() {
            let _ = super::load::uninstall(&staged);
        }
        m
    }

    fn stage(
        object: &[u8],
        layout: &Layout,
        staged: &Layout,
        plan: Vec<(&'static Map, Pinned)>,
        cgroup: &Path,
        capacities: &Capacities,
    ) -> Result<Self> {
        for d in [staged.maps(), staged.progs()] {
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut loader = loader(capacities);
        for (m, pinned) in &plan {
            let at = if *pinned == Pinned::Same {
                layout.map(m.name)
            } else {
                staged.map(m.name)
            };
            loader.map_pin_path(m.name, at);
        }
        let mut ebpf = loader.load(object).with_context(|| {
            format!(
                "creating this build's maps beside the pinned ones (sized for {})",
                capacities.flags()
            )
        })?;
        for (m, pinned) in &plan {
            match pinned {
                Pinned::Same => {
                    let fd = open_pinned_fd(&layout.map(m.name))?;
                    obj_pin(fd.as_fd(), &staged.map(m.name))
                        .with_context(|| format!("pinning map {} again as staged", m.name))?;
                }
                Pinned::Differs { carries: true, .. } => {
                    let from = open_pinned_fd(&layout.map(m.name))?;
                    let to = open_pinned_fd(&staged.map(m.name))?;
                    let n = copy_entries(
                        from.as_fd(),
                        to.as_fd(),
                        m.key_size as usize,
                        user_value_size(m)?,
                    )
                    .with_context(|| format!("copying map {} into its new layout", m.name))?;
                    info!(map = m.name, entries = n, "copied into the new layout");
                }
                Pinned::Differs { carries: false, .. } | Pinned::Missing => {}
            }
        }
        // The verifier runs now, before the agent fills anything: the swap
        // itself is then a few system calls.
        let mut loaded = Vec::new();
        for p in programs::ALL {
            let fd = load_program(&mut ebpf, p)
                .with_context(|| format!("loading {} against the new maps", p.name))?;
            loaded.push((p, fd));
        }
        Ok(Self {
            ebpf,
            loaded,
            staged: staged.clone(),
            cgroup: cgroup.to_path_buf(),
            plan,
        })
    }

    /// Where this build's maps are pinned until [`Migration::finish`]: the
    /// agent opens and fills them there.
    pub fn staged(&self) -> &Layout {
        &self.staged
    }

    fn changed(&self) -> impl Iterator<Item = &(&'static Map, Pinned)> {
        self.plan.iter().filter(|(_, p)| *p != Pinned::Same)
    }

    /// What changes, for the log: `IFACES (new), PODS (type .. -> copied)`.
    pub fn describe(&self) -> String {
        self.changed()
            .map(|(m, p)| match p {
                Pinned::Missing => format!("{} (new)", m.name),
                Pinned::Differs { was, carries } => format!(
                    "{} (was {was}; {})",
                    m.name,
                    if *carries {
                        "entries copied"
                    } else {
                        "refilled"
                    }
                ),
                Pinned::Same => unreachable!("only changed maps"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Swaps this build's programs (loaded against the staged maps) into
    /// every link, then pins them and the maps where the old ones were.
    pub fn finish(mut self, layout: &Layout) -> Result<()> {
        let r = self.swap_all(layout);
        if r.is_err() {
            let _ = super::load::uninstall(&self.staged);
        }
        r
    }

    fn swap_all(&mut self, layout: &Layout) -> Result<()> {
        let mut swaps = Swaps::default();
        if let Err(e) = swaps.apply(&self.ebpf, &self.loaded, layout, &self.cgroup) {
            let undone = swaps.undo();
            return Err(e.context(format!(
                "the previous programs keep running ({undone} swapped links put back)"
            )));
        }
        self.commit(layout, swaps.created)
            .context("every link runs this build's programs, but pinning them failed")
    }

    /// Pins the programs, new links and maps where the old ones were.
    fn commit(&mut self, layout: &Layout, created: Vec<(OwnedFd, PathBuf)>) -> Result<()> {
        for (link, pin) in created {
            obj_pin(link.as_fd(), &pin)
                .with_context(|| format!("pinning link {}", pin.display()))?;
        }
        for p in programs::ALL {
            let prog = self
                .ebpf
                .program_mut(p.name)
                .ok_or_else(|| anyhow!("program {} missing", p.name))?;
            let tmp = self.staged.prog(p.name);
            prog.pin(&tmp)
                .with_context(|| format!("pinning program {}", p.name))?;
            replace(&tmp, &layout.prog(p.name))?;
        }
        for (m, _) in &self.plan {
            replace(&self.staged.map(m.name), &layout.map(m.name))?;
        }
        // Maps this build no longer has: their programs are gone.
        if let Ok(rd) = fs::read_dir(layout.maps()) {
            for e in rd.flatten() {
                if maps::by_name(&e.file_name().to_string_lossy()).is_none() {
                    fs::remove_file(e.path())
                        .with_context(|| format!("unpinning {}", e.path().display()))?;
                }
            }
        }
        super::load::uninstall(&self.staged)?;
        Ok(())
    }
}

/// Moves a pin over another in one step (bpffs renames like any fs).
fn replace(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to)
        .with_context(|| format!("moving pin {} to {}", from.display(), to.display()))
}

/// The links swapped so far, with the program each ran before.
#[derive(Default)]
struct Swaps {
    done: Vec<(PathBuf, OwnedFd, OwnedFd)>,
    /// Links of hooks the earlier agent had none for (unpinned until the
    /// commit: dropping them detaches).
    created: Vec<(OwnedFd, PathBuf)>,
}

impl Swaps {
    fn apply(
        &mut self,
        ebpf: &Ebpf,
        loaded: &[(&programs::Program, OwnedFd)],
        layout: &Layout,
        cgroup: &Path,
    ) -> Result<()> {
        for (p, fd) in loaded {
            match p.hook.target() {
                Target::Cgroup if !layout.link(p.name).exists() => {
                    let dir = fs::File::open(cgroup)
                        .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
                    let link = link_create(fd.as_fd(), dir.as_fd(), attach_type(p.hook))
                        .with_context(|| {
                            format!("attaching {} (a hook new in this build)", p.name)
                        })?;
                    self.created.push((link, layout.link(p.name)));
                }
                Target::Cgroup => self.swap(&layout.link(p.name), fd)?,
                Target::PodNetns => {
                    let links: Vec<PathBuf> = fs::read_dir(layout.netns_links())
                        .map(|d| d.flatten().map(|e| e.path()).collect())
                        .unwrap_or_default();
                    for l in links {
                        self.swap(&l, fd)?;
                    }
                }
                Target::Map(_) => {}
            }
        }
        // Last: attaching to a sockhash has no undo.
        for (p, fd) in loaded {
            if let Target::Map(map) = p.hook.target() {
                attach_to_map(ebpf, p, map, fd)?;
            }
        }
        Ok(())
    }

    fn swap(&mut self, pin: &Path, prog: &OwnedFd) -> Result<()> {
        let link = match open_pinned_fd(pin) {
            Ok(l) => l,
            // A pod's link removed meanwhile: nothing to swap.
            Err(_) if !pin.exists() => return Ok(()),
            Err(e) => return Err(e.context(format!("opening link {}", pin.display()))),
        };
        let old = link_program(link.as_fd())
            .with_context(|| format!("reading the program of link {}", pin.display()))?;
        link_update(link.as_fd(), prog.as_fd())
            .with_context(|| format!("swapping the program of link {}", pin.display()))?;
        self.done.push((pin.to_path_buf(), link, old));
        Ok(())
    }

    /// Puts the old program back into every link swapped; returns how many.
    fn undo(&mut self) -> usize {
        self.created.clear();
        let mut n = 0;
        for (pin, link, old) in self.done.drain(..).rev() {
            match link_update(link.as_fd(), old.as_fd()) {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::error!(link = %pin.display(), "putting the previous program back: {e:#}")
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_maps_are_copied() {
        assert!(copyable(Kind::LpmTrie));
        assert!(copyable(Kind::PerCpuHash));
        assert!(!copyable(Kind::SockHash));
        assert!(!copyable(Kind::SkStorage));
    }
}

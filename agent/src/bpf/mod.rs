//! Everything meshlane puts in the kernel lives under one bpffs directory:
//!
//! ```text
//! <bpffs>/maps/<MAP>     the maps (pod config, lists, in-flight, stats)
//! <bpffs>/progs/<PROG>   the programs
//! <bpffs>/links/<PROG>   one bpf link per cgroup program
//! <bpffs>/netns/<COOKIE> the inbound (sk_lookup) link of one pod's network
//!                        namespace
//! ```
//!
//! The shortcut's sk_msg program is attached to the `SOCKS` map itself and
//! lives as long as that map. Links are pinned, so interception outlives the
//! agent process; removing the pins (`meshlane cleanup`) detaches everything.
//!
//! - `capacity`: how many entries each per-pod map holds (`--max-pods`);
//! - `layout`: the directory and the bpf filesystem under it;
//! - `load`: install, attach per pod, uninstall (walking the tables);
//! - `upgrade`: adopt what an earlier agent pinned, migrating its maps;
//! - `maps`: the pinned maps and every write to them;
//! - `btf`: offsets read from the running kernel's BTF;
//! - `sys`: the raw bpf(2) calls aya does not offer.
pub mod btf;
pub mod capacity;
pub mod layout;
pub mod load;
pub mod maps;
pub mod sys;
pub mod upgrade;

pub use capacity::Capacities;
pub use layout::{ensure_bpffs, Layout};
pub use load::{attach_netns, detach_netns, install, object_bytes, program_hooks, uninstall};
pub use maps::{default_shortcut_max_queued, Maps, Occupancy, PodEntries, PodView};
pub use upgrade::{adopt, Migration};

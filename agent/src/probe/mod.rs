//! Start-up feature probes: does this kernel have everything the programs
//! rely on? Asked before loading anything, so an old kernel gets one clear
//! sentence naming what is missing and the kernel that has it, instead of a
//! verifier log from deep inside the load.
//!
//! What is required is read from the eBPF object itself: each program's type
//! and attach type from its section, each helper it calls from its
//! instructions, each map's type; plus what the loader does with them (a
//! `BPF_LINK_CREATE` link per cgroup program). So a program or helper the
//! kernel side starts using is probed without anyone editing a list here.
//! The tables below only give each feature its name and the first kernel
//! that has it (from kernel history, commit ids in the comments); a pair the
//! table does not know is still probed, and reported with "minimum kernel
//! unknown".
//!
//! How each feature is probed (as `bpftool feature probe` does):
//! - program/attach type: load `r0 = 1; exit` with that type and expected
//!   attach type; EINVAL means the kernel does not know the pair;
//! - helper for a program type: load `call helper; r0 = 1; exit`; the
//!   verifier says "unknown func", "invalid func" or "program of this type
//!   cannot use helper" when it is unavailable, and complains about the
//!   arguments (which we leave unset) when it is;
//! - map type: aya's `is_map_supported` creates a tiny map of that type;
//! - cgroup links: a trivial connect4 program linked to a new, empty child
//!   of the agent's cgroup (no process is in it), then detached and removed.
use std::{
    collections::BTreeSet,
    fmt,
    os::fd::{AsFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya_obj::{
    generated::{bpf_attach_type, bpf_map_type, bpf_prog_type},
    programs::{CgroupSockAddrAttachType, CgroupSockoptAttachType},
    Object, ProgramSection,
};
use meshlane_common::programs::{self, Hook, ProgType};
use serde::Serialize;

pub mod attached;

/// The start of every refusal, so tools (the VM matrix) can recognise it.
pub const REFUSAL: &str = "meshlane cannot run on this kernel";

/// One kernel feature meshlane relies on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Feature {
    pub what: Need,
    /// First mainline kernel that has it ("5.15"), or None if not in our table.
    pub min_kernel: Option<&'static str>,
    /// The programs (or loader step) that need it.
    pub used_by: BTreeSet<String>,
}

/// What is probed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Need {
    Program {
        prog_type: u32,
        attach: Option<u32>,
    },
    Helper {
        prog_type: u32,
        attach: Option<u32>,
        helper: u32,
    },
    Map {
        map_type: u32,
    },
    CgroupLink,
}

/// A probe's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    Yes,
    No,
    /// The probe itself failed (no privilege, no cgroup v2, ...).
    Unknown(String),
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Need::Program { prog_type, attach } => {
                write!(f, "program type {}", hook_name(*prog_type, *attach))
            }
            Need::Helper {
                prog_type,
                attach,
                helper,
            } => write!(
                f,
                "helper {}() in {} programs",
                helper_name(*helper),
                hook_name(*prog_type, *attach)
            ),
            Need::Map { map_type } => write!(f, "map type {}", map_name(*map_type)),
            Need::CgroupLink => write!(f, "cgroup bpf links (BPF_LINK_CREATE)"),
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.what)
    }
}

// ---------------------------------------------------------------------------
// Names and minimum kernels

const PT_SOCK_OPS: u32 = bpf_prog_type::BPF_PROG_TYPE_SOCK_OPS as u32;
const PT_SK_MSG: u32 = bpf_prog_type::BPF_PROG_TYPE_SK_MSG as u32;
const PT_SOCK_ADDR: u32 = bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR as u32;
const PT_SOCK: u32 = bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK as u32;
const PT_SOCKOPT: u32 = bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCKOPT as u32;
const PT_SK_LOOKUP: u32 = bpf_prog_type::BPF_PROG_TYPE_SK_LOOKUP as u32;

const AT_CONNECT4: u32 = bpf_attach_type::BPF_CGROUP_INET4_CONNECT as u32;
const AT_GETPEERNAME4: u32 = bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME as u32;
const AT_GETSOCKOPT: u32 = bpf_attach_type::BPF_CGROUP_GETSOCKOPT as u32;
const AT_SK_LOOKUP: u32 = bpf_attach_type::BPF_SK_LOOKUP as u32;
const AT_SK_MSG: u32 = bpf_attach_type::BPF_SK_MSG_VERDICT as u32;

// Helper ids (include/uapi/linux/bpf.h, __BPF_FUNC_MAPPER order).
const H_MAP_LOOKUP: u32 = 1;
const H_MAP_UPDATE: u32 = 2;
const H_MAP_DELETE: u32 = 3;
const H_UID_GID: u32 = 15;
const H_SOCKET_COOKIE: u32 = 46;
const H_CB_FLAGS_SET: u32 = 59;
const H_BIND: u32 = 64;
const H_SOCK_HASH_UPDATE: u32 = 70;
const H_MSG_REDIRECT_HASH: u32 = 71;
const H_SK_STORAGE_GET: u32 = 107;
const H_SK_STORAGE_DELETE: u32 = 108;
const H_NETNS_COOKIE: u32 = 122;
const H_SK_ASSIGN: u32 = 124;
const H_SK_RELEASE: u32 = 86;
const H_PROBE_READ_KERNEL: u32 = 113;

/// The kernel's program type and expected attach type of a hook.
fn hook_ids(hook: Hook) -> (u32, Option<u32>) {
    let at = crate::bpf::load::attach_type(hook) as u32;
    match hook.prog_type() {
        ProgType::Sock => (PT_SOCK, Some(at)),
        ProgType::SockAddr => (PT_SOCK_ADDR, Some(at)),
        ProgType::Sockopt => (PT_SOCKOPT, Some(at)),
        ProgType::SockOps => (PT_SOCK_OPS, None),
        ProgType::SkLookup => (PT_SK_LOOKUP, Some(at)),
        ProgType::SkMsg => (PT_SK_MSG, Some(at)),
    }
}

/// The hook of the programs table with these ids.
fn hook_of(prog_type: u32, attach: Option<u32>) -> Option<Hook> {
    programs::ALL
        .iter()
        .map(|p| p.hook)
        .find(|h| hook_ids(*h) == (prog_type, attach))
}

fn hook_name(prog_type: u32, attach: Option<u32>) -> String {
    match (hook_of(prog_type, attach), attach) {
        (Some(h), _) => h.section().into(),
        (None, Some(a)) => format!("type {prog_type} / attach type {a}"),
        (None, None) => format!("type {prog_type}"),
    }
}

/// First kernel with a program type and attach type (the programs table).
fn program_min(prog_type: u32, attach: Option<u32>) -> Option<&'static str> {
    hook_of(prog_type, attach).map(Hook::min_kernel)
}
fn helper_name(id: u32) -> String {
    match id {
        H_MAP_LOOKUP => "bpf_map_lookup_elem".into(),
        H_MAP_UPDATE => "bpf_map_update_elem".into(),
        H_MAP_DELETE => "bpf_map_delete_elem".into(),
        H_UID_GID => "bpf_get_current_uid_gid".into(),
        H_SOCKET_COOKIE => "bpf_get_socket_cookie".into(),
        H_CB_FLAGS_SET => "bpf_sock_ops_cb_flags_set".into(),
        H_BIND => "bpf_bind".into(),
        H_SOCK_HASH_UPDATE => "bpf_sock_hash_update".into(),
        H_MSG_REDIRECT_HASH => "bpf_msg_redirect_hash".into(),
        H_SK_STORAGE_GET => "bpf_sk_storage_get".into(),
        H_SK_STORAGE_DELETE => "bpf_sk_storage_delete".into(),
        H_NETNS_COOKIE => "bpf_get_netns_cookie".into(),
        H_SK_ASSIGN => "bpf_sk_assign".into(),
        H_SK_RELEASE => "bpf_sk_release".into(),
        H_PROBE_READ_KERNEL => "bpf_probe_read_kernel".into(),
        other => format!("bpf helper #{other}"),
    }
}

/// First kernel where program type `prog_type` may call `helper`. Helpers
/// every program type had from its start count from the type's own version.
fn helper_min(prog_type: u32, attach: Option<u32>, helper: u32) -> Option<&'static str> {
    let own = program_min(prog_type, attach);
    Some(match (prog_type, helper) {
        (_, H_MAP_LOOKUP | H_MAP_UPDATE | H_MAP_DELETE) => return own,
        // 4fbac77d2d09 "bpf: Hooks for sys_bind": sock_addr_func_proto starts
        // with get_current_uid_gid (sockets are used in process context).
        (PT_SOCK_ADDR, H_UID_GID) => "4.17",
        // 0d01da6afc54: cg_sockopt_func_proto had it from the start.
        (PT_SOCKOPT, H_UID_GID) => "5.3",
        // d74bad4e74ee "bpf: Hooks for sys_connect" added bpf_bind()
        (PT_SOCK_ADDR, H_BIND) => "4.17",
        // d692f1138a4b "bpf: Support bpf_get_socket_cookie in more prog types"
        (PT_SOCK_ADDR | PT_SOCK_OPS, H_SOCKET_COOKIE) => "4.19",
        // b13d88072172 "bpf: Adds field bpf_sock_ops_cb_flags to tcp_sock"
        (PT_SOCK_OPS, H_CB_FLAGS_SET) => "4.16",
        // 81110384441a "bpf: sockmap, add hash map support"
        (PT_SOCK_OPS, H_SOCK_HASH_UPDATE) | (PT_SK_MSG, H_MSG_REDIRECT_HASH) => "4.18",
        // fb85c4a730af "bpf: export bpf_sock for BPF_PROG_TYPE_CGROUP_SOCK_ADDR
        // prog type" (also the ctx->sk field the programs read)
        (PT_SOCK_ADDR, H_SK_STORAGE_GET | H_SK_STORAGE_DELETE) => "5.3",
        // 1314ef561102 "bpf: export bpf_sock for BPF_PROG_TYPE_SOCK_OPS prog type"
        // (also bpf_sock_ops.sk)
        (PT_SOCK_OPS, H_SK_STORAGE_GET | H_SK_STORAGE_DELETE) => "5.3",
        // 0d01da6afc54: cg_sockopt_func_proto had sk storage from the start.
        (PT_SOCKOPT, H_SK_STORAGE_GET | H_SK_STORAGE_DELETE) => "5.3",
        // 13d70f5a5ecf "bpf, sockmap: Add sk storage helpers ... for sk_msg"
        (PT_SK_MSG, H_SK_STORAGE_GET | H_SK_STORAGE_DELETE) => "5.11",
        // f318903c0bf4 "bpf: Add netns cookie and enable it for bpf cgroup hooks"
        (PT_SOCK_ADDR, H_NETNS_COOKIE) => "5.7",
        // "bpf: Allow bpf_get_netns_cookie in BPF_PROG_TYPE_SOCK_OPS" and
        // fab60e29fcc6 "... in BPF_PROG_TYPE_SK_MSG" (Xu Liu, 2021)
        (PT_SOCK_OPS | PT_SK_MSG, H_NETNS_COOKIE) => "5.15",
        // e9ddbb7707ff: sk_lookup programs select a socket with bpf_sk_assign()
        // and release what a sockmap lookup returned.
        (PT_SK_LOOKUP, H_SK_ASSIGN | H_SK_RELEASE) => "5.9",
        // Socket lookups (and so bpf_sk_release) in cgroup sock_addr programs
        // came with "bpf: Support socket lookup in CGROUP_SOCK_ADDR progs"
        // (Andrey Ignatov, v5.0 cycle). Not re-checked: the probe asks the
        // kernel either way, only this message's version depends on it.
        (PT_SOCK_ADDR, H_SK_RELEASE) => "5.0",
        // The shortcut's backpressure reads a peer's queue. bpf_probe_read_kernel
        // (5.5) is offered to networking programs by bpf_base_func_proto to
        // CAP_PERFMON holders (added with CAP_PERFMON, 5.8). Not re-checked
        // against the commit; the 6.1 VM row loads it, and the probe asks the
        // kernel either way, only this message's version depends on it.
        (PT_SK_MSG, H_PROBE_READ_KERNEL) => "5.8",
        // Not confirmed which release allowed it in cgroup sockopt programs;
        // the same series as sockops (5.15) is assumed for the message. The
        // probe itself asks the kernel.
        (PT_SOCKOPT, H_NETNS_COOKIE) => "5.15",
        // aac3fc320d94 "bpf: post-hooks for sys_bind": sock_filter_func_proto
        // has had get_current_uid_gid (sockets are created in process
        // context) since cgroup sock programs could read it.
        (PT_SOCK, H_UID_GID) => "4.17",
        // f318903c0bf4 (above) enabled it for cgroup sock programs too.
        (PT_SOCK, H_NETNS_COOKIE) => "5.7",
        // bpf_sk_storage_get_cg_sock_proto; the release is not re-checked
        // against the commit (the 6.1 VM row loads it), only this message's
        // version depends on it: the probe asks the kernel either way.
        (PT_SOCK, H_SK_STORAGE_GET) => "5.10",
        _ => return None,
    })
}

fn map_name(t: u32) -> String {
    match bpf_map_type::try_from(t) {
        Ok(m) => format!("{m:?}")
            .trim_start_matches("BPF_MAP_TYPE_")
            .to_ascii_lowercase(),
        Err(_) => format!("#{t}"),
    }
}

fn map_min(t: u32) -> Option<&'static str> {
    use bpf_map_type as M;
    let m = bpf_map_type::try_from(t).ok()?;
    Some(match m {
        // 0f8e4bd8a1fc / 28fbcfa08d8e
        M::BPF_MAP_TYPE_HASH | M::BPF_MAP_TYPE_ARRAY => "3.19",
        // 824bd0ce6c7c / a10423b87a7e
        M::BPF_MAP_TYPE_PERCPU_HASH | M::BPF_MAP_TYPE_PERCPU_ARRAY => "4.6",
        // b95a5c4db09b "bpf: add a longest prefix match trie map implementation"
        M::BPF_MAP_TYPE_LPM_TRIE => "4.11",
        // 174a79ff9515 "bpf: sockmap with sk redirect support"
        M::BPF_MAP_TYPE_SOCKMAP => "4.14",
        // 81110384441a "bpf: sockmap, add hash map support"
        M::BPF_MAP_TYPE_SOCKHASH => "4.18",
        // 6ac99e8f23d4 "bpf: Introduce bpf sk local storage"
        M::BPF_MAP_TYPE_SK_STORAGE => "5.2",
        _ => return None,
    })
}

/// af6eea57437a "bpf: Implement bpf_link-based cgroup BPF program attachment"
const CGROUP_LINK_MIN: &str = "5.7";

// ---------------------------------------------------------------------------
// What the object needs

/// Every feature the object's programs and maps need, and what the loader
/// needs to attach them.
pub fn requirements(object: &[u8]) -> Result<Vec<Feature>> {
    let obj = Object::parse(object).context("parsing the eBPF object for the start-up probes")?;
    let mut out: Vec<Feature> = Vec::new();
    let mut add = |what: Need, min: Option<&'static str>, by: &str| {
        if let Some(f) = out.iter_mut().find(|f| f.what == what) {
            f.used_by.insert(by.to_string());
        } else {
            out.push(Feature {
                what,
                min_kernel: min,
                used_by: BTreeSet::from([by.to_string()]),
            });
        }
    };
    let mut names: Vec<&String> = obj.programs.keys().collect();
    names.sort();
    let mut cgroup_program = None;
    for name in names {
        let prog = &obj.programs[name];
        let Some((prog_type, attach, cgroup)) = section_type(&prog.section) else {
            bail!(
                "program {name}: section {:?} is not one the start-up probes know; add it to agent/src/probe.rs",
                prog.section
            );
        };
        if cgroup {
            cgroup_program.get_or_insert(name.clone());
        }
        add(
            Need::Program { prog_type, attach },
            program_min(prog_type, attach),
            name,
        );
        let Some(func) = obj.functions.get(&prog.function_key()) else {
            continue;
        };
        for insn in &func.instructions {
            // BPF_JMP | BPF_CALL with src_reg 0: a helper call (src_reg 1 is
            // a call to another BPF function, 2 a kfunc).
            if insn.code == 0x85 && insn.src_reg() == 0 {
                let helper = insn.imm as u32;
                add(
                    Need::Helper {
                        prog_type,
                        attach,
                        helper,
                    },
                    helper_min(prog_type, attach, helper),
                    name,
                );
            }
        }
    }
    if let Some(p) = cgroup_program {
        add(Need::CgroupLink, Some(CGROUP_LINK_MIN), &p);
    }
    let mut maps: Vec<(&String, u32)> = obj.maps.iter().map(|(n, m)| (n, m.map_type())).collect();
    maps.sort();
    for (name, t) in maps {
        if name.starts_with('.') {
            // .rodata/.bss/.data: arrays the loader makes, no feature of ours.
            continue;
        }
        add(Need::Map { map_type: t }, map_min(t), name);
    }
    out.sort();
    Ok(out)
}

/// The hook of an object's program section, as the programs table names it.
pub fn section_hook(s: &ProgramSection) -> Option<Hook> {
    let (prog_type, attach, _) = section_type(s)?;
    hook_of(prog_type, attach)
}

/// Program type, expected attach type, and whether it attaches to a cgroup.
fn section_type(s: &ProgramSection) -> Option<(u32, Option<u32>, bool)> {
    Some(match s {
        ProgramSection::CgroupSockAddr { attach_type } => {
            let a = match attach_type {
                CgroupSockAddrAttachType::Connect4 => AT_CONNECT4,
                CgroupSockAddrAttachType::GetPeerName4 => AT_GETPEERNAME4,
                other => bpf_attach_type::from(*other) as u32,
            };
            (PT_SOCK_ADDR, Some(a), true)
        }
        ProgramSection::CgroupSock { attach_type } => (
            PT_SOCK,
            Some(bpf_attach_type::from(*attach_type) as u32),
            true,
        ),
        ProgramSection::CgroupSockopt { attach_type } => {
            let a = match attach_type {
                CgroupSockoptAttachType::Get => AT_GETSOCKOPT,
                CgroupSockoptAttachType::Set => bpf_attach_type::BPF_CGROUP_SETSOCKOPT as u32,
            };
            (PT_SOCKOPT, Some(a), true)
        }
        ProgramSection::SockOps => (PT_SOCK_OPS, None, true),
        ProgramSection::SkMsg => (PT_SK_MSG, Some(AT_SK_MSG), false),
        ProgramSection::SkLookup => (PT_SK_LOOKUP, Some(AT_SK_LOOKUP), false),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Asking the kernel

/// Answers probes; the real one asks the running kernel, tests inject one.
pub trait Kernel {
    fn check(&self, need: &Need) -> Found;
}

/// The running kernel. Cgroup links are probed under `cgroup`.
pub struct Running {
    pub cgroup: PathBuf,
}

impl Kernel for Running {
    fn check(&self, need: &Need) -> Found {
        let r = match need {
            Need::Program { prog_type, attach } => {
                load(*prog_type, *attach, &[mov_r0(1), exit()]).map(|r| r.is_ok())
            }
            Need::Helper {
                prog_type,
                attach,
                helper,
            } => helper_available(*prog_type, *attach, *helper),
            Need::Map { map_type } => map_available(*map_type),
            Need::CgroupLink => cgroup_link_available(&self.cgroup),
        };
        match r {
            Ok(true) => Found::Yes,
            Ok(false) => Found::No,
            Err(e) => Found::Unknown(format!("{e:#}")),
        }
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn mov_r0(imm: i32) -> Insn {
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0
    Insn {
        code: 0xb7,
        regs: 0,
        off: 0,
        imm,
    }
}

const fn exit() -> Insn {
    Insn {
        code: 0x95,
        regs: 0,
        off: 0,
        imm: 0,
    }
}

const fn call(helper: u32) -> Insn {
    Insn {
        code: 0x85,
        regs: 0,
        off: 0,
        imm: helper as i32,
    }
}

/// The BPF_PROG_LOAD part of `union bpf_attr` up to expected_attach_type
/// (4.17); the kernel zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;

/// The shared raw bpf(2) call, as an fd-sized result.
fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i32> {
    crate::bpf::sys::sys_bpf(cmd, attr).map(|rc| rc as i32)
}

/// Loads `insns`; Ok(Ok(fd)) when the kernel took it, Ok(Err((errno, log)))
/// when it refused, Err when the refusal says nothing about the feature
/// (no privilege).
fn load(
    prog_type: u32,
    attach: Option<u32>,
    insns: &[Insn],
) -> Result<std::result::Result<OwnedFd, (i32, String)>> {
    load_named(prog_type, attach, insns, "")
}

/// A program for `hook` that lets everything pass (returns 1), loaded as
/// `name` (cut to 15 bytes): what another project's program on a hook
/// looks like to `meshlane probe` and `meshlane check --pre`, for tests.
pub fn pass_program(hook: Hook, name: &str) -> Result<OwnedFd> {
    let (prog_type, attach) = hook_ids(hook);
    load_named(prog_type, attach, &[mov_r0(1), exit()], name)?
        .map_err(|(errno, log)| anyhow::anyhow!("loading {name}: errno {errno}: {log}"))
}

fn load_named(
    prog_type: u32,
    attach: Option<u32>,
    insns: &[Insn],
    name: &str,
) -> Result<std::result::Result<OwnedFd, (i32, String)>> {
    let mut prog_name = [0u8; 16];
    let n = name.len().min(15);
    prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let mut log = vec![0u8; 8192];
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type: attach.unwrap_or(0),
        prog_name,
        ..Default::default()
    };
    match sys_bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: the kernel returned a new fd that we now own.
        Ok(fd) => Ok(Ok(unsafe { OwnedFd::from_raw_fd(fd) })),
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(0);
            // EPERM is privilege; EACCES is the verifier rejecting the
            // program, which is what the helper probes expect.
            if errno == libc::EPERM {
                bail!("bpf(BPF_PROG_LOAD) refused with {e}: meshlane needs root (CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)");
            }
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Ok(Err((
                errno,
                String::from_utf8_lossy(&log[..end]).into_owned(),
            )))
        }
    }
}

fn helper_available(prog_type: u32, attach: Option<u32>, helper: u32) -> Result<bool> {
    match load(prog_type, attach, &[call(helper), mov_r0(1), exit()])? {
        Ok(_) => Ok(true),
        Err((errno, log)) => {
            if log.is_empty() {
                // Refused before the verifier ran: the program type itself
                // is unknown (EINVAL), or the attr is too new (E2BIG).
                if errno == libc::EINVAL || errno == libc::E2BIG {
                    return Ok(false);
                }
                bail!(
                    "loading a probe for {}: {}",
                    helper_name(helper),
                    std::io::Error::from_raw_os_error(errno)
                );
            }
            let unavailable = ["unknown func ", "invalid func ", "cannot use helper "]
                .iter()
                .any(|m| log.contains(m));
            // Any other verifier complaint (our unset arguments) means the
            // verifier found the helper's prototype.
            Ok(!unavailable)
        }
    }
}

fn map_available(map_type: u32) -> Result<bool> {
    let t = bpf_map_type::try_from(map_type)
        .map_err(|_| anyhow::anyhow!("map type {map_type} unknown to this meshlane build"))?;
    let t =
        aya::maps::MapType::try_from(t).map_err(|e| anyhow::anyhow!("map type {map_type}: {e}"))?;
    aya::sys::is_map_supported(t).map_err(|e| anyhow::anyhow!("probing map type {map_type}: {e}"))
}

/// An empty child cgroup removed on drop.
struct ProbeCgroup(PathBuf);

impl Drop for ProbeCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn cgroup_link_available(cgroup: &Path) -> Result<bool> {
    let fd = match load(PT_SOCK_ADDR, Some(AT_CONNECT4), &[mov_r0(1), exit()])? {
        Ok(fd) => fd,
        Err((_, log)) => bail!("a trivial connect4 program did not load: {log}"),
    };
    let dir = cgroup.join(format!("meshlane-probe-{}", std::process::id()));
    std::fs::create_dir(&dir)
        .with_context(|| format!("creating probe cgroup {}", dir.display()))?;
    let guard = ProbeCgroup(dir);
    let cg =
        std::fs::File::open(&guard.0).with_context(|| format!("opening {}", guard.0.display()))?;
    let r = match crate::bpf::sys::link_create(
        fd.as_fd(),
        cg.as_fd(),
        bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
    ) {
        // Closing the link detaches the program.
        Ok(link) => {
            drop(link);
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(anyhow::anyhow!(
            "bpf(BPF_LINK_CREATE) on an empty cgroup: {e}"
        )),
    };
    drop(cg);
    drop(guard);
    r
}

// ---------------------------------------------------------------------------
// Verdict

/// Each feature with the kernel's answer.
pub fn evaluate(features: &[Feature], kernel: &dyn Kernel) -> Vec<(Feature, Found)> {
    features
        .iter()
        .map(|f| (f.clone(), kernel.check(&f.what)))
        .collect()
}

fn version_key(v: &str) -> Vec<u32> {
    v.split('.').filter_map(|p| p.parse().ok()).collect()
}

/// The one message refusing this kernel, if anything is missing.
pub fn refusal(results: &[(Feature, Found)], release: &str) -> Option<String> {
    let missing: Vec<&Feature> = results
        .iter()
        .filter(|(_, found)| *found == Found::No)
        .map(|(f, _)| f)
        .collect();
    if missing.is_empty() {
        return None;
    }
    let parts: Vec<String> = missing
        .iter()
        .map(|f| {
            let by = f.used_by.iter().cloned().collect::<Vec<_>>().join(", ");
            match f.min_kernel {
                Some(v) => format!("{f} (Linux {v} or newer; used by {by})"),
                None => format!("{f} (minimum kernel unknown; used by {by})"),
            }
        })
        .collect();
    let newest = missing
        .iter()
        .filter_map(|f| f.min_kernel)
        .max_by_key(|v| version_key(v));
    let need = match newest {
        Some(v) => format!("; it needs Linux {v} or newer"),
        None => String::new(),
    };
    Some(format!(
        "{REFUSAL} (Linux {release}): it lacks {}{need}. `meshlane probe` lists every feature.",
        parts.join(", ")
    ))
}

/// Called by `Agent::start` before anything is loaded: Err with the one
/// clear refusal when the kernel lacks a feature the object needs.
pub fn require(object: &[u8], cgroup: &Path) -> Result<()> {
    let features = requirements(object)?;
    let results = evaluate(
        &features,
        &Running {
            cgroup: cgroup.to_path_buf(),
        },
    );
    for (f, found) in &results {
        if let Found::Unknown(why) = found {
            tracing::warn!(feature = %f, "could not probe: {why}");
        }
    }
    if let Some(msg) = refusal(&results, &crate::host::kernel_release()) {
        bail!("{msg}");
    }
    tracing::info!(
        features = results.len(),
        "start-up probes: every feature present"
    );
    Ok(())
}

/// Where cgroup v2 is mounted and which layout that is, from /proc/mounts
/// text: unified (`/sys/fs/cgroup` is cgroup2) or hybrid (v1 controllers,
/// cgroup2 at `/sys/fs/cgroup/unified`).
fn cgroup_layout(mounts: &str) -> String {
    let mut v2 = None;
    let mut v1 = false;
    for l in mounts.lines() {
        let mut f = l.split_whitespace();
        let (Some(_), Some(dir), Some(fstype)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        match fstype {
            "cgroup2" if v2.is_none() => v2 = Some(dir.to_string()),
            "cgroup" => v1 = true,
            _ => {}
        }
    }
    match (v2, v1) {
        (Some(d), false) => format!("{d} (unified layout)"),
        (Some(d), true) => format!("{d} (hybrid layout: cgroup v1 controllers beside it)"),
        (None, _) => "NOT MOUNTED: meshlane needs cgroup v2".to_string(),
    }
}

/// How `meshlane probe` starts the line about the shortcut's backpressure,
/// an optional feature (tests read it to skip shortcut tests loudly).
pub const SHORTCUT_LINE: &str = "shortcut backpressure:";

/// `meshlane probe`: every feature with yes/no; exits non-zero with the
/// refusal when something is missing.
/// `schema` of `meshlane probe -o json|yaml`.
pub const SCHEMA: &str = "meshlane/probe/v1";

/// What `meshlane probe` found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// The running kernel's release.
    pub kernel: String,
    /// The cgroup v2 mount, in words.
    pub cgroup_v2: String,
    /// Whether bpffs is mounted at /sys/fs/bpf, in words.
    pub bpffs: String,
    pub features: Vec<FeatureReport>,
    pub shortcut: ShortcutReport,
    /// Why meshlane cannot run here; None when every feature is present.
    pub refusal: Option<String>,
    /// The cgroup the hooks were looked at (the cgroup v2 root unless
    /// --cgroup says otherwise).
    pub cgroup: String,
    /// Every program that runs on a cgroup hook meshlane uses there, with
    /// meshlane's own marked: others' run beside meshlane's.
    pub cgroup_programs: Vec<attached::Attached>,
    /// Why the hooks could not be read, if they could not.
    pub cgroup_programs_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct FeatureReport {
    pub feature: String,
    /// `yes`, `no` or `unknown` (the probe itself failed).
    pub found: &'static str,
    /// Why the probe failed, for `unknown`.
    pub unknown_because: Option<String>,
    /// First mainline kernel that has it.
    pub since: Option<&'static str>,
    /// The programs (or loader step) that need it.
    pub used_by: Vec<String>,
}

/// The same-node shortcut's needs: optional, only `--shortcut on` is
/// refused without them.
#[derive(Debug, Serialize)]
pub struct ShortcutReport {
    pub supported: bool,
    pub detail: String,
}

/// Probes the running kernel for everything `object` needs.
pub fn report(object: &[u8], cgroup: Option<&Path>) -> Result<Report> {
    let features = requirements(object)?;
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let (cgroup, cgroup_v2) = match cgroup {
        // A host's /sys/fs/cgroup mounted in a container (`meshlane check
        // --pre`'s probe pods): its layout is the host's, not /proc/mounts'.
        Some(c) => match attached::cgroup2_dir(c) {
            Ok(d) => {
                let words = format!("{} (given with --cgroup)", d.display());
                (d, words)
            }
            Err(e) => (c.to_path_buf(), format!("NOT FOUND: {e:#}")),
        },
        None => (crate::host::cgroup2_root()?, cgroup_layout(&mounts)),
    };
    let (cgroup_programs, cgroup_programs_error) = match attached::on_hooks(&cgroup) {
        Ok(a) => (a, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let results = evaluate(
        &features,
        &Running {
            cgroup: cgroup.clone(),
        },
    );
    let release = crate::host::kernel_release();
    let bpffs = if crate::bpf::layout::is_bpffs(Path::new("/sys/fs/bpf")) {
        "mounted at /sys/fs/bpf".to_string()
    } else {
        "not mounted at /sys/fs/bpf (`meshlane run` mounts it)".to_string()
    };
    let shortcut = match crate::bpf::btf::PsockOffsets::of_running_kernel() {
        Ok(o) => ShortcutReport {
            supported: true,
            detail: format!("struct sk_psock.msg_tot_len at byte {}", o.msg_tot_len),
        },
        Err(e) => ShortcutReport {
            supported: false,
            detail: format!("{e:#}"),
        },
    };
    Ok(Report {
        schema: SCHEMA,
        cgroup_v2,
        cgroup: cgroup.display().to_string(),
        cgroup_programs,
        cgroup_programs_error,
        bpffs,
        refusal: refusal(&results, &release),
        kernel: release,
        features: results
            .into_iter()
            .map(|(f, found)| {
                let (found, unknown_because) = match found {
                    Found::Yes => ("yes", None),
                    Found::No => ("no", None),
                    Found::Unknown(why) => ("unknown", Some(why)),
                };
                FeatureReport {
                    feature: f.to_string(),
                    found,
                    unknown_because,
                    since: f.min_kernel,
                    used_by: f.used_by.into_iter().collect(),
                }
            })
            .collect(),
        shortcut,
    })
}

/// The text form of the report.
pub fn print(r: &Report) {
    println!("kernel: Linux {}", r.kernel);
    println!("cgroup v2: {}", r.cgroup_v2);
    println!("bpffs: {}", r.bpffs);
    let w = r
        .features
        .iter()
        .map(|f| f.feature.len())
        .max()
        .unwrap_or(0);
    for f in &r.features {
        let answer = match (&f.unknown_because, f.found) {
            (Some(why), _) => format!("unknown ({why})"),
            (None, "no") => "NO".to_string(),
            (None, found) => found.to_string(),
        };
        println!(
            "  {:<w$}  {answer:<4} since {:<5} used by {}",
            f.feature,
            f.since.unwrap_or("?"),
            f.used_by.join(", ")
        );
    }
    if r.shortcut.supported {
        println!("{SHORTCUT_LINE} yes ({})", r.shortcut.detail);
    } else {
        println!(
            "{SHORTCUT_LINE} NO, `--shortcut on` is refused, interception works: {}",
            r.shortcut.detail
        );
    }
    println!("programs on meshlane's cgroup hooks at {}:", r.cgroup);
    if let Some(e) = &r.cgroup_programs_error {
        println!("  cannot tell: {e}");
    } else if r.cgroup_programs.is_empty() {
        println!("  none");
    }
    for a in &r.cgroup_programs {
        match &a.note {
            None => println!("  {:<20} {:<16} meshlane's (id {})", a.hook, a.name, a.id),
            Some(n) => println!("  {:<20} {:<16} id {}: {n}", a.hook, a.name, a.id),
        }
    }
    if r.refusal.is_none() {
        println!("every feature meshlane needs is present");
    }
}

/// `meshlane probe`: prints the report; fails with the refusal, if any.
pub fn run_cli(object: &[u8], cgroup: Option<&Path>, format: crate::output::Format) -> Result<()> {
    let r = report(object, cgroup)?;
    crate::output::emit(format, &r, print)?;
    if let Some(msg) = &r.refusal {
        bail!("{msg}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A kernel answering from a table; anything not in it is present.
    struct Fake(HashMap<Need, Found>);

    impl Kernel for Fake {
        fn check(&self, need: &Need) -> Found {
            self.0.get(need).cloned().unwrap_or(Found::Yes)
        }
    }

    fn object() -> Vec<u8> {
        let o = crate::bpf::object_bytes(None).expect(
            "the probe tests read the real eBPF object: run `cargo xtask build-ebpf` first",
        );
        assert!(!o.is_empty());
        o
    }

    #[test]
    fn requirements_come_from_the_object() {
        let reqs = requirements(&object()).unwrap();
        let has = |n: &Need| reqs.iter().any(|f| &f.what == n);
        assert!(has(&Need::Program {
            prog_type: PT_SOCK_ADDR,
            attach: Some(AT_CONNECT4)
        }));
        assert!(has(&Need::Program {
            prog_type: PT_SOCK_ADDR,
            attach: Some(AT_GETPEERNAME4)
        }));
        assert!(has(&Need::Helper {
            prog_type: PT_SOCK_OPS,
            attach: None,
            helper: H_NETNS_COOKIE
        }));
        assert!(has(&Need::Map {
            map_type: bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as u32
        }));
        assert!(has(&Need::CgroupLink));
        // Every requirement has a minimum kernel in the table: a new program
        // type or helper must be given one (and its commit) here.
        let unknown: Vec<String> = reqs
            .iter()
            .filter(|f| f.min_kernel.is_none())
            .map(ToString::to_string)
            .collect();
        assert!(
            unknown.is_empty(),
            "features with no minimum kernel in agent/src/probe.rs: {unknown:?}"
        );
    }

    #[test]
    fn a_kernel_lacking_one_helper_is_refused_with_one_clear_message() {
        let reqs = requirements(&object()).unwrap();
        // Linux 5.10: no bpf_get_netns_cookie() for sockops (5.15).
        let fake = Fake(HashMap::from([(
            Need::Helper {
                prog_type: PT_SOCK_OPS,
                attach: None,
                helper: H_NETNS_COOKIE,
            },
            Found::No,
        )]));
        let msg = refusal(&evaluate(&reqs, &fake), "5.10.0-33-amd64").unwrap();
        assert_eq!(
            msg,
            "meshlane cannot run on this kernel (Linux 5.10.0-33-amd64): it lacks helper \
             bpf_get_netns_cookie() in sockops programs (Linux 5.15 or newer; used by \
             track_redirected); it needs Linux 5.15 or newer. `meshlane probe` lists every feature."
        );
        assert_eq!(msg.lines().count(), 1);
    }

    #[test]
    fn several_missing_features_name_each_and_the_newest_minimum() {
        let reqs = requirements(&object()).unwrap();
        let fake = Fake(HashMap::from([
            (
                Need::Program {
                    prog_type: PT_SOCK_ADDR,
                    attach: Some(AT_GETPEERNAME4),
                },
                Found::No,
            ),
            (Need::CgroupLink, Found::No),
        ]));
        let msg = refusal(&evaluate(&reqs, &fake), "5.4.0").unwrap();
        assert!(msg.starts_with(REFUSAL), "{msg}");
        assert!(
            msg.contains(
                "program type cgroup/getpeername4 (Linux 5.8 or newer; used by restore_peername4)"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("cgroup bpf links (BPF_LINK_CREATE) (Linux 5.7 or newer"),
            "{msg}"
        );
        assert!(msg.contains("it needs Linux 5.8 or newer"), "{msg}");
    }

    #[test]
    fn a_probe_that_cannot_run_does_not_refuse() {
        let reqs = requirements(&object()).unwrap();
        let fake = Fake(HashMap::from([(
            Need::CgroupLink,
            Found::Unknown("no cgroup".into()),
        )]));
        assert_eq!(refusal(&evaluate(&reqs, &fake), "6.1.0"), None);
    }

    #[test]
    fn cgroup_v2_is_found_in_both_layouts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup_layout(hybrid),
            "/sys/fs/cgroup/unified (hybrid layout: cgroup v1 controllers beside it)"
        );
        let unified = "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(cgroup_layout(unified), "/sys/fs/cgroup (unified layout)");
        assert!(cgroup_layout("proc /proc proc rw 0 0\n").starts_with("NOT MOUNTED"));
    }

    /// The helper probe against the running kernel (tests run as root):
    /// it must tell a helper a program type may call from one it may not.
    #[test]
    fn the_helper_probe_tells_yes_from_no_on_this_kernel() {
        let k = Running {
            cgroup: PathBuf::from("/nonexistent"),
        };
        let ask = |prog_type, attach, helper| {
            k.check(&Need::Helper {
                prog_type,
                attach,
                helper,
            })
        };
        // sockops may call bpf_sk_storage_get (5.3) but never bpf_sk_assign,
        // which only tc and sk_lookup programs have.
        assert_eq!(ask(PT_SOCK_OPS, None, H_SK_STORAGE_GET), Found::Yes);
        assert_eq!(ask(PT_SOCK_OPS, None, H_SK_ASSIGN), Found::No);
        // bpf_bind exists for connect hooks only.
        assert_eq!(ask(PT_SOCK_ADDR, Some(AT_CONNECT4), H_BIND), Found::Yes);
        assert_eq!(ask(PT_SOCK_ADDR, Some(AT_GETPEERNAME4), H_BIND), Found::No);
        // A helper id no kernel has.
        assert_eq!(ask(PT_SOCK_OPS, None, 100_000), Found::No);
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_key("5.15") > version_key("5.9"));
        assert!(version_key("4.18") < version_key("5.3"));
    }
}

//! The raw bpf(2) calls aya 0.14 does not offer for every program type (a
//! cgroup or netns link for any attach type, a link's program swapped in
//! place, a program attached to a map, pinning any fd), and the one syscall
//! wrapper the agent and its start-up probes share.
use std::{
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};
use aya_obj::generated::bpf_attach_type;

// The raw bpf(2) calls aya 0.14 does not offer for every program type: a
// cgroup link for any attach type, and pinning an fd.
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
/// BPF_F_QUERY_EFFECTIVE: what runs for the cgroup, inherited included.
const QUERY_EFFECTIVE: u32 = 1;

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Swaps the program of a link in one step (no window without a program).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_LINK_UPDATE, &mut attr).context("bpf(BPF_LINK_UPDATE)")?;
    Ok(())
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value` for lookup and update, `next_key` for GET_NEXT_KEY.
    value: u64,
    flags: u64,
}

impl MapElemAttr {
    fn elem(map: BorrowedFd<'_>, key: &[u8], value: u64) -> Self {
        Self {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value,
            flags: 0,
        }
    }
}

/// The key after `key` in `map` (the first with None), into `next`; false
/// at the end of the map.
pub fn next_key(map: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> bool {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value: next.as_mut_ptr() as u64,
        flags: 0,
    };
    sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr).is_ok()
}

/// Copies every entry of `from` into `to`, two maps of one kind with keys
/// of `key_size` bytes and values of `value_size` bytes as user space sees
/// them (all CPUs' for a per-CPU map). Returns how many were copied.
pub fn copy_entries(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> Result<usize> {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_size];
    let mut first = true;
    let mut n = 0;
    while next_key(from, (!first).then_some(key.as_slice()), &mut next) {
        first = false;
        std::mem::swap(&mut key, &mut next);
        let mut get = MapElemAttr::elem(from, &key, value.as_mut_ptr() as u64);
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut get) {
            Ok(_) => {}
            // Deleted since its key was listed.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e).context("bpf(BPF_MAP_LOOKUP_ELEM)"),
        }
        let mut put = MapElemAttr::elem(to, &key, value.as_ptr() as u64);
        sys_bpf(BPF_MAP_UPDATE_ELEM, &mut put)
            .with_context(|| format!("bpf(BPF_MAP_UPDATE_ELEM) after {n} entries"))?;
        n += 1;
    }
    Ok(n)
}

/// The start of `struct bpf_link_info`: enough for the program's id.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    _rest: [u64; 8],
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// The program a link runs now, as an fd (to put it back with
/// [`link_update`]).
pub fn link_program(link: BorrowedFd<'_>) -> Result<OwnedFd> {
    // The info of another kind of object would be read as a link's.
    let kind = std::fs::read_link(format!("/proc/self/fd/{}", link.as_raw_fd()))
        .context("reading the kind of a pinned object")?;
    if kind.as_os_str() != "anon_inode:bpf-link" {
        anyhow::bail!("not a bpf link but {}", kind.display());
    }
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("bpf(BPF_OBJ_GET_INFO_BY_FD) of a link")?;
    let mut get = GetFdByIdAttr {
        id: info.prog_id,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut get)
        .with_context(|| format!("bpf(BPF_PROG_GET_FD_BY_ID {})", info.prog_id))?;
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// The ids of the programs that run on `attach` for processes in the
/// cgroup `cgroup` (attached to it or inherited from its ancestors).
pub fn prog_query(cgroup: BorrowedFd<'_>, attach: bpf_attach_type) -> std::io::Result<Vec<u32>> {
    // A cgroup runs at most 64 programs per hook (BPF_CGROUP_MAX_PROGS).
    let mut ids = vec![0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: attach as u32,
        query_flags: QUERY_EFFECTIVE,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// The start of `struct bpf_prog_info`, up to the name.
#[repr(C)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
}

/// The name a program was loaded with (at most 15 bytes: the kernel cuts
/// longer ones), by program id.
pub fn prog_name(id: u32) -> std::io::Result<String> {
    let mut get = GetFdByIdAttr {
        id,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut get)?;
    // SAFETY: the kernel returned a new fd we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: plain integers and byte arrays: all zeroes is a valid value.
    let mut info: ProgInfo = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<ProgInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let end = info.name.iter().position(|&b| b == 0).unwrap_or(16);
    Ok(String::from_utf8_lossy(&info.name[..end]).into_owned())
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

pub fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
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

pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach: bpf_attach_type,
) -> std::io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type: attach as u32,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches a program to a map (sk_msg to a sockhash). The attachment lives
/// as long as the map, not the program fd: aya would detach it when its
/// program handle drops.
pub fn prog_attach(
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
pub fn open_pinned_fd(path: &Path) -> Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr).context("bpf(BPF_OBJ_GET)")?;
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_OBJ_PIN, &mut attr).context("bpf(BPF_OBJ_PIN)")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// A hash map of u32 to u64 with `entries` entries, or None where this
    /// process may not create maps.
    fn hash(entries: u32) -> Option<OwnedFd> {
        #[repr(C)]
        #[derive(Default)]
        struct MapCreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let mut attr = MapCreateAttr {
            map_type: 1,
            key_size: 4,
            value_size: 8,
            max_entries: entries,
            ..Default::default()
        };
        match sys_bpf(0, &mut attr) {
            // SAFETY: the kernel returned a new fd we now own.
            Ok(fd) => Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
            Err(e) => {
                eprintln!("SKIPPED: cannot create a bpf map here: {e}");
                None
            }
        }
    }

    fn put(map: &OwnedFd, k: u32, v: u64) {
        let key = k.to_ne_bytes();
        let val = v.to_ne_bytes();
        let mut attr = MapElemAttr::elem(map.as_fd(), &key, val.as_ptr() as u64);
        sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).expect("update");
    }

    #[test]
    fn copies_every_entry_into_a_map_of_another_capacity() {
        let (Some(old), Some(new), Some(small)) = (hash(64), hash(128), hash(2)) else {
            return;
        };
        for k in 0..40 {
            put(&old, k, u64::from(k) * 1000);
        }
        assert_eq!(copy_entries(old.as_fd(), new.as_fd(), 4, 8).unwrap(), 40);
        let mut value = [0u8; 8];
        for k in 0u32..40 {
            let key = k.to_ne_bytes();
            let mut get = MapElemAttr::elem(new.as_fd(), &key, value.as_mut_ptr() as u64);
            sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut get).expect("copied");
            assert_eq!(u64::from_ne_bytes(value), u64::from(k) * 1000);
        }
        // Too small: the error says how far it got.
        let e = copy_entries(old.as_fd(), small.as_fd(), 4, 8).unwrap_err();
        assert!(format!("{e:#}").contains("after 2 entries"), "{e:#}");
    }
}

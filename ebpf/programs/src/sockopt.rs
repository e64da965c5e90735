//! getsockopt(SOL_IP, SO_ORIGINAL_DST) and getsockopt(SOL_IPV6,
//! IP6T_SO_ORIGINAL_DST) on the proxy's side of a redirected
//! connection answers the original destination, as conntrack would.
//!
//! Every other getsockopt on the machine must come back exactly as the kernel
//! produced it. The hook runs after the kernel and, unless told otherwise,
//! copies its own page-sized view of the buffer back: on an error that
//! overwrites the caller's buffer with zeros, and on older kernels a result
//! longer than a page becomes EFAULT. Setting optlen to 0 tells the kernel
//! to leave the caller's buffer, length and error as they are.
use aya_ebpf::{
    bindings::bpf_sockopt, helpers::generated::bpf_get_netns_cookie, macros::cgroup_sockopt,
    programs::SockoptContext,
};
use meshlane_common::{pod_stat, role, stat, V6};

use crate::{
    ctx::{AF_INET, AF_INET6},
    maps::{count, orig_dst6_of, orig_dst_of, pod_count},
};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST share the number.
const SO_ORIGINAL_DST: i32 = 80;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

#[cgroup_sockopt(getsockopt)]
pub fn original_dst(ctx: SockoptContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's duration.
    let so: &mut bpf_sockopt = unsafe { &mut *ctx.sockopt };
    let asked = so.optname == SO_ORIGINAL_DST && (so.level == SOL_IP || so.level == SOL_IPV6);
    if asked {
        let answered = if so.level == SOL_IP {
            unsafe { answer4(so) }
        } else {
            unsafe { answer6(so) }
        };
        if answered {
            count(stat::ORIG_DST_ANSWERED);
            pod_count(
                unsafe { bpf_get_netns_cookie(ctx.sockopt.cast()) },
                pod_stat::ORIG_DST_ANSWERED,
            );
            return 1;
        }
        count(stat::ORIG_DST_MISS);
    }
    let buf_len = unsafe {
        (so.__bindgen_anon_3.optval_end as usize) - (so.__bindgen_anon_2.optval as usize)
    };
    if so.retval != 0 || so.optlen < 0 || so.optlen as usize > buf_len {
        unsafe { core::ptr::write_volatile(&raw mut so.optlen, 0) };
    }
    1
}

/// The caller's buffer when it holds `len` bytes, else None (the kernel's
/// own answer stays).
#[inline(always)]
unsafe fn buffer(so: &bpf_sockopt, len: usize) -> Option<*mut u8> {
    let optval = unsafe { so.__bindgen_anon_2.optval } as *mut u8;
    let end = unsafe { so.__bindgen_anon_3.optval_end } as *mut u8;
    if unsafe { optval.add(len) } > end {
        None
    } else {
        Some(optval)
    }
}

/// Context fields must be written one 4-byte store each: the verifier
/// rejects the 8-byte store the compiler would merge these into.
#[inline(always)]
unsafe fn answered(so: &mut bpf_sockopt, len: usize) -> bool {
    unsafe {
        core::ptr::write_volatile(&raw mut so.optlen, len as i32);
        core::ptr::write_volatile(&raw mut so.retval, 0);
    }
    true
}

/// Writes `bytes` at `p`, byte by byte (the buffer is packet-like memory).
#[inline(always)]
unsafe fn put(p: *mut u8, at: usize, bytes: &[u8]) {
    let mut i = 0;
    while i < bytes.len() {
        unsafe { *p.add(at + i) = bytes[i] };
        i += 1;
    }
}

/// SOL_IP: the IPv4 original destination as a sockaddr_in.
#[inline(always)]
unsafe fn answer4(so: &mut bpf_sockopt) -> bool {
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    let Some(orig) = orig_dst_of(sk.cast()).filter(|o| o.role == role::PROXY_ACCEPTED) else {
        return false;
    };
    let Some(p) = (unsafe { buffer(so, SOCKADDR_IN_LEN) }) else {
        return false;
    };
    unsafe {
        put(p, 0, &(AF_INET as u16).to_ne_bytes());
        put(p, 2, &orig.port_be.to_ne_bytes());
        put(p, 4, &orig.addr_be.to_ne_bytes());
        put(p, 8, &[0; 8]);
        answered(so, SOCKADDR_IN_LEN)
    }
}

/// SOL_IPV6: the original destination as a sockaddr_in6; an IPv4 one (a
/// connection accepted on a dual-stack listener) IPv4-mapped.
#[inline(always)]
unsafe fn answer6(so: &mut bpf_sockopt) -> bool {
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    let (addr, port_be) = match orig_dst6_of(sk.cast()) {
        Some(o) if o.role == role::PROXY_ACCEPTED => (o.addr, o.port_be),
        _ => match orig_dst_of(sk.cast()) {
            Some(o) if o.role == role::PROXY_ACCEPTED => {
                (V6::mapped(u32::from_be(o.addr_be)), o.port_be)
            }
            _ => return false,
        },
    };
    let Some(p) = (unsafe { buffer(so, SOCKADDR_IN6_LEN) }) else {
        return false;
    };
    unsafe {
        put(p, 0, &(AF_INET6 as u16).to_ne_bytes());
        put(p, 2, &port_be.to_ne_bytes());
        put(p, 4, &[0; 4]);
        put(p, 8, &addr.octets());
        put(p, 24, &[0; 4]);
        answered(so, SOCKADDR_IN6_LEN)
    }
}

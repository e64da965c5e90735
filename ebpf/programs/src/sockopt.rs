//! getsockopt(SOL_IP, SO_ORIGINAL_DST) on the proxy's side of a redirected
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
use meshlane_common::{pod_stat, role, stat};

use crate::{
    ctx::AF_INET,
    maps::{count, orig_dst_of, pod_count},
};

const SOL_IP: i32 = 0;
const SO_ORIGINAL_DST: i32 = 80;
const SOCKADDR_IN_LEN: i32 = 16;

#[cgroup_sockopt(getsockopt)]
pub fn original_dst(ctx: SockoptContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's duration.
    let so: &mut bpf_sockopt = unsafe { &mut *ctx.sockopt };
    if so.level == SOL_IP && so.optname == SO_ORIGINAL_DST && unsafe { answer(so) } {
        count(stat::ORIG_DST_ANSWERED);
        pod_count(
            unsafe { bpf_get_netns_cookie(ctx.sockopt.cast()) },
            pod_stat::ORIG_DST_ANSWERED,
        );
        return 1;
    }
    if so.level == SOL_IP && so.optname == SO_ORIGINAL_DST {
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

/// Writes the original destination into the caller's sockaddr_in.
#[inline(always)]
unsafe fn answer(so: &mut bpf_sockopt) -> bool {
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    let Some(orig) = orig_dst_of(sk.cast()) else {
        return false;
    };
    if orig.role != role::PROXY_ACCEPTED {
        return false;
    }
    let optval = unsafe { so.__bindgen_anon_2.optval } as *mut u8;
    let end = unsafe { so.__bindgen_anon_3.optval_end } as *mut u8;
    if unsafe { optval.add(SOCKADDR_IN_LEN as usize) } > end {
        // The caller's buffer is too small for a sockaddr_in: leave the
        // kernel's own answer.
        return false;
    }
    unsafe {
        let p = optval;
        let fam = (AF_INET as u16).to_ne_bytes();
        let port = orig.port_be.to_ne_bytes();
        let addr = orig.addr_be.to_ne_bytes();
        *p = fam[0];
        *p.add(1) = fam[1];
        *p.add(2) = port[0];
        *p.add(3) = port[1];
        *p.add(4) = addr[0];
        *p.add(5) = addr[1];
        *p.add(6) = addr[2];
        *p.add(7) = addr[3];
        let mut i = 8;
        while i < 16 {
            *p.add(i) = 0;
            i += 1;
        }
    }
    // Context fields must be written one 4-byte store each: the verifier
    // rejects the 8-byte store the compiler would merge these into.
    unsafe {
        core::ptr::write_volatile(&raw mut so.optlen, SOCKADDR_IN_LEN);
        core::ptr::write_volatile(&raw mut so.retval, 0);
    }
    true
}

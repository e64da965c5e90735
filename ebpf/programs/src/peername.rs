//! getpeername() on the app's redirected socket reports the address the app
//! dialled, as it does behind iptables' NAT.
use aya_ebpf::{
    helpers::generated::bpf_sk_storage_get, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use meshlane_common::{role, OrigDst};

use crate::maps::orig_dst_map;

#[cgroup_sock_addr(getpeername4)]
pub fn restore_peername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return 1;
    }
    let st = unsafe { bpf_sk_storage_get(orig_dst_map(), sk.cast(), core::ptr::null_mut(), 0) }
        as *const OrigDst;
    if st.is_null() {
        return 1;
    }
    let orig = unsafe { *st };
    if orig.role == role::REDIRECTED_CLIENT {
        unsafe {
            core::ptr::write_volatile(&raw mut sa.user_ip4, orig.addr_be);
            core::ptr::write_volatile(&raw mut sa.user_port, u32::from(orig.port_be));
        }
    }
    1
}

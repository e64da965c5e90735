//! getpeername() on the app's redirected socket reports the address the app
//! dialled, as it does behind iptables' NAT.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use meshlane_common::role;

use crate::{ctx::set_field, maps::orig_dst_of};

#[cgroup_sock_addr(getpeername4)]
pub fn restore_peername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's duration.
    let sa = ctx.sock_addr;
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    if sk.is_null() {
        return 1;
    }
    match orig_dst_of(sk.cast()) {
        Some(orig) if orig.role == role::REDIRECTED_CLIENT => {
            set_field!(sa, user_ip4, orig.addr_be);
            set_field!(sa, user_port, u32::from(orig.port_be));
        }
        _ => {}
    }
    1
}

//! The app's redirected socket keeps seeing the address it dialled, as it
//! does behind iptables' NAT: getpeername() of a redirected TCP or connected
//! UDP socket, and the source of a DNS reply (recvmsg) that came from the
//! DNS proxy.
use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::generated::bpf_get_netns_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext, EbpfContext,
};
use meshlane_common::{ip, role, OrigDst, V6};

use crate::{
    ctx::{field, set_field, set_v6_field, v6_field},
    maps::{orig_dst6_of, orig_dst_of, PODS},
};

#[cgroup_sock_addr(getpeername4)]
pub fn restore_peername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if let Some(orig) = client_orig(sa) {
        set_field!(sa, user_ip4, orig.addr_be);
        set_field!(sa, user_port, u32::from(orig.port_be));
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn restore_peername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    restore6(sa);
    1
}

#[cgroup_sock_addr(recvmsg4)]
pub fn restore_recvmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let from = u32::from_be(field!(sa, user_ip4));
    if from == ip::LOCALHOST && from_dns_proxy(&ctx) {
        if let Some(orig) = client_orig(sa) {
            set_field!(sa, user_ip4, orig.addr_be);
            set_field!(sa, user_port, u32::from(orig.port_be));
        }
    }
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn restore_recvmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let from = v6_field!(sa, user_ip6);
    if (from.same(V6::LOCALHOST) || from.same(V6::mapped(ip::LOCALHOST))) && from_dns_proxy(&ctx) {
        restore6(sa);
    }
    1
}

/// True when the datagram's source port is the pod's DNS proxy port.
#[inline(always)]
fn from_dns_proxy(ctx: &SockAddrContext) -> bool {
    let port = u16::from_be(field!(ctx.sock_addr, user_port) as u16);
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    unsafe { PODS.get(netns_cookie) }.is_some_and(|cfg| cfg.dns_proxy_port == port)
}

/// The original destination of the app's redirected socket.
#[inline(always)]
fn client_orig(sa: *mut bpf_sock_addr) -> Option<OrigDst> {
    let sk = field!(sa, __bindgen_anon_1.sk);
    if sk.is_null() {
        return None;
    }
    orig_dst_of(sk.cast()).filter(|o| o.role == role::REDIRECTED_CLIENT)
}

/// An AF_INET6 socket's peer back to its original: native IPv6, or the
/// IPv4 original of a mapped destination, mapped again.
#[inline(always)]
fn restore6(sa: *mut bpf_sock_addr) {
    let sk = field!(sa, __bindgen_anon_1.sk);
    if sk.is_null() {
        return;
    }
    let (addr, port_be) = match orig_dst6_of(sk.cast()) {
        Some(o) if o.role == role::REDIRECTED_CLIENT => (o.addr, o.port_be),
        _ => match orig_dst_of(sk.cast()) {
            Some(o) if o.role == role::REDIRECTED_CLIENT => {
                (V6::mapped(u32::from_be(o.addr_be)), o.port_be)
            }
            _ => return,
        },
    };
    set_v6_field!(sa, user_ip6, addr);
    set_field!(sa, user_port, u32::from(port_be));
}

//! bind(): who owns a socket bound to a capture port. The uid is recorded
//! on the socket (`LISTEN_OWNER`) in the binding task's context, the one
//! place its credentials are known; sockops registers a listener under its
//! owner at listen(), and capture only ever asks for the pod's proxy uid.
//! An app's listener on a capture port is thus never used, and neither
//! replaces nor removes the proxy's.
use aya_ebpf::{
    bindings::bpf_sock, helpers::generated::bpf_get_current_uid_gid, macros::cgroup_sock,
    programs::SockContext,
};
use meshlane_common::{ports, setting};

use crate::{
    ctx::field,
    maps::{listen_owner_slot, setting_value, PODS},
};
use aya_ebpf::helpers::generated::bpf_get_netns_cookie;

const SOCK_STREAM: u32 = 1;

#[cgroup_sock(post_bind4)]
pub fn record_bind4(ctx: SockContext) -> i32 {
    record(&ctx);
    // Never refuse a bind.
    1
}

#[cgroup_sock(post_bind6)]
pub fn record_bind6(ctx: SockContext) -> i32 {
    record(&ctx);
    1
}

#[inline(always)]
fn record(ctx: &SockContext) {
    let sk: *mut bpf_sock = ctx.sock;
    if field!(sk, type_) != SOCK_STREAM {
        return;
    }
    let port = field!(sk, src_port) as u16;
    // SAFETY: the context is the socket.
    let netns_cookie = unsafe { bpf_get_netns_cookie(sk.cast()) };
    if !is_capture_port(netns_cookie, port) {
        return;
    }
    let uid = unsafe { bpf_get_current_uid_gid() } as u32;
    let slot = listen_owner_slot(sk.cast());
    if !slot.is_null() {
        // SAFETY: this socket's own storage, written once at bind.
        unsafe { *slot = uid.wrapping_add(1) };
    }
}

/// True when `port` is a capture port in namespace `netns_cookie`: the
/// pod's, or the node's for a namespace not in PODS yet (a proxy often
/// binds before the agent knows its pod).
#[inline(always)]
pub fn is_capture_port(netns_cookie: u64, port: u16) -> bool {
    // SAFETY: read at once, never held.
    match unsafe { PODS.get(netns_cookie) } {
        Some(cfg) => port == cfg.inbound_capture_port || port == cfg.outbound_capture_port,
        None => {
            port == node_port(setting::INBOUND_CAPTURE_PORT, ports::INBOUND_CAPTURE)
                || port == node_port(setting::OUTBOUND_CAPTURE_PORT, ports::OUTBOUND_CAPTURE)
        }
    }
}

/// The proxy uid of namespace `netns_cookie`: its pod's, or the node's for
/// a namespace not in PODS yet.
#[inline(always)]
pub fn proxy_uid_of(netns_cookie: u64) -> u32 {
    // SAFETY: read at once, never held.
    match unsafe { PODS.get(netns_cookie) } {
        Some(cfg) => cfg.proxy_uid,
        None => match setting_value(setting::PROXY_UID) {
            0 => ports::PROXY_UID,
            v => v.wrapping_sub(1),
        },
    }
}

/// The node's capture port at `index` of SETTINGS, or Istio's.
#[inline(always)]
fn node_port(index: u32, istio: u16) -> u16 {
    match setting_value(index) {
        0 => istio,
        p => p as u16,
    }
}

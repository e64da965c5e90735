//! The same-node shortcut: a send on one end of a leg of the mesh path whose
//! two sockets are on this node goes straight into the receive queue of the
//! other end (bpf_msg_redirect_hash), skipping the loopback or veth and the
//! TCP stack.
//!
//! Which legs: sidecar to sidecar always (when the shortcut is on); the
//! app's own legs (app -> its sidecar, sidecar -> app from 127.0.0.6) only in
//! pods with `meshlane.io/shortcut-app: "true"`. A socket in a sockmap reads
//! through tcp_bpf_recvmsg, which on the kernels we test (6.18) returns
//! EAGAIN to a *blocking* read that is woken without data, e.g. by another
//! thread writing on the same socket or by ACKs freeing send space. Proxies
//! and event-loop apps (non-blocking sockets: Go, Netty, Node, Envoy) retry;
//! an app that reads with blocking calls would see errors. Found by the
//! shortcut tests (tests/tests/shortcut.rs): their blocking echo client
//! failed with EAGAIN when app sockets joined unconditionally.
//!
//! Backpressure: a redirected message is queued on the receiving socket
//! without regard to its receive buffer (bpf_tcp_ingress charges memory but
//! checks no per-socket limit), so a reader that stops would let its sender
//! queue without bound. Before each redirect the program reads how many
//! bytes the peer has queued and unread (`msg_tot_len` of its psock, reached
//! from the socket address sockops keeps in `SOCK_ADDRS`, through BTF
//! offsets the agent writes into `SETTINGS`); past the limit the
//! sender moves to TCP for the rest of its life, and TCP's window pushes
//! back from then on. A kernel without that field gets no redirects at all.
//!
//! Correctness rule: one direction of a byte stream never mixes the TCP
//! path and the redirect, or bytes could overtake each other. A socket's
//! first send decides (the peer is in `SOCKS`: redirect; it is not: TCP) and
//! the decision is latched in the socket's storage for its whole life. The
//! accepting side always finds its peer (the connecting side joined at
//! ACTIVE_ESTABLISHED, before the accepting side exists), so only the
//! connecting side can meet a missing peer, and then only at its first send.
//! Moving from REDIRECT to TCP mid-stream is the one safe change: every
//! redirected byte is on the peer's ingress list before the first TCP byte
//! is sent, and the reader (tcp_bpf_recvmsg) drains that list before it
//! reads its TCP receive queue. The opposite move is never made.
use aya_ebpf::{
    bindings::{sk_action, sk_msg_md, BPF_F_INGRESS},
    helpers::generated::{bpf_get_netns_cookie, bpf_probe_read_kernel},
    macros::sk_msg,
    programs::SkMsgContext,
};
use meshlane_common::{setting, shortcut_state, stat, ConnKey};

use crate::{
    ctx::{field, AF_INET},
    maps::{count, setting_value, shortcut_state_slot, SOCKS, SOCK_ADDRS},
};

#[sk_msg]
pub fn shortcut_send(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's duration.
    unsafe { send(&ctx) };
    // Never drop: without a redirect the message takes the TCP path.
    sk_action::SK_PASS
}

#[inline(always)]
unsafe fn send(ctx: &SkMsgContext) {
    let md: *const sk_msg_md = ctx.msg;
    if field!(md, family) != AF_INET {
        return;
    }
    let sk = field!(md, __bindgen_anon_3.sk);
    if sk.is_null() {
        return;
    }
    let state = shortcut_state_slot(sk.cast());
    if state.is_null() {
        return;
    }
    let decided = unsafe { *state };
    if decided == shortcut_state::TCP {
        return;
    }
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.msg.cast()) };
    let peer = ConnKey::new(
        netns_cookie,
        field!(md, local_ip4),
        field!(md, local_port) as u16,
        field!(md, remote_ip4),
        u32::from_be(field!(md, remote_port)) as u16,
    )
    .peer();
    match unsafe { peer_queued(&peer) } {
        // Peer gone: the TCP path decides, as below.
        Queued::NoPeer => {}
        Queued::Bytes(q) if q < setting_value(setting::SHORTCUT_MAX_QUEUED) => {}
        Queued::Bytes(_) | Queued::Unknown => {
            unsafe { *state = shortcut_state::TCP };
            count(stat::SHORTCUT_FELL_BACK);
            return;
        }
    }
    let verdict = SOCKS.redirect_msg(ctx, peer, BPF_F_INGRESS.into());
    if verdict == i64::from(sk_action::SK_PASS) {
        if decided == shortcut_state::UNDECIDED {
            unsafe { *state = shortcut_state::REDIRECT };
        }
        count(stat::SHORTCUT_REDIRECTED);
    } else if decided == shortcut_state::UNDECIDED {
        // No peer at the first send: TCP for this socket's whole life.
        unsafe { *state = shortcut_state::TCP };
        count(stat::SHORTCUT_NO_PEER);
    }
    // Latched REDIRECT but the peer is gone: it closed, so the stream is
    // over; the TCP path reports that to the sender as it would without us.
}

enum Queued {
    NoPeer,
    Unknown,
    Bytes(u32),
}

/// Bytes the peer socket has queued on its ingress list and not read yet.
/// A wrong reading can only move the sender to TCP early, never lose or
/// reorder a byte.
#[inline(always)]
unsafe fn peer_queued(peer: &ConnKey) -> Queued {
    // sk_msg programs may not look sockets up in a sockhash (that takes a
    // reference they cannot release), so sockops recorded the address.
    let Some(addr) = (unsafe { SOCK_ADDRS.get(peer) }) else {
        return Queued::NoPeer;
    };
    let addr = *addr;
    let off_user_data = u64::from(setting_value(setting::OFFSET_SK_USER_DATA));
    let off_queued = u64::from(setting_value(setting::OFFSET_PSOCK_QUEUED));
    if off_user_data == 0 || off_queued == 0 {
        return Queued::Unknown;
    }
    let mut user_data: u64 = 0;
    // SAFETY: bpf_probe_read_kernel fails cleanly on a bad address.
    if unsafe {
        bpf_probe_read_kernel(
            (&raw mut user_data).cast(),
            8,
            (addr + off_user_data) as *const _,
        )
    } != 0
    {
        return Queued::Unknown;
    }
    // The low bits of sk_user_data are flags (SK_USER_DATA_PTRMASK).
    let psock = user_data & !7;
    let mut bytes: u32 = 0;
    if psock == 0
        || unsafe {
            bpf_probe_read_kernel((&raw mut bytes).cast(), 4, (psock + off_queued) as *const _)
        } != 0
    {
        return Queued::Unknown;
    }
    Queued::Bytes(bytes)
}

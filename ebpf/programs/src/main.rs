//! meshlane's kernel programs. One file per hook:
//! - `bind.rs`: cgroup/post_bind4 and post_bind6, who bound a capture port;
//! - `connect.rs`: cgroup/connect4, connect6, sendmsg4, sendmsg6: where a
//!   connect() or a DNS datagram is sent to the sidecar;
//! - `sockops.rs`: carries the original destination from the app's socket to
//!   the proxy's accepted socket, and forgets it when sockets close;
//! - `sockopt.rs`: cgroup/getsockopt, answers SO_ORIGINAL_DST (IPv4, IPv6);
//! - `peername.rs`: cgroup/getpeername4/6 and recvmsg4/6, the app sees the
//!   address it dialled (and DNS replies from the server it asked);
//! - `inbound.rs`: sk_lookup per pod namespace, inbound capture to 15006;
//! - `shortcut.rs`: sk_msg on the shortcut sockhash, same-node sends go
//!   straight into the peer socket.
#![no_std]
#![no_main]

mod bind;
mod connect;
mod ctx;
mod inbound;
mod maps;
mod peername;
mod shortcut;
mod sockops;
mod sockopt;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this only
    // satisfies the compiler.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

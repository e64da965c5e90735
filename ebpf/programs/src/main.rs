//! meshlane's kernel programs. One file per hook:
//! - `connect.rs`: cgroup/connect4, where a connect() is sent to the sidecar;
//! - `sockops.rs`: carries the original destination from the app's socket to
//!   the proxy's accepted socket, and forgets it when sockets close;
//! - `sockopt.rs`: cgroup/getsockopt, answers SO_ORIGINAL_DST;
//! - `peername.rs`: cgroup/getpeername4, the app sees the address it dialled;
//! - `inbound.rs`: sk_lookup per pod namespace, inbound capture to 15006;
//! - `shortcut.rs`: sk_msg on the shortcut sockhash, same-node sends go
//!   straight into the peer socket.
#![no_std]
#![no_main]

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

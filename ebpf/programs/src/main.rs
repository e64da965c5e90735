//! meshlane's kernel programs. One file per hook:
//! - `connect.rs`: cgroup/connect4, where a connect() is sent to the sidecar;
//! - `sockops.rs`: carries the original destination from the app's socket to
//!   the proxy's accepted socket, and forgets it when sockets close;
//! - `sockopt.rs`: cgroup/getsockopt, answers SO_ORIGINAL_DST;
//! - `peername.rs`: cgroup/getpeername4, the app sees the address it dialled.
#![no_std]
#![no_main]

mod connect;
mod maps;
mod peername;
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

//! Small raw-socket helpers shared by the `mtest` binary and the tests.
//!
//! They are raw libc because std and tokio expose neither SO_ORIGINAL_DST nor
//! arbitrary getsockopt calls, and the point of `mtest sockopts` is to see exactly
//! what the kernel (and any cgroup getsockopt program) returns.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;

/// netfilter's `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h), read at level SOL_IP.
pub const SO_ORIGINAL_DST: libc::c_int = 80;
/// `IPT_SO_GET_INFO` (linux/netfilter_ipv4/ip_tables.h), level SOL_IP.
pub const IPT_SO_GET_INFO: libc::c_int = 64;
/// `IPT_SO_GET_ENTRIES`, level SOL_IP.
pub const IPT_SO_GET_ENTRIES: libc::c_int = 65;
/// sizeof(struct ipt_getinfo): name[32], valid_hooks, hook_entry[5], underflow[5],
/// num_entries, size — all u32 after the name, so no padding.
pub const IPT_GETINFO_LEN: usize = 32 + 4 + 5 * 4 + 5 * 4 + 4 + 4;
/// sizeof(struct ipt_get_entries) without entries: name[32] + u32 size, rounded up to
/// 8 because the flexible `struct ipt_entry entrytable[]` holds u64 counters.
pub const IPT_GET_ENTRIES_HDR_LEN: usize = 40;

/// Result of one raw getsockopt call, everything the kernel reported.
#[derive(Debug, Clone)]
pub struct RawSockopt {
    pub rc: i32,
    /// errno when rc != 0, else 0.
    pub errno: i32,
    /// optlen as the kernel wrote it back (or left it, on failure).
    pub optlen: u32,
    /// The buffer, truncated to min(buflen, optlen); empty when rc != 0.
    pub data: Vec<u8>,
}

/// Calls getsockopt with a buffer of `buflen` bytes initialised from `init`
/// (zero-filled past its end). `buflen == 0` passes a NULL optval, which is a
/// legal call the kernel answers with its own optlen rules.
pub fn raw_getsockopt(
    fd: RawFd,
    level: libc::c_int,
    optname: libc::c_int,
    buflen: usize,
    init: &[u8],
) -> RawSockopt {
    // A recognisable fill: whatever the caller's buffer holds after the call is
    // reported, so a hook that scribbles on it (even on failure) shows up.
    let mut buf = vec![0xa5u8; buflen];
    let n = init.len().min(buflen);
    buf[..n].copy_from_slice(&init[..n]);
    let mut optlen = buflen as libc::socklen_t;
    let ptr = if buflen == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast::<libc::c_void>()
    };
    // SAFETY: ptr is NULL or points at `buflen` writable bytes, and optlen says so.
    let rc = unsafe { libc::getsockopt(fd, level, optname, ptr, &mut optlen) };
    let errno = if rc == 0 {
        0
    } else {
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    };
    buf.truncate((optlen as usize).min(buflen));
    RawSockopt {
        rc,
        errno,
        optlen,
        data: buf,
    }
}

/// Reads netfilter's SO_ORIGINAL_DST of an accepted IPv4 socket: the address the
/// client connected to before a NAT REDIRECT (or an eBPF rewrite emulating it).
pub fn original_dst(fd: RawFd) -> io::Result<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the buffer is a sockaddr_in of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut sin as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if sin.sin_family != libc::AF_INET as libc::sa_family_t {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_ORIGINAL_DST returned address family {}", sin.sin_family),
        ));
    }
    Ok(sockaddr_in_to_v4(&sin))
}

/// Converts a kernel sockaddr_in (network byte order fields) to a std address.
pub fn sockaddr_in_to_v4(sin: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    )
}

/// Formats an address the way every JSON record here does: "ip:port" (IPv4 mapped
/// IPv6 addresses are shown as IPv4 so records compare as plain strings).
pub fn fmt_addr(addr: &SocketAddr) -> String {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddrV4::new(v4, v6.port()).to_string(),
            None => addr.to_string(),
        },
        SocketAddr::V4(_) => addr.to_string(),
    }
}

/// Symbolic errno name ("ECONNREFUSED") for reports; "E<number>" when unknown.
pub fn errno_name(errno: i32) -> String {
    let name = format!("{:?}", nix::errno::Errno::from_raw(errno));
    if name == "UnknownErrno" {
        format!("E{errno}")
    } else {
        name
    }
}

/// Lowercase hex of a byte slice.
pub fn hex(data: &[u8]) -> String {
    use std::fmt::Write;
    data.iter()
        .fold(String::with_capacity(data.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_conversion_uses_network_order() {
        // SAFETY: plain old data.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = 9080u16.to_be();
        sin.sin_addr.s_addr = u32::from(Ipv4Addr::new(10, 200, 3, 3)).to_be();
        assert_eq!(sockaddr_in_to_v4(&sin).to_string(), "10.200.3.3:9080");
    }

    #[test]
    fn mapped_v6_prints_as_v4() {
        let a: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(fmt_addr(&a), "10.1.2.3:80");
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::ECONNREFUSED), "ECONNREFUSED");
        assert_eq!(errno_name(libc::ENOENT), "ENOENT");
    }

    #[test]
    fn original_dst_of_plain_socket_fails() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(original_dst(c.as_raw_fd()).is_err());
    }
}

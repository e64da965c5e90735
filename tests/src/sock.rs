//! Small raw-socket helpers shared by the `mtest` binary and the tests.
//!
//! They are raw libc because std and tokio expose neither SO_ORIGINAL_DST nor
//! arbitrary getsockopt calls, and the point of `mtest sockopts` is to see exactly
//! what the kernel (and any cgroup getsockopt program) returns.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// netfilter's `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h), read at level SOL_IP.
pub const SO_ORIGINAL_DST: libc::c_int = 80;
/// netfilter's `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv6/ip6_tables.h),
/// read at level SOL_IPV6; answers a `sockaddr_in6`.
pub const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;
/// `IPV6_TRANSPARENT` (linux/in6.h), level SOL_IPV6.
pub const IPV6_TRANSPARENT: libc::c_int = 75;
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

/// Reads netfilter's IP6T_SO_ORIGINAL_DST (`getsockopt(SOL_IPV6, 80)`) of an
/// accepted AF_INET6 socket: the address the client connected to, as a
/// `sockaddr_in6`. Any other family in the answer is an error.
pub fn original_dst6(fd: RawFd) -> io::Result<SocketAddrV6> {
    // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid value.
    let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: the buffer is a sockaddr_in6 of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IPV6,
            IP6T_SO_ORIGINAL_DST,
            (&mut sin6 as *mut libc::sockaddr_in6).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if sin6.sin6_family != libc::AF_INET6 as libc::sa_family_t {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "IP6T_SO_ORIGINAL_DST returned address family {}",
                sin6.sin6_family
            ),
        ));
    }
    Ok(SocketAddrV6::new(
        Ipv6Addr::from(sin6.sin6_addr.s6_addr),
        u16::from_be(sin6.sin6_port),
        u32::from_be(sin6.sin6_flowinfo),
        sin6.sin6_scope_id,
    ))
}

/// setsockopt with an int value.
pub fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reading a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A socket's address family, for the probes' `--family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Family {
    /// AF_INET
    Inet,
    /// AF_INET6 (an IPv4 destination is dialled as `::ffff:a.b.c.d`)
    Inet6,
}

impl Family {
    /// The family a socket for `addr` gets when none is forced.
    pub fn of(addr: &SocketAddr) -> Family {
        match addr {
            SocketAddr::V4(_) => Family::Inet,
            SocketAddr::V6(_) => Family::Inet6,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Inet => "inet",
            Family::Inet6 => "inet6",
        }
    }
}

/// `addr` in the form a socket of family `fam` takes: an IPv4 address
/// becomes IPv4-mapped for AF_INET6, a mapped one plain IPv4 for AF_INET;
/// an IPv6 address has no AF_INET form.
pub fn for_family(addr: SocketAddr, fam: Family) -> io::Result<SocketAddr> {
    match (fam, addr) {
        (Family::Inet6, SocketAddr::V4(v4)) => Ok(SocketAddr::V6(SocketAddrV6::new(
            v4.ip().to_ipv6_mapped(),
            v4.port(),
            0,
            0,
        ))),
        (Family::Inet, SocketAddr::V6(v6)) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => Ok(SocketAddr::V4(SocketAddrV4::new(v4, v6.port()))),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{addr} has no AF_INET form"),
            )),
        },
        _ => Ok(addr),
    }
}

/// An address with IPv4-mapped IPv6 written as IPv4 (what is dialled when an
/// AF_INET6 socket connects to it).
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// [`unmapped`] for a bare IP.
pub fn unmapped_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
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
    fn family_forms() {
        let v4: SocketAddr = "10.1.2.3:53".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:53".parse().unwrap();
        let v6: SocketAddr = "[fd00::5]:53".parse().unwrap();
        assert_eq!(for_family(v4, Family::Inet6).unwrap(), mapped);
        assert_eq!(for_family(mapped, Family::Inet).unwrap(), v4);
        assert_eq!(for_family(v6, Family::Inet6).unwrap(), v6);
        assert!(for_family(v6, Family::Inet).is_err());
        assert_eq!(unmapped(mapped), v4);
        assert_eq!(unmapped(v6), v6);
    }

    #[test]
    fn original_dst6_of_plain_socket_fails() {
        use std::os::fd::AsRawFd;
        let Ok(l) = std::net::TcpListener::bind("[::1]:0") else {
            return; // no IPv6 on this machine's loopback
        };
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(original_dst6(c.as_raw_fd()).is_err());
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

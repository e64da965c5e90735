//! `mtest`: the processes meshlane's namespaced tests run inside pods.
//!
//! * `sidecar`: an Envoy stand-in that forwards every accepted connection to its
//!   original destination (SO_ORIGINAL_DST at SOL_IP, IP6T_SO_ORIGINAL_DST at
//!   SOL_IPV6) and logs one JSON line per connection; listeners of either or
//!   both families; optionally a DNS-proxy stand-in on UDP 15053.
//! * `server`: an application that answers one request line with a JSON line
//!   saying who it is and whom it saw.
//! * `probe`: a client that prints one JSON line describing what happened,
//!   from an AF_INET or AF_INET6 socket (IPv4-mapped destinations included).
//! * `udp-echo` / `udp-probe`: a UDP responder and a client, connected or
//!   unconnected (sendto/recvfrom).
//! * `connect-loop`: an app that connects again and again from its first
//!   instant, one JSON line per attempt (the first-packet tests).
//! * `sockopts`: reports raw getsockopt results, to show that a cgroup getsockopt
//!   program leaves them unchanged.
//!
//! None of it needs root except `sockopts --legacy-iptables` (a raw socket).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use meshlane_tests::records::{
    dns_proxy_reply, ServerReply, SidecarRecord, SockoptRecord, UdpProbeResult,
};
use meshlane_tests::sandbox::SidecarListen;
use meshlane_tests::sock::{self, errno_name, fmt_addr, hex, Family};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Envoy's source address for inbound passthrough to the local app.
const INBOUND_PASSTHROUGH_SRC: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// Its IPv6 counterpart, `::6` (istio-iptables adds it to the pod's `lo`).
const INBOUND_PASSTHROUGH_SRC6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
/// Limit for the sidecar's upstream connect, so a black-holed destination does
/// not keep a task (and the client) around forever.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Request-line limits of `server`.
const MAX_LINE: u64 = 4096;
const SERVER_READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "mtest",
    about = "meshlane test sidecar, server, probe and sockopt reporter"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Envoy stand-in: forward captured connections to their original destination.
    Sidecar {
        /// Append one JSON line per accepted connection here.
        #[arg(long)]
        log: PathBuf,
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        /// Which sockets listen on each port: 0.0.0.0 (v4), one [::] with
        /// IPV6_V6ONLY off (dual), 0.0.0.0 and a v6only [::] (split), or a
        /// v6only [::] (v6).
        #[arg(long, value_enum, default_value = "v4")]
        listen: SidecarListen,
        /// Also answer UDP on 127.0.0.1 and [::1] at --dns-port, as the
        /// istio-agent's DNS proxy does, with "dns-proxy got PAYLOAD from PEER".
        #[arg(long)]
        dns: bool,
        #[arg(long, default_value_t = 15053)]
        dns_port: u16,
        /// Start as root, make the listeners IP_TRANSPARENT / IPV6_TRANSPARENT
        /// (what Envoy does for Istio's TPROXY mode), then run as UID:GID.
        #[arg(long, value_name = "UID:GID")]
        transparent_as: Option<String>,
        /// Forward outbound-listener connections here instead of to their
        /// original destination (no interception: the app dials 15001 itself).
        #[arg(long, value_name = "ADDR")]
        outbound_to: Option<SocketAddr>,
        /// Forward inbound-listener connections here (still from 127.0.0.6,
        /// or ::6 for IPv6) instead of to their original destination.
        #[arg(long, value_name = "ADDR")]
        inbound_to: Option<SocketAddr>,
        /// Bytes the relay reads (and so writes) at most per call.
        #[arg(long, default_value_t = RELAY_CHUNK as u32, value_parser = clap::value_parser!(u32).range(1..=16 << 20))]
        relay_buffer: u32,
    },
    /// Application stand-in: answer one line with a JSON line.
    Server {
        #[arg(long)]
        name: String,
        /// Address to listen on (repeatable).
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
    },
    /// Client: connect, send one line, print one JSON line about the outcome.
    Probe {
        /// IPv4, IPv6 or IPv4-mapped ([::ffff:10.0.0.1]:80) destination.
        #[arg(long)]
        connect: SocketAddr,
        /// Bind the client socket to this address (port 0) before connecting.
        #[arg(long)]
        bind: Option<IpAddr>,
        /// The socket's family (default: the destination's); inet6 dials an
        /// IPv4 destination as ::ffff:a.b.c.d.
        #[arg(long, value_enum)]
        family: Option<Family>,
        /// Set IPV6_V6ONLY on an AF_INET6 socket.
        #[arg(long)]
        v6only: bool,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        #[arg(long, default_value = "hello")]
        request: String,
    },
    /// UDP responder: answers each datagram with "NAME from PEER".
    UdpEcho {
        #[arg(long)]
        name: String,
        /// Address to answer on (repeatable; [::] is dual-stack).
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
    },
    /// UDP client: send one datagram, wait for one reply, print one JSON
    /// line. With --connect: connect() (what cgroup/connect4 and connect6
    /// see, and glibc's resolver does), send, recvfrom. With --send-to:
    /// sendto() from an unbound socket, recvfrom().
    UdpProbe {
        #[arg(long, conflicts_with = "send_to", required_unless_present = "send_to")]
        connect: Option<SocketAddr>,
        #[arg(long)]
        send_to: Option<SocketAddr>,
        /// The socket's family (default: the destination's).
        #[arg(long, value_enum)]
        family: Option<Family>,
        /// Set IPV6_V6ONLY on an AF_INET6 socket.
        #[arg(long)]
        v6only: bool,
        #[arg(long, default_value = "ping")]
        payload: String,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Byte-stream server: echo, or hash and answer a digest at EOF.
    StreamServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        echo: bool,
        /// Wait this long before reading each connection (a stalled reader).
        #[arg(long, default_value_t = 0)]
        stall_ms: u64,
        /// Treat EAGAIN on a blocking socket as "wait again", as an
        /// event-loop app does (for sockets in the shortcut).
        #[arg(long)]
        retry_eagain: bool,
    },
    /// Byte-stream client: deterministic payloads, checked end to end;
    /// prints one JSON line.
    StreamClient {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1)]
        conns: u32,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 65536)]
        write_size: usize,
        #[arg(long, value_enum, default_value = "write")]
        method: meshlane_tests::stream::Method,
        #[arg(long)]
        echo: bool,
        /// Read this many echoed bytes, then close with the rest unread.
        #[arg(long)]
        close_after: Option<u64>,
        /// Report how many bytes were sent after this many milliseconds.
        #[arg(long)]
        sample_after_ms: Option<u64>,
        /// Treat EAGAIN on a blocking socket as "wait again".
        #[arg(long)]
        retry_eagain: bool,
    },
    /// Connect COUNT times, one attempt every EVERY_MS, each sending one
    /// line and reading the reply; one JSON line per attempt (`i`, `ms`
    /// since start, `connected`, `errno`, `local`, `reply`).
    ConnectLoop {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 200)]
        count: u32,
        #[arg(long, default_value_t = 5)]
        every_ms: u64,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Print raw getsockopt results of a connected TCP socket as a JSON list.
    Sockopts {
        #[arg(long)]
        connect: SocketAddr,
        /// Also query the legacy iptables "filter" table (needs CAP_NET_RAW).
        #[arg(long)]
        legacy_iptables: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Sockopts {
            connect,
            legacy_iptables,
        } => sockopts(connect, legacy_iptables),
        Cmd::UdpEcho { name, listen } => udp_echo(&name, &listen),
        Cmd::ConnectLoop {
            connect,
            count,
            every_ms,
            timeout_ms,
        } => {
            connect_loop(
                connect,
                count,
                Duration::from_millis(every_ms),
                Duration::from_millis(timeout_ms),
            );
            Ok(())
        }
        Cmd::UdpProbe {
            connect,
            send_to,
            family,
            v6only,
            payload,
            timeout_ms,
        } => {
            let opts = UdpOpts {
                family,
                v6only,
                payload,
                timeout: Duration::from_millis(timeout_ms),
            };
            let r = match (connect, send_to) {
                (Some(to), _) => udp_probe(to, true, &opts),
                (None, Some(to)) => udp_probe(to, false, &opts),
                (None, None) => bail!("udp-probe needs --connect or --send-to"),
            };
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::StreamServer {
            listen,
            echo,
            stall_ms,
            retry_eagain,
        } => meshlane_tests::stream::serve(
            listen,
            echo,
            Duration::from_millis(stall_ms),
            retry_eagain,
        ),
        Cmd::StreamClient {
            connect,
            conns,
            bytes,
            write_size,
            method,
            echo,
            close_after,
            sample_after_ms,
            retry_eagain,
        } => {
            let r = meshlane_tests::stream::client(&meshlane_tests::stream::ClientOpts {
                connect,
                conns,
                bytes,
                write_size,
                method,
                echo,
                close_after,
                sample_after: sample_after_ms.map(Duration::from_millis),
                retry_eagain,
            });
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        cmd => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("building the tokio runtime")?;
            rt.block_on(async move {
                match cmd {
                    Cmd::Sidecar {
                        log,
                        outbound_port,
                        inbound_port,
                        listen,
                        dns,
                        dns_port,
                        transparent_as,
                        outbound_to,
                        inbound_to,
                        relay_buffer,
                    } => {
                        RELAY_SIZE
                            .store(relay_buffer as usize, std::sync::atomic::Ordering::Relaxed);
                        sidecar(SidecarArgs {
                            log,
                            ports: [outbound_port, inbound_port],
                            listen,
                            dns_port: dns.then_some(dns_port),
                            transparent_as,
                            fixed: [outbound_to, inbound_to],
                        })
                        .await
                    }
                    Cmd::Server { name, listen } => server(name, listen).await,
                    Cmd::Probe {
                        connect,
                        bind,
                        family,
                        v6only,
                        timeout_ms,
                        request,
                    } => {
                        let opts = ProbeOpts {
                            bind,
                            family,
                            v6only,
                            timeout: Duration::from_millis(timeout_ms),
                        };
                        probe(connect, &opts, request).await;
                        Ok(())
                    }
                    Cmd::Sockopts { .. }
                    | Cmd::ConnectLoop { .. }
                    | Cmd::UdpEcho { .. }
                    | Cmd::UdpProbe { .. }
                    | Cmd::StreamServer { .. }
                    | Cmd::StreamClient { .. } => {
                        unreachable!("handled above")
                    }
                }
            })
        }
    }
}

fn say_ready() -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").context("writing ready to stdout")?;
    out.flush().context("flushing stdout")
}

/// io::Error as "ENAME: text (os error N)" so logs name the errno.
fn io_err_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{}: {e}", errno_name(n)),
        None => e.to_string(),
    }
}

// ---------------------------------------------------------------- sidecar

/// Bytes the relay moves per read. Large reads keep streaming cheap (few
/// syscalls per megabyte); the buffer is per worker thread, so ten thousand
/// idle connections hold no relay memory.
const RELAY_CHUNK: usize = 64 * 1024;
/// The relay's read size, set once from `--relay-buffer`.
static RELAY_SIZE: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(RELAY_CHUNK);

thread_local! {
    static RELAY_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct Sidecar {
    log: Mutex<std::fs::File>,
    ports: [u16; 2],
    /// Fixed upstreams per listener (outbound, inbound) for runs without
    /// interception; None means the original destination.
    fixed: [Option<SocketAddr>; 2],
    /// Addresses of this namespace's interfaces, to spot connections to ourselves.
    own: Vec<IpAddr>,
}

impl Sidecar {
    fn write(&self, rec: &SidecarRecord) {
        let mut line = serde_json::to_string(rec).expect("record serialises");
        line.push('\n');
        // One write_all of the whole line under the lock: concurrent connections
        // never interleave, and an O_APPEND file gets whole lines.
        let mut f = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()).and_then(|_| f.flush()) {
            eprintln!("mtest sidecar: writing log: {e}");
        }
    }

    /// The original destination is one of the proxy's own listeners: going
    /// there would loop. (An original destination equal to the accepted
    /// socket's local address is normal for TPROXY-style capture, where the
    /// socket keeps the address the client dialled.)
    fn is_loop(&self, orig: SocketAddr) -> bool {
        let ip = sock::unmapped_ip(orig.ip());
        self.ports.contains(&orig.port())
            && (ip.is_loopback() || ip.is_unspecified() || self.own.contains(&ip))
    }
}

/// A listener on 0.0.0.0:`port` (`v6only` None) or [::]:`port` with
/// IPV6_V6ONLY as given; IP_TRANSPARENT / IPV6_TRANSPARENT when asked.
fn sidecar_listener(port: u16, v6only: Option<bool>, transparent: bool) -> Result<TcpListener> {
    let (s, addr) = match v6only {
        None => (
            TcpSocket::new_v4()?,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        ),
        Some(only) => {
            let s = TcpSocket::new_v6()?;
            sock::set_int_opt(
                s.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                only.into(),
            )
            .context("IPV6_V6ONLY")?;
            (s, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        }
    };
    s.set_reuseaddr(true)?;
    if transparent {
        let (level, name, what) = match v6only {
            None => (libc::SOL_IP, libc::IP_TRANSPARENT, "IP_TRANSPARENT"),
            Some(_) => (libc::SOL_IPV6, sock::IPV6_TRANSPARENT, "IPV6_TRANSPARENT"),
        };
        sock::set_int_opt(s.as_raw_fd(), level, name, 1)
            .with_context(|| format!("{what} (needs CAP_NET_ADMIN: start as root)"))?;
    }
    s.bind(addr)
        .with_context(|| format!("binding listener {addr}"))?;
    Ok(s.listen(1024)?)
}

/// The sockets of one capture port for `--listen`: None is 0.0.0.0,
/// Some(v6only) is [::].
fn listener_kinds(listen: SidecarListen) -> &'static [Option<bool>] {
    match listen {
        SidecarListen::V4 => &[None],
        SidecarListen::Dual => &[Some(false)],
        SidecarListen::Split => &[None, Some(true)],
        SidecarListen::V6 => &[Some(true)],
    }
}

/// Drops to `UID:GID` for good (all threads: glibc's setuid is process-wide).
fn drop_to(ids: &str) -> Result<()> {
    let (u, g) = ids
        .split_once(':')
        .with_context(|| format!("--transparent-as {ids:?}: expected UID:GID"))?;
    let (u, g): (u32, u32) = (u.parse()?, g.parse()?);
    // SAFETY: plain credential syscalls.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(g) != 0 || libc::setuid(u) != 0
        {
            return Err(std::io::Error::last_os_error()).context("dropping privileges");
        }
    }
    Ok(())
}

struct SidecarArgs {
    log: PathBuf,
    /// Outbound and inbound capture ports.
    ports: [u16; 2],
    listen: SidecarListen,
    /// The DNS-proxy stand-in's UDP port, when it runs.
    dns_port: Option<u16>,
    transparent_as: Option<String>,
    fixed: [Option<SocketAddr>; 2],
}

async fn sidecar(args: SidecarArgs) -> Result<()> {
    let SidecarArgs {
        log,
        ports,
        listen,
        dns_port,
        transparent_as,
        fixed,
    } = args;
    let [outbound, inbound] = ports;
    meshlane_tests::raise_soft_nofile();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening sidecar log {}", log.display()))?;
    let own = nix::ifaddrs::getifaddrs()
        .context("listing interface addresses")?
        .filter_map(|ifa| {
            let a = ifa.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    let transparent = transparent_as.is_some();
    let mut listeners = Vec::new();
    for (port, is_inbound) in [(outbound, false), (inbound, true)] {
        for &kind in listener_kinds(listen) {
            listeners.push((sidecar_listener(port, kind, transparent)?, port, is_inbound));
        }
    }
    // Bound before ready, like the listeners, as the proxy's uid.
    let mut dns = Vec::new();
    if let Some(port) = dns_port {
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let addr = SocketAddr::new(ip, port);
            let s = std::net::UdpSocket::bind(addr)
                .with_context(|| format!("binding the DNS-proxy stand-in to {addr}"))?;
            s.set_nonblocking(true)?;
            dns.push(tokio::net::UdpSocket::from_std(s)?);
        }
    }
    if let Some(ids) = &transparent_as {
        drop_to(ids)?;
    }
    let sc = Arc::new(Sidecar {
        log: Mutex::new(file),
        ports: [outbound, inbound],
        fixed,
        own,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for s in dns {
        tasks.spawn(dns_proxy(s));
    }
    for (l, port, is_inbound) in listeners {
        let sc = sc.clone();
        tasks.spawn(async move {
            loop {
                match l.accept().await {
                    Ok((stream, _)) => {
                        let sc = sc.clone();
                        tokio::spawn(
                            async move { sidecar_conn(sc, stream, port, is_inbound).await },
                        );
                    }
                    // EMFILE and friends: keep serving the connections we have.
                    Err(e) => {
                        eprintln!("mtest sidecar: accept on {port}: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    say_ready()?;
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// The DNS-proxy stand-in: answers every datagram with
/// "dns-proxy got PAYLOAD from PEER", so a test can tell the proxy answered
/// and whom it saw.
async fn dns_proxy(s: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 2048];
    loop {
        match s.recv_from(&mut buf).await {
            Ok((n, peer)) => {
                let payload = String::from_utf8_lossy(&buf[..n]);
                let reply = dns_proxy_reply(&payload, &fmt_addr(&peer));
                if let Err(e) = s.send_to(reply.as_bytes(), peer).await {
                    eprintln!("mtest sidecar: DNS reply to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("mtest sidecar: DNS recv: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn sidecar_conn(sc: Arc<Sidecar>, client: TcpStream, port: u16, inbound: bool) {
    let peer = client.peer_addr().map(|a| fmt_addr(&a)).unwrap_or_default();
    let local_sa = client.local_addr().ok();
    let v6_socket = local_sa.is_some_and(|a| a.is_ipv6());
    let mut rec = SidecarRecord {
        listener: port,
        peer,
        local: local_sa.map(|a| fmt_addr(&a)).unwrap_or_default(),
        family: if v6_socket { "inet6" } else { "inet" }.into(),
        orig_dst: None,
        orig_dst_error: None,
        orig_dst6: None,
        orig_dst6_error: None,
        upstream_local: None,
        upstream_error: None,
    };
    let target = match sc.fixed[usize::from(inbound)] {
        Some(fixed) => fixed,
        None => {
            // Both questions a proxy may ask: SOL_IP on every socket (the
            // kernel answers it for IPv4-mapped AF_INET6 sockets too), and
            // SOL_IPV6 on AF_INET6 sockets, as Envoy does for its IPv6 ones.
            let fd = client.as_raw_fd();
            let v4 = sock::original_dst(fd).map(SocketAddr::V4);
            let v6 = v6_socket.then(|| sock::original_dst6(fd).map(SocketAddr::V6));
            match &v4 {
                Ok(a) => rec.orig_dst = Some(fmt_addr(a)),
                Err(e) => rec.orig_dst_error = Some(io_err_text(e)),
            }
            match &v6 {
                Some(Ok(a)) => rec.orig_dst6 = Some(fmt_addr(a)),
                Some(Err(e)) => rec.orig_dst6_error = Some(io_err_text(e)),
                None => {}
            }
            let orig = match (v6, v4) {
                (Some(Ok(a)), _) | (_, Ok(a)) => sock::unmapped(a),
                _ => {
                    sc.write(&rec);
                    return;
                }
            };
            if sc.is_loop(orig) {
                rec.upstream_error = Some("loop".into());
                sc.write(&rec);
                return;
            }
            orig
        }
    };
    let upstream = match connect_upstream(target, inbound).await {
        Ok(u) => u,
        Err(e) => {
            rec.upstream_error = Some(e);
            sc.write(&rec);
            return;
        }
    };
    rec.upstream_local = upstream.local_addr().ok().map(|a| fmt_addr(&a));
    sc.write(&rec);
    // Small requests and responses must not wait for Nagle's timer.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _ = relay(&client, &upstream).await;
}

/// Copies both directions until both have reached EOF, passing each
/// half-close on (shutdown of the write side) as Envoy does; the first error
/// in either direction ends both.
async fn relay(a: &TcpStream, b: &TcpStream) -> std::io::Result<()> {
    tokio::try_join!(pump(a, b), pump(b, a))?;
    Ok(())
}

enum Pumped {
    Moved,
    Spurious,
    Eof,
}

/// One direction of [`relay`]. Reads go into the worker's shared buffer and
/// are written on at once; only what the receiver cannot take yet is kept
/// (in `pending`), and nothing more is read until it is gone.
async fn pump(from: &TcpStream, to: &TcpStream) -> std::io::Result<()> {
    use std::io::ErrorKind::WouldBlock;
    let mut pending: Vec<u8> = Vec::new();
    loop {
        flush(to, &mut pending).await?;
        from.readable().await?;
        let step = RELAY_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            let size = RELAY_SIZE.load(std::sync::atomic::Ordering::Relaxed);
            if buf.len() != size {
                buf.resize(size, 0);
            }
            let n = match from.try_read(&mut buf) {
                Ok(0) => return Ok(Pumped::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == WouldBlock => return Ok(Pumped::Spurious),
                Err(e) => return Err(e),
            };
            match to.try_write(&buf[..n]) {
                Ok(w) => pending.extend_from_slice(&buf[w..n]),
                Err(e) if e.kind() == WouldBlock => pending.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
            Ok(Pumped::Moved)
        })?;
        match step {
            Pumped::Moved | Pumped::Spurious => {}
            Pumped::Eof => {
                flush(to, &mut pending).await?;
                // SAFETY: shutdown(2) on a descriptor `to` keeps open.
                if unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) } != 0 {
                    let e = std::io::Error::last_os_error();
                    // The peer may already be gone; that ends this direction too.
                    if e.raw_os_error() != Some(libc::ENOTCONN) {
                        return Err(e);
                    }
                }
                return Ok(());
            }
        }
    }
}

/// Writes all of `pending` to `to`, waiting for room as needed, and empties it.
async fn flush(to: &TcpStream, pending: &mut Vec<u8>) -> std::io::Result<()> {
    let mut off = 0;
    while off < pending.len() {
        to.writable().await?;
        match to.try_write(&pending[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    pending.clear();
    Ok(())
}

async fn connect_upstream(orig: SocketAddr, inbound: bool) -> Result<TcpStream, String> {
    let orig = sock::unmapped(orig);
    let s = if orig.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {}", io_err_text(&e)))?;
    if inbound {
        // The port is chosen at connect() (as Envoy and HAProxy do), where
        // the kernel knows the whole 4-tuple and may reuse ports in
        // TIME_WAIT; chosen at bind(), every port ever used recently is
        // taken, and under connection churn each bind scans the whole range.
        let on: libc::c_int = 1;
        // SAFETY: setsockopt with a c_int on a socket we own.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("IP_BIND_ADDRESS_NO_PORT: {}", io_err_text(&e)));
        }
        let src = if orig.is_ipv4() {
            SocketAddr::from((INBOUND_PASSTHROUGH_SRC, 0))
        } else {
            SocketAddr::from((INBOUND_PASSTHROUGH_SRC6, 0))
        };
        s.bind(src)
            .map_err(|e| format!("bind {src}: {}", io_err_text(&e)))?;
    }
    match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, s.connect(orig)).await {
        Ok(Ok(st)) => Ok(st),
        Ok(Err(e)) => Err(format!("connect {orig}: {}", io_err_text(&e))),
        Err(_) => Err(format!(
            "connect {orig}: timed out after {UPSTREAM_CONNECT_TIMEOUT:?}"
        )),
    }
}

// ---------------------------------------------------------------- server

async fn server(name: String, listen: Vec<SocketAddr>) -> Result<()> {
    let mut listeners = Vec::new();
    for addr in &listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding server {name} to {addr}"))?;
        listeners.push(l);
    }
    say_ready()?;
    let name = Arc::new(name);
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let name = name.clone();
        tasks.spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        let name = name.clone();
                        tokio::spawn(async move { server_conn(&name, s).await });
                    }
                    Err(e) => {
                        eprintln!("mtest server: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn server_conn(name: &str, mut s: TcpStream) {
    let local = s.local_addr().map(|a| fmt_addr(&a)).unwrap_or_default();
    let peer = s.peer_addr().map(|a| fmt_addr(&a)).unwrap_or_default();
    let (rd, mut wr) = s.split();
    let mut br = BufReader::new(rd.take(MAX_LINE));
    let mut buf = Vec::new();
    match tokio::time::timeout(SERVER_READ_TIMEOUT, br.read_until(b'\n', &mut buf)).await {
        Ok(Ok(_)) => {}
        // No complete request in time, or a reset: nothing to answer.
        _ => return,
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    let reply = ServerReply {
        server: name.to_string(),
        local,
        peer,
        request: String::from_utf8_lossy(&buf).into_owned(),
    };
    let mut line = serde_json::to_string(&reply).expect("reply serialises");
    line.push('\n');
    let _ = wr.write_all(line.as_bytes()).await;
    let _ = wr.shutdown().await;
}

// ---------------------------------------------------------------- probe

/// What `probe` prints; the same fields as `meshlane_tests::ProbeResult`, but the
/// reply may be any JSON object (not only an `mtest server` reply).
#[derive(serde::Serialize, Default)]
struct ProbeOut {
    connected: bool,
    error: Option<String>,
    errno: Option<String>,
    local: Option<String>,
    peer: Option<String>,
    family: Option<String>,
    reply: Option<serde_json::Value>,
    reply_raw: Option<String>,
}

impl ProbeOut {
    fn fail(&mut self, what: &str, e: &std::io::Error) {
        self.error = Some(format!("{what}{e}"));
        self.errno = e.raw_os_error().map(errno_name);
    }
}

struct ProbeOpts {
    bind: Option<IpAddr>,
    family: Option<Family>,
    v6only: bool,
    timeout: Duration,
}

async fn probe(connect: SocketAddr, opts: &ProbeOpts, request: String) {
    let mut out = ProbeOut::default();
    let timeout = opts.timeout;
    let family = opts.family.unwrap_or_else(|| Family::of(&connect));
    out.family = Some(family.name().into());
    match probe_connect(connect, family, opts).await {
        Err((what, e)) => out.fail(what, &e),
        Ok(mut s) => {
            out.connected = true;
            out.local = s.local_addr().ok().map(|a| fmt_addr(&a));
            out.peer = s.peer_addr().ok().map(|a| fmt_addr(&a));
            let line = format!("{request}\n");
            match tokio::time::timeout(timeout, probe_exchange(&mut s, line.as_bytes())).await {
                Err(_) => out.error = Some(format!("no reply within {} ms", timeout.as_millis())),
                Ok(Err((what, e))) => out.fail(what, &e),
                Ok(Ok(raw)) if raw.is_empty() => {
                    out.error = Some("connection closed before a reply (EOF)".into())
                }
                Ok(Ok(raw)) => {
                    let text = String::from_utf8_lossy(&raw);
                    let text = text.trim_end_matches(['\n', '\r']).to_string();
                    out.reply = serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .filter(|v| v.is_object());
                    out.reply_raw = Some(text);
                }
            }
        }
    }
    println!(
        "{}",
        serde_json::to_string(&out).expect("probe output serialises")
    );
}

async fn probe_connect(
    connect: SocketAddr,
    family: Family,
    opts: &ProbeOpts,
) -> Result<TcpStream, (&'static str, std::io::Error)> {
    let timeout = opts.timeout;
    let connect = sock::for_family(connect, family).map_err(|e| ("address: ", e))?;
    let s = match family {
        Family::Inet => TcpSocket::new_v4(),
        Family::Inet6 => TcpSocket::new_v6(),
    }
    .map_err(|e| ("socket: ", e))?;
    if opts.v6only {
        sock::set_int_opt(s.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)
            .map_err(|e| ("IPV6_V6ONLY: ", e))?;
    }
    if let Some(ip) = opts.bind {
        let at = sock::for_family(SocketAddr::new(ip, 0), family).map_err(|e| ("bind: ", e))?;
        s.bind(at).map_err(|e| ("bind: ", e))?;
    }
    match tokio::time::timeout(timeout, s.connect(connect)).await {
        Ok(r) => r.map_err(|e| ("", e)),
        Err(_) => Err((
            "",
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect timed out after {} ms", timeout.as_millis()),
            ),
        )),
    }
}

/// Sends the request and reads one reply line (or whatever arrives before EOF).
async fn probe_exchange(
    s: &mut TcpStream,
    request: &[u8],
) -> Result<Vec<u8>, (&'static str, std::io::Error)> {
    s.write_all(request).await.map_err(|e| ("write: ", e))?;
    let mut br = BufReader::new(s.take(64 * 1024));
    let mut buf = Vec::new();
    br.read_until(b'\n', &mut buf)
        .await
        .map_err(|e| ("read: ", e))?;
    Ok(buf)
}

// ------------------------------------------------------------ connect-loop

fn connect_loop(to: SocketAddr, count: u32, every: Duration, timeout: Duration) {
    use std::io::{BufRead, Write};
    let start = std::time::Instant::now();
    let mut out = std::io::stdout().lock();
    for i in 0..count {
        let at = start.elapsed();
        let mut line = serde_json::json!({"i": i, "ms": at.as_millis() as u64});
        match std::net::TcpStream::connect_timeout(&to, timeout) {
            Err(e) => {
                line["connected"] = false.into();
                line["errno"] = e.raw_os_error().map(errno_name).unwrap_or_default().into();
                line["error"] = e.to_string().into();
            }
            Ok(mut s) => {
                line["connected"] = true.into();
                line["local"] = s
                    .local_addr()
                    .map(|a| fmt_addr(&a))
                    .unwrap_or_default()
                    .into();
                let _ = s.set_read_timeout(Some(timeout));
                let mut reply = String::new();
                if s.write_all(b"hello\n").is_ok() {
                    let _ = std::io::BufReader::new(&s).read_line(&mut reply);
                }
                line["reply"] = serde_json::from_str::<serde_json::Value>(reply.trim())
                    .unwrap_or(serde_json::Value::Null);
            }
        }
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        std::thread::sleep(
            (start + every * (i + 1)).saturating_duration_since(std::time::Instant::now()),
        );
    }
}

// ---------------------------------------------------------------- sockopts

fn record(
    name: &str,
    fd: i32,
    level: i32,
    optname: i32,
    buflen: usize,
    init: &[u8],
    show: Option<usize>,
) -> (SockoptRecord, Vec<u8>) {
    let r = sock::raw_getsockopt(fd, level, optname, buflen, init);
    let shown = &r.data[..show.unwrap_or(r.data.len()).min(r.data.len())];
    (
        SockoptRecord {
            name: name.to_string(),
            level,
            optname,
            buflen: buflen as u32,
            rc: r.rc,
            errno: r.errno,
            optlen: r.optlen,
            data_hex: hex(shown),
        },
        r.data,
    )
}

fn sockopts(connect: SocketAddr, legacy: bool) -> Result<()> {
    // The iptables queries come first: the TCP connection below moves the
    // table's packet counters, which are part of the answer.
    let legacy_recs = if legacy {
        legacy_iptables()?
    } else {
        Vec::new()
    };
    let s = std::net::TcpStream::connect_timeout(&connect, Duration::from_secs(3))
        .with_context(|| format!("connecting to {connect}"))?;
    let fd = s.as_raw_fd();
    let (sol, tcp, ip) = (libc::SOL_SOCKET, libc::IPPROTO_TCP, libc::SOL_IP);
    let mut recs = vec![
        record("SO_RCVBUF", fd, sol, libc::SO_RCVBUF, 4, &[], None).0,
        record("SO_TYPE", fd, sol, libc::SO_TYPE, 4, &[], None).0,
        record("TCP_NODELAY", fd, tcp, libc::TCP_NODELAY, 4, &[], None).0,
        // Only the first 8 bytes (state, ca_state, retransmits, probes, backoff,
        // options, wscale, flags) are stable; the rest are counters and timers.
        record("TCP_INFO", fd, tcp, libc::TCP_INFO, 232, &[], Some(8)).0,
        record("TCP_INFO", fd, tcp, libc::TCP_INFO, 15000, &[], Some(8)).0,
        record(
            "SO_ORIGINAL_DST",
            fd,
            ip,
            sock::SO_ORIGINAL_DST,
            16,
            &[],
            None,
        )
        .0,
        record("IP_TOS", fd, ip, libc::IP_TOS, 4, &[], None).0,
        record("SO_RCVBUF_NULL", fd, sol, libc::SO_RCVBUF, 0, &[], None).0,
    ];
    recs.extend(legacy_recs);
    println!(
        "{}",
        serde_json::to_string(&recs).context("serialising sockopt records")?
    );
    Ok(())
}

/// The two getsockopt calls `iptables-legacy -L` makes on a raw socket: table
/// info, then every entry (buflen = header + info.size, 15 KB and more with many
/// rules — the size that trips programs clamping optlen at 4096).
fn legacy_iptables() -> Result<Vec<SockoptRecord>> {
    // SAFETY: plain socket(2); the fd is wrapped in an OwnedFd right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if raw < 0 {
        let e = std::io::Error::last_os_error();
        bail!("socket(AF_INET, SOCK_RAW, IPPROTO_RAW) (needs CAP_NET_RAW): {e}");
    }
    // SAFETY: `raw` is a fresh fd we own.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let fd = owned.as_raw_fd();
    let mut name = [0u8; 32];
    name[..6].copy_from_slice(b"filter");

    let (info, data) = record(
        "IPT_SO_GET_INFO",
        fd,
        libc::SOL_IP,
        sock::IPT_SO_GET_INFO,
        sock::IPT_GETINFO_LEN,
        &name,
        None,
    );
    // `size` is the last u32 of struct ipt_getinfo.
    let size = if info.rc == 0 && data.len() >= sock::IPT_GETINFO_LEN {
        let off = sock::IPT_GETINFO_LEN - 4;
        u32::from_ne_bytes(data[off..off + 4].try_into().expect("4 bytes"))
    } else {
        0
    };
    let mut hdr = vec![0u8; sock::IPT_GET_ENTRIES_HDR_LEN];
    hdr[..32].copy_from_slice(&name);
    hdr[32..36].copy_from_slice(&size.to_ne_bytes());
    let (entries, _) = record(
        "IPT_SO_GET_ENTRIES",
        fd,
        libc::SOL_IP,
        sock::IPT_SO_GET_ENTRIES,
        sock::IPT_GET_ENTRIES_HDR_LEN + size as usize,
        &hdr,
        None,
    );
    Ok(vec![info, entries])
}

// ---------------------------------------------------------------- udp

fn udp_echo(name: &str, listen: &[SocketAddr]) -> Result<()> {
    let mut sockets = Vec::new();
    for addr in listen {
        sockets
            .push(std::net::UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?);
    }
    say_ready()?;
    let name = name.to_string();
    let threads: Vec<_> = sockets
        .into_iter()
        .map(|s| {
            let name = name.clone();
            std::thread::spawn(move || -> Result<()> {
                let mut buf = [0u8; 2048];
                loop {
                    let (_, peer) = s.recv_from(&mut buf).context("recv_from")?;
                    let reply = format!("{name} from {}", fmt_addr(&peer));
                    let _ = s.send_to(reply.as_bytes(), peer);
                }
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("udp-echo thread panicked"))??;
    }
    Ok(())
}

struct UdpOpts {
    family: Option<Family>,
    v6only: bool,
    payload: String,
    timeout: Duration,
}

/// One datagram to `to` and one reply, connected (connect, send, recvfrom)
/// or not (sendto from an unbound socket, recvfrom); raw calls, so nothing
/// binds or connects the socket behind the test's back.
fn udp_probe(to: SocketAddr, connected: bool, opts: &UdpOpts) -> UdpProbeResult {
    use nix::sys::socket::{self as ns, sockopt, AddressFamily, MsgFlags, SockFlag, SockType};
    let family = opts.family.unwrap_or_else(|| Family::of(&to));
    let mut out = UdpProbeResult {
        mode: if connected {
            "connected"
        } else {
            "unconnected"
        }
        .into(),
        family: family.name().into(),
        ..Default::default()
    };
    let fail = |out: &mut UdpProbeResult, what: &str, e: nix::errno::Errno| {
        out.error = Some(format!("{what}: {}", e.desc()));
        out.errno = Some(errno_name(e as i32));
    };
    let dest = match sock::for_family(to, family) {
        Ok(d) => ns::SockaddrStorage::from(d),
        Err(e) => {
            out.error = Some(format!("address: {e}"));
            return out;
        }
    };
    let af = match family {
        Family::Inet => AddressFamily::Inet,
        Family::Inet6 => AddressFamily::Inet6,
    };
    let fd = match ns::socket(af, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None) {
        Ok(fd) => fd,
        Err(e) => {
            fail(&mut out, "socket", e);
            return out;
        }
    };
    let raw = fd.as_raw_fd();
    if opts.v6only {
        if let Err(e) = ns::setsockopt(&fd, sockopt::Ipv6V6Only, &true) {
            fail(&mut out, "IPV6_V6ONLY", e);
            return out;
        }
    }
    let tv = nix::sys::time::TimeVal::new(
        opts.timeout.as_secs() as i64,
        opts.timeout.subsec_micros() as i64,
    );
    if let Err(e) = ns::setsockopt(&fd, sockopt::ReceiveTimeout, &tv) {
        fail(&mut out, "SO_RCVTIMEO", e);
        return out;
    }
    let show =
        |a: Option<ns::SockaddrStorage>| a.and_then(|a| storage_to_std(&a)).map(|a| fmt_addr(&a));
    let payload = opts.payload.as_bytes();
    let sent = if connected {
        if let Err(e) = ns::connect(raw, &dest) {
            fail(&mut out, "connect", e);
            return out;
        }
        out.connected = true;
        out.peer = show(ns::getpeername::<ns::SockaddrStorage>(raw).ok());
        ns::send(raw, payload, MsgFlags::empty())
    } else {
        ns::sendto(raw, payload, &dest, MsgFlags::empty())
    };
    if let Err(e) = sent {
        fail(&mut out, "send", e);
        return out;
    }
    out.sent = true;
    out.local = show(ns::getsockname::<ns::SockaddrStorage>(raw).ok());
    let mut buf = [0u8; 2048];
    match ns::recvfrom::<ns::SockaddrStorage>(raw, &mut buf) {
        Ok((n, from)) => {
            out.reply = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            out.reply_from = show(from);
        }
        Err(e) => fail(&mut out, "recvfrom", e),
    }
    out
}

fn storage_to_std(a: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

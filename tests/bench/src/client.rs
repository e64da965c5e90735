//! `mbench client`: the application at the near end. Every shape runs on
//! blocking sockets in plain threads (no runtime between the timer and the
//! syscalls), warms up, then measures a window whose boundaries are taken by
//! one thread, which also samples the CPU time of the other processes in the
//! path, so work and CPU cover the same interval. Every loop ends by count
//! or by time.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{
    hist::Histogram,
    proto::{echo_request, Kind},
    sys,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// After this many failures in a row a worker gives up (the path is broken,
/// not slow).
const MAX_CONSECUTIVE_ERRORS: u32 = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// New connection, one request of SIZE and its response, close; repeat.
    Crr,
    /// Requests of SIZE and responses of SIZE on kept connections.
    Rr,
    /// One connection writing SIZE-byte chunks as fast as it can.
    Stream,
    /// Open CONNS connections (one request each), hold them until the
    /// release file appears, close them.
    Hold,
    /// MAX_COUNT short connections (like crr), as fast as CONNS threads can.
    Churn,
    /// UDP queries of SIZE to CONNECT (port 53), each waiting for its
    /// answer, which must come from the DNS proxy stand-in (first byte
    /// [`DNS_PROXY_TAG`]) with CONNECT as its source.
    Dns,
    /// Unconnected UDP datagrams of SIZE to CONNECT (sendto each), as fast
    /// as one thread can; the receiver drops them.
    UdpSend,
    /// One TCP connection to CONNECT, then getsockopt TCP_INFO, SO_ERROR and
    /// SO_RCVBUF in a tight loop (one operation = the three calls).
    Sockopt,
}

/// First byte of the DNS proxy stand-in's answers.
pub const DNS_PROXY_TAG: u8 = b'P';
/// First byte of the answers of the "DNS server" the queries are addressed
/// to (an answer from it means the query was not captured).
pub const DNS_SERVER_TAG: u8 = b'S';
/// getsockopt calls per operation of the sockopt shape.
pub const SOCKOPT_CALLS: u64 = 3;

#[derive(Clone, Debug, clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    pub connect: SocketAddr,
    #[arg(long, value_enum)]
    pub shape: Shape,
    /// Request/response size (crr, rr, hold, churn) or write size (stream), bytes.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Threads (crr, churn), connections (rr, hold).
    #[arg(long, default_value_t = 1)]
    pub conns: u32,
    #[arg(long, default_value_t = 500)]
    pub warmup_ms: u64,
    /// The measured window (crr, rr, stream); the time limit (hold, churn).
    #[arg(long, default_value_t = 3000)]
    pub duration_ms: u64,
    /// Connections to make (churn).
    #[arg(long, default_value_t = 0)]
    pub max_count: u64,
    /// Processes whose CPU time counts towards this run (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub cpu_pids: Vec<u32>,
    /// hold: close the connections when this file exists.
    #[arg(long)]
    pub release_file: Option<PathBuf>,
}

/// What one client run measured; printed as one JSON line.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub shape: String,
    /// Completed operations in the window (requests, connections, or
    /// connections opened for hold).
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Length of the measured window.
    pub elapsed_s: f64,
    /// Payload bytes written in the window (stream).
    pub bytes: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_us: f64,
    /// CPU time in the window: this client (getrusage), the listed
    /// processes (/proc/PID/stat), and the machine's softirq time.
    pub cpu_client_us: f64,
    pub cpu_others_us: f64,
    pub softirq_us: f64,
    /// Context switches of the listed processes' threads in the window.
    #[serde(default)]
    pub ctxsw_others: u64,
    /// Operations and bytes of the whole run, warm-up included (to relate
    /// to counters read outside the client, such as the agent's).
    #[serde(default)]
    pub ops_total: u64,
    #[serde(default)]
    pub bytes_total: u64,
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// State shared by a run's workers.
struct Shared {
    phase: AtomicU8,
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    /// Connections started (churn's count limit).
    started: AtomicU64,
    first_error: Mutex<Option<String>>,
    hist: Mutex<Histogram>,
}

impl Shared {
    fn new(phase: u8) -> Arc<Self> {
        Arc::new(Self {
            phase: AtomicU8::new(phase),
            ops: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            started: AtomicU64::new(0),
            first_error: Mutex::new(None),
            hist: Mutex::new(Histogram::new()),
        })
    }

    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Relaxed)
    }

    fn error(&self, e: &dyn std::fmt::Display) {
        if self.phase() == MEASURE {
            self.errors.fetch_add(1, Ordering::Relaxed);
            let mut f = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                *f = Some(e.to_string());
            }
        }
    }

    fn merge(&self, h: &Histogram) {
        self.hist.lock().unwrap_or_else(|p| p.into_inner()).merge(h);
    }
}

/// CPU counters at one instant.
struct CpuMark {
    client_us: f64,
    others_us: f64,
    softirq_us: f64,
    ctxsw: u64,
}

fn cpu_mark(pids: &[u32]) -> CpuMark {
    CpuMark {
        client_us: self_cpu_us(),
        others_us: pids.iter().filter_map(|&p| sys::process_cpu_us(p)).sum(),
        softirq_us: sys::softirq_us().unwrap_or(0.0),
        ctxsw: pids.iter().filter_map(|&p| sys::context_switches(p)).sum(),
    }
}

/// This process's user + system time (all threads), microseconds.
fn self_cpu_us() -> f64 {
    // SAFETY: getrusage fills a zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

pub fn run(args: &ClientArgs) -> Result<Report> {
    meshlane_tests::raise_soft_nofile();
    let report = match args.shape {
        Shape::Crr | Shape::Rr | Shape::Stream | Shape::Dns | Shape::UdpSend | Shape::Sockopt => {
            windowed(args)?
        }
        Shape::Churn => churn(args)?,
        Shape::Hold => hold(args)?,
    };
    Ok(report)
}

/// Waits until `window` has passed since `t0`, or until all `workers` have
/// reported done (each sends one message when it ends).
/// Returns how many reported.
fn wait_for_workers(
    done_rx: &mpsc::Receiver<()>,
    workers: u32,
    t0: Instant,
    window: Duration,
) -> u32 {
    let mut finished = 0;
    while finished < workers {
        let left = window.saturating_sub(t0.elapsed());
        if left.is_zero() {
            break;
        }
        match done_rx.recv_timeout(left) {
            Ok(()) => finished += 1,
            Err(_) => break,
        }
    }
    finished
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One request and its response on `s`.
fn exchange(s: &mut TcpStream, req: &[u8], resp: &mut [u8]) -> std::io::Result<()> {
    write_all(s, req)?;
    read_exact(s, resp, IO_TIMEOUT)
}

/// `read_exact` that waits again on EAGAIN before `timeout`: a socket in
/// the shortcut's sockhash (mode meshlane+shortcut-app) reads through the
/// kernel's tcp_bpf_recvmsg, which wakes a blocking read with EAGAIN when no
/// data came, where an event-loop app would just wait again. On plain TCP a
/// blocking read returns EAGAIN only when its socket timeout expires, which
/// is past `timeout`, so other modes behave as before.
fn read_exact(s: &mut TcpStream, mut buf: &mut [u8], timeout: Duration) -> std::io::Result<()> {
    let start = Instant::now();
    while !buf.is_empty() {
        match s.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < timeout => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all` with the same EAGAIN rule as [`read_exact`].
fn write_all(s: &mut TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    let start = Instant::now();
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < IO_TIMEOUT => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// connect, one exchange, close.
fn short_conn(addr: SocketAddr, req: &[u8], resp: &mut [u8]) -> std::io::Result<()> {
    let mut s = connect(addr)?;
    exchange(&mut s, req, resp)
}

/// crr, rr and stream: warm up, then a window of `duration_ms`.
fn windowed(args: &ClientArgs) -> Result<Report> {
    let shared = Shared::new(WARMUP);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let workers = args.conns.max(1);
    let mut handles = Vec::new();
    for _ in 0..workers {
        let sh = shared.clone();
        let a = args.clone();
        let tx = done_tx.clone();
        handles.push(std::thread::spawn(move || {
            let r = match a.shape {
                Shape::Crr => crr_worker(&a, &sh),
                Shape::Rr => rr_worker(&a, &sh),
                Shape::Stream => stream_worker(&a, &sh),
                Shape::Dns => dns_worker(&a, &sh),
                Shape::UdpSend => udp_send_worker(&a, &sh),
                Shape::Sockopt => sockopt_worker(&a, &sh),
                Shape::Hold | Shape::Churn => unreachable!("not windowed"),
            };
            if let Err(e) = &r {
                sh.error(e);
            }
            let _ = tx.send(());
            r
        }));
    }
    drop(done_tx);
    // A worker that fails during warm-up ends the run: the path is broken.
    if let Ok(()) = done_rx.recv_timeout(Duration::from_millis(args.warmup_ms)) {
        shared.phase.store(STOP, Ordering::Relaxed);
        let mut why = String::from("a worker ended during warm-up");
        for h in handles {
            if let Ok(Err(e)) = h.join() {
                why = format!("{e:#}");
            }
        }
        bail!("{:?} to {}: {why}", args.shape, args.connect);
    }
    let c0 = cpu_mark(&args.cpu_pids);
    let (ops0, bytes0) = (
        shared.ops.load(Ordering::Relaxed),
        shared.bytes.load(Ordering::Relaxed),
    );
    let t0 = Instant::now();
    shared.phase.store(MEASURE, Ordering::Relaxed);
    // Ends early only if every worker gave up.
    wait_for_workers(
        &done_rx,
        workers,
        t0,
        Duration::from_millis(args.duration_ms),
    );
    let (ops1, bytes1) = (
        shared.ops.load(Ordering::Relaxed),
        shared.bytes.load(Ordering::Relaxed),
    );
    let elapsed = t0.elapsed();
    let c1 = cpu_mark(&args.cpu_pids);
    shared.phase.store(STOP, Ordering::Relaxed);
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => shared.error(&format!("{e:#}")),
            Err(_) => bail!("a {:?} worker panicked", args.shape),
        }
    }
    Ok(report(
        args.shape,
        &shared,
        ops1 - ops0,
        bytes1 - bytes0,
        elapsed,
        &c0,
        &c1,
    ))
}

fn report(
    shape: Shape,
    sh: &Shared,
    ops: u64,
    bytes: u64,
    elapsed: Duration,
    c0: &CpuMark,
    c1: &CpuMark,
) -> Report {
    let h = sh.hist.lock().unwrap_or_else(|p| p.into_inner());
    Report {
        shape: format!("{shape:?}").to_lowercase(),
        ops,
        errors: sh.errors.load(Ordering::Relaxed),
        first_error: sh
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        elapsed_s: elapsed.as_secs_f64(),
        bytes,
        p50_us: h.quantile(0.5) / 1e3,
        p99_us: h.quantile(0.99) / 1e3,
        p999_us: h.quantile(0.999) / 1e3,
        mean_us: h.mean() / 1e3,
        cpu_client_us: c1.client_us - c0.client_us,
        cpu_others_us: c1.others_us - c0.others_us,
        softirq_us: c1.softirq_us - c0.softirq_us,
        ctxsw_others: c1.ctxsw.saturating_sub(c0.ctxsw),
        ops_total: sh.ops.load(Ordering::Relaxed),
        bytes_total: sh.bytes.load(Ordering::Relaxed),
    }
}

fn crr_worker(a: &ClientArgs, sh: &Shared) -> Result<()> {
    let req = echo_request(a.size);
    let mut resp = vec![0u8; req.len()];
    let mut h = Histogram::new();
    let mut consecutive = 0;
    while sh.phase() != STOP {
        let t = Instant::now();
        match short_conn(a.connect, &req, &mut resp) {
            Ok(()) => {
                consecutive = 0;
                if sh.phase() == MEASURE {
                    h.record(t.elapsed().as_nanos() as u64);
                }
                sh.ops.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                sh.error(&e);
                consecutive += 1;
                if consecutive >= MAX_CONSECUTIVE_ERRORS {
                    sh.merge(&h);
                    bail!("{consecutive} connections in a row failed, last: {e}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    sh.merge(&h);
    Ok(())
}

fn rr_worker(a: &ClientArgs, sh: &Shared) -> Result<()> {
    let req = echo_request(a.size);
    let mut resp = vec![0u8; req.len()];
    let mut s = connect(a.connect).with_context(|| format!("connecting to {}", a.connect))?;
    let mut h = Histogram::new();
    while sh.phase() != STOP {
        let t = Instant::now();
        exchange(&mut s, &req, &mut resp).context("request/response")?;
        if sh.phase() == MEASURE {
            h.record(t.elapsed().as_nanos() as u64);
        }
        sh.ops.fetch_add(1, Ordering::Relaxed);
    }
    sh.merge(&h);
    Ok(())
}

fn stream_worker(a: &ClientArgs, sh: &Shared) -> Result<()> {
    let mut s = connect(a.connect).with_context(|| format!("connecting to {}", a.connect))?;
    write_all(&mut s, &Kind::Sink.header())?;
    let chunk = vec![0x5au8; a.size.max(1) as usize];
    let mut written: u64 = 0;
    while sh.phase() != STOP {
        write_all(&mut s, &chunk).context("streaming write")?;
        written += chunk.len() as u64;
        sh.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    // The server's count proves every byte went through the whole path.
    s.shutdown(Shutdown::Write)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut total = [0u8; 8];
    read_exact(&mut s, &mut total, Duration::from_secs(30))
        .context("reading the server's byte count")?;
    let got = u64::from_le_bytes(total);
    let sent = written + super::proto::HEADER_LEN as u64;
    if got != sent {
        bail!("the server received {got} bytes of {sent} sent");
    }
    Ok(())
}

/// A UDP socket of `to`'s family on an ephemeral port.
fn udp_socket(to: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    UdpSocket::bind(any)
}

fn dns_worker(a: &ClientArgs, sh: &Shared) -> Result<()> {
    let s = udp_socket(a.connect).context("UDP socket")?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let size = (a.size as usize).clamp(16, 1400);
    let mut q = vec![b'q'; size];
    let mut resp = vec![0u8; 2048];
    let mut h = Histogram::new();
    let mut consecutive = 0;
    let mut id: u64 = 0;
    while sh.phase() != STOP {
        id += 1;
        // A query id in the payload, so a late answer to an earlier query
        // is not taken for this one's.
        q[1..9].copy_from_slice(&id.to_le_bytes());
        let t = Instant::now();
        let r = s.send_to(&q, a.connect).and_then(|_| loop {
            let (n, from) = s.recv_from(&mut resp)?;
            if n == q.len() && resp[1..9] == q[1..9] {
                break Ok((resp[0], from));
            }
            // A stale answer: wait for ours (the read timeout bounds it).
        });
        let what = match r {
            Ok((DNS_PROXY_TAG, from)) if from == a.connect => None,
            Ok((DNS_PROXY_TAG, from)) => Some(format!(
                "the answer came from {from}, not {} (the source was not restored)",
                a.connect
            )),
            Ok((DNS_SERVER_TAG, _)) => Some(format!(
                "{} answered itself: the query was not captured",
                a.connect
            )),
            Ok((t, _)) => Some(format!("unknown answer tag {t:#x}")),
            Err(e) => Some(format!("query: {e}")),
        };
        match what {
            None => {
                consecutive = 0;
                if sh.phase() == MEASURE {
                    h.record(t.elapsed().as_nanos() as u64);
                }
                sh.ops.fetch_add(1, Ordering::Relaxed);
            }
            Some(e) => {
                sh.error(&e);
                consecutive += 1;
                if consecutive >= MAX_CONSECUTIVE_ERRORS {
                    sh.merge(&h);
                    bail!("{consecutive} queries in a row failed, last: {e}");
                }
            }
        }
    }
    sh.merge(&h);
    Ok(())
}

fn udp_send_worker(a: &ClientArgs, sh: &Shared) -> Result<()> {
    let s = udp_socket(a.connect).context("UDP socket")?;
    let mut d = vec![0u8; (a.size as usize).clamp(1, 1400)];
    d[0] = super::server::UDP_DISCARD;
    let mut consecutive = 0;
    while sh.phase() != STOP {
        // Batches keep the shared counter off the per-datagram path.
        let mut sent = 0;
        for _ in 0..64 {
            match s.send_to(&d, a.connect) {
                Ok(_) => sent += 1,
                // A full send buffer (ENOBUFS/EAGAIN) is back-pressure, not
                // a failure of the path.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(e) => {
                    sh.error(&e);
                    consecutive += 1;
                    if consecutive >= MAX_CONSECUTIVE_ERRORS {
                        bail!("{consecutive} sends in a row failed, last: {e}");
                    }
                }
            }
        }
        if sent > 0 {
            consecutive = 0;
        }
        sh.ops.fetch_add(sent, Ordering::Relaxed);
        sh.bytes.fetch_add(sent * d.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// getsockopt(fd, level, name) into a buffer of `len` bytes.
fn getsockopt_raw(fd: i32, level: i32, name: i32, buf: &mut [u8]) -> std::io::Result<()> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf is valid for len bytes and len is its length.
    let rc = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn sockopt_worker(a: &ClientArgs, sh: &Shared) -> Result<()> {
    use std::os::fd::AsRawFd;
    let s = connect(a.connect).with_context(|| format!("connecting to {}", a.connect))?;
    let fd = s.as_raw_fd();
    // struct tcp_info is 232 bytes on current kernels; a larger buffer
    // is fine (the kernel writes what it has).
    let mut info = [0u8; 256];
    let mut int = [0u8; 4];
    while sh.phase() != STOP {
        let mut done = 0;
        for _ in 0..256 {
            getsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)
                .context("getsockopt TCP_INFO")?;
            getsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_ERROR, &mut int)
                .context("getsockopt SO_ERROR")?;
            getsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &mut int)
                .context("getsockopt SO_RCVBUF")?;
            done += 1;
        }
        sh.ops.fetch_add(done, Ordering::Relaxed);
    }
    drop(s);
    Ok(())
}

/// `max_count` short connections over `conns` threads, no warm-up, within
/// `duration_ms`.
fn churn(args: &ClientArgs) -> Result<Report> {
    if args.max_count == 0 {
        bail!("churn needs --max-count");
    }
    let shared = Shared::new(MEASURE);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let c0 = cpu_mark(&args.cpu_pids);
    let t0 = Instant::now();
    let workers = args.conns.max(1);
    let mut handles = Vec::new();
    for _ in 0..workers {
        let sh = shared.clone();
        let a = args.clone();
        let tx = done_tx.clone();
        handles.push(std::thread::spawn(move || {
            let req = echo_request(a.size);
            let mut resp = vec![0u8; req.len()];
            let mut h = Histogram::new();
            let mut consecutive = 0;
            while sh.phase() != STOP && sh.started.fetch_add(1, Ordering::Relaxed) < a.max_count {
                let t = Instant::now();
                match short_conn(a.connect, &req, &mut resp) {
                    Ok(()) => {
                        consecutive = 0;
                        h.record(t.elapsed().as_nanos() as u64);
                        sh.ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        sh.error(&e);
                        consecutive += 1;
                        if consecutive >= MAX_CONSECUTIVE_ERRORS {
                            break;
                        }
                    }
                }
            }
            sh.merge(&h);
            let _ = tx.send(());
        }));
    }
    drop(done_tx);
    let limit = Duration::from_millis(args.duration_ms);
    let finished = wait_for_workers(&done_rx, workers, t0, limit);
    let elapsed = t0.elapsed();
    let ops = shared.ops.load(Ordering::Relaxed);
    let c1 = cpu_mark(&args.cpu_pids);
    shared.phase.store(STOP, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    if finished < workers {
        shared.error(&format!(
            "time limit of {limit:?} reached after {ops} of {} connections",
            args.max_count
        ));
        shared.errors.fetch_add(1, Ordering::Relaxed);
    }
    Ok(report(Shape::Churn, &shared, ops, 0, elapsed, &c0, &c1))
}

/// Opens `conns` connections over a few threads, one request each (giving
/// up on the rest after `duration_ms / 2`); prints `held N`, waits for the
/// release file (bounded by `duration_ms`), closes everything. `elapsed_s`
/// is the time to open them.
fn hold(args: &ClientArgs) -> Result<Report> {
    const OPENERS: u32 = 4;
    let open_deadline = Instant::now() + Duration::from_millis(args.duration_ms / 2);
    let release = args
        .release_file
        .clone()
        .context("hold needs --release-file")?;
    let shared = Shared::new(MEASURE);
    let t0 = Instant::now();
    let per = args.conns.div_ceil(OPENERS);
    let mut handles = Vec::new();
    for i in 0..OPENERS {
        let n = per.min(args.conns.saturating_sub(i * per));
        let sh = shared.clone();
        let a = args.clone();
        handles.push(std::thread::spawn(move || {
            let req = echo_request(a.size);
            let mut resp = vec![0u8; req.len()];
            let mut h = Histogram::new();
            let mut kept = Vec::with_capacity(n as usize);
            let mut consecutive = 0;
            while (kept.len() as u32) < n
                && consecutive < MAX_CONSECUTIVE_ERRORS
                && Instant::now() < open_deadline
            {
                let t = Instant::now();
                match connect(a.connect).and_then(|mut s| {
                    exchange(&mut s, &req, &mut resp)?;
                    Ok(s)
                }) {
                    Ok(s) => {
                        consecutive = 0;
                        h.record(t.elapsed().as_nanos() as u64);
                        sh.ops.fetch_add(1, Ordering::Relaxed);
                        kept.push(s);
                    }
                    Err(e) => {
                        consecutive += 1;
                        sh.error(&e);
                    }
                }
            }
            sh.merge(&h);
            kept
        }));
    }
    let mut kept = Vec::new();
    for h in handles {
        kept.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("an opener panicked"))?,
        );
    }
    let opened = t0.elapsed();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "held {}", kept.len())?;
        out.flush()?;
    }
    let limit = Instant::now() + Duration::from_millis(args.duration_ms);
    while !release.exists() && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(kept);
    let none = CpuMark {
        client_us: 0.0,
        others_us: 0.0,
        softirq_us: 0.0,
        ctxsw: 0,
    };
    let ops = shared.ops.load(Ordering::Relaxed);
    Ok(report(Shape::Hold, &shared, ops, 0, opened, &none, &none))
}

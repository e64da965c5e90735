//! Byte-stream checks for the same-node shortcut: a server that hashes or
//! echoes what it receives, and a client that sends a deterministic payload
//! with a chosen system call (write, writev, sendfile, splice), half-closes,
//! and verifies what comes back. Used by `mtest stream-server` and
//! `mtest stream-client`; every loop is bounded by the payload size and by
//! socket timeouts.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// How long any one read or write may block before the run fails.
/// Generous: the suite also runs under qemu's emulation (cargo xtask vm-test).
const IO_TIMEOUT: Duration = Duration::from_secs(90);

/// A blocking socket that, with `retry`, treats EAGAIN as "no data yet" and
/// waits again, as an event-loop app on a non-blocking socket does. The
/// sockmap read path (tcp_bpf_recvmsg) returns EAGAIN to a blocking read
/// woken without data; apps whose sockets join the shortcut must cope, and
/// the tests' apps for `meshlane.io/shortcut-app` do it this way. Each retry
/// blocks again (no spinning); past IO_TIMEOUT the error stands.
struct Retrying<'a> {
    s: &'a TcpStream,
    retry: bool,
}

impl Retrying<'_> {
    fn again<T>(&self, f: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
        retry_eagain(self.retry, f)
    }
}

/// Calls `f` until it does not fail with EAGAIN, if `retry` (and for at most
/// IO_TIMEOUT); otherwise once.
fn retry_eagain<T>(retry: bool, mut f: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Err(e)
                if retry
                    && e.kind() == std::io::ErrorKind::WouldBlock
                    && start.elapsed() < IO_TIMEOUT => {}
            other => return other,
        }
    }
}

impl Read for Retrying<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut s = self.s;
        self.again(|| s.read(buf))
    }
}

impl Write for Retrying<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.s;
        self.again(|| s.write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs a raw system call that returns -1 with errno, under [`retry_eagain`].
fn syscall_retrying(retry: bool, mut f: impl FnMut() -> isize) -> std::io::Result<usize> {
    retry_eagain(retry, || {
        let r = f();
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    })
}

/// FNV-1a over a stream, 64-bit.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// The deterministic payload of connection `seed`: xorshift bytes.
pub struct Payload {
    state: u64,
}

impl Payload {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        }
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let b = self.state.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

/// What the hashing server answers after the client's EOF.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Digest {
    pub bytes: u64,
    pub hash: String,
}

/// `mtest stream-server`: per connection, optionally wait `stall` before
/// reading (a peer that stops reading), then either echo every byte back
/// (`echo`) or read to EOF and answer one JSON [`Digest`] line.
pub fn serve(listen: SocketAddr, echo: bool, stall: Duration, retry_eagain: bool) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    for conn in l.incoming() {
        let Ok(sock) = conn else { continue };
        std::thread::spawn(move || {
            let _ = sock.set_read_timeout(Some(IO_TIMEOUT));
            let _ = sock.set_write_timeout(Some(IO_TIMEOUT));
            let mut s = Retrying {
                s: &sock,
                retry: retry_eagain,
            };
            std::thread::sleep(stall);
            let mut buf = vec![0u8; 256 * 1024];
            let mut d = Fnv::default();
            let mut n = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        if echo {
                            if s.write_all(&buf[..k]).is_err() {
                                return;
                            }
                        } else {
                            d.update(&buf[..k]);
                        }
                        n += k as u64;
                    }
                    Err(_) => return,
                }
            }
            if !echo {
                let line = serde_json::to_string(&Digest {
                    bytes: n,
                    hash: d.hex(),
                })
                .unwrap_or_default();
                let _ = writeln!(s, "{line}");
            }
            let _ = sock.shutdown(Shutdown::Write);
        });
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    Write,
    Writev,
    Sendfile,
    Splice,
}

#[derive(Clone, Debug)]
pub struct ClientOpts {
    pub connect: SocketAddr,
    pub conns: u32,
    pub bytes: u64,
    pub write_size: usize,
    pub method: Method,
    /// The server echoes: read everything back concurrently and compare.
    pub echo: bool,
    /// Read this many bytes of the echo, then close with the rest unread.
    pub close_after: Option<u64>,
    /// Sample how many bytes the sender had handed to the kernel after this
    /// long (a stalled peer: how much the path buffers).
    pub sample_after: Option<Duration>,
    /// Treat EAGAIN on the blocking socket as "wait again" (see [`Retrying`]).
    pub retry_eagain: bool,
}

/// What `mtest stream-client` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamResult {
    pub conns: u32,
    pub ok: u32,
    pub errors: Vec<String>,
    /// Bytes handed to the kernel by all senders at `sample_after`.
    pub sampled_sent: Option<u64>,
    pub elapsed_ms: u64,
}

pub fn client(o: &ClientOpts) -> StreamResult {
    let start = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..o.conns)
        .map(|i| {
            let o = o.clone();
            let sent = sent.clone();
            std::thread::spawn(move || one(&o, u64::from(i) + 1, &sent))
        })
        .collect();
    let sampled_sent = o.sample_after.map(|d| {
        std::thread::sleep(d);
        sent.load(Ordering::Relaxed)
    });
    let mut r = StreamResult {
        conns: o.conns,
        ok: 0,
        errors: Vec::new(),
        sampled_sent,
        elapsed_ms: 0,
    };
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => r.ok += 1,
            Ok(Err(e)) => r.errors.push(format!("conn {i}: {e:#}")),
            Err(_) => r.errors.push(format!("conn {i}: panicked")),
        }
    }
    r.elapsed_ms = start.elapsed().as_millis() as u64;
    r
}

fn one(o: &ClientOpts, seed: u64, sent: &AtomicU64) -> Result<()> {
    let s = TcpStream::connect_timeout(&o.connect, Duration::from_secs(5))
        .with_context(|| format!("connect {}", o.connect))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let reader = s.try_clone()?;
    let (bytes, echo, close_after, retry) = (o.bytes, o.echo, o.close_after, o.retry_eagain);
    // The reader runs while we write, or a full echo path would deadlock.
    let rx = std::thread::spawn(move || -> Result<(u64, Fnv, Option<Digest>)> {
        let mut r = Retrying { s: &reader, retry };
        let mut d = Fnv::default();
        let mut n = 0u64;
        if !echo {
            let mut line = String::new();
            BufReader::new(&mut r)
                .read_line(&mut line)
                .context("reading the server's digest")?;
            let dg: Digest = serde_json::from_str(line.trim())
                .with_context(|| format!("server answer {line:?}"))?;
            return Ok((0, d, Some(dg)));
        }
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let want = match close_after {
                Some(limit) if n >= limit => return Ok((n, d, None)),
                Some(limit) => ((limit - n) as usize).min(buf.len()),
                None => buf.len(),
            };
            let k = r
                .read(&mut buf[..want])
                .with_context(|| format!("reading the echo after {n} bytes"))?;
            if k == 0 {
                break;
            }
            d.update(&buf[..k]);
            n += k as u64;
        }
        Ok((n, d, None))
    });
    let mut sent_hash = Fnv::default();
    let write_result = send(&s, o, seed, &mut sent_hash, sent).context("sending");
    if o.close_after.is_some() {
        // Close with unread data: the reader stops early and we drop the
        // socket; the rest of the stream is not ours to check.
        let _ = rx.join();
        drop(s);
        return Ok(());
    }
    write_result?;
    s.shutdown(Shutdown::Write)?;
    let (n, got, digest) = rx
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    match digest {
        Some(dg) => {
            if dg.bytes != bytes || dg.hash != sent_hash.hex() {
                bail!(
                    "server received {} bytes hash {}, sent {bytes} hash {}",
                    dg.bytes,
                    dg.hash,
                    sent_hash.hex()
                );
            }
        }
        None => {
            if n != bytes || got.hex() != sent_hash.hex() {
                bail!(
                    "echo: got {n} bytes hash {}, sent {bytes} hash {}",
                    got.hex(),
                    sent_hash.hex()
                );
            }
        }
    }
    Ok(())
}

fn send(s: &TcpStream, o: &ClientOpts, seed: u64, hash: &mut Fnv, sent: &AtomicU64) -> Result<()> {
    let mut payload = Payload::new(seed);
    let mut buf = vec![0u8; o.write_size.max(1)];
    let fd = s.as_raw_fd();
    // sendfile needs a file: the payload, written once per connection.
    let file = if o.method == Method::Sendfile {
        let mut f = tempfile_in_cwd(seed)?;
        let mut left = o.bytes;
        let mut p = Payload::new(seed);
        while left > 0 {
            let k = (left as usize).min(buf.len());
            p.fill(&mut buf[..k]);
            f.write_all(&buf[..k])?;
            left -= k as u64;
        }
        Some(f)
    } else {
        None
    };
    let (pipe_r, pipe_w) = if o.method == Method::Splice {
        let mut fds = [0i32; 2];
        // SAFETY: a fresh two-element array for pipe(2).
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("pipe");
        }
        (fds[0], fds[1])
    } else {
        (-1, -1)
    };
    let _close_pipe = PipeGuard(pipe_r, pipe_w);
    let mut left = o.bytes;
    let mut offset: libc::off_t = 0;
    while left > 0 {
        let k = (left as usize).min(buf.len());
        payload.fill(&mut buf[..k]);
        hash.update(&buf[..k]);
        match o.method {
            Method::Write => write_all_fd(fd, &buf[..k], o.retry_eagain)?,
            Method::Writev => writev_all(fd, &buf[..k], o.retry_eagain)?,
            Method::Sendfile => {
                let f = file.as_ref().expect("file");
                let mut done = 0usize;
                while done < k {
                    // SAFETY: valid fds and an offset we own.
                    let r = syscall_retrying(o.retry_eagain, || unsafe {
                        libc::sendfile(fd, f.as_raw_fd(), &mut offset, k - done)
                    })
                    .context("sendfile")?;
                    if r == 0 {
                        bail!("sendfile returned 0 with {} bytes left", k - done);
                    }
                    done += r;
                }
            }
            Method::Splice => {
                // Through a pipe in pieces the pipe holds (64 KiB by default).
                for piece in buf[..k].chunks(32 * 1024) {
                    write_all_fd(pipe_w, piece, false)?;
                    let mut moved = 0usize;
                    while moved < piece.len() {
                        // SAFETY: valid fds; null offsets for pipe and socket.
                        let r = syscall_retrying(o.retry_eagain, || unsafe {
                            libc::splice(
                                pipe_r,
                                std::ptr::null_mut(),
                                fd,
                                std::ptr::null_mut(),
                                piece.len() - moved,
                                libc::SPLICE_F_MOVE,
                            )
                        })
                        .context("splice")?;
                        if r == 0 {
                            bail!("splice returned 0 with {} bytes left", piece.len() - moved);
                        }
                        moved += r;
                    }
                }
            }
        }
        sent.fetch_add(k as u64, Ordering::Relaxed);
        left -= k as u64;
    }
    Ok(())
}

struct PipeGuard(i32, i32);
impl Drop for PipeGuard {
    fn drop(&mut self) {
        for fd in [self.0, self.1] {
            if fd >= 0 {
                // SAFETY: our own pipe fds, closed once.
                unsafe { libc::close(fd) };
            }
        }
    }
}

fn tempfile_in_cwd(seed: u64) -> Result<std::fs::File> {
    let path =
        std::env::current_dir()?.join(format!("stream-payload-{}-{seed}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    // Unlinked at once: gone with the last fd, on every exit path.
    std::fs::remove_file(&path)?;
    Ok(f)
}

fn write_all_fd(fd: i32, mut data: &[u8], retry: bool) -> Result<()> {
    while !data.is_empty() {
        // SAFETY: writing from a live slice.
        let r = syscall_retrying(retry, || unsafe {
            libc::write(fd, data.as_ptr().cast(), data.len())
        })
        .with_context(|| format!("write of {} bytes", data.len()))?;
        if r == 0 {
            bail!("write of {} bytes returned 0", data.len());
        }
        data = &data[r..];
    }
    Ok(())
}

/// Sends `data` as three iovecs of uneven sizes per call.
fn writev_all(fd: i32, mut data: &[u8], retry: bool) -> Result<()> {
    while !data.is_empty() {
        let a = (data.len() / 7).max(1).min(data.len());
        let b = ((data.len() - a) / 2).min(data.len() - a);
        let iov = [
            libc::iovec {
                iov_base: data.as_ptr() as *mut _,
                iov_len: a,
            },
            libc::iovec {
                iov_base: data[a..].as_ptr() as *mut _,
                iov_len: b,
            },
            libc::iovec {
                iov_base: data[a + b..].as_ptr() as *mut _,
                iov_len: data.len() - a - b,
            },
        ];
        // SAFETY: the iovecs point into the live slice.
        let r = syscall_retrying(retry, || unsafe { libc::writev(fd, iov.as_ptr(), 3) })
            .context("writev")?;
        if r == 0 {
            bail!("writev returned 0");
        }
        data = &data[r..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_deterministic_and_seeded() {
        let (mut a, mut b, mut c) = (Payload::new(1), Payload::new(1), Payload::new(2));
        let (mut x, mut y, mut z) = ([0u8; 100], [0u8; 100], [0u8; 100]);
        a.fill(&mut x);
        b.fill(&mut y);
        c.fill(&mut z);
        assert_eq!(x, y);
        assert_ne!(x, z);
    }
}

//! `mbench server`: the application at the far end of the mesh path. It
//! answers echo connections request by request and counts sink connections'
//! bytes (see [`super::proto`]).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::proto::{Kind, HEADER_LEN};

/// Read size of a sink connection.
const SINK_CHUNK: usize = 256 * 1024;

pub async fn serve(listen: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the bench server to {listen}"))?;
    println!("ready");
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                tokio::spawn(async move {
                    if let Err(e) = conn(s).await {
                        // Resets at the end of a run are normal; anything
                        // else names what broke.
                        if !matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::BrokenPipe
                                | std::io::ErrorKind::UnexpectedEof
                        ) {
                            eprintln!("mbench server: {e}");
                        }
                    }
                });
            }
            Err(e) => {
                eprintln!("mbench server: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

async fn conn(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut header = [0u8; HEADER_LEN];
    s.read_exact(&mut header).await?;
    let kind = Kind::parse(&header)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    match kind {
        Kind::Echo(size) => {
            let mut buf = vec![0u8; size as usize];
            buf[..HEADER_LEN].copy_from_slice(&header);
            s.read_exact(&mut buf[HEADER_LEN..]).await?;
            loop {
                s.write_all(&buf).await?;
                // A close between requests is the normal end.
                match s.read_exact(&mut buf).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        Kind::Sink => {
            let mut total = HEADER_LEN as u64;
            let mut buf = vec![0u8; SINK_CHUNK];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_le_bytes()).await?;
            s.shutdown().await
        }
    }
}

/// First byte of a datagram the UDP server drops without answering (the
/// UDP send-rate shape).
pub const UDP_DISCARD: u8 = b'D';

/// `mbench udp-server`: answers each datagram with the same bytes but the
/// first replaced by `tag`, so the client can tell who answered (the DNS
/// proxy stand-in or the "DNS server" it was addressed to); datagrams
/// starting with [`UDP_DISCARD`] are dropped. One blocking thread: a
/// datagram costs one recvfrom and one sendto, the same in every mode.
pub fn serve_udp(listen: SocketAddr, tag: u8) -> Result<()> {
    let s = std::net::UdpSocket::bind(listen)
        .with_context(|| format!("binding the UDP server to {listen}"))?;
    println!("ready");
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, peer) = match s.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("UDP server recvfrom"),
        };
        if n == 0 || buf[0] == UDP_DISCARD {
            continue;
        }
        buf[0] = tag;
        // A full socket buffer at the peer loses the answer; the client
        // counts that as an error of its own.
        let _ = s.send_to(&buf[..n], peer);
    }
}

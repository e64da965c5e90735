//! The JSON lines `mtest` writes, as serde types both the binary and the tests use,
//! so a format change breaks the build instead of silently breaking assertions.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};

/// One line of `mtest sidecar --log FILE`: one accepted connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarRecord {
    /// The listener port that accepted it (15001 outbound, 15006 inbound by default).
    pub listener: u16,
    /// Client address as the proxy saw it.
    pub peer: String,
    /// Local address of the accepted socket (after REDIRECT: 127.0.0.1:15001 etc.).
    pub local: String,
    /// Address family of the accepted socket: "inet", or "inet6" (also for
    /// an IPv4 client of a dual-stack listener). Empty in older logs.
    #[serde(default)]
    pub family: String,
    /// getsockopt(SOL_IP, SO_ORIGINAL_DST), or null when it failed.
    pub orig_dst: Option<String>,
    pub orig_dst_error: Option<String>,
    /// getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST), asked on AF_INET6 sockets
    /// only (an IPv4-mapped answer is written as IPv4, like every address
    /// here), or null when it failed or was not asked.
    #[serde(default)]
    pub orig_dst6: Option<String>,
    #[serde(default)]
    pub orig_dst6_error: Option<String>,
    /// Local address of the proxy's upstream socket, when the connect succeeded.
    pub upstream_local: Option<String>,
    /// Why the upstream leg failed ("loop" when it would have reached the proxy itself).
    pub upstream_error: Option<String>,
}

/// What `mtest server` replies: one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerReply {
    pub server: String,
    /// The server's accepted-socket local address (what the client reached).
    pub local: String,
    /// The client address as the server saw it.
    pub peer: String,
    /// The request line without its newline.
    pub request: String,
}

/// What `mtest probe` prints: one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub connected: bool,
    pub error: Option<String>,
    /// Symbolic errno of `error` when it came from the kernel ("ECONNREFUSED").
    #[serde(default)]
    pub errno: Option<String>,
    pub local: Option<String>,
    pub peer: Option<String>,
    /// The client socket's family ("inet" or "inet6"); absent in older output.
    #[serde(default)]
    pub family: Option<String>,
    /// The reply when it is an `mtest server` reply; other JSON objects (another
    /// server's) are only in `reply_raw`.
    #[serde(default, deserialize_with = "lenient_reply")]
    pub reply: Option<ServerReply>,
    pub reply_raw: Option<String>,
}

fn lenient_reply<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<ServerReply>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(v.and_then(|v| serde_json::from_value(v).ok()))
}

impl ProbeResult {
    /// Parses the probe's stdout (the last non-empty line, so stray output before it
    /// does not matter).
    pub fn parse(stdout: &str) -> Result<ProbeResult> {
        let line = last_line(stdout)
            .with_context(|| format!("probe printed no JSON line; stdout was {stdout:?}"))?;
        serde_json::from_str(line).with_context(|| format!("parsing probe output {line:?}"))
    }

    /// [`ProbeResult::parse`], or a failed connection whose error holds the
    /// output (a probe that did not run counts as a failure under load).
    pub fn parse_or_failed(stdout: &str) -> ProbeResult {
        Self::parse(stdout).unwrap_or_else(|_| ProbeResult {
            connected: false,
            error: Some(format!("probe failed to run: {stdout}")),
            errno: None,
            local: None,
            peer: None,
            family: None,
            reply: None,
            reply_raw: None,
        })
    }
}

/// What `mtest udp-probe` prints: one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UdpProbeResult {
    /// "connected" (connect, send, recvfrom) or "unconnected" (sendto from an
    /// unbound socket, recvfrom).
    pub mode: String,
    /// The socket's family: "inet" or "inet6".
    pub family: String,
    /// connect() succeeded (connected mode only).
    pub connected: bool,
    /// The datagram was sent.
    pub sent: bool,
    pub error: Option<String>,
    /// Symbolic errno of `error` when it came from the kernel.
    pub errno: Option<String>,
    /// getpeername() after connect() (connected mode).
    pub peer: Option<String>,
    /// getsockname() after the send.
    pub local: Option<String>,
    /// The reply's payload.
    pub reply: Option<String>,
    /// The reply's source address as recvfrom() returned it.
    pub reply_from: Option<String>,
}

impl UdpProbeResult {
    /// Parses the probe's stdout (its last non-empty line).
    pub fn parse(stdout: &str) -> Result<UdpProbeResult> {
        let line = last_line(stdout)
            .with_context(|| format!("udp-probe printed no JSON line; stdout was {stdout:?}"))?;
        serde_json::from_str(line).with_context(|| format!("parsing udp-probe output {line:?}"))
    }
}

/// What the sidecar's DNS-proxy stand-in answers to a datagram `payload`
/// from `peer` (as `fmt_addr` writes it): tests recognise the proxy by it.
pub fn dns_proxy_reply(payload: &str, peer: &str) -> String {
    format!("{DNS_PROXY_REPLY_PREFIX}{payload} from {peer}")
}

/// The start of every reply of the DNS-proxy stand-in.
pub const DNS_PROXY_REPLY_PREFIX: &str = "dns-proxy got ";

/// One getsockopt report of `mtest sockopts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockoptRecord {
    pub name: String,
    pub level: i32,
    pub optname: i32,
    pub buflen: u32,
    pub rc: i32,
    pub errno: i32,
    pub optlen: u32,
    pub data_hex: String,
}

impl SockoptRecord {
    /// Parses `mtest sockopts` stdout (a JSON array on the last non-empty line).
    pub fn parse_list(stdout: &str) -> Result<Vec<SockoptRecord>> {
        let line = last_line(stdout)
            .with_context(|| format!("sockopts printed no JSON line; stdout was {stdout:?}"))?;
        serde_json::from_str(line).with_context(|| format!("parsing sockopts output {line:?}"))
    }
}

fn last_line(s: &str) -> Option<&str> {
    s.lines().rev().map(str::trim).find(|l| !l.is_empty())
}

/// Reads every complete record of a sidecar log. A missing file means no
/// connection yet, so it is an empty list; an unparsable line is skipped, because
/// the sidecar may be half way through appending it.
pub fn read_sidecar_log(path: &Path) -> Vec<SidecarRecord> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Polls the sidecar log until a record matches `pred`, for up to `timeout`.
pub fn wait_sidecar_record(
    path: &Path,
    timeout: Duration,
    pred: impl Fn(&SidecarRecord) -> bool,
) -> Result<SidecarRecord> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(r) = read_sidecar_log(path).into_iter().find(&pred) {
            return Ok(r);
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "no matching sidecar record in {} after {:?}; log holds {:?}",
                path.display(),
                timeout,
                read_sidecar_log(path)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to 3 s) for the record of the connection whose client address is `peer`.
pub fn wait_sidecar_peer(path: &Path, peer: &str) -> Result<SidecarRecord> {
    wait_sidecar_record(path, Duration::from_secs(3), |r| r.peer == peer)
        .with_context(|| format!("waiting for a sidecar record with peer {peer}"))
}

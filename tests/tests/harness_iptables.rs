//! Proves the harness against the real thing meshlane replaces: Istio's own
//! iptables rules (shared/data/istio-cni-goldens/basic.rules) loaded into a pod
//! namespace, with `mtest sidecar` as the proxy. meshlane must later produce the
//! same observations without the rules.

use anyhow::{Context, Result};
use meshlane_tests::{
    data_dir, read_sidecar_log, wait_sidecar_peer, Pod, ProbeResult, Proc, Sandbox, SockoptRecord,
    APP_UID, INBOUND_PORT, OUTBOUND_PORT, PROXY_UID,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

const READY: Duration = Duration::from_secs(10);

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

/// A sandbox with app server in "b" and a meshed "a" (sidecar + Istio rules).
struct Meshed {
    sb: Sandbox,
    a: Pod,
    b: Pod,
    log: PathBuf,
    // Held so the processes live as long as the test; dropped before `sb`
    // (field order), though the sandbox would kill them anyway.
    _procs: Vec<Proc>,
}

fn meshed(tag: &str) -> Result<Meshed> {
    let mut sb = Sandbox::new(tag)?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let mut server = sb.spawn(
        &b,
        0,
        0,
        mtest(),
        &["server", "--name", "b", "--listen", "0.0.0.0:9080"],
    )?;
    server.wait_ready(READY)?;
    let mut app_a = sb.spawn(
        &a,
        0,
        0,
        mtest(),
        &["server", "--name", "a", "--listen", "0.0.0.0:9080"],
    )?;
    app_a.wait_ready(READY)?;
    let log = sb.dir().join("sidecar-a.jsonl");
    let log_s = log.to_str().context("log path is UTF-8")?.to_string();
    let mut sidecar = sb.spawn(
        &a,
        PROXY_UID,
        PROXY_UID,
        mtest(),
        &["sidecar", "--log", &log_s],
    )?;
    sidecar.wait_ready(READY)?;
    let rules = data_dir().join("istio-cni/basic.rules");
    sb.iptables_restore(&a, &rules, false)?;
    Ok(Meshed {
        sb,
        a,
        b,
        log,
        _procs: vec![server, app_a, sidecar],
    })
}

fn probe(m: &Meshed, uid: u32, target: &str) -> Result<ProbeResult> {
    probe_from(m, &m.a, uid, target)
}

fn probe_from(m: &Meshed, pod: &Pod, uid: u32, target: &str) -> Result<ProbeResult> {
    let out =
        m.sb.run(pod, uid, uid, mtest(), &["probe", "--connect", target])?;
    ProbeResult::parse(&out)
}

#[test]
fn app_traffic_goes_through_sidecar() -> Result<()> {
    let m = meshed("iptapp")?;
    let target = format!("{}:9080", m.b.ip);
    let r = probe(&m, APP_UID, &target)?;
    assert!(r.connected, "probe failed: {r:?}");
    let reply = r
        .reply
        .as_ref()
        .unwrap_or_else(|| panic!("no reply: {r:?}"));
    assert_eq!(reply.server, "b");
    assert_eq!(reply.request, "hello");
    // The client still believes it talks to b directly.
    assert_eq!(r.peer.as_deref(), Some(target.as_str()));

    let local = r
        .local
        .clone()
        .expect("connected probe has a local address");
    let rec = wait_sidecar_peer(&m.log, &local)?;
    eprintln!("DEMO {r:?}\nDEMO {}", std::fs::read_to_string(&m.log)?);
    assert_eq!(rec.listener, OUTBOUND_PORT, "{rec:?}");
    assert_eq!(rec.orig_dst.as_deref(), Some(target.as_str()), "{rec:?}");
    assert_eq!(rec.local, format!("127.0.0.1:{OUTBOUND_PORT}"), "{rec:?}");
    assert_eq!(rec.upstream_error, None, "{rec:?}");
    // b saw the sidecar's upstream connection, from a's address.
    let b_peer: std::net::SocketAddr = reply.peer.parse()?;
    assert_eq!(b_peer.ip(), std::net::IpAddr::V4(m.a.ip), "{reply:?}");
    assert_eq!(rec.upstream_local.as_deref(), Some(reply.peer.as_str()));
    Ok(())
}

#[test]
fn proxy_uid_traffic_goes_direct() -> Result<()> {
    let m = meshed("iptproxy")?;
    let target = format!("{}:9080", m.b.ip);
    let r = probe(&m, PROXY_UID, &target)?;
    assert!(r.connected, "probe failed: {r:?}");
    let reply = r
        .reply
        .as_ref()
        .unwrap_or_else(|| panic!("no reply: {r:?}"));
    assert_eq!(reply.server, "b");
    // b saw the probe's own socket: no proxy in between.
    assert_eq!(Some(reply.peer.as_str()), r.local.as_deref());
    // A captured connection is logged before any byte is forwarded, so by now
    // a record would exist.
    let log = read_sidecar_log(&m.log);
    assert!(log.is_empty(), "sidecar saw traffic: {log:?}");
    Ok(())
}

#[test]
fn inbound_traffic_goes_through_sidecar() -> Result<()> {
    let m = meshed("iptin")?;
    let target = format!("{}:9080", m.a.ip);
    // b has no rules; a's PREROUTING sends the connection to the sidecar's 15006.
    let r = probe_from(&m, &m.b, APP_UID, &target)?;
    assert!(r.connected, "probe failed: {r:?}");
    let reply = r
        .reply
        .as_ref()
        .unwrap_or_else(|| panic!("no reply: {r:?}"));
    assert_eq!(reply.server, "a");
    let local = r
        .local
        .clone()
        .expect("connected probe has a local address");
    let rec = wait_sidecar_peer(&m.log, &local)?;
    eprintln!("DEMO {r:?}\nDEMO {}", std::fs::read_to_string(&m.log)?);
    assert_eq!(rec.listener, INBOUND_PORT, "{rec:?}");
    assert_eq!(rec.orig_dst.as_deref(), Some(target.as_str()), "{rec:?}");
    // Envoy-style passthrough: the app sees 127.0.0.6, which the rules exempt.
    let up = rec
        .upstream_local
        .clone()
        .unwrap_or_else(|| panic!("{rec:?}"));
    assert!(up.starts_with("127.0.0.6:"), "{rec:?}");
    assert_eq!(reply.peer, up);
    assert_eq!(reply.local, target);
    Ok(())
}

#[test]
fn sidecar_refuses_to_loop() -> Result<()> {
    let m = meshed("iptloop")?;
    // An app connecting to the pod's own IP is not captured (rule "-o lo ! uid
    // 1337 RETURN"), so it reaches the sidecar's 15001 unredirected: conntrack
    // reports the listener itself as the original destination.
    let target = format!("{}:{OUTBOUND_PORT}", m.a.ip);
    let r = probe(&m, APP_UID, &target)?;
    assert!(r.connected, "{r:?}");
    assert!(r.reply.is_none(), "{r:?}");
    let local = r
        .local
        .clone()
        .expect("connected probe has a local address");
    let rec = wait_sidecar_peer(&m.log, &local)?;
    eprintln!("DEMO {r:?}\nDEMO {}", std::fs::read_to_string(&m.log)?);
    match rec.orig_dst_error {
        Some(_) => assert_eq!(rec.orig_dst, None, "{rec:?}"),
        None => assert_eq!(rec.upstream_error.as_deref(), Some("loop"), "{rec:?}"),
    }
    Ok(())
}

#[test]
fn sandbox_cleans_up_even_with_live_processes() -> Result<()> {
    let mut sb = Sandbox::new("cleanup")?;
    let a = sb.add_pod("a")?;
    let mut p = sb
        .spawn(
            &a,
            APP_UID,
            APP_UID,
            mtest(),
            &["server", "--name", "x", "--listen", "0.0.0.0:1"],
        )
        .and_then(|mut p| p.wait_ready(READY).map(|_| p));
    // Port 1 needs root: the spawn itself must honour the uid.
    assert!(p.is_err(), "uid {APP_UID} bound a privileged port");
    p = sb.spawn(
        &a,
        APP_UID,
        APP_UID,
        mtest(),
        &["server", "--name", "x", "--listen", "0.0.0.0:8080"],
    );
    let mut proc = p?;
    proc.wait_ready(READY)?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", proc.pid()))?;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("1000")),
        "{status}"
    );
    let cgroup = sb.cgroup().to_path_buf();
    let procs = std::fs::read_to_string(a.cgroup.join("cgroup.procs"))?;
    assert!(
        procs.lines().any(|l| l.trim() == proc.pid().to_string()),
        "{procs}"
    );
    let netns = vec![sb.node_netns().to_string(), a.netns.clone()];
    // The sandbox goes first, while the process still runs.
    drop(sb);
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    for ns in netns {
        assert!(
            !Path::new("/run/netns").join(&ns).exists(),
            "netns {ns} left behind"
        );
    }
    drop(proc);
    Ok(())
}

#[test]
fn refused_connection_is_reported() -> Result<()> {
    let m = meshed("iptrefuse")?;
    // uid 1337 is not captured, so this reaches b, where nothing listens on 9999.
    let r = probe(&m, PROXY_UID, &format!("{}:9999", m.b.ip))?;
    assert!(!r.connected, "{r:?}");
    assert_eq!(r.errno.as_deref(), Some("ECONNREFUSED"), "{r:?}");
    assert!(
        r.error.as_deref().unwrap_or("").contains("refused"),
        "{r:?}"
    );
    Ok(())
}

#[test]
fn sockopts_report_parses() -> Result<()> {
    let mut sb = Sandbox::new("sockopts")?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let mut server = sb.spawn(
        &b,
        0,
        0,
        mtest(),
        &["server", "--name", "b", "--listen", "0.0.0.0:9080"],
    )?;
    server.wait_ready(READY)?;
    let target = format!("{}:9080", b.ip);

    let out = sb.run(
        &a,
        APP_UID,
        APP_UID,
        mtest(),
        &["sockopts", "--connect", &target],
    )?;
    eprintln!("DEMO {out}");
    let recs = SockoptRecord::parse_list(&out)?;
    assert_eq!(recs.len(), 8, "{recs:?}");
    let so_type = &recs[1];
    assert_eq!((so_type.name.as_str(), so_type.rc), ("SO_TYPE", 0));
    assert_eq!(so_type.data_hex, "01000000", "SOCK_STREAM");
    let tcp_info = &recs[3];
    assert_eq!(tcp_info.rc, 0);
    assert_eq!(&tcp_info.data_hex[..2], "01", "TCP_ESTABLISHED");
    assert!(
        recs[5].rc != 0,
        "SO_ORIGINAL_DST on a plain socket: {:?}",
        recs[5]
    );

    // With a few legacy rules in a's namespace, the two iptables-legacy calls
    // succeed and the entries buffer is header + info.size exactly.
    let rules = sb.dir().join("legacy.rules");
    std::fs::write(
        &rules,
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         -A OUTPUT -p tcp --dport 1 -j ACCEPT\n-A OUTPUT -p tcp --dport 2 -j ACCEPT\nCOMMIT\n",
    )?;
    sb.iptables_restore(&a, &rules, true)?;
    let out = sb.run(
        &a,
        0,
        0,
        mtest(),
        &["sockopts", "--connect", &target, "--legacy-iptables"],
    )?;
    eprintln!("DEMO {out}");
    let recs = SockoptRecord::parse_list(&out)?;
    assert_eq!(recs.len(), 10, "{recs:?}");
    let (info, entries) = (&recs[8], &recs[9]);
    assert_eq!(
        (info.name.as_str(), info.rc, info.optlen),
        ("IPT_SO_GET_INFO", 0, 84)
    );
    assert_eq!(entries.rc, 0, "{entries:?}");
    assert_eq!(entries.data_hex.len(), 2 * entries.buflen as usize);
    assert!(entries.buflen > 40, "{entries:?}");
    Ok(())
}

#[test]
fn stale_sweep_leaves_live_sandboxes_alone() -> Result<()> {
    let mut sb = Sandbox::new("sweep")?;
    let a = sb.add_pod("a")?;
    // Our own sandbox holds its lock, so the sweep must not touch it.
    meshlane_tests::cleanup_stale()?;
    assert!(Path::new("/run/netns").join(&a.netns).exists());
    assert!(sb.cgroup().exists());
    Ok(())
}

#[test]
fn mtest_bin_finds_this_build() {
    if std::env::var_os("MESHLANE_MTEST").is_none() {
        let found = meshlane_tests::mtest_bin().canonicalize().unwrap();
        assert_eq!(found, mtest().canonicalize().unwrap());
    }
}

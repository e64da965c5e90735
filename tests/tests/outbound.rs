//! Outbound interception by the real agent and kernel programs, in network
//! namespaces: decision-table rows 1-8, the outbound annotations, pod removal,
//! pods-file reload, bad input, and getsockopt pass-through.
//!
//! Every test builds its own sandbox (node netns, pods, a cgroup of its own the
//! programs attach to) and its own bpffs directory; guards remove all of it.

use std::{path::Path, time::Duration};

use anyhow::Result;
use meshlane_tests::{
    pod_entry, pod_state, read_sidecar_log, Agent, Pod, PodSpec, ProbeResult, Proc, Sandbox,
    SidecarRecord, SockoptRecord, APP_UID, PROXY_UID,
};

const READY: Duration = Duration::from_secs(10);

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

/// Pod "a" (meshed: app server on 9080 and 15008, sidecar as uid 1337),
/// pod "b" (server on 9080, 9081; not meshed in these outbound tests, so a
/// connection that reaches it shows what left pod a; inbound capture has its
/// own tests), pod "c" (not meshed, server on 9080).
struct Node {
    sb: Sandbox,
    a: Pod,
    b: Pod,
    c: Pod,
    log: std::path::PathBuf,
    _procs: Vec<Proc>,
}

fn node(tag: &str) -> Result<Node> {
    let mut sb = Sandbox::new(tag)?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let c = sb.add_pod("c")?;
    let mut procs = vec![
        sb.start_server(&a, "a", &["0.0.0.0:9080", "0.0.0.0:15008"])?,
        sb.start_server(&b, "b", &["0.0.0.0:9080", "0.0.0.0:9081"])?,
        sb.start_server(&c, "c", &["0.0.0.0:9080"])?,
    ];
    let log = sb.sidecar_log(&a);
    procs.push(sb.start_sidecar(&a)?);
    Ok(Node {
        sb,
        a,
        b,
        c,
        log,
        _procs: procs,
    })
}

impl Node {
    fn default_pods(&self) -> Vec<PodSpec> {
        vec![
            PodSpec::meshed(&self.a),
            PodSpec::plain(&self.b),
            PodSpec::plain(&self.c),
        ]
    }

    fn probe(&self, uid: u32, gid: u32, to: &str, bind: Option<&str>) -> ProbeResult {
        let mut args = vec!["probe", "--connect", to];
        if let Some(b) = bind {
            args.extend(["--bind", b]);
        }
        let out = self
            .sb
            .run(&self.a, uid, gid, mtest(), &args)
            .expect("probe ran");
        ProbeResult::parse(&out).expect("probe output")
    }

    fn record_for(&self, p: &ProbeResult) -> Option<SidecarRecord> {
        let local = p.local.as_deref()?;
        read_sidecar_log(&self.log)
            .into_iter()
            .find(|r| r.peer == local)
    }
}

fn ip_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(addr)
}

/// The connection reached the sidecar on `listener` with original destination
/// `orig`, and the app saw the address it dialled.
#[track_caller]
fn assert_captured(
    n: &Node,
    p: &ProbeResult,
    listener: u16,
    orig: &str,
    what: &str,
) -> SidecarRecord {
    assert!(p.connected, "{what}: not connected: {p:?}");
    let rec = n.record_for(p).unwrap_or_else(|| {
        panic!(
            "{what}: no sidecar record for {:?}; log: {:?}",
            p.local,
            read_sidecar_log(&n.log)
        )
    });
    assert_eq!(
        rec.listener, listener,
        "{what}: landed on the wrong listener: {rec:?}"
    );
    assert_eq!(
        rec.orig_dst.as_deref(),
        Some(orig),
        "{what}: original destination: {rec:?}"
    );
    assert_eq!(
        p.peer.as_deref(),
        Some(orig),
        "{what}: the app's getpeername() must show what it dialled"
    );
    rec
}

/// The connection went straight to `server` (no sidecar in between).
#[track_caller]
fn assert_direct(n: &Node, p: &ProbeResult, server: &str, what: &str) {
    assert!(p.connected, "{what}: not connected: {p:?}");
    assert!(
        n.record_for(p).is_none(),
        "{what}: went through the sidecar: {:?}",
        n.record_for(p)
    );
    let reply = p
        .reply
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no reply: {p:?}"));
    assert_eq!(reply.server, server, "{what}: reached the wrong server");
    assert_eq!(
        Some(reply.peer.as_str()),
        p.local.as_deref(),
        "{what}: server saw another peer than the app's socket"
    );
}

#[test]
fn decision_table_rows_1_to_8() -> Result<()> {
    let n = node("rows")?;
    let _agent = Agent::start(&n.sb, &n.default_pods())?;
    let (a, b) = (n.a.ip.to_string(), n.b.ip.to_string());
    let b9080 = format!("{b}:9080");
    let a9080 = format!("{a}:9080");

    // Row 1: the seed flow. App in A dials B:9080; it lands on A's sidecar at
    // 15001 with original destination B:9080, from A's IP (not 127.0.0.1).
    let p = n.probe(APP_UID, APP_UID, &b9080, None);
    let rec = assert_captured(&n, &p, 15001, &b9080, "row 1");
    assert_eq!(
        ip_of(&rec.peer),
        a,
        "row 1: the proxy must see the pod IP as source"
    );
    assert_eq!(rec.local, "127.0.0.1:15001");
    let reply = p.reply.as_ref().expect("row 1: forwarded reply");
    assert_eq!(reply.server, "b");
    assert_eq!(
        ip_of(&reply.peer),
        a,
        "row 1: b sees a's IP (the sidecar's upstream)"
    );
    assert_eq!(Some(reply.peer.as_str()), rec.upstream_local.as_deref());

    // Row 2: app to its own pod IP and to loopback: untouched.
    assert_direct(
        &n,
        &n.probe(APP_UID, APP_UID, &a9080, None),
        "a",
        "row 2 pod ip",
    );
    assert_direct(
        &n,
        &n.probe(APP_UID, APP_UID, "127.0.0.1:9080", None),
        "a",
        "row 2 127.0.0.1",
    );
    assert_direct(
        &n,
        &n.probe(APP_UID, APP_UID, "127.0.0.5:9080", None),
        "a",
        "row 2 127.0.0.5",
    );

    // Row 3: the proxy's own upstream connections: untouched.
    assert_direct(
        &n,
        &n.probe(PROXY_UID, PROXY_UID, &b9080, None),
        "b",
        "row 3",
    );

    // Row 4: proxy to its own pod (not 127.0.0.1, not 15008): inbound listener.
    let p = n.probe(PROXY_UID, PROXY_UID, &a9080, None);
    let rec = assert_captured(&n, &p, 15006, &a9080, "row 4 pod ip");
    assert_eq!(
        ip_of(&rec.peer),
        a,
        "row 4: source is the pod IP the kernel chose"
    );
    let reply = p
        .reply
        .as_ref()
        .expect("row 4: reply through the inbound path");
    assert_eq!(
        (reply.server.as_str(), ip_of(&reply.peer)),
        ("a", "127.0.0.6"),
        "row 4: app reached from 127.0.0.6"
    );
    let p = n.probe(PROXY_UID, PROXY_UID, "127.0.0.5:9080", None);
    let rec = assert_captured(&n, &p, 15006, "127.0.0.5:9080", "row 4 127.0.0.5");
    assert_eq!(
        ip_of(&rec.peer),
        "127.0.0.1",
        "row 4: source 127.0.0.1 for 127.x"
    );
    // Istio's istio-validation probe.
    let p = n.probe(PROXY_UID, PROXY_UID, "127.0.0.6:15002", None);
    assert_captured(&n, &p, 15006, "127.0.0.6:15002", "istio-validation");

    // Row 5: proxy to 127.0.0.1: untouched.
    assert_direct(
        &n,
        &n.probe(PROXY_UID, PROXY_UID, "127.0.0.1:9080", None),
        "a",
        "row 5",
    );
    // Row 6: proxy to its pod IP on the HBONE port: untouched.
    assert_direct(
        &n,
        &n.probe(PROXY_UID, PROXY_UID, &format!("{a}:15008"), None),
        "a",
        "row 6",
    );
    // Row 7: a socket bound to 127.0.0.6 reaching a local address: untouched.
    let p = n.probe(PROXY_UID, PROXY_UID, &a9080, Some("127.0.0.6"));
    assert_direct(&n, &p, "a", "row 7 proxy");
    let p = n.probe(APP_UID, APP_UID, &a9080, Some("127.0.0.6"));
    assert_direct(&n, &p, "a", "row 7 app");
    // Row 8: gid of the proxy without its uid: untouched, never to 15006.
    assert_direct(
        &n,
        &n.probe(APP_UID, PROXY_UID, &b9080, None),
        "b",
        "row 8 remote",
    );
    assert_direct(
        &n,
        &n.probe(APP_UID, PROXY_UID, &a9080, None),
        "a",
        "row 8 own pod",
    );

    // Default exclusion: 15020 from the app is untouched (refused: nothing listens).
    let p = n.probe(APP_UID, APP_UID, &format!("{b}:15020"), None);
    assert!(
        !p.connected && n.record_for(&p).is_none(),
        "15020 must not be captured: {p:?}"
    );

    // A pod that is not meshed is never touched.
    let out = n.sb.run(
        &n.c,
        APP_UID,
        APP_UID,
        mtest(),
        &["probe", "--connect", &b9080],
    )?;
    let p = ProbeResult::parse(&out)?;
    assert_eq!(p.reply.as_ref().map(|r| r.server.as_str()), Some("b"));
    assert_eq!(
        p.reply.as_ref().map(|r| r.peer.clone()),
        p.local,
        "plain pod c reaches b directly"
    );
    Ok(())
}

#[test]
fn annotations_reload_removal_and_bad_input() -> Result<()> {
    let n = node("annot")?;
    let (b, c) = (n.b.ip.to_string(), n.c.ip.to_string());
    let mut agent = Agent::start(&n.sb, &n.default_pods())?;
    let b9080 = format!("{b}:9080");

    // Captured by default.
    assert_captured(
        &n,
        &n.probe(APP_UID, APP_UID, &b9080, None),
        15001,
        &b9080,
        "default",
    );

    // Reload: exclude b's address and port 9081 toward c... applied within a second.
    let annotated = vec![
        PodSpec::meshed(&n.a)
            .annotate(
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                &format!("{b}/32"),
            )
            .annotate("traffic.sidecar.istio.io/excludeOutboundPorts", "9081"),
        PodSpec::plain(&n.b),
        PodSpec::plain(&n.c),
    ];
    agent.write_pods(&annotated)?;
    let t0 = std::time::Instant::now();
    let excluded = loop {
        let p = n.probe(APP_UID, APP_UID, &b9080, None);
        if n.record_for(&p).is_none() {
            break p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "annotation change not applied within 1 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_direct(&n, &excluded, "b", "excludeOutboundIPRanges");
    // c is still captured; port 9081 (excluded) is not; 15020 now is (an explicit list replaces Istio's default).
    let c9080 = format!("{c}:9080");
    assert_captured(
        &n,
        &n.probe(APP_UID, APP_UID, &c9080, None),
        15001,
        &c9080,
        "other destination",
    );
    let c9081 = format!("{c}:9081");
    let p = n.probe(APP_UID, APP_UID, &c9081, None);
    assert!(
        n.record_for(&p).is_none() && !p.connected,
        "excluded port 9081 must go straight (refused): {p:?}"
    );

    // A bad annotation: reported for that pod, the setting falls back to its
    // default (capture), the pod keeps being captured, other pods unaffected.
    let bad = vec![
        PodSpec::meshed(&n.a).annotate(
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.0.0.0/33",
        ),
        PodSpec::meshed(&n.b).annotate("traffic.sidecar.istio.io/includeInboundPorts", "80,http"),
        PodSpec::plain(&n.c),
    ];
    agent.write_pods(&bad)?;
    let st = agent.wait_status(Duration::from_secs(2), |st| {
        pod_entry(st, "default/a")
            .and_then(|p| p["config_errors"].as_array())
            .is_some_and(|e| !e.is_empty())
    })?;
    let errs = pod_entry(&st, "default/a").unwrap()["config_errors"].to_string();
    assert!(
        errs.contains("excludeOutboundIPRanges") && errs.contains("10.0.0.0/33"),
        "error names annotation and value: {errs}"
    );
    assert_eq!(pod_state(&st, "default/a").as_deref(), Some("active"));
    assert!(pod_entry(&st, "default/b").unwrap()["config_errors"]
        .to_string()
        .contains("http"));
    assert_captured(
        &n,
        &n.probe(APP_UID, APP_UID, &b9080, None),
        15001,
        &b9080,
        "bad annotation falls back to capture",
    );

    // A malformed file: reported with file and position, last good pods stay.
    agent.write_raw("{\"kind\": \"PodList\", \"items\": [ {\"metadata\": }")?;
    let st = agent.wait_status(Duration::from_secs(2), |st| st["file_error"].is_string())?;
    let fe = st["file_error"].as_str().unwrap();
    assert!(
        fe.contains("pods.json") && fe.contains("line 1 column"),
        "file error names file and position: {fe}"
    );
    assert_captured(
        &n,
        &n.probe(APP_UID, APP_UID, &b9080, None),
        15001,
        &b9080,
        "after a malformed file",
    );

    // Status command: programs attached, pods, occupancy.
    let report = agent.status_cmd()?;
    for p in report["programs"].as_array().unwrap() {
        assert_eq!(p["attached"], true, "{p}");
    }
    assert_eq!(report["maps"]["pods"], 2, "a and b are in PODS: {report}");
    assert!(
        report["counters"]["redirect_outbound"].as_u64().unwrap() >= 4,
        "{report}"
    );
    assert!(
        report["counters"]["orig_dst_answered"].as_u64().unwrap() >= 4,
        "{report}"
    );

    // Removal: a leaves the file; its entries go within a second.
    agent.write_pods(&[PodSpec::plain(&n.b), PodSpec::plain(&n.c)])?;
    let t0 = std::time::Instant::now();
    loop {
        let p = n.probe(APP_UID, APP_UID, &b9080, None);
        if n.record_for(&p).is_none() {
            if !p.connected {
                // Seen under qemu after the shortcut tests ran: say what the
                // agent and the next probes see before failing.
                eprintln!("after removal, refused: {p:?}");
                eprintln!("status: {}", agent.status_cmd()?);
                for i in 0..3 {
                    std::thread::sleep(Duration::from_millis(200));
                    eprintln!(
                        "probe again {i}: {:?}",
                        n.probe(APP_UID, APP_UID, &b9080, None)
                    );
                }
            }
            assert_direct(&n, &p, "b", "after removal");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "pod removal not applied within 1 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = agent.status_cmd()?;
    assert_eq!(report["maps"]["pods"], 0, "{report}");
    assert_eq!(report["maps"]["pod_by_ip"], 0, "{report}");
    assert_eq!(
        report["maps"]["in_flight"], 0,
        "no connection hand-over left behind: {report}"
    );
    Ok(())
}

/// getsockopt results of an ordinary socket, without the time-varying parts.
fn comparable(records: &[SockoptRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            let data = if r.name.starts_with("TCP_INFO") {
                r.data_hex.chars().take(2).collect()
            } else {
                r.data_hex.clone()
            };
            format!(
                "{} buflen={} rc={} errno={} optlen={} data={}",
                r.name, r.buflen, r.rc, r.errno, r.optlen, data
            )
        })
        .collect()
}

#[test]
fn getsockopt_passes_everything_else_through() -> Result<()> {
    let n = node("sockopt")?;
    // ~100 legacy iptables rules in c make IPT_SO_GET_ENTRIES a >15 KB answer.
    let rules = n.sb.dir().join("many.rules");
    let mut text =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for i in 0..100 {
        text.push_str(&format!(
            "-A INPUT -s 10.9.{}.{}/32 -p tcp --dport {} -j ACCEPT\n",
            i / 250,
            i % 250,
            1000 + i
        ));
    }
    text.push_str("COMMIT\n");
    std::fs::write(&rules, text)?;
    n.sb.iptables_restore(&n.c, &rules, true)?;
    let b9080 = format!("{}:9080", n.b.ip);
    let run = || -> Result<Vec<SockoptRecord>> {
        // Zeroed counters make the table's answer identical run to run.
        n.sb.netns_exec(&n.c.netns, "iptables-legacy", &["-Z"], None)?;
        let out = n.sb.run(
            &n.c,
            0,
            0,
            mtest(),
            &["sockopts", "--connect", &b9080, "--legacy-iptables"],
        )?;
        SockoptRecord::parse_list(&out)
    };
    let before = run()?;
    let entries = before
        .iter()
        .find(|r| r.name == "IPT_SO_GET_ENTRIES")
        .expect("entries record");
    assert!(
        entries.rc == 0 && entries.optlen > 15_000,
        "the iptables-style request is large: {entries:?}"
    );
    let with_programs = {
        let _agent = Agent::start(&n.sb, &n.default_pods())?;
        // c runs in the cgroup the programs are attached to: its getsockopt
        // calls all pass through meshlane's hook.
        run()?
    };
    let after = run()?;
    let diff = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter()
            .zip(b)
            .filter(|(x, y)| x != y)
            .map(|(x, y)| format!("without: {:.300}\n   with: {:.300}", y, x))
            .collect()
    };
    let (b, w, a) = (
        comparable(&before),
        comparable(&with_programs),
        comparable(&after),
    );
    assert_eq!(b.len(), w.len());
    assert!(
        diff(&w, &b).is_empty(),
        "getsockopt results changed under meshlane:\n{}",
        diff(&w, &b).join("\n")
    );
    assert!(
        diff(&a, &b).is_empty(),
        "results differ after cleanup:\n{}",
        diff(&a, &b).join("\n")
    );
    // The failing SO_ORIGINAL_DST on a plain socket keeps the caller's buffer.
    let od = with_programs
        .iter()
        .find(|r| r.name == "SO_ORIGINAL_DST")
        .expect("record");
    assert!(
        od.rc != 0 && od.data_hex.chars().all(|c| c == 'a' || c == '5'),
        "buffer untouched on error: {od:?}"
    );
    Ok(())
}

#[test]
fn udp_is_never_touched() -> Result<()> {
    let n = node("udp")?;
    let mut echo = n.sb.spawn(
        &n.b,
        0,
        0,
        mtest(),
        &["udp-echo", "--name", "b", "--listen", "0.0.0.0:9080"],
    )?;
    echo.wait_ready(READY)?;
    let _agent = Agent::start(&n.sb, &n.default_pods())?;
    let to = format!("{}:9080", n.b.ip);
    for (uid, what) in [(APP_UID, "app"), (PROXY_UID, "proxy")] {
        let out =
            n.sb.run(&n.a, uid, uid, mtest(), &["udp-probe", "--connect", &to])?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        assert_eq!(
            v["peer"].as_str(),
            Some(to.as_str()),
            "{what}: UDP connect() must not be rewritten: {v}"
        );
        let reply = v["reply"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no UDP reply: {v}"));
        assert!(
            reply.starts_with(&format!("b from {}:", n.a.ip)),
            "{what}: reply came from b directly: {reply}"
        );
    }
    Ok(())
}

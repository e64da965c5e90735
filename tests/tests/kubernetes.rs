//! The `kubernetes` pod source, end to end: the real agent, started with a
//! kubeconfig that points at the fake API server (`meshlane_tests::fakeapi`,
//! real HTTP with the list/watch protocol), keeps real interception in a
//! sandbox node true to what the API server says.
//!
//! Each change is made on the fake API server and checked two ways: in
//! `meshlane status --json`, and by a real connection from meshed pod `a`
//! to pod `b`, which either lands on a's test sidecar or goes straight to b.
//! "Within a second" is measured from the moment the API server emitted the
//! event to the moment a new connection shows the change.
//!
//! Also here: the agent's /healthz, /readyz and /metrics, with exact counter
//! deltas for real connections.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;
use meshlane_tests::{
    fakeapi::{api_pod, FakeApi, GoneStyle},
    meshlane_bin, pod_entry, pod_state, read_sidecar_log, Agent, Pod, PodSpec, ProbeResult, Proc,
    Sandbox, APP_UID, PROXY_UID,
};
use serde_json::Value;

const NODE: &str = "node-1";
const READY: Duration = Duration::from_secs(10);
/// What the issue asks of an event: in force within a second.
const EVENT_LIMIT: Duration = Duration::from_secs(1);

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

/// A sandbox node: pod `a` (app server on 9080, test sidecar as uid 1337;
/// meshed when the API server says so), `b` and `c` (servers on 9080, never
/// meshed: a meshed pod without a sidecar refuses inbound connections, as
/// under iptables), and a fake API server.
struct Cluster {
    sb: Sandbox,
    a: Pod,
    b: Pod,
    c: Pod,
    sidecar_log: PathBuf,
    api: FakeApi,
    _procs: Vec<Proc>,
}

fn cluster(tag: &str) -> Result<Cluster> {
    let mut sb = Sandbox::new(tag)?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let c = sb.add_pod("c")?;
    let mut procs = vec![
        sb.start_server(&a, "a", &["0.0.0.0:9080"])?,
        sb.start_server(&b, "b", &["0.0.0.0:9080"])?,
        sb.start_server(&c, "c", &["0.0.0.0:9080"])?,
    ];
    let sidecar_log = sb.dir().join("sidecar-a.jsonl");
    let mut sidecar = sb.spawn(
        &a,
        PROXY_UID,
        PROXY_UID,
        mtest(),
        &["sidecar", "--log", sidecar_log.to_str().expect("utf-8")],
    )?;
    sidecar.wait_ready(READY)?;
    procs.push(sidecar);
    Ok(Cluster {
        sb,
        a,
        b,
        c,
        sidecar_log,
        api: FakeApi::start()?,
        _procs: procs,
    })
}

impl Cluster {
    /// Starts the agent on the fake API server and waits for `active`.
    fn agent(&self, active: &[&str]) -> Result<Agent> {
        let kubeconfig = self.sb.dir().join("kubeconfig");
        self.api.write_kubeconfig(&kubeconfig)?;
        let args: Vec<OsString> = vec![
            "--kubeconfig".into(),
            kubeconfig.into_os_string(),
            "--node-name".into(),
            NODE.into(),
        ];
        let active: Vec<String> = active.iter().map(|n| format!("default/{n}")).collect();
        Agent::start_with(&self.sb, &args, &active)
    }

    fn probe(&self, from: &Pod, uid: u32, to: &str) -> ProbeResult {
        let out = self
            .sb
            .run(from, uid, uid, mtest(), &["probe", "--connect", to])
            .expect("probe ran");
        ProbeResult::parse(&out).expect("probe output")
    }

    /// Connects from a's app to b:9080: true when a's sidecar took it (with
    /// the right original destination), false when it went straight to b.
    fn a_to_b_captured(&self) -> bool {
        let to = format!("{}:9080", self.b.ip);
        let p = self.probe(&self.a, APP_UID, &to);
        assert!(p.connected, "a -> b did not connect: {p:?}");
        let local = p.local.clone().expect("local address");
        let rec = read_sidecar_log(&self.sidecar_log)
            .into_iter()
            .find(|r| r.peer == local);
        let reply = p.reply.as_ref().expect("b answered");
        assert_eq!(reply.server, "b", "{p:?}");
        match rec {
            Some(r) => {
                assert_eq!(r.listener, 15001, "{r:?}");
                assert_eq!(r.orig_dst.as_deref(), Some(to.as_str()), "{r:?}");
                true
            }
            None => {
                assert_eq!(Some(reply.peer.as_str()), p.local.as_deref(), "{p:?}");
                false
            }
        }
    }

    /// Polls a -> b until its capture is `want`; returns how long that took.
    #[track_caller]
    fn until_captured(&self, want: bool, limit: Duration, what: &str) -> Duration {
        let t0 = Instant::now();
        loop {
            if self.a_to_b_captured() == want {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < limit,
                "{what}: a -> b still {} after {limit:?}",
                if want { "direct" } else { "captured" }
            );
        }
    }

    fn meshed(&self, pod: &Pod) -> Value {
        api_pod(&PodSpec::meshed(pod), NODE)
    }
}

fn agent_pods(status: &Value) -> Vec<String> {
    status["agent"]["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect()
}

#[test]
fn watch_events_take_effect_within_a_second() -> Result<()> {
    let cl = cluster("k8sev")?;
    cl.api.apply(api_pod(&PodSpec::plain(&cl.b), NODE));
    cl.api.apply(api_pod(&PodSpec::plain(&cl.c), NODE));
    // A meshed pod of another node that claims a's address: were the node's
    // field selector ignored, a would be captured (or in error) from the start.
    let mut far = PodSpec::meshed(&cl.a);
    far.name = "far".into();
    cl.api.apply(api_pod(&far, "node-2"));

    let mut agent = cl.agent(&[])?;
    agent.wait_status(READY, |s| pod_state(s, "default/c").is_some())?;
    let st = agent.status_cmd()?;
    assert_eq!(st["agent"]["pod_source"], "kubernetes (node node-1)");
    assert_eq!(
        agent_pods(&st),
        vec!["default/b".to_string(), "default/c".to_string()]
    );
    assert_eq!(
        pod_state(&agent.status()?, "default/b").as_deref(),
        Some("not-meshed")
    );
    for r in cl.api.requests() {
        assert_eq!(r.path, "/api/v1/pods", "{r:?}");
        assert_eq!(
            r.query.get("fieldSelector").map(String::as_str),
            Some("spec.nodeName=node-1"),
            "every request asks for this node's pods only: {r:?}"
        );
    }
    assert!(
        cl.api.requests().iter().any(|r| r.is_watch()
            && r.query.get("allowWatchBookmarks").map(String::as_str) == Some("true")),
        "the agent watches with bookmarks: {:#?}",
        cl.api.requests()
    );
    assert!(!cl.a_to_b_captured(), "a is not a pod of the API yet");

    // Pod add, before it has an IP: known, not captured.
    let pending = PodSpec {
        ip: None,
        ip6: None,
        ..PodSpec::meshed(&cl.a)
    };
    cl.api.apply(api_pod(&pending, NODE));
    let t0 = Instant::now();
    agent.wait_status(EVENT_LIMIT, |s| {
        pod_state(s, "default/a").as_deref() == Some("waiting-for-ip")
    })?;
    eprintln!("pod add (no IP) in status after {:?}", t0.elapsed());
    assert!(!cl.a_to_b_captured());

    // IP assignment: captured within a second.
    cl.api.apply(cl.meshed(&cl.a));
    let took = cl.until_captured(true, EVENT_LIMIT, "IP assignment");
    eprintln!("IP assignment applied after {took:?}");
    // The maps change a moment before the status file is written.
    agent.wait_status(EVENT_LIMIT, |s| {
        pod_state(s, "default/a").as_deref() == Some("active")
    })?;
    let st = agent.status_cmd()?;
    let a = pod_entry(&st["agent"], "default/a").expect("a in status");
    assert_eq!(a["state"], "active");
    assert!(a["netns_cookie"].as_u64().is_some(), "{a}");
    assert_eq!(a["ips"][0], cl.a.ip.to_string());

    // Annotation change: b's address excluded, then the exclusion removed.
    let excluded = PodSpec::meshed(&cl.a).annotate(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        &format!("{}/32", cl.b.ip),
    );
    cl.api.apply(api_pod(&excluded, NODE));
    let took = cl.until_captured(false, EVENT_LIMIT, "annotation change");
    eprintln!("annotation added, applied after {took:?}");
    cl.api.apply(cl.meshed(&cl.a));
    let took = cl.until_captured(true, EVENT_LIMIT, "annotation removal");
    eprintln!("annotation removed, applied after {took:?}");

    // Delete: no longer captured, gone from status.
    cl.api.delete("default", "a").expect("a was there");
    let took = cl.until_captured(false, EVENT_LIMIT, "pod delete");
    eprintln!("pod delete applied after {took:?}");
    agent.wait_status(EVENT_LIMIT, |s| pod_entry(s, "default/a").is_none())?;
    let st = agent.status_cmd()?;
    assert_eq!(
        agent_pods(&st),
        vec!["default/b".to_string(), "default/c".to_string()]
    );
    assert_eq!(st["maps"]["pods"], 0, "a's entry is gone: {st:#}");

    // A finished pod holds on to its IP in status, but is no longer captured.
    cl.api.apply(cl.meshed(&cl.a));
    cl.until_captured(true, EVENT_LIMIT, "re-added");
    let mut done = cl.meshed(&cl.a);
    done["status"]["phase"] = "Succeeded".into();
    cl.api.apply(done);
    cl.until_captured(false, EVENT_LIMIT, "pod finished");
    Ok(())
}

#[test]
fn running_pods_at_start_and_netns_after_ip() -> Result<()> {
    let mut cl = cluster("k8sns")?;
    // Pods that run before the agent starts are captured from its first list.
    cl.api.apply(cl.meshed(&cl.a));
    cl.api.apply(api_pod(&PodSpec::plain(&cl.b), NODE));
    let mut agent = cl.agent(&["a"])?;
    assert!(
        cl.a_to_b_captured(),
        "a, running before the agent, is captured"
    );

    // Pod d: the API server knows its IP before any network namespace on the
    // node holds it (its address is not configured yet).
    let d = cl.sb.add_pod("d")?;
    // The address and default route the sandbox gave d, to put back later.
    let field_after = |out: String, key: &str| {
        out.split_whitespace()
            .skip_while(|w| *w != key)
            .nth(1)
            .map(String::from)
            .unwrap_or_else(|| panic!("no {key} in {out:?}"))
    };
    let ip_out = |args: &[&str]| cl.sb.netns_exec(&d.netns, "ip", args, None);
    let dev_addr = field_after(
        ip_out(&["-o", "-4", "addr", "show", "dev", "eth0"])?,
        "inet",
    );
    let gateway = field_after(ip_out(&["route", "show", "default"])?, "via");
    cl.sb.netns_exec(
        &d.netns,
        "ip",
        &["addr", "del", &dev_addr, "dev", "eth0"],
        None,
    )?;
    cl.api.apply(cl.meshed(&d));
    let st = agent.wait_status(EVENT_LIMIT, |s| {
        pod_state(s, "default/d").as_deref() == Some("waiting-for-netns")
    })?;
    assert!(pod_entry(&st, "default/d").expect("d")["netns_cookie"].is_null());
    let st = agent.status_cmd()?;
    assert_eq!(
        pod_entry(&st["agent"], "default/d").expect("d")["state"],
        "waiting-for-netns"
    );
    assert!(
        agent.log().contains("default/d"),
        "the agent reports the pod it waits for:\n{}",
        agent.log()
    );
    // Still waiting a while later: looked for again, not given up.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        pod_state(&agent.status()?, "default/d").as_deref(),
        Some("waiting-for-netns")
    );

    // The namespace appears: picked up on the next retry (every second).
    cl.sb.netns_exec(
        &d.netns,
        "ip",
        &["addr", "add", &dev_addr, "dev", "eth0"],
        None,
    )?;
    ip_out(&["route", "add", "default", "via", &gateway])?;
    let t0 = Instant::now();
    let st = agent.wait_status(Duration::from_secs(3), |s| {
        pod_state(s, "default/d").as_deref() == Some("active")
    })?;
    eprintln!("netns found {:?} after the address appeared", t0.elapsed());
    assert!(pod_entry(&st, "default/d").expect("d")["netns_cookie"].is_u64());
    assert_eq!(agent.status_cmd()?["maps"]["pods"], 2);
    Ok(())
}

#[test]
fn gone_and_api_server_restarts() -> Result<()> {
    let mut cl = cluster("k8sgone")?;
    cl.api.apply(cl.meshed(&cl.a));
    cl.api.apply(api_pod(&PodSpec::plain(&cl.b), NODE));
    let mut agent = cl.agent(&["a"])?;
    assert!(cl.a_to_b_captured());
    let lists = |api: &FakeApi, since: usize| {
        api.requests()
            .into_iter()
            .skip(since)
            .filter(|r| r.is_list())
            .count()
    };

    // 1. Restart with history kept. While the API server is down, the last
    //    known pods stay in force; a change made meanwhile arrives when the
    //    agent resumes its watch from its resourceVersion, without a new list.
    let rv_seen = cl.api.resource_version();
    let n = cl.api.requests().len();
    cl.api.stop();
    let st = agent.wait_status(Duration::from_secs(5), |s| !s["api_error"].is_null())?;
    eprintln!("while down: api_error = {}", st["api_error"]);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        cl.a_to_b_captured(),
        "last known state in force while the API server is down"
    );
    assert_eq!(
        pod_state(&agent.status()?, "default/a").as_deref(),
        Some("active")
    );
    let excluded = PodSpec::meshed(&cl.a).annotate(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        &format!("{}/32", cl.b.ip),
    );
    cl.api.apply(api_pod(&excluded, NODE));
    cl.api.start_again()?;
    let back = Instant::now();
    let took = cl.until_captured(false, Duration::from_secs(20), "change made while down");
    eprintln!("after restart: change applied {took:?} after the server came back");
    let resumed = cl.api.wait_request(n, Duration::from_secs(1), |r| {
        r.is_watch() && r.status == 200
    })?;
    assert_eq!(
        resumed.resource_version(),
        Some(rv_seen.to_string().as_str()),
        "the watch resumes where it was"
    );
    assert_eq!(lists(&cl.api, n), 0, "no new list after a plain restart");
    assert!(back.elapsed() < Duration::from_secs(20));
    // Once the watch is back, events are on time again.
    cl.api.apply(cl.meshed(&cl.a));
    cl.until_captured(true, EVENT_LIMIT, "event after restart");
    agent.wait_status(Duration::from_secs(2), |s| s["api_error"].is_null())?;

    // 2. Bookmarks: changes on another node move the resourceVersion without
    //    an event for us; the bookmark carries it to the agent, so after a
    //    compaction and a restart it resumes from there, with no 410 and no list.
    let mut far = PodSpec::meshed(&cl.c);
    far.name = "far".into();
    for _ in 0..5 {
        cl.api.apply(api_pod(&far, "node-2"));
    }
    let bookmark = cl.api.bookmark();
    // Nothing shows that the agent has read the bookmark; give it ample time.
    std::thread::sleep(Duration::from_millis(1000));
    cl.api.compact();
    let n = cl.api.requests().len();
    cl.api.stop();
    cl.api.start_again()?;
    let resumed = cl
        .api
        .wait_request(n, Duration::from_secs(10), |r| r.is_watch())?;
    assert_eq!(
        resumed.resource_version(),
        Some(bookmark.to_string().as_str()),
        "resumed from the bookmark: {resumed:?}"
    );
    assert!(!resumed.gone_event && resumed.status == 200, "{resumed:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lists(&cl.api, n), 0, "a bookmark spares the list");

    // 3. HTTP 410 on the watch request: the API server restarted and lost
    //    the history the agent needs. A change only a list can show: a is gone.
    cl.api.set_gone_style(GoneStyle::HttpStatus);
    let n = cl.api.requests().len();
    cl.api.stop();
    cl.api.delete_unseen("default", "a").expect("a was there");
    cl.api.start_again()?;
    let took = cl.until_captured(false, Duration::from_secs(20), "relist after HTTP 410");
    eprintln!("HTTP 410: a's deletion applied {took:?} after the server came back");
    let reqs: Vec<_> = cl.api.requests().into_iter().skip(n).collect();
    let gone_at = reqs
        .iter()
        .position(|r| r.is_watch() && r.status == 410)
        .unwrap_or_else(|| panic!("no watch answered 410: {reqs:#?}"));
    assert!(
        reqs[gone_at..].iter().any(|r| r.is_list()),
        "a list follows the 410: {reqs:#?}"
    );
    agent.wait_status(EVENT_LIMIT, |s| pod_entry(s, "default/a").is_none())?;
    let st = agent.status_cmd()?;
    assert_eq!(agent_pods(&st), vec!["default/b".to_string()]);
    assert_eq!(st["maps"]["pods"], 0);

    // 4. 410 as an ERROR event on an open watch (the watch cache expired):
    //    the agent lists again and the list replaces what it knew.
    cl.api.set_gone_style(GoneStyle::ErrorEvent);
    let n = cl.api.requests().len();
    cl.api.apply_unseen(cl.meshed(&cl.a));
    cl.api.expire_watches();
    let took = cl.until_captured(true, Duration::from_secs(2), "relist after 410 ERROR event");
    eprintln!("410 ERROR event: relisted and applied after {took:?}");
    // Captured proves a list: an unseen change clears the watch history, so
    // only a list carries it. (Counting lists after `n` raced with a list
    // the previous step still had in flight when `n` was taken.)
    let _ = n;
    agent.wait_status(EVENT_LIMIT, |s| {
        pod_state(s, "default/a").as_deref() == Some("active")
    })?;
    // And a plain event after all that is on time.
    cl.api.delete("default", "a").expect("a");
    cl.until_captured(false, EVENT_LIMIT, "event after 410");
    Ok(())
}

#[test]
fn restart_while_the_api_server_is_down_keeps_interception() -> Result<()> {
    let mut cl = cluster("k8srst")?;
    cl.api.apply(cl.meshed(&cl.a));
    cl.api.apply(api_pod(&PodSpec::plain(&cl.b), NODE));
    let mut agent = cl.agent(&["a"])?;
    assert!(cl.a_to_b_captured());

    // The agent dies while the API server is down, and a new one starts: it
    // adopts the pinned maps but has no pod list, so it must not sweep them.
    cl.api.stop();
    agent.stop_process(libc::SIGKILL)?;
    agent.restart()?;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        assert!(
            cl.a_to_b_captured(),
            "a's interception lost after a restart without the API server"
        );
    }
    let (code, body) = agent.http_get("/readyz")?;
    assert_eq!(code, 503, "not ready without a pod list: {body}");

    // The pod went away meanwhile. The first list after the API server is
    // back shows it; only then are its adopted entries swept.
    cl.api.delete_unseen("default", "a").expect("a");
    cl.api.start_again()?;
    let took = cl.until_captured(false, Duration::from_secs(20), "sweep after the first list");
    eprintln!("restart: stale entries swept {took:?} after the API server came back");
    agent.wait_status(EVENT_LIMIT, |s| pod_entry(s, "default/b").is_some())?;
    assert_eq!(agent.http_get("/readyz")?.0, 200);
    assert_eq!(agent.status_cmd()?["maps"]["pods"], 0);
    Ok(())
}

/// Reads one series from a /metrics page, panicking with the page if absent.
#[track_caller]
fn metric(page: &str, series: &str) -> f64 {
    Agent::metric(page, series).unwrap_or_else(|| panic!("no {series} in:\n{page}"))
}

#[test]
fn health_readiness_and_metrics_deltas() -> Result<()> {
    let mut cl = cluster("k8smet")?;
    cl.api.apply(cl.meshed(&cl.a));
    cl.api.apply(api_pod(&PodSpec::plain(&cl.b), NODE));
    cl.api.apply(api_pod(&PodSpec::plain(&cl.c), NODE));
    // The API server is down when the agent starts: alive, attached, not ready.
    cl.api.stop();
    let mut agent = cl.agent(&[])?;
    assert_eq!(agent.http_get("/healthz")?.0, 200);
    let (code, body) = agent.http_get("/readyz")?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no pod list"), "{body}");
    assert_eq!(
        metric(&agent.http_get("/metrics")?.1, "meshlane_ready"),
        0.0
    );
    assert_eq!(agent.http_get("/nothing")?.0, 404);

    cl.api.start_again()?;
    agent.wait_status(Duration::from_secs(20), |s| {
        pod_state(s, "default/a").as_deref() == Some("active")
    })?;
    let (code, body) = agent.http_get("/readyz")?;
    assert_eq!(code, 200, "{body}");

    let (code, before) = agent.http_get("/metrics")?;
    assert_eq!(code, 200);
    assert_eq!(metric(&before, "meshlane_ready"), 1.0);
    assert_eq!(metric(&before, "meshlane_pods{state=\"active\"}"), 1.0);
    assert_eq!(metric(&before, "meshlane_pods{state=\"not-meshed\"}"), 2.0);
    assert_eq!(
        metric(&before, "meshlane_pods{state=\"waiting-for-netns\"}"),
        0.0
    );
    let st = agent.status_cmd()?;
    for (map, key) in [
        ("PODS", "pods"),
        ("PORTS", "ports"),
        ("CIDRS", "cidrs"),
        ("POD_BY_IP", "pod_by_ip"),
        ("LISTENERS", "listeners"),
    ] {
        assert_eq!(
            metric(&before, &format!("meshlane_map_entries{{map=\"{map}\"}}")),
            st["maps"][key].as_f64().expect("occupancy"),
            "{map}"
        );
    }
    assert_eq!(metric(&before, "meshlane_map_entries{map=\"PODS\"}"), 1.0);
    // The kernel map's capacity: a slot for twice the default --max-pods (110).
    assert_eq!(
        metric(&before, "meshlane_map_capacity{map=\"PODS\"}"),
        220.0
    );
    assert_eq!(metric(&before, "meshlane_map_update_errors_total"), 0.0);
    assert_eq!(metric(&before, "meshlane_shortcut_enabled"), 0.0);

    // Real connections, each with a known effect on the counters:
    // - N from a's app to b: outbound redirect; the sidecar asks for the
    //   original destination once and connects upstream once;
    // - K from c to a's app: inbound capture; the sidecar asks once and
    //   connects to a's app from 127.0.0.6;
    // - 1 from a's proxy to its own pod IP: to 15006 (row 4), then the same;
    // - M SO_ORIGINAL_DST queries on plain sockets of unmeshed pod c: misses.
    const N: u64 = 5;
    const K: u64 = 4;
    const M: u64 = 3;
    for i in 0..N {
        assert!(cl.a_to_b_captured(), "connection {i} captured");
    }
    let a9080 = format!("{}:9080", cl.a.ip);
    let sidecar_saw = |p: &ProbeResult| {
        read_sidecar_log(&cl.sidecar_log)
            .into_iter()
            .find(|r| Some(&r.peer) == p.local.as_ref())
    };
    for i in 0..K {
        let p = cl.probe(&cl.c, APP_UID, &a9080);
        let rec = sidecar_saw(&p).unwrap_or_else(|| panic!("c -> a {i} not captured: {p:?}"));
        assert_eq!(
            (rec.listener, rec.orig_dst.as_deref()),
            (15006, Some(a9080.as_str()))
        );
        assert_eq!(p.reply.as_ref().map(|r| r.server.as_str()), Some("a"));
    }
    let p = cl.probe(&cl.a, PROXY_UID, &a9080);
    let rec = sidecar_saw(&p).expect("proxy -> own pod IP went through the sidecar");
    assert_eq!(rec.listener, 15006);
    let b9080 = format!("{}:9080", cl.b.ip);
    for _ in 0..M {
        cl.sb.run(
            &cl.c,
            APP_UID,
            APP_UID,
            mtest(),
            &["sockopts", "--connect", &b9080],
        )?;
    }
    let after = agent.http_get("/metrics")?.1;
    let delta = |s: &str| (metric(&after, s) - metric(&before, s)) as u64;
    let expect = [
        ("meshlane_redirects_total{direction=\"outbound\"}", N),
        ("meshlane_redirects_total{direction=\"inbound\"}", K),
        ("meshlane_redirects_total{direction=\"own_pod\"}", 1),
        ("meshlane_redirects_total{direction=\"dns\"}", 0),
        // connect() in a meshed pod: N app + N upstream + 1 proxy + 1 upstream + K upstream.
        ("meshlane_connects_inspected_total", 2 * N + 2 + K),
        ("meshlane_orig_dst_lookups_total", N + K + 1 + M),
        ("meshlane_orig_dst_misses_total", M),
        ("meshlane_orig_dst_record_failures_total", 0),
        ("meshlane_source_bind_failures_total", 0),
        ("meshlane_not_ready_refused_total", 0),
        ("meshlane_shortcut_redirects_total", 0),
        ("meshlane_kernel_map_update_errors_total", 0),
        ("meshlane_pod_source_errors_total", 0),
        (
            "meshlane_pod_redirects_total{namespace=\"default\",pod=\"a\",direction=\"outbound\"}",
            N,
        ),
        (
            "meshlane_pod_redirects_total{namespace=\"default\",pod=\"a\",direction=\"inbound\"}",
            K,
        ),
        (
            "meshlane_pod_redirects_total{namespace=\"default\",pod=\"a\",direction=\"own_pod\"}",
            1,
        ),
        (
            "meshlane_pod_redirects_total{namespace=\"default\",pod=\"a\",direction=\"dns\"}",
            0,
        ),
        (
            "meshlane_pod_orig_dst_answered_total{namespace=\"default\",pod=\"a\"}",
            N + K + 1,
        ),
    ];
    let wrong: Vec<String> = expect
        .iter()
        .filter(|(s, want)| delta(s) != *want)
        .map(|(s, want)| format!("{s}: moved by {}, expected {want}", delta(s)))
        .collect();
    assert!(
        wrong.is_empty(),
        "{wrong:#?}\nbefore:\n{before}\nafter:\n{after}"
    );

    // Pod removal shows in the gauges, and its per-pod series go.
    cl.api.delete("default", "a").expect("a");
    agent.wait_status(EVENT_LIMIT, |s| pod_entry(s, "default/a").is_none())?;
    let page = agent.http_get("/metrics")?.1;
    assert_eq!(metric(&page, "meshlane_pods{state=\"active\"}"), 0.0);
    assert_eq!(metric(&page, "meshlane_map_entries{map=\"PODS\"}"), 0.0);
    assert!(!page.contains("pod=\"a\""), "{page}");
    Ok(())
}

#[test]
fn run_without_a_node_name_or_with_a_bad_kubeconfig_says_why() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("meshlane-k8s-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let run = |args: &[&str]| {
        Command::new(meshlane_bin())
            .arg("run")
            .args(args)
            .args(["--http-addr", "127.0.0.1:0", "--bpffs"])
            .arg(dir.join("bpffs-never-made"))
            .arg("--state-dir")
            .arg(&dir)
            .env_remove("NODE_NAME")
            .env_remove("KUBECONFIG")
            .output()
            .expect("meshlane runs")
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--node-name") && err.contains("NODE_NAME"),
        "{err}"
    );

    let missing = dir.join("no-such-kubeconfig");
    let out = run(&[
        "--node-name",
        NODE,
        "--kubeconfig",
        missing.to_str().expect("utf-8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--kubeconfig") && err.contains("no-such-kubeconfig"),
        "{err}"
    );

    let out = run(&["--node-name", "Node_1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("\"Node_1\""), "{err}");
    assert!(
        !dir.join("bpffs-never-made").exists(),
        "nothing attached or pinned on a configuration error"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

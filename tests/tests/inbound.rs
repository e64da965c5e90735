//! Inbound capture by the real agent and kernel programs, in a two-node
//! sandbox: decision-table rows 9-11 and the inbound annotations from a pod
//! on the same node and from a pod on the other node, the proxy's own calls
//! into its pod (row 4, istio-validation), a proxy that does not listen yet
//! (refused, or bypassed on request), and the six traffic types of
//! ebpf/README.md end to end through the test sidecar.
//!
//! Node 1: pods a (meshed), b (meshed, many ports), c (plain client).
//! Node 2: pods r (meshed), p (plain: a Prometheus-like client, and istiod).
//! Each node has its own agent, cgroup and bpffs directory.

use std::{path::Path, time::Duration};

use anyhow::Result;
use meshlane_tests::{
    pod_entry, read_sidecar_log, Agent, Pod, PodSpec, ProbeResult, Proc, Sandbox, SidecarRecord,
    APP_UID, PROXY_UID,
};

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

/// Ports pod b's app listens on: an app port, an included/excluded-by-
/// annotation port, the tunnel, the status port, health and stats.
const B_PORTS: &[u16] = &[9080, 1111, 15008, 15020, 15021, 15090];

struct Mesh {
    sb: Sandbox,
    a: Pod,
    b: Pod,
    c: Pod,
    r: Pod,
    p: Pod,
    procs: Vec<Proc>,
}

/// Builds both nodes and their app servers; sidecars in a, r and (unless
/// `b_sidecar` is false) b.
fn mesh(tag: &str, b_sidecar: bool) -> Result<Mesh> {
    let mut sb = Sandbox::new(tag)?;
    sb.add_node2()?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let c = sb.add_pod("c")?;
    let r = sb.add_pod_on(2, "r")?;
    let p = sb.add_pod_on(2, "p")?;
    let b_listens: Vec<String> = B_PORTS.iter().map(|p| format!("0.0.0.0:{p}")).collect();
    let b_listens: Vec<&str> = b_listens.iter().map(String::as_str).collect();
    let mut procs = vec![
        sb.start_server(&a, "a", &["0.0.0.0:9080"])?,
        sb.start_server(&b, "b", &b_listens)?,
        sb.start_server(&b, "b-admin", &["127.0.0.1:15000"])?,
        sb.start_server(&r, "r", &["0.0.0.0:9080"])?,
        sb.start_server(&p, "istiod", &["0.0.0.0:15012"])?,
        sb.spawn(
            &b,
            APP_UID,
            APP_UID,
            mtest(),
            &["udp-echo", "--name", "b-udp", "--listen", "0.0.0.0:9080"],
        )?,
    ];
    procs.push(sb.start_sidecar(&a)?);
    procs.push(sb.start_sidecar(&r)?);
    if b_sidecar {
        procs.push(sb.start_sidecar(&b)?);
    }
    Ok(Mesh {
        sb,
        a,
        b,
        c,
        r,
        p,
        procs,
    })
}

impl Mesh {
    fn node1_pods(&self, b: PodSpec) -> Vec<PodSpec> {
        vec![PodSpec::meshed(&self.a), b, PodSpec::plain(&self.c)]
    }
    fn node2_pods(&self) -> Vec<PodSpec> {
        vec![PodSpec::meshed(&self.r), PodSpec::plain(&self.p)]
    }
    fn agents(&self, b: PodSpec) -> Result<(Agent, Agent)> {
        Ok((
            Agent::start_on(&self.sb, 1, &self.node1_pods(b), &[])?,
            Agent::start_on(&self.sb, 2, &self.node2_pods(), &[])?,
        ))
    }

    fn probe(&self, from: &Pod, uid: u32, to: &str, bind: Option<&str>) -> ProbeResult {
        let mut args = vec!["probe", "--connect", to, "--timeout-ms", "2000"];
        if let Some(b) = bind {
            args.extend(["--bind", b]);
        }
        let out = self
            .sb
            .run(from, uid, uid, mtest(), &args)
            .expect("probe ran");
        ProbeResult::parse(&out).expect("probe output")
    }

    /// The record pod `at`'s sidecar wrote for a connection from `peer`.
    fn record(&self, at: &Pod, peer: &str) -> Option<SidecarRecord> {
        read_sidecar_log(&self.sb.sidecar_log(at))
            .into_iter()
            .find(|r| r.peer == peer)
    }
}

fn ip_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(addr)
}

/// Row 10: a connection from outside pod b reached b's sidecar on 15006,
/// which learnt the original destination both ways Envoy looks (getsockopt
/// SO_ORIGINAL_DST and the accepted socket's local address) and saw the real
/// client address; b's app got it from 127.0.0.6.
#[track_caller]
fn assert_inbound_captured(m: &Mesh, p: &ProbeResult, dst: &str, what: &str) {
    assert!(p.connected, "{what}: not connected: {p:?}");
    let local = p.local.as_deref().expect("probe local address");
    let rec = m.record(&m.b, local).unwrap_or_else(|| {
        panic!(
            "{what}: b's sidecar has no record of {local}; log: {:?}",
            read_sidecar_log(&m.sb.sidecar_log(&m.b))
        )
    });
    assert_eq!(rec.listener, 15006, "{what}: {rec:?}");
    assert_eq!(
        rec.orig_dst.as_deref(),
        Some(dst),
        "{what}: SO_ORIGINAL_DST: {rec:?}"
    );
    assert_eq!(
        rec.local, dst,
        "{what}: accepted socket's local address: {rec:?}"
    );
    let reply = p
        .reply
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no reply: {p:?}"));
    assert_eq!(reply.server, "b", "{what}");
    assert_eq!(
        ip_of(&reply.peer),
        "127.0.0.6",
        "{what}: the app is reached from the inbound passthrough source"
    );
    assert_eq!(reply.local, dst, "{what}");
}

/// Rows 9 and not-included ports: straight to b's app, which sees the client.
#[track_caller]
fn assert_inbound_direct(m: &Mesh, p: &ProbeResult, dst: &str, what: &str) {
    assert!(p.connected, "{what}: not connected: {p:?}");
    let local = p.local.as_deref().expect("probe local address");
    assert!(
        m.record(&m.b, local).is_none(),
        "{what}: went through b's sidecar"
    );
    let reply = p
        .reply
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no reply: {p:?}"));
    assert_eq!(reply.server, "b", "{what}");
    assert_eq!(reply.peer, local, "{what}: the app sees the client itself");
    assert_eq!(reply.local, dst, "{what}");
}

/// Probes every port of b from c (same node) and p (other node) and checks
/// that exactly the `captured` ones went to b's sidecar.
fn check_ports(m: &Mesh, captured: &[u16], what: &str) {
    for from in [&m.c, &m.p] {
        for port in B_PORTS {
            let dst = format!("{}:{port}", m.b.ip);
            let p = m.probe(from, APP_UID, &dst, None);
            let w = format!("{what}: {} (node {}) -> b:{port}", from.name, from.node);
            if captured.contains(port) {
                assert_inbound_captured(m, &p, &dst, &w);
            } else {
                assert_inbound_direct(m, &p, &dst, &w);
            }
        }
    }
}

#[test]
fn inbound_rows_9_to_11_and_annotations_same_node_and_cross_node() -> Result<()> {
    let m = mesh("inrows", true)?;
    let (agent1, _agent2) = m.agents(PodSpec::meshed(&m.b))?;

    // Rows 9-10, default pod: everything but the tunnel, status, health and
    // stats ports goes to the proxy.
    check_ports(&m, &[9080, 1111], "default");

    // Row 11: UDP to the pod is untouched.
    for from in [&m.c, &m.p] {
        let out = m.sb.run(
            from,
            APP_UID,
            APP_UID,
            mtest(),
            &["udp-probe", "--connect", &format!("{}:9080", m.b.ip)],
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        let reply = v["reply"].as_str().unwrap_or_default();
        assert!(
            reply.starts_with(&format!("b-udp from {}:", from.ip)),
            "row 11 from {}: {v}",
            from.name
        );
    }

    // Annotations, each applied to the running agent.
    let cases: [(&str, &str, &[u16]); 3] = [
        (
            "traffic.sidecar.istio.io/excludeInboundPorts",
            "1111",
            &[9080],
        ),
        // As Istio's rules: an include list redirects exactly the listed
        // ports (its default excludes do not apply), except the tunnel.
        (
            "traffic.sidecar.istio.io/includeInboundPorts",
            "1111,15020,15008",
            &[1111, 15020],
        ),
        // A custom status port is excluded besides Istio's own ports.
        ("status.sidecar.istio.io/port", "1111", &[9080]),
    ];
    for (key, value, captured) in cases {
        agent1.write_pods(&m.node1_pods(PodSpec::meshed(&m.b).annotate(key, value)))?;
        // Applied within a second: poll the first port that changes.
        let t0 = std::time::Instant::now();
        loop {
            let dst = format!("{}:1111", m.b.ip);
            let p = m.probe(&m.c, APP_UID, &dst, None);
            let went_to_sidecar = p
                .local
                .as_deref()
                .is_some_and(|l| m.record(&m.b, l).is_some());
            if went_to_sidecar == captured.contains(&1111) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "{key}={value} not applied within 1 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        check_ports(&m, captured, &format!("{key}={value}"));
    }

    // Per-pod counters count the captures (exact numbers are the metrics
    // tests' business; here: they moved, for b only).
    let st = agent1.status_cmd()?;
    let b_captured = st["pod_counters"]["default/b"]["inbound_captured"]
        .as_u64()
        .unwrap_or(0);
    assert!(b_captured >= 8, "{st}");
    assert_eq!(
        st["pod_counters"]["default/a"]["inbound_captured"], 0,
        "{st}"
    );
    assert_eq!(
        pod_entry(&agent1.status()?, "default/b").unwrap()["inbound_attached"],
        true
    );
    Ok(())
}

#[test]
fn proxy_calls_into_its_own_pod_land_on_15006() -> Result<()> {
    let m = mesh("inself", true)?;
    let (_a1, _a2) = m.agents(PodSpec::meshed(&m.b))?;
    // Row 4: the proxy dials its own pod's address.
    let dst = format!("{}:9080", m.b.ip);
    let p = m.probe(&m.b, PROXY_UID, &dst, None);
    let rec = m
        .record(&m.b, p.local.as_deref().expect("local"))
        .expect("row 4 reached the sidecar");
    assert_eq!(rec.listener, 15006);
    assert_eq!(rec.orig_dst.as_deref(), Some(dst.as_str()));
    // istio-validation: the proxy from 127.0.0.1 to 127.0.0.6:15002 lands on
    // 15006 with original port 15002.
    let p = m.probe(&m.b, PROXY_UID, "127.0.0.6:15002", None);
    let rec = m
        .record(&m.b, p.local.as_deref().expect("local"))
        .expect("istio-validation reached the sidecar");
    assert_eq!(rec.listener, 15006);
    assert_eq!(rec.orig_dst.as_deref(), Some("127.0.0.6:15002"));
    // Its passthrough from 127.0.0.6 is not captured again: the app got the
    // row-4 request above from 127.0.0.6 (no second record in b's log).
    let records = read_sidecar_log(&m.sb.sidecar_log(&m.b));
    assert!(
        records.iter().all(|r| !r.peer.starts_with("127.0.0.6:")),
        "the proxy's own passthrough was captured again: {records:?}"
    );
    Ok(())
}

#[test]
fn proxy_not_listening_refused_or_bypassed_then_captured() -> Result<()> {
    let mut m = mesh("inready", false)?;
    let (mut agent1, _a2) = m.agents(PodSpec::meshed(&m.b))?;
    let dst = format!("{}:9080", m.b.ip);

    // As iptables: REDIRECT to a port nobody listens on is refused.
    for from in [&m.c, &m.p] {
        let p = m.probe(from, APP_UID, &dst, None);
        assert!(!p.connected, "from {}: {p:?}", from.name);
        assert_eq!(p.errno.as_deref(), Some("ECONNREFUSED"), "{p:?}");
    }
    let st = agent1.status_cmd()?;
    assert!(
        st["counters"]["not_ready_refused"].as_u64().unwrap_or(0) >= 2,
        "{st}"
    );
    assert_eq!(
        pod_entry(&agent1.status()?, "default/b").unwrap()["proxy_listening"],
        false
    );

    // Opted in: passes to the app untouched while the proxy is away.
    agent1.write_pods(
        &m.node1_pods(PodSpec::meshed(&m.b).annotate("meshlane.io/bypass-until-ready", "true")),
    )?;
    let t0 = std::time::Instant::now();
    let p = loop {
        let p = m.probe(&m.c, APP_UID, &dst, None);
        if p.connected || t0.elapsed() > Duration::from_secs(1) {
            break p;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_inbound_direct(&m, &p, &dst, "bypass-until-ready, proxy away");
    let p = m.probe(&m.p, APP_UID, &dst, None);
    assert_inbound_direct(&m, &p, &dst, "bypass-until-ready from node 2");
    // Outbound too: b's app reaches r directly instead of a closed 15001.
    let p = m.probe(&m.b, APP_UID, &format!("{}:9080", m.r.ip), None);
    assert!(p.connected, "{p:?}");

    // The proxy starts: captured from its first connection on (sockops
    // registers the listener at listen(), no agent round trip).
    m.procs.push(m.sb.start_sidecar(&m.b)?);
    let p = m.probe(&m.c, APP_UID, &dst, None);
    assert_inbound_captured(&m, &p, &dst, "proxy started");
    let p = m.probe(&m.p, APP_UID, &dst, None);
    assert_inbound_captured(&m, &p, &dst, "proxy started, from node 2");
    agent1.wait_status(Duration::from_secs(7), |st| {
        pod_entry(st, "default/b").is_some_and(|p| p["proxy_listening"] == true)
    })?;
    Ok(())
}

/// The six traffic types every release must carry (ebpf/README.md).
#[test]
fn six_traffic_types_across_two_nodes() -> Result<()> {
    let m = mesh("insix", true)?;
    let (_a1, _a2) = m.agents(PodSpec::meshed(&m.b))?;

    // 1. remote pod -> local pod: r's app (node 2) -> b:9080 (node 1): r's
    // sidecar on 15001, then b's sidecar on 15006, then b's app from 127.0.0.6.
    // 4. local pod -> local pod: a's app -> b:9080 on the same node.
    for (from, what) in [
        (&m.r, "type 1 (remote -> local)"),
        (&m.a, "type 4 (local -> local)"),
    ] {
        let dst = format!("{}:9080", m.b.ip);
        let p = m.probe(from, APP_UID, &dst, None);
        assert!(p.connected, "{what}: {p:?}");
        let out = m
            .record(from, p.local.as_deref().unwrap())
            .unwrap_or_else(|| panic!("{what}: not through the client's sidecar"));
        assert_eq!(
            (out.listener, out.orig_dst.as_deref()),
            (15001, Some(dst.as_str())),
            "{what}"
        );
        let upstream = out.upstream_local.clone().expect("upstream connected");
        assert_eq!(
            ip_of(&upstream),
            from.ip.to_string(),
            "{what}: proxy dials from its pod IP"
        );
        let inb = m
            .record(&m.b, &upstream)
            .unwrap_or_else(|| panic!("{what}: not through b's sidecar"));
        assert_eq!(
            (inb.listener, inb.orig_dst.as_deref()),
            (15006, Some(dst.as_str())),
            "{what}"
        );
        let reply = p.reply.expect("reply");
        assert_eq!(
            (reply.server.as_str(), ip_of(&reply.peer)),
            ("b", "127.0.0.6"),
            "{what}"
        );
    }

    // 2. local pod -> remote pod: a's app -> r:9080 on node 2.
    let dst = format!("{}:9080", m.r.ip);
    let p = m.probe(&m.a, APP_UID, &dst, None);
    let out = m
        .record(&m.a, p.local.as_deref().unwrap())
        .expect("type 2: a's sidecar");
    assert_eq!(out.listener, 15001);
    let inb = m
        .record(&m.r, out.upstream_local.as_deref().unwrap())
        .expect("type 2: r's sidecar");
    assert_eq!(
        (inb.listener, inb.orig_dst.as_deref()),
        (15006, Some(dst.as_str()))
    );
    assert_eq!(p.reply.expect("type 2 reply").server, "r");

    // 3. Prometheus (p, node 2, not meshed) -> b:15020 and b:15090: untouched.
    for port in [15020, 15090] {
        let dst = format!("{}:{port}", m.b.ip);
        let pr = m.probe(&m.p, APP_UID, &dst, None);
        assert_inbound_direct(&m, &pr, &dst, &format!("type 3 (:{port})"));
    }

    // 5. proxy-internal localhost traffic: b's proxy -> 127.0.0.1:15000.
    let pr = m.probe(&m.b, PROXY_UID, "127.0.0.1:15000", None);
    assert!(
        m.record(&m.b, pr.local.as_deref().unwrap()).is_none(),
        "type 5 captured"
    );
    assert_eq!(pr.reply.expect("type 5 reply").server, "b-admin");

    // 6. sidecar -> control plane: b's proxy -> istiod:15012 on node 2.
    let pr = m.probe(&m.b, PROXY_UID, &format!("{}:15012", m.p.ip), None);
    assert!(
        m.record(&m.b, pr.local.as_deref().unwrap()).is_none(),
        "type 6 captured"
    );
    let reply = pr.reply.expect("type 6 reply");
    assert_eq!(reply.server, "istiod");
    assert_eq!(ip_of(&reply.peer), m.b.ip.to_string());
    Ok(())
}

//! End to end with a real proxy: HAProxy from Debian stands in for Envoy in
//! pod A (uid 1337; a 15001 listener forwarding to the original destination,
//! a 15006 listener forwarding to it from 127.0.0.6). The same HTTP request
//! from A's app to a web server in pod B must give the same response under
//! Istio's iptables rules and under meshlane, and must pass through HAProxy
//! both times.
use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use meshlane_tests::{data_dir, Agent, Pod, PodSpec, Proc, Sandbox, APP_UID, PROXY_UID};

const HAPROXY_CFG: &str = "\
global
    log stdout format raw local0
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 3s
    timeout client 10s
    timeout server 10s
frontend outbound
    bind 0.0.0.0:15001
    default_backend original_dst
backend original_dst
    server orig 0.0.0.0:0
frontend inbound
    bind 0.0.0.0:15006
    default_backend inbound_passthrough
backend inbound_passthrough
    server app 0.0.0.0:0 source 127.0.0.6
";

/// Log lines HAProxy has printed so far.
/// How long a started HAProxy or app may take to listen. Returns as soon as
/// it does; the slack is for the VM rows, where qemu without KVM starts
/// HAProxy in seconds (the 6.1 row once took more than 5 s).
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

fn drain(p: &mut Proc, into: &mut Vec<String>) {
    while let Some(l) = p.next_line(Duration::from_millis(300)) {
        into.push(l);
    }
}

fn curl(sb: &Sandbox, a: &Pod, url: &str) -> Result<String> {
    sb.run(
        a,
        APP_UID,
        APP_UID,
        Path::new("/usr/bin/curl"),
        &["-sS", "--max-time", "5", url],
    )
    .with_context(|| format!("curl {url}"))
}

#[test]
fn same_http_response_through_haproxy_under_iptables_and_meshlane() -> Result<()> {
    let mut sb = Sandbox::new("haproxy")?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let site = sb.dir().join("site");
    std::fs::create_dir_all(&site)?;
    std::fs::write(site.join("index.html"), "<h1>reviews v1</h1>\n")?;
    let site_s = site.to_str().context("utf-8")?;
    let _web = sb.spawn(
        &b,
        APP_UID,
        APP_UID,
        Path::new("/usr/bin/python3"),
        &[
            "-m",
            "http.server",
            "9080",
            "--bind",
            "0.0.0.0",
            "--directory",
            site_s,
        ],
    )?;
    sb.wait_listening(&b, 9080, LISTEN_TIMEOUT)?;
    let cfg = sb.dir().join("haproxy.cfg");
    std::fs::write(&cfg, HAPROXY_CFG)?;
    let mut haproxy = sb.spawn(
        &a,
        PROXY_UID,
        PROXY_UID,
        Path::new("/usr/sbin/haproxy"),
        &["-db", "-f", cfg.to_str().context("utf-8")?],
    )?;
    sb.wait_listening(&a, 15001, LISTEN_TIMEOUT)?;
    sb.wait_listening(&a, 15006, LISTEN_TIMEOUT)?;
    let url = format!("http://{}:9080/index.html", b.ip);
    let mut log = Vec::new();

    // Istio's rules.
    sb.iptables_restore(&a, &data_dir().join("istio-cni/basic.rules"), false)?;
    let under_iptables = curl(&sb, &a, &url)?;
    drain(&mut haproxy, &mut log);
    let seen_iptables = log
        .iter()
        .filter(|l| l.contains("outbound original_dst/orig"))
        .count();
    sb.iptables_flush(&a)?;

    // meshlane.
    let under_meshlane = {
        let _agent = Agent::start(&sb, &[PodSpec::meshed(&a), PodSpec::plain(&b)])?;
        let body = curl(&sb, &a, &url)?;
        // The proxy calling its own pod goes through the inbound listener and
        // reaches the app from 127.0.0.6 (nothing listens on a:9080 here, so
        // HAProxy's inbound backend fails; the log line is what we check).
        let _ = sb.run(
            &a,
            PROXY_UID,
            PROXY_UID,
            Path::new("/usr/bin/curl"),
            &["-sS", "--max-time", "2", &format!("http://{}:9080/", a.ip)],
        );
        body
    };
    drain(&mut haproxy, &mut log);
    let seen_total = log
        .iter()
        .filter(|l| l.contains("outbound original_dst/orig"))
        .count();

    assert_eq!(
        under_iptables.trim_end(),
        "<h1>reviews v1</h1>",
        "response under iptables"
    );
    assert_eq!(
        under_meshlane, under_iptables,
        "same response under meshlane"
    );
    assert_eq!(
        seen_iptables, 1,
        "HAProxy's outbound listener carried the request under iptables: {log:#?}"
    );
    assert_eq!(seen_total, 2, "and under meshlane: {log:#?}");
    assert!(
        log.iter()
            .any(|l| l.contains("inbound inbound_passthrough/app")),
        "inbound listener used for proxy -> own pod: {log:#?}"
    );
    Ok(())
}

/// Starts `python3 -m http.server` serving `body` on `port` in `pod`.
fn web(sb: &Sandbox, pod: &Pod, port: u16, body: &str) -> Result<Proc> {
    let site = sb.dir().join(format!("site-{}-{port}", pod.name));
    std::fs::create_dir_all(&site)?;
    std::fs::write(site.join("index.html"), body)?;
    let port_s = port.to_string();
    let p = sb.spawn(
        pod,
        APP_UID,
        APP_UID,
        Path::new("/usr/bin/python3"),
        &[
            "-m",
            "http.server",
            &port_s,
            "--bind",
            "0.0.0.0",
            "--directory",
            site.to_str().context("utf-8")?,
        ],
    )?;
    sb.wait_listening(pod, port, LISTEN_TIMEOUT)?;
    Ok(p)
}

fn haproxy(sb: &Sandbox, pod: &Pod) -> Result<Proc> {
    let cfg = sb.dir().join(format!("haproxy-{}.cfg", pod.name));
    std::fs::write(&cfg, HAPROXY_CFG)?;
    let p = sb.spawn(
        pod,
        PROXY_UID,
        PROXY_UID,
        Path::new("/usr/sbin/haproxy"),
        &["-db", "-f", cfg.to_str().context("utf-8")?],
    )?;
    sb.wait_listening(pod, 15001, LISTEN_TIMEOUT)?;
    sb.wait_listening(pod, 15006, LISTEN_TIMEOUT)?;
    Ok(p)
}

fn curl_as(sb: &Sandbox, pod: &Pod, uid: u32, url: &str) -> Result<String> {
    sb.run(
        pod,
        uid,
        uid,
        Path::new("/usr/bin/curl"),
        &["-sS", "--max-time", "5", url],
    )
    .with_context(|| format!("curl {url} from {} as {uid}", pod.name))
}

/// New HAProxy log lines of `p` that mention `what`.
fn count_new(p: &mut Proc, log: &mut Vec<String>, what: &str) -> usize {
    let before = log.len();
    drain(p, log);
    log[before..].iter().filter(|l| l.contains(what)).count()
}

/// The six traffic types (ebpf/README.md), in the two-node sandbox, with
/// HAProxy as every meshed pod's sidecar and one meshlane agent per node.
#[test]
fn six_traffic_types_through_haproxy_across_two_nodes() -> Result<()> {
    let mut sb = Sandbox::new("haproxy6")?;
    sb.add_node2()?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let r = sb.add_pod_on(2, "r")?;
    let p = sb.add_pod_on(2, "p")?;
    let _procs = [
        web(&sb, &b, 9080, "b app\n")?,
        web(&sb, &b, 15090, "b stats\n")?,
        web(&sb, &r, 9080, "r app\n")?,
        web(&sb, &p, 15012, "istiod\n")?,
    ];
    // b's proxy admin, on localhost only.
    let _admin = sb.start_server(&b, "b-admin", &["127.0.0.1:15000"])?;
    let mut ha = haproxy(&sb, &a)?;
    let mut hb = haproxy(&sb, &b)?;
    let mut hr = haproxy(&sb, &r)?;
    let (mut la, mut lb, mut lr) = (Vec::new(), Vec::new(), Vec::new());
    let _agent1 = Agent::start_on(&sb, 1, &[PodSpec::meshed(&a), PodSpec::meshed(&b)], &[])?;
    let _agent2 = Agent::start_on(&sb, 2, &[PodSpec::meshed(&r), PodSpec::plain(&p)], &[])?;
    const OUT: &str = "outbound original_dst/orig";
    const IN: &str = "inbound inbound_passthrough/app";

    // 1. remote pod -> local pod: r (node 2) -> b:9080 through r's and b's HAProxy.
    let body = curl_as(&sb, &r, APP_UID, &format!("http://{}:9080/", b.ip))?;
    assert_eq!(body.trim(), "b app");
    assert_eq!(
        count_new(&mut hr, &mut lr, OUT),
        1,
        "type 1, r outbound: {lr:#?}"
    );
    assert_eq!(
        count_new(&mut hb, &mut lb, IN),
        1,
        "type 1, b inbound: {lb:#?}"
    );

    // 2. local pod -> remote pod: a -> r:9080.
    let body = curl_as(&sb, &a, APP_UID, &format!("http://{}:9080/", r.ip))?;
    assert_eq!(body.trim(), "r app");
    assert_eq!(
        count_new(&mut ha, &mut la, OUT),
        1,
        "type 2, a outbound: {la:#?}"
    );
    assert_eq!(
        count_new(&mut hr, &mut lr, IN),
        1,
        "type 2, r inbound: {lr:#?}"
    );

    // 3. Prometheus (p, not meshed, node 2) -> b:15090: untouched.
    let body = curl_as(&sb, &p, APP_UID, &format!("http://{}:15090/", b.ip))?;
    assert_eq!(body.trim(), "b stats");
    assert_eq!(
        count_new(&mut hb, &mut lb, "15090"),
        0,
        "type 3 went through b's proxy"
    );
    assert_eq!(
        count_new(&mut hb, &mut lb, IN),
        0,
        "type 3 went through b's proxy"
    );

    // 4. local pod -> local pod: a -> b:9080 on the same node.
    let body = curl_as(&sb, &a, APP_UID, &format!("http://{}:9080/", b.ip))?;
    assert_eq!(body.trim(), "b app");
    assert_eq!(
        count_new(&mut ha, &mut la, OUT),
        1,
        "type 4, a outbound: {la:#?}"
    );
    assert_eq!(
        count_new(&mut hb, &mut lb, IN),
        1,
        "type 4, b inbound: {lb:#?}"
    );

    // 5. proxy-internal localhost: uid 1337 in b -> 127.0.0.1:15000.
    let out = sb.run(
        &b,
        PROXY_UID,
        PROXY_UID,
        mtest(),
        &["probe", "--connect", "127.0.0.1:15000"],
    )?;
    assert!(out.contains("\"server\":\"b-admin\""), "type 5: {out}");
    assert_eq!(count_new(&mut hb, &mut lb, "inbound"), 0, "type 5 captured");

    // 6. sidecar -> control plane: uid 1337 in b -> istiod:15012 on node 2.
    let body = curl_as(&sb, &b, PROXY_UID, &format!("http://{}:15012/", p.ip))?;
    assert_eq!(body.trim(), "istiod");
    assert_eq!(count_new(&mut hb, &mut lb, OUT), 0, "type 6 captured");
    Ok(())
}

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

/// HAProxy as a dual-stack pod's inbound sidecar: `[::]:15006` (v6only)
/// and `0.0.0.0:15006`, both IP_TRANSPARENT as Envoy's are in TPROXY mode,
/// each forwarding to the original destination from Istio's passthrough
/// source of its family (::6, 127.0.0.6). HAProxy is the real consumer
/// here: it learns the original destination from getsockname(), which
/// TPROXY and meshlane's sk_lookup both leave untouched. (Its outbound side
/// cannot take part over IPv6: HAProxy asks SO_ORIGINAL_DST only of AF_INET
/// sockets, so behind a REDIRECT an AF_INET6 listener forwards to itself,
/// under Istio's rules as under meshlane.) Started as root to bind
/// transparently, it runs as the proxy uid.
const HAPROXY_INBOUND_DUAL_CFG: &str = "\
global
    log stdout format raw local0
    uid 1337
    gid 1337
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 3s
    timeout client 10s
    timeout server 10s
frontend inbound6
    bind :::15006 v6only transparent
    default_backend app6
backend app6
    server app ipv6@:::0 source ::6:0
frontend inbound4
    bind 0.0.0.0:15006 transparent
    default_backend app4
backend app4
    server app 0.0.0.0:0 source 127.0.0.6
";

/// Issue 13, "What to build" 7: the dual-stack HAProxy run. From another
/// pod, c dials A's app over IPv6 and over IPv4. Under Istio's TPROXY rules for both families (tproxy.v4/v6 goldens
/// with the CNI's policy routing) and under meshlane, each connection goes
/// through HAProxy's listener of its family, which dials the app at the
/// original destination (an IPv6 upstream for the first) from ::6 or
/// 127.0.0.6, and the responses are the same.
#[test]
fn dual_stack_inbound_through_haproxy_under_ip6tables_and_meshlane() -> Result<()> {
    let mut sb = Sandbox::new_dual_stack("haproxy-ds")?;
    let a = sb.add_pod("a")?;
    let c = sb.add_pod("c")?;
    let site = sb.dir().join("site");
    std::fs::create_dir_all(&site)?;
    std::fs::write(site.join("index.html"), "<h1>ratings v6</h1>\n")?;
    // http.server on "::" takes both families (it clears IPV6_V6ONLY); its
    // request log (stderr) names each client.
    let serve = format!(
        "exec /usr/bin/python3 -u -m http.server 9080 --bind :: --directory {} 2>&1",
        site.to_str().context("utf-8")?
    );
    let mut web = sb.spawn(&a, APP_UID, APP_UID, Path::new("/bin/sh"), &["-c", &serve])?;
    sb.wait_listening(&a, 9080, LISTEN_TIMEOUT)?;
    let cfg = sb.dir().join("haproxy-dual.cfg");
    std::fs::write(&cfg, HAPROXY_INBOUND_DUAL_CFG)?;
    let mut haproxy = sb.spawn(
        &a,
        0,
        0,
        Path::new("/usr/sbin/haproxy"),
        &["-db", "-f", cfg.to_str().context("utf-8")?],
    )?;
    sb.wait_listening(&a, 15006, LISTEN_TIMEOUT)?;
    let urls = [
        (
            format!("http://[{}]:9080/index.html", a.v6()),
            "inbound6 app6/app",
        ),
        (
            format!("http://{}:9080/index.html", a.ip),
            "inbound4 app4/app",
        ),
    ];
    let mut log = Vec::new();
    let fetch_all = |haproxy: &mut Proc, log: &mut Vec<String>| -> Result<Vec<(String, usize)>> {
        urls.iter()
            .map(|(u, line)| {
                let body = curl(&sb, &c, u)?;
                Ok((body, count_new(haproxy, log, line)))
            })
            .collect()
    };

    // Istio's TPROXY rules for both families, with the CNI's policy routing.
    let routing: [&[&str]; 4] = [
        &[
            "rule",
            "add",
            "fwmark",
            "1337/0xfff",
            "pref",
            "32764",
            "lookup",
            "133",
        ],
        &[
            "route", "add", "local", "default", "dev", "lo", "table", "133",
        ],
        &[
            "-6",
            "rule",
            "add",
            "fwmark",
            "1337/0xfff",
            "pref",
            "32764",
            "lookup",
            "133",
        ],
        &[
            "-6", "route", "add", "local", "default", "dev", "lo", "table", "133",
        ],
    ];
    for args in routing {
        sb.netns_exec(&a.netns, "ip", args, None)?;
    }
    sb.iptables_restore(&a, &data_dir().join("istio-ipv6/tproxy.v4.rules"), false)?;
    sb.ip6tables_restore(&a, &data_dir().join("istio-ipv6/tproxy.v6.rules"))?;
    let under_rules = fetch_all(&mut haproxy, &mut log)?;
    sb.iptables_flush(&a)?;
    sb.ip6tables_flush(&a)?;
    for args in [
        &["rule", "del", "pref", "32764"][..],
        &["route", "flush", "table", "133"],
        &["-6", "rule", "del", "pref", "32764"],
        &["-6", "route", "flush", "table", "133"],
    ] {
        sb.netns_exec(&a.netns, "ip", args, None)?;
    }

    let under_meshlane = {
        let spec = PodSpec::meshed(&a).annotate("sidecar.istio.io/interceptionMode", "TPROXY");
        let _agent = Agent::start(&sb, &[spec, PodSpec::plain(&c)])?;
        fetch_all(&mut haproxy, &mut log)?
    };
    for ((u, _), (body, n)) in urls.iter().zip(&under_rules) {
        assert_eq!(
            body.trim_end(),
            "<h1>ratings v6</h1>",
            "{u} under Istio's rules"
        );
        assert_eq!(*n, 1, "{u}: through HAProxy under Istio's rules: {log:#?}");
    }
    assert_eq!(
        under_meshlane, under_rules,
        "the same under meshlane: {log:#?}"
    );
    // HAProxy's upstream connections reached the app over IPv6 from ::6
    // and over IPv4 from 127.0.0.6 (as the dual-stack app writes it), once
    // per request under each mechanism.
    let mut app_log = Vec::new();
    drain(&mut web, &mut app_log);
    let from = |src: &str| {
        app_log
            .iter()
            .filter(|l| l.starts_with(&format!("{src} ")) && l.contains("GET /index.html"))
            .count()
    };
    assert_eq!(
        (from("::6"), from("::ffff:127.0.0.6")),
        (2, 2),
        "{app_log:#?}"
    );
    Ok(())
}

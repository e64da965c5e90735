//! End to end with a real proxy: HAProxy from Debian stands in for Envoy in
//! pod A (uid 1337; a 15001 listener forwarding to the original destination,
//! a 15006 listener forwarding to it from 127.0.0.6). The same HTTP request
//! from A's app to a web server in pod B must give the same response under
//! Istio's iptables rules and under meshlane, and must pass through HAProxy
//! both times.
use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use meshlane_tests::{shared_dir, Agent, Pod, PodSpec, Proc, Sandbox, APP_UID, PROXY_UID};

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
    sb.wait_listening(&b, 9080, Duration::from_secs(5))?;
    let cfg = sb.dir().join("haproxy.cfg");
    std::fs::write(&cfg, HAPROXY_CFG)?;
    let mut haproxy = sb.spawn(
        &a,
        PROXY_UID,
        PROXY_UID,
        Path::new("/usr/sbin/haproxy"),
        &["-db", "-f", cfg.to_str().context("utf-8")?],
    )?;
    sb.wait_listening(&a, 15001, Duration::from_secs(5))?;
    sb.wait_listening(&a, 15006, Duration::from_secs(5))?;
    let url = format!("http://{}:9080/index.html", b.ip);
    let mut log = Vec::new();

    // Istio's rules.
    sb.iptables_restore(
        &a,
        &shared_dir().join("data/istio-cni-goldens/basic.rules"),
        false,
    )?;
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

//! The test sidecar's data path, which the benchmark depends on: the
//! explicit (no interception) mode, the relay moving every byte of a stream
//! and of large requests, and inbound upstream connections that keep working
//! when recently used source ports are all in TIME_WAIT.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use meshlane_bench::client::Report;
use meshlane_tests::{data_dir, Pod, Proc, Sandbox, APP_UID, INBOUND_PORT, PROXY_UID};

const READY: Duration = Duration::from_secs(10);

/// The test sidecar is the tests crate's binary: cargo names only this
/// package's binaries to its tests, so it is found next to this one.
fn mtest() -> PathBuf {
    meshlane_tests::mtest_bin()
}

fn mbench() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mbench"))
}

fn server(sb: &Sandbox, pod: &Pod, port: u16) -> Result<Proc> {
    let listen = format!("0.0.0.0:{port}");
    let mut p = sb.spawn(
        pod,
        APP_UID,
        APP_UID,
        mbench(),
        &["server", "--listen", &listen],
    )?;
    p.wait_ready(READY)?;
    Ok(p)
}

fn sidecar(sb: &Sandbox, pod: &Pod, extra: &[&str]) -> Result<Proc> {
    let log = sb.dir().join(format!("sidecar-{}.jsonl", pod.name));
    let log = log.to_str().context("utf-8")?.to_string();
    let mut args = vec!["sidecar", "--log", &log];
    args.extend_from_slice(extra);
    let mut p = sb.spawn(pod, PROXY_UID, PROXY_UID, &mtest(), &args)?;
    p.wait_ready(READY)?;
    Ok(p)
}

fn client(sb: &Sandbox, pod: &Pod, connect: &str, args: &[&str]) -> Result<Report> {
    let mut all = vec!["client", "--connect", connect];
    all.extend_from_slice(args);
    let out = sb.run(pod, APP_UID, APP_UID, mbench(), &all)?;
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no report from the client: {out:?}"))?;
    Ok(serde_json::from_str(line)?)
}

/// App -> 127.0.0.1:15001 -> sidecar A -> B:15006 -> sidecar B -> B:9080,
/// with no rules and no agent: streams arrive whole (the client checks the
/// server's byte count), 16 KB requests come back whole, short connections
/// all succeed.
#[test]
fn explicit_sidecars_carry_streams_requests_and_short_connections() -> Result<()> {
    let mut sb = Sandbox::new("sc-explicit")?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let _srv = server(&sb, &b, 9080)?;
    let to_b = format!("{}:{INBOUND_PORT}", b.ip);
    let app_b = format!("{}:9080", b.ip);
    let _sa = sidecar(&sb, &a, &["--outbound-to", &to_b])?;
    // A small relay buffer makes every stream cross many partial writes.
    let _sb = sidecar(&sb, &b, &["--inbound-to", &app_b, "--relay-buffer", "4096"])?;
    let via = "127.0.0.1:15001";
    let window = ["--warmup-ms", "100", "--duration-ms", "700"];

    for size in ["1024", "65536"] {
        let mut args = vec!["--shape", "stream", "--size", size];
        args.extend(window);
        let r = client(&sb, &a, via, &args)?;
        assert_eq!(r.errors, 0, "stream {size}: {r:?}");
        assert!(
            r.bytes > 1 << 20,
            "stream {size} moved only {} bytes",
            r.bytes
        );
    }
    let mut args = vec!["--shape", "rr", "--size", "16384"];
    args.extend(window);
    let r = client(&sb, &a, via, &args)?;
    assert_eq!(r.errors, 0, "rr 16 KB: {r:?}");
    assert!(r.ops > 10, "{r:?}");

    let r = client(
        &sb,
        &a,
        via,
        &[
            "--shape",
            "churn",
            "--max-count",
            "300",
            "--conns",
            "2",
            "--duration-ms",
            "20000",
        ],
    )?;
    assert_eq!((r.ops, r.errors), (300, 0), "{r:?}");

    // Nothing was intercepted: sidecar A forwarded to the fixed address.
    let log = meshlane_tests::read_sidecar_log(&sb.dir().join("sidecar-a.jsonl"));
    assert!(!log.is_empty());
    assert!(
        log.iter()
            .all(|r| r.orig_dst.is_none() && r.upstream_error.is_none()),
        "{:?}",
        &log[..log.len().min(3)]
    );
    Ok(())
}

/// Sidecar B's connections to its app come from 127.0.0.6 and close first,
/// so their source ports sit in TIME_WAIT. With only two ephemeral ports, a
/// port picked at bind() time runs out after two connections; picked at
/// connect() time (IP_BIND_ADDRESS_NO_PORT), a port is reused towards
/// another destination. (Under a churn of thousands of connections the
/// same mistake made every bind scan the whole port range: 6,000
/// connections/s fell to 300.)
#[test]
fn inbound_upstream_ports_are_chosen_at_connect() -> Result<()> {
    let mut sb = Sandbox::new("sc-ports")?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let ports: Vec<u16> = (9080..9086).collect();
    let _servers: Vec<Proc> = ports
        .iter()
        .map(|&p| server(&sb, &b, p))
        .collect::<Result<_>>()?;
    let _sb = sidecar(&sb, &b, &[])?;
    sb.iptables_restore(&b, &data_dir().join("istio-cni/basic.rules"), false)?;
    sb.netns_exec(
        &b.netns,
        "sysctl",
        &["-q", "-w", "net.ipv4.ip_local_port_range=40000 40001"],
        None,
    )?;
    for p in &ports {
        let to = format!("{}:{p}", b.ip);
        let r = client(
            &sb,
            &a,
            &to,
            &[
                "--shape",
                "churn",
                "--max-count",
                "2",
                "--conns",
                "1",
                "--duration-ms",
                "10000",
            ],
        )?;
        assert_eq!(
            (r.ops, r.errors),
            (2, 0),
            "connections to {to} through sidecar B: {r:?}; sidecar log: {:?}",
            meshlane_tests::read_sidecar_log(&sb.dir().join("sidecar-b.jsonl"))
                .iter()
                .filter_map(|r| r.upstream_error.clone())
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

//! Agent restarts and upgrades without losing traffic: constant connection
//! load from a meshed pod through both sidecars while the agent is killed
//! (SIGKILL), left dead for a while, stopped (SIGTERM) and started again
//! several times. Every start adopts the pinned state and swaps the programs
//! into the pinned links in place. Zero failed connections, zero that
//! skipped a sidecar.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use meshlane_tests::{read_sidecar_log, Agent, PodSpec, ProbeResult, Sandbox, APP_UID};

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

#[test]
fn kill_and_restart_under_load_loses_nothing() -> Result<()> {
    let mut sb = Sandbox::new("restart")?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let _server = sb.start_server(&b, "b", &["0.0.0.0:9080"])?;
    let mut procs = Vec::new();
    for pod in [&a, &b] {
        procs.push(sb.start_sidecar(pod)?);
    }
    let mut agent = Agent::start(&sb, &[PodSpec::meshed(&a), PodSpec::meshed(&b)])?;

    let sb = Arc::new(sb);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (sb, stop, a) = (sb.clone(), stop.clone(), a.clone());
        let to = format!("{}:9080", b.ip);
        std::thread::spawn(move || -> Vec<ProbeResult> {
            let mut results = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && results.len() < 5000
            {
                let out = sb
                    .run(&a, APP_UID, APP_UID, mtest(), &["probe", "--connect", &to])
                    .unwrap_or_default();
                results.push(ProbeResult::parse_or_failed(&out));
            }
            results
        })
    };

    // Three crashes with a gap before the new agent, then a clean stop.
    for signal in [libc::SIGKILL, libc::SIGKILL, libc::SIGKILL, libc::SIGTERM] {
        std::thread::sleep(Duration::from_millis(700));
        agent.stop_process(signal)?;
        std::thread::sleep(Duration::from_millis(700));
        agent.restart()?;
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let results = load.join().expect("load thread");

    let failed: Vec<&ProbeResult> = results
        .iter()
        .filter(|p| !p.connected || p.reply.is_none())
        .collect();
    // Through b's sidecar: b's app sees the inbound passthrough source.
    let bypassed_b: Vec<&ProbeResult> = results
        .iter()
        .filter(|p| {
            p.reply
                .as_ref()
                .is_some_and(|r| !r.peer.starts_with("127.0.0.6:"))
        })
        .collect();
    // Through a's sidecar: its outbound listener saw every connection.
    let a_log = read_sidecar_log(&sb.dir().join("sidecar-a.jsonl"));
    let bypassed_a: Vec<&ProbeResult> = results
        .iter()
        .filter(|p| {
            p.local
                .as_deref()
                .is_some_and(|l| !a_log.iter().any(|r| r.peer == l && r.listener == 15001))
        })
        .collect();
    eprintln!(
        "{} connections across 4 agent restarts: {} failed, {} skipped a's sidecar, {} skipped b's",
        results.len(),
        failed.len(),
        bypassed_a.len(),
        bypassed_b.len()
    );
    assert!(
        results.len() >= 40,
        "too little load to mean anything: {}",
        results.len()
    );
    assert!(failed.is_empty(), "failed connections: {failed:#?}");
    assert!(
        bypassed_a.is_empty(),
        "skipped a's sidecar: {bypassed_a:#?}"
    );
    assert!(
        bypassed_b.is_empty(),
        "skipped b's sidecar: {bypassed_b:#?}"
    );
    let log = agent.log();
    assert_eq!(
        log.matches("adopted the interception").count(),
        4,
        "every restart adopts the pinned state: {log}"
    );

    // A pod deleted while no agent runs: the next agent sweeps its entries.
    agent.stop_process(libc::SIGKILL)?;
    agent.write_pods(&[PodSpec::meshed(&a)])?;
    agent.restart()?;
    let report = agent.status_cmd()?;
    assert_eq!(report["maps"]["pods"], 1, "{report}");
    assert_eq!(report["maps"]["pod_by_ip"], 1, "{report}");
    let links = std::fs::read_dir(agent.bpffs.join("netns"))?.count();
    assert_eq!(links, 1, "b's inbound link is gone");
    drop(agent);
    drop(procs);
    Ok(())
}

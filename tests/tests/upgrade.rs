//! An upgrade across a change of the map layout, with a real previous
//! layout: the agent of an earlier commit (built from this repository's
//! history, see `meshlane_tests::previous`) installs the interception, then
//! this build's agent starts over the same bpffs while an app in a meshed pod
//! connects to another meshed pod every few milliseconds. Every connection
//! must pass through both sidecars (a's outbound 15001, b's inbound 15006):
//! none refused, none bypassing either.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use meshlane_tests::{
    previous::{self, Previous},
    read_sidecar_log, skip_loudly, Agent, Launch, PodSpec, ProbeResult, Sandbox, APP_UID,
};

/// The last commit before the IFACES map was added (86490cc): its pinned
/// layout lacks a map this build's programs use.
const PREVIOUS_LAYOUT: &str = "6c9e175";

/// Probe threads: each starts a new app process per connection.
const CLIENTS: usize = 3;

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

/// One connection of the load: when it started and what it saw.
struct Shot {
    at: Instant,
    result: ProbeResult,
}

fn probe(sb: &Sandbox, from: &meshlane_tests::Pod, to: &str) -> ProbeResult {
    let out = sb
        .run(from, APP_UID, APP_UID, mtest(), &["probe", "--connect", to])
        .unwrap_or_default();
    ProbeResult::parse(&out).unwrap_or_else(|_| ProbeResult {
        connected: false,
        error: Some(format!("probe failed to run: {out}")),
        errno: None,
        local: None,
        peer: None,
        family: None,
        reply: None,
        reply_raw: None,
    })
}

#[test]
fn upgrade_across_a_map_layout_change_loses_nothing() -> Result<()> {
    let old_bin = match previous::agent_of(PREVIOUS_LAYOUT)? {
        Previous::Built(b) => b,
        Previous::Unavailable(why) => {
            skip_loudly(&format!("no previous layout to upgrade from: {why}"));
            return Ok(());
        }
    };
    let mut sb = Sandbox::new("upgrade")?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let _server = sb.start_server(&b, "b", &["0.0.0.0:9080"])?;
    let mut procs = Vec::new();
    for pod in [&a, &b] {
        procs.push(sb.start_sidecar(pod)?);
    }
    let pods = [PodSpec::meshed(&a), PodSpec::meshed(&b)];
    let mut agent = Agent::spawn_with(
        &sb,
        &pods,
        &Launch {
            bin: Some(old_bin),
            ..Default::default()
        },
    )?;
    agent.wait_status(Duration::from_secs(15), |st| {
        ["default/a", "default/b"]
            .iter()
            .all(|n| meshlane_tests::pod_state(st, n).as_deref() == Some("active"))
    })?;
    // Captured both ways under the old agent before anything changes.
    let to = format!("{}:9080", b.ip);
    let before = probe(&sb, &a, &to);
    assert!(
        before
            .reply
            .as_ref()
            .is_some_and(|r| r.peer.starts_with("127.0.0.6:")),
        "the previous agent captures: {before:?}\n{}",
        agent.log()
    );
    agent.stop_process(libc::SIGTERM)?;

    let sb = Arc::new(sb);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (sb, stop, a, to) = (sb.clone(), stop.clone(), a.clone(), to.clone());
            std::thread::spawn(move || -> Vec<Shot> {
                let mut shots = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let at = Instant::now();
                    shots.push(Shot {
                        at,
                        result: probe(&sb, &a, &to),
                    });
                }
                shots
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(500));
    agent.upgrade_to_this_build();
    let started = Instant::now();
    agent.restart()?;
    let active = started.elapsed();
    // Inbound right after the swap: the proxy's listener registration
    // carried over (a connection from a reaches b's app from 127.0.0.6).
    let right_after = probe(&sb, &a, &to);
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let shots: Vec<Shot> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect();
    let log = agent.log();

    let a_log = read_sidecar_log(&sb.dir().join("sidecar-a.jsonl"));
    let failed = |p: &ProbeResult| !p.connected || p.reply.is_none();
    // Through b's sidecar: b's app sees the inbound passthrough source.
    let bypassed_b = |p: &ProbeResult| {
        p.reply
            .as_ref()
            .is_some_and(|r| !r.peer.starts_with("127.0.0.6:"))
    };
    // Through a's sidecar: its outbound listener saw the connection.
    let bypassed_a = |p: &ProbeResult| {
        p.local
            .as_deref()
            .is_some_and(|l| !a_log.iter().any(|r| r.peer == l && r.listener == 15001))
    };
    let during: Vec<&Shot> = shots
        .iter()
        .filter(|s| s.at >= started && s.at <= started + active)
        .collect();
    let bad: Vec<&ProbeResult> = shots
        .iter()
        .map(|s| &s.result)
        .filter(|p| failed(p) || bypassed_a(p) || bypassed_b(p))
        .collect();
    eprintln!(
        "upgrade from {PREVIOUS_LAYOUT}: new agent active {active:?} after start; {} connections in all, \
         {} issued while it started; {} failed, {} skipped a's sidecar, {} skipped b's",
        shots.len(),
        during.len(),
        shots.iter().filter(|s| failed(&s.result)).count(),
        shots.iter().filter(|s| bypassed_a(&s.result)).count(),
        shots.iter().filter(|s| bypassed_b(&s.result)).count(),
    );
    for l in log
        .lines()
        .filter(|l| l.contains("migrat") || l.contains("adopt"))
    {
        eprintln!("agent: {l}");
    }
    assert!(
        during.len() >= 10,
        "too little load during the upgrade to mean anything: {} connections in {active:?}",
        during.len()
    );
    assert!(
        bad.is_empty(),
        "{} connections failed or skipped a sidecar across the upgrade; the first: {:#?}\nagent log:\n{log}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    assert!(
        !failed(&right_after) && !bypassed_a(&right_after) && !bypassed_b(&right_after),
        "right after the upgrade: {right_after:?}"
    );
    assert!(
        !log.contains("replacing it"),
        "the upgrade replaced the interception instead of migrating it:\n{log}"
    );
    // The new layout is pinned, nothing of the migration is left over.
    let report = agent.status_cmd()?;
    assert_eq!(report["maps"]["pods"], 2, "{report}");
    assert!(agent.bpffs.join("maps/IFACES").exists());
    drop(agent);
    drop(procs);
    Ok(())
}

//! An upgrade across a change of the map layout, with a real previous
//! layout: the agent of an earlier commit (built from this repository's
//! history, see `meshlane_tests::previous`) installs the interception, then
//! this build's agent starts over the same bpffs while an app in a meshed pod
//! connects to another meshed pod every few milliseconds. Every connection
//! must pass through both sidecars (a's outbound 15001, b's inbound 15006):
//! none refused, none bypassing either; also when the migration fails
//! midway, where the previous programs must keep running.

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
    pod_state,
    previous::{self, Previous},
    read_sidecar_log, skip_loudly, Agent, Launch, Pod, PodSpec, ProbeResult, Proc, Sandbox,
    SidecarRecord, APP_UID,
};

/// The last commit before the IFACES map was added (86490cc): its pinned
/// layout lacks a map this build's programs use.
const BEFORE_IFACES: &str = "6c9e175";

/// The last commit before listeners were keyed by their owner (7eb2a20):
/// its `LISTENERS` sockhash has 16-byte keys (24 now), and it has neither
/// `LISTEN_OWNER` nor `IFACES`, nor the post_bind programs.
const BEFORE_LISTEN_OWNER: &str = "76e4a29";

/// Probe threads: each starts a new app process per connection.
const CLIENTS: usize = 3;

const PODS: [&str; 2] = ["default/a", "default/b"];

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

/// One connection of the load: when it started and what it saw.
struct Shot {
    at: Instant,
    result: ProbeResult,
}

/// Two meshed pods with their sidecars, intercepted by the previous agent
/// (stopped, its pins in place), b serving on 9080.
struct Fixture {
    /// The commit whose agent installed.
    rev: &'static str,
    sb: Arc<Sandbox>,
    a: Pod,
    to: String,
    agent: Agent,
    _procs: Vec<Proc>,
}

impl Fixture {
    /// None (skipped loudly) when the previous agent cannot be built here.
    fn installed_by_previous(name: &str, rev: &'static str) -> Result<Option<Self>> {
        let old_bin = match previous::agent_of(rev)? {
            Previous::Built(b) => b,
            Previous::Unavailable(why) => {
                skip_loudly(&format!("no previous layout to upgrade from: {why}"));
                return Ok(None);
            }
        };
        let mut sb = Sandbox::new(name)?;
        let a = sb.add_pod("a")?;
        let b = sb.add_pod("b")?;
        let mut procs = vec![sb.start_server(&b, "b", &["0.0.0.0:9080"])?];
        for pod in [&a, &b] {
            procs.push(sb.start_sidecar(pod)?);
        }
        let pods = [PodSpec::meshed(&a), PodSpec::meshed(&b)];
        let launch = Launch {
            bin: Some(old_bin),
            ..Default::default()
        };
        let mut agent = Agent::spawn_with(&sb, &pods, &launch)?;
        wait_active(&mut agent)?;
        let f = Self {
            rev,
            to: format!("{}:9080", b.ip),
            sb: Arc::new(sb),
            a,
            agent,
            _procs: procs,
        };
        // Captured both ways under the previous agent.
        let before = f.probe();
        assert!(
            f.bypassed(&before, &f.a_log()).is_none(),
            "the previous agent captures: {before:?}\n{}",
            f.agent.log()
        );
        Ok(Some(f))
    }

    fn probe(&self) -> ProbeResult {
        probe(&self.sb, &self.a, &self.to)
    }

    fn a_log(&self) -> Vec<SidecarRecord> {
        read_sidecar_log(&self.sb.dir().join("sidecar-a.jsonl"))
    }

    /// Why a connection did not go through both sidecars (None: it did).
    fn bypassed(&self, p: &ProbeResult, a_log: &[SidecarRecord]) -> Option<&'static str> {
        if !p.connected || p.reply.is_none() {
            return Some("failed");
        }
        // Through a's sidecar: its outbound listener saw the connection.
        if p.local
            .as_deref()
            .is_some_and(|l| !a_log.iter().any(|r| r.peer == l && r.listener == 15001))
        {
            return Some("skipped a's sidecar");
        }
        // Through b's sidecar: b's app sees the inbound passthrough source.
        if p.reply
            .as_ref()
            .is_some_and(|r| !r.peer.starts_with("127.0.0.6:"))
        {
            return Some("skipped b's sidecar");
        }
        None
    }

    /// Runs `during` while CLIENTS threads connect from a to b without
    /// pause; returns its result, how long it took, and every connection
    /// with whether it was issued while `during` ran.
    fn under_load<R>(
        &mut self,
        during: impl FnOnce(&mut Agent) -> R,
    ) -> (R, Duration, Vec<(Shot, bool)>) {
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (sb, stop, a, to) = (
                    self.sb.clone(),
                    stop.clone(),
                    self.a.clone(),
                    self.to.clone(),
                );
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
        let started = Instant::now();
        let r = during(&mut self.agent);
        let took = started.elapsed();
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, Ordering::Relaxed);
        let shots = clients
            .into_iter()
            .flat_map(|c| c.join().expect("client thread"))
            .map(|s| {
                let during = s.at >= started && s.at <= started + took;
                (s, during)
            })
            .collect();
        (r, took, shots)
    }

    /// Asserts every connection went through both sidecars; returns how
    /// many were issued during the operation.
    fn assert_all_captured(&self, what: &str, took: Duration, shots: &[(Shot, bool)]) -> usize {
        let a_log = self.a_log();
        let bad: Vec<(&str, &ProbeResult)> = shots
            .iter()
            .filter_map(|(s, _)| Some((self.bypassed(&s.result, &a_log)?, &s.result)))
            .collect();
        let during = shots.iter().filter(|(_, d)| *d).count();
        let count = |why: &str| bad.iter().filter(|(w, _)| *w == why).count();
        eprintln!(
            "{what} from {}: took {took:?}; {} connections in all, {during} issued \
             during it; {} failed, {} skipped a's sidecar, {} skipped b's",
            self.rev,
            shots.len(),
            count("failed"),
            count("skipped a's sidecar"),
            count("skipped b's sidecar"),
        );
        assert!(
            during >= 10,
            "{what}: too little load to mean anything: {during} connections in {took:?}"
        );
        assert!(
            bad.is_empty(),
            "{what}: {} connections failed or skipped a sidecar; the first: {:#?}\nagent log:\n{}",
            bad.len(),
            &bad[..bad.len().min(3)],
            self.agent.log()
        );
        during
    }
}

fn probe(sb: &Sandbox, from: &Pod, to: &str) -> ProbeResult {
    let out = sb
        .run(from, APP_UID, APP_UID, mtest(), &["probe", "--connect", to])
        .unwrap_or_default();
    ProbeResult::parse_or_failed(&out)
}

/// Waits until the agent's status shows both pods active (a status written
/// before the pods file was read, with no pods, does not count).
fn wait_active(agent: &mut Agent) -> Result<()> {
    agent.wait_status_every(Duration::from_secs(15), Duration::from_millis(5), |st| {
        PODS.iter()
            .all(|n| pod_state(st, n).as_deref() == Some("active"))
    })?;
    Ok(())
}

/// Starts this build's agent over what the agent of `rev` pinned, under
/// load, and checks the migration.
fn upgrade_from(name: &str, rev: &'static str) -> Result<Option<Fixture>> {
    let Some(mut f) = Fixture::installed_by_previous(name, rev)? else {
        return Ok(None);
    };
    f.agent.stop_process(libc::SIGTERM)?;
    f.agent.upgrade_to_this_build();
    let (sb, a, to) = (f.sb.clone(), f.a.clone(), f.to.clone());
    let (right_after, took, shots) = f.under_load(|agent| -> Result<ProbeResult> {
        agent.restart()?;
        // Written after the round that finished the migration.
        wait_active(agent)?;
        // Inbound right after the swap: the proxy's listener registration
        // carried over (a connection from a reaches b's app from 127.0.0.6).
        Ok(probe(&sb, &a, &to))
    });
    let right_after = right_after?;
    f.assert_all_captured("upgrade", took, &shots);
    assert_eq!(
        f.bypassed(&right_after, &f.a_log()),
        None,
        "right after the upgrade: {right_after:?}"
    );
    let log = f.agent.log();
    for l in log.lines().filter(|l| l.contains("migrat")) {
        eprintln!("agent: {l}");
    }
    assert!(
        log.contains("migrated: every link runs this build's programs"),
        "the upgrade did not migrate:\n{log}"
    );
    assert!(
        !log.contains("replacing it"),
        "the upgrade replaced the interception instead of migrating it:\n{log}"
    );
    // The new layout is pinned, nothing staged is left over.
    let report = f.agent.status_cmd()?;
    assert_eq!(report["maps"]["pods"], 2, "{report}");
    assert!(f.agent.bpffs.join("maps/IFACES").exists());
    assert!(!f.agent.bpffs.join("next").exists());
    Ok(Some(f))
}

#[test]
fn upgrade_across_a_map_layout_change_loses_nothing() -> Result<()> {
    upgrade_from("upgrade", BEFORE_IFACES)?;
    Ok(())
}

/// The `LISTENERS` sockhash changes its key: the new one is filled with
/// the proxies' listening sockets before the swap (they predate every
/// program, so only the agent can register them), and the post_bind hooks
/// this build added get links of their own.
#[test]
fn upgrade_that_changes_the_listeners_sockhash_loses_nothing() -> Result<()> {
    let Some(f) = upgrade_from("upgrade-listeners", BEFORE_LISTEN_OWNER)? else {
        return Ok(());
    };
    let log = f.agent.log();
    assert!(
        log.contains("LISTENERS (was"),
        "LISTENERS had another layout:\n{log}"
    );
    for hook in ["record_bind4", "record_bind6"] {
        assert!(
            f.agent.bpffs.join("links").join(hook).exists(),
            "{hook} link"
        );
    }
    let report = f.agent.status_cmd()?;
    assert_eq!(report["maps"]["listeners"], 4, "{report}");
    Ok(())
}

/// A link the migration cannot swap (here: a pin under the pods' link
/// directory that is a map, not a link) makes it fail after it has swapped
/// others: every link gets its previous program back, the agent exits
/// saying what failed, and traffic stays captured by the previous
/// programs throughout. Without the obstacle the next start migrates.
#[test]
fn a_failed_migration_keeps_the_previous_programs() -> Result<()> {
    let Some(mut f) = Fixture::installed_by_previous("upgrade-fail", BEFORE_IFACES)? else {
        return Ok(());
    };
    f.agent.stop_process(libc::SIGTERM)?;
    let bpffs = f.agent.bpffs.clone();
    let obstacle = bpffs.join("netns/0");
    {
        use std::os::fd::AsFd;
        let map = meshlane::bpf::sys::open_pinned_fd(&bpffs.join("maps/PODS"))?;
        meshlane::bpf::sys::obj_pin(map.as_fd(), &obstacle)?;
    }
    f.agent.upgrade_to_this_build();
    let (failed, took, shots) = f.under_load(|agent| {
        let r = agent.restart().and_then(|()| wait_active(agent));
        (r, agent.exited())
    });
    let _ = std::fs::remove_file(&obstacle);
    let (r, exit) = failed;
    let err = format!("{:#}", r.expect_err("the migration fails"));
    let log = f.agent.log();
    let said = log
        .split_once("Error: ")
        .map(|(_, e)| e.split("Stack backtrace").next().unwrap_or(e).trim())
        .unwrap_or_default();
    eprintln!("agent exit: {exit:?}; its error: {said}");
    assert!(
        exit.is_some_and(|s| !s.success()),
        "the agent exits with an error: {exit:?}\n{log}"
    );
    for want in [
        "finishing the migration to the new map layout",
        "netns/0",
        "not a bpf link",
        "the previous programs keep running",
    ] {
        assert!(log.contains(want), "the error says {want:?}: {err}\n{log}");
    }
    f.assert_all_captured("failed migration", took, &shots);
    // Still the previous layout, and nothing staged left.
    assert!(!bpffs.join("maps/IFACES").exists());
    assert!(!bpffs.join("next").exists());

    // The obstacle gone, the next start migrates.
    let (_, took, shots) = f.under_load(|agent| -> Result<()> {
        agent.restart()?;
        wait_active(agent)
    });
    f.assert_all_captured("upgrade after a failed one", took, &shots);
    assert!(bpffs.join("maps/IFACES").exists());
    Ok(())
}

//! The start-up probes against the kernel this runs on. `cargo xtask vm-test`
//! runs this binary first, alone, on every kernel row: either every feature
//! is present and the agent starts (mounting bpffs on /sys/fs/bpf if nobody
//! has, as in the VM), or `meshlane probe` and `meshlane run` refuse with the
//! same one-line message naming what is missing, and nothing is attached.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use meshlane_tests::{meshlane_bin, Agent, PodSpec, Sandbox};

const REFUSAL: &str = "meshlane cannot run on this kernel";

fn is_bpffs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == 0xcafe_4a11)
}

#[test]
fn agent_starts_or_refuses_with_the_probe_message() -> Result<()> {
    let probe = Command::new(meshlane_bin()).arg("probe").output()?;
    let stdout = String::from_utf8_lossy(&probe.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&probe.stderr).into_owned();
    println!("meshlane probe:\n{stdout}{stderr}");
    let mut sb = Sandbox::new("kernel")?;
    let pod = sb.add_pod("a")?;

    if probe.status.success() {
        assert!(
            stdout.contains("every feature meshlane needs is present"),
            "probe exited 0 without saying every feature is present:\n{stdout}"
        );
        assert!(
            !stdout.lines().any(|l| l.contains(" NO ")),
            "probe exited 0 with a missing feature:\n{stdout}"
        );
        let agent = Agent::start(&sb, &[PodSpec::meshed(&pod)])?;
        assert!(
            is_bpffs(Path::new("/sys/fs/bpf")),
            "the agent started but /sys/fs/bpf is not a bpf filesystem"
        );
        let links = std::fs::read_dir(agent.bpffs.join("links"))?.count();
        assert!(links >= 4, "only {links} links pinned:\n{}", agent.log());
        return Ok(());
    }

    // A kernel the probes refuse: one line, the same from `probe` and `run`.
    let refusal = stderr
        .lines()
        .find(|l| l.contains(REFUSAL))
        .with_context(|| format!("probe failed without the refusal line:\n{stderr}"))?
        .trim_start_matches("Error: ")
        .to_string();
    assert_eq!(
        stderr.lines().filter(|l| l.contains(REFUSAL)).count(),
        1,
        "{stderr}"
    );
    let bpffs = std::path::PathBuf::from(format!("/sys/fs/bpf/meshlane-test-{}", sb.index()));
    let pods = sb.dir().join("pods.json");
    std::fs::write(
        &pods,
        meshlane_tests::agent::pod_list(&[PodSpec::meshed(&pod)]),
    )?;
    let mut child = Command::new(meshlane_bin())
        .arg("run")
        .arg("--pods")
        .arg(&pods)
        .arg("--cgroup")
        .arg(sb.cgroup())
        .arg("--bpffs")
        .arg(&bpffs)
        .arg("--state-dir")
        .arg(sb.dir().join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("meshlane run kept running on a kernel `meshlane probe` refuses");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut err)?;
    assert!(!status.success(), "meshlane run succeeded: {err}");
    assert!(
        err.contains(&refusal),
        "meshlane run did not refuse with the probe's message {refusal:?}:\n{err}"
    );
    let pinned = std::fs::read_dir(bpffs.join("links")).map_or(0, Iterator::count);
    assert_eq!(pinned, 0, "links pinned although the kernel was refused");
    let _ = Command::new(meshlane_bin())
        .args(["cleanup", "--bpffs"])
        .arg(&bpffs)
        .arg("--state-dir")
        .arg(sb.dir().join("state"))
        .stderr(Stdio::null())
        .status();
    println!("refused as expected: {refusal}");
    Ok(())
}

//! The command line as scripts and operators use it:
//! - `meshlane iptables`: Istio's rules for a pod from a pods file, compared
//!   with the golden rules Istio's CNI plugin writes for the same pod;
//! - `meshlane status`'s exit code, with the real agent in a sandbox node:
//!   0 when interception is in place for every pod, 1 naming what is wrong
//!   (a program detached, a pod in `error`, the API server unreachable), 2
//!   when it is asked wrongly or cannot read the state;
//! - the log filter (flag, MESHLANE_LOG, RUST_LOG) and format (JSON lines,
//!   no colour when stderr is not a terminal).
use std::{
    ffi::OsString,
    fmt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use meshlane_tests::{
    agent::pod_list, data_dir, fakeapi::FakeApi, meshlane_bin, pod_entry, pod_state, Agent, Launch,
    Pod, PodSpec, Proc, Sandbox, PROXY_UID,
};
use serde_json::Value;

const READY: Duration = Duration::from_secs(10);

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

/// What a `meshlane` command did.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl fmt::Display for Ran {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn ran(cmd: &mut Command) -> Ran {
    let out = cmd.output().expect("running meshlane");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `meshlane status ARGS` on the agent's pins and state.
fn status(agent: &Agent, args: &[&str]) -> Ran {
    ran(Command::new(meshlane_bin())
        .arg("status")
        .args(args)
        .arg("--bpffs")
        .arg(&agent.bpffs)
        .arg("--state-dir")
        .arg(&agent.state_dir))
}

/// `meshlane status --json`: its exit code and document.
fn status_json(agent: &Agent) -> (Option<i32>, Value) {
    let r = status(agent, &["--json"]);
    let doc = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r}"));
    (r.code, doc)
}

/// The problems a status document lists, as (kind, subject).
fn problems(doc: &Value) -> Vec<(String, String)> {
    doc["problems"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    (
                        p["kind"].as_str().unwrap_or_default().to_string(),
                        p["subject"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A sandbox node with pod `a`, whose test sidecar (uid 1337) listens on
/// 15001 and 15006 before the agent starts.
struct Node {
    sb: Sandbox,
    a: Pod,
    _sidecar: Proc,
}

fn node(tag: &str) -> Result<Node> {
    let mut sb = Sandbox::new(tag)?;
    let a = sb.add_pod("a")?;
    let log = sb.dir().join("sidecar-a.jsonl");
    let mut sidecar = sb.spawn(
        &a,
        PROXY_UID,
        PROXY_UID,
        mtest(),
        &["sidecar", "--log", log.to_str().expect("utf-8")],
    )?;
    sidecar.wait_ready(READY)?;
    Ok(Node {
        sb,
        a,
        _sidecar: sidecar,
    })
}

/// Waits until the agent has seen pod `name` captured with its proxy
/// listening (the agent looks for listeners as it reconciles).
fn wait_listening(agent: &mut Agent, name: &str) -> Result<()> {
    agent.wait_status(READY, |st| {
        pod_entry(st, name).is_some_and(|p| {
            p["state"] == "active" && p["inbound_attached"] == true && p["proxy_listening"] == true
        })
    })?;
    Ok(())
}

#[test]
fn iptables_command_prints_istios_rules_for_a_pod() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("meshlane-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut custom = PodSpec {
        name: "custom".into(),
        meshed: true,
        ..Default::default()
    };
    custom.run_as_user = Some(1_000_670_000);
    custom.run_as_group = Some(1_000_670_001);
    let plain = PodSpec {
        name: "plain".into(),
        ..Default::default()
    };
    let file = dir.join("pods.json");
    std::fs::write(&file, pod_list(&[custom, plain]))?;
    let run = |pod: &str| {
        Command::new(meshlane_bin())
            .arg("iptables")
            .arg("--pods")
            .arg(&file)
            .args(["--pod", pod])
            .output()
    };

    let out = run("default/custom")?;
    let golden = std::fs::read_to_string(data_dir().join("istio-cni/custom-uid.rules"))?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout)?, golden);

    let out = run("plain")?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not meshed"));
    let out = run("missing")?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pod \"missing\""));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A directory of the test's own under the system's temporary directory,
/// removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("meshlane-cli-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn status_without_an_agent_is_unhealthy_and_unreadable_state_is_exit_2() -> Result<()> {
    let tmp = TempDir::new("noagent")?;
    let bpffs = tmp.0.join("bpffs");
    let state = tmp.0.join("state");
    std::fs::create_dir_all(&state)?;
    let status = |args: &[&str]| {
        ran(Command::new(meshlane_bin())
            .arg("status")
            .args(args)
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--state-dir")
            .arg(&state))
    };

    // Nothing installed: unhealthy, and it says what is missing.
    let r = status(&[]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stdout.contains("NOT attached"), "{r}");
    assert!(r.stdout.contains("no agent status"), "{r}");

    // Asked wrongly: 2.
    let r = status(&["--no-such-flag"]);
    assert_eq!(r.code, Some(2), "{r}");

    // A status file that does not parse: the state cannot be read, 2.
    std::fs::write(state.join("status.json"), "{ not json")?;
    let r = status(&[]);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("status.json"), "names the file: {r}");
    Ok(())
}

#[test]
fn status_is_healthy_then_names_a_detached_program() -> Result<()> {
    let n = node("clihealthy")?;
    let mut agent = Agent::start_on(
        &n.sb,
        1,
        &[PodSpec::meshed(&n.a)],
        &["--log-format", "json"],
    )?;
    wait_listening(&mut agent, "default/a")?;

    let r = status(&agent, &[]);
    assert_eq!(r.code, Some(0), "healthy: {r}");
    let (code, doc) = status_json(&agent);
    assert_eq!(code, Some(0));
    assert_eq!(doc["healthy"], true, "{doc:#}");
    assert_eq!(problems(&doc), vec![], "{doc:#}");

    // --log-format json: every line the agent wrote is one JSON object.
    let log = agent.log();
    assert!(log.contains("programs attached"), "{log}");
    for line in log.lines() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("a log line that is not JSON: {line:?}"))?;
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }

    // A cgroup program detached (its pinned link removed: nothing else holds it).
    let links = agent.bpffs.join("links");
    let name = std::fs::read_dir(&links)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .min()
        .context("no pinned links")?;
    std::fs::remove_file(links.join(&name))?;
    let r = status(&agent, &[]);
    assert_eq!(r.code, Some(1), "program {name} detached: {r}");
    assert!(
        r.stdout
            .lines()
            .any(|l| l.contains(&name) && l.contains("NOT attached")),
        "names the program: {r}"
    );
    let (code, doc) = status_json(&agent);
    assert_eq!(code, Some(1));
    assert_eq!(doc["healthy"], false);
    assert!(
        problems(&doc).contains(&("program-not-attached".into(), name.clone())),
        "{doc:#}"
    );
    Ok(())
}

/// Replaces `<bpffs>/netns` (where each pod's inbound link is pinned) with a
/// dangling symlink, so the agent cannot capture a new pod; puts the
/// directory back on drop, before the agent's cleanup.
struct BrokenNetnsPins(PathBuf);

impl BrokenNetnsPins {
    fn new(bpffs: &Path) -> Result<Self> {
        let dir = bpffs.join("netns");
        if dir.exists() {
            std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::os::unix::fs::symlink("/nonexistent/meshlane-test", &dir)
            .with_context(|| format!("symlink at {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for BrokenNetnsPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::create_dir(&self.0);
    }
}

#[test]
fn status_names_a_pod_in_error() -> Result<()> {
    let mut sb = Sandbox::new("clierror")?;
    let b = sb.add_pod("b")?;
    let mut agent = Agent::start(&sb, &[PodSpec::plain(&b)])?;
    let r = status(&agent, &[]);
    assert_eq!(r.code, Some(0), "a plain pod only: {r}");

    let _broken = BrokenNetnsPins::new(&agent.bpffs)?;
    agent.write_pods(&[PodSpec::meshed(&b)])?;
    agent.wait_status(READY, |st| {
        pod_state(st, "default/b").as_deref() == Some("error")
    })?;
    let r = status(&agent, &[]);
    assert_eq!(r.code, Some(1), "pod b in error: {r}");
    assert!(
        r.stdout
            .lines()
            .any(|l| l.contains("default/b") && l.contains("error")),
        "names the pod: {r}"
    );
    let (_, doc) = status_json(&agent);
    assert!(
        problems(&doc).contains(&("pod-error".into(), "default/b".into())),
        "{doc:#}"
    );

    // Default text logs on a file: no colour escapes.
    let log = agent.log();
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "ANSI escapes in a log file:\n{log:?}"
    );
    Ok(())
}

#[test]
fn status_names_an_unreachable_api_server() -> Result<()> {
    let sb = Sandbox::new("cliapi")?;
    let mut api = FakeApi::start()?;
    let kubeconfig = sb.dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let args: Vec<OsString> = vec![
        "--kubeconfig".into(),
        kubeconfig.into_os_string(),
        "--node-name".into(),
        "node-1".into(),
    ];
    // The filter from RUST_LOG alone: warnings, no info lines.
    let launch = Launch {
        env: vec![
            ("MESHLANE_LOG".into(), None),
            ("RUST_LOG".into(), Some("warn".into())),
        ],
        ..Default::default()
    };
    let mut agent = Agent::start_launched(&sb, &args, &[], &launch)?;
    agent.wait_status(READY, |st| st["api_error"].is_null())?;
    let r = status(&agent, &[]);
    assert_eq!(r.code, Some(0), "API server up, no pods: {r}");

    api.stop();
    agent.wait_status(READY, |st| !st["api_error"].is_null())?;
    let r = status(&agent, &[]);
    assert_eq!(r.code, Some(1), "API server down: {r}");
    assert!(r.stdout.contains("API server"), "names it: {r}");
    let (_, doc) = status_json(&agent);
    assert!(
        problems(&doc)
            .iter()
            .any(|(kind, _)| kind == "api-server-unreachable"),
        "{doc:#}"
    );

    let log = agent.log();
    assert!(!log.contains("INFO"), "RUST_LOG=warn, yet:\n{log}");
    assert!(log.contains("WARN"), "the API error is logged:\n{log}");
    Ok(())
}

/// `meshlane run --print-options` (touches nothing, logs the filter it
/// chose at debug) with `args` and only the environment in `env`.
fn print_options(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut c = Command::new(meshlane_bin());
    c.args(["run", "--pods", "/nonexistent/pods.yaml", "--print-options"])
        .args(args);
    for k in [
        "MESHLANE_LOG",
        "RUST_LOG",
        "MESHLANE_LOG_FORMAT",
        "NO_COLOR",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    ran(&mut c)
}

#[test]
fn log_filter_flag_then_meshlane_log_then_rust_log() {
    let level = |r: &Ran| {
        assert_eq!(r.code, Some(0), "{r}");
        let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r}"));
        v["log_level"].as_str().expect("log_level").to_string()
    };
    let r = print_options(&[], &[]);
    assert_eq!(level(&r), "info");
    assert!(!r.stderr.contains("DEBUG"), "{r}");

    let r = print_options(&[], &[("RUST_LOG", "debug")]);
    assert_eq!(level(&r), "debug");
    assert!(
        r.stderr.contains("DEBUG") && r.stderr.contains("RUST_LOG"),
        "RUST_LOG honoured: {r}"
    );

    let r = print_options(&[], &[("RUST_LOG", "debug"), ("MESHLANE_LOG", "info")]);
    assert_eq!(level(&r), "info");
    assert!(!r.stderr.contains("DEBUG"), "MESHLANE_LOG wins: {r}");

    let r = print_options(
        &["--log-level", "debug"],
        &[("RUST_LOG", "warn"), ("MESHLANE_LOG", "warn")],
    );
    assert_eq!(level(&r), "debug");
    assert!(r.stderr.contains("DEBUG"), "the flag wins: {r}");

    // A filter that does not parse is a usage error naming where it came from.
    let r = print_options(&[], &[("RUST_LOG", "meshlane=loud")]);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("RUST_LOG"), "{r}");
}

#[test]
fn log_format_json_lines_and_no_colour_off_a_terminal() {
    for (args, env) in [
        (&["--log-format", "json"][..], &[][..]),
        (&[][..], &[("MESHLANE_LOG_FORMAT", "json")][..]),
    ] {
        let mut env = env.to_vec();
        env.push(("RUST_LOG", "debug"));
        let r = print_options(args, &env);
        assert_eq!(r.code, Some(0), "{r}");
        let lines: Vec<Value> = r
            .stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        let logging = lines
            .iter()
            .find(|v| v["message"] == "logging")
            .unwrap_or_else(|| panic!("no `logging` event: {r}"));
        assert_eq!(logging["level"], "DEBUG");
        assert_eq!(logging["from"], "RUST_LOG");
        assert!(logging["timestamp"].is_string());
    }
    // Text on a pipe (not a terminal): no colour.
    let r = print_options(&["--log-format", "text"], &[("RUST_LOG", "debug")]);
    assert!(r.stderr.contains("DEBUG"), "{r}");
    assert!(!r.stderr.contains('\x1b'), "ANSI escapes on a pipe: {r}");
}

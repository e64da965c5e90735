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
    agent::pod_list, data_dir, fakeapi::FakeApi, meshlane_bin, pod_entry, pod_state,
    shape::assert_shape, Agent, BrokenNetnsPins, Launch, Pod, PodSpec, ProbeResult, Proc, Sandbox,
    APP_UID,
};
use serde_json::Value;

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

const READY: Duration = Duration::from_secs(10);

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
    let sidecar = sb.start_sidecar(&a)?;
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
    let custom = custom_spec();
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

    // The same pod from stdin (`--pods -`), and from the API server.
    let mut child = Command::new(meshlane_bin())
        .args(["iptables", "--pods", "-", "--pod", "custom"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        &mut child.stdin.take().context("stdin")?,
        std::fs::read(&file)?.as_slice(),
    )?;
    let out = child.wait_with_output()?;
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout)?, golden);

    let api = FakeApi::start()?;
    api.apply(meshlane_tests::fakeapi::api_pod(&custom_spec(), "node-1"));
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let from_api = |pod: &str| {
        ran(Command::new(meshlane_bin())
            .arg("iptables")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--pod", pod]))
    };
    let r = from_api("default/custom");
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(r.stdout, golden);
    let r = from_api("default/nobody");
    assert_ne!(r.code, Some(0), "{r}");
    assert!(r.stderr.contains("default/nobody"), "{r}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn custom_spec() -> PodSpec {
    let mut custom = PodSpec {
        name: "custom".into(),
        meshed: true,
        ..Default::default()
    };
    custom.run_as_user = Some(1_000_670_000);
    custom.run_as_group = Some(1_000_670_001);
    custom
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
    assert!(r.stdout.contains("health: OK"), "{r}");
    let (code, doc) = status_json(&agent);
    assert_eq!(code, Some(0));
    assert_eq!(doc["healthy"], true, "{doc:#}");
    assert_eq!(problems(&doc), vec![], "{doc:#}");
    assert_shape(&doc, &status_shape(), "meshlane/status/v1");
    assert_eq!(doc["agent"]["pods"][0]["state"], "active", "{doc:#}");
    let r = status(&agent, &["-o", "yaml"]);
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(serde_yaml_ng::from_str::<Value>(&r.stdout)?, doc);

    // --log-format json: every line the agent wrote is one JSON object.
    let log = agent.log();
    assert!(log.contains("programs attached"), "{log}");
    for line in log.lines() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("a log line that is not JSON: {line:?}"))?;
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }

    // A cgroup program detached (its pinned link removed: nothing else holds it).
    let name = agent.detach_a_program()?;
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
    assert_shape(&doc, &status_shape(), "meshlane/status/v1");

    // shortcut and cleanup, with something to act on.
    let at = [
        "--bpffs".as_ref(),
        agent.bpffs.as_os_str(),
        "--state-dir".as_ref(),
        agent.state_dir.as_os_str(),
    ];
    let args: Vec<&std::ffi::OsStr> = ["shortcut".as_ref(), "off".as_ref()]
        .into_iter()
        .chain(at)
        .collect();
    let doc = json_and_yaml(&args, 0);
    let shape = serde_json::json!({"schema": "string", "shortcut": "string"});
    assert_shape(&doc, &shape, "meshlane/shortcut/v1");
    assert_eq!(doc["shortcut"], "off");
    let args: Vec<&std::ffi::OsStr> = std::iter::once("cleanup".as_ref()).chain(at).collect();
    let r = ran(Command::new(meshlane_bin())
        .args(&args)
        .args(["-o", "json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let doc: Value = serde_json::from_str(&r.stdout)?;
    assert_shape(&doc, &cleanup_shape(), "meshlane/cleanup/v1");
    assert!(doc["stopped_agent_pid"].is_u64(), "{doc:#}");
    assert!(!doc["removed"].as_array().unwrap().is_empty(), "{doc:#}");
    Ok(())
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

    // Back, with no pod changed on the node: the problem clears once the API
    // server answers again (backoff at most 16 s), not at the next pod event.
    api.start_again()?;
    agent.wait_status(Duration::from_secs(25), |st| st["api_error"].is_null())?;
    let r = status(&agent, &[]);
    assert_eq!(r.code, Some(0), "API server back: {r}");

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
        "MESHLANE_MAX_PODS",
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

/// `--max-pods` (or MESHLANE_MAX_PODS) out of range or not a number is a
/// wrong command line (exit 2) naming the flag, the value and what it must
/// be; a value whose maps could not exist fails naming the map and both
/// flags. A good one sizes the maps the pods share.
#[test]
fn max_pods_out_of_range_is_refused_naming_the_flag() {
    for bad in ["0", "100001", "many", "1e3", ""] {
        for r in [
            print_options(&["--max-pods", bad], &[]),
            print_options(&[], &[("MESHLANE_MAX_PODS", bad)]),
        ] {
            assert_eq!(r.code, Some(2), "--max-pods {bad:?}: {r}");
            assert!(
                r.stderr
                    .contains(&format!("invalid value '{bad}' for '--max-pods <N>'"))
                    && r.stderr.contains("from 1 to 100000"),
                "--max-pods {bad:?}: {r}"
            );
        }
    }
    let r = print_options(
        &["--max-pods", "100000", "--max-list-entries", "100000000"],
        &[],
    );
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("--max-pods 100000 with --max-list-entries 100000000: map PORTS would need"),
        "{r}"
    );

    let options = |r: Ran| -> Value {
        assert_eq!(r.code, Some(0), "{r}");
        serde_json::from_str(&r.stdout).expect("--print-options prints JSON")
    };
    let default = options(print_options(&[], &[]));
    assert_eq!(default["max_pods"], 110, "kubelet's default maxPods");
    assert_eq!(default["map_capacities"]["PODS"], 220, "{default:#}");
    let set = options(print_options(&[], &[("MESHLANE_MAX_PODS", "250")]));
    assert_eq!(set["max_pods"], 250);
    assert_eq!(set["map_capacities"]["PODS"], 500);
    // Four port lists at the quota and Istio's four inbound exclusions.
    assert_eq!(set["map_capacities"]["PORTS"], 500 * (4 * 256 + 4));
    assert!(
        set["map_capacities"].get("IN_FLIGHT").is_none(),
        "maps sized by connections keep the object's: {set:#}"
    );
}

/// Runs `meshlane ARGS -o json` and `-o yaml`: the JSON document, after
/// checking that both exit `code` and the YAML one is the same document.
#[track_caller]
fn json_and_yaml(args: &[&std::ffi::OsStr], code: i32) -> Value {
    let run = |format: &str| {
        let r = ran(Command::new(meshlane_bin()).args(args).args(["-o", format]));
        assert_eq!(r.code, Some(code), "{args:?} -o {format}: {r}");
        r.stdout
    };
    let json: Value = serde_json::from_str(&run("json")).expect("-o json parses");
    let yaml: Value = serde_yaml_ng::from_str(&run("yaml")).expect("-o yaml parses");
    assert_eq!(json, yaml, "-o json and -o yaml differ for {args:?}");
    json
}

fn finding_shape() -> Value {
    serde_json::json!({"kind": "string", "subject": "string", "message": "string"})
}

/// `meshlane status -o json` (meshlane/status/v1).
fn status_shape() -> Value {
    let pod = serde_json::json!({
        "name": "string", "ips": ["string"], "state": "string", "netns_cookie": "u64?",
        "netns": "string?", "config_errors": ["string"], "notes": ["string"],
        "conflicts": ["string"],
        "inbound_attached": "bool", "proxy_listening": "bool?",
    });
    serde_json::json!({
        "schema": "string", "healthy": "bool",
        "problems": [finding_shape()], "warnings": [finding_shape()],
        "bpffs": "string", "state_dir": "string",
        "programs": [{"name": "string", "hook": "string", "attached": "bool"}],
        "agent": {"?": {
            "pid": "u64", "running": "bool", "pods_file": "string", "pod_source": "string",
            "http_addr": "string?", "cgroup": "string", "file_error": "string?",
            "api_error": "string?", "map_update_errors": "u64", "pods": [pod],
        }},
        "maps": {"?": {"*": "u64"}},
        "map_capacity": {"?": {"*": "u64"}},
        "counters": {"?": {"*": "u64"}},
        "shortcut": "bool?",
        "shortcut_max_queued": "u64?",
        "pod_counters": {"*": {"*": "u64"}},
    })
}

/// `meshlane cleanup -o json` (meshlane/cleanup/v1).
fn cleanup_shape() -> Value {
    serde_json::json!({
        "schema": "string", "bpffs": "string", "stopped_agent_pid": "u64?", "removed": ["string"],
    })
}

#[test]
fn json_output_of_iptables_probe_cleanup_and_status_has_a_stable_shape() -> Result<()> {
    let tmp = TempDir::new("shapes")?;
    let dual = PodSpec {
        name: "dual".into(),
        meshed: true,
        ip: Some("10.244.1.5".parse()?),
        ip6: Some("fd00::5".parse()?),
        ..Default::default()
    }
    .annotate("traffic.sidecar.istio.io/excludeOutboundPorts", "nope");
    let pods = tmp.0.join("pods.json");
    std::fs::write(&pods, pod_list(&[dual]))?;

    let doc = json_and_yaml(
        &[
            "iptables".as_ref(),
            "--pods".as_ref(),
            pods.as_os_str(),
            "--pod".as_ref(),
            "default/dual".as_ref(),
            "--family".as_ref(),
            "both".as_ref(),
        ],
        0,
    );
    let shape = serde_json::json!({
        "schema": "string", "pod": "string", "family": "string",
        "rule_sets": [{"family": "string", "tool": "string", "rules": "string"}],
        "notes": ["string"], "config_errors": ["string"],
    });
    assert_shape(&doc, &shape, "meshlane/iptables/v1");
    assert_eq!(doc["rule_sets"][1]["tool"], "ip6tables-restore", "{doc:#}");
    assert!(doc["config_errors"][0].as_str().unwrap().contains("nope"));
    // The text form is the rule sets, each after its tool's comment.
    let text = ran(Command::new(meshlane_bin())
        .args([
            "iptables",
            "--family",
            "both",
            "--pod",
            "default/dual",
            "--pods",
        ])
        .arg(&pods));
    let sets = doc["rule_sets"].as_array().expect("rule sets");
    assert_eq!(
        text.stdout,
        format!(
            "# iptables-restore (IPv4)\n{}# ip6tables-restore (IPv6)\n{}",
            sets[0]["rules"].as_str().unwrap(),
            sets[1]["rules"].as_str().unwrap()
        )
    );

    let doc = json_and_yaml(&["probe".as_ref()], 0);
    let shape = serde_json::json!({
        "schema": "string", "kernel": "string", "cgroup_v2": "string", "bpffs": "string",
        "features": [{
            "feature": "string", "found": "string", "unknown_because": "string?",
            "since": "string?", "used_by": ["string"],
        }],
        "shortcut": {"supported": "bool", "detail": "string"},
        "refusal": "string?",
        "cgroup": "string",
        "cgroup_programs": [{
            "hook": "string", "id": "u64", "name": "string", "meshlane": "bool", "note": "string?",
        }],
        "cgroup_programs_error": "string?",
    });
    assert_shape(&doc, &shape, "meshlane/probe/v1");
    assert!(!doc["features"].as_array().unwrap().is_empty());

    let bpffs = tmp.0.join("bpffs");
    let state = tmp.0.join("state");
    let at = [
        "--bpffs".as_ref(),
        bpffs.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
    ];
    let status: Vec<&std::ffi::OsStr> = std::iter::once("status".as_ref()).chain(at).collect();
    let doc = json_and_yaml(&status, 1);
    assert_shape(&doc, &status_shape(), "meshlane/status/v1");
    assert!(doc["agent"].is_null() && !doc["problems"].as_array().unwrap().is_empty());
    let cleanup: Vec<&std::ffi::OsStr> = std::iter::once("cleanup".as_ref()).chain(at).collect();
    let doc = json_and_yaml(&cleanup, 0);
    assert_shape(&doc, &cleanup_shape(), "meshlane/cleanup/v1");
    Ok(())
}

/// `meshlane describe pod NAME ARGS` on the agent's pins and state.
fn describe(agent: &Agent, name: &str, args: &[&str]) -> Ran {
    ran(Command::new(meshlane_bin())
        .args(["describe", "pod", name])
        .args(args)
        .arg("--bpffs")
        .arg(&agent.bpffs)
        .arg("--state-dir")
        .arg(&agent.state_dir))
}

fn describe_json(agent: &Agent, name: &str) -> Value {
    let r = describe(agent, name, &["-o", "json"]);
    assert_eq!(r.code, Some(0), "{r}");
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r}"))
}

/// `meshlane describe pod -o json` (meshlane/describe-pod/v1).
fn describe_shape() -> Value {
    serde_json::json!({
        "schema": "string", "pod": "string", "state": "string", "captured": "bool",
        "why": ["string"], "ips": ["string"], "netns": "string?", "netns_cookie": "u64?",
        "config": "any?", "config_errors": ["string"], "notes": ["string"],
        "conflicts": ["string"],
        "kernel": {"?": {
            "pod_entry": "bool", "flags": ["string"], "proxy_uid": "u64?", "proxy_gid": "u64?",
            "outbound_capture_port": "u64?", "inbound_capture_port": "u64?",
            "ports": {"*": ["u64"]}, "interfaces": {"*": ["string"]},
            "listeners": [{"port": "u64", "family": "string", "owner": "u64"}],
            "inbound_attached": "bool",
        }},
        "counters": {"*": "u64"},
    })
}

/// Issue 16: describe explains a captured pod (its entries, listeners and
/// counters), a pod that is not meshed, and a pod in error, each with why;
/// an unknown pod exits 1.
#[test]
fn describe_pod_says_why_a_pod_is_or_is_not_captured() -> Result<()> {
    let mut n = node("clidescribe")?;
    let b = n.sb.add_pod("b")?;
    let c = n.sb.add_pod("c")?;
    let a_spec =
        PodSpec::meshed(&n.a).annotate("traffic.sidecar.istio.io/excludeOutboundPorts", "5555");
    // A pod in error first, while no pod's inbound link is pinned (the
    // broken pins need the directory empty).
    let mut agent = Agent::start(&n.sb, &[PodSpec::plain(&b)])?;
    {
        let _broken = BrokenNetnsPins::new(&agent.bpffs)?;
        agent.write_pods(&[PodSpec::plain(&b), PodSpec::meshed(&c)])?;
        agent.wait_status(READY, |st| {
            pod_state(st, "default/c").as_deref() == Some("error")
        })?;
        let d = describe_json(&agent, "default/c");
        assert_shape(&d, &describe_shape(), "meshlane/describe-pod/v1");
        assert_eq!(d["captured"], false, "{d:#}");
        assert!(
            d["why"][0].as_str().unwrap().starts_with("not captured:"),
            "{d:#}"
        );
    }

    agent.write_pods(&[a_spec, PodSpec::plain(&b)])?;
    wait_listening(&mut agent, "default/a")?;
    let b_ip = b.ipv4().context("b's address")?;
    let probe = |port: u16| {
        let to = format!("{b_ip}:{port}");
        n.sb.run(
            &n.a,
            APP_UID,
            APP_UID,
            mtest(),
            &["probe", "--connect", &to],
        )
    };
    // One connection through the sidecar, so a counter moves.
    let out = probe(9080)?;
    assert!(ProbeResult::parse(&out)?.connected, "{out}");
    // And one its excludeOutboundPorts leaves alone (refused by b: nothing
    // listens there; the rule counts it at connect).
    probe(5555)?;

    let d = describe_json(&agent, "default/a");
    assert_shape(&d, &describe_shape(), "meshlane/describe-pod/v1");
    assert_eq!(d["state"], "active", "{d:#}");
    // Per rule, as `iptables -v` counts: the exclusion returned one.
    assert!(
        d["counters"]["passed_excluded_outbound_port"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{d:#}"
    );
    assert_eq!(d["captured"], true, "{d:#}");
    assert!(
        d["why"][0].as_str().unwrap().starts_with("captured"),
        "{d:#}"
    );
    assert_eq!(d["kernel"]["pod_entry"], true, "{d:#}");
    assert_eq!(d["kernel"]["inbound_attached"], true, "{d:#}");
    assert!(
        d["kernel"]["ports"]["exclude-outbound"]
            .as_array()
            .is_some_and(|p| p.contains(&serde_json::json!(5555))),
        "{d:#}"
    );
    assert!(
        d["kernel"]["listeners"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l["port"] == 15006 && l["owner"] == 1337)),
        "{d:#}"
    );
    assert_eq!(
        d["config"]["exclude_outbound_ports"],
        serde_json::json!([5555]),
        "{d:#}"
    );
    assert!(
        d["counters"]["redirect_outbound"].as_u64().unwrap_or(0) >= 1,
        "{d:#}"
    );
    let text = describe(&agent, "a", &[]);
    assert_eq!(text.code, Some(0), "{text}");
    assert!(text.stdout.contains("Captured:  yes"), "{text}");

    let d = describe_json(&agent, "default/b");
    assert_shape(&d, &describe_shape(), "meshlane/describe-pod/v1");
    assert_eq!(d["state"], "not-meshed", "{d:#}");
    assert_eq!(d["captured"], false, "{d:#}");
    assert!(
        d["why"][0].as_str().unwrap().contains("not meshed"),
        "{d:#}"
    );
    assert!(d["kernel"].is_null(), "{d:#}");

    let r = describe(&agent, "default/nobody", &[]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("default/nobody"), "{r}");
    Ok(())
}

/// Issue 16: shell completions name every command.
#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let r = ran(Command::new(meshlane_bin()).args(["completions", shell]));
        assert_eq!(r.code, Some(0), "{shell}: {r}");
        for cmd in ["status", "describe", "iptables", "probe", "cleanup"] {
            assert!(r.stdout.contains(cmd), "{shell} completions lack {cmd}");
        }
    }
    let r = ran(Command::new(meshlane_bin()).args(["completions", "tcsh"]));
    assert_eq!(r.code, Some(2), "{r}");
}

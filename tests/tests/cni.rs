//! meshlane-cni as a runtime uses it: Debian's bridge, host-local and
//! loopback plugins set up a fresh pod namespace from a real conflist with
//! meshlane-cni chained last, invoked with the CNI environment and stdin the
//! spec gives (the runtime shim is `meshlane_tests::cni`). An app starts in
//! the namespace the instant ADD returns and connects every 5 ms: each
//! connection lands on the sidecar or is refused while the sidecar is not
//! listening yet; none reaches its destination directly.
use std::{
    os::unix::net::UnixListener,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use meshlane::cni::spec::code;
use meshlane_tests::{
    cni::{self, Invocation, Runtime},
    read_sidecar_log, Agent, Pod, PodSpec, Sandbox, APP_UID,
};
use serde_json::Value;

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

/// A pods-file entry for a pod the runtime has not given an address yet
/// (what the API server shows between scheduling and the sandbox).
fn pending(name: &str, meshed: bool) -> PodSpec {
    PodSpec {
        name: name.into(),
        meshed,
        ..Default::default()
    }
}

/// What became of each connection of `mtest connect-loop`.
#[derive(Debug, Default)]
struct Tally {
    issued: usize,
    on_sidecar: usize,
    refused: usize,
    direct: Vec<Value>,
    other: Vec<Value>,
    /// When the sidecar listened, in the app's clock (ms since its start).
    sidecar_ready_ms: Option<u64>,
    /// Refused although issued after the sidecar listened.
    refused_late: Vec<Value>,
}

/// Runs the app from the instant this is called: `count` connections, one
/// every 5 ms, to `to`, starting `sidecar` after `sidecar_after`.
fn first_packets(
    sb: &Sandbox,
    pod: &Pod,
    to: &str,
    count: u32,
    sidecar_after: Option<Duration>,
) -> Result<Tally> {
    let started = Instant::now();
    let count_s = count.to_string();
    let mut app = sb.spawn(
        pod,
        APP_UID,
        APP_UID,
        mtest(),
        &[
            "connect-loop",
            "--connect",
            to,
            "--count",
            &count_s,
            "--every-ms",
            "5",
            "--timeout-ms",
            "1000",
        ],
    )?;
    let mut sidecar = None;
    let mut sidecar_ready_ms = None;
    if let Some(after) = sidecar_after {
        std::thread::sleep(after.saturating_sub(started.elapsed()));
        sidecar = Some(sb.start_sidecar(pod)?);
        sidecar_ready_ms = Some(started.elapsed().as_millis() as u64);
    }
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines.len() < count as usize && Instant::now() < deadline {
        if let Some(l) = app.next_line(Duration::from_secs(5)) {
            lines.push(serde_json::from_str::<Value>(&l).with_context(|| l.clone())?);
        } else if !app.running() {
            break;
        }
    }
    let log = read_sidecar_log(&sb.sidecar_log(pod));
    drop(sidecar);
    let mut t = Tally {
        issued: lines.len(),
        sidecar_ready_ms,
        ..Default::default()
    };
    for l in lines {
        let local = l["local"].as_str().unwrap_or_default();
        if l["connected"] == true {
            if log.iter().any(|r| r.peer == local && r.listener == 15001) {
                t.on_sidecar += 1;
            } else {
                t.direct.push(l);
            }
        } else if l["errno"] == "ECONNREFUSED" {
            t.refused += 1;
            // The app's clock starts a little after ours: a refusal stamped
            // after the sidecar listened (by our clock) is late for sure.
            if sidecar_ready_ms.is_some_and(|r| l["ms"].as_u64().unwrap_or(0) > r) {
                t.refused_late.push(l);
            }
        } else {
            t.other.push(l);
        }
    }
    Ok(t)
}

#[test]
fn a_new_pod_is_captured_from_its_first_packet() -> Result<()> {
    let mut sb = Sandbox::new("cni-first")?;
    let b = sb.add_pod("b")?;
    let _server = sb.start_server(&b, "b", &["0.0.0.0:9080"])?;
    let agent = Agent::start(
        &sb,
        &[PodSpec::plain(&b), pending("c", true), pending("d", true)],
    )?;
    let to = format!("{}:9080", b.ip);

    // Today's window, without the plugin: the agent knows d is meshed but
    // not where it runs until the API server reports its IP.
    let mut plain = Runtime::new(&sb, cni::conflist(&sb, false, &[]))?;
    let mut d = plain.new_netns(&sb, "d")?;
    let inv_d = Invocation::pod("ADD", "d", &ns_path(&d));
    plain
        .add(&mut d, &inv_d)?
        .map_err(|o| anyhow::anyhow!("{o:?}"))?;
    let without = first_packets(&sb, &d, &to, 40, None)?;
    eprintln!("without meshlane-cni: {without:?}");
    assert!(
        !without.direct.is_empty(),
        "without the plugin a new pod's first connections go direct: {without:?}"
    );

    let entry = cni::meshlane_entry(&agent.state_dir, 10_000, Some(&agent.pods_file));
    let mut rt = Runtime::new(&sb, cni::conflist(&sb, false, &[entry]))?;
    let mut c = rt.new_netns(&sb, "c")?;
    let inv = Invocation::pod("ADD", "c", &ns_path(&c));
    let t0 = Instant::now();
    let result = rt
        .add(&mut c, &inv)?
        .map_err(|o| anyhow::anyhow!("ADD failed: {o:?}"))?;
    eprintln!("ADD took {:?}: {result}", t0.elapsed());
    let tally = first_packets(&sb, &c, &to, 300, Some(Duration::from_millis(300)))?;
    eprintln!(
        "with meshlane-cni: {} connections issued from the instant ADD returned, {} landed on the \
         sidecar, {} refused before it listened (at {:?} ms), {} direct, {} other",
        tally.issued,
        tally.on_sidecar,
        tally.refused,
        tally.sidecar_ready_ms,
        tally.direct.len(),
        tally.other.len()
    );
    assert_eq!(tally.issued, 300, "{tally:?}");
    assert!(tally.direct.is_empty(), "went direct: {:#?}", tally.direct);
    assert!(
        tally.other.is_empty(),
        "neither captured nor refused: {:#?}",
        tally.other
    );
    assert!(
        tally.refused > 0,
        "the app ran before the sidecar listened: {tally:?}"
    );
    assert!(tally.on_sidecar > 100, "{tally:?}");

    // prevResult passes through unchanged: the bridge plugin's result.
    assert_eq!(result["ips"][0]["address"], format!("{}/25", c.ip));

    // CHECK through the whole chain.
    let check = rt.check_or_del(
        &Invocation {
            command: "CHECK",
            ..inv.clone()
        },
        &result,
    )?;
    assert!(check.iter().all(|o| o.ok), "CHECK: {check:#?}");

    // VERSION.
    let v = rt.exec(
        "meshlane-cni",
        &Value::Null,
        &Invocation {
            command: "VERSION",
            ..inv.clone()
        },
    )?;
    let v: Value = serde_json::from_str(&v.stdout)?;
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&"0.4.0".into()));

    // DEL through the chain, twice (idempotent), and for a pod nobody knows.
    let del = Invocation {
        command: "DEL",
        ..inv.clone()
    };
    for _ in 0..2 {
        let outs = rt.check_or_del(&del, &result)?;
        assert!(outs.iter().all(|o| o.ok), "DEL: {outs:#?}");
    }
    let ghost = Invocation::pod("DEL", "ghost", Path::new("/nonexistent"));
    assert!(
        rt.exec("meshlane-cni", &rt_conf(&rt_entry(&agent)), &ghost)?
            .ok
    );
    let report = agent.status_cmd()?;
    assert_eq!(
        report["maps"]["pods"], 0,
        "DEL removed c's entries: {report}"
    );
    // CHECK after DEL: the maps no longer hold the pod.
    let after = rt.exec(
        "meshlane-cni",
        &rt_conf_prev(&rt_entry(&agent), &result),
        &Invocation {
            command: "CHECK",
            ..inv
        },
    )?;
    assert_eq!(after.error().code, code::NOT_CAPTURED, "{after:?}");
    Ok(())
}

fn ns_path(p: &Pod) -> std::path::PathBuf {
    Path::new("/run/netns").join(&p.netns)
}

fn rt_entry(agent: &Agent) -> Value {
    cni::meshlane_entry(&agent.state_dir, 1500, Some(&agent.pods_file))
}

/// meshlane-cni's stdin as a runtime builds it from `entry`.
fn rt_conf(entry: &Value) -> Value {
    let mut c = entry.clone();
    c["cniVersion"] = "1.0.0".into();
    c["name"] = "test-net".into();
    c
}

fn rt_conf_prev(entry: &Value, prev: &Value) -> Value {
    let mut c = rt_conf(entry);
    c["prevResult"] = prev.clone();
    c
}

/// A socket that answers every request with an HTTP error (something that
/// is not the agent), until dropped.
struct Garbage {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Garbage {
    fn serve(state_dir: &Path) -> Result<Garbage> {
        use std::io::{Read, Write};
        std::fs::create_dir_all(state_dir)?;
        let l = UnixListener::bind(state_dir.join(meshlane::cni::proto::SOCKET))?;
        l.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 4096];
                        let _ = c.read(&mut buf);
                        let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Garbage {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Garbage {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn bad_input_is_a_clear_cni_error_and_never_a_bypass() -> Result<()> {
    let sb = Sandbox::new("cni-bad")?;
    let agent = Agent::start(
        &sb,
        &[
            pending("m", true),
            pending("u", false),
            pending("six", true),
        ],
    )?;
    let pods_file = agent.pods_file.clone();
    let inv = |name: &str| Invocation::pod("ADD", name, Path::new("/run/netns/nonexistent"));
    let prev: Value =
        serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": "10.200.0.9/25"}]});
    let conf = rt_conf_prev(&rt_entry(&agent), &prev);
    let rt = Runtime::new(&sb, cni::conflist(&sb, false, &[]))?;

    // Malformed config on stdin.
    let o = rt.exec_raw("meshlane-cni", b"{\"cniVersion\": \"1.0.0\", ", &inv("m"))?;
    let e = o.error();
    assert_eq!(e.code, code::DECODE, "{e:?}");
    assert!(e.msg.contains("network config on stdin"), "{e:?}");
    let mut no_type = conf.clone();
    no_type.as_object_mut().unwrap().remove("type");
    let e = rt.exec("meshlane-cni", &no_type, &inv("m"))?.error();
    assert_eq!(
        (e.code, e.msg.contains("\"type\"")),
        (code::INVALID_CONFIG, true),
        "{e:?}"
    );

    // Missing CNI_NETNS.
    let e = rt
        .exec(
            "meshlane-cni",
            &conf,
            &Invocation {
                netns: None,
                ..inv("m")
            },
        )?
        .error();
    assert_eq!(e.code, code::INVALID_ENV, "{e:?}");
    assert!(e.msg.contains("CNI_NETNS"), "{e:?}");

    // A pod the agent's source does not list: held, then a clear error.
    let o = rt.exec("meshlane-cni", &conf, &inv("ghost"))?;
    let e = o.error();
    assert_eq!(e.code, code::TRY_AGAIN, "{e:?}");
    assert!(
        e.msg.contains("default/ghost") && e.msg.contains("does not list"),
        "{e:?}"
    );

    // A sandbox for a newer pod of the same name than the source lists.
    let newer = Invocation {
        args: inv("m")
            .args
            .replace("K8S_POD_UID=uid-m", "K8S_POD_UID=uid-m2"),
        ..inv("m")
    };
    let e = rt.exec("meshlane-cni", &conf, &newer)?.error();
    assert_eq!(e.code, code::TRY_AGAIN, "{e:?}");
    assert!(
        e.msg.contains("uid uid-m,") && e.msg.contains("uid-m2"),
        "{e:?}"
    );

    // A namespace that does not exist, for a meshed pod the agent knows.
    let e = rt.exec("meshlane-cni", &conf, &inv("m"))?.error();
    assert_eq!(e.code, code::AGENT_REFUSED, "{e:?}");
    assert!(
        e.msg.contains("default/m") && e.msg.contains("nonexistent"),
        "{e:?}"
    );

    // The agent not running (a state directory nobody serves), then a
    // socket answering garbage: the meshed pod is held, the unmeshed starts.
    let down = sb.dir().join("no-agent");
    let entry = cni::meshlane_entry(&down, 1500, Some(&pods_file));
    let c = rt_conf_prev(&entry, &prev);
    let t = Instant::now();
    let e = rt.exec("meshlane-cni", &c, &inv("m"))?.error();
    assert_eq!(e.code, code::TRY_AGAIN, "{e:?}");
    assert!(
        e.msg.contains("default/m") && e.msg.contains("not reachable"),
        "{e:?}"
    );
    assert!(e.details.contains("meshed"), "{e:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "waited for the agent"
    );
    let t = Instant::now();
    let o = rt.exec("meshlane-cni", &c, &inv("u"))?;
    assert!(
        o.ok,
        "an unmeshed pod is not blocked by the agent being down: {o:?}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&o.stdout)?,
        prev,
        "prevResult unchanged"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "at once: {:?}",
        t.elapsed()
    );
    // Without a podSource nothing tells an unmeshed pod: held too.
    let blind = rt_conf_prev(&cni::meshlane_entry(&down, 500, None), &prev);
    let e = rt.exec("meshlane-cni", &blind, &inv("u"))?.error();
    assert_eq!(e.code, code::TRY_AGAIN, "{e:?}");
    assert!(e.details.contains("no podSource"), "{e:?}");

    let garbage = Garbage::serve(&down)?;
    let e = rt.exec("meshlane-cni", &c, &inv("m"))?.error();
    assert_eq!(e.code, code::AGENT_PROTOCOL, "{e:?}");
    assert!(
        e.msg.contains("default/m") && e.msg.contains("not a meshlane reply"),
        "{e:?}"
    );
    assert!(
        rt.exec("meshlane-cni", &c, &inv("u"))?.ok,
        "unmeshed pod, garbage agent"
    );
    // DEL never fails, whatever answers.
    assert!(
        rt.exec(
            "meshlane-cni",
            &c,
            &Invocation {
                command: "DEL",
                ..inv("m")
            }
        )?
        .ok
    );
    drop(garbage);
    Ok(())
}

/// With the agent down, the plugin reads the pod from the API server
/// through the kubeconfig its podSource names: an unmeshed pod starts at
/// once, a meshed one is held, and one the API server does not have is held
/// with the reason.
#[test]
fn with_the_agent_down_the_plugin_asks_the_api_server() -> Result<()> {
    let sb = Sandbox::new("cni-kube")?;
    let mut api = meshlane_tests::fakeapi::FakeApi::start()?;
    for spec in [pending("m", true), pending("u", false)] {
        api.apply(meshlane_tests::fakeapi::api_pod(&spec, "node-1"));
    }
    let kubeconfig = sb.dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let mut entry = cni::meshlane_entry(&sb.dir().join("no-agent"), 1000, None);
    entry["podSource"] = serde_json::json!({"kubeconfig": kubeconfig});
    let prev: Value =
        serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": "10.200.0.9/25"}]});
    let conf = rt_conf_prev(&entry, &prev);
    let rt = Runtime::new(&sb, cni::conflist(&sb, false, &[]))?;
    let inv = |name: &str| Invocation::pod("ADD", name, Path::new("/run/netns/nonexistent"));
    let t = Instant::now();
    let o = rt.exec_here("meshlane-cni", &conf, &inv("u"))?;
    assert!(o.ok, "unmeshed, by the API server: {o:?}");
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    let e = rt.exec_here("meshlane-cni", &conf, &inv("m"))?.error();
    assert_eq!(e.code, code::TRY_AGAIN, "{e:?}");
    assert!(e.details.contains("says the pod is meshed"), "{e:?}");
    let e = rt.exec_here("meshlane-cni", &conf, &inv("ghost"))?.error();
    assert!(e.details.contains("does not list the pod"), "{e:?}");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.path == "/api/v1/namespaces/default/pods/u"),
        "the plugin read the pod itself"
    );
    // The API server down too: held, naming why.
    api.stop();
    let e = rt.exec_here("meshlane-cni", &conf, &inv("u"))?.error();
    assert_eq!(e.code, code::TRY_AGAIN, "{e:?}");
    assert!(e.details.contains("cannot be told"), "{e:?}");
    Ok(())
}

/// An IPv6 pod gets `::6/128` on lo (the proxy's IPv6 inbound passthrough
/// source, which istio-iptables adds) from the plugin, which runs with the
/// runtime's privileges.
#[test]
fn an_ipv6_pod_gets_the_passthrough_address() -> Result<()> {
    let sb = Sandbox::new("cni-six")?;
    let agent = Agent::start(&sb, &[pending("six", true), pending("plain6", false)])?;
    let entry = cni::meshlane_entry(&agent.state_dir, 10_000, Some(&agent.pods_file));
    let mut rt = Runtime::new(&sb, cni::conflist(&sb, true, &[entry]))?;
    for (name, want) in [("six", true), ("plain6", false)] {
        let mut p = rt.new_netns(&sb, name)?;
        let inv = Invocation::pod("ADD", name, &ns_path(&p));
        rt.add(&mut p, &inv)?
            .map_err(|o| anyhow::anyhow!("ADD {name}: {o:?}"))?;
        assert!(p.ip6.is_some(), "host-local gave {name} an IPv6 address");
        let lo = sb.netns_exec(&p.netns, "ip", &["-6", "addr", "show", "dev", "lo"], None)?;
        assert_eq!(lo.contains("::6/128"), want, "{name}: {lo}");
    }
    let st = agent.status()?;
    assert_eq!(
        meshlane_tests::pod_state(&st, "default/six").as_deref(),
        Some("active"),
        "{st}"
    );
    Ok(())
}

/// A node reboot: nothing pinned and no agent while the runtime creates a
/// meshed pod. The plugin waits (bounded) for the agent rather than letting
/// the pod through; the agent comes up, captures it, and ADD returns; the
/// app's first packets are captured. A later agent restart keeps the pod
/// bound to the namespace the runtime named.
#[test]
fn after_a_reboot_the_plugin_waits_for_the_agent() -> Result<()> {
    let mut sb = Sandbox::new("cni-boot")?;
    let b = sb.add_pod("b")?;
    let _server = sb.start_server(&b, "b", &["0.0.0.0:9080"])?;
    let pods = [PodSpec::plain(&b), pending("c", true), pending("u", false)];
    // Where Agent::start will keep its pods file and state.
    let pods_file = sb.dir().join("pods.json");
    let state_dir = sb.dir().join("agent-state");
    std::fs::write(&pods_file, meshlane_tests::agent::pod_list(&pods))?;
    let entry = cni::meshlane_entry(&state_dir, 20_000, Some(&pods_file));
    let mut rt = Runtime::new(&sb, cni::conflist(&sb, false, &[entry]))?;

    // An unmeshed pod starts at once, agent or not.
    let mut u = rt.new_netns(&sb, "u")?;
    let t = Instant::now();
    let inv_u = Invocation::pod("ADD", "u", &ns_path(&u));
    rt.add(&mut u, &inv_u)?
        .map_err(|o| anyhow::anyhow!("ADD u: {o:?}"))?;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    let mut c = rt.new_netns(&sb, "c")?;
    let inv = Invocation::pod("ADD", "c", &ns_path(&c));
    let t0 = Instant::now();
    let (result, c, mut agent, tally) = std::thread::scope(|s| -> Result<_> {
        let rt = &rt;
        let add = s.spawn(move || rt.add(&mut c, &inv).map(|r| (r, c)));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!add.is_finished(), "ADD returned before any agent ran");
        let agent = Agent::start(&sb, &pods)?;
        let (r, c) = add.join().expect("ADD thread")?;
        let result = r.map_err(|o| anyhow::anyhow!("ADD failed: {o:?}"))?;
        let tally = first_packets(
            &sb,
            &c,
            &format!("{}:9080", b.ip),
            200,
            Some(Duration::from_millis(200)),
        )?;
        Ok((result, c, agent, tally))
    })?;
    eprintln!(
        "ADD waited {:?} for the agent; then {} connections: {} on the sidecar, {} refused, {} direct",
        t0.elapsed(),
        tally.issued,
        tally.on_sidecar,
        tally.refused,
        tally.direct.len()
    );
    assert!(t0.elapsed() >= Duration::from_millis(1500));
    assert_eq!(tally.issued, 200, "{tally:?}");
    assert!(
        tally.direct.is_empty() && tally.other.is_empty(),
        "{tally:?}"
    );
    assert!(tally.on_sidecar > 50, "{tally:?}");
    let cookie = |agent: &Agent| -> Result<Value> {
        Ok(
            meshlane_tests::pod_entry(&agent.status()?, "default/c").context("c in status")?
                ["netns_cookie"]
                .clone(),
        )
    };
    let before = cookie(&agent)?;
    assert!(before.is_u64(), "{before}");

    // An impostor: another namespace takes c's address while the agent is
    // down; the restarted agent keeps c where the runtime put it.
    // The source has c's address by now, as the API server would.
    agent.stop_process(libc::SIGKILL)?;
    let imp = rt.new_netns(&sb, "imp")?;
    sb.netns_exec(
        &imp.netns,
        "ip",
        &["addr", "add", &format!("{}/32", c.ip), "dev", "lo"],
        None,
    )?;
    let mut c_now = PodSpec::meshed(&c);
    c_now.name = "c".into();
    agent.write_pods(&[PodSpec::plain(&b), c_now, pending("u", false)])?;
    agent.restart()?;
    assert_eq!(cookie(&agent)?, before, "{}", agent.status()?);
    let report = agent.status_cmd()?;
    assert_eq!(
        report["maps"]["pods"], 1,
        "only c's namespace is captured as c, not the impostor's: {report}"
    );
    let _sidecar = sb.start_sidecar(&c)?;
    let again = first_packets(&sb, &c, &format!("{}:9080", b.ip), 20, None)?;
    assert_eq!(again.on_sidecar, 20, "{again:?}");
    let check = rt.check_or_del(
        &Invocation {
            command: "CHECK",
            ..Invocation::pod("CHECK", "c", &ns_path(&c))
        },
        &result,
    )?;
    assert!(
        check.iter().all(|o| o.ok),
        "CHECK after the restart: {check:#?}"
    );
    Ok(())
}

/// The DaemonSet's installer: copies the plugin into the bin directory,
/// chains it last in the primary conflist, puts it back when another agent
/// rewrites the file, leaves it in place when stopped, and `uninstall`
/// removes both. The conflist it wrote then sets up a captured pod.
#[test]
fn the_installer_chains_the_plugin_and_keeps_it_chained() -> Result<()> {
    let sb = Sandbox::new("cni-inst")?;
    let agent = Agent::start(&sb, &[pending("c", true)])?;
    let (bin, conf) = (sb.dir().join("cni-bin"), sb.dir().join("cni-conf"));
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(&conf)?;
    let primary = conf.join("10-net.conflist");
    let original = cni::conflist(&sb, false, &[]);
    std::fs::write(&primary, original.to_string())?;
    std::fs::write(
        conf.join("99-other.conf"),
        r#"{"cniVersion":"1.0.0","name":"o","type":"ptp"}"#,
    )?;
    let chained = |path: &Path| -> Result<Option<Value>> {
        let v: Value = serde_json::from_slice(&std::fs::read(path)?)?;
        let last = v["plugins"].as_array().and_then(|p| p.last()).cloned();
        Ok(last.filter(|l| l["type"] == "meshlane-cni"))
    };
    let wait_chained = |path: &Path| -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = chained(path)? {
                return Ok(e);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "not chained: {}",
                std::fs::read_to_string(path)?
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut installer = Reap(
        std::process::Command::new(cni::meshlane_cni_bin())
            .args(["install", "--bin-dir"])
            .arg(&bin)
            .arg("--conf-dir")
            .arg(&conf)
            .arg("--state-dir")
            .arg(&agent.state_dir)
            .arg("--pods-file")
            .arg(&agent.pods_file)
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let entry = wait_chained(&primary)?;
    assert_eq!(
        entry["stateDir"],
        agent.state_dir.display().to_string(),
        "{entry}"
    );
    assert!(bin.join("meshlane-cni").is_file());
    assert!(
        chained(&conf.join("99-other.conf")).is_err()
            || chained(&conf.join("99-other.conf"))?.is_none()
    );

    // Another agent rewrites the primary without the entry: back within seconds.
    std::fs::write(&primary, original.to_string())?;
    wait_chained(&primary)?;

    // The conflist as installed sets up a captured pod.
    let installed: Value = serde_json::from_slice(&std::fs::read(&primary)?)?;
    let mut rt = Runtime::new(&sb, installed)?;
    let mut c = rt.new_netns(&sb, "c")?;
    let inv = Invocation::pod("ADD", "c", &ns_path(&c));
    rt.add(&mut c, &inv)?
        .map_err(|o| anyhow::anyhow!("ADD through the installed conflist: {o:?}"))?;
    let st = agent.status()?;
    assert_eq!(
        meshlane_tests::pod_state(&st, "default/c").as_deref(),
        Some("active"),
        "{st}"
    );

    // Stopped (a rollout): the entry stays.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(installer.0.id() as i32, libc::SIGTERM) };
    let status = installer.0.wait()?;
    assert!(status.success(), "{status}");
    assert!(
        chained(&primary)?.is_some(),
        "the entry stays while no installer runs"
    );

    // Uninstall, twice.
    for _ in 0..2 {
        let out = std::process::Command::new(cni::meshlane_cni_bin())
            .args(["uninstall", "--bin-dir"])
            .arg(&bin)
            .arg("--conf-dir")
            .arg(&conf)
            .output()?;
        assert!(out.status.success(), "{out:?}");
    }
    let left: Value = serde_json::from_slice(&std::fs::read(&primary)?)?;
    assert_eq!(left, original, "uninstall restores the conflist");
    assert!(!bin.join("meshlane-cni").exists());
    drop(rt);
    Ok(())
}

/// Removes what podman leaves for a `--cgroup-parent` outside the unified
/// hierarchy (this machine's cgroups are hybrid: runc also makes the parent
/// in every v1 hierarchy), children first.
struct V1Cgroups(String);

impl Drop for V1Cgroups {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for h in rd.flatten() {
            let dir = h.path().join(&self.0);
            if h.file_name() == "unified" || !dir.is_dir() {
                continue;
            }
            let mut stack = vec![dir.clone()];
            let mut all = Vec::new();
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
                all.push(d);
            }
            for d in all.iter().rev() {
                if let Err(e) = std::fs::remove_dir(d) {
                    eprintln!("meshlane-tests: removing {}: {e}", d.display());
                }
            }
        }
    }
}

/// A real runtime: Debian's podman (CNI backend, runc) starts a container
/// from a local root filesystem in the sandbox's node namespace, with the
/// sandbox's conflist and meshlane-cni chained last. podman puts the
/// container's name in CNI_ARGS' K8S_POD_NAME and no namespace. The
/// container's shell connects every 5 ms from its first instant: every
/// connection that succeeds went through the sidecar.
#[test]
fn a_container_podman_starts_is_captured_from_its_first_packet() -> Result<()> {
    if std::process::Command::new("podman")
        .arg("--version")
        .output()
        .is_err()
    {
        meshlane_tests::skip_loudly("podman is not installed (apt-get install podman runc)");
        return Ok(());
    }
    let mut sb = Sandbox::new("cni-podman")?;
    let b = sb.add_pod("b")?;
    let _server = sb.start_server(&b, "b", &["0.0.0.0:9080"])?;
    // podman names the container in K8S_POD_NAME, and no namespace.
    let name = "app";
    let agent = Agent::start(&sb, &[PodSpec::plain(&b), pending(name, true)])?;
    let net = cni::conflist(
        &sb,
        false,
        &[cni::meshlane_entry(
            &agent.state_dir,
            10_000,
            Some(&agent.pods_file),
        )],
    );
    let net_dir = sb.dir().join("podman-net");
    std::fs::create_dir_all(&net_dir)?;
    std::fs::write(net_dir.join("net.conflist"), net.to_string())?;
    let root = sb.dir().join("rootfs");
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy("/usr/bin/busybox", root.join("bin/busybox"))?;
    for tool in ["sh", "nc", "usleep", "echo"] {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(tool));
    }
    let cg_rel = sb
        .cgroup()
        .strip_prefix(meshlane_tests::cgroup2_root()?)?
        .to_string_lossy()
        .into_owned();
    let _v1 = V1Cgroups(cg_rel.clone());
    let script = format!(
        "i=0; while [ $i -lt 200 ]; do if echo hello | nc -w 1 {} 9080 >/dev/null 2>&1; \
         then echo ok; else echo refused; fi; i=$((i+1)); usleep 5000; done",
        b.ip
    );
    // podman looks for plugins in its own list of directories.
    let conf = sb.dir().join("containers.conf");
    let plugin_dir = cni::meshlane_cni_bin().parent().unwrap().to_path_buf();
    std::fs::write(
        &conf,
        format!(
            "[network]\ncni_plugin_dirs = [\"{}\", \"{}\"]\n",
            cni::DEBIAN_CNI_BIN,
            plugin_dir.display()
        ),
    )?;
    let node = std::fs::File::open(format!("/run/netns/{}", sb.node_netns()))?;
    let node_fd = std::os::fd::AsRawFd::as_raw_fd(&node);
    let mut cmd = std::process::Command::new("podman");
    cmd.env("CONTAINERS_CONF", &conf)
        .arg("--network-config-dir")
        .arg(&net_dir)
        .args(["run", "--rm", "--name", name, "--runtime", "runc"])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args(["--network", net["name"].as_str().unwrap()])
        .arg(format!("--cgroup-parent=/{cg_rel}/podman"))
        .arg("--rootfs")
        .arg(&root)
        .args(["/bin/sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // podman in the node's namespace: the bridge plugin's side is there.
    // SAFETY: setns only, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::setns(node_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    struct Podman(std::process::Child);
    impl Drop for Podman {
        fn drop(&mut self) {
            let _ = std::process::Command::new("podman")
                .args(["rm", "-f", "-t", "0", "app"])
                .output();
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let t0 = Instant::now();
    let mut podman = Podman(cmd.spawn()?);
    drop(node);
    let read = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let stdout = read(podman.0.stdout.take().map(|r| Box::new(r) as _));
    let stderr = read(podman.0.stderr.take().map(|r| Box::new(r) as _));
    // The container's namespace, once podman reports it: the sidecar
    // starts there as soon as it is known.
    let sandbox_key = loop {
        let out = std::process::Command::new("podman")
            .args([
                "inspect",
                "--format",
                "{{.NetworkSettings.SandboxKey}}",
                name,
            ])
            .output()?;
        let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && key.starts_with("/run/netns/") {
            break key;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "podman never reported the container's namespace"
        );
        if let Some(st) = podman.0.try_wait()? {
            anyhow::bail!(
                "podman exited with {st}: {}",
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let ctr = Pod {
        name: "podman-sidecar".into(),
        netns: sandbox_key.trim_start_matches("/run/netns/").into(),
        ip: std::net::Ipv4Addr::UNSPECIFIED,
        ip6: None,
        stack: meshlane_tests::Stack::V4,
        cgroup: sb.cgroup().join("podman-sidecar"),
        node: 1,
    };
    std::fs::create_dir_all(&ctr.cgroup)?;
    let sidecar = sb.start_sidecar(&ctr)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = podman.0.try_wait()? {
            break st;
        }
        anyhow::ensure!(Instant::now() < deadline, "the container ran for over 60 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    anyhow::ensure!(status.success(), "podman: {status}: {err}");
    drop(sidecar);
    let lines: Vec<&str> = out.lines().collect();
    let ok = lines.iter().filter(|l| **l == "ok").count();
    let refused = lines.iter().filter(|l| **l == "refused").count();
    let records = read_sidecar_log(&sb.sidecar_log(&ctr))
        .into_iter()
        .filter(|r| r.listener == 15001)
        .count();
    eprintln!(
        "podman: {} connections from the container's first instant: {ok} succeeded, {records} \
         sidecar records, {refused} refused (before the sidecar listened)",
        lines.len()
    );
    assert_eq!(lines.len(), 200, "{out}");
    assert!(ok > 0, "{out}");
    assert_eq!(
        ok, records,
        "every connection that succeeded went through the sidecar"
    );
    // podman ran DEL when the container exited (--rm): released.
    let report = agent.status_cmd()?;
    assert_eq!(report["maps"]["pods"], 0, "{report}");
    drop(podman);
    Ok(())
}

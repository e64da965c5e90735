//! `meshlane check [--pre]` end to end: the real `meshlane` binary asks the
//! fake API server (`meshlane_tests::fakeapi`: real HTTP, with the pod
//! proxy, logs and pod creation) about a cluster whose nodes are sandbox
//! nodes with real agents, as from a workstation with a kubeconfig.
//!
//! After install: each agent's real `/status`, read through the API
//! server's pod proxy, and each way the cluster can be broken (a pod in
//! error, a proxy not listening, a detached program, a node without an
//! agent, an agent not ready or unreachable, Istio's CNI plugin on the same
//! pods, the API server down), each named and exiting 1.
//!
//! Before install: the probe pods `--pre` creates are run by a stand-in
//! kubelet with this build's `meshlane probe` on the real kernel, a
//! "Cilium" program planted on the node's cgroup is found, and a node
//! whose image cannot be pulled fails the check.
use std::{
    collections::BTreeMap,
    ffi::OsString,
    os::fd::AsFd,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};
use meshlane_tests::{
    fakeapi::{api_pod, FakeApi, Kubelet},
    meshlane_bin, pod_entry, pod_state,
    shape::assert_shape,
    Agent, BrokenNetnsPins, PodSpec, Proc, Sandbox,
};
use serde_json::{json, Value};

const NS: &str = "meshlane";
const READY: Duration = Duration::from_secs(15);

/// `meshlane check ARGS -o json` against `api`: exit code and document.
fn check(api: &FakeApi, dir: &Path, args: &[&str]) -> (Option<i32>, Value, String) {
    let kubeconfig = dir.join("check-kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let out = Command::new(meshlane_bin())
        .arg("check")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--timeout", "20", "-o", "json"])
        .args(args)
        .output()
        .expect("meshlane check ran");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let doc: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("check -o json is not JSON ({e}): {stdout}\n{stderr}"));
    assert_shape(&doc, &check_shape(), "meshlane/check/v1");
    (out.status.code(), doc, stderr)
}

/// `meshlane check -o json` (meshlane/check/v1).
fn check_shape() -> Value {
    json!({
        "schema": "string", "mode": "string", "server": "string", "healthy": "bool",
        "failures": "u64", "warnings": "u64",
        "checks": [{"category": "string", "check": "string", "subject": "string",
                    "outcome": "string", "message": "string"}],
    })
}

/// (check, subject, outcome) of every check that is not ok.
fn not_ok(doc: &Value) -> Vec<(String, String, String)> {
    doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["outcome"] != "ok")
        .map(|c| {
            (
                c["check"].as_str().unwrap_or_default().into(),
                c["subject"].as_str().unwrap_or_default().into(),
                c["outcome"].as_str().unwrap_or_default().into(),
            )
        })
        .collect()
}

fn find<'a>(doc: &'a Value, check: &str, subject: &str) -> &'a Value {
    doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"] == check && c["subject"] == subject)
        .unwrap_or_else(|| panic!("no check {check} for {subject:?} in {doc:#}"))
}

fn node(name: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                   "nodeInfo": {"kernelVersion": "6.18.0", "containerRuntimeVersion": "containerd://2.0.0"}},
    })
}

fn daemonset(desired: u32, ready: u32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "meshlane", "namespace": NS, "labels": {"app.kubernetes.io/name": "meshlane", "app.kubernetes.io/instance": "meshlane"}},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "meshlane", "app.kubernetes.io/instance": "meshlane", "app.kubernetes.io/component": "agent"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "meshlane", "app.kubernetes.io/instance": "meshlane", "app.kubernetes.io/component": "agent"}},
                "spec": {"hostNetwork": true, "containers": [{"name": "agent", "image": "registry.example/meshlane:0.1.0"}],
                         "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}]},
            },
        },
        "status": {"desiredNumberScheduled": desired, "currentNumberScheduled": desired, "numberReady": ready,
                   "updatedNumberScheduled": desired, "numberAvailable": ready, "numberMisscheduled": 0},
    })
}

/// The agent pod of `node` as the API server shows it: ready, its http
/// port `port` on the pod IP (127.0.0.1: the agents of the sandbox serve
/// there, each on a port of its own).
fn agent_pod(node: &str, port: u16, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("meshlane-{node}"), "namespace": NS,
                     "labels": {"app.kubernetes.io/name": "meshlane", "app.kubernetes.io/instance": "meshlane", "app.kubernetes.io/component": "agent"}},
        "spec": {"nodeName": node, "hostNetwork": true,
                 "containers": [{"name": "agent", "image": "registry.example/meshlane:0.1.0",
                                 "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1",
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                   "containerStatuses": [{"name": "agent", "ready": ready, "restartCount": 0, "image": "registry.example/meshlane:0.1.0", "imageID": "",
                                          "state": {"running": {"startedAt": "2026-12-06T00:00:00Z"}}}]},
    })
}

/// Two sandbox nodes, each with a real agent on the fake API server: node
/// 1 runs meshed pod `a` (with its sidecar), node 2 runs pod `d` (not
/// meshed at first).
struct Cluster {
    sb: Sandbox,
    api: FakeApi,
    agents: Vec<Agent>,
    d: meshlane_tests::Pod,
    e: meshlane_tests::Pod,
    _procs: Vec<Proc>,
}

fn cluster(tag: &str) -> Result<Cluster> {
    let mut sb = Sandbox::new(tag)?;
    sb.add_node2()?;
    let a = sb.add_pod("a")?;
    let e = sb.add_pod("e")?;
    let d = sb.add_pod_on(2, "d")?;
    let procs = vec![sb.start_sidecar(&a)?];
    let api = FakeApi::start()?;
    for n in ["node-1", "node-2"] {
        api.put_object("api/v1/nodes", node(n, true));
    }
    api.apply(api_pod(&PodSpec::meshed(&a), "node-1"));
    api.apply(api_pod(&PodSpec::plain(&d), "node-2"));
    let kubeconfig = sb.dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let mut agents = Vec::new();
    for (i, active) in [(1u8, vec!["default/a".to_string()]), (2, vec![])] {
        let args: Vec<OsString> = vec![
            "--kubeconfig".into(),
            kubeconfig.clone().into_os_string(),
            "--node-name".into(),
            format!("node-{i}").into(),
        ];
        let agent = Agent::start_on_with(&sb, i, &args, &active)?;
        api.apply(agent_pod(
            &format!("node-{i}"),
            agent.http_addr()?.port(),
            true,
        ));
        agents.push(agent);
    }
    api.put_object("apis/apps/v1/daemonsets", daemonset(2, 2));
    Ok(Cluster {
        sb,
        api,
        agents,
        d,
        e,
        _procs: procs,
    })
}

#[test]
fn installed_cluster_healthy_then_each_failure_named() -> Result<()> {
    let mut c = cluster("check")?;
    let dir = c.sb.dir().to_path_buf();

    // Healthy: exit 0, every check ok.
    let (code, doc, err) = check(&c.api, &dir, &[]);
    assert_eq!(code, Some(0), "healthy cluster: {doc:#}\n{err}");
    assert_eq!(doc["healthy"], true);
    assert_eq!(doc["mode"], "installed");
    assert!(not_ok(&doc).is_empty(), "{doc:#}");
    assert!(find(&doc, "agent-healthy", "node-1")["message"]
        .as_str()
        .unwrap()
        .contains("1 meshed pods captured"));
    find(&doc, "agent-healthy", "node-2");
    find(&doc, "agent-ready", "node-1");
    find(&doc, "daemonset-ready", "meshlane/meshlane");
    find(&doc, "istio-cni-absent", "");
    // The agents' /status was read through the pod proxy.
    let proxied = c
        .api
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/proxy/status") && r.status == 200)
        .count();
    assert_eq!(proxied, 2, "{:#?}", c.api.requests());
    // The text form says the same.
    let kubeconfig = dir.join("check-kubeconfig");
    let out = Command::new(meshlane_bin())
        .args(["check", "--kubeconfig"])
        .arg(&kubeconfig)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("result: ok"), "{text}");

    // A meshed pod whose proxy does not listen (node 1), and a pod in error
    // (node 2: its inbound link cannot be pinned).
    c.api.apply(api_pod(&PodSpec::meshed(&c.e), "node-1"));
    c.agents[0].wait_status(READY, |st| {
        pod_entry(st, "default/e").is_some_and(|p| p["proxy_listening"] == false)
    })?;
    let broken = BrokenNetnsPins::new(&c.agents[1].bpffs)?;
    c.api.apply(api_pod(&PodSpec::meshed(&c.d), "node-2"));
    c.agents[1].wait_status(READY, |st| {
        pod_state(st, "default/d").as_deref() == Some("error")
    })?;
    let (code, doc, _) = check(&c.api, &dir, &[]);
    assert_eq!(code, Some(1), "{doc:#}");
    assert_eq!(doc["healthy"], false);
    let bad = not_ok(&doc);
    let pe = (
        "pod-error".to_string(),
        "node-2".to_string(),
        "failure".to_string(),
    );
    let pnl = (
        "proxy-not-listening".to_string(),
        "node-1".to_string(),
        "failure".to_string(),
    );
    assert!(bad.contains(&pe) && bad.contains(&pnl), "{bad:?}");
    assert!(find(&doc, "pod-error", "node-2")["message"]
        .as_str()
        .unwrap()
        .contains("default/d"));
    assert!(find(&doc, "proxy-not-listening", "node-1")["message"]
        .as_str()
        .unwrap()
        .contains("default/e"));
    drop(broken);
    c.api.apply(api_pod(&PodSpec::plain(&c.d), "node-2"));
    c.api.apply(api_pod(&PodSpec::plain(&c.e), "node-1"));
    c.agents[1].wait_status(READY, |st| {
        pod_state(st, "default/d").as_deref() != Some("error")
    })?;
    c.agents[0].wait_status(READY, |st| {
        pod_state(st, "default/e").as_deref() != Some("active")
    })?;
    let (code, doc, _) = check(&c.api, &dir, &[]);
    assert_eq!(code, Some(0), "recovered: {doc:#}");

    // A program detached on node 2 (its pinned link removed).
    let name = c.agents[1].detach_a_program()?;
    let (code, doc, _) = check(&c.api, &dir, &[]);
    assert_eq!(code, Some(1), "{doc:#}");
    // (The map update that failed for pod d above stays a warning.)
    let failures: Vec<_> = not_ok(&doc)
        .into_iter()
        .filter(|c| c.2 == "failure")
        .collect();
    assert_eq!(
        failures,
        vec![(
            "program-not-attached".into(),
            "node-2".into(),
            "failure".into()
        )],
        "{doc:#}"
    );
    assert!(find(&doc, "program-not-attached", "node-2")["message"]
        .as_str()
        .unwrap()
        .contains(&name));
    // Its agent stopped (and cleaned up): the pod proxy cannot reach it.
    c.agents.pop().expect("agent 2").stop()?;

    // A third node with no agent, and node 2's agent not ready.
    c.api.put_object("api/v1/nodes", node("node-3", true));
    c.api.put_object("apis/apps/v1/daemonsets", daemonset(3, 1));
    let mut not_ready = agent_pod("node-2", 1, false);
    not_ready["status"]["containerStatuses"][0]["state"] = json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container"}});
    c.api.apply(not_ready);
    let (code, doc, _) = check(&c.api, &dir, &[]);
    assert_eq!(code, Some(1), "{doc:#}");
    let bad = not_ok(&doc);
    for want in [
        ("daemonset-ready", "meshlane/meshlane"),
        ("agent-not-ready", "node-2"),
        ("agent-missing", "node-3"),
    ] {
        assert!(
            bad.contains(&(want.0.into(), want.1.into(), "failure".into())),
            "{want:?} in {bad:?}"
        );
    }
    assert!(find(&doc, "agent-not-ready", "node-2")["message"]
        .as_str()
        .unwrap()
        .contains("CrashLoopBackOff"));
    // Node 2's agent pod still has an IP: asked, it cannot be reached.
    assert!(
        bad.contains(&(
            "agent-unreachable".into(),
            "node-2".into(),
            "failure".into()
        )),
        "{bad:?}"
    );
    // A node the DaemonSet does not tolerate is no failure.
    let mut tainted = node("node-3", true);
    tainted["spec"]["taints"] =
        json!([{"key": "dedicated", "value": "gpu", "effect": "NoExecute"}]);
    c.api.put_object("api/v1/nodes", tainted);
    let (_, doc, _) = check(&c.api, &dir, &[]);
    assert_eq!(find(&doc, "agent-not-scheduled", "node-3")["outcome"], "ok");
    Ok(())
}

#[test]
fn istio_cni_on_the_same_pods_and_the_api_server_down() -> Result<()> {
    let mut c = cluster("checkcni")?;
    let dir = c.sb.dir().to_path_buf();
    // Istio's CNI plugin on node 1, where meshed pod a (no istio-init: the
    // injector left its rules to a CNI plugin) runs.
    c.api.put_object(
        "apis/apps/v1/daemonsets",
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
               "metadata": {"name": "istio-cni-node", "namespace": "istio-system", "labels": {"k8s-app": "istio-cni-node"}},
               "spec": {"selector": {"matchLabels": {"k8s-app": "istio-cni-node"}},
                        "template": {"metadata": {"labels": {"k8s-app": "istio-cni-node"}}, "spec": {"containers": [{"name": "install-cni", "image": "istio/install-cni"}]}}},
               "status": {"desiredNumberScheduled": 1, "numberReady": 1, "currentNumberScheduled": 1, "numberMisscheduled": 0}}),
    );
    c.api.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "istio-cni-node-x1", "namespace": "istio-system", "labels": {"k8s-app": "istio-cni-node"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "install-cni", "image": "istio/install-cni"}]},
        "status": {"phase": "Running", "podIP": "192.0.2.10"}}));
    let (code, doc, _) = check(&c.api, &dir, &[]);
    assert_eq!(code, Some(1), "{doc:#}");
    assert_eq!(
        not_ok(&doc),
        vec![(
            "istio-cni-overlap".into(),
            "default".into(),
            "failure".into()
        )],
        "{doc:#}"
    );
    let msg = find(&doc, "istio-cni-overlap", "default")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("default/a") && msg.contains("excludeNamespaces"),
        "{msg}"
    );
    // Excluded from Istio's CNI plugin (its ConfigMap): no overlap.
    c.api.put_object(
        "api/v1/configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "istio-cni-config", "namespace": "istio-system", "labels": {"app": "istio-cni"}},
               "data": {"EXCLUDE_NAMESPACES": "kube-system,istio-system,default"}}),
    );
    let (code, doc, _) = check(&c.api, &dir, &[]);
    assert_eq!(code, Some(0), "{doc:#}");
    assert_eq!(
        find(&doc, "istio-cni-disjoint", "istio-system/istio-cni-node")["outcome"],
        "ok"
    );

    // Not installed where asked.
    let (code, doc, _) = check(&c.api, &dir, &["--namespace", "elsewhere"]);
    assert_eq!(code, Some(1), "{doc:#}");
    assert_eq!(not_ok(&doc)[0].0, "daemonset-missing", "{doc:#}");

    // The API server down: one failure naming it, exit 1.
    c.api.stop();
    let (code, doc, _) = check(&c.api, &dir, &[]);
    assert_eq!(code, Some(1), "{doc:#}");
    assert_eq!(
        not_ok(&doc),
        vec![(
            "api-unreachable".into(),
            c.api.url() + "/",
            "failure".into()
        )],
        "{doc:#}"
    );
    Ok(())
}

/// [`check`] while `kubelet` runs the pods it creates.
fn check_with_kubelet(
    api: &FakeApi,
    kubelet: &Kubelet,
    dir: &Path,
    args: &[&str],
) -> (Option<i32>, Value, String) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                kubelet
                    .run_created(api)
                    .expect("the stand-in kubelet ran the pods");
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let r = check(api, dir, args);
        done.store(true, Ordering::SeqCst);
        r
    })
}

/// A wrong command line is exit 2, before anything is asked.
#[test]
fn a_wrong_command_line_is_exit_2() {
    for args in [&["check", "--pre"][..], &["check", "--timeout", "soon"]] {
        let out = Command::new(meshlane_bin())
            .args(args)
            .output()
            .expect("ran");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
    }
}

/// A program named like Cilium's socket load balancer on connect4 of a
/// cgroup, detached when dropped.
struct Planted(#[allow(dead_code)] std::os::fd::OwnedFd);

fn plant_cilium(cgroup: &Path) -> Result<Planted> {
    use meshlane_common::programs::Hook;
    let prog = meshlane::probe::pass_program(Hook::Connect4, "cil_sock4_connect")?;
    let dir = std::fs::File::open(cgroup)?;
    let link = meshlane::bpf::sys::link_create(
        prog.as_fd(),
        dir.as_fd(),
        meshlane::bpf::load::attach_type(Hook::Connect4),
    )
    .context("linking the planted program")?;
    Ok(Planted(link))
}

#[test]
fn pre_install_probes_every_node() -> Result<()> {
    let sb = Sandbox::new("checkpre")?;
    let dir = sb.dir().to_path_buf();
    let api = FakeApi::start()?;
    for n in ["node-1", "node-2"] {
        api.put_object("api/v1/nodes", node(n, true));
    }
    api.put_object("api/v1/nodes", node("node-3", false));
    // The nodes' /sys/fs/cgroup is the sandbox's cgroup here (never the
    // machine's root cgroup), and a "Cilium" program runs on it.
    let _cilium = plant_cilium(sb.cgroup())?;
    let kubelet = Kubelet {
        host_paths: BTreeMap::from([("/sys/fs/cgroup".to_string(), sb.cgroup().to_path_buf())]),
        pull_fails: ["node-2".to_string()].into(),
    };
    let pre = ["--pre", "--image", "registry.example/meshlane:0.1.0"];
    let (code, doc, err) = check_with_kubelet(&api, &kubelet, &dir, &pre);
    assert_eq!(code, Some(1), "node-2's image pull fails: {doc:#}\n{err}");
    assert_eq!(doc["mode"], "pre");
    assert_eq!(
        find(&doc, "kernel-features", "node-1")["outcome"],
        "ok",
        "{doc:#}"
    );
    assert_eq!(
        find(&doc, "cgroup-v2", "node-1")["outcome"],
        "ok",
        "{doc:#}"
    );
    let conflict = find(&doc, "cgroup-program-conflict", "node-1");
    assert_eq!(conflict["outcome"], "warning");
    let msg = conflict["message"].as_str().unwrap();
    assert!(
        msg.contains("cil_sock4_conne") && msg.contains("hostNamespaceOnly"),
        "{msg}"
    );
    let failed = find(&doc, "probe-failed", "node-2");
    assert!(
        failed["message"].as_str().unwrap().contains("ErrImagePull"),
        "{failed}"
    );
    assert_eq!(find(&doc, "node-not-ready", "node-3")["outcome"], "warning");
    // Each probe pod was made for its node as the agent will run there,
    // then deleted.
    let created: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.path == format!("/api/v1/namespaces/{NS}/pods") && r.status == 201)
        .collect();
    assert_eq!(created.len(), 2, "one probe pod per Ready node");
    let deleted = api
        .requests()
        .iter()
        .filter(|r| {
            r.path
                .starts_with(&format!("/api/v1/namespaces/{NS}/pods/meshlane-check-"))
                && r.status == 200
        })
        .count();
    assert!(deleted >= 2, "{:#?}", api.requests());
    let left: Vec<String> = api
        .pod_names()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{NS}/meshlane-check-")))
        .collect();
    assert!(left.is_empty(), "probe pods left: {left:?}");

    // Only node 1: warnings only, exit 0.
    let api1 = FakeApi::start()?;
    api1.put_object("api/v1/nodes", node("node-1", true));
    let (code, doc, err) = check_with_kubelet(&api1, &kubelet, &dir, &pre);
    assert_eq!(code, Some(0), "{doc:#}\n{err}");
    assert_eq!(doc["healthy"], true);
    assert_eq!(doc["warnings"], 1, "the planted program only: {doc:#}");
    Ok(())
}

use serde_json::json;

use super::*;

fn node(name: &str, labels: Value, taints: Value) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"taints": taints},
    }))
    .expect("node")
}

fn daemonset(template: Value, status: Value) -> DaemonSet {
    serde_json::from_value(json!({
        "metadata": {"name": "meshlane", "namespace": "meshlane"},
        "spec": {
            "selector": {"matchLabels": {"app": "meshlane"}},
            "template": {"metadata": {"labels": {"app": "meshlane"}}, "spec": template},
        },
        "status": status,
    }))
    .expect("daemonset")
}

fn agent_template() -> Value {
    json!({"containers": [{"name": "agent", "image": "meshlane:1"}], "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mesh", "effect": "NoSchedule"}]})
}

fn agent(node: &str, ready: bool, waiting: Option<&str>) -> Pod {
    let state = match waiting {
        Some(r) => json!({"waiting": {"reason": r}}),
        None => json!({"running": {}}),
    };
    serde_json::from_value(json!({
        "metadata": {"name": format!("meshlane-{node}"), "namespace": "meshlane"},
        "spec": {"nodeName": node, "containers": [{"name": "agent"}]},
        "status": {
            "phase": if waiting.is_some() { "Pending" } else { "Running" },
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "containerStatuses": [{"name": "agent", "ready": ready, "restartCount": 0, "image": "meshlane:1", "imageID": "", "state": state}],
        },
    }))
    .expect("pod")
}

fn outcomes(c: &[Check]) -> Vec<(&str, &str, Outcome)> {
    c.iter()
        .map(|c| (c.check.as_str(), c.subject.as_str(), c.outcome))
        .collect()
}

#[test]
fn eligibility_follows_node_selector_and_taints() {
    let mut t: PodSpec = serde_json::from_value(agent_template()).expect("spec");
    let plain = node("a", json!({}), json!([]));
    assert_eq!(not_eligible(&plain, &t), None);
    let tolerated = node(
        "b",
        json!({}),
        json!([{"key": "dedicated", "value": "mesh", "effect": "NoSchedule"}]),
    );
    assert_eq!(not_eligible(&tolerated, &t), None);
    let other = node(
        "c",
        json!({}),
        json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]),
    );
    assert!(not_eligible(&other, &t)
        .expect("not eligible")
        .contains("dedicated=gpu:NoSchedule"));
    // PreferNoSchedule does not keep a DaemonSet pod away; the controller's own
    // tolerations cover node conditions.
    let soft = node(
        "d",
        json!({}),
        json!([{"key": "x", "effect": "PreferNoSchedule"}, {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]),
    );
    assert_eq!(not_eligible(&soft, &t), None);
    t.node_selector = Some([("mesh".to_string(), "yes".to_string())].into());
    assert!(not_eligible(&plain, &t)
        .expect("selector")
        .contains("mesh=yes"));
    let labelled = node("e", json!({"mesh": "yes"}), json!([]));
    assert_eq!(not_eligible(&labelled, &t), None);
    // An empty key with Exists tolerates everything.
    t.tolerations = Some(vec![
        serde_json::from_value(json!({"operator": "Exists"})).expect("toleration")
    ]);
    let labelled_tainted = node(
        "f",
        json!({"mesh": "yes"}),
        json!([{"key": "any", "effect": "NoExecute"}]),
    );
    assert_eq!(not_eligible(&labelled_tainted, &t), None);
}

#[test]
fn daemonset_and_nodes() {
    let nodes = [
        node("n1", json!({}), json!([])),
        node("n2", json!({}), json!([])),
        node("n3", json!({}), json!([])),
        node(
            "gpu",
            json!({}),
            json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]),
        ),
    ];
    let ds = daemonset(
        agent_template(),
        json!({"desiredNumberScheduled": 3, "numberReady": 1, "updatedNumberScheduled": 3, "currentNumberScheduled": 2, "numberMisscheduled": 0}),
    );
    let agents = [
        agent("n1", true, None),
        agent("n2", false, Some("ImagePullBackOff")),
    ];
    let c = daemonset_checks(&ds, &nodes, &agents);
    assert_eq!(
        outcomes(&c),
        vec![
            ("daemonset-ready", "meshlane/meshlane", Outcome::Failure),
            ("agent-ready", "n1", Outcome::Ok),
            ("agent-not-ready", "n2", Outcome::Failure),
            ("agent-missing", "n3", Outcome::Failure),
            ("agent-not-scheduled", "gpu", Outcome::Ok),
        ]
    );
    assert!(
        c[0].message.contains("1 of 3 agents ready"),
        "{}",
        c[0].message
    );
    assert!(
        c[2].message.contains("ImagePullBackOff"),
        "{}",
        c[2].message
    );
    let done = daemonset(
        agent_template(),
        json!({"desiredNumberScheduled": 1, "numberReady": 1, "updatedNumberScheduled": 1, "currentNumberScheduled": 1, "numberMisscheduled": 0}),
    );
    let c = daemonset_checks(&done, &nodes[..1], &agents[..1]);
    assert!(c.iter().all(|c| c.outcome == Outcome::Ok), "{c:#?}");
    let cleanup = daemonset(
        json!({"containers": [{"name": "cleanup"}, {"name": "pause"}]}),
        json!({"desiredNumberScheduled": 1, "numberReady": 1, "updatedNumberScheduled": 1, "currentNumberScheduled": 1, "numberMisscheduled": 0}),
    );
    let c = daemonset_checks(&cleanup, &[], &[]);
    assert_eq!(c[0].check, "cleanup-mode");
    assert_eq!(c[0].outcome, Outcome::Failure);
}

#[test]
fn agent_status_documents() {
    let healthy = json!({"schema": crate::status::SCHEMA, "healthy": true, "problems": [], "warnings": [],
        "agent": {"pods": [{"name": "default/a", "state": "active"}, {"name": "default/b", "state": "not-meshed"}]}});
    let c = agent_status_checks("n1", "meshlane/x", &healthy);
    assert_eq!(outcomes(&c), vec![("agent-healthy", "n1", Outcome::Ok)]);
    assert!(
        c[0].message.contains("1 meshed pods captured"),
        "{}",
        c[0].message
    );
    let sick = json!({"schema": crate::status::SCHEMA, "healthy": false,
        "problems": [{"kind": "pod-error", "subject": "default/a", "message": "pod default/a is in error, NOT captured: x"},
                     {"kind": "proxy-not-listening", "subject": "default/b", "message": "pod default/b: its proxy is NOT listening"}],
        "warnings": [{"kind": "pod-config-error", "subject": "default/c", "message": "pod default/c: bad"}]});
    let c = agent_status_checks("n2", "meshlane/y", &sick);
    assert_eq!(
        outcomes(&c),
        vec![
            ("pod-error", "n2", Outcome::Failure),
            ("proxy-not-listening", "n2", Outcome::Failure),
            ("pod-config-error", "n2", Outcome::Warning),
        ]
    );
    assert!(c[0]
        .message
        .starts_with("node n2: pod default/a is in error"));
    let broken = json!({"schema": crate::status::SCHEMA, "healthy": false, "error": "the agent cannot read its own state: x"});
    assert_eq!(
        outcomes(&agent_status_checks("n3", "p", &broken)),
        vec![("status-unreadable", "n3", Outcome::Failure)]
    );
    let other = json!({"schema": "meshlane/status/v9"});
    assert_eq!(
        outcomes(&agent_status_checks("n4", "p", &other)),
        vec![("status-unreadable", "n4", Outcome::Failure)]
    );
}

fn meshed_pod(ns: &str, name: &str, node: &str, istio_init: bool) -> Pod {
    let init = if istio_init {
        json!([{"name": "istio-init"}])
    } else {
        json!([{"name": "istio-validation"}])
    };
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "annotations": {"sidecar.istio.io/status": "{}"}},
        "spec": {"nodeName": node, "initContainers": init, "containers": [{"name": "app"}, {"name": "istio-proxy"}]},
        "status": {"podIP": "10.0.0.5", "phase": "Running"},
    }))
    .expect("pod")
}

#[test]
fn istio_cni_overlap_by_namespace() {
    let nodes: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
    let none = istio_cni_checks(None, None, &BTreeSet::new(), &nodes, &[]);
    assert_eq!(outcomes(&none), vec![("istio-cni-absent", "", Outcome::Ok)]);
    let ds: DaemonSet = serde_json::from_value(json!({"metadata": {"name": "istio-cni-node", "namespace": "istio-system", "labels": {"k8s-app": "istio-cni-node"}}})).expect("ds");
    assert!(is_istio_cni(&ds));
    let pods = [
        meshed_pod("shop", "web", "n1", false),
        meshed_pod("shop", "db", "n2", false),
        // istio-init writes its own rules: Istio's CNI plugin leaves it alone.
        meshed_pod("legacy", "old", "n1", true),
        // On a node without Istio's CNI plugin.
        meshed_pod("edge", "gw", "n2", false),
        meshed_pod("kube-system", "dns", "n1", false),
    ];
    let cni_nodes: BTreeSet<String> = ["n1".to_string()].into();
    let c = istio_cni_checks(Some(&ds), None, &cni_nodes, &nodes, &pods);
    assert_eq!(
        outcomes(&c),
        vec![("istio-cni-overlap", "shop", Outcome::Failure)]
    );
    assert!(
        c[0].message.contains("excludeNamespaces"),
        "{}",
        c[0].message
    );
    let configs: Vec<ConfigMap> = vec![serde_json::from_value(json!({"metadata": {"name": "istio-cni-config"}, "data": {"EXCLUDE_NAMESPACES": "kube-system, shop"}})).expect("cm")];
    let excluded = istio_cni_excluded(&configs).expect("list");
    let c = istio_cni_checks(Some(&ds), Some(&excluded), &cni_nodes, &nodes, &pods);
    assert_eq!(
        outcomes(&c),
        vec![(
            "istio-cni-disjoint",
            "istio-system/istio-cni-node",
            Outcome::Ok
        )]
    );
    let old: Vec<ConfigMap> = vec![serde_json::from_value(json!({"metadata": {"name": "istio-cni-config"}, "data": {"cni_network_config": "{\"type\": \"istio-cni\", \"kubernetes\": {\"exclude_namespaces\": [\"istio-system\", \"edge\"]}}"}})).expect("cm")];
    assert_eq!(
        istio_cni_excluded(&old),
        Some(["istio-system".to_string(), "edge".to_string()].into())
    );
    assert_eq!(istio_cni_excluded(&[]), None);
}

#[test]
fn probe_reports() {
    let good = json!({"schema": "meshlane/probe/v1", "kernel": "6.18.0", "cgroup_v2": "/host/cgroup (given with --cgroup)", "bpffs": "mounted at /sys/fs/bpf",
        "refusal": null, "shortcut": {"supported": true, "detail": ""}, "cgroup_programs": [], "cgroup_programs_error": null});
    let c = probe_checks("n1", &good);
    assert!(c.iter().all(|c| c.outcome == Outcome::Ok), "{c:#?}");
    let bad = json!({"kernel": "5.4.0", "cgroup_v2": "NOT FOUND: /host/cgroup is not a cgroup v2 directory", "bpffs": "not mounted",
        "refusal": "meshlane cannot run on this kernel: no sk_lookup", "shortcut": {"supported": false, "detail": "no msg_tot_len"},
        "cgroup_programs": [{"hook": "cgroup/connect4", "id": 7, "name": "cil_sock4_conne", "meshlane": false, "note": "Cilium's socket load balancer: set socketLB.hostNamespaceOnly=true"},
                            {"hook": "cgroup/connect4", "id": 9, "name": "redirect_connec", "meshlane": true, "note": null}],
        "cgroup_programs_error": null});
    assert_eq!(
        outcomes(&probe_checks("n2", &bad)),
        vec![
            ("kernel-features", "n2", Outcome::Failure),
            ("cgroup-v2", "n2", Outcome::Failure),
            ("bpffs", "n2", Outcome::Ok),
            ("shortcut-unsupported", "n2", Outcome::Warning),
            ("cgroup-program-conflict", "n2", Outcome::Warning),
            ("meshlane-attached", "n2", Outcome::Warning),
        ]
    );
}

#[test]
fn the_report_in_a_log_with_stderr_around_it() {
    let log = "2026-12-06T00:00:00Z WARN something\n{\n  \"schema\": \"meshlane/probe/v1\",\n  \"x\": {\n    \"y\": 1\n  }\n}\nError: meshlane cannot run on this kernel\n";
    let doc = document_in_log(log).expect("document");
    assert_eq!(doc["x"]["y"], 1);
    assert_eq!(document_in_log("Error: exec format error\n"), None);
}

#[test]
fn report_counts_and_orders() {
    let r = Report::new(
        "installed",
        "https://x".into(),
        vec![
            Check::new("a", "x", "n2", Outcome::Ok, "m"),
            Check::new("b", "y", "n1", Outcome::Warning, "m"),
            Check::new("a", "z", "n1", Outcome::Failure, "m"),
        ],
    );
    assert!(!r.healthy);
    assert_eq!((r.failures, r.warnings), (1, 1));
    let order: Vec<(&str, &str)> = r
        .checks
        .iter()
        .map(|c| (c.category, c.subject.as_str()))
        .collect();
    assert_eq!(order, vec![("a", "n1"), ("a", "n2"), ("b", "n1")]);
}

//! What `meshlane check` reads from the cluster, through the API server
//! only: a workstation with a kubeconfig reaches nothing else (each agent's
//! `/status` through the pod proxy, each probe's answer through its log).
use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use futures::future::join_all;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Node, Pod},
};
use kube::{
    api::{Api, DeleteParams, ListParams, LogParams, PostParams},
    Client,
};
use serde_json::{json, Value};

use super::{
    agent_status_checks, daemonset_checks, document_in_log, is_istio_cni, istio_cni_checks,
    istio_cni_excluded, not_ready, pod_name, probe_checks, Check, Outcome, Report,
};

/// What `meshlane check` is told.
#[derive(Clone, Debug)]
pub struct Options {
    pub kubeconfig: Option<PathBuf>,
    /// meshlane's namespace (its DaemonSet; `--pre`'s probe pods).
    pub namespace: String,
    /// Labels of meshlane's DaemonSet.
    pub selector: String,
    /// Before install: probe every node.
    pub pre: bool,
    /// `--pre`: the meshlane image the probe pods run.
    pub image: Option<String>,
    /// `--pre`: the nodes' cgroup filesystem (the chart's `host.cgroup2`).
    pub host_cgroup: String,
    /// `--pre`: the nodes' bpffs (the chart's `host.bpffs`).
    pub host_bpffs: String,
    /// Longest wait for a probe pod, or an agent's answer.
    pub timeout: Duration,
}

/// Where the probe pod sees the node's cgroup filesystem.
const PROBE_CGROUP: &str = "/host/cgroup";
/// Labels of the probe pods (never those of meshlane's agents).
const PROBE_LABEL: (&str, &str) = ("meshlane.io/check", "pre");

fn failure(category: &'static str, check: &str, subject: &str, message: String) -> Check {
    Check::new(category, check, subject, Outcome::Failure, message)
}

/// Runs every check; never fails: what cannot be read is a failed check.
pub async fn run(opts: &Options) -> Report {
    let mode = if opts.pre { "pre" } else { "installed" };
    let config = crate::source::kube::load_config(&crate::source::kube::Options {
        node_name: String::new(),
        kubeconfig: opts.kubeconfig.clone(),
    })
    .await;
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            return Report::new(
                mode,
                String::new(),
                vec![failure(
                    "kubernetes-api",
                    "kubeconfig",
                    "",
                    format!("{e:#}"),
                )],
            )
        }
    };
    let server = config.cluster_url.to_string();
    let timeout = opts.timeout;
    let client = match Client::try_from(config) {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("building the Kubernetes API client: {e}");
            return Report::new(
                mode,
                server,
                vec![failure("kubernetes-api", "kubeconfig", "", msg)],
            );
        }
    };
    let nodes = tokio::time::timeout(
        timeout,
        Api::<Node>::all(client.clone()).list(&ListParams::default()),
    )
    .await;
    let nodes = match nodes {
        Ok(Ok(l)) => l.items,
        Ok(Err(e)) => {
            let msg = format!("cannot list nodes on the API server {server}: {e}");
            return Report::new(
                mode,
                server.clone(),
                vec![failure("kubernetes-api", "api-unreachable", &server, msg)],
            );
        }
        Err(_) => {
            let msg = format!("the API server {server} did not answer in {timeout:?}");
            return Report::new(
                mode,
                server.clone(),
                vec![failure("kubernetes-api", "api-unreachable", &server, msg)],
            );
        }
    };
    let mut checks = vec![Check::new(
        "kubernetes-api",
        "api-reachable",
        &server,
        Outcome::Ok,
        format!("the API server {server} answers: {} nodes", nodes.len()),
    )];
    let meshlane_nodes = if opts.pre {
        checks.extend(pre(&client, opts, &nodes).await);
        nodes
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect()
    } else {
        let (c, on) = installed(&client, opts, &nodes).await;
        checks.extend(c);
        on
    };
    checks.extend(istio_cni(&client, &meshlane_nodes).await);
    Report::new(mode, server, checks)
}

/// meshlane's DaemonSets (by `--selector` in `--namespace`).
async fn daemonsets(client: &Client, opts: &Options) -> Result<Vec<DaemonSet>> {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), &opts.namespace);
    let l = api
        .list(&ListParams::default().labels(&opts.selector))
        .await
        .with_context(|| {
            format!(
                "listing DaemonSets in namespace {} with labels {}",
                opts.namespace, opts.selector
            )
        })?;
    Ok(l.items)
}

/// After install: returns the checks and the nodes an agent runs on.
async fn installed(
    client: &Client,
    opts: &Options,
    nodes: &[Node],
) -> (Vec<Check>, BTreeSet<String>) {
    let ns = &opts.namespace;
    let dss = match daemonsets(client, opts).await {
        Ok(d) => d,
        Err(e) => {
            return (
                vec![failure(
                    "daemonset",
                    "daemonset-unreadable",
                    ns,
                    format!("{e:#}"),
                )],
                BTreeSet::new(),
            )
        }
    };
    if dss.is_empty() {
        let msg = format!(
            "no meshlane DaemonSet in namespace {ns} with labels {}: not installed there \
             (`meshlane check --pre` checks before install; --namespace and --selector say \
             where it is)",
            opts.selector
        );
        return (
            vec![failure("daemonset", "daemonset-missing", ns, msg)],
            BTreeSet::new(),
        );
    }
    let mut checks = Vec::new();
    let mut on = BTreeSet::new();
    for ds in &dss {
        let selector = pod_selector(ds);
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let agents = match pods.list(&ListParams::default().labels(&selector)).await {
            Ok(l) => l.items,
            Err(e) => {
                checks.push(failure(
                    "nodes",
                    "agents-unreadable",
                    ns,
                    format!("listing the agent pods ({selector}) in {ns}: {e}"),
                ));
                continue;
            }
        };
        checks.extend(daemonset_checks(ds, nodes, &agents));
        on.extend(
            agents
                .iter()
                .filter_map(|p| p.spec.as_ref()?.node_name.clone()),
        );
        let asked = agents.iter().filter(|p| {
            not_ready(p).is_none() || p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
        });
        let answers = join_all(asked.map(|p| agent_status(client, p, opts.timeout))).await;
        for a in answers {
            checks.extend(a);
        }
    }
    (checks, on)
}

/// The port the agent serves `/status` on: its container port named `http`.
fn status_port(p: &Pod) -> Option<i32> {
    p.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|port| port.name.as_deref() == Some("http"))
        .map(|port| port.container_port)
}

/// One agent's `/status`, through the API server's pod proxy.
async fn agent_status(client: &Client, p: &Pod, timeout: Duration) -> Vec<Check> {
    let name = pod_name(p);
    let node = p
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let Some(port) = status_port(p) else {
        let msg = format!(
            "node {node}: agent {name} has no container port named http to ask for /status"
        );
        return vec![failure("agents", "agent-unreachable", &node, msg)];
    };
    let (ns, pod) = name.split_once('/').expect("NAMESPACE/NAME");
    let path = format!("/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy/status");
    let req = match hyper::Request::get(&path).body(Vec::new()) {
        Ok(r) => r,
        Err(e) => {
            return vec![failure(
                "agents",
                "agent-unreachable",
                &node,
                format!("{path}: {e}"),
            )]
        }
    };
    let text = match tokio::time::timeout(timeout, client.request_text(req)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let msg = format!(
                "node {node}: cannot read agent {name}'s status through the API server \
                 ({path}): {e}"
            );
            return vec![failure("agents", "agent-unreachable", &node, msg)];
        }
        Err(_) => {
            let msg = format!("node {node}: agent {name} did not answer /status in {timeout:?}");
            return vec![failure("agents", "agent-unreachable", &node, msg)];
        }
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(doc) => agent_status_checks(&node, &name, &doc),
        Err(e) => vec![failure(
            "agents",
            "status-unreadable",
            &node,
            format!(
                "node {node}: agent {name}'s /status is not JSON ({e}): {}",
                text.chars().take(200).collect::<String>()
            ),
        )],
    }
}

/// Before install: meshlane not there yet, and a probe on every node.
async fn pre(client: &Client, opts: &Options, nodes: &[Node]) -> Vec<Check> {
    let mut checks = Vec::new();
    match daemonsets(client, opts).await {
        Ok(d) if !d.is_empty() => checks.push(Check::new(
            "daemonset",
            "already-installed",
            &opts.namespace,
            Outcome::Warning,
            format!(
                "meshlane is already installed in namespace {} (`meshlane check` without \
                 --pre checks it)",
                opts.namespace
            ),
        )),
        Ok(_) => {}
        Err(e) => checks.push(Check::new(
            "daemonset",
            "daemonset-unreadable",
            &opts.namespace,
            Outcome::Warning,
            format!("{e:#}"),
        )),
    }
    let Some(image) = &opts.image else {
        checks.push(failure(
            "kernel",
            "image-missing",
            "",
            "--pre needs --image: the meshlane image the chart will run (probe pods run its \
             `meshlane probe` on every node)"
                .into(),
        ));
        return checks;
    };
    let probes = nodes.iter().map(|n| probe_node(client, opts, image, n));
    for c in join_all(probes).await {
        checks.extend(c);
    }
    checks
}

/// The probe pod of `node`: `meshlane probe -o json` with the node's cgroup
/// filesystem and bpffs, privileged (it loads and links test programs, as
/// the agent will), on the host network (no pod network needed), tolerating
/// every taint, gone after `timeout`.
pub fn probe_pod(opts: &Options, image: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "meshlane-check-",
            "namespace": opts.namespace,
            "labels": {PROBE_LABEL.0: PROBE_LABEL.1},
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "hostNetwork": true,
            "automountServiceAccountToken": false,
            "activeDeadlineSeconds": opts.timeout.as_secs().max(1),
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{
                "name": "probe",
                "image": image,
                "command": ["/usr/local/bin/meshlane"],
                "args": ["probe", "-o", "json", format!("--cgroup={PROBE_CGROUP}")],
                "securityContext": {"privileged": true},
                "volumeMounts": [
                    {"name": "cgroup", "mountPath": PROBE_CGROUP},
                    {"name": "bpffs", "mountPath": "/sys/fs/bpf", "readOnly": true},
                ],
            }],
            "volumes": [
                {"name": "cgroup", "hostPath": {"path": opts.host_cgroup, "type": "Directory"}},
                {"name": "bpffs", "hostPath": {"path": opts.host_bpffs}},
            ],
        },
    })
}

/// Waiting reasons that will not clear by waiting.
const STUCK: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

async fn probe_node(client: &Client, opts: &Options, image: &str, node: &Node) -> Vec<Check> {
    let n = node.metadata.name.clone().unwrap_or_default();
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return vec![Check::new(
            "kernel",
            "node-not-ready",
            &n,
            Outcome::Warning,
            format!("node {n} is not Ready: not probed"),
        )];
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &opts.namespace);
    let spec: Pod = match serde_json::from_value(probe_pod(opts, image, &n)) {
        Ok(p) => p,
        Err(e) => {
            return vec![failure(
                "kernel",
                "probe-failed",
                &n,
                format!("probe pod: {e}"),
            )]
        }
    };
    let created = match pods.create(&PostParams::default(), &spec).await {
        Ok(p) => p,
        Err(e) => {
            let msg = format!(
                "node {n}: cannot create the probe pod in namespace {} (it must exist and admit \
                 privileged pods, as meshlane's agent needs): {e}",
                opts.namespace
            );
            return vec![failure("kernel", "probe-failed", &n, msg)];
        }
    };
    let name = created.metadata.name.clone().unwrap_or_default();
    let outcome = wait_probe(&pods, &name, opts.timeout).await;
    let log = pods.logs(&name, &LogParams::default()).await;
    // Whatever happened, the probe pod goes.
    if let Err(e) = pods
        .delete(&name, &DeleteParams::default().grace_period(0))
        .await
    {
        tracing::warn!("deleting probe pod {}/{name}: {e}", opts.namespace);
    }
    let pn = format!("{}/{name}", opts.namespace);
    match (outcome, log) {
        (Err(why), _) => vec![failure(
            "kernel",
            "probe-failed",
            &n,
            format!("node {n}: probe pod {pn}: {why}"),
        )],
        (Ok(()), Err(e)) => vec![failure(
            "kernel",
            "probe-failed",
            &n,
            format!("node {n}: probe pod {pn} ran, its log cannot be read: {e}"),
        )],
        (Ok(()), Ok(log)) => match document_in_log(&log) {
            Some(doc) => probe_checks(&n, &doc),
            None => {
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                vec![failure(
                    "kernel",
                    "probe-failed",
                    &n,
                    format!(
                        "node {n}: probe pod {pn} printed no report: {}",
                        tail.join(" | ")
                    ),
                )]
            }
        },
    }
}

/// Waits until the probe pod has run (either way); Err says why it did not.
async fn wait_probe(
    pods: &Api<Pod>,
    name: &str,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match pods.get(name).await {
            Ok(p) => {
                let status = p.status.clone().unwrap_or_default();
                if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
                    return Ok(());
                }
                for c in status.container_statuses.iter().flatten() {
                    if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
                        let reason = w.reason.clone().unwrap_or_default();
                        if STUCK.contains(&reason.as_str()) {
                            return Err(format!(
                                "container {}: {reason}{}",
                                c.name,
                                w.message
                                    .as_ref()
                                    .map(|m| format!(" ({m})"))
                                    .unwrap_or_default()
                            ));
                        }
                    }
                }
                not_ready(&p).unwrap_or_else(|| "running".into())
            }
            Err(e) => format!("reading it: {e}"),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("did not finish in {timeout:?} ({last})"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn cni_unknown(why: &str) -> Vec<Check> {
    vec![Check::new(
        "istio-cni",
        "istio-cni-unknown",
        "",
        Outcome::Warning,
        format!("Istio's CNI plugin: {why}"),
    )]
}

/// A DaemonSet's pod selector (its matchLabels) as a label selector.
fn pod_selector(ds: &DaemonSet) -> String {
    ds.spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Istio's CNI plugin, and the meshed pods it shares with meshlane.
async fn istio_cni(client: &Client, meshlane_nodes: &BTreeSet<String>) -> Vec<Check> {
    let all = match Api::<DaemonSet>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(l) => l.items,
        Err(e) => return cni_unknown(&format!("cannot list DaemonSets to look for it: {e}")),
    };
    let Some(ds) = all.iter().find(|d| is_istio_cni(d)) else {
        return istio_cni_checks(None, None, &BTreeSet::new(), meshlane_nodes, &[]);
    };
    let ns = ds.metadata.namespace.clone().unwrap_or_default();
    let configs: Vec<ConfigMap> = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels("app=istio-cni"))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let excluded = istio_cni_excluded(&configs);
    let selector = pod_selector(ds);
    let cni_nodes: BTreeSet<String> = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&selector))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    let pods = match Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(l) => l.items,
        Err(e) => return cni_unknown(&format!("cannot list pods to compare with it: {e}")),
    };
    istio_cni_checks(
        Some(ds),
        excluded.as_ref(),
        &cni_nodes,
        meshlane_nodes,
        &pods,
    )
}

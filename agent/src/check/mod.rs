//! `meshlane check [--pre]`: is meshlane (about to be) working on every
//! node of a cluster, asked from a workstation with a kubeconfig, as
//! `linkerd check`, `istioctl x precheck` and `cilium status` answer for
//! theirs.
//!
//! After install: the DaemonSet rolled out, an agent ready on every node it
//! should run on, each agent's own status (`/status` on its http port,
//! through the API server's pod proxy: programs attached, pods in error,
//! proxies not listening yet, the agent's API watch), and no meshed
//! namespace left to Istio's CNI plugin as well. Before install (`--pre`):
//! a short-lived probe pod per node runs `meshlane probe` there (kernel
//! features, cgroup v2, bpffs, other programs on meshlane's cgroup hooks).
//!
//! This module decides from what was read (pure, unit-tested); `cluster`
//! reads it.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Node, Pod, PodSpec, Taint, Toleration},
};
use serde::Serialize;
use serde_json::Value;

pub mod cluster;

/// `schema` of `meshlane check -o json|yaml`.
pub const SCHEMA: &str = "meshlane/check/v1";

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    /// Worth a look; does not fail the check.
    Warning,
    /// Something does not work (or will not): `meshlane check` exits 1.
    Failure,
}

/// One line of the answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// The group it belongs to (`kubernetes-api`, `daemonset`, `nodes`,
    /// `agents`, `istio-cni`, `kernel`).
    pub category: &'static str,
    /// Stable name of what was checked (`agent-ready`, `pod-error`, ...).
    pub check: String,
    /// What it is about: a node, a pod (NAMESPACE/NAME), a DaemonSet.
    pub subject: String,
    pub outcome: Outcome,
    /// In plain words, with what to do where there is something.
    pub message: String,
}

impl Check {
    pub fn new(
        category: &'static str,
        check: impl Into<String>,
        subject: impl Into<String>,
        outcome: Outcome,
        message: impl Into<String>,
    ) -> Self {
        Self {
            category,
            check: check.into(),
            subject: subject.into(),
            outcome,
            message: message.into(),
        }
    }
}

/// The whole answer.
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// `pre` (before install) or `installed`.
    pub mode: &'static str,
    /// The API server asked.
    pub server: String,
    /// No failures (warnings allowed): exit 0.
    pub healthy: bool,
    pub failures: usize,
    pub warnings: usize,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(mode: &'static str, server: String, mut checks: Vec<Check>) -> Self {
        // Categories in the order they were first checked, then by subject.
        let order: Vec<&'static str> = checks.iter().fold(Vec::new(), |mut v, c| {
            if !v.contains(&c.category) {
                v.push(c.category);
            }
            v
        });
        checks.sort_by_key(|c| {
            (
                order.iter().position(|o| *o == c.category),
                c.subject.clone(),
            )
        });
        let count = |o| checks.iter().filter(|c| c.outcome == o).count();
        let (failures, warnings) = (count(Outcome::Failure), count(Outcome::Warning));
        Self {
            schema: SCHEMA,
            mode,
            server,
            healthy: failures == 0,
            failures,
            warnings,
            checks,
        }
    }
}

/// The text form.
pub fn print(r: &Report) {
    let what = if r.mode == "pre" {
        "before install"
    } else {
        "installed"
    };
    println!("meshlane check ({what}) of {}", r.server);
    let mut category = "";
    for c in &r.checks {
        if c.category != category {
            category = c.category;
            println!("\n{category}");
        }
        let mark = match c.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Warning => "warn",
            Outcome::Failure => "FAIL",
        };
        println!("  {mark}  {}", c.message);
    }
    println!();
    if r.healthy {
        println!(
            "result: ok ({} checks, {} warnings)",
            r.checks.len(),
            r.warnings
        );
    } else {
        println!(
            "result: {} FAILED, {} warnings ({} checks)",
            r.failures,
            r.warnings,
            r.checks.len()
        );
    }
}

/// Tolerations every DaemonSet pod gets from the DaemonSet controller.
const DAEMONSET_TOLERATES: &[&str] = &[
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/disk-pressure",
    "node.kubernetes.io/memory-pressure",
    "node.kubernetes.io/pid-pressure",
    "node.kubernetes.io/unschedulable",
    "node.kubernetes.io/network-unavailable",
];

fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    if DAEMONSET_TOLERATES.contains(&taint.key.as_str()) {
        return true;
    }
    tolerations.iter().any(|t| {
        let exists = t.operator.as_deref() == Some("Exists");
        let key = match t.key.as_deref() {
            None | Some("") => exists,
            Some(k) => k == taint.key,
        };
        let value =
            exists || t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("");
        let effect = match t.effect.as_deref() {
            None | Some("") => true,
            Some(e) => e == taint.effect,
        };
        key && value && effect
    })
}

/// Why the DaemonSet's pods would not run on `node` (its nodeSelector, a
/// taint it does not tolerate), or None when they should.
pub fn not_eligible(node: &Node, template: &PodSpec) -> Option<String> {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    for (k, v) in template.node_selector.iter().flatten() {
        if labels.get(k) != Some(v) {
            return Some(format!("nodeSelector {k}={v} does not match"));
        }
    }
    let tolerations = template.tolerations.clone().unwrap_or_default();
    for t in node.spec.iter().flat_map(|s| s.taints.iter().flatten()) {
        let hard = matches!(t.effect.as_str(), "NoSchedule" | "NoExecute");
        if hard && !tolerates(&tolerations, t) {
            return Some(format!(
                "taint {}{}:{} is not tolerated",
                t.key,
                t.value
                    .as_ref()
                    .map(|v| format!("={v}"))
                    .unwrap_or_default(),
                t.effect
            ));
        }
    }
    None
}

/// Why a pod is not ready, from its status, or None when it is.
pub fn not_ready(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if ready {
        return None;
    }
    let phase = status
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    let why: Vec<String> = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let st = c.state.as_ref()?;
            if let Some(w) = &st.waiting {
                let reason = w.reason.clone().unwrap_or_else(|| "waiting".into());
                return Some(match &w.message {
                    Some(m) => format!("{}: {reason} ({m})", c.name),
                    None => format!("{}: {reason}", c.name),
                });
            }
            if let Some(t) = &st.terminated {
                return Some(format!(
                    "{}: terminated, exit code {} ({})",
                    c.name,
                    t.exit_code,
                    t.reason.clone().unwrap_or_default()
                ));
            }
            (!c.ready).then(|| {
                format!(
                    "{}: running, not ready (failing its readiness probe)",
                    c.name
                )
            })
        })
        .collect();
    Some(if why.is_empty() {
        format!("phase {phase}")
    } else {
        format!("phase {phase}; {}", why.join("; "))
    })
}

pub fn pod_name(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or("default"),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

fn node_name(n: &Node) -> String {
    n.metadata.name.clone().unwrap_or_default()
}

/// The DaemonSet's rollout, and an agent on every node it should run on.
pub fn daemonset_checks(ds: &DaemonSet, nodes: &[Node], agents: &[Pod]) -> Vec<Check> {
    let name = format!(
        "{}/{}",
        ds.metadata.namespace.as_deref().unwrap_or_default(),
        ds.metadata.name.as_deref().unwrap_or_default()
    );
    let mut out = Vec::new();
    let template = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .unwrap_or_default();
    if template.containers.iter().any(|c| c.name == "cleanup") {
        out.push(Check::new(
            "daemonset",
            "cleanup-mode",
            &name,
            Outcome::Failure,
            format!(
                "DaemonSet {name} is in cleanup mode (cleanup.enabled): meshlane is being \
                 removed and captures nothing"
            ),
        ));
    }
    let st = ds.status.clone().unwrap_or_default();
    let desired = st.desired_number_scheduled;
    let ready = st.number_ready;
    let updated = st.updated_number_scheduled.unwrap_or(0);
    let rolled = desired > 0 && ready == desired && updated == desired;
    out.push(Check::new(
        "daemonset",
        "daemonset-ready",
        &name,
        if rolled {
            Outcome::Ok
        } else {
            Outcome::Failure
        },
        format!(
            "DaemonSet {name}: {ready} of {desired} agents ready, {updated} of {desired} \
             updated{}",
            if rolled {
                ""
            } else {
                " (kubectl -n NAMESPACE rollout status daemonset/NAME)"
            }
        ),
    ));
    for node in nodes {
        let n = node_name(node);
        let mine: Vec<&Pod> = agents
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&n))
            .collect();
        match (mine.as_slice(), not_eligible(node, &template)) {
            ([], Some(why)) => out.push(Check::new(
                "nodes",
                "agent-not-scheduled",
                &n,
                Outcome::Ok,
                format!("node {n}: no agent, as intended ({why})"),
            )),
            ([], None) => out.push(Check::new(
                "nodes",
                "agent-missing",
                &n,
                Outcome::Failure,
                format!(
                    "node {n}: NO meshlane agent, so its meshed pods are NOT captured \
                     (scheduling: check the DaemonSet's events and the node's taints)"
                ),
            )),
            (pods, _) => {
                for p in pods {
                    let pn = pod_name(p);
                    match not_ready(p) {
                        None => out.push(Check::new(
                            "nodes",
                            "agent-ready",
                            &n,
                            Outcome::Ok,
                            format!("node {n}: agent {pn} ready"),
                        )),
                        Some(why) => out.push(Check::new(
                            "nodes",
                            "agent-not-ready",
                            &n,
                            Outcome::Failure,
                            format!("node {n}: agent {pn} is NOT ready: {why}"),
                        )),
                    }
                }
            }
        }
    }
    out
}

/// The checks from one agent's `/status` document (`meshlane status -o
/// json` of its node).
pub fn agent_status_checks(node: &str, agent: &str, doc: &Value) -> Vec<Check> {
    let mut out = Vec::new();
    if let Some(e) = doc["error"].as_str() {
        out.push(Check::new(
            "agents",
            "status-unreadable",
            node,
            Outcome::Failure,
            format!("node {node}: agent {agent}: {e}"),
        ));
        return out;
    }
    if doc["schema"].as_str() != Some(crate::status::SCHEMA) {
        out.push(Check::new(
            "agents",
            "status-unreadable",
            node,
            Outcome::Failure,
            format!(
                "node {node}: agent {agent} answered /status with schema {}, not {} (another \
                 version of meshlane?)",
                doc["schema"],
                crate::status::SCHEMA
            ),
        ));
        return out;
    }
    let findings = |key: &str| -> Vec<(String, String)> {
        doc[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| {
                (
                    f["kind"].as_str().unwrap_or("unknown").to_string(),
                    f["message"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let problems = findings("problems");
    for (kind, msg) in &problems {
        out.push(Check::new(
            "agents",
            kind,
            node,
            Outcome::Failure,
            format!("node {node}: {msg}"),
        ));
    }
    for (kind, msg) in findings("warnings") {
        out.push(Check::new(
            "agents",
            kind,
            node,
            Outcome::Warning,
            format!("node {node}: {msg}"),
        ));
    }
    if problems.is_empty() {
        let pods = doc["agent"]["pods"].as_array().cloned().unwrap_or_default();
        let captured = pods.iter().filter(|p| p["state"] == "active").count();
        out.push(Check::new(
            "agents",
            "agent-healthy",
            node,
            Outcome::Ok,
            format!(
                "node {node}: agent healthy, every program attached, {captured} meshed pods \
                 captured"
            ),
        ));
    }
    out
}

/// Whether meshlane would capture a pod: the agent's own reading of it
/// (an unreadable pod counts as meshed when Istio's injector marked it).
fn meshed(p: &Pod) -> bool {
    let marked = p
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(crate::istio::annotation::STATUS));
    serde_json::to_value(p)
        .ok()
        .and_then(|v| crate::pods::from_value(v).ok())
        .map_or(marked, |p| p.meshed)
}

/// Whether Istio's init container writes the pod's rules itself (then
/// Istio's CNI plugin leaves it alone).
fn has_istio_init(p: &Pod) -> bool {
    p.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.name == "istio-init")
}

/// The namespaces Istio's CNI plugin leaves alone, from its ConfigMap:
/// `EXCLUDE_NAMESPACES` (comma-separated, newer charts) or
/// `cni_network_config`'s `kubernetes.exclude_namespaces` (older ones).
pub fn istio_cni_excluded(configs: &[ConfigMap]) -> Option<BTreeSet<String>> {
    for c in configs {
        let Some(data) = &c.data else { continue };
        if let Some(list) = data.get("EXCLUDE_NAMESPACES") {
            return Some(
                list.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            );
        }
        if let Some(conf) = data.get("cni_network_config") {
            if let Ok(v) = serde_json::from_str::<Value>(conf) {
                if let Some(list) = v["kubernetes"]["exclude_namespaces"].as_array() {
                    return Some(
                        list.iter()
                            .filter_map(|n| n.as_str().map(String::from))
                            .collect(),
                    );
                }
            }
        }
    }
    None
}

/// Whether a DaemonSet is Istio's CNI node agent.
pub fn is_istio_cni(ds: &DaemonSet) -> bool {
    let labels = ds.metadata.labels.clone().unwrap_or_default();
    labels.get("k8s-app").map(String::as_str) == Some("istio-cni-node")
        || ds
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("istio-cni-node"))
}

/// Meshed namespaces that Istio's CNI plugin also intercepts, on nodes
/// where meshlane does: two interceptions of the same pod.
/// `istio_cni_nodes`: nodes an Istio CNI pod runs on; `meshlane_nodes`:
/// nodes a meshlane agent runs on (before install: every node).
pub fn istio_cni_checks(
    istio_cni: Option<&DaemonSet>,
    excluded: Option<&BTreeSet<String>>,
    istio_cni_nodes: &BTreeSet<String>,
    meshlane_nodes: &BTreeSet<String>,
    pods: &[Pod],
) -> Vec<Check> {
    let Some(ds) = istio_cni else {
        return vec![Check::new(
            "istio-cni",
            "istio-cni-absent",
            "",
            Outcome::Ok,
            "Istio's CNI plugin is not installed: meshlane alone captures meshed pods",
        )];
    };
    let ds_name = format!(
        "{}/{}",
        ds.metadata.namespace.as_deref().unwrap_or_default(),
        ds.metadata.name.as_deref().unwrap_or_default()
    );
    // Istio's chart excludes kube-system unless told otherwise.
    let default_excluded: BTreeSet<String> = ["kube-system".to_string()].into();
    let excluded = excluded.unwrap_or(&default_excluded);
    let mut both: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in pods {
        let ns = p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if meshed(p)
            && !has_istio_init(p)
            && !excluded.contains(&ns)
            && istio_cni_nodes.contains(&node)
            && meshlane_nodes.contains(&node)
        {
            both.entry(ns).or_default().push(pod_name(p));
        }
    }
    if both.is_empty() {
        return vec![Check::new(
            "istio-cni",
            "istio-cni-disjoint",
            &ds_name,
            Outcome::Ok,
            format!(
                "Istio's CNI plugin ({ds_name}) runs, but no meshed pod is under both it and \
                 meshlane (it excludes {})",
                excluded.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        )];
    }
    both.into_iter()
        .map(|(ns, pods)| {
            Check::new(
                "istio-cni",
                "istio-cni-overlap",
                &ns,
                Outcome::Failure,
                format!(
                    "namespace {ns}: {} meshed pods (e.g. {}) are under Istio's CNI plugin \
                     ({ds_name}) as well as meshlane: both intercept. Add {ns} to Istio CNI's \
                     excludeNamespaces (cni.excludeNamespaces) and restart its pods, or \
                     uninstall Istio's CNI plugin",
                    pods.len(),
                    pods[0]
                ),
            )
        })
        .collect()
}

/// The checks from one node's `meshlane probe -o json` (`--pre`).
pub fn probe_checks(node: &str, doc: &Value) -> Vec<Check> {
    let mut out = Vec::new();
    let kernel = doc["kernel"].as_str().unwrap_or("?");
    match doc["refusal"].as_str() {
        Some(r) => out.push(Check::new(
            "kernel",
            "kernel-features",
            node,
            Outcome::Failure,
            format!("node {node} (Linux {kernel}): {r}"),
        )),
        None => out.push(Check::new(
            "kernel",
            "kernel-features",
            node,
            Outcome::Ok,
            format!("node {node} (Linux {kernel}): every kernel feature meshlane needs is present"),
        )),
    }
    let cg = doc["cgroup_v2"].as_str().unwrap_or("?");
    let cg_ok = !cg.starts_with("NOT");
    out.push(Check::new(
        "kernel",
        "cgroup-v2",
        node,
        if cg_ok { Outcome::Ok } else { Outcome::Failure },
        format!("node {node}: cgroup v2 {cg}"),
    ));
    out.push(Check::new(
        "kernel",
        "bpffs",
        node,
        Outcome::Ok,
        format!(
            "node {node}: bpffs {}",
            doc["bpffs"].as_str().unwrap_or("?")
        ),
    ));
    if doc["shortcut"]["supported"] == false {
        out.push(Check::new(
            "kernel",
            "shortcut-unsupported",
            node,
            Outcome::Warning,
            format!(
                "node {node}: the same-node shortcut cannot run here (`--shortcut on` is \
                 refused; interception works): {}",
                doc["shortcut"]["detail"].as_str().unwrap_or("?")
            ),
        ));
    }
    if let Some(e) = doc["cgroup_programs_error"].as_str() {
        out.push(Check::new(
            "kernel",
            "cgroup-programs-unknown",
            node,
            Outcome::Warning,
            format!("node {node}: cannot list the programs on meshlane's cgroup hooks: {e}"),
        ));
    }
    let mut others = 0;
    for a in doc["cgroup_programs"].as_array().into_iter().flatten() {
        let (hook, name, id) = (
            a["hook"].as_str().unwrap_or("?"),
            a["name"].as_str().unwrap_or("?"),
            a["id"].as_u64().unwrap_or(0),
        );
        if a["meshlane"] == true {
            out.push(Check::new(
                "kernel",
                "meshlane-attached",
                node,
                Outcome::Warning,
                format!(
                    "node {node}: meshlane's {name} (id {id}) is already on {hook}: installed \
                     already, or left by an install that was not cleaned up (`meshlane cleanup`)"
                ),
            ));
        } else {
            others += 1;
            out.push(Check::new(
                "kernel",
                "cgroup-program-conflict",
                node,
                Outcome::Warning,
                format!(
                    "node {node}: program {name} (id {id}) on {hook}: {}",
                    a["note"].as_str().unwrap_or("")
                ),
            ));
        }
    }
    if others == 0 && doc["cgroup_programs_error"].is_null() {
        out.push(Check::new(
            "kernel",
            "cgroup-programs",
            node,
            Outcome::Ok,
            format!("node {node}: no other program on meshlane's cgroup hooks"),
        ));
    }
    out
}

/// The JSON document in a probe pod's log: the log is stdout and stderr
/// together, so the document is the lines from the first `{` line to the
/// last `}` line.
pub fn document_in_log(log: &str) -> Option<Value> {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.iter().position(|l| l.starts_with('{'))?;
    let end = lines.iter().rposition(|l| l.starts_with('}'))?;
    (end >= start)
        .then(|| serde_json::from_str(&lines[start..=end].join("\n")).ok())
        .flatten()
}

#[cfg(test)]
mod tests;

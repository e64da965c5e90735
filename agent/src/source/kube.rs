//! The `kubernetes` pod source: this node's pods from the API server.
//!
//! kube's watcher lists the pods with `spec.nodeName=<node>` and then
//! watches them from the list's resourceVersion. Each event changes our own
//! copy of the node's pods and is handed to the agent at once, as a
//! [`Snapshot`]. Each Pod is serialised back to JSON and read by `pods.rs`,
//! the code that reads a pods file, so both sources agree on what a pod is.
//!
//! Failures never clear what we know: while the API server is unreachable
//! the last known pods stay in force. After an error we wait as
//! kube-runtime's watcher backoff says (`DefaultBackoff`: jittered,
//! exponential from 0.8 s to 30 s, kept across watcher restarts and reset
//! by the next event) and the watcher resumes from its resourceVersion. An
//! expired resourceVersion (410 Gone) means events were lost: we start a
//! fresh watcher, which lists again, and the new list replaces our copy
//! whole, so pods deleted meanwhile go too. kube's watcher relists by
//! itself on a 410 `ERROR` watch event, but not when the API server answers
//! the watch request itself with HTTP 410: it would retry the same expired
//! version forever. Starting over covers both.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod as KubePod;
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        utils::Backoff as _,
        watcher::{self, DefaultBackoff, Event},
    },
    Api, Client, Config,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::snapshot::Snapshot;
use crate::pods;

/// How the agent reaches the API server and which pods are its own.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node's name, as in the pods' `spec.nodeName`.
    pub node_name: String,
    /// A kubeconfig file; without it, kube's inference (KUBECONFIG, then the
    /// in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
}

/// Checks the node name is one the API server could have given a node
/// (a DNS subdomain), so a typo is an error here, not a silent empty watch.
pub fn check_node_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        bail!("--node-name {name:?} is not a Kubernetes node name (lower-case letters, digits, '-' and '.', at most 253)");
    }
    Ok(())
}

pub(crate) async fn load_config(opts: &Options) -> Result<Config> {
    match &opts.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))
        }
        None => Config::infer().await.context(
            "no Kubernetes API server configuration (no KUBECONFIG, no in-cluster service account): \
             pass --kubeconfig, or --pods FILE to run without an API server",
        ),
    }
}

/// Starts watching this node's pods; snapshots go to `tx`.
pub async fn spawn(opts: &Options, tx: watch::Sender<Snapshot>) -> Result<()> {
    check_node_name(&opts.node_name)?;
    let config = load_config(opts).await?;
    info!(server = %config.cluster_url, node = %opts.node_name, "pod source: the API server");
    let client = Client::try_from(config).context("building the Kubernetes API client")?;
    let api: Api<KubePod> = Api::all(client.clone());
    // Any namespace: only the answer matters (see `answers_again`).
    let probe: Api<KubePod> = Api::namespaced(client, "kube-system");
    tokio::spawn(watch_pods(api, probe, opts.node_name.clone(), tx));
    Ok(())
}

/// One pod, read straight from the API server (`meshlane-cni` deciding on
/// its own while the agent is down); None when the API server has no such
/// pod.
pub async fn get_pod(
    kubeconfig: Option<PathBuf>,
    namespace: &str,
    name: &str,
) -> Result<Option<pods::Pod>> {
    let opts = Options {
        node_name: String::new(),
        kubeconfig,
    };
    let client = Client::try_from(load_config(&opts).await?)
        .context("building the Kubernetes API client")?;
    let api: Api<KubePod> = Api::namespaced(client, namespace);
    let pod = api
        .get_opt(name)
        .await
        .with_context(|| format!("reading pod {namespace}/{name} from the API server"))?;
    pod.as_ref().map(convert).transpose()
}

/// `pods.rs`'s reading of one Pod object from the API server.
fn convert(p: &KubePod) -> Result<pods::Pod> {
    let v = serde_json::to_value(p).context("serialising a Pod")?;
    pods::from_value(v)
}

/// A pod that has finished keeps its IP in its status, but the IP may
/// already belong to a new pod: it is not ours to capture any more.
fn finished(p: &KubePod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn key_of(p: &KubePod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or("default"),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Puts `p` into `into` (or takes it out if it has finished). A Pod that
/// cannot be read is reported and left out; others are unaffected.
fn apply(into: &mut BTreeMap<String, pods::Pod>, p: &KubePod, errors: &mut Vec<String>) {
    let key = key_of(p);
    if finished(p) {
        into.remove(&key);
        return;
    }
    match convert(p) {
        Ok(pod) => {
            into.insert(key, pod);
        }
        Err(e) => {
            let msg = format!("pod {key} from the API server: {e:#}");
            warn!("{msg}; leaving it out");
            errors.push(msg);
            into.remove(&key);
        }
    }
}

/// True when the error says our resourceVersion has expired, in either of
/// the forms an API server uses (a watch `ERROR` event, or HTTP 410).
fn is_gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(s) => s.code == 410,
        watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::InitialListFailed(kube::Error::Api(s)) => s.code == 410,
        _ => false,
    }
}

/// Whether the API server answers a pod read again, after a watch error:
/// the watcher resumes silently (no event until a pod changes), so without
/// this a quiet node would report the outage until its next pod event.
/// Reading a pod that does not exist needs what the watch needs (the
/// server up, our credentials, `get` on pods) and costs one small answer.
async fn answers_again(probe: &Api<KubePod>) -> bool {
    match probe.get_opt("meshlane-api-check").await {
        Ok(_) => true,
        Err(e) => {
            debug!("API server check after a watch error: {e}");
            false
        }
    }
}

async fn watch_pods(
    api: Api<KubePod>,
    probe: Api<KubePod>,
    node: String,
    tx: watch::Sender<Snapshot>,
) {
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut known: BTreeMap<String, pods::Pod> = BTreeMap::new();
    let mut backoff = DefaultBackoff::default();
    loop {
        // A fresh watcher starts with a full list.
        let mut events = watcher::watcher(api.clone(), config.clone()).boxed();
        let mut listing: Option<BTreeMap<String, pods::Pod>> = None;
        // Pods that could not be read since the last snapshot.
        let mut bad: Vec<String> = Vec::new();
        while let Some(ev) = events.next().await {
            if tx.is_closed() {
                return;
            }
            match ev {
                Ok(Event::Init) => listing = Some(BTreeMap::new()),
                Ok(Event::InitApply(p)) => {
                    if let Some(l) = listing.as_mut() {
                        apply(l, &p, &mut bad);
                    }
                }
                Ok(Event::InitDone) => {
                    known = listing.take().unwrap_or_default();
                    info!(pods = known.len(), node = %node, "pod list from the API server");
                }
                Ok(Event::Apply(p)) => apply(&mut known, &p, &mut bad),
                Ok(Event::Delete(p)) => {
                    known.remove(&key_of(&p));
                }
                Err(e) => {
                    let gone = is_gone(&e);
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    let msg = format!("watching pods on the API server: {e}");
                    warn!(
                        retry_in = ?delay,
                        "{msg}; keeping the last known pods{}",
                        if gone { " (resourceVersion expired)" } else { "" }
                    );
                    tx.send_modify(|s| {
                        s.error = Some(msg);
                        s.errors += 1;
                    });
                    tokio::time::sleep(delay).await;
                    if !gone && answers_again(&probe).await {
                        // The watcher resumes from its resourceVersion; a
                        // new failure sets the error again.
                        tx.send_modify(|s| s.error = None);
                    }
                    if gone {
                        break;
                    }
                    continue;
                }
            }
            if listing.is_some() {
                // Mid-list: the agent sees the list once it is complete.
                continue;
            }
            backoff.reset();
            let pods: Vec<pods::Pod> = known.values().cloned().collect();
            tx.send_modify(|s| {
                s.pods = pods;
                s.synced = true;
                s.errors += bad.len() as u64;
                s.error = bad.pop();
            });
            bad.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["node-1", "ip-10-0-0-1.ec2.internal", "a"] {
            check_node_name(ok).unwrap();
        }
        for bad in ["", "Node1", "node_1", "-node", "node.", &"a".repeat(254)] {
            let e = check_node_name(bad).unwrap_err().to_string();
            assert!(e.contains("--node-name"), "{e}");
        }
    }

    #[test]
    fn api_pods_read_like_file_pods() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "resourceVersion": "7",
                         "annotations": {"sidecar.istio.io/status": "{}",
                                         "traffic.sidecar.istio.io/excludeOutboundPorts": "9081"}},
            "spec": {"nodeName": "node-1", "containers": [
                {"name": "app", "image": "x"},
                {"name": "istio-proxy", "image": "y",
                 "securityContext": {"runAsUser": 1500, "runAsGroup": 1501},
                 "env": [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}]}]},
            "status": {"phase": "Running", "podIP": "10.1.2.3", "podIPs": [{"ip": "10.1.2.3"}]}
        });
        let kube: KubePod = serde_json::from_value(json.clone()).unwrap();
        let from_api = convert(&kube).unwrap();
        let from_file = pods::parse(&json.to_string()).unwrap().remove(0);
        assert_eq!(from_api, from_file);
        assert_eq!(from_api.proxy_run_as_user, Some(1500));
        assert!(from_api.meshed);

        let mut done = kube.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut m = BTreeMap::new();
        let mut errs = Vec::new();
        apply(&mut m, &kube, &mut errs);
        assert_eq!(m.len(), 1);
        apply(&mut m, &done, &mut errs);
        assert!(m.is_empty(), "a finished pod is no longer captured");
        assert!(errs.is_empty());
    }
}

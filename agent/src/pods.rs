//! Kubernetes Pod objects as `kubectl get pods -o yaml|json` prints them: a
//! PodList (or `kind: List`), a bare JSON array, a single Pod, or several
//! YAML documents. Only the fields interception needs are read; everything
//! else is ignored, as a newer API server may add fields.
use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::istio::{annotation, PROXY_CONTAINER};

/// What meshlane knows of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// metadata.uid: tells a pod from an earlier one of the same name.
    pub uid: Option<String>,
    pub annotations: BTreeMap<String, String>,
    /// Addresses of both families from status.podIPs (or status.podIP), in
    /// the order the API lists them.
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// `spec.hostUsers` (default true). False: the pod has a user namespace
    /// of its own, and the kernel reports its proxy's uid and gid as the
    /// node's ids they map to (see `userns.rs`).
    pub host_users: bool,
    /// Has an istio-proxy container or the sidecar status annotation.
    pub meshed: bool,
    pub proxy_run_as_user: Option<i64>,
    pub proxy_run_as_group: Option<i64>,
    pub proxy_env: BTreeMap<String, String>,
}

impl Pod {
    /// `namespace/name`, how users name a pod.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPod {
    kind: Option<String>,
    metadata: RawMeta,
    #[serde(default)]
    spec: RawSpec,
    #[serde(default)]
    status: RawStatus,
}

#[derive(Deserialize)]
struct RawMeta {
    name: String,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    #[serde(default)]
    containers: Vec<RawContainer>,
    #[serde(default)]
    init_containers: Vec<RawContainer>,
    #[serde(default)]
    host_network: Option<bool>,
    #[serde(default)]
    host_users: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawContainer {
    name: String,
    #[serde(default)]
    security_context: Option<RawSecurityContext>,
    #[serde(default)]
    env: Vec<RawEnv>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSecurityContext {
    run_as_user: Option<i64>,
    run_as_group: Option<i64>,
}

#[derive(Deserialize)]
struct RawEnv {
    name: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawStatus {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<RawPodIp>,
}

#[derive(Deserialize)]
struct RawPodIp {
    ip: String,
}

/// Parses the text of a pods file (JSON or YAML).
pub fn parse(text: &str) -> Result<Vec<Pod>> {
    let trimmed = text.trim_start();
    let docs: Vec<Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(text).map_err(|e| {
            anyhow!(
                "invalid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            )
        })?;
        vec![v]
    } else {
        let mut docs = Vec::new();
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let v = Value::deserialize(doc).map_err(|e| match e.location() {
                Some(l) => anyhow!(
                    "invalid YAML in document {} at line {} column {}: {e}",
                    i + 1,
                    l.line(),
                    l.column()
                ),
                None => anyhow!("invalid YAML in document {}: {e}", i + 1),
            })?;
            if !v.is_null() {
                docs.push(v);
            }
        }
        docs
    };

    let mut items = Vec::new();
    for (d, doc) in docs.into_iter().enumerate() {
        let where_ = |i: Option<usize>| match i {
            Some(i) => format!("document {} items[{i}]", d + 1),
            None => format!("document {}", d + 1),
        };
        match doc {
            Value::Array(list) => items.extend(
                list.into_iter()
                    .enumerate()
                    .map(|(i, v)| (where_(Some(i)), v)),
            ),
            Value::Object(ref o) if o.contains_key("items") => {
                let Some(Value::Array(list)) = o.get("items").cloned() else {
                    bail!("{}: items is not a list", where_(None));
                };
                items.extend(
                    list.into_iter()
                        .enumerate()
                        .map(|(i, v)| (where_(Some(i)), v)),
                );
            }
            Value::Object(_) => items.push((where_(None), doc)),
            other => bail!(
                "{}: expected a Pod, a PodList or a list, found {}",
                where_(None),
                kind_of(&other)
            ),
        }
    }

    let mut pods = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (where_, v) in items {
        let pod = from_value(v).map_err(|e| anyhow!("{where_}: {e:#}"))?;
        if !seen.insert(pod.key()) {
            bail!("{where_}: pod {} appears twice", pod.key());
        }
        pods.push(pod);
    }
    Ok(pods)
}

/// One Pod object (as the API server sends it, or one item of a file),
/// through the same reading as a pods file.
pub fn from_value(v: Value) -> Result<Pod> {
    let raw: RawPod = serde_json::from_value(v).map_err(|e| anyhow!("not a valid Pod: {e}"))?;
    if let Some(k) = raw.kind.as_deref() {
        if k != "Pod" {
            bail!("kind {k:?} is not a Pod");
        }
    }
    convert(raw)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn convert(raw: RawPod) -> Result<Pod> {
    let annotations = raw.metadata.annotations.unwrap_or_default();
    let namespace = raw.metadata.namespace.unwrap_or_else(|| "default".into());
    let name = raw.metadata.name;
    let mut ips = Vec::new();
    let mut push_ip = |s: &str| -> Result<()> {
        let a: IpAddr = s.parse().map_err(|_| {
            anyhow!("pod {namespace}/{name}: status pod IP {s:?} is not an IP address")
        })?;
        if !ips.contains(&a) {
            ips.push(a);
        }
        Ok(())
    };
    for p in &raw.status.pod_ips {
        push_ip(&p.ip)?;
    }
    if let Some(p) = raw.status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
        push_ip(p)?;
    }
    let proxy = raw
        .spec
        .containers
        .iter()
        .chain(raw.spec.init_containers.iter())
        .find(|c| c.name == PROXY_CONTAINER);
    let meshed = proxy.is_some() || annotations.contains_key(annotation::STATUS);
    let sc = proxy.and_then(|c| c.security_context.as_ref());
    let proxy_env = proxy
        .map(|c| {
            c.env
                .iter()
                .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
                .collect()
        })
        .unwrap_or_default();
    Ok(Pod {
        namespace,
        name,
        uid: raw.metadata.uid,
        annotations,
        ips,
        host_network: raw.spec.host_network.unwrap_or(false),
        host_users: raw.spec.host_users.unwrap_or(true),
        meshed,
        proxy_run_as_user: sc.and_then(|s| s.run_as_user),
        proxy_run_as_group: sc.and_then(|s| s.run_as_group),
        proxy_env,
    })
}

impl Pod {
    /// For tests: a meshed pod with these annotations and addresses,
    /// Kubernetes' defaults for the rest.
    pub fn meshed_with(
        key: (&str, &str),
        annotations: BTreeMap<String, String>,
        ips: Vec<IpAddr>,
    ) -> Pod {
        Pod {
            namespace: key.0.into(),
            name: key.1.into(),
            uid: None,
            annotations,
            ips,
            host_network: false,
            host_users: true,
            meshed: true,
            proxy_run_as_user: None,
            proxy_run_as_group: None,
            proxy_env: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const POD_YAML: &str = r#"
apiVersion: v1
kind: PodList
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: productpage
    namespace: bookinfo
    annotations:
      sidecar.istio.io/status: '{"containers":["istio-proxy"]}'
  spec:
    containers:
    - name: app
      image: x
    - name: istio-proxy
      securityContext:
        runAsUser: 1000670000
        runAsGroup: 1000670001
      env:
      - name: ISTIO_META_DNS_CAPTURE
        value: "true"
  status:
    podIP: 10.244.1.5
    podIPs:
    - ip: 10.244.1.5
    - ip: fd00::5
- apiVersion: v1
  kind: Pod
  metadata: {name: plain}
  spec: {containers: [{name: app}]}
  status: {}
"#;

    #[test]
    fn parses_a_pod_list() {
        let pods = parse(POD_YAML).unwrap();
        assert_eq!(pods.len(), 2);
        let p = &pods[0];
        assert_eq!(p.key(), "bookinfo/productpage");
        assert!(p.meshed);
        assert_eq!(
            p.ips,
            vec![
                IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5)),
                IpAddr::V6("fd00::5".parse().unwrap())
            ]
        );
        assert_eq!(p.proxy_run_as_user, Some(1_000_670_000));
        assert_eq!(p.proxy_run_as_group, Some(1_000_670_001));
        assert_eq!(
            p.proxy_env
                .get("ISTIO_META_DNS_CAPTURE")
                .map(String::as_str),
            Some("true")
        );
        assert!(p.host_users, "Kubernetes' default");
        assert!(!pods[1].meshed);
        assert_eq!(pods[1].key(), "default/plain");
        assert!(pods[1].ips.is_empty());
    }

    #[test]
    fn parses_json_array_single_pod_and_multi_doc_yaml() {
        let json = r#"[{"metadata":{"name":"a","annotations":{"sidecar.istio.io/status":"x"}},"status":{"podIP":"10.0.0.1"}}]"#;
        assert_eq!(
            parse(json).unwrap()[0].ips,
            vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))]
        );
        let single = r#"{"kind":"Pod","metadata":{"name":"a"}}"#;
        assert_eq!(parse(single).unwrap().len(), 1);
        let multi = "metadata: {name: a}\n---\nmetadata: {name: b}\n";
        assert_eq!(parse(multi).unwrap().len(), 2);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn host_users_false_is_read() {
        let y = "metadata: {name: a}\nspec: {hostUsers: false}\n";
        assert!(!parse(y).unwrap()[0].host_users);
    }

    #[test]
    fn native_sidecar_in_init_containers_is_meshed() {
        let y = "metadata: {name: a}\nspec:\n  initContainers: [{name: istio-proxy}]\n";
        assert!(parse(y).unwrap()[0].meshed);
    }

    #[test]
    fn errors_name_the_position() {
        let e = format!("{:#}", parse("{\"items\": [}").unwrap_err());
        assert!(e.contains("line 1 column"), "{e}");
        let e = format!(
            "{:#}",
            parse("items:\n  - metadata: {name: a}\n  - metadata: [oops\n").unwrap_err()
        );
        assert!(e.contains("line 3"), "{e}");
        let e = format!(
            "{:#}",
            parse("items:\n- metadata: {name: a}\n- metadata: {name: 7}\n  status: {podIP: 1}\n")
                .unwrap_err()
        );
        assert!(e.contains("items[1]"), "{e}");
        let e = format!(
            "{:#}",
            parse("metadata: {name: a}\nstatus: {podIP: 10.0.0.300}\n").unwrap_err()
        );
        assert!(e.contains("10.0.0.300"), "{e}");
        let e = format!(
            "{:#}",
            parse("kind: Service\nmetadata: {name: a}\n").unwrap_err()
        );
        assert!(e.contains("Service"), "{e}");
        let e = format!(
            "{:#}",
            parse("- metadata: {name: a}\n- metadata: {name: a}\n").unwrap_err()
        );
        assert!(e.contains("twice"), "{e}");
    }
}

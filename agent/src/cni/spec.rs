//! The CNI specification's side of `meshlane-cni`: the network config on
//! stdin, the CNI_* environment, the addresses of a prevResult, and the
//! error result with the spec's codes. Versions 0.3.0 to 1.0.0 share every
//! field read here (`ips[].address`); 0.3.x/0.4.0 add `ips[].version`,
//! which is ignored.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::proto::PodRef;

/// The version the plugin speaks, and the ones it accepts in a config.
pub const VERSION: &str = "1.0.0";
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// Error codes: 1-99 are the spec's, 100 and up meshlane's.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    /// The agent's socket answered something that is not a meshlane reply.
    pub const AGENT_PROTOCOL: u32 = 100;
    /// The agent refused the request (it says why).
    pub const AGENT_REFUSED: u32 = 101;
    /// A meshed pod is not captured (CHECK).
    pub const NOT_CAPTURED: u32 = 102;
}

/// The spec's error result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: VERSION.into(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn details(mut self, d: impl Into<String>) -> Self {
        self.details = d.into();
        self
    }
}

/// The command the runtime runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The CNI_* environment, checked for what the command needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Required for ADD and CHECK; DEL may come after the namespace is gone.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// CNI_ARGS, `K=V;K=V`.
    pub args: BTreeMap<String, String>,
}

impl Env {
    /// Reads the environment through `get` (std::env::var in the binary).
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let var = |k: &str| get(k).filter(|v| !v.is_empty());
        let need = |k: &str, why: &str| {
            var(k)
                .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("{k} is not set ({why})")))
        };
        let command = match need("CNI_COMMAND", "ADD, DEL, CHECK or VERSION")?.as_str() {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK or VERSION"),
                ))
            }
        };
        if command == Command::Version {
            return Ok(Env {
                command,
                container_id: String::new(),
                netns: None,
                ifname: String::new(),
                args: BTreeMap::new(),
            });
        }
        let container_id = need("CNI_CONTAINERID", "the runtime names the container")?;
        let netns = match command {
            Command::Del => var("CNI_NETNS").map(PathBuf::from),
            _ => Some(PathBuf::from(need(
                "CNI_NETNS",
                "the pod's network namespace, which meshlane captures",
            )?)),
        };
        let ifname = need("CNI_IFNAME", "the runtime names the interface")?;
        let args = var("CNI_ARGS")
            .map(|a| parse_args(&a))
            .transpose()?
            .unwrap_or_default();
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }

    /// The pod CNI_ARGS names (None: no K8S_POD_NAME, not a pod). Without
    /// K8S_POD_NAMESPACE the pod is in `default`: podman names its
    /// containers in K8S_POD_NAME only, and a pod it runs must not pass as
    /// "not a pod".
    pub fn pod(&self) -> Option<PodRef> {
        Some(PodRef {
            namespace: self
                .args
                .get("K8S_POD_NAMESPACE")
                .cloned()
                .unwrap_or_else(|| "default".into()),
            name: self.args.get("K8S_POD_NAME")?.clone(),
            uid: self.args.get("K8S_POD_UID").cloned(),
        })
    }
}

fn parse_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    s.split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    CniError::new(
                        code::INVALID_ENV,
                        format!("CNI_ARGS {s:?}: {kv:?} is not KEY=VALUE"),
                    )
                })
        })
        .collect()
}

/// Where the plugin reads a pod itself when the agent cannot answer.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSource {
    /// The agent's `--pods` file.
    #[serde(default)]
    pub pods_file: Option<PathBuf>,
    /// A kubeconfig for the API server.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

/// The network config on stdin: the spec's fields and meshlane's own.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub prev_result: Option<Value>,
    /// The agent's `--state-dir` (its socket is `cni.sock` there).
    pub state_dir: PathBuf,
    /// How long ADD waits for a meshed pod to be confirmed captured.
    pub timeout: Duration,
    /// Where to read a pod when the agent cannot answer (None: nowhere, so
    /// every pod the agent cannot answer for is held).
    pub pod_source: Option<PodSource>,
    /// Namespaces whose pods meshlane never captures: they return at once.
    pub exclude_namespaces: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    prev_result: Option<Value>,
    state_dir: Option<PathBuf>,
    timeout_ms: Option<u64>,
    pod_source: Option<PodSource>,
    #[serde(default)]
    exclude_namespaces: Vec<String>,
}

/// Default of `timeoutMs`: ten seconds, well inside a runtime's own
/// sandbox timeout (minutes), long enough for an agent restart.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl NetConf {
    /// Parses stdin. Malformed JSON is code 6; a well-formed config missing
    /// or misstating a field is 7, naming the field; an unsupported
    /// cniVersion is 1.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let raw: RawConf = serde_json::from_slice(stdin).map_err(|e| {
            let c = if e.is_data() {
                code::INVALID_CONFIG
            } else {
                code::DECODE
            };
            CniError::new(c, format!("network config on stdin: {e}"))
        })?;
        let field = |name: &str, v: Option<String>| {
            v.filter(|s| !s.is_empty()).ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("network config on stdin: no {name:?}"),
                )
            })
        };
        let cni_version = field("cniVersion", raw.cni_version)?;
        if !SUPPORTED.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {cni_version:?} is not supported (meshlane-cni speaks {})",
                    SUPPORTED.join(", ")
                ),
            ));
        }
        let name = field("name", raw.name)?;
        field("type", raw.kind)?;
        if let Some(s) = &raw.pod_source {
            if s.pods_file.is_some() == s.kubeconfig.is_some() {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "network config: podSource needs exactly one of podsFile and kubeconfig",
                ));
            }
        }
        Ok(NetConf {
            cni_version,
            name,
            prev_result: raw.prev_result,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| crate::host::default_state_dir().to_path_buf()),
            timeout: raw
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_TIMEOUT),
            pod_source: raw.pod_source,
            exclude_namespaces: raw.exclude_namespaces,
        })
    }

    /// An error in this config's version.
    pub fn error(&self, mut e: CniError) -> CniError {
        e.cni_version.clone_from(&self.cni_version);
        e
    }
}

/// The addresses of a prevResult (`ips[].address`, CIDR notation).
pub fn prev_ips(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    let bad = |why: String| CniError::new(code::INVALID_CONFIG, format!("prevResult: {why}"));
    let Some(ips) = prev.get("ips") else {
        return Ok(Vec::new());
    };
    let ips = ips
        .as_array()
        .ok_or_else(|| bad("ips is not a list".into()))?;
    ips.iter()
        .enumerate()
        .map(|(i, ip)| {
            let a = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("ips[{i}] has no address")))?;
            let host = a.split_once('/').map_or(a, |(h, _)| h);
            host.parse::<IpAddr>()
                .map_err(|e| bad(format!("ips[{i}].address {a:?}: {e}")))
        })
        .collect()
}

/// VERSION's answer.
pub fn version_result() -> Value {
    serde_json::json!({"cniVersion": VERSION, "supportedVersions": SUPPORTED})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::read(|k| m.get(k).cloned())
    }

    #[test]
    fn env_names_what_is_missing() {
        let base = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=a;K8S_POD_UID=u",
            ),
        ];
        let e = env(&base).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_NETNS"), "{}", e.msg);
        let mut with = base.to_vec();
        with.push(("CNI_NETNS", "/run/netns/x"));
        let ok = env(&with).unwrap();
        let pod = ok.pod().unwrap();
        assert_eq!(pod.key(), "default/a");
        assert_eq!(pod.uid.as_deref(), Some("u"));
        // DEL without a namespace is fine.
        let mut del = base.to_vec();
        del[0] = ("CNI_COMMAND", "DEL");
        assert_eq!(env(&del).unwrap().netns, None);
        assert_eq!(
            env(&[("CNI_COMMAND", "MOVE")]).unwrap_err().code,
            code::INVALID_ENV
        );
        assert_eq!(env(&[]).unwrap_err().code, code::INVALID_ENV);
        let mut podman = with.clone();
        podman[3] = ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=app");
        assert_eq!(env(&podman).unwrap().pod().unwrap().key(), "default/app");
        let mut none = with.clone();
        none[3] = ("CNI_ARGS", "IgnoreUnknown=1");
        assert_eq!(env(&none).unwrap().pod(), None);
        let mut bad = with.clone();
        bad[3] = ("CNI_ARGS", "K8S_POD_NAME");
        assert!(env(&bad).unwrap_err().msg.contains("KEY=VALUE"));
    }

    #[test]
    fn config_errors_carry_the_specs_codes() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, code::DECODE);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","type":"meshlane-cni"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.contains("\"name\""), "{}", e.msg);
        let e = NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"t","timeoutMs":"x"}"#)
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"t","podSource":{}}"#)
            .unwrap_err();
        assert!(e.msg.contains("podSource"), "{}", e.msg);
        let c = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"t","timeoutMs":250,"extra":1}"#,
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(250));
    }

    #[test]
    fn prev_result_addresses_of_each_version() {
        let v1: Value = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24","gateway":"10.1.0.1","interface":2},
                {"address":"fd00::5/64"}]}"#,
        )
        .unwrap();
        let v03: Value = serde_json::from_str(
            r#"{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.5/24"}]}"#,
        )
        .unwrap();
        assert_eq!(
            prev_ips(&v1).unwrap(),
            vec![
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(prev_ips(&v03).unwrap().len(), 1);
        let bad: Value = serde_json::from_str(r#"{"ips":[{"address":"x/1"}]}"#).unwrap();
        assert_eq!(prev_ips(&bad).unwrap_err().code, code::INVALID_CONFIG);
    }
}

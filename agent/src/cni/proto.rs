//! What `meshlane-cni` and the agent say to each other over the agent's
//! Unix socket: one JSON request line, one JSON reply line. Both sides use
//! these types, so the two can only disagree across versions, and a reply
//! that does not parse is reported as such, never guessed at.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The socket's file name in the agent's state directory (`--state-dir`).
pub const SOCKET: &str = "cni.sock";

/// A request or reply line longer than this is refused (a pod has a handful
/// of addresses; anything near this is not a meshlane peer).
pub const MAX_LINE: u64 = 64 * 1024;

/// Where the agent whose state directory is `state_dir` listens.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// The pod a runtime names in CNI_ARGS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// K8S_POD_UID, when the runtime gives it (kubelet does).
    #[serde(default)]
    pub uid: Option<String>,
}

impl PodRef {
    /// `namespace/name`, the agent's pod key.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the plugin asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// CNI ADD: capture this pod in this namespace, answering once it is.
    Add {
        pod: PodRef,
        container_id: String,
        /// CNI_NETNS: the namespace the runtime made for the pod.
        netns: PathBuf,
        /// The addresses earlier plugins gave the pod (prevResult).
        ips: Vec<IpAddr>,
    },
    /// CNI CHECK: are the pod's entries in the maps, for this namespace?
    Check {
        pod: PodRef,
        container_id: String,
        netns: PathBuf,
    },
    /// CNI DEL: the runtime is tearing the sandbox down.
    Del {
        pod: Option<PodRef>,
        container_id: String,
    },
}

/// What the agent answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    /// The pod's entries are in the maps for the namespace with this cookie,
    /// and the inbound program is attached to it.
    Captured { cookie: u64 },
    /// The pod is known and meshlane leaves it alone (not meshed, capture
    /// mode NONE, host network): it may start.
    NotCaptured { why: String },
    /// The pod is meshed and not captured yet (no source sync, a failed map
    /// write, proxy ids unknown): ask again.
    Pending { why: String },
    /// The pod source (named) does not list the pod (yet).
    Unknown { source: String, synced: bool },
    /// DEL done (whether or not the agent knew the sandbox).
    Released,
    /// The request cannot be served (a namespace path that does not open,
    /// a request that does not parse).
    Error { msg: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let req = Request::Add {
            pod: PodRef {
                namespace: "default".into(),
                name: "a".into(),
                uid: Some("u1".into()),
            },
            container_id: "c1".into(),
            netns: "/var/run/netns/cni-1".into(),
            ips: vec!["10.1.2.3".parse().unwrap(), "fd00::3".parse().unwrap()],
        };
        let line = serde_json::to_string(&req).unwrap();
        assert!(line.starts_with(r#"{"op":"add""#), "{line}");
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), req);
        let rep = Reply::Captured { cookie: 7 };
        let line = serde_json::to_string(&rep).unwrap();
        assert_eq!(line, r#"{"reply":"captured","cookie":7}"#);
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), rep);
    }
}

//! The pods the runtime handed the agent through `meshlane-cni`, and what
//! they change in a round: a registered pod is bound to the namespace the
//! runtime named (by its cookie), with the addresses the runtime gave it,
//! before the pod source has either; the IP scan never moves it elsewhere.
//! The agent's loop feeds it and asks it; nothing here touches the kernel.
//! The registrations are kept in the state directory ([`FILE`]), so an
//! agent restart keeps every pod bound to its runtime's namespace.
use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::proto::Reply;
use crate::{
    netns::Netns,
    pods::Pod,
    reconcile::Wanted,
    status::{PodState, PodStatus},
};

/// Where the registrations are kept, in the agent's state directory.
pub const FILE: &str = "cni-pods.json";

/// One sandbox the runtime created for a pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub container_id: String,
    pub uid: Option<String>,
    pub netns: PathBuf,
    pub cookie: u64,
    pub ips: Vec<IpAddr>,
}

/// How many released namespace cookies are remembered: a DELeted namespace
/// may linger a moment before the runtime unmounts it, and must not be
/// adopted by the IP scan meanwhile. Cookies are never reused.
const RELEASED_KEPT: usize = 4096;

#[derive(Debug, Default)]
pub struct Registry {
    /// By pod key (`namespace/name`).
    pods: BTreeMap<String, Registration>,
    released: VecDeque<u64>,
    /// Where the registrations are saved on each change (None: nowhere).
    file: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    pods: BTreeMap<String, Registration>,
    released: VecDeque<u64>,
}

impl Registry {
    /// The registrations an earlier agent saved in `state_dir`, kept there
    /// from now on. An unreadable file is reported and starts empty (the
    /// pods are then found by their addresses, as before the plugin).
    pub fn load(state_dir: &Path) -> Registry {
        let file = state_dir.join(FILE);
        let saved = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice::<Saved>(&b)
                .map_err(|e| {
                    warn!(
                        "{}: {e}; starting without CNI registrations",
                        file.display()
                    )
                })
                .ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                warn!(
                    "reading {}: {e}; starting without CNI registrations",
                    file.display()
                );
                None
            }
        };
        let (pods, released) = saved.map(|s| (s.pods, s.released)).unwrap_or_default();
        Registry {
            pods,
            released,
            file: Some(file),
        }
    }

    fn save(&self) {
        let Some(file) = &self.file else { return };
        let saved = Saved {
            pods: self.pods.clone(),
            released: self.released.clone(),
        };
        let tmp = file.with_extension("tmp");
        let r = std::fs::write(&tmp, serde_json::to_vec(&saved).expect("serialises"))
            .and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = r {
            warn!("saving {}: {e}", file.display());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&Registration> {
        self.pods.get(key)
    }

    /// Records the pod's sandbox; a newer sandbox of the same pod replaces
    /// the older, whose namespace is released.
    pub fn register(&mut self, key: String, r: Registration) {
        if let Some(old) = self.pods.insert(key, r.clone()) {
            if old.cookie != r.cookie {
                self.release_cookie(old.cookie);
            }
        }
        self.save();
    }

    /// CNI DEL: forgets the sandbox `container_id` (of `key` if given) and
    /// releases its namespace. Unknown sandboxes are fine: DEL is idempotent.
    pub fn release(&mut self, key: Option<&str>, container_id: &str) -> Option<Registration> {
        let found = self
            .pods
            .iter()
            .find(|(k, r)| r.container_id == container_id && key.is_none_or(|key| key == *k))
            .map(|(k, _)| k.clone())?;
        let r = self.pods.remove(&found)?;
        self.release_cookie(r.cookie);
        self.save();
        Some(r)
    }

    fn release_cookie(&mut self, cookie: u64) {
        if !self.released.contains(&cookie) {
            if self.released.len() == RELEASED_KEPT {
                self.released.pop_front();
            }
            self.released.push_back(cookie);
        }
    }

    /// Forgets the registrations of pods the source no longer lists (deleted
    /// pods); only meaningful once the source has synced.
    pub fn retain_listed(&mut self, pods: &[Pod]) {
        self.pods.retain(|k, _| pods.iter().any(|p| &p.key() == k));
    }

    /// The pods as a round should see them: a registered pod's addresses
    /// are the runtime's (the source may not have them yet). A registered
    /// pod whose namespace is gone gets none, so no other namespace holding
    /// its addresses is taken for it: it waits for its next ADD.
    pub fn overlay(&self, pods: &[Pod], spaces: &[Netns]) -> Vec<Pod> {
        pods.iter()
            .map(|p| {
                let mut p = p.clone();
                if let Some(r) = self.pods.get(&p.key()) {
                    p.ips = if spaces.iter().any(|n| n.cookie == r.cookie) {
                        r.ips.clone()
                    } else {
                        Vec::new()
                    };
                }
                p
            })
            .collect()
    }

    /// The namespaces a round plans over: the scan's, without released
    /// ones, with each registered namespace the scan missed (`inspect`
    /// reads it from the runtime's path).
    pub fn spaces(
        &self,
        mut scanned: Vec<Netns>,
        inspect: impl Fn(&PathBuf) -> Option<Netns>,
    ) -> Vec<Netns> {
        scanned.retain(|n| !self.released.contains(&n.cookie));
        for r in self.pods.values() {
            if scanned.iter().all(|n| n.cookie != r.cookie) {
                if let Some(n) = inspect(&r.netns).filter(|n| n.cookie == r.cookie) {
                    scanned.push(n);
                }
            }
        }
        scanned
    }

    /// Binds each registered pod to its runtime's namespace, over whatever
    /// the last round bound it to.
    pub fn bind(&self, bound: &mut BTreeMap<String, u64>) {
        for (k, r) in &self.pods {
            bound.insert(k.clone(), r.cookie);
        }
    }

    /// The answer to an ADD or CHECK of `key` in the namespace `cookie`,
    /// after a round: captured only when the maps hold the pod's entries
    /// for that namespace and its inbound link exists (`linked`).
    pub fn answer(
        key: &str,
        cookie: u64,
        applied: &BTreeMap<String, Wanted>,
        status: &[PodStatus],
        linked: impl Fn(u64) -> bool,
    ) -> Reply {
        if applied
            .get(key)
            .is_some_and(|w| w.entries.cookie == cookie && linked(cookie))
        {
            return Reply::Captured { cookie };
        }
        let Some(st) = status.iter().find(|s| s.name == key) else {
            return Reply::Pending {
                why: "the agent has not planned the pod yet".into(),
            };
        };
        let not = |why: &str| Reply::NotCaptured { why: why.into() };
        match st.state {
            PodState::NotMeshed => not("the pod is not meshed"),
            PodState::HostNetwork => not("the pod uses the host's network"),
            PodState::InterceptionNone => not("the pod's interception mode is NONE"),
            _ => {
                let mut why = format!("pod state {:?}", st.state);
                if let Some(c) = st.netns_cookie.filter(|c| *c != cookie) {
                    why.push_str(&format!(
                        "; bound to network namespace cookie {c}, not the runtime's {cookie}"
                    ));
                }
                for e in &st.config_errors {
                    why.push_str("; ");
                    why.push_str(e);
                }
                Reply::Pending { why }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{podconfig::NetView, reconcile};

    fn pod(name: &str, ip: &str) -> Pod {
        let mut p = crate::pods::parse(&format!(
            r#"{{"kind":"Pod","metadata":{{"name":"{name}","namespace":"default",
               "annotations":{{"sidecar.istio.io/status":"{{}}"}}}},
               "spec":{{"containers":[{{"name":"istio-proxy"}}]}},
               "status":{{"podIP":"{ip}"}}}}"#
        ))
        .unwrap()
        .remove(0);
        if ip.is_empty() {
            p.ips.clear();
        }
        p
    }

    fn ns(cookie: u64, ip: &str) -> Netns {
        Netns {
            inode: cookie,
            path: format!("/run/netns/n{cookie}").into(),
            cookie,
            addrs: vec![ip.parse().unwrap()],
            net: NetView::default(),
            user_ns: None,
        }
    }

    fn reg(cookie: u64, ip: &str) -> Registration {
        Registration {
            container_id: format!("c{cookie}"),
            uid: None,
            netns: format!("/run/netns/n{cookie}").into(),
            cookie,
            ips: vec![ip.parse().unwrap()],
        }
    }

    /// The runtime's namespace wins over one that holds the pod's address
    /// first (an impostor), before the source has the pod's address.
    #[test]
    fn registered_pod_is_bound_to_the_runtimes_namespace() {
        let mut r = Registry::default();
        r.register("default/a".into(), reg(20, "10.0.0.5"));
        let pods = vec![pod("a", "")];
        let spaces = r.spaces(vec![ns(10, "10.0.0.5")], |p| {
            (p == &PathBuf::from("/run/netns/n20")).then(|| ns(20, "10.0.0.5"))
        });
        let pods = r.overlay(&pods, &spaces);
        let mut bound = BTreeMap::new();
        r.bind(&mut bound);
        let plan = reconcile::plan(&pods, &spaces, &Default::default(), &bound);
        assert_eq!(plan.want["default/a"].entries.cookie, 20);
        assert_eq!(plan.want.len(), 1, "{:?}", plan.want.keys());
        let linked = |_| true;
        assert_eq!(
            Registry::answer("default/a", 20, &plan.want, &plan.status, linked),
            Reply::Captured { cookie: 20 }
        );
        assert!(matches!(
            Registry::answer("default/a", 20, &plan.want, &plan.status, |_| false),
            Reply::Pending { .. }
        ));
    }

    /// After DEL, the namespace is never adopted by the IP scan, and a
    /// registered pod whose namespace is gone waits rather than being bound
    /// to another namespace holding its address.
    #[test]
    fn released_and_vanished_namespaces_capture_nothing() {
        let mut r = Registry::default();
        r.register("default/a".into(), reg(20, "10.0.0.5"));
        assert!(r.release(Some("default/b"), "c20").is_none());
        assert!(r.release(None, "nope").is_none());
        let pods = vec![pod("a", "10.0.0.5")];
        // Gone: only an impostor holds the address.
        let spaces = r.spaces(vec![ns(10, "10.0.0.5")], |_| None);
        let seen = r.overlay(&pods, &spaces);
        assert!(seen[0].ips.is_empty());
        assert!(r.release(Some("default/a"), "c20").is_some());
        let spaces = r.spaces(vec![ns(20, "10.0.0.5")], |_| None);
        assert!(spaces.is_empty(), "released namespace is left out");
        let plan = reconcile::plan(
            &r.overlay(&pods, &spaces),
            &spaces,
            &Default::default(),
            &BTreeMap::new(),
        );
        assert!(plan.want.is_empty());
    }

    #[test]
    fn registrations_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("meshlane-cni-reg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Registry::load(&dir);
        assert!(r.is_empty());
        r.register("default/a".into(), reg(20, "10.0.0.5"));
        r.register("default/b".into(), reg(21, "10.0.0.6"));
        r.release(None, "c21");
        let again = Registry::load(&dir);
        assert_eq!(again.get("default/a"), Some(&reg(20, "10.0.0.5")));
        assert!(again.get("default/b").is_none());
        assert!(again.released.contains(&21));
        std::fs::write(dir.join(FILE), "{").unwrap();
        assert!(Registry::load(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unmeshed_pods_are_not_captured_and_may_start() {
        let mut p = pod("a", "10.0.0.5");
        p.meshed = false;
        let plan = reconcile::plan(&[p], &[], &Default::default(), &BTreeMap::new());
        assert!(matches!(
            Registry::answer("default/a", 1, &plan.want, &plan.status, |_| true),
            Reply::NotCaptured { .. }
        ));
    }
}

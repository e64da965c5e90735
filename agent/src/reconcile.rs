//! The pure step of a round: the node's pods and its network namespaces in,
//! the map entries each captured pod should have and every pod's status out.
//! No map, file or namespace is touched here, so every case is a unit test.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use tracing::warn;

use crate::{
    bpf::PodEntries,
    netns::Netns,
    podconfig::{MeshConfig, Mode, NodeDefaults},
    pods::Pod,
    status::{PodState, PodStatus},
};

/// One captured pod: its namespace and what the maps should hold for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub netns: PathBuf,
    pub entries: PodEntries,
}

/// What a round should leave in the kernel, and what it tells of each pod.
#[derive(Debug, Default)]
pub struct Plan {
    /// By pod key (`namespace/name`).
    pub want: BTreeMap<String, Wanted>,
    pub status: Vec<PodStatus>,
}

/// True when some pod needs its network namespace found (worth a scan).
pub fn needs_netns(pods: &[Pod]) -> bool {
    pods.iter()
        .any(|p| p.meshed && !p.host_network && !p.ips.is_empty())
}

/// Plans a round: each meshed pod is bound to the one namespace holding its
/// addresses; a pod whose problems (bad annotation, no namespace yet, its
/// addresses in several namespaces) are reported for that pod only.
pub fn plan(pods: &[Pod], spaces: &[Netns], defaults: &NodeDefaults) -> Plan {
    let mut status = Vec::new();
    let mut want: BTreeMap<String, Wanted> = BTreeMap::new();
    let mut by_ip: BTreeMap<IpAddr, Vec<&Netns>> = BTreeMap::new();
    for ns in spaces {
        for a in &ns.addrs {
            by_ip.entry(*a).or_default().push(ns);
        }
    }

    for pod in pods {
        let mut st = PodStatus::new(pod);
        if !pod.meshed {
            st.state = PodState::NotMeshed;
            status.push(st);
            continue;
        }
        let cfg = MeshConfig::from_pod_with(pod, defaults);
        for e in &cfg.errors {
            warn!(pod = %pod.key(), "{e}");
        }
        st.config_errors = cfg.errors.iter().map(ToString::to_string).collect();
        st.notes = cfg.unsupported.clone();
        st.config = Some(cfg.clone());
        if pod.host_network {
            st.state = PodState::HostNetwork;
        } else if cfg.mode == Mode::None {
            st.state = PodState::InterceptionNone;
        } else if pod.ips.is_empty() {
            st.state = PodState::WaitingForIp;
        } else {
            let found: BTreeSet<(u64, PathBuf)> = pod
                .ips
                .iter()
                .filter_map(|ip| by_ip.get(ip))
                .flatten()
                .map(|ns| (ns.cookie, ns.path.clone()))
                .collect();
            match found.len() {
                0 => st.state = PodState::WaitingForNetns,
                1 => {
                    let (cookie, path) = found.into_iter().next().expect("one");
                    st.netns_cookie = Some(cookie);
                    st.netns = Some(path.display().to_string());
                    st.state = PodState::Active;
                    if want.values().any(|a| a.entries.cookie == cookie) {
                        st.state = PodState::Error;
                        st.config_errors.push(format!(
                            "network namespace {} is claimed by another pod",
                            path.display()
                        ));
                    } else {
                        want.insert(
                            pod.key(),
                            Wanted {
                                netns: path.clone(),
                                entries: PodEntries {
                                    cookie,
                                    ips: pod.ips.clone(),
                                    entries: cfg.entries(cookie, &pod.ips),
                                },
                            },
                        );
                    }
                }
                _ => {
                    st.state = PodState::Error;
                    st.config_errors.push(format!(
                        "pod IPs {:?} are in {} network namespaces ({}); not capturing until that is resolved",
                        pod.ips,
                        found.len(),
                        found.iter().map(|(_, p)| p.display().to_string()).collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
        status.push(st);
    }
    Plan { want, status }
}

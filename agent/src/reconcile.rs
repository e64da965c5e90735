//! The pure step of a round: the node's pods and its network namespaces in,
//! the map entries each captured pod should have and every pod's status out.
//! No map, file or namespace is touched here, so every case is a unit test.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use meshlane_common::{flags, PodConfig};
use tracing::warn;

use crate::{
    bpf::PodEntries,
    netns::Netns,
    podconfig::{MeshConfig, Mode, NetEntries, NodeDefaults},
    pods::Pod,
    status::{PodState, PodStatus},
    userns::UserNs,
};

/// One captured pod: its namespace and what the maps should hold for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub netns: PathBuf,
    pub entries: PodEntries,
    /// The pod's one namespace: it stays bound to it while the namespace
    /// lives ([`plan`]'s `bound`). False for the namespaces of an ambiguous
    /// first binding, which are looked at again each round.
    pub sticky: bool,
}

/// What a round should leave in the kernel, and what it tells of each pod.
#[derive(Debug, Default)]
pub struct Plan {
    /// By pod key (`namespace/name`); the other namespaces of an ambiguous
    /// pod as `namespace/name@cookie`.
    pub want: BTreeMap<String, Wanted>,
    pub status: Vec<PodStatus>,
}

/// True when some pod needs its network namespace found (worth a scan).
pub fn needs_netns(pods: &[Pod]) -> bool {
    pods.iter()
        .any(|p| p.meshed && !p.host_network && !p.ips.is_empty())
}

/// Looks up, with `of_netns`, the user namespace of each namespace holding
/// an address of a meshed `hostUsers: false` pod (the only ones whose proxy
/// ids need mapping).
pub fn look_up_user_ns(
    pods: &[Pod],
    spaces: &mut [Netns],
    of_netns: impl Fn(&std::path::Path) -> Result<UserNs, String>,
) {
    let ips: BTreeSet<IpAddr> = pods
        .iter()
        .filter(|p| p.meshed && !p.host_users)
        .flat_map(|p| p.ips.iter().copied())
        .collect();
    for ns in spaces {
        if ns.addrs.iter().any(|a| ips.contains(a)) {
            ns.user_ns = Some(of_netns(&ns.path));
        }
    }
}

/// The pods whose namespace [`plan`] keeps, by pod key: the single binding
/// of each from `want`.
pub fn bindings(want: &BTreeMap<String, Wanted>) -> BTreeMap<String, u64> {
    want.iter()
        .filter(|(_, w)| w.sticky)
        .map(|(k, w)| (k.clone(), w.entries.cookie))
        .collect()
}

/// Reports interfaces the pod's annotations name that its namespace lacks,
/// and what of a rerouted virtual interface is not captured.
fn note_missing(st: &mut PodStatus, cfg: &MeshConfig, net: &NetEntries) {
    for name in &cfg.reroute_virtual_interfaces {
        st.notes.push(format!(
            "connections from interface {name:?} to the pod are captured as Istio's rules \
             capture them, but traffic forwarded through the pod from it (a VM's traffic to \
             other hosts) is NOT captured: no socket hook sees forwarded packets"
        ));
    }
    st.config_errors
        .extend(net.routes_over_quota.iter().cloned());
    for name in &net.missing {
        st.notes.push(format!(
            "interface {name:?} (named by an interface annotation) is not in the pod's network \
             namespace: its rule matches nothing until it appears"
        ));
    }
}

/// Plans a round: each meshed pod is bound to the namespace holding its
/// addresses, and stays bound to it (`bound`, from the last round) while
/// that namespace lives, whatever other namespace gains the same address:
/// an address planted elsewhere is reported as a conflict and changes
/// nothing. A namespace bound to one pod is never another's. A first
/// binding that finds the pod's addresses in several namespaces captures
/// all of them with the pod's configuration (which only hurts an impostor)
/// until one remains; none of them then passes connections by
/// `bypass-until-ready`. Problems (bad annotation, no namespace yet) are
/// reported for that pod only.
pub fn plan(
    pods: &[Pod],
    spaces: &[Netns],
    defaults: &NodeDefaults,
    bound: &BTreeMap<String, u64>,
) -> Plan {
    let mut status = Vec::new();
    let mut want: BTreeMap<String, Wanted> = BTreeMap::new();
    let mut by_ip: BTreeMap<IpAddr, Vec<&Netns>> = BTreeMap::new();
    for ns in spaces {
        for a in &ns.addrs {
            by_ip.entry(*a).or_default().push(ns);
        }
    }
    let by_cookie: BTreeMap<u64, &Netns> = spaces.iter().map(|n| (n.cookie, n)).collect();
    let capturable = |p: &Pod| p.meshed && !p.host_network && !p.ips.is_empty();
    // Namespaces that stay bound to their pod are claimed before any other
    // pod looks for its own.
    let mut claimed: BTreeMap<u64, String> = pods
        .iter()
        .filter(|p| capturable(p))
        .filter_map(|p| {
            let c = *bound.get(&p.key())?;
            by_cookie.contains_key(&c).then(|| (c, p.key()))
        })
        .collect();
    // Conflicts to report on the pod a namespace is bound to.
    let mut conflicts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // The known pods (of any kind) each namespace holds an address of: a
    // namespace holding only one pod's addresses is that pod's before one
    // that also holds another's.
    let mut owners: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for p in pods {
        for ns in p.ips.iter().filter_map(|ip| by_ip.get(ip)).flatten() {
            owners.entry(ns.cookie).or_default().insert(p.key());
        }
    }

    for pod in pods {
        let mut st = PodStatus::new(pod);
        if !pod.meshed {
            st.state = PodState::NotMeshed;
            status.push(st);
            continue;
        }
        let key = pod.key();
        let cfg = MeshConfig::from_pod_with(pod, defaults);
        for e in &cfg.errors {
            warn!(pod = %key, "{e}");
        }
        st.config_errors = cfg.errors.iter().map(ToString::to_string).collect();
        st.config = Some(cfg.clone());
        if pod.host_network {
            st.state = PodState::HostNetwork;
        } else if cfg.mode == Mode::None {
            st.state = PodState::InterceptionNone;
        } else if pod.ips.is_empty() {
            st.state = PodState::WaitingForIp;
        } else {
            let holders: BTreeSet<(u64, PathBuf)> = pod
                .ips
                .iter()
                .filter_map(|ip| by_ip.get(ip))
                .flatten()
                .map(|ns| (ns.cookie, ns.path.clone()))
                .collect();
            let sticky = bound
                .get(&key)
                .and_then(|c| by_cookie.get(c))
                .map(|ns| (ns.cookie, ns.path.clone()));
            let chosen: Vec<(u64, PathBuf)> = match &sticky {
                Some(b) => vec![b.clone()],
                None => {
                    let free: Vec<(u64, PathBuf)> = holders
                        .iter()
                        .filter(|(c, _)| claimed.get(c).is_none_or(|k| k == &key))
                        .cloned()
                        .collect();
                    let only_ours: Vec<(u64, PathBuf)> = free
                        .iter()
                        .filter(|(c, _)| owners.get(c).is_some_and(|o| o.len() == 1))
                        .cloned()
                        .collect();
                    if only_ours.is_empty() {
                        free
                    } else {
                        only_ours
                    }
                }
            };
            for (c, path) in holders.iter().filter(|h| !chosen.contains(h)) {
                let owner = claimed.get(c);
                st.conflicts.push(format!(
                    "conflict: network namespace {} (cookie {c}){} also holds an address of this \
                     pod; ignored, the pod stays captured in its own",
                    path.display(),
                    owner
                        .map(|o| format!(", bound to pod {o},"))
                        .unwrap_or_default()
                ));
                if let Some(o) = owner {
                    conflicts.entry(o.clone()).or_default().push(format!(
                        "conflict: this pod's network namespace also holds an address of pod \
                         {key}; ignored for {key}"
                    ));
                }
            }
            match chosen.len() {
                0 => st.state = PodState::WaitingForNetns,
                1 => {
                    let (cookie, path) = chosen.into_iter().next().expect("one");
                    claimed.insert(cookie, key.clone());
                    st.netns_cookie = Some(cookie);
                    st.netns = Some(path.display().to_string());
                    st.state = PodState::Active;
                    let net =
                        cfg.net_entries(cookie, &by_cookie[&cookie].net, defaults.max_list_entries);
                    note_missing(&mut st, &cfg, &net);
                    let mut entries = PodEntries {
                        cookie,
                        ips: pod.ips.clone(),
                        entries: cfg.entries(cookie, &pod.ips),
                        net,
                    };
                    proxy_ids(
                        pod,
                        by_cookie.get(&cookie).copied(),
                        &mut entries.entries.pod,
                        &mut st,
                    );
                    want.insert(
                        key.clone(),
                        Wanted {
                            netns: path,
                            entries,
                            sticky: true,
                        },
                    );
                }
                n => {
                    // Which namespace is the pod's cannot be told yet: all
                    // are captured. The first serves the pod's addresses
                    // for inbound lookups (POD_BY_IP); the others get the
                    // pod's configuration without them.
                    let (cookie, path) = chosen[0].clone();
                    st.netns_cookie = Some(cookie);
                    st.netns = Some(path.display().to_string());
                    st.state = PodState::Active;
                    st.notes.push(format!(
                        "the pod's addresses are in {n} network namespaces ({}): all are \
                         captured with its configuration, without bypass-until-ready, until \
                         one remains",
                        chosen
                            .iter()
                            .map(|(_, p)| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    for (i, (cookie, path)) in chosen.into_iter().enumerate() {
                        claimed.insert(cookie, key.clone());
                        let net = cfg.net_entries(
                            cookie,
                            &by_cookie[&cookie].net,
                            defaults.max_list_entries,
                        );
                        if i == 0 {
                            note_missing(&mut st, &cfg, &net);
                        }
                        let mut entries = PodEntries {
                            cookie,
                            ips: if i == 0 { pod.ips.clone() } else { Vec::new() },
                            entries: cfg.entries(cookie, &pod.ips),
                            net,
                        };
                        entries.entries.pod.flags &= !flags::BYPASS_UNTIL_READY;
                        let ns = by_cookie.get(&cookie).copied();
                        if i == 0 {
                            proxy_ids(pod, ns, &mut entries.entries.pod, &mut st);
                        } else {
                            // The others' problems are theirs, not the pod's.
                            proxy_ids(pod, ns, &mut entries.entries.pod, &mut PodStatus::new(pod));
                        }
                        let k = if i == 0 {
                            key.clone()
                        } else {
                            format!("{key}@{cookie}")
                        };
                        want.insert(
                            k,
                            Wanted {
                                netns: path,
                                entries,
                                sticky: false,
                            },
                        );
                    }
                }
            }
        }
        status.push(st);
    }
    for st in &mut status {
        if let Some(c) = conflicts.remove(&st.name) {
            st.conflicts.extend(c);
        }
    }
    Plan { want, status }
}

/// No id a task can hold: `(uid_t)-1`, which setuid(2) refuses.
const NOBODY: u32 = u32::MAX;

/// For a `hostUsers: false` pod, puts the node's ids of its proxy (what the
/// kernel compares) into `cfg`, from the user namespace of the processes in
/// `ns`. When they cannot be told, `cfg` fails closed ([`fail_closed`]) and
/// `st` says why.
fn proxy_ids(pod: &Pod, ns: Option<&Netns>, cfg: &mut PodConfig, st: &mut PodStatus) {
    if pod.host_users {
        return;
    }
    let (uid, gid) = (cfg.proxy_uid, cfg.proxy_gid);
    let mapped = match ns.and_then(|n| n.user_ns.as_ref()) {
        Some(Ok(u)) => u.to_host(uid, gid).map(|ids| (u.inode, ids)),
        Some(Err(e)) => Err(e.clone()),
        None => Err("the pod's user namespace was not looked up".into()),
    };
    match mapped {
        Ok((inode, (host_uid, host_gid))) => {
            cfg.proxy_uid = host_uid;
            cfg.proxy_gid = host_gid;
            st.notes.push(format!(
                "hostUsers: false: proxy uid {uid} and gid {gid} are {host_uid} and {host_gid} on \
                 the node (user namespace {inode})"
            ));
        }
        Err(why) => {
            fail_closed(cfg);
            st.state = PodState::ProxyIdUnknown;
            st.config_errors.push(format!(
                "hostUsers: false: the node's ids of the proxy (uid {uid}, gid {gid}) cannot be \
                 told: {why}; captured with nobody as the proxy and its connections refused, \
                 until they can"
            ));
        }
    }
}

/// A pod whose proxy cannot be recognised stays captured (a pod is never
/// released on doubt), but its captured connections are refused instead
/// of reaching the proxy: the proxy's own upstream connections would be
/// captured too and come back to it, a loop. Nobody is its proxy, its
/// outbound and DNS capture go to port 0, where nothing can listen
/// (connect() gets ECONNREFUSED), inbound finds no proxy listener (refused),
/// and `bypass-until-ready` cannot pass anything.
fn fail_closed(cfg: &mut PodConfig) {
    cfg.proxy_uid = NOBODY;
    cfg.proxy_gid = NOBODY;
    cfg.outbound_capture_port = 0;
    cfg.dns_proxy_port = 0;
    cfg.flags &= !flags::BYPASS_UNTIL_READY;
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::istio::annotation;

    fn pod(name: &str, ip: [u8; 4]) -> Pod {
        Pod::meshed_with(
            ("default", name),
            BTreeMap::new(),
            vec![IpAddr::V4(Ipv4Addr::from(ip))],
        )
    }

    fn ns(cookie: u64, ips: &[[u8; 4]]) -> Netns {
        Netns {
            inode: cookie,
            path: PathBuf::from(format!("/run/netns/ns{cookie}")),
            cookie,
            addrs: ips.iter().map(|a| IpAddr::V4(Ipv4Addr::from(*a))).collect(),
            net: Default::default(),
            user_ns: None,
        }
    }

    const V: [u8; 4] = [10, 0, 0, 5];
    const X: [u8; 4] = [10, 0, 0, 6];

    fn state<'a>(p: &'a Plan, name: &str) -> &'a PodStatus {
        p.status
            .iter()
            .find(|s| s.name == format!("default/{name}"))
            .expect("status")
    }

    #[test]
    fn a_bound_pod_stays_bound_when_another_namespace_gains_its_address() {
        let pods = [pod("victim", V), pod("impostor", X)];
        let first = plan(
            &pods,
            &[ns(1, &[V]), ns(2, &[X])],
            &NodeDefaults::ISTIO,
            &BTreeMap::new(),
        );
        let bound = bindings(&first.want);
        assert_eq!(bound.get("default/victim"), Some(&1));
        // The impostor puts the victim's address on its own namespace.
        let next = plan(
            &pods,
            &[ns(1, &[V]), ns(2, &[X, V])],
            &NodeDefaults::ISTIO,
            &bound,
        );
        assert_eq!(next.want["default/victim"], first.want["default/victim"]);
        assert_eq!(
            next.want["default/impostor"],
            first.want["default/impostor"]
        );
        assert_eq!(next.want.len(), 2);
        let v = state(&next, "victim");
        assert_eq!(v.state, PodState::Active);
        assert!(
            v.conflicts.iter().any(|n| n.starts_with("conflict:")),
            "{v:?}"
        );
        let x = state(&next, "impostor");
        assert!(
            x.conflicts.iter().any(|n| n.contains("default/victim")),
            "{x:?}"
        );
    }

    #[test]
    fn a_namespace_bound_to_one_pod_is_never_anothers() {
        // The impostor holds only the victim's address; the victim's own
        // namespace has not appeared yet.
        let pods = [pod("impostor", X), pod("victim", V)];
        let bound = BTreeMap::from([("default/impostor".to_string(), 2)]);
        let p = plan(&pods, &[ns(2, &[X, V])], &NodeDefaults::ISTIO, &bound);
        assert_eq!(state(&p, "victim").state, PodState::WaitingForNetns);
        assert!(!p.want.contains_key("default/victim"));
        assert_eq!(p.want["default/impostor"].entries.cookie, 2);
    }

    #[test]
    fn an_ambiguous_first_binding_captures_every_candidate_without_bypass() {
        let mut v = pod("victim", V);
        v.annotations
            .insert(annotation::BYPASS_UNTIL_READY.into(), "true".into());
        let p = plan(
            &[v],
            &[ns(1, &[V]), ns(3, &[V])],
            &NodeDefaults::ISTIO,
            &BTreeMap::new(),
        );
        assert_eq!(p.want.len(), 2, "{:?}", p.want.keys());
        let primary = &p.want["default/victim"];
        let extra = &p.want["default/victim@3"];
        assert_eq!((primary.entries.cookie, extra.entries.cookie), (1, 3));
        assert_eq!(primary.entries.ips, vec![IpAddr::V4(Ipv4Addr::from(V))]);
        assert!(
            extra.entries.ips.is_empty(),
            "one namespace serves the address"
        );
        for w in [primary, extra] {
            assert!(!w.sticky);
            assert!(!w.entries.entries.pod.has(flags::BYPASS_UNTIL_READY));
        }
        assert_eq!(state(&p, "victim").state, PodState::Active);
        // Not sticky: once one namespace remains, the pod binds to it.
        let bound = bindings(&p.want);
        assert!(bound.is_empty());
        let v = pod("victim", V);
        let p = plan(
            &[v],
            &[ns(3, &[V]), ns(1, &[])],
            &NodeDefaults::ISTIO,
            &bound,
        );
        assert_eq!(p.want.len(), 1);
        assert_eq!(p.want["default/victim"].entries.cookie, 3);
        assert!(p.want["default/victim"].sticky);
    }

    #[test]
    fn a_first_binding_prefers_the_namespace_holding_only_the_pods_addresses() {
        // The impostor, a known pod, planted the victim's address before
        // the agent first saw either, and comes later in the list.
        let pods = [pod("victim", V), pod("impostor", X)];
        let p = plan(
            &pods,
            &[ns(2, &[X, V]), ns(1, &[V])],
            &NodeDefaults::ISTIO,
            &BTreeMap::new(),
        );
        assert_eq!(p.want.len(), 2, "{:?}", p.want.keys());
        assert_eq!(p.want["default/victim"].entries.cookie, 1);
        assert!(p.want["default/victim"].sticky);
        assert_eq!(p.want["default/impostor"].entries.cookie, 2);
    }

    #[test]
    fn a_pod_whose_namespace_is_gone_binds_again() {
        let pods = [pod("victim", V)];
        let bound = BTreeMap::from([("default/victim".to_string(), 1)]);
        let p = plan(&pods, &[ns(4, &[V])], &NodeDefaults::ISTIO, &bound);
        assert_eq!(p.want["default/victim"].entries.cookie, 4);
    }

    fn userns_pod(name: &str, ip: [u8; 4]) -> Pod {
        let mut p = pod(name, ip);
        p.host_users = false;
        p.annotations
            .insert(annotation::BYPASS_UNTIL_READY.into(), "true".into());
        p
    }

    fn with_user_ns(mut n: Netns, map: Result<&str, &str>) -> Netns {
        n.user_ns = Some(
            map.map(|m| UserNs {
                inode: 7,
                uids: crate::userns::IdMap::parse(m).unwrap(),
                gids: crate::userns::IdMap::parse(m).unwrap(),
            })
            .map_err(str::to_string),
        );
        n
    }

    #[test]
    fn a_user_namespace_pods_proxy_ids_are_the_nodes() {
        let p = plan(
            &[userns_pod("u", V)],
            &[with_user_ns(ns(1, &[V]), Ok("0 196608 65536"))],
            &NodeDefaults::ISTIO,
            &BTreeMap::new(),
        );
        let cfg = p.want["default/u"].entries.entries.pod;
        assert_eq!((cfg.proxy_uid, cfg.proxy_gid), (197_945, 197_945));
        assert_eq!(cfg.outbound_capture_port, 15001);
        assert!(cfg.has(flags::BYPASS_UNTIL_READY));
        let st = state(&p, "u");
        assert_eq!(st.state, PodState::Active);
        assert!(st.notes.iter().any(|n| n.contains("197945")), "{st:?}");
        // A pod with hostUsers (the default) is left as it declares.
        let p = plan(
            &[pod("h", V)],
            &[with_user_ns(ns(1, &[V]), Ok("0 196608 65536"))],
            &NodeDefaults::ISTIO,
            &BTreeMap::new(),
        );
        assert_eq!(p.want["default/h"].entries.entries.pod.proxy_uid, 1337);
    }

    #[test]
    fn unknown_proxy_ids_fail_closed_without_a_loop() {
        for (n, why) in [
            (
                with_user_ns(ns(1, &[V]), Err("no process yet")),
                "no process yet",
            ),
            (
                with_user_ns(ns(1, &[V]), Ok("0 196608 1000")),
                "uid 1337 is not in",
            ),
            (ns(1, &[V]), "not looked up"),
        ] {
            let p = plan(
                &[userns_pod("u", V)],
                &[n],
                &NodeDefaults::ISTIO,
                &BTreeMap::new(),
            );
            // Still captured: the entries are written...
            let cfg = p.want["default/u"].entries.entries.pod;
            assert!(cfg.has(flags::INCLUDE_ALL_OUTBOUND_CIDRS));
            // ...with nobody as the proxy and captured connections refused.
            assert_eq!((cfg.proxy_uid, cfg.proxy_gid), (NOBODY, NOBODY));
            assert_eq!((cfg.outbound_capture_port, cfg.dns_proxy_port), (0, 0));
            assert!(!cfg.has(flags::BYPASS_UNTIL_READY));
            let st = state(&p, "u");
            assert_eq!(st.state, PodState::ProxyIdUnknown);
            assert!(
                st.config_errors.iter().any(|e| e.contains(why)),
                "{why}: {st:?}"
            );
        }
    }

    #[test]
    fn user_namespaces_are_looked_up_only_for_user_namespace_pods() {
        let pods = [userns_pod("u", V), pod("h", X)];
        let mut spaces = [ns(1, &[V]), ns(2, &[X])];
        look_up_user_ns(&pods, &mut spaces, |p| Err(p.display().to_string()));
        assert_eq!(spaces[0].user_ns, Some(Err("/run/netns/ns1".into())));
        assert_eq!(spaces[1].user_ns, None);
    }
}

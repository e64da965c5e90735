//! How many entries each per-pod map holds, derived at load time from the
//! most pods the node runs (`--max-pods`, kubelet's `maxPods`) and the
//! per-pod list quota (`--max-list-entries`): room for every pod of the
//! node with every list at its quota, so that a pod within its quota can
//! never fill a map the node's other pods share (issue 14).
//!
//! The contract's `capacity` (`meshlane_common::maps`) stays the object's
//! default; the loader replaces it with [`Capacities::of`] for the maps
//! sized here, and the kernel map's `max_entries` is what status and
//! `/metrics` report. Maps not sized by pods keep the object's: `STATS` and
//! `SETTINGS` (one slot per counter or setting), the socket storages (one
//! value per socket), and the maps sized by connections (`IN_FLIGHT`,
//! `IN_FLIGHT6`, `SOCKS`, `SOCK_ADDRS`).
use std::{collections::BTreeMap, ops::RangeInclusive};

use meshlane_common::{
    cidr_list,
    maps::{self, Map},
    port_list, MAX_POD_IPS,
};
use serde::Serialize;

use crate::podconfig::ADDED_INBOUND_EXCLUSIONS;

/// `--max-pods` by default: kubelet's default `maxPods`.
pub const DEFAULT_MAX_PODS: u32 = 110;

/// `--max-pods` accepted: at least one pod, and no more than any kubelet
/// runs (its own limit is far lower: 110 by default, a few hundred where
/// raised).
pub const MAX_PODS: RangeInclusive<u32> = 1..=100_000;

/// Pod slots per pod of `--max-pods`. A deleted pod keeps its entries while
/// it terminates (its grace period, and until the runtime removes its
/// network namespace) and its replacement is written beside it; kubelet
/// admits new pods against running ones only, so for a while the node may
/// hold up to twice its most pods.
const HEADROOM: u64 = 2;

/// A pod's port lists in `PORTS`, each an annotation of at most the quota.
const PORT_LISTS: [u16; 4] = [
    port_list::OUTBOUND_EXCLUDE,
    port_list::OUTBOUND_INCLUDE,
    port_list::INBOUND_EXCLUDE,
    port_list::INBOUND_INCLUDE,
];

/// A pod's lists in `CIDRS` (and again in `CIDRS6`): its two range
/// annotations, and the routes of its namespace (written only when it
/// excludes an interface), counted as one more list at the quota.
const CIDR_LISTS: [u32; 3] = [
    cidr_list::OUTBOUND_EXCLUDE,
    cidr_list::OUTBOUND_INCLUDE,
    cidr_list::ROUTE,
];

/// A pod's interface annotations (`IFACES`): `excludeInterfaces`, and
/// `reroute-virtual-interfaces` (or its older name); an interface both name
/// is one entry.
const IFACE_LISTS: usize = 2;

/// `LISTENERS` entries of one network namespace: each capture port
/// (outbound, inbound) for each kind of lookup (`ListenerKey::IPV4`,
/// `ListenerKey::IPV6`) under each owner: the proxy's uid, and one more
/// (root, for a proxy that binds before dropping privileges, or an app's
/// listener on a capture port). Every namespace of the node registers, a
/// meshed pod's or not.
const LISTENERS_PER_NETNS: u64 = 2 * 2 * 2;

/// The capacity of each map sized by pods, and what it was derived from.
/// Serialized (in `meshlane run --print-options`) as `max_pods` and
/// `map_capacities`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Capacities {
    /// `--max-pods`.
    pub max_pods: u32,
    /// `--max-list-entries` (printed with the node defaults).
    #[serde(skip)]
    pub max_list_entries: usize,
    /// Entries by map name, for the maps sized here only.
    #[serde(rename = "map_capacities")]
    pub maps: BTreeMap<&'static str, u32>,
}

/// Entries one pod (one pod slot) may have in each map sized by pods, with
/// every list at `quota` entries (u64::MAX: more than any map holds).
fn per_pod(quota: u64) -> [(&'static Map, u64); 10] {
    let lists = |n: usize| (n as u64).saturating_mul(quota);
    [
        // One entry per captured pod, keyed by netns cookie.
        (&maps::PODS, 1),
        (&maps::POD_STATS, 1),
        (&maps::POD_SRC6, 1),
        // Four port annotations, and the ports Istio adds to the inbound
        // exclusions whatever the annotation says.
        (
            &maps::PORTS,
            lists(PORT_LISTS.len()).saturating_add(ADDED_INBOUND_EXCLUSIONS as u64),
        ),
        // Per family: an annotation lists both families within its quota,
        // so each family's share is at most the quota.
        (&maps::CIDRS, lists(CIDR_LISTS.len())),
        (&maps::CIDRS6, lists(CIDR_LISTS.len())),
        (&maps::IFACES, lists(IFACE_LISTS)),
        // A pod's own addresses: Kubernetes gives one per family; room for
        // as many of each as a pod's entry in PODS holds.
        (&maps::POD_BY_IP, MAX_POD_IPS as u64),
        (&maps::POD_BY_IP6, MAX_POD_IPS as u64),
        (&maps::LISTENERS, LISTENERS_PER_NETNS),
    ]
}

/// True for the maps whose capacity is derived here.
pub fn sized_by_pods(m: &Map) -> bool {
    per_pod(0).iter().any(|(sized, _)| sized.name == m.name)
}

/// What `--max-pods` must be.
fn max_pods_wanted() -> String {
    format!(
        "expected the most pods this node runs (kubelet's maxPods, {DEFAULT_MAX_PODS} by \
         default), a whole number from {} to {}",
        MAX_PODS.start(),
        MAX_PODS.end()
    )
}

/// Checks `--max-pods`; the error names the flag and the value.
pub fn check_max_pods(max_pods: u32) -> Result<u32, String> {
    if MAX_PODS.contains(&max_pods) {
        Ok(max_pods)
    } else {
        Err(format!("--max-pods {max_pods}: {}", max_pods_wanted()))
    }
}

/// `--max-pods` as clap reads it (also from MESHLANE_MAX_PODS): clap's error
/// names the flag and the value, this says what is wrong with it.
pub fn parse_max_pods(s: &str) -> Result<u32, String> {
    s.trim()
        .parse()
        .ok()
        .filter(|n| MAX_PODS.contains(n))
        .ok_or_else(max_pods_wanted)
}

/// The capacity of every map sized by pods for a node of `max_pods` pods
/// whose list annotations hold at most `max_list_entries` entries each.
/// An error names the flags: a value out of range, or a map that would need
/// more entries than a map can have.
pub fn derive(max_pods: u32, max_list_entries: usize) -> Result<Capacities, String> {
    check_max_pods(max_pods)?;
    let slots = u64::from(max_pods) * HEADROOM;
    let quota = u64::try_from(max_list_entries).unwrap_or(u64::MAX);
    let mut sized = BTreeMap::new();
    for (m, each) in per_pod(quota) {
        let n = slots
            .checked_mul(each)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                format!(
                    "--max-pods {max_pods} with --max-list-entries {max_list_entries}: map {} \
                     would need {} entries per pod for {slots} pod slots, more than a map can \
                     hold ({}): lower one of them",
                    m.name,
                    each,
                    u32::MAX
                )
            })?;
        sized.insert(m.name, n);
    }
    Ok(Capacities {
        max_pods,
        max_list_entries,
        maps: sized,
    })
}

impl Capacities {
    /// The capacity map `m` is created with: derived, or the object's.
    pub fn of(&self, m: &Map) -> u32 {
        self.maps.get(m.name).copied().unwrap_or(m.capacity)
    }

    /// The maps sized here, with their capacities.
    pub fn sized(&self) -> impl Iterator<Item = (&'static str, u32)> + '_ {
        self.maps.iter().map(|(name, n)| (*name, *n))
    }

    /// The flags they come from, for messages.
    pub fn flags(&self) -> String {
        format!(
            "--max-pods {} and --max-list-entries {}",
            self.max_pods, self.max_list_entries
        )
    }
}

impl Default for Capacities {
    /// For kubelet's default maxPods and the default list quota.
    fn default() -> Self {
        derive(
            DEFAULT_MAX_PODS,
            crate::podconfig::NodeDefaults::DEFAULT_MAX_LIST_ENTRIES,
        )
        .expect("the defaults are in range")
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        istio::annotation,
        podconfig::{Cidr, MeshConfig, NetView, NodeDefaults},
        pods::Pod,
    };

    fn cap(c: &Capacities, m: &Map) -> u64 {
        u64::from(c.of(m))
    }

    #[test]
    fn defaults_give_every_pod_slot_its_full_quota() {
        let c = Capacities::default();
        assert_eq!((c.max_pods, c.max_list_entries), (110, 256));
        let want = [
            (&maps::PODS, 220),
            (&maps::POD_STATS, 220),
            (&maps::POD_SRC6, 220),
            // 220 x (4 x 256 + 4)
            (&maps::PORTS, 226_160),
            // 220 x 3 x 256
            (&maps::CIDRS, 168_960),
            (&maps::CIDRS6, 168_960),
            (&maps::IFACES, 112_640),
            (&maps::POD_BY_IP, 880),
            (&maps::POD_BY_IP6, 880),
            (&maps::LISTENERS, 1_760),
        ];
        for (m, n) in want {
            assert_eq!(c.of(m), n, "{}", m.name);
        }
        assert_eq!(c.maps.len(), want.len());
    }

    #[test]
    fn maps_not_sized_by_pods_keep_the_objects_capacity() {
        let c = derive(3, 7).unwrap();
        for m in [
            &maps::STATS,
            &maps::SETTINGS,
            &maps::IN_FLIGHT,
            &maps::IN_FLIGHT6,
            &maps::SOCKS,
            &maps::SOCK_ADDRS,
            &maps::ORIG_DST,
            &maps::ORIG_DST6,
            &maps::SHORTCUT_STATE,
            &maps::PROXY_LEG,
            &maps::LISTEN_OWNER,
        ] {
            assert!(!c.maps.contains_key(m.name), "{}", m.name);
            assert!(!sized_by_pods(m), "{}", m.name);
            assert_eq!(c.of(m), m.capacity, "{}", m.name);
        }
        // Every sized map is one the contract has, and none is an array
        // or a socket storage (whose sizes mean something else).
        for (name, n) in c.sized() {
            let m = maps::by_name(name).expect("a map of the contract");
            assert!(sized_by_pods(m), "{name}");
            assert!(
                matches!(
                    m.kind,
                    maps::Kind::Hash
                        | maps::Kind::PerCpuHash
                        | maps::Kind::LpmTrie
                        | maps::Kind::SockHash
                ),
                "{name}"
            );
            assert!(n > 0, "{name}");
        }
    }

    #[test]
    fn capacities_grow_with_both_flags() {
        let small = derive(4, 16).unwrap();
        assert_eq!(small.of(&maps::PODS), 8);
        assert_eq!(small.of(&maps::PORTS), 8 * (4 * 16 + 4));
        let pods = derive(8, 16).unwrap();
        let lists = derive(4, 32).unwrap();
        for (name, n) in small.sized() {
            assert!(pods.maps[name] == 2 * n, "{name}: twice the pods");
            assert!(lists.maps[name] >= n, "{name}");
        }
        assert!(lists.of(&maps::PORTS) > small.of(&maps::PORTS));
        assert_eq!(lists.of(&maps::PODS), small.of(&maps::PODS));
    }

    #[test]
    fn out_of_range_and_too_large_are_refused_naming_the_flags() {
        for bad in [0, 100_001, u32::MAX] {
            let e = derive(bad, 256).unwrap_err();
            assert!(e.starts_with(&format!("--max-pods {bad}:")), "{e}");
        }
        assert_eq!(derive(100_000, 256).unwrap().of(&maps::PODS), 200_000);
        let e = derive(100_000, usize::MAX).unwrap_err();
        assert!(
            e.contains("--max-pods 100000")
                && e.contains(&format!("--max-list-entries {}", usize::MAX))
                && e.contains("map PORTS"),
            "{e}"
        );
        for (text, ok) in [("110", true), (" 7 ", true), ("0", false), ("x", false)] {
            assert_eq!(parse_max_pods(text).is_ok(), ok, "{text:?}");
        }
        assert!(parse_max_pods("-1")
            .unwrap_err()
            .contains("from 1 to 100000"));
    }

    /// A pod with every list annotation at the quota, the ranges all of
    /// one family, in a namespace with as many interfaces and routes.
    fn pod_at_quota(quota: usize, v6: bool) -> (MeshConfig, Vec<IpAddr>, NetView) {
        let ports = |from: usize| -> String {
            (from..from + quota)
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let cidr = |i: usize| -> Cidr {
            let addr: IpAddr = if v6 {
                format!("fd00::{:x}", i + 1).parse().unwrap()
            } else {
                format!("10.{}.{}.0", i / 256, i % 256).parse().unwrap()
            };
            Cidr {
                addr,
                len: if v6 { 128 } else { 24 },
            }
        };
        let cidrs = |from: usize| -> String {
            (from..from + quota)
                .map(|i| cidr(i).to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let ifaces = |from: usize| -> String {
            (from..from + quota)
                .map(|i| format!("if{i}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let ips: Vec<IpAddr> = (1..=MAX_POD_IPS)
            .flat_map(|i| {
                [
                    format!("10.250.0.{i}").parse().unwrap(),
                    format!("fd01::{i}").parse().unwrap(),
                ]
            })
            .collect();
        let annotations = [
            (annotation::STATUS, "{}".to_string()),
            (annotation::EXCLUDE_OUTBOUND_PORTS, ports(1000)),
            (annotation::INCLUDE_OUTBOUND_PORTS, ports(2000)),
            (annotation::EXCLUDE_INBOUND_PORTS, ports(3000)),
            (annotation::INCLUDE_INBOUND_PORTS, ports(4000)),
            (annotation::STATUS_PORT, "5999".to_string()),
            (annotation::EXCLUDE_OUTBOUND_IP_RANGES, cidrs(0)),
            (annotation::INCLUDE_OUTBOUND_IP_RANGES, cidrs(quota)),
            (annotation::EXCLUDE_INTERFACES, ifaces(0)),
            (annotation::REROUTE_VIRTUAL_INTERFACES, ifaces(quota)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let pod = Pod::meshed_with(("ns", "full"), annotations, ips.clone());
        let node = NodeDefaults::default()
            .with_max_list_entries(quota)
            .unwrap();
        let cfg = MeshConfig::from_pod_with(&pod, &node);
        assert_eq!(cfg.errors, vec![], "every list is within the quota");
        let net = NetView {
            ifaces: (0..2 * quota)
                .map(|i| (format!("if{i}"), i as u32 + 2))
                .collect(),
            routes: (2 * quota..3 * quota).map(|i| (cidr(i), 2)).collect(),
        };
        (cfg, ips, net)
    }

    /// What podconfig really writes for a pod at its quota fits in one
    /// pod slot of each map: the multipliers are the code's, not a guess.
    #[test]
    fn a_pod_at_its_quota_fits_its_slot_of_every_map() {
        let quota = 16;
        let c = derive(1, quota).unwrap();
        let slot = |m: &Map| cap(&c, m) / HEADROOM;
        for v6 in [false, true] {
            let (cfg, ips, net) = pod_at_quota(quota, v6);
            let e = cfg.entries(7, &ips);
            let n = cfg.net_entries(7, &net, quota);
            let routes = n.routes.len() + n.routes6.len();
            assert_eq!(routes, quota, "the namespace's routes are written");
            let written = [
                (&maps::PORTS, e.ports.len()),
                (&maps::CIDRS, e.cidrs.len() + n.routes.len()),
                (&maps::CIDRS6, e.cidrs6.len() + n.routes6.len()),
                (&maps::IFACES, n.ifaces.len()),
                (&maps::POD_BY_IP, ips.iter().filter(|a| a.is_ipv4()).count()),
                (
                    &maps::POD_BY_IP6,
                    ips.iter().filter(|a| a.is_ipv6()).count(),
                ),
            ];
            for (m, n) in written {
                assert!(
                    n as u64 <= slot(m),
                    "{}: a pod at its quota writes {n}, its slot holds {}",
                    m.name,
                    slot(m)
                );
            }
            // The port lists are all full: the slot is exactly this pod.
            assert_eq!(e.ports.len() as u64, slot(&maps::PORTS));
            let family = if v6 { &maps::CIDRS6 } else { &maps::CIDRS };
            assert_eq!(
                (e.cidrs.len() + e.cidrs6.len() + routes) as u64,
                slot(family)
            );
            assert_eq!(n.ifaces.len() as u64, slot(&maps::IFACES));
        }
    }
}

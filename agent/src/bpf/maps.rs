//! The pinned maps, opened by their rows in `meshlane_common::maps`. The
//! handles are private: every write, removal and sweep of a pod's entries
//! goes through the methods here, which keep the kernel's invariant (a pod's
//! lists are in place before its `PODS` entry, and go after it).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::fd::{AsFd, RawFd},
};

use anyhow::{bail, Context, Result};
use aya::maps::{
    lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
    SockHash,
};
use meshlane_common::{
    maps::{self, Map as MapDef},
    setting, stat, Cidr6KeyData, CidrKeyData, IfaceKey, ListenerKey, PodConfig, PodCounters,
    PortKey, V6,
};
use tracing::{info, warn};

use super::{layout::Layout, load, sys};
use crate::podconfig::{MapEntries, NetEntries};

/// What the agent writes for one captured pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntries {
    pub cookie: u64,
    /// Every address of the pod, of both families.
    pub ips: Vec<IpAddr>,
    pub entries: MapEntries,
    /// Its namespace's named interfaces and routes.
    pub net: NetEntries,
}

impl PodEntries {
    /// The pod's IPv6 source for destinations off the pod: its first IPv6
    /// address, as the API lists them.
    pub fn src6(&self) -> Option<V6> {
        self.ips.iter().find_map(|a| match a {
            IpAddr::V6(a) => Some(V6::from_std(*a)),
            IpAddr::V4(_) => None,
        })
    }

    /// Every `CIDRS` key of the pod: its lists' and its routes'.
    fn cidr_keys(&self) -> impl Iterator<Item = (u32, CidrKeyData)> + '_ {
        let routes = self.net.routes.iter().map(|(l, d, _)| (*l, *d));
        self.entries.cidrs.iter().copied().chain(routes)
    }

    /// Every `CIDRS6` key of the pod.
    fn cidr6_keys(&self) -> impl Iterator<Item = (u32, Cidr6KeyData)> + '_ {
        let routes = self.net.routes6.iter().map(|(l, d, _)| (*l, *d));
        self.entries.cidrs6.iter().copied().chain(routes)
    }
}

/// One pod's entries as the kernel holds them ([`Maps::pod_view`]).
#[derive(Clone, Debug, Default)]
pub struct PodView {
    pub pod: Option<PodConfig>,
    pub ports: Vec<PortKey>,
    pub ifaces: Vec<(IfaceKey, u32)>,
    pub listeners: Vec<ListenerKey>,
}

/// Handles on the pinned maps the agent writes and status reads.
pub struct Maps {
    pods: HashMap<MapData, u64, PodConfig>,
    ports: HashMap<MapData, PortKey, u32>,
    cidrs: LpmTrie<MapData, CidrKeyData, u32>,
    stats: PerCpuArray<MapData, u64>,
    pod_stats: PerCpuHashMap<MapData, u64, PodCounters>,
    pod_by_ip: HashMap<MapData, u32, u64>,
    pod_by_ip6: HashMap<MapData, V6, u64>,
    pod_src6: HashMap<MapData, u64, V6>,
    cidrs6: LpmTrie<MapData, Cidr6KeyData, u32>,
    ifaces: HashMap<MapData, IfaceKey, u32>,
    listeners: SockHash<MapData, ListenerKey>,
    settings: Array<MapData, u32>,
    /// Every map with an occupancy key, for counting entries.
    counted: Vec<(&'static MapDef, MapData)>,
}

fn open_map(layout: &Layout, def: &MapDef) -> Result<Map> {
    let data = open_data(layout, def)?;
    Map::from_map_data(data).with_context(|| format!("map {}", def.name))
}

fn open_data(layout: &Layout, def: &MapDef) -> Result<MapData> {
    let path = layout.map(def.name);
    MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
}

/// Entries of a map of any type, counted with BPF_MAP_GET_NEXT_KEY.
pub(super) fn count_entries(map: &MapData, key_size: u32) -> usize {
    let fd = map.fd().as_fd();
    let mut cur = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut n = 0;
    while sys::next_key(fd, (n > 0).then_some(cur.as_slice()), &mut next) {
        n += 1;
        std::mem::swap(&mut cur, &mut next);
    }
    n
}

impl Maps {
    pub fn open(layout: &Layout) -> Result<Self> {
        let counted = maps::ALL
            .iter()
            .filter(|m| m.occupancy.is_some())
            .map(|m| Ok((m, open_data(layout, m)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            pods: HashMap::try_from(open_map(layout, &maps::PODS)?)?,
            ports: HashMap::try_from(open_map(layout, &maps::PORTS)?)?,
            cidrs: LpmTrie::try_from(open_map(layout, &maps::CIDRS)?)?,
            stats: PerCpuArray::try_from(open_map(layout, &maps::STATS)?)?,
            pod_stats: PerCpuHashMap::try_from(open_map(layout, &maps::POD_STATS)?)?,
            pod_by_ip: HashMap::try_from(open_map(layout, &maps::POD_BY_IP)?)?,
            pod_by_ip6: HashMap::try_from(open_map(layout, &maps::POD_BY_IP6)?)?,
            pod_src6: HashMap::try_from(open_map(layout, &maps::POD_SRC6)?)?,
            cidrs6: LpmTrie::try_from(open_map(layout, &maps::CIDRS6)?)?,
            ifaces: HashMap::try_from(open_map(layout, &maps::IFACES)?)?,
            listeners: SockHash::try_from(open_map(layout, &maps::LISTENERS)?)?,
            settings: Array::try_from(open_map(layout, &maps::SETTINGS)?)?,
            counted,
        })
    }

    pub fn set_shortcut(&mut self, on: bool) -> Result<()> {
        if on {
            let o = super::btf::PsockOffsets::of_running_kernel()
                .context("the shortcut cannot be turned on")?;
            self.settings
                .set(setting::OFFSET_SK_USER_DATA, o.sk_user_data, 0)
                .context("writing SETTINGS")?;
            self.settings
                .set(setting::OFFSET_PSOCK_QUEUED, o.msg_tot_len, 0)
                .context("writing SETTINGS")?;
            if self.settings.get(&setting::SHORTCUT_MAX_QUEUED, 0)? == 0 {
                self.set_shortcut_max_queued(default_shortcut_max_queued())?;
            }
        }
        self.settings
            .set(setting::SHORTCUT, u32::from(on), 0)
            .context("writing SETTINGS")?;
        Ok(())
    }

    /// Sets how many bytes a shortcut socket may leave unread on its peer.
    pub fn set_shortcut_max_queued(&mut self, bytes: u32) -> Result<()> {
        if bytes == 0 {
            bail!("--shortcut-max-queued 0: give a number of bytes above zero (0 would leave the limit unset)");
        }
        self.settings
            .set(setting::SHORTCUT_MAX_QUEUED, bytes, 0)
            .context("writing SETTINGS")?;
        Ok(())
    }

    /// The node's capture ports and proxy uid, for namespaces the maps do
    /// not hold yet.
    pub fn set_node_defaults(&mut self, outbound: u16, inbound: u16, proxy_uid: u32) -> Result<()> {
        for (index, value) in [
            (setting::OUTBOUND_CAPTURE_PORT, u32::from(outbound)),
            (setting::INBOUND_CAPTURE_PORT, u32::from(inbound)),
            // Plus one: 0 means unset (Istio's 1337).
            (setting::PROXY_UID, proxy_uid.wrapping_add(1)),
        ] {
            self.settings
                .set(index, value, 0)
                .context("writing SETTINGS")?;
        }
        Ok(())
    }

    pub fn shortcut_max_queued(&self) -> Result<u32> {
        Ok(self.settings.get(&setting::SHORTCUT_MAX_QUEUED, 0)?)
    }

    pub fn shortcut(&self) -> Result<bool> {
        Ok(self.settings.get(&setting::SHORTCUT, 0)? != 0)
    }

    /// Creates a pod's zeroed per-CPU counters, unless they exist.
    pub fn add_pod_stats(&mut self, cookie: u64) -> Result<()> {
        if self.pod_stats.get(&cookie, 0).is_ok() {
            return Ok(());
        }
        let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero = PerCpuValues::try_from(vec![PodCounters::default(); n])?;
        self.pod_stats.insert(cookie, zero, 0)?;
        Ok(())
    }

    /// What the kernel holds for the pod of netns `cookie`: its `PODS`
    /// entry, its port-list entries, its interface entries and the
    /// listeners registered in its namespace.
    pub fn pod_view(&self, cookie: u64) -> PodView {
        PodView {
            pod: self.pods.get(&cookie, 0).ok(),
            ports: self
                .ports
                .keys()
                .flatten()
                .filter(|k| k.netns_cookie == cookie)
                .collect(),
            ifaces: self
                .ifaces
                .iter()
                .flatten()
                .filter(|(k, _)| k.netns_cookie == cookie)
                .collect(),
            listeners: self
                .listener_keys()
                .into_iter()
                .filter(|k| k.netns_cookie == cookie)
                .collect(),
        }
    }

    /// A pod's counters summed over CPUs (zero if it has none).
    pub fn pod_counters(&self, cookie: u64) -> PodCounters {
        let mut sum = PodCounters::default();
        if let Ok(v) = self.pod_stats.get(&cookie, 0) {
            for cpu in v.iter() {
                for (s, c) in sum.iter_mut().zip(cpu.iter()) {
                    *s += c;
                }
            }
        }
        sum
    }

    /// Counters summed over CPUs, indexed by `meshlane_common::stat`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        (0..stat::COUNT)
            .map(|i| Ok(self.stats.get(&i, 0)?.iter().sum()))
            .collect()
    }

    /// Entries of every map that reports its occupancy, by occupancy key.
    pub fn occupancy(&self) -> Occupancy {
        self.counted
            .iter()
            .map(|(def, data)| {
                let key = def.occupancy.expect("only counted maps are kept");
                (key.to_string(), count_entries(data, def.key_size))
            })
            .collect()
    }

    /// The capacity of every map that reports its occupancy, as the kernel
    /// created it (its `max_entries`, whatever the object said), by
    /// occupancy key.
    pub fn capacities(&self) -> Occupancy {
        self.counted
            .iter()
            .filter_map(|(def, data)| {
                let key = def.occupancy.expect("only counted maps are kept");
                let info = data.info().ok()?;
                Some((key.to_string(), info.max_entries() as usize))
            })
            .collect()
    }

    /// The listeners registered in `LISTENERS`.
    pub fn listener_keys(&self) -> BTreeSet<ListenerKey> {
        self.listeners.keys().flatten().collect()
    }

    /// Registers a listening socket (one that predates the programs).
    pub fn register_listener(&mut self, key: ListenerKey, fd: RawFd) -> Result<()> {
        self.listeners
            .insert(key, fd, 0)
            .with_context(|| format!("LISTENERS insert {key:?}"))
    }

    /// Writes a pod's entries: lists first, pod entry last, so the kernel only
    /// acts on a pod once all of its lists are there.
    pub fn write_pod(&mut self, p: &PodEntries) -> Result<()> {
        for k in &p.entries.ports {
            self.ports
                .insert(k, 1, 0)
                .with_context(|| format!("PORTS insert {k:?}"))?;
        }
        for (len, data) in &p.entries.cidrs {
            self.cidrs
                .insert(&Key::new(*len, *data), 1, 0)
                .context("CIDRS insert")?;
        }
        for (len, data) in &p.entries.cidrs6 {
            self.cidrs6
                .insert(&Key::new(*len, *data), 1, 0)
                .context("CIDRS6 insert")?;
        }
        for (len, data, dev) in &p.net.routes {
            self.cidrs
                .insert(&Key::new(*len, *data), dev, 0)
                .context("CIDRS insert (route)")?;
        }
        for (len, data, dev) in &p.net.routes6 {
            self.cidrs6
                .insert(&Key::new(*len, *data), dev, 0)
                .context("CIDRS6 insert (route)")?;
        }
        for (k, roles) in &p.net.ifaces {
            self.ifaces
                .insert(k, roles, 0)
                .with_context(|| format!("IFACES insert {k:?}"))?;
        }
        for ip in &p.ips {
            match ip {
                IpAddr::V4(a) => self.pod_by_ip.insert(a.to_bits(), p.cookie, 0),
                IpAddr::V6(a) => self.pod_by_ip6.insert(V6::from_std(*a), p.cookie, 0),
            }
            .with_context(|| format!("POD_BY_IP insert {ip}"))?;
        }
        match p.src6() {
            Some(a) => self
                .pod_src6
                .insert(p.cookie, a, 0)
                .context("POD_SRC6 insert")?,
            None => {
                let _ = self.pod_src6.remove(&p.cookie);
            }
        }
        self.add_pod_stats(p.cookie).context("POD_STATS insert")?;
        self.pods
            .insert(p.cookie, p.entries.pod, 0)
            .context("PODS insert")?;
        Ok(())
    }

    /// Removes the entries of `old` that `new` does not have. The pod entry
    /// goes first so the kernel stops using the lists; with it, the pod's
    /// inbound link.
    pub fn remove_stale(&mut self, layout: &Layout, old: &PodEntries, new: Option<&PodEntries>) {
        let new_all = new;
        let new_cookie = new.map(|n| n.cookie);
        let new_ips = new.map(|n| n.ips.as_slice()).unwrap_or_default();
        let new = new.map(|n| &n.entries);
        if new_cookie != Some(old.cookie) {
            let _ = self.pods.remove(&old.cookie);
            if let Err(e) = load::detach_netns(layout, old.cookie) {
                warn!(cookie = old.cookie, "{e:#}");
            }
            let _ = self.pod_stats.remove(&old.cookie);
            let _ = self.pod_src6.remove(&old.cookie);
        }
        for ip in &old.ips {
            if new_cookie != Some(old.cookie) || !new_ips.contains(ip) {
                let _ = match ip {
                    IpAddr::V4(a) => self.pod_by_ip.remove(&a.to_bits()),
                    IpAddr::V6(a) => self.pod_by_ip6.remove(&V6::from_std(*a)),
                };
            }
        }
        let keep_ports: BTreeSet<PortKey> = new
            .map(|n| n.ports.iter().copied().collect())
            .unwrap_or_default();
        for k in &old.entries.ports {
            if !keep_ports.contains(k) {
                let _ = self.ports.remove(k);
            }
        }
        let keep_cidrs: BTreeSet<(u32, CidrKeyData)> =
            new_all.map(|n| n.cidr_keys().collect()).unwrap_or_default();
        for k in old.cidr_keys() {
            if !keep_cidrs.contains(&k) {
                let _ = self.cidrs.remove(&Key::new(k.0, k.1));
            }
        }
        let keep_cidrs6: BTreeSet<(u32, Cidr6KeyData)> = new_all
            .map(|n| n.cidr6_keys().collect())
            .unwrap_or_default();
        for k in old.cidr6_keys() {
            if !keep_cidrs6.contains(&k) {
                let _ = self.cidrs6.remove(&Key::new(k.0, k.1));
            }
        }
        let keep_ifaces: BTreeSet<IfaceKey> = new_all
            .map(|n| n.net.ifaces.iter().map(|(k, _)| *k).collect())
            .unwrap_or_default();
        for (k, _) in &old.net.ifaces {
            if !keep_ifaces.contains(k) {
                let _ = self.ifaces.remove(k);
            }
        }
    }

    /// Removes whatever the maps hold that no pod of `kept` wants: what an
    /// earlier agent wrote for pods deleted or changed while no agent ran.
    pub fn sweep<'a>(
        &mut self,
        layout: &Layout,
        kept: impl Iterator<Item = &'a PodEntries> + Clone,
    ) {
        let cookies: BTreeSet<u64> = kept.clone().map(|a| a.cookie).collect();
        let ports: BTreeSet<PortKey> = kept
            .clone()
            .flat_map(|a| a.entries.ports.iter().copied())
            .collect();
        let cidrs: BTreeSet<(u32, CidrKeyData)> =
            kept.clone().flat_map(PodEntries::cidr_keys).collect();
        let cidrs6: BTreeSet<(u32, Cidr6KeyData)> =
            kept.clone().flat_map(PodEntries::cidr6_keys).collect();
        let ifaces: BTreeSet<IfaceKey> = kept
            .clone()
            .flat_map(|a| a.net.ifaces.iter().map(|(k, _)| *k))
            .collect();
        let src6: BTreeSet<(u64, V6)> = kept
            .clone()
            .filter_map(|a| Some((a.cookie, a.src6()?)))
            .collect();
        let ips: BTreeSet<(IpAddr, u64)> = kept
            .flat_map(|a| a.ips.iter().map(|ip| (*ip, a.cookie)))
            .collect();
        let mut removed = 0usize;
        for c in self.pods.keys().flatten().collect::<Vec<_>>() {
            if !cookies.contains(&c) {
                let _ = self.pods.remove(&c);
                let _ = self.pod_stats.remove(&c);
                let _ = load::detach_netns(layout, c);
                removed += 1;
            }
        }
        for k in self.ports.keys().flatten().collect::<Vec<_>>() {
            if !ports.contains(&k) {
                let _ = self.ports.remove(&k);
                removed += 1;
            }
        }
        for k in self.cidrs.keys().flatten().collect::<Vec<_>>() {
            if !cidrs.contains(&(k.prefix_len(), k.data())) {
                let _ = self.cidrs.remove(&k);
                removed += 1;
            }
        }
        for k in self.cidrs6.keys().flatten().collect::<Vec<_>>() {
            if !cidrs6.contains(&(k.prefix_len(), k.data())) {
                let _ = self.cidrs6.remove(&k);
                removed += 1;
            }
        }
        for k in self.ifaces.keys().flatten().collect::<Vec<_>>() {
            if !ifaces.contains(&k) {
                let _ = self.ifaces.remove(&k);
                removed += 1;
            }
        }
        let by_ip: Vec<(u32, u64)> = self.pod_by_ip.iter().flatten().collect();
        for (ip, c) in by_ip {
            if !ips.contains(&(IpAddr::V4(std::net::Ipv4Addr::from_bits(ip)), c)) {
                let _ = self.pod_by_ip.remove(&ip);
                removed += 1;
            }
        }
        let by_ip6: Vec<(V6, u64)> = self.pod_by_ip6.iter().flatten().collect();
        for (ip, c) in by_ip6 {
            if !ips.contains(&(IpAddr::V6(ip.to_std()), c)) {
                let _ = self.pod_by_ip6.remove(&ip);
                removed += 1;
            }
        }
        let by_src6: Vec<(u64, V6)> = self.pod_src6.iter().flatten().collect();
        for (c, a) in by_src6 {
            if !src6.contains(&(c, a)) {
                let _ = self.pod_src6.remove(&c);
                removed += 1;
            }
        }
        if removed > 0 {
            info!(removed, "swept map entries of pods that are gone");
        }
    }
}

/// Entries (or capacities) per map, keyed by the map's occupancy key
/// (`meshlane status`'s `maps` and `map_capacity` objects).
pub type Occupancy = BTreeMap<String, usize>;

/// The shortcut's default limit on bytes left unread on a peer: 4 MiB, the
/// default maximum of a TCP send buffer (net.ipv4.tcp_wmem), so a stalled
/// reader holds about as much as it would over TCP.
pub fn default_shortcut_max_queued() -> u32 {
    4 << 20
}

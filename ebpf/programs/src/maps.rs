//! Every map the programs share with the agent. Keys and values come from
//! `meshlane_common`; the agent pins these under its bpffs directory.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, SkStorage, SockHash,
    },
    macros::btf_map,
};
use meshlane_common::{
    capacity, cidr_key_data, cidr_list, decide::PodLists, port_list, setting, stat, CidrKeyData,
    ConnKey, FlowKey, ListenerKey, OrigDst, PodConfig, PodCounters, PortKey, CIDR_KEY_FIXED_BITS,
};

/// Meshed pods by network-namespace cookie. Written by the agent.
#[btf_map]
pub static PODS: HashMap<u64, PodConfig, { capacity::PODS as usize }> = HashMap::new();

/// Membership of a port in a pod's port lists. Written by the agent.
#[btf_map]
pub static PORTS: HashMap<PortKey, u32, { capacity::PORTS as usize }> = HashMap::new();

/// A pod's CIDR lists, longest-prefix matched. Written by the agent.
#[btf_map]
pub static CIDRS: LpmTrie<CidrKeyData, u32, { capacity::CIDRS as usize }> = LpmTrie::new();

/// Original destination of a redirected connection, on both of its sockets;
/// freed by the kernel with the socket.
#[btf_map]
pub static ORIG_DST: SkStorage<OrigDst> = SkStorage::new();

/// Redirected connections whose client side is established and whose proxy
/// side is not yet: the only hand-over point between the two sockets.
#[btf_map]
pub static IN_FLIGHT: HashMap<
    FlowKey,
    OrigDst,
    { capacity::IN_FLIGHT as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Per-CPU counters, indexed by `meshlane_common::stat`.
#[btf_map]
pub static STATS: PerCpuArray<u64, { stat::COUNT as usize }> = PerCpuArray::new();

/// Per-pod per-CPU counters, keyed by netns cookie. The agent creates a
/// pod's entry with the pod and removes it with the pod.
#[btf_map]
pub static POD_STATS: PerCpuHashMap<u64, PodCounters, { capacity::POD_STATS as usize }> =
    PerCpuHashMap::new();

/// A pod's addresses (host byte order) to its netns cookie: sk_lookup sees
/// the destination address, not the namespace. Written by the agent.
#[btf_map]
pub static POD_BY_IP: HashMap<u32, u64, { capacity::POD_BY_IP as usize }> = HashMap::new();

/// TCP listeners on the proxies' capture ports, registered by sockops at
/// listen() (and by the agent for listeners older than the programs); the
/// kernel drops an entry when its socket closes.
#[btf_map]
pub static LISTENERS: SockHash<ListenerKey, { capacity::LISTENERS as usize }> = SockHash::new();

/// Both ends of every connection between meshed sockets of this node: the
/// same-node shortcut. Entries go when their socket closes.
#[btf_map]
pub static SOCKS: SockHash<ConnKey, { capacity::SOCKS as usize }> = SockHash::new();

/// The kernel address of each socket in `SOCKS`, as a number: where the
/// shortcut reads how many bytes a peer has queued unread (see
/// `shortcut.rs`). Removed by sockops when the socket closes.
#[btf_map]
pub static SOCK_ADDRS: HashMap<
    ConnKey,
    u64,
    { capacity::SOCKS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// The shortcut decision of a socket, latched at its first send
/// (`meshlane_common::shortcut_state`).
#[btf_map]
pub static SHORTCUT_STATE: SkStorage<u32> = SkStorage::new();

/// Marks a proxy's socket that connects to a pod of this node: one end of a
/// proxy-to-proxy leg, which the shortcut may take (see `shortcut.rs`).
#[btf_map]
pub static PROXY_LEG: SkStorage<u32> = SkStorage::new();

/// Node-wide switches written by the agent (`meshlane_common::setting`).
#[btf_map]
pub static SETTINGS: Array<u32, { setting::COUNT as usize }> = Array::new();

#[inline(always)]
pub fn setting_value(index: u32) -> u32 {
    SETTINGS.get(index).copied().unwrap_or(0)
}

#[inline(always)]
pub fn setting_on(index: u32) -> bool {
    SETTINGS.get(index).is_some_and(|v| *v != 0)
}

/// Counts `index` (a `meshlane_common::pod_stat`) for the pod of `netns_cookie`.
#[inline(always)]
pub fn pod_count(netns_cookie: u64, index: usize) {
    if let Some(c) = POD_STATS.get_ptr_mut(netns_cookie) {
        // Per-CPU value: no other writer while we run.
        unsafe {
            if let Some(slot) = (*c).get_mut(index) {
                *slot += 1;
            }
        }
    }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer while we run.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn orig_dst_map() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&ORIG_DST).cast_mut().cast()
}

/// A pod's lists, answered from the maps.
pub struct MapLists {
    pub netns_cookie: u64,
}

impl MapLists {
    #[inline(always)]
    fn port_in(&self, list: u16, port: u16) -> bool {
        let key = PortKey::new(self.netns_cookie, list, port);
        // SAFETY: the value is only tested for presence, never held.
        unsafe { PORTS.get(key).is_some() }
    }

    #[inline(always)]
    fn cidr_in(&self, list: u32, addr: u32) -> bool {
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + 32,
            cidr_key_data(list, self.netns_cookie, addr),
        );
        CIDRS.get(&key).is_some()
    }
}

impl PodLists for MapLists {
    #[inline(always)]
    fn outbound_port_excluded(&self, port: u16) -> bool {
        self.port_in(port_list::OUTBOUND_EXCLUDE, port)
    }
    #[inline(always)]
    fn outbound_port_included(&self, port: u16) -> bool {
        self.port_in(port_list::OUTBOUND_INCLUDE, port)
    }
    #[inline(always)]
    fn outbound_cidr_excluded(&self, addr: u32) -> bool {
        self.cidr_in(cidr_list::OUTBOUND_EXCLUDE, addr)
    }
    #[inline(always)]
    fn outbound_cidr_included(&self, addr: u32) -> bool {
        self.cidr_in(cidr_list::OUTBOUND_INCLUDE, addr)
    }
    #[inline(always)]
    fn inbound_port_excluded(&self, port: u16) -> bool {
        self.port_in(port_list::INBOUND_EXCLUDE, port)
    }
    #[inline(always)]
    fn inbound_port_included(&self, port: u16) -> bool {
        self.port_in(port_list::INBOUND_INCLUDE, port)
    }
}

//! Every map the programs share with the agent. Keys and values come from
//! `meshlane_common`; the agent pins these under its bpffs directory.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, SkStorage, SockHash,
    },
    macros::btf_map,
};
use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{bindings::BPF_SK_STORAGE_GET_F_CREATE, helpers::generated::bpf_sk_storage_get};
use meshlane_common::{
    cidr6_key_data, cidr_key_data, cidr_list, decide::PodLists, maps as def, port_list,
    Cidr6KeyData, CidrKeyData, ConnKey, FlowKey, FlowKey6, IfaceKey, ListenerKey, OrigDst,
    OrigDst6, PodConfig, PodCounters, PortKey, CIDR_KEY_FIXED_BITS, V6,
};

/// Fails the build when a static's key or value type does not have the
/// sizes its row in `meshlane_common::maps` says (the agent and the
/// adoption check trust those rows).
macro_rules! contract {
    ($row:expr, $key:ty, $value:ty) => {
        const _: () = assert!(
            size_of::<$key>() as u32 == $row.key_size
                && size_of::<$value>() as u32 == $row.value_size,
            "a map static disagrees with its row in meshlane_common::maps"
        );
    };
    ($row:expr, $key:ty) => {
        const _: () = assert!(
            size_of::<$key>() as u32 == $row.key_size,
            "a map static disagrees with its row in meshlane_common::maps"
        );
    };
}

contract!(def::PODS, u64, PodConfig);
contract!(def::PORTS, PortKey, u32);
contract!(def::CIDRS, Key<CidrKeyData>, u32);
contract!(def::ORIG_DST, i32, OrigDst);
contract!(def::IN_FLIGHT, FlowKey, OrigDst);
contract!(def::STATS, u32, u64);
contract!(def::POD_STATS, u64, PodCounters);
contract!(def::POD_BY_IP, u32, u64);
contract!(def::LISTENERS, ListenerKey);
contract!(def::SOCKS, ConnKey);
contract!(def::SOCK_ADDRS, ConnKey, u64);
contract!(def::SHORTCUT_STATE, i32, u32);
contract!(def::PROXY_LEG, i32, u32);
contract!(def::SETTINGS, u32, u32);
contract!(def::LISTEN_OWNER, i32, u32);
contract!(def::POD_BY_IP6, V6, u64);
contract!(def::POD_SRC6, u64, V6);
contract!(def::CIDRS6, Key<Cidr6KeyData>, u32);
contract!(def::ORIG_DST6, i32, OrigDst6);
contract!(def::IN_FLIGHT6, FlowKey6, OrigDst6);
contract!(def::IFACES, IfaceKey, u32);

/// Meshed pods by network-namespace cookie. Written by the agent.
#[btf_map]
pub static PODS: HashMap<u64, PodConfig, { def::PODS.capacity as usize }> = HashMap::new();

/// Membership of a port in a pod's port lists. Written by the agent.
#[btf_map]
pub static PORTS: HashMap<PortKey, u32, { def::PORTS.capacity as usize }> = HashMap::new();

/// A pod's CIDR lists, longest-prefix matched. Written by the agent.
#[btf_map]
pub static CIDRS: LpmTrie<CidrKeyData, u32, { def::CIDRS.capacity as usize }> = LpmTrie::new();

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
    { def::IN_FLIGHT.capacity as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Per-CPU counters, indexed by `meshlane_common::stat`.
#[btf_map]
pub static STATS: PerCpuArray<u64, { def::STATS.capacity as usize }> = PerCpuArray::new();

/// Per-pod per-CPU counters, keyed by netns cookie. The agent creates a
/// pod's entry with the pod and removes it with the pod.
/// Not preallocated: a pod's counters are per CPU (26 counters, 208 bytes
/// per CPU), so a full preallocation would cost capacity x CPUs x 208
/// bytes (218 MB on 64 CPUs) for pods that mostly do not exist; an entry
/// is allocated when the agent writes the pod.
#[btf_map]
pub static POD_STATS: PerCpuHashMap<
    u64,
    PodCounters,
    { def::POD_STATS.capacity as usize },
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

/// A pod's addresses (host byte order) to its netns cookie: sk_lookup sees
/// the destination address, not the namespace. Written by the agent.
#[btf_map]
pub static POD_BY_IP: HashMap<u32, u64, { def::POD_BY_IP.capacity as usize }> = HashMap::new();

/// A pod's IPv6 addresses to its netns cookie. Written by the agent.
#[btf_map]
pub static POD_BY_IP6: HashMap<V6, u64, { def::POD_BY_IP6.capacity as usize }> = HashMap::new();

/// A pod's IPv6 source address for destinations off the pod, by netns
/// cookie (what the kernel would pick, so what REDIRECT keeps). Written by
/// the agent.
#[btf_map]
pub static POD_SRC6: HashMap<u64, V6, { def::POD_SRC6.capacity as usize }> = HashMap::new();

/// A pod's IPv6 CIDR lists, longest-prefix matched. Written by the agent.
#[btf_map]
pub static CIDRS6: LpmTrie<Cidr6KeyData, u32, { def::CIDRS6.capacity as usize }> = LpmTrie::new();

/// [`ORIG_DST`] of a native IPv6 connection or DNS query.
#[btf_map]
pub static ORIG_DST6: SkStorage<OrigDst6> = SkStorage::new();

/// [`IN_FLIGHT`] of native IPv6 connections.
#[btf_map]
pub static IN_FLIGHT6: HashMap<
    FlowKey6,
    OrigDst6,
    { def::IN_FLIGHT6.capacity as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Interfaces of a pod's namespace its annotations name, to their
/// `iface_role` bits. Written by the agent.
#[btf_map]
pub static IFACES: HashMap<IfaceKey, u32, { def::IFACES.capacity as usize }> = HashMap::new();

/// TCP listeners on the proxies' capture ports, registered by sockops at
/// listen() (and by the agent for listeners older than the programs); the
/// kernel drops an entry when its socket closes.
#[btf_map]
pub static LISTENERS: SockHash<ListenerKey, { def::LISTENERS.capacity as usize }> = SockHash::new();

/// Both ends of every connection between meshed sockets of this node: the
/// same-node shortcut. Entries go when their socket closes.
#[btf_map]
pub static SOCKS: SockHash<ConnKey, { def::SOCKS.capacity as usize }> = SockHash::new();

/// The kernel address of each socket in `SOCKS`, as a number: where the
/// shortcut reads how many bytes a peer has queued unread (see
/// `shortcut.rs`). Removed by sockops when the socket closes.
#[btf_map]
pub static SOCK_ADDRS: HashMap<
    ConnKey,
    u64,
    { def::SOCKS.capacity as usize },
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

/// The uid (plus one) that bound a socket to a capture port.
#[btf_map]
pub static LISTEN_OWNER: SkStorage<u32> = SkStorage::new();

/// Node-wide switches written by the agent (`meshlane_common::setting`).
#[btf_map]
pub static SETTINGS: Array<u32, { def::SETTINGS.capacity as usize }> = Array::new();

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

/// A socket's value in socket storage `map`, created (from `init`, or
/// zeroed) when `create` and it has none. Null when it has none and may not
/// create one, or the kernel could not allocate it.
#[inline(always)]
unsafe fn sk_storage<T>(map: &SkStorage<T>, sk: *mut c_void, init: *mut T, create: bool) -> *mut T {
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: `sk` is a socket pointer the kernel gave the program; the
    // helper checks it and returns null for anything else.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(map).cast_mut().cast(),
            sk,
            init.cast(),
            flags,
        )
    }
    .cast()
}

/// The original destination recorded on socket `sk`, if any.
#[inline(always)]
pub fn orig_dst_of(sk: *mut c_void) -> Option<OrigDst> {
    // SAFETY: read at once, never held.
    let p = unsafe { sk_storage(&ORIG_DST, sk, core::ptr::null_mut(), false) };
    if p.is_null() {
        None
    } else {
        Some(unsafe { *p })
    }
}

/// Socket `sk`'s original-destination slot, created (holding `init`, when
/// given) if it has none; null when the kernel cannot allocate it.
#[inline(always)]
pub fn orig_dst_slot(sk: *mut c_void, init: Option<&mut OrigDst>) -> *mut OrigDst {
    let init = init.map_or(core::ptr::null_mut(), core::ptr::from_mut);
    unsafe { sk_storage(&ORIG_DST, sk, init, true) }
}

/// The IPv6 original destination recorded on socket `sk`, if any.
#[inline(always)]
pub fn orig_dst6_of(sk: *mut c_void) -> Option<OrigDst6> {
    // SAFETY: read at once, never held.
    let p = unsafe { sk_storage(&ORIG_DST6, sk, core::ptr::null_mut(), false) };
    if p.is_null() {
        None
    } else {
        Some(unsafe { *p })
    }
}

/// Socket `sk`'s IPv6 original-destination slot, created (holding `init`,
/// when given) if it has none; null when the kernel cannot allocate it.
#[inline(always)]
pub fn orig_dst6_slot(sk: *mut c_void, init: Option<&mut OrigDst6>) -> *mut OrigDst6 {
    let init = init.map_or(core::ptr::null_mut(), core::ptr::from_mut);
    unsafe { sk_storage(&ORIG_DST6, sk, init, true) }
}

/// Socket `sk`'s latched shortcut decision, created undecided; null when the
/// kernel cannot allocate it.
#[inline(always)]
pub fn shortcut_state_slot(sk: *mut c_void) -> *mut u32 {
    unsafe { sk_storage(&SHORTCUT_STATE, sk, core::ptr::null_mut(), true) }
}

/// Marks `sk` as one end of a proxy-to-proxy leg; false when the kernel
/// could not allocate the mark.
#[inline(always)]
pub fn mark_proxy_leg(sk: *mut c_void) -> bool {
    !unsafe { sk_storage(&PROXY_LEG, sk, core::ptr::null_mut(), true) }.is_null()
}

/// Socket `sk`'s owner record, created empty; null when the kernel cannot
/// allocate it.
#[inline(always)]
pub fn listen_owner_slot(sk: *mut c_void) -> *mut u32 {
    unsafe { sk_storage(&LISTEN_OWNER, sk, core::ptr::null_mut(), true) }
}

/// The uid that bound `sk` to a capture port, if [`listen_owner_slot`]
/// recorded one.
#[inline(always)]
pub fn listen_owner_of(sk: *mut c_void) -> Option<u32> {
    let p = unsafe { sk_storage(&LISTEN_OWNER, sk, core::ptr::null_mut(), false) };
    if p.is_null() {
        return None;
    }
    match unsafe { *p } {
        0 => None,
        v => Some(v - 1),
    }
}

/// True when `sk` was marked by [`mark_proxy_leg`].
#[inline(always)]
pub fn is_proxy_leg(sk: *mut c_void) -> bool {
    !unsafe { sk_storage(&PROXY_LEG, sk, core::ptr::null_mut(), false) }.is_null()
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

    #[inline(always)]
    fn cidr6_in(&self, list: u32, addr: V6) -> bool {
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + 128,
            cidr6_key_data(list, self.netns_cookie, addr),
        );
        CIDRS6.get(&key).is_some()
    }

    /// The value of the longest prefix of `list` holding `addr` (0: none).
    #[inline(always)]
    fn cidr_value(&self, list: u32, addr: u32) -> u32 {
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + 32,
            cidr_key_data(list, self.netns_cookie, addr),
        );
        CIDRS.get(&key).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn cidr6_value(&self, list: u32, addr: V6) -> u32 {
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + 128,
            cidr6_key_data(list, self.netns_cookie, addr),
        );
        CIDRS6.get(&key).copied().unwrap_or(0)
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
    fn outbound_cidr_excluded6(&self, addr: V6) -> bool {
        self.cidr6_in(cidr_list::OUTBOUND_EXCLUDE, addr)
    }
    #[inline(always)]
    fn outbound_cidr_included6(&self, addr: V6) -> bool {
        self.cidr6_in(cidr_list::OUTBOUND_INCLUDE, addr)
    }
    #[inline(always)]
    fn is_pod_ip4(&self, addr: u32) -> bool {
        // SAFETY: copied out at once.
        unsafe { POD_BY_IP.get(addr) }.is_some_and(|c| *c == self.netns_cookie)
    }
    #[inline(always)]
    fn is_pod_ip6(&self, addr: V6) -> bool {
        // SAFETY: copied out at once.
        unsafe { POD_BY_IP6.get(addr) }.is_some_and(|c| *c == self.netns_cookie)
    }
    #[inline(always)]
    fn pod_src6(&self) -> Option<V6> {
        // SAFETY: copied out at once.
        unsafe { POD_SRC6.get(self.netns_cookie) }.copied()
    }
    #[inline(always)]
    fn inbound_port_excluded(&self, port: u16) -> bool {
        self.port_in(port_list::INBOUND_EXCLUDE, port)
    }
    #[inline(always)]
    fn inbound_port_included(&self, port: u16) -> bool {
        self.port_in(port_list::INBOUND_INCLUDE, port)
    }
    #[inline(always)]
    fn iface_roles(&self, ifindex: u32) -> u32 {
        // SAFETY: copied out at once.
        unsafe { IFACES.get(IfaceKey::new(self.netns_cookie, ifindex)) }
            .copied()
            .unwrap_or(0)
    }
    #[inline(always)]
    fn route_dev4(&self, addr: u32) -> u32 {
        self.cidr_value(cidr_list::ROUTE, addr)
    }
    #[inline(always)]
    fn route_dev6(&self, addr: V6) -> u32 {
        self.cidr6_value(cidr_list::ROUTE, addr)
    }
}

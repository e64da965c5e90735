//! Every map the programs share with the agent. Keys and values come from
//! `meshlane_common`; the agent pins these under its bpffs directory.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{lpm_trie::Key, HashMap, LpmTrie, PerCpuArray, SkStorage},
    macros::btf_map,
};
use meshlane_common::{
    capacity, cidr_key_data, cidr_list, decide::PodLists, port_list, stat, CidrKeyData, FlowKey,
    OrigDst, PodConfig, PortKey, CIDR_KEY_FIXED_BITS,
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

//! meshlane's test harness.
//!
//! * [`Sandbox`]: one simulated node (a network namespace holding a bridge) plus
//!   pods (network namespaces on that bridge) and a cgroup v2 directory the test
//!   processes run in, so BPF programs can be attached to it without touching the
//!   rest of the machine. Everything is removed on drop, also on panic.
//! * The `mtest` binary (sidecar stand-in, application server, probe client,
//!   getsockopt reporter) and the serde types of what it prints ([`records`]).
//! * Raw socket helpers ([`sock`]) shared by both, and the checksummed byte
//!   streams of the shortcut tests ([`stream`]).
//! * [`cni::Runtime`]: a container runtime's CNI side (real plugins from
//!   /usr/lib/cni and `meshlane-cni`, run as the spec says).
//! * [`fakeapi::FakeApi`]: a Kubernetes API server stand-in (real HTTP, list
//!   and watch) for the agent's `kubernetes` pod source.

pub mod agent;
pub mod chart;
pub mod cni;
pub mod fakeapi;
pub mod previous;
pub mod records;
pub mod sandbox;
pub mod shape;
pub mod sock;
pub mod stream;

pub use agent::{
    http_get, meshlane_bin, pod_entry, pod_state, shortcut_unsupported, Agent, BrokenNetnsPins,
    Launch, PodSpec,
};
pub use records::{
    dns_proxy_reply, read_sidecar_log, wait_sidecar_peer, wait_sidecar_record, ProbeResult,
    ServerReply, SidecarRecord, SockoptRecord, UdpProbeResult, DNS_PROXY_REPLY_PREFIX,
};
pub use sandbox::{
    cgroup2_root, cleanup_stale, data_dir, istio_v6_rules, mtest_bin, workspace_root, Pod, Proc,
    Sandbox, SidecarListen, SidecarOpts, Stack,
};
pub use sock::{fmt_addr, original_dst, original_dst6, Family};

/// Marks the running test as skipped for `reason` (a missing kernel feature,
/// say): prints `SKIPPED: reason`, which `cargo xtask vm-test` reports per
/// test as skipped-with-reason. The caller returns right after; a skipped
/// test is never counted as a pass there.
pub fn skip_loudly(reason: &str) {
    println!("SKIPPED: {reason}");
    eprintln!("SKIPPED: {reason}");
}

/// Raises the soft open-file limit to the hard one (no privilege needed): a
/// proxy or load client holding thousands of connections needs a descriptor
/// or two for each.
pub fn raise_soft_nofile() {
    // SAFETY: getrlimit/setrlimit on a stack struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Istio's default proxy uid and gid (the sidecar runs as these), and its
/// outbound and inbound capture ports: the contract crate's definitions.
pub use meshlane_common::ports::{
    INBOUND_CAPTURE as INBOUND_PORT, OUTBOUND_CAPTURE as OUTBOUND_PORT, PROXY_UID,
};
/// An ordinary application uid for probes that should be captured.
pub const APP_UID: u32 = 1000;

//! `meshlane describe pod NAMESPACE/NAME`: one pod as the agent and the
//! kernel see it, and in plain words why it is or is not captured.
use std::{collections::BTreeMap, path::Path};

use anyhow::Result;
use meshlane_common::{counters, flags, iface_role, port_list, ListenerKey};
use serde::Serialize;

use crate::{
    bpf::{Layout, Maps},
    status::{AgentStatus, PodState, PodStatus},
};

/// `schema` of `meshlane describe pod -o json|yaml`.
pub const SCHEMA: &str = "meshlane/describe-pod/v1";

#[derive(Debug, Serialize)]
pub struct PodDescription {
    pub schema: &'static str,
    /// NAMESPACE/NAME.
    pub pod: String,
    pub state: PodState,
    /// True when its connections go through its sidecar.
    pub captured: bool,
    /// Why it is (or is not) captured, in plain words, most important first.
    pub why: Vec<String>,
    pub ips: Vec<String>,
    pub netns: Option<String>,
    pub netns_cookie: Option<u64>,
    /// The capture configuration the agent applies (annotations after
    /// defaults), as it recorded it.
    pub config: Option<serde_json::Value>,
    pub config_errors: Vec<String>,
    pub notes: Vec<String>,
    pub conflicts: Vec<String>,
    /// What the kernel's maps hold for it (None: not captured, or the maps
    /// are not pinned).
    pub kernel: Option<KernelView>,
    /// Its counters (connections redirected, inbound captured, ...).
    pub counters: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct KernelView {
    /// The pod's `PODS` entry is present: the programs act on its namespace.
    pub pod_entry: bool,
    /// Its flags by name.
    pub flags: Vec<&'static str>,
    pub proxy_uid: Option<u32>,
    pub proxy_gid: Option<u32>,
    pub outbound_capture_port: Option<u16>,
    pub inbound_capture_port: Option<u16>,
    /// Port lists: list name to ports.
    pub ports: BTreeMap<&'static str, Vec<u16>>,
    /// Named interfaces: ifindex to roles.
    pub interfaces: BTreeMap<u32, Vec<&'static str>>,
    /// Capture listeners registered in its namespace.
    pub listeners: Vec<ListenerView>,
    /// Its namespace's sk_lookup link is pinned (inbound capture attached).
    pub inbound_attached: bool,
}

#[derive(Debug, Serialize)]
pub struct ListenerView {
    pub port: u32,
    /// `ipv4` (AF_INET or dual-stack) or `ipv6`.
    pub family: &'static str,
    /// The uid that bound it.
    pub owner: u32,
}

const FLAG_NAMES: &[(u32, &str)] = &[
    (
        flags::INCLUDE_ALL_OUTBOUND_CIDRS,
        "include-all-outbound-ranges",
    ),
    (
        flags::INCLUDE_OUTBOUND_HAS_LOOPBACK,
        "include-outbound-has-loopback",
    ),
    (flags::DNS_CAPTURE, "dns-capture"),
    (
        flags::INCLUDE_ALL_INBOUND_PORTS,
        "include-all-inbound-ports",
    ),
    (flags::TPROXY, "tproxy"),
    (flags::BYPASS_UNTIL_READY, "bypass-until-ready"),
    (flags::NO_SHORTCUT, "no-shortcut"),
    (flags::SHORTCUT_APP, "shortcut-app"),
    (flags::IPV6, "ipv6"),
    (flags::INTERFACES, "interfaces"),
];

fn list_name(list: u16) -> &'static str {
    match list {
        port_list::OUTBOUND_EXCLUDE => "exclude-outbound",
        port_list::OUTBOUND_INCLUDE => "include-outbound",
        port_list::INBOUND_EXCLUDE => "exclude-inbound",
        port_list::INBOUND_INCLUDE => "include-inbound",
        _ => "unknown",
    }
}

/// The pod named `name` (NAMESPACE/NAME, or NAME when one pod has it);
/// `Ok(None)` when the agent does not know it.
pub fn describe(layout: &Layout, state_dir: &Path, name: &str) -> Result<Option<PodDescription>> {
    let Some((st, raw)) = AgentStatus::load_with_document(state_dir)? else {
        anyhow::bail!(
            "no agent status in {} (is the agent running with this --state-dir?)",
            state_dir.display()
        );
    };
    let matches: Vec<&PodStatus> = st
        .pods
        .iter()
        .filter(|p| {
            p.name == name || (!name.contains('/') && p.name.ends_with(&format!("/{name}")))
        })
        .collect();
    let p = match matches.as_slice() {
        [p] => *p,
        [] => return Ok(None),
        _ => anyhow::bail!("{name:?} names several pods: use NAMESPACE/NAME"),
    };
    // The recorded configuration is in the status file only.
    let config = raw["pods"]
        .as_array()
        .and_then(|ps| ps.iter().find(|q| q["name"] == p.name.as_str()))
        .map(|q| q["config"].clone())
        .filter(|c| !c.is_null());
    let maps = Maps::open(layout).ok();
    let kernel = match (&maps, p.netns_cookie) {
        (Some(m), Some(cookie)) => Some(kernel_view(m, layout, cookie)),
        _ => None,
    };
    let counters = match (&maps, p.netns_cookie) {
        (Some(m), Some(cookie)) => {
            let c = m.pod_counters(cookie);
            counters::POD.iter().map(|r| (r.name, c[r.index])).collect()
        }
        _ => BTreeMap::new(),
    };
    let captured = p.state == PodState::Active && kernel.as_ref().is_some_and(|k| k.pod_entry);
    let why = explain(p, kernel.as_ref(), st.agent_alive());
    Ok(Some(PodDescription {
        schema: SCHEMA,
        pod: p.name.clone(),
        state: p.state,
        captured,
        why,
        ips: p.ips.iter().map(ToString::to_string).collect(),
        netns: p.netns.clone(),
        netns_cookie: p.netns_cookie,
        config,
        config_errors: p.config_errors.clone(),
        notes: p.notes.clone(),
        conflicts: p.conflicts.clone(),
        kernel,
        counters,
    }))
}

fn kernel_view(m: &Maps, layout: &Layout, cookie: u64) -> KernelView {
    let v = m.pod_view(cookie);
    let mut ports: BTreeMap<&'static str, Vec<u16>> = BTreeMap::new();
    for k in &v.ports {
        ports.entry(list_name(k.list)).or_default().push(k.port);
    }
    for ps in ports.values_mut() {
        ps.sort_unstable();
    }
    let interfaces = v
        .ifaces
        .iter()
        .map(|(k, r)| {
            let mut roles = Vec::new();
            if r & iface_role::REROUTE != 0 {
                roles.push("reroute");
            }
            if r & iface_role::EXCLUDE != 0 {
                roles.push("exclude");
            }
            (k.ifindex, roles)
        })
        .collect();
    let listeners = v
        .listeners
        .iter()
        .map(|k| ListenerView {
            port: k.port,
            family: if k.serves == ListenerKey::IPV6 {
                "ipv6"
            } else {
                "ipv4"
            },
            owner: k.owner,
        })
        .collect();
    let pod = v.pod;
    KernelView {
        pod_entry: pod.is_some(),
        flags: pod
            .map(|c| {
                FLAG_NAMES
                    .iter()
                    .filter(|(f, _)| c.has(*f))
                    .map(|(_, n)| *n)
                    .collect()
            })
            .unwrap_or_default(),
        proxy_uid: pod.map(|c| c.proxy_uid),
        proxy_gid: pod.map(|c| c.proxy_gid),
        outbound_capture_port: pod.map(|c| c.outbound_capture_port),
        inbound_capture_port: pod.map(|c| c.inbound_capture_port),
        ports,
        interfaces,
        listeners,
        inbound_attached: layout.netns_link(cookie).exists(),
    }
}

/// Why the pod is or is not captured, most important first.
fn explain(p: &PodStatus, k: Option<&KernelView>, agent_alive: bool) -> Vec<String> {
    let mut why = Vec::new();
    match p.state {
        PodState::NotMeshed => why.push(
            "not captured: not meshed (no istio-proxy container and no sidecar.istio.io/status \
             annotation), so Istio would write no rules for it either"
                .into(),
        ),
        PodState::HostNetwork => why.push(
            "not captured: hostNetwork pods share the node's network namespace, and capturing \
             it would capture the node"
                .into(),
        ),
        PodState::InterceptionNone => why.push(
            "not captured: sidecar.istio.io/interceptionMode is NONE (Istio writes no rules)"
                .into(),
        ),
        PodState::WaitingForIp => {
            why.push("not captured yet: the pod has no IP address in its status".into())
        }
        PodState::WaitingForNetns => why.push(
            "not captured yet: no network namespace on this node holds the pod's addresses \
             (the agent looks again every round)"
                .into(),
        ),
        PodState::Error => why.push(format!(
            "not captured: {}",
            if p.config_errors.is_empty() {
                "an error (see the agent's log)".to_string()
            } else {
                p.config_errors.join("; ")
            }
        )),
        PodState::ProxyIdUnknown => why.push(format!(
            "captured, but with nobody as its proxy: its connections are refused until the \
             proxy's node ids are known ({})",
            p.config_errors.join("; ")
        )),
        PodState::Active => match k {
            Some(k) if k.pod_entry => {
                why.push(format!(
                    "captured: outbound connections go to port {} and inbound ones to port {} \
                     of its proxy (uid {}), as Istio's rules would send them",
                    k.outbound_capture_port.unwrap_or_default(),
                    k.inbound_capture_port.unwrap_or_default(),
                    k.proxy_uid.unwrap_or_default(),
                ));
                if !k.inbound_attached {
                    why.push(
                        "inbound capture is NOT attached to its namespace: connections to it \
                         reach the app directly"
                            .into(),
                    );
                }
                let inbound = k.inbound_capture_port.unwrap_or_default();
                if !k.listeners.iter().any(|l| l.port == u32::from(inbound)) {
                    why.push(format!(
                        "its proxy does not listen on {inbound} yet: connections are refused{}",
                        if k.flags.contains(&"bypass-until-ready") {
                            " (or, with bypass-until-ready, passed to the app)"
                        } else {
                            ""
                        }
                    ));
                }
            }
            Some(_) => why.push(
                "the agent reports it captured, but its entry is not in the kernel's maps \
                 (a round in progress, or map writes failing: see map_update_errors)"
                    .into(),
            ),
            None => why.push("captured by the agent's account; the maps could not be read".into()),
        },
    }
    if !p.config_errors.is_empty() && !matches!(p.state, PodState::Error | PodState::ProxyIdUnknown)
    {
        why.push(format!(
            "annotations rejected (their defaults apply, which capture at least as much): {}",
            p.config_errors.join("; ")
        ));
    }
    if !agent_alive {
        why.push(
            "the agent that recorded this is not running: the pinned programs keep capturing, \
             but changes are not applied"
                .into(),
        );
    }
    why
}

/// The text form.
pub fn print(d: &PodDescription) {
    println!("Pod:       {}", d.pod);
    println!(
        "State:     {}",
        serde_json::to_value(d.state)
            .unwrap_or_default()
            .as_str()
            .unwrap_or("?")
    );
    println!("Captured:  {}", if d.captured { "yes" } else { "no" });
    println!("IPs:       {}", d.ips.join(", "));
    if let (Some(ns), Some(c)) = (&d.netns, d.netns_cookie) {
        println!("Netns:     {ns} (cookie {c})");
    }
    println!("Why:");
    for w in &d.why {
        println!("  - {w}");
    }
    for e in &d.config_errors {
        println!("Error:     {e}");
    }
    for n in &d.notes {
        println!("Note:      {n}");
    }
    for c in &d.conflicts {
        println!("Conflict:  {c}");
    }
    if let Some(k) = &d.kernel {
        println!("Kernel:");
        println!(
            "  pod entry:        {}",
            if k.pod_entry { "present" } else { "absent" }
        );
        println!("  flags:            {}", k.flags.join(" "));
        if let (Some(u), Some(g)) = (k.proxy_uid, k.proxy_gid) {
            println!("  proxy uid/gid:    {u}/{g}");
        }
        for (list, ports) in &k.ports {
            let ps: Vec<String> = ports.iter().map(ToString::to_string).collect();
            println!("  {list:<17} {}", ps.join(","));
        }
        for (i, roles) in &k.interfaces {
            println!("  interface {i}:      {}", roles.join(","));
        }
        for l in &k.listeners {
            println!(
                "  listener:         {} {} (uid {})",
                l.port, l.family, l.owner
            );
        }
        println!(
            "  inbound attached: {}",
            if k.inbound_attached { "yes" } else { "NO" }
        );
    }
    if !d.counters.is_empty() {
        println!("Counters:");
        for (n, v) in &d.counters {
            println!("  {n:<28} {v}");
        }
    }
}

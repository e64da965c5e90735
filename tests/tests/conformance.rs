//! Conformance: the same connections against Istio's real rules and against
//! meshlane, on the same kernel, for every case in
//! shared/data/istio-cni-goldens/cases.json. Any difference fails.
//!
//! Per case: a pod namespace (the case's pod: an app listening on every probed
//! port, the test sidecar running as the case's proxy uid/gid) and a peer
//! namespace outside it. The probe matrix (socket owners x destinations x
//! ports) runs once with the case's rules loaded by iptables-restore, once
//! with the rules removed and meshlane given the same pod. Each probe
//! records where it landed, the original destination the sidecar saw, and the
//! peer address the app saw.
//!
//! Inbound rows (connections from the peer into the pod) are compared like
//! the others. TPROXY cases run as Istio sets them up: the CNI's policy
//! routing (fwmark 1337 -> table 133, local default via lo) next to the
//! rules, and a sidecar whose listeners are IP_TRANSPARENT, as Envoy's are.
//! Pending, printed and counted, never hidden: UDP DNS.
use std::{collections::BTreeMap, fmt, path::Path, time::Duration};

use anyhow::{Context, Result};
use meshlane_tests::{
    data_dir, read_sidecar_log, Agent, Pod, PodSpec, ProbeResult, Proc, Sandbox, SidecarRecord,
};

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

/// Ports every case probes: default, the include/exclude ports the goldens
/// name, Istio's own ports, and DNS.
const PORTS: &[u16] = &[9080, 1111, 3333, 5555, 15008, 15020, 15021, 15090, 53];

#[derive(Clone, PartialEq, Eq)]
struct Outcome {
    landed: String,
    orig_dst: String,
    app_saw: String,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} orig={} app-saw={}",
            self.landed, self.orig_dst, self.app_saw
        )
    }
}

struct Case {
    name: String,
    rules: std::path::PathBuf,
    spec: serde_json::Value,
}

fn cases() -> Result<Vec<Case>> {
    let dir = data_dir().join("istio-cni");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("cases.json"))
            .with_context(|| format!("reading {}", dir.display()))?,
    )?;
    Ok(v["cases"]
        .as_array()
        .context("cases")?
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap_or_default().to_string(),
            rules: dir.join(c["rules"].as_str().unwrap_or_default()),
            spec: c.clone(),
        })
        .collect())
}

fn ip_only(addr: &str) -> String {
    addr.rsplit_once(':')
        .map(|(ip, _)| ip.to_string())
        .unwrap_or_else(|| addr.to_string())
}

/// Replaces the pod's and peer's addresses with names, so tables read well.
fn named(s: &str, pod: &Pod, peer: &Pod) -> String {
    s.replace(&pod.ip.to_string(), "POD")
        .replace(&peer.ip.to_string(), "PEER")
}

struct Probe {
    /// Inbound probes start in the peer namespace and dial the pod.
    inbound: bool,
    owner: &'static str,
    uid: u32,
    gid: u32,
    bind: Option<&'static str>,
    dst: String,
}

fn probes(uid: u32, gid: u32, pod: &Pod, peer: &Pod) -> Vec<Probe> {
    let owners: [(&'static str, u32, u32, Option<&'static str>); 4] = [
        ("app", 1000, 1000, None),
        ("proxy-uid", uid, gid, None),
        ("proxy-gid-only", 1000, gid, None),
        ("bound-127.0.0.6", 1000, 1000, Some("127.0.0.6")),
    ];
    let dests = [
        peer.ip.to_string(),
        pod.ip.to_string(),
        "127.0.0.1".into(),
        "127.0.0.6".into(),
        "127.0.0.5".into(),
    ];
    let mut out = Vec::new();
    for (owner, uid, gid, bind) in owners {
        for d in &dests {
            for p in PORTS {
                out.push(Probe {
                    inbound: false,
                    owner,
                    uid,
                    gid,
                    bind,
                    dst: format!("{d}:{p}"),
                });
            }
        }
    }
    for p in PORTS {
        out.push(Probe {
            inbound: true,
            owner: "peer->pod",
            uid: 1000,
            gid: 1000,
            bind: None,
            dst: format!("{}:{p}", pod.ip),
        });
    }
    out
}

fn run_probe(sb: &Sandbox, pod: &Pod, peer: &Pod, log: &Path, p: &Probe) -> Result<Outcome> {
    let mut args = vec!["probe", "--connect", p.dst.as_str(), "--timeout-ms", "2000"];
    if let Some(b) = p.bind {
        args.extend(["--bind", b]);
    }
    // Only records the sidecar writes during this probe can be its: client
    // ports are reused over a run.
    let before = read_sidecar_log(log).len();
    let from = if p.inbound { peer } else { pod };
    let r = ProbeResult::parse(&sb.run(from, p.uid, p.gid, mtest(), &args)?)?;
    // The sidecar logs the client address it saw. iptables' REDIRECT may
    // change the client's source port too, when conntrack already holds the
    // tuple (a recent connection between the same ports, in TIME_WAIT): a
    // clean CI run met exactly that. Then the one record of this probe's time
    // with the probe's address and original destination is its record.
    let since: Vec<SidecarRecord> = read_sidecar_log(log).into_iter().skip(before).collect();
    let rec = r.local.as_ref().and_then(|l| {
        if let Some(x) = since.iter().find(|x| &x.peer == l) {
            return Some(x.clone());
        }
        let mut remapped = since.iter().filter(|x| {
            ip_only(&x.peer) == ip_only(l) && x.orig_dst.as_deref() == Some(p.dst.as_str())
        });
        match (remapped.next(), remapped.next()) {
            (Some(x), None) => Some(x.clone()),
            _ => None,
        }
    });
    // The app saw the sidecar's inbound source where the probe had another
    // one: a sidecar relayed this connection, so its record must be there.
    let relayed = r
        .reply
        .as_ref()
        .is_some_and(|x| ip_only(&x.peer) == "127.0.0.6")
        && r.local.as_deref().map(ip_only).as_deref() != Some("127.0.0.6");
    if rec.is_none() && relayed {
        eprintln!(
            "conformance: probe {:?} (local {:?}) reached the app from 127.0.0.6 but no sidecar \
             record matches it; records since the probe started: {since:?}",
            p.dst, r.local
        );
    }
    let landed = match (&rec, &r.reply) {
        (Some(x), _) => format!("sidecar:{}", x.listener),
        (None, Some(reply)) => format!("app:{}", reply.server),
        (None, None) if r.connected => "connected-no-reply".into(),
        (None, None) => format!("refused({})", r.errno.clone().unwrap_or_default()),
    };
    Ok(Outcome {
        landed,
        orig_dst: rec
            .and_then(|x| x.orig_dst)
            .map(|o| named(&o, pod, peer))
            .unwrap_or_else(|| "-".into()),
        app_saw: r
            .reply
            .map(|x| named(&ip_only(&x.peer), pod, peer))
            .unwrap_or_else(|| "-".into()),
    })
}

fn case_pod_spec(case: &Case, pod: &Pod) -> PodSpec {
    let mut s = PodSpec::meshed(pod);
    if let Some(a) = case.spec["annotations"].as_object() {
        for (k, v) in a {
            if k != "sidecar.istio.io/status" {
                s = s.annotate(k, v.as_str().unwrap_or_default());
            }
        }
    }
    s.run_as_user = case.spec["proxy_run_as_user"].as_i64();
    s.run_as_group = case.spec["proxy_run_as_group"].as_i64();
    if let Some(e) = case.spec["proxy_env"].as_object() {
        s.proxy_env = e
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
    }
    s
}

fn proxy_ids(case: &Case) -> (u32, u32) {
    let uid = case.spec["proxy_run_as_user"]
        .as_u64()
        .filter(|u| *u != 0)
        .unwrap_or(1337) as u32;
    let gid = case.spec["proxy_run_as_group"]
        .as_u64()
        .filter(|g| *g != 0)
        .map_or(uid, |g| g as u32);
    (uid, gid)
}

fn is_tproxy(case: &Case) -> bool {
    case.spec["annotations"]["sidecar.istio.io/interceptionMode"] == "TPROXY"
}

/// Runs one case under both mechanisms; returns (rows, differences).
fn run_case(idx: usize, case: &Case) -> Result<(usize, Vec<String>)> {
    let mut sb = Sandbox::new(&format!("cf{idx}"))?;
    let pod = sb.add_pod("pod")?;
    let peer = sb.add_pod("peer")?;
    let (uid, gid) = proxy_ids(case);
    let listens: Vec<String> = PORTS.iter().map(|p| format!("0.0.0.0:{p}")).collect();
    let listens: Vec<&str> = listens.iter().map(String::as_str).collect();
    let mut procs: Vec<Proc> = vec![
        sb.start_server(&pod, "app", &listens)?,
        sb.start_server(&peer, "peer", &listens)?,
    ];
    let log = sb.dir().join("sidecar.jsonl");
    let ids = format!("{uid}:{gid}");
    let log_s = log.to_str().context("utf-8")?;
    let mut sidecar = if is_tproxy(case) {
        sb.spawn(
            &pod,
            0,
            0,
            mtest(),
            &["sidecar", "--log", log_s, "--transparent-as", &ids],
        )?
    } else {
        sb.spawn(&pod, uid, gid, mtest(), &["sidecar", "--log", log_s])?
    };
    sidecar.wait_ready(Duration::from_secs(10))?;
    procs.push(sidecar);
    let matrix = probes(uid, gid, &pod, &peer);

    // What Istio's CNI adds beside the rules in TPROXY mode.
    let policy_routing: [&[&str]; 2] = [
        &[
            "rule",
            "add",
            "fwmark",
            "1337/0xfff",
            "pref",
            "32764",
            "lookup",
            "133",
        ],
        &[
            "route", "add", "local", "default", "dev", "lo", "table", "133",
        ],
    ];
    if is_tproxy(case) {
        for args in policy_routing {
            sb.netns_exec(&pod.netns, "ip", args, None)?;
        }
    }
    sb.iptables_restore(&pod, &case.rules, false)?;
    let under_iptables: Vec<Outcome> = matrix
        .iter()
        .map(|p| run_probe(&sb, &pod, &peer, &log, p))
        .collect::<Result<_>>()?;
    sb.iptables_flush(&pod)?;
    if is_tproxy(case) {
        sb.netns_exec(&pod.netns, "ip", &["rule", "del", "pref", "32764"], None)?;
        sb.netns_exec(&pod.netns, "ip", &["route", "flush", "table", "133"], None)?;
    }
    // A fresh log for the second run, so no record of the first can match.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)?
        .set_len(0)?;
    let under_meshlane: Vec<Outcome> = {
        let _agent = Agent::start(&sb, &[case_pod_spec(case, &pod), PodSpec::plain(&peer)])?;
        matrix
            .iter()
            .map(|p| run_probe(&sb, &pod, &peer, &log, p))
            .collect::<Result<_>>()?
    };

    println!("\n== case {} (proxy uid {uid} gid {gid}) ==", case.name);
    println!(
        "{:<16} {:<20} {:<58} {:<58} SAME",
        "OWNER", "DESTINATION", "IPTABLES", "MESHLANE"
    );
    let mut diffs = Vec::new();
    let mut landed_counts: BTreeMap<String, usize> = BTreeMap::new();
    for ((p, a), b) in matrix.iter().zip(&under_iptables).zip(&under_meshlane) {
        let same = a == b;
        *landed_counts.entry(a.landed.clone()).or_default() += 1;
        let dst = named(&p.dst, &pod, &peer);
        println!(
            "{:<16} {:<20} {:<58} {:<58} {}",
            p.owner,
            dst,
            a.to_string(),
            b.to_string(),
            if same { "yes" } else { "NO" }
        );
        if !same {
            diffs.push(format!(
                "{}: {} -> {}: iptables {a} | meshlane {b}",
                case.name, p.owner, dst
            ));
        }
    }
    println!("landed under iptables: {landed_counts:?}");
    Ok((matrix.len(), diffs))
}

#[test]
fn probe_matrix_matches_istio_rules_for_every_case() -> Result<()> {
    let cases = cases()?;
    assert_eq!(cases.len(), 9);
    let mut rows = 0;
    let mut diffs = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let (n, d) = run_case(i, case)?;
        rows += n;
        diffs.extend(d);
    }
    println!(
        "\nconformance: {rows} probes over {} cases: {} differences, 0 pending",
        cases.len(),
        diffs.len(),
    );
    println!("pending (not probed): UDP DNS, until UDP DNS capture exists");
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    Ok(())
}

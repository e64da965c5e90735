//! `cargo xtask demo`: a two-node sandbox (node 1: product and reviews,
//! meshed, and istiod, plain; node 2: ratings, meshed, and prom, plain), a
//! sidecar in each meshed pod, one real agent per node, and the traffic
//! types sent through it. Prints where each connection landed against what
//! the decision table says, then walks whole requests hop by hop through
//! both sidecars (the seed's productpage -> reviews), and removes
//! everything afterwards.

use anyhow::{bail, Result};
use meshlane_tests::{
    mtest_bin, read_sidecar_log, Agent, Pod, PodSpec, ProbeResult, Proc, Sandbox, SidecarListen,
    SidecarOpts, UdpProbeResult, APP_UID, DNS_PROXY_REPLY_PREFIX, PROXY_UID,
};

struct Case {
    what: &'static str,
    from: usize,
    uid: u32,
    gid: u32,
    to: String,
    bind: Option<&'static str>,
    /// More `mtest probe` arguments (`--family inet6`).
    args: &'static [&'static str],
    /// "POD:15001" / "POD:15006" (that pod's sidecar first) or the name of
    /// the server reached directly.
    expect: &'static str,
    expect_orig: Option<String>,
}

pub fn run() -> Result<()> {
    let mtest = mtest_bin();
    let mut sb = Sandbox::new_dual_stack("demo")?;
    sb.add_node2()?;
    let mut pods: Vec<Pod> = ["product", "reviews", "istiod"]
        .iter()
        .map(|n| sb.add_pod(n))
        .collect::<Result<_>>()?;
    pods.push(sb.add_pod_on(2, "ratings")?);
    pods.push(sb.add_pod_on(2, "prom")?);
    let (pp, rv, istiod, ra) = (&pods[0], &pods[1], &pods[2], &pods[3]);
    let mut procs: Vec<Proc> = Vec::new();
    let mut logs = Vec::new();
    procs.push(sb.start_server(
        pp,
        &pp.name,
        &["[::]:9080", "127.0.0.1:15000", "0.0.0.0:15090"],
    )?);
    procs.push(sb.start_server(rv, &rv.name, &["[::]:9080"])?);
    procs.push(sb.start_server(istiod, &istiod.name, &["0.0.0.0:15012", "[::]:9080"])?);
    procs.push(sb.start_server(ra, &ra.name, &["[::]:9080"])?);
    // istiod doubles as the cluster's DNS server (UDP 53, both families).
    procs.push(sb.start_udp_echo(istiod, "dns", &["[::]:53"])?);
    let mut sidecar_pods = Vec::new();
    for pod in [pp, rv, ra] {
        // Dual-stack listeners, and the DNS proxy's stand-in on 15053.
        let opts = SidecarOpts {
            listen: SidecarListen::Dual,
            dns: true,
        };
        procs.push(sb.start_sidecar_with(pod, opts)?);
        logs.push(sb.sidecar_log(pod));
        sidecar_pods.push(pod.name.clone());
    }
    println!("sandbox: node 1 {} with pods:", sb.node_netns());
    println!(
        "  product     {} {} (meshed, sidecar uid {PROXY_UID}, DNS capture)",
        pp.ip,
        pp.v6()
    );
    println!(
        "  reviews     {} {} (meshed, sidecar uid {PROXY_UID})",
        rv.ip,
        rv.v6()
    );
    println!(
        "  istiod      {} {} (not meshed; also the DNS server)",
        istiod.ip,
        istiod.v6()
    );
    println!("node 2, joined by a veth:");
    println!(
        "  ratings     {} {} (meshed, sidecar uid {PROXY_UID})",
        ra.ip,
        ra.v6()
    );
    println!("  prom        {} {} (not meshed)", pods[4].ip, pods[4].v6());
    let agent = Agent::start(
        &sb,
        &[
            PodSpec::meshed(pp).proxy_env("ISTIO_META_DNS_CAPTURE", "true"),
            PodSpec::meshed(rv),
            PodSpec::plain(istiod),
        ],
    )?;
    let agent2 = Agent::start_on(
        &sb,
        2,
        &[PodSpec::meshed(ra), PodSpec::plain(&pods[4])],
        &[],
    )?;
    println!(
        "agents: node 1 on cgroup {} (bpffs {}), node 2 on cgroup {} (bpffs {})\n",
        sb.cgroup().display(),
        agent.bpffs.display(),
        sb.node_cgroup(2).display(),
        agent2.bpffs.display()
    );
    // The first sidecar record of a connection from `peer`, in any pod.
    let record_of = |peer: &str| {
        logs.iter().zip(&sidecar_pods).find_map(|(log, name)| {
            read_sidecar_log(log)
                .into_iter()
                .find(|r| r.peer == peer)
                .map(|r| (name.clone(), r))
        })
    };

    let ip = |p: &Pod, port: u16| format!("{}:{port}", p.ip);
    let ip6 = |p: &Pod, port: u16| format!("[{}]:{port}", p.v6());
    let mapped = |p: &Pod, port: u16| format!("[{}]:{port}", p.mapped());
    let cases = vec![
        Case {
            what: "app AF_INET6 -> ::ffff:remote pod (row 1)",
            from: 0,
            uid: APP_UID,
            gid: APP_UID,
            to: mapped(rv, 9080),
            bind: None,
            args: &["--family", "inet6"],
            expect: "product:15001",
            expect_orig: Some(ip(rv, 9080)),
        },
        Case {
            what: "app -> remote pod's IPv6 (row 1)",
            from: 0,
            uid: APP_UID,
            gid: APP_UID,
            to: ip6(ra, 9080),
            bind: None,
            args: &[],
            expect: "product:15001",
            expect_orig: Some(ip6(ra, 9080)),
        },
        Case {
            what: "plain pod -> reviews' IPv6 (inbound, row 10)",
            from: 2,
            uid: APP_UID,
            gid: APP_UID,
            to: ip6(rv, 9080),
            bind: None,
            args: &[],
            expect: "reviews:15006",
            expect_orig: Some(ip6(rv, 9080)),
        },
        Case {
            what: "app -> remote pod (type 2, row 1)",
            from: 0,
            uid: APP_UID,
            gid: APP_UID,
            to: ip(rv, 9080),
            bind: None,
            args: &[],
            expect: "product:15001",
            expect_orig: Some(ip(rv, 9080)),
        },
        Case {
            what: "app -> plain pod (row 1)",
            from: 0,
            uid: APP_UID,
            gid: APP_UID,
            to: ip(istiod, 9080),
            bind: None,
            args: &[],
            expect: "product:15001",
            expect_orig: Some(ip(istiod, 9080)),
        },
        Case {
            what: "app -> own pod IP (row 2)",
            from: 0,
            uid: APP_UID,
            gid: APP_UID,
            to: ip(pp, 9080),
            bind: None,
            args: &[],
            expect: "product",
            expect_orig: None,
        },
        Case {
            what: "proxy -> meshed pod (row 3, then row 10)",
            from: 0,
            uid: PROXY_UID,
            gid: PROXY_UID,
            to: ip(rv, 9080),
            bind: None,
            args: &[],
            expect: "reviews:15006",
            expect_orig: Some(ip(rv, 9080)),
        },
        Case {
            what: "proxy -> plain pod (row 3)",
            from: 0,
            uid: PROXY_UID,
            gid: PROXY_UID,
            to: ip(istiod, 9080),
            bind: None,
            args: &[],
            expect: "istiod",
            expect_orig: None,
        },
        Case {
            what: "proxy -> own pod IP (type 4, row 4)",
            from: 0,
            uid: PROXY_UID,
            gid: PROXY_UID,
            to: ip(pp, 9080),
            bind: None,
            args: &[],
            expect: "product:15006",
            expect_orig: Some(ip(pp, 9080)),
        },
        Case {
            what: "proxy -> 127.0.0.6:15002 (istio-validation)",
            from: 0,
            uid: PROXY_UID,
            gid: PROXY_UID,
            to: "127.0.0.6:15002".into(),
            bind: None,
            args: &[],
            expect: "product:15006",
            expect_orig: Some("127.0.0.6:15002".into()),
        },
        Case {
            what: "proxy -> 127.0.0.1:15000 admin (type 5, row 5)",
            from: 0,
            uid: PROXY_UID,
            gid: PROXY_UID,
            to: "127.0.0.1:15000".into(),
            bind: None,
            args: &[],
            expect: "product",
            expect_orig: None,
        },
        Case {
            what: "proxy -> istiod:15012 (type 6)",
            from: 0,
            uid: PROXY_UID,
            gid: PROXY_UID,
            to: ip(istiod, 15012),
            bind: None,
            args: &[],
            expect: "istiod",
            expect_orig: None,
        },
        Case {
            what: "127.0.0.6 -> own pod IP (row 7)",
            from: 0,
            uid: PROXY_UID,
            gid: PROXY_UID,
            to: ip(pp, 9080),
            bind: Some("127.0.0.6"),
            args: &[],
            expect: "product",
            expect_orig: None,
        },
        Case {
            what: "proxy gid only -> plain pod (row 8)",
            from: 0,
            uid: APP_UID,
            gid: PROXY_UID,
            to: ip(istiod, 9080),
            bind: None,
            args: &[],
            expect: "istiod",
            expect_orig: None,
        },
        Case {
            what: "reviews app -> product pod (row 1)",
            from: 1,
            uid: APP_UID,
            gid: APP_UID,
            to: ip(pp, 9080),
            bind: None,
            args: &[],
            expect: "reviews:15001",
            expect_orig: Some(ip(pp, 9080)),
        },
        Case {
            what: "plain pod -> reviews:9080 (inbound, row 10)",
            from: 2,
            uid: APP_UID,
            gid: APP_UID,
            to: ip(rv, 9080),
            bind: None,
            args: &[],
            expect: "reviews:15006",
            expect_orig: Some(ip(rv, 9080)),
        },
        Case {
            what: "node 2 plain pod -> reviews:9080 (row 10)",
            from: 4,
            uid: APP_UID,
            gid: APP_UID,
            to: ip(rv, 9080),
            bind: None,
            args: &[],
            expect: "reviews:15006",
            expect_orig: Some(ip(rv, 9080)),
        },
        Case {
            what: "node 2 prom -> product:15090 (type 3, row 9)",
            from: 4,
            uid: APP_UID,
            gid: APP_UID,
            to: ip(pp, 15090),
            bind: None,
            args: &[],
            expect: "product",
            expect_orig: None,
        },
    ];

    println!(
        "{:<46} {:<20} {:<14} {:<14} {:<22} RESULT",
        "CONNECTION", "TO", "LANDED", "EXPECTED", "ORIGINAL DST SEEN"
    );
    let mut failures = 0;
    for c in &cases {
        let mut args = vec!["probe", "--connect", c.to.as_str()];
        if let Some(b) = c.bind {
            args.extend(["--bind", b]);
        }
        args.extend_from_slice(c.args);
        let out = sb.run(&pods[c.from], c.uid, c.gid, &mtest, &args)?;
        let p = ProbeResult::parse(&out)?;
        let rec = p.local.as_deref().and_then(record_of);
        let (landed, orig) = match (&rec, &p.reply) {
            // An AF_INET6 accepted socket's answer is SOL_IPV6's.
            (Some((pod, r)), _) => (
                format!("{pod}:{}", r.listener),
                r.orig_dst6.clone().or(r.orig_dst.clone()),
            ),
            (None, Some(reply)) => (reply.server.clone(), None),
            (None, None) => (
                format!("refused/{}", p.errno.clone().unwrap_or_default()),
                None,
            ),
        };
        let expected = c.expect.to_string();
        let ok = landed == expected && orig == c.expect_orig;
        if !ok {
            failures += 1;
        }
        println!(
            "{:<46} {:<20} {:<14} {:<14} {:<22} {}",
            c.what,
            c.to,
            landed,
            expected,
            orig.unwrap_or_else(|| "-".into()),
            if ok { "OK" } else { "MISMATCH" }
        );
    }

    // DNS over UDP from product (DNS capture on): unconnected and connected,
    // to istiod's IPv4 and IPv6 addresses. The query must reach product's
    // DNS proxy (15053) and the answer must come from the address asked.
    println!("\nUDP DNS from product (ISTIO_META_DNS_CAPTURE=true):");
    let dns_to = [ip(istiod, 53), ip6(istiod, 53)];
    let mut dns_rows = 0;
    for to in &dns_to {
        for how in ["--send-to", "--connect"] {
            dns_rows += 1;
            let out = sb.run(
                pp,
                APP_UID,
                APP_UID,
                &mtest,
                &["udp-probe", how, to, "--payload", "q"],
            )?;
            let r = UdpProbeResult::parse(&out)?;
            let via_proxy = r
                .reply
                .as_deref()
                .is_some_and(|x| x.starts_with(DNS_PROXY_REPLY_PREFIX));
            let ok = via_proxy && r.reply_from.as_deref() == Some(to.as_str());
            if !ok {
                failures += 1;
            }
            println!(
                "  {:<10} {:<28} answered by {:<18} reply from {:<28} {}",
                how.trim_start_matches("--"),
                to,
                if via_proxy {
                    "the DNS proxy"
                } else {
                    "the server"
                },
                r.reply_from.clone().unwrap_or_default(),
                if ok { "OK" } else { "MISMATCH" }
            );
        }
    }
    // Whole requests, hop by hop: app -> its sidecar (15001) -> the other
    // pod's sidecar (15006) -> that pod's app from 127.0.0.6.
    println!("\nrequests through both sidecars:");
    let walks = [
        (
            "productpage -> reviews (same node)",
            0,
            ip(rv, 9080),
            "reviews",
        ),
        (
            "productpage -> ratings (other node)",
            0,
            ip(ra, 9080),
            "ratings",
        ),
        (
            "ratings -> productpage (from node 2)",
            3,
            ip(pp, 9080),
            "product",
        ),
    ];
    for (what, from, to, server) in &walks {
        let out = sb.run(
            &pods[*from],
            APP_UID,
            APP_UID,
            &mtest,
            &["probe", "--connect", to],
        )?;
        let p = ProbeResult::parse(&out)?;
        let mut hops = vec![format!(
            "{} app {}",
            pods[*from].name,
            p.local.clone().unwrap_or_default()
        )];
        let first = p.local.as_deref().and_then(record_of);
        let second = first
            .as_ref()
            .and_then(|(_, r)| r.upstream_local.as_deref())
            .and_then(record_of);
        for (pod, r) in first.iter().chain(second.iter()) {
            hops.push(format!(
                "{pod} sidecar :{} (orig {})",
                r.listener,
                r.orig_dst.clone().unwrap_or_default()
            ));
        }
        let reply = p.reply.clone();
        if let Some(r) = &reply {
            hops.push(format!("{} app (saw {})", r.server, r.peer));
        }
        let ok = first.as_ref().is_some_and(|(_, r)| r.listener == 15001)
            && second.as_ref().is_some_and(|(_, r)| {
                r.listener == 15006 && r.orig_dst.as_deref() == Some(to.as_str())
            })
            && reply
                .as_ref()
                .is_some_and(|r| r.server == *server && r.peer.starts_with("127.0.0.6:"));
        if !ok {
            failures += 1;
        }
        println!(
            "  {what}: {}  {}",
            hops.join(" -> "),
            if ok { "OK" } else { "MISMATCH" }
        );
    }
    println!();
    let st = agent.status_cmd()?;
    println!("node 1 agent counters: {}", st["counters"]);
    println!(
        "node 2 agent counters: {}",
        agent2.status_cmd()?["counters"]
    );
    drop(agent2);
    drop(agent);
    drop(procs);
    drop(sb);
    println!("sandbox, agent, programs and pins removed");
    if failures > 0 {
        bail!(
            "{failures} of {} connections did not land where the decision table says",
            cases.len() + walks.len() + dns_rows
        );
    }
    println!(
        "all {} connections landed where the decision table says",
        cases.len() + walks.len() + dns_rows
    );
    Ok(())
}

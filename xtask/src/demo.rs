//! `cargo xtask demo`: a sandbox node with two meshed pods and one plain pod,
//! a sidecar in each meshed pod, the real agent, and the outbound traffic
//! types sent through it. Prints where each connection landed against what
//! the decision table says, and removes everything afterwards.
use std::time::Duration;

use anyhow::{bail, Result};
use meshlane_tests::{
    mtest_bin, read_sidecar_log, Agent, Pod, PodSpec, ProbeResult, Proc, Sandbox, APP_UID,
    PROXY_UID,
};

struct Case {
    what: &'static str,
    from: usize,
    uid: u32,
    gid: u32,
    to: String,
    bind: Option<&'static str>,
    /// "15001", "15006" or the name of the server reached directly.
    expect: &'static str,
    expect_orig: Option<String>,
}

pub fn run() -> Result<()> {
    let mtest = mtest_bin();
    let mut sb = Sandbox::new("demo")?;
    let pods: Vec<Pod> = ["product", "reviews", "istiod"]
        .iter()
        .map(|n| sb.add_pod(n))
        .collect::<Result<_>>()?;
    let (pp, rv, istiod) = (&pods[0], &pods[1], &pods[2]);
    let mut procs: Vec<Proc> = Vec::new();
    let mut logs = Vec::new();
    procs.push(sb.start_server(
        pp,
        &pp.name,
        &["0.0.0.0:9080", "127.0.0.1:15000", "0.0.0.0:15090"],
    )?);
    procs.push(sb.start_server(rv, &rv.name, &["0.0.0.0:9080"])?);
    procs.push(sb.start_server(istiod, &istiod.name, &["0.0.0.0:15012", "0.0.0.0:9080"])?);
    for pod in [pp, rv] {
        let log = sb.dir().join(format!("sidecar-{}.jsonl", pod.name));
        let mut p = sb.spawn(
            pod,
            PROXY_UID,
            PROXY_UID,
            &mtest,
            &["sidecar", "--log", log.to_str().unwrap_or_default()],
        )?;
        p.wait_ready(Duration::from_secs(10))?;
        procs.push(p);
        logs.push(log);
    }
    println!("sandbox: node {} with pods:", sb.node_netns());
    println!("  product     {} (meshed, sidecar uid {PROXY_UID})", pp.ip);
    println!("  reviews     {} (meshed, sidecar uid {PROXY_UID})", rv.ip);
    println!("  istiod      {} (not meshed)", istiod.ip);
    let agent = Agent::start(
        &sb,
        &[
            PodSpec::meshed(pp),
            PodSpec::meshed(rv),
            PodSpec::plain(istiod),
        ],
    )?;
    println!(
        "agent: attached to cgroup {} (bpffs {})\n",
        sb.cgroup().display(),
        agent.bpffs.display()
    );

    let ip = |p: &Pod, port: u16| format!("{}:{port}", p.ip);
    let cases = vec![
        Case {
            what: "app -> remote pod (type 2, row 1)",
            from: 0,
            uid: APP_UID,
            gid: APP_UID,
            to: ip(rv, 9080),
            bind: None,
            expect: "15001",
            expect_orig: Some(ip(rv, 9080)),
        },
        Case {
            what: "app -> plain pod (row 1)",
            from: 0,
            uid: APP_UID,
            gid: APP_UID,
            to: ip(istiod, 9080),
            bind: None,
            expect: "15001",
            expect_orig: Some(ip(istiod, 9080)),
        },
        Case {
            what: "app -> own pod IP (row 2)",
            from: 0,
            uid: APP_UID,
            gid: APP_UID,
            to: ip(pp, 9080),
            bind: None,
            expect: "product",
            expect_orig: None,
        },
        Case {
            what: "proxy -> remote pod (row 3)",
            from: 0,
            uid: PROXY_UID,
            gid: PROXY_UID,
            to: ip(rv, 9080),
            bind: None,
            expect: "reviews",
            expect_orig: None,
        },
        Case {
            what: "proxy -> own pod IP (type 4, row 4)",
            from: 0,
            uid: PROXY_UID,
            gid: PROXY_UID,
            to: ip(pp, 9080),
            bind: None,
            expect: "15006",
            expect_orig: Some(ip(pp, 9080)),
        },
        Case {
            what: "proxy -> 127.0.0.6:15002 (istio-validation)",
            from: 0,
            uid: PROXY_UID,
            gid: PROXY_UID,
            to: "127.0.0.6:15002".into(),
            bind: None,
            expect: "15006",
            expect_orig: Some("127.0.0.6:15002".into()),
        },
        Case {
            what: "proxy -> 127.0.0.1:15000 admin (type 5, row 5)",
            from: 0,
            uid: PROXY_UID,
            gid: PROXY_UID,
            to: "127.0.0.1:15000".into(),
            bind: None,
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
            expect: "product",
            expect_orig: None,
        },
        Case {
            what: "proxy gid only -> remote (row 8)",
            from: 0,
            uid: APP_UID,
            gid: PROXY_UID,
            to: ip(rv, 9080),
            bind: None,
            expect: "reviews",
            expect_orig: None,
        },
        Case {
            what: "reviews app -> product pod (row 1)",
            from: 1,
            uid: APP_UID,
            gid: APP_UID,
            to: ip(pp, 9080),
            bind: None,
            expect: "15001",
            expect_orig: Some(ip(pp, 9080)),
        },
        Case {
            what: "plain pod -> reviews (not meshed)",
            from: 2,
            uid: APP_UID,
            gid: APP_UID,
            to: ip(rv, 9080),
            bind: None,
            expect: "reviews",
            expect_orig: None,
        },
    ];

    println!(
        "{:<46} {:<20} {:<14} {:<10} {:<22} RESULT",
        "CONNECTION", "TO", "LANDED", "EXPECTED", "ORIGINAL DST SEEN"
    );
    let mut failures = 0;
    for c in &cases {
        let mut args = vec!["probe", "--connect", c.to.as_str()];
        if let Some(b) = c.bind {
            args.extend(["--bind", b]);
        }
        let out = sb.run(&pods[c.from], c.uid, c.gid, &mtest, &args)?;
        let p = ProbeResult::parse(&out)?;
        let rec = if c.from < 2 {
            p.local.as_ref().and_then(|l| {
                read_sidecar_log(&logs[c.from])
                    .into_iter()
                    .find(|r| &r.peer == l)
            })
        } else {
            None
        };
        let (landed, orig) = match (&rec, &p.reply) {
            (Some(r), _) => (format!("sidecar:{}", r.listener), r.orig_dst.clone()),
            (None, Some(reply)) => (reply.server.clone(), None),
            (None, None) => (
                format!("refused/{}", p.errno.clone().unwrap_or_default()),
                None,
            ),
        };
        let expected = if c.expect.starts_with("150") {
            format!("sidecar:{}", c.expect)
        } else {
            c.expect.to_string()
        };
        let ok = landed == expected && orig == c.expect_orig;
        if !ok {
            failures += 1;
        }
        println!(
            "{:<46} {:<20} {:<14} {:<10} {:<22} {}",
            c.what,
            c.to,
            landed,
            expected.trim_start_matches("sidecar:"),
            orig.unwrap_or_else(|| "-".into()),
            if ok { "OK" } else { "MISMATCH" }
        );
    }
    println!();
    let st = agent.status_cmd()?;
    println!("agent counters: {}", st["counters"]);
    drop(agent);
    drop(procs);
    drop(sb);
    println!("sandbox, agent, programs and pins removed");
    if failures > 0 {
        bail!(
            "{failures} of {} connections did not land where the decision table says",
            cases.len()
        );
    }
    println!(
        "all {} connections landed where the decision table says",
        cases.len()
    );
    Ok(())
}

//! The same-node shortcut (sockops + sk_msg + sockhash) under the ways
//! applications really use sockets, with the shortcut off and on, through the
//! full mesh path: app a -> sidecar a (15001) -> sidecar b (15006) -> app b
//! (the shortcut takes the sidecar-to-sidecar leg; see ebpf shortcut.rs).
//! The clients are blocking, multi-threaded (a reader and a writer per
//! socket), as many real applications are.
//! Every payload is checksummed end to end. The switch is flipped on the
//! running agent (`meshlane shortcut on|off`), nothing restarts.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use meshlane_tests::{
    meshlane_bin, shortcut_unsupported, skip_loudly, stream::StreamResult, Agent, Pod, PodSpec,
    Proc, Sandbox, APP_UID,
};
use serde_json::Value;

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

const ECHO: u16 = 7000;
const HASH: u16 = 7001;
/// Hashing server that waits 1.5 s before reading each connection.
const STALLED: u16 = 7002;

struct Setup {
    sb: Sandbox,
    a: Pod,
    b: Pod,
    /// The apps treat EAGAIN as "wait again" (`--retry-eagain`), as apps
    /// on non-blocking sockets do.
    retry: bool,
    _procs: Vec<Proc>,
}

fn setup(tag: &str, retry: bool) -> Result<Setup> {
    let mut sb = Sandbox::new(tag)?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let mut procs = Vec::new();
    for (port, extra) in [
        (ECHO, vec!["--echo"]),
        (HASH, vec![]),
        (STALLED, vec!["--stall-ms", "1500"]),
    ] {
        let listen = format!("0.0.0.0:{port}");
        let mut args = vec!["stream-server", "--listen", listen.as_str()];
        args.extend(extra);
        if retry {
            args.push("--retry-eagain");
        }
        let mut p = sb.spawn(&b, APP_UID, APP_UID, mtest(), &args)?;
        p.wait_ready(Duration::from_secs(10))?;
        procs.push(p);
    }
    for pod in [&a, &b] {
        procs.push(sb.start_sidecar(pod)?);
    }
    Ok(Setup {
        sb,
        a,
        b,
        retry,
        _procs: procs,
    })
}

fn stream(s: &Setup, port: u16, args: &[&str]) -> Result<StreamResult> {
    let to = format!("{}:{port}", s.b.ip);
    let mut full = vec!["stream-client", "--connect", to.as_str()];
    full.extend_from_slice(args);
    if s.retry {
        full.push("--retry-eagain");
    }
    let out = s.sb.run_timeout(
        &s.a,
        APP_UID,
        APP_UID,
        mtest(),
        &full,
        Duration::from_secs(240),
    )?;
    let r: StreamResult = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    Ok(r)
}

#[track_caller]
fn assert_all_ok(r: &StreamResult, what: &str) {
    assert!(
        r.errors.is_empty() && r.ok == r.conns,
        "{what}: {} of {} connections intact; errors: {:?}",
        r.ok,
        r.conns,
        r.errors
    );
}

fn counters(agent: &Agent) -> Result<Value> {
    Ok(agent.status_cmd()?["counters"].clone())
}

fn counter(c: &Value, name: &str) -> u64 {
    c[name].as_u64().unwrap_or(0)
}

fn switch(agent: &Agent, on: bool) -> Result<()> {
    let out = Command::new(meshlane_bin())
        .args(["shortcut", if on { "on" } else { "off" }, "--bpffs"])
        .arg(&agent.bpffs)
        .arg("--state-dir")
        .arg(&agent.state_dir)
        .output()?;
    if !out.status.success() {
        bail!(
            "meshlane shortcut: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The shortcut's entries still in its maps (sockhash and socket
/// addresses), once closing connections have gone (bounded wait).
fn settled_occupancy(agent: &Agent) -> Result<u64> {
    let mut last = 0;
    for _ in 0..50 {
        let maps = &agent.status_cmd()?["maps"];
        last = ["shortcut_sockets", "shortcut_addrs"]
            .iter()
            .map(|k| maps[k].as_u64().unwrap_or(u64::MAX / 4))
            .sum();
        if last == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(last)
}

/// Every way of using a socket the issue names, all checked end to end.
/// Returns the bytes the senders could hand to the kernel while the final
/// reader stalled.
fn battery(s: &Setup, label: &str) -> Result<u64> {
    let cases: [(&str, u16, Vec<&str>); 7] = [
        (
            "small writes (100 B), echo, half-close",
            ECHO,
            vec!["--bytes", "2000000", "--write-size", "100", "--echo"],
        ),
        (
            "large writes (1 MiB), echo",
            ECHO,
            vec!["--bytes", "16777216", "--write-size", "1048576", "--echo"],
        ),
        (
            "writev",
            ECHO,
            vec!["--bytes", "4194304", "--method", "writev", "--echo"],
        ),
        (
            "sendfile",
            HASH,
            vec!["--bytes", "8388608", "--method", "sendfile"],
        ),
        (
            "splice",
            HASH,
            vec!["--bytes", "8388608", "--method", "splice"],
        ),
        (
            "64 connections at once",
            ECHO,
            vec![
                "--conns",
                "64",
                "--bytes",
                "262144",
                "--write-size",
                "4096",
                "--echo",
            ],
        ),
        (
            "1 KiB writes",
            HASH,
            vec!["--bytes", "8388608", "--write-size", "1024"],
        ),
    ];
    for (what, port, args) in cases {
        let r = stream(s, port, &args)?;
        assert_all_ok(&r, &format!("{label}: {what}"));
    }

    // Close with unread data: the client reads 64 KiB of an 8 MiB echo and
    // closes. Nothing may hang, and the path must stay usable.
    let r = stream(
        s,
        ECHO,
        &["--bytes", "8388608", "--echo", "--close-after", "65536"],
    )?;
    assert_all_ok(&r, &format!("{label}: close with unread data"));

    // A peer that stops reading: the senders block instead of queueing
    // without bound, then everything arrives intact.
    let r = stream(
        s,
        STALLED,
        &[
            "--bytes",
            "67108864",
            "--write-size",
            "65536",
            "--sample-after-ms",
            "1000",
        ],
    )?;
    assert_all_ok(&r, &format!("{label}: stalled reader"));
    let buffered = r.sampled_sent.expect("sampled");
    eprintln!("{label}: bytes accepted while the peer did not read: {buffered}");
    Ok(buffered)
}

#[test]
fn streams_survive_with_the_shortcut_off_and_on() -> Result<()> {
    let s = setup("shortcut", false)?;
    let agent = Agent::start_on(
        &s.sb,
        1,
        &[PodSpec::meshed(&s.a), PodSpec::meshed(&s.b)],
        &["--shortcut", "off"],
    )?;

    // Off: nothing joins the sockhash.
    let before = counters(&agent)?;
    let buffered = battery(&s, "shortcut off")?;
    assert!(
        buffered < 40 << 20,
        "shortcut off: {buffered} bytes of 64 MiB accepted while the reader stalled: TCP must push back"
    );
    let after = counters(&agent)?;
    assert_eq!(
        counter(&after, "shortcut_sockets"),
        counter(&before, "shortcut_sockets"),
        "shortcut off, yet sockets joined: {after}"
    );
    assert_eq!(counter(&after, "shortcut_redirected"), 0, "{after}");

    // On, flipped at run time, where the kernel lets it push back on a
    // sender; elsewhere it must be refused, naming what is missing.
    if let Some(why) = shortcut_unsupported() {
        let e = switch(&agent, true)
            .expect_err("the shortcut turned on on a kernel without msg_tot_len");
        assert!(
            format!("{e:#}").contains("msg_tot_len"),
            "the refusal names the missing field: {e:#}"
        );
        assert_eq!(agent.status_cmd()?["shortcut"], false);
        skip_loudly(&format!(
            "shortcut on: refused on this kernel as it should be ({why}); the off half ran"
        ));
        return Ok(());
    }
    switch(&agent, true)?;
    assert_eq!(agent.status_cmd()?["shortcut"], true);
    let before = counters(&agent)?;
    let buffered = battery(&s, "shortcut on")?;
    // The kernel queues a redirected message on the receiver without regard
    // to its receive buffer; the program's limit on unread bytes (the node's
    // default, 4 MiB) moves the sender to TCP, whose window then pushes
    // back. Without it the whole 64 MiB was accepted within the first second.
    let after = counters(&agent)?;
    let fell_back = counter(&after, "shortcut_fell_back") - counter(&before, "shortcut_fell_back");
    eprintln!(
        "shortcut on: {buffered} bytes accepted while the reader stalled, {fell_back} sockets moved to TCP"
    );
    assert!(
        buffered < 40 << 20,
        "shortcut on: {buffered} bytes of 64 MiB accepted while the reader stalled: the shortcut must push back too"
    );
    assert!(
        fell_back >= 1,
        "a stalled reader, yet no shortcut socket moved to TCP: {after}"
    );
    let sockets = counter(&after, "shortcut_sockets") - counter(&before, "shortcut_sockets");
    let redirected =
        counter(&after, "shortcut_redirected") - counter(&before, "shortcut_redirected");
    // Only the proxy-to-proxy leg of each connection joins (two sockets);
    // there were more than 70 connections.
    assert!(sockets >= 2 * 70, "sockets joined: {sockets}; {after}");
    // The test sidecar relays up to 64 KB per write, so each message is
    // large: a thousand of them is already well over 60 MB redirected.
    assert!(
        redirected > 1_000,
        "messages redirected: {redirected}: the shortcut was not taken; {after}"
    );
    eprintln!(
        "shortcut on: {sockets} sockets joined, {redirected} messages redirected, {} first sends without a peer",
        counter(&after, "shortcut_no_peer") - counter(&before, "shortcut_no_peer")
    );
    // Entries go when sockets close.
    assert_eq!(
        settled_occupancy(&agent)?,
        0,
        "sockhash entries left behind"
    );

    // A pod that opts out: its sockets never join.
    agent.write_pods(&[
        PodSpec::meshed(&s.a),
        PodSpec::meshed(&s.b).annotate("meshlane.io/shortcut", "false"),
    ])?;
    std::thread::sleep(Duration::from_millis(600));
    let before = counters(&agent)?;
    let r = stream(&s, ECHO, &["--bytes", "1048576", "--echo"])?;
    assert_all_ok(&r, "b opted out");
    let after = counters(&agent)?;
    // Only sidecar a's end of the leg to b may join; b's end does not, so a's
    // end finds no peer and stays on TCP.
    let joined = counter(&after, "shortcut_sockets") - counter(&before, "shortcut_sockets");
    assert_eq!(joined, 1, "{after}");

    // Off again at run time: new connections stay on TCP.
    switch(&agent, false)?;
    let before = counters(&agent)?;
    let r = stream(&s, ECHO, &["--bytes", "1048576", "--echo"])?;
    assert_all_ok(&r, "switched off again");
    let after = counters(&agent)?;
    assert_eq!(
        counter(&after, "shortcut_sockets"),
        counter(&before, "shortcut_sockets")
    );
    Ok(())
}

/// `meshlane.io/shortcut-app: "true"`: the apps' own legs join too (app ->
/// its sidecar, and the sidecar's 127.0.0.6 leg to the app), so every hop
/// of the path a -> sidecar a -> sidecar b -> b is a redirect. The apps
/// here cope with EAGAIN as event-loop apps do; the test above, whose apps
/// do not, proves that pods without the annotation keep their apps off.
#[test]
fn app_legs_join_in_pods_that_opt_in() -> Result<()> {
    if let Some(why) = shortcut_unsupported() {
        skip_loudly(&format!("the shortcut is refused on this kernel: {why}"));
        return Ok(());
    }
    let s = setup("shortapp", true)?;
    let pods = [
        PodSpec::meshed(&s.a).annotate("meshlane.io/shortcut-app", "true"),
        PodSpec::meshed(&s.b).annotate("meshlane.io/shortcut-app", "true"),
    ];
    let agent = Agent::start_on(&s.sb, 1, &pods, &["--shortcut", "on"])?;
    let before = counters(&agent)?;
    let buffered = battery(&s, "shortcut on, app legs")?;
    let after = counters(&agent)?;
    let delta = |name: &str| counter(&after, name) - counter(&before, name);
    let (sockets, redirected, no_peer, fell_back) = (
        delta("shortcut_sockets"),
        delta("shortcut_redirected"),
        delta("shortcut_no_peer"),
        delta("shortcut_fell_back"),
    );
    eprintln!(
        "app legs: {sockets} sockets joined, {redirected} messages redirected, \
         {no_peer} first sends without a peer, {fell_back} moved to TCP, \
         {buffered} bytes accepted while the reader stalled"
    );
    // Six sockets per connection (three legs), more than 70 connections.
    assert!(sockets >= 6 * 70, "sockets joined: {sockets}; {after}");
    assert!(
        redirected > 1_000,
        "messages redirected: {redirected}; {after}"
    );
    assert!(
        buffered < 40 << 20,
        "app legs: {buffered} bytes of 64 MiB accepted while the reader stalled"
    );
    assert!(
        fell_back >= 1,
        "a stalled reader, yet nothing moved to TCP: {after}"
    );
    // Per pod: each pod's app and sidecar ends joined.
    let st = agent.status_cmd()?;
    let per_pod = st["pod_counters"].as_object().cloned().unwrap_or_default();
    assert_eq!(per_pod.len(), 2, "{st}");
    for (name, c) in &per_pod {
        let joined = c["shortcut_sockets"].as_u64().unwrap_or(0);
        assert!(
            joined >= 3 * 70,
            "pod {name}: {joined} sockets joined; {st}"
        );
    }
    assert_eq!(
        settled_occupancy(&agent)?,
        0,
        "sockhash entries left behind"
    );
    Ok(())
}

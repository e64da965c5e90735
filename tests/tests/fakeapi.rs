//! The fake API server on its own, over raw HTTP/1.1: what it answers is
//! what the kubernetes pod source tests rely on (list, chunked watch from a
//! resourceVersion, field selectors, bookmarks, both forms of 410 Gone, a
//! restart on the same port). No privileges needed.
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use meshlane_tests::{
    fakeapi::{api_pod, FakeApi, GoneStyle},
    PodSpec,
};
use serde_json::Value;

fn spec(name: &str, last: u8) -> PodSpec {
    PodSpec {
        name: name.into(),
        ip: Some(std::net::Ipv4Addr::new(10, 9, 0, last)),
        meshed: true,
        ..Default::default()
    }
}

/// GET `target`; returns the status code and the body, de-chunked when the
/// answer is chunked (then also checks the stream ended with a last chunk).
fn get(api: &FakeApi, target: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", api.port()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw)?;
    let (head, mut rest) = text.split_once("\r\n\r\n").context("no header end")?;
    let code: u16 = head.split(' ').nth(1).context("status line")?.parse()?;
    if !head.contains("Transfer-Encoding: chunked") {
        return Ok((code, rest.to_string()));
    }
    let mut body = String::new();
    loop {
        let (len, after) = rest.split_once("\r\n").context("chunk size line")?;
        let len = usize::from_str_radix(len, 16)?;
        if len == 0 {
            return Ok((code, body));
        }
        if after.len() < len + 2 {
            bail!("truncated chunk in {text:?}");
        }
        body.push_str(&after[..len]);
        rest = &after[len + 2..];
    }
}

fn events(body: &str) -> Vec<Value> {
    body.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect()
}

#[test]
fn lists_watches_bookmarks_gone_and_restarts() -> Result<()> {
    let mut api = FakeApi::start()?;
    api.apply(api_pod(&spec("x", 1), "node-1"));
    api.apply(api_pod(&spec("y", 2), "node-2"));
    let sel = "fieldSelector=spec.nodeName%3Dnode-1";

    let (code, body) = get(&api, &format!("/api/v1/pods?{sel}&limit=500"))?;
    assert_eq!(code, 200);
    let list: Value = serde_json::from_str(&body)?;
    assert_eq!(list["kind"], "PodList");
    let rv = api.resource_version();
    assert_eq!(list["metadata"]["resourceVersion"], rv.to_string());
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "node-2's pod is filtered out: {body}");
    assert_eq!(items[0]["metadata"]["name"], "x");
    assert!(items[0].get("kind").is_none(), "list items carry no kind");

    // Changes after rv, replayed from history; other nodes' changes skipped.
    let mut x2 = api_pod(&spec("x", 1), "node-1");
    x2["metadata"]["annotations"]["k"] = "v".into();
    let rv_mod = api.apply(x2);
    api.apply(api_pod(&spec("y", 2), "node-2"));
    let rv_del = api.delete("default", "x").expect("x");
    let watch = format!("/api/v1/pods?{sel}&watch=true&resourceVersion={rv}&timeoutSeconds=1");
    let (code, body) = get(&api, &watch)?;
    assert_eq!(code, 200);
    let ev = events(&body);
    let kinds: Vec<&str> = ev.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds, ["MODIFIED", "DELETED"], "{body}");
    assert_eq!(
        ev[0]["object"]["metadata"]["resourceVersion"],
        rv_mod.to_string()
    );
    assert_eq!(
        ev[1]["object"]["metadata"]["resourceVersion"],
        rv_del.to_string()
    );

    // A live watch gets a bookmark when it allows them.
    let now = api.resource_version();
    let bm_watch = format!(
        "/api/v1/pods?{sel}&watch=true&resourceVersion={now}&allowWatchBookmarks=true&timeoutSeconds=1"
    );
    let (body, bm_rv) = std::thread::scope(|s| {
        let h = s.spawn(|| get(&api, &bm_watch));
        std::thread::sleep(Duration::from_millis(300));
        let bm_rv = api.bookmark();
        (h.join().expect("watch thread"), bm_rv)
    });
    let ev = events(&body?.1);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["type"], "BOOKMARK");
    assert_eq!(
        ev[0]["object"]["metadata"]["resourceVersion"],
        bm_rv.to_string()
    );

    // Compacted history: 410 as an ERROR event, then as HTTP 410.
    api.compact();
    let (code, body) = get(&api, &watch)?;
    assert_eq!(code, 200);
    let ev = events(&body);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["type"], "ERROR");
    assert_eq!(ev[0]["object"]["code"], 410);
    assert_eq!(ev[0]["object"]["kind"], "Status");
    api.set_gone_style(GoneStyle::HttpStatus);
    let (code, body) = get(&api, &watch)?;
    assert_eq!(code, 410);
    let status: Value = serde_json::from_str(&body)?;
    assert_eq!(
        (status["kind"].as_str(), status["code"].as_u64()),
        (Some("Status"), Some(410))
    );
    // From the current version a watch is still fine.
    let (code, _) = get(
        &api,
        &format!(
            "/api/v1/pods?{sel}&watch=true&resourceVersion={}&timeoutSeconds=1",
            api.resource_version()
        ),
    )?;
    assert_eq!(code, 200);

    // A restart: refused while down, the same port afterwards.
    let port = api.port();
    api.stop();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    api.start_again()?;
    assert_eq!(api.port(), port);
    assert_eq!(get(&api, &format!("/api/v1/pods?{sel}"))?.0, 200);

    // Anything the fake does not understand is an error, not a guess.
    assert_eq!(
        get(&api, "/api/v1/pods?fieldSelector=metadata.name%3Dx")?.0,
        400
    );
    assert_eq!(
        get(&api, "/api/v1/pods?labelSelector=app%20in%20(a,b)")?.0,
        400
    );
    assert_eq!(get(&api, "/api/v1/namespaces/default/pods/x/exec")?.0, 404);
    // One namespace's pods, by label (what `meshlane check` asks).
    let (code, body) = get(
        &api,
        "/api/v1/namespaces/default/pods?labelSelector=app%3Dnobody",
    )?;
    assert_eq!(code, 200, "{body}");
    let list: Value = serde_json::from_str(&body)?;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{body}");
    let logged = api.requests();
    assert!(logged.iter().any(|r| r.status == 410 && r.is_watch()));
    assert!(logged.iter().any(|r| r.gone_event));
    Ok(())
}

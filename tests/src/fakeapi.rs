//! A stand-in for the Kubernetes API server, for the agent's `kubernetes`
//! pod source: a real HTTP/1.1 server on 127.0.0.1 (random port) that speaks
//! the list and watch protocol for pods as the API server does.
//!
//! * `GET /api/v1/pods?fieldSelector=spec.nodeName%3DNODE` lists (a PodList
//!   whose `metadata.resourceVersion` is the store's current version; items
//!   without kind/apiVersion, as the API server sends them).
//! * `...&watch=true&resourceVersion=N` streams every change after N as
//!   chunked JSON lines (`{"type":"ADDED|MODIFIED|DELETED","object":Pod}`),
//!   then live changes, until `timeoutSeconds`. `allowWatchBookmarks=true`
//!   gets BOOKMARK events when the test asks for them.
//! * `GET /api/v1/namespaces/NS/pods/NAME` reads one pod (404 when absent),
//!   as meshlane-cni does while the agent is down.
//! * Field selectors on `spec.nodeName` are honoured, so a pod of another node
//!   never reaches the agent.
//! * A resourceVersion older than what history still holds ("compacted")
//!   gets 410 Gone, either as a watch `ERROR` event carrying a `Status` with
//!   code 410 (what the API server's watch cache does) or as an HTTP 410
//!   response (what a watch served straight from etcd can do).
//! * `stop`/`start_again` close every connection and the listener, then
//!   listen again on the same port: an API server restart.
//!
//! Every request is logged (path, query, answer) so tests can check what the
//! agent asked for: the node's field selector, the resourceVersion it resumed
//! from, whether it listed again.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
};

use crate::PodSpec;

/// How an expired resourceVersion is answered on a watch request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoneStyle {
    /// HTTP 200, then one `ERROR` watch event with a Status of code 410.
    ErrorEvent,
    /// HTTP 410 with a Status body.
    HttpStatus,
}

/// One request the server answered.
#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub query: BTreeMap<String, String>,
    /// HTTP status answered (200 for a watch, even one that ends in an ERROR event).
    pub status: u16,
    /// A watch that was answered with a 410 ERROR event.
    pub gone_event: bool,
    pub at: Instant,
}

impl Request {
    pub fn is_watch(&self) -> bool {
        matches!(
            self.query.get("watch").map(String::as_str),
            Some("true" | "1")
        )
    }
    pub fn is_list(&self) -> bool {
        self.path == "/api/v1/pods" && !self.is_watch()
    }
    pub fn resource_version(&self) -> Option<&str> {
        self.query.get("resourceVersion").map(String::as_str)
    }
}

struct HistoryEvent {
    rv: u64,
    kind: &'static str,
    object: Value,
}

struct Store {
    rv: u64,
    pods: BTreeMap<String, Value>,
    history: Vec<HistoryEvent>,
    /// Watches from a resourceVersion below this are Gone.
    oldest: u64,
    /// Bumped by `expire_watches`: open watches end with a 410 ERROR event.
    expire_epoch: u64,
    /// Bumped by `bookmark`: open watches that allow it get a BOOKMARK.
    bookmark_epoch: u64,
    gone: GoneStyle,
}

struct Shared {
    store: Mutex<Store>,
    /// Bumped on every store change, to wake the watches.
    tick: watch::Sender<u64>,
    /// Bumped by `stop`: every connection is closed.
    generation: watch::Sender<u64>,
    log: Mutex<Vec<Request>>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn wake(&self) {
        self.tick.send_modify(|t| *t += 1);
    }
    fn record(&self, r: Request) {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(r);
    }
}

pub struct FakeApi {
    port: u16,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
    accept: Option<JoinHandle<()>>,
}

impl FakeApi {
    /// Listens on 127.0.0.1 on a port the kernel picks.
    pub fn start() -> Result<FakeApi> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()
            .context("fake API server runtime")?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                // Real resourceVersions are large, opaque numbers; start well
                // away from 0, which means "any" to the API server.
                rv: 1000,
                pods: BTreeMap::new(),
                history: Vec::new(),
                oldest: 1000,
                expire_epoch: 0,
                bookmark_epoch: 0,
                gone: GoneStyle::ErrorEvent,
            }),
            tick: watch::Sender::new(0),
            generation: watch::Sender::new(0),
            log: Mutex::new(Vec::new()),
        });
        let mut api = FakeApi {
            port: 0,
            shared,
            rt: Some(rt),
            accept: None,
        };
        api.listen()?;
        Ok(api)
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives until drop")
    }

    fn listen(&mut self) -> Result<()> {
        let port = self.port;
        let listener = self.rt().block_on(async move {
            let s = TcpSocket::new_v4()?;
            // The restarted server takes the same port while connections of
            // the old one may still be in TIME_WAIT.
            s.set_reuseaddr(true)?;
            s.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
            s.listen(128)
        });
        let listener =
            listener.with_context(|| format!("fake API server: listen on port {port}"))?;
        self.port = listener.local_addr()?.port();
        let shared = self.shared.clone();
        self.accept = Some(self.rt().spawn(accept_loop(listener, shared)));
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A kubeconfig that points at this server (plain HTTP, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\n\
             current-context: fake\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The store's current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Creates or replaces a pod (ADDED or MODIFIED); returns its resourceVersion.
    pub fn apply(&self, pod: Value) -> u64 {
        self.change(pod, true)
    }

    /// Deletes a pod (DELETED); returns the resourceVersion, or None if it was not there.
    pub fn delete(&self, namespace: &str, name: &str) -> Option<u64> {
        self.remove(namespace, name, true)
    }

    /// Changes the store without a watch event, and compacts history up to
    /// the change: only a client that lists again can learn of it (as when
    /// the API server's history moved past a client that was away).
    pub fn apply_unseen(&self, pod: Value) -> u64 {
        self.change(pod, false)
    }

    /// Deletes without a watch event; see [`FakeApi::apply_unseen`].
    pub fn delete_unseen(&self, namespace: &str, name: &str) -> Option<u64> {
        self.remove(namespace, name, false)
    }

    fn change(&self, mut pod: Value, event: bool) -> u64 {
        let key = key_of(&pod);
        let rv = {
            let mut st = self.shared.store();
            st.rv += 1;
            let rv = st.rv;
            let existed = st.pods.contains_key(&key);
            let meta = pod["metadata"].as_object_mut().expect("pod has metadata");
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            st.pods.insert(key, pod.clone());
            if event {
                st.history.push(HistoryEvent {
                    rv,
                    kind: if existed { "MODIFIED" } else { "ADDED" },
                    object: pod,
                });
            } else {
                st.history.clear();
                st.oldest = rv;
            }
            rv
        };
        self.shared.wake();
        rv
    }

    fn remove(&self, namespace: &str, name: &str, event: bool) -> Option<u64> {
        let rv = {
            let mut st = self.shared.store();
            let mut pod = st.pods.remove(&format!("{namespace}/{name}"))?;
            st.rv += 1;
            let rv = st.rv;
            pod["metadata"]["resourceVersion"] = json!(rv.to_string());
            if event {
                st.history.push(HistoryEvent {
                    rv,
                    kind: "DELETED",
                    object: pod,
                });
            } else {
                st.history.clear();
                st.oldest = rv;
            }
            rv
        };
        self.shared.wake();
        Some(rv)
    }

    /// Forgets all history: a watch from any earlier resourceVersion is Gone.
    pub fn compact(&self) {
        let mut st = self.shared.store();
        st.history.clear();
        st.oldest = st.rv;
    }

    /// Ends every open watch with a 410 ERROR event.
    pub fn expire_watches(&self) {
        self.shared.store().expire_epoch += 1;
        self.shared.wake();
    }

    /// Sends a BOOKMARK at the current resourceVersion on every open watch
    /// that allows bookmarks; returns that version.
    pub fn bookmark(&self) -> u64 {
        let rv = {
            let mut st = self.shared.store();
            st.bookmark_epoch += 1;
            st.rv
        };
        self.shared.wake();
        rv
    }

    pub fn set_gone_style(&self, style: GoneStyle) {
        self.shared.store().gone = style;
    }

    /// Closes the listener and every connection; the port refuses connections.
    pub fn stop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
            let _ = self.rt().block_on(a);
        }
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Listens again on the same port.
    pub fn start_again(&mut self) -> Result<()> {
        self.listen()
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits for a request (among those after the first `skip`) that
    /// satisfies `pred`.
    pub fn wait_request(
        &self,
        skip: usize,
        timeout: Duration,
        pred: impl Fn(&Request) -> bool,
    ) -> Result<Request> {
        let t0 = Instant::now();
        loop {
            if let Some(r) = self.requests().into_iter().skip(skip).find(|r| pred(r)) {
                return Ok(r);
            }
            if t0.elapsed() > timeout {
                bail!(
                    "fake API server: no such request in {timeout:?}; requests: {:#?}",
                    self.requests().iter().skip(skip).collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn key_of(pod: &Value) -> String {
    format!(
        "{}/{}",
        pod["metadata"]["namespace"].as_str().unwrap_or("default"),
        pod["metadata"]["name"].as_str().expect("pod has a name")
    )
}

fn node_of(pod: &Value) -> Option<&str> {
    pod["spec"]["nodeName"].as_str()
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let shared = shared.clone();
        let mut gen = shared.generation.subscribe();
        gen.mark_unchanged();
        tokio::spawn(async move {
            // A restart drops the connection wherever it is, mid-stream too.
            tokio::select! {
                _ = serve_connection(stream, &shared) => {}
                _ = gen.changed() => {}
            }
        });
    }
}

/// Reads requests one after another on a keep-alive connection.
async fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    let mut buf = Vec::new();
    loop {
        let head = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end + 4);
                break head;
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let close = lines.any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("connection:") && l.contains("close")
        });
        let mut parts = request_line.split(' ');
        let (method, target) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), parse_query(q)),
            None => (target.to_string(), BTreeMap::new()),
        };
        let mut req = Request {
            path,
            query,
            status: 200,
            gone_event: false,
            at: Instant::now(),
        };
        let keep = if method != "GET" {
            req.status = 405;
            respond_status(&mut stream, 405, "MethodNotAllowed", "only GET").await
        } else if let Some(key) = one_pod(&req.path) {
            let pod = shared.store().pods.get(&key).cloned();
            req.status = if pod.is_some() { 200 } else { 404 };
            shared.record(req.clone());
            match pod {
                Some(p) => respond_json(&mut stream, 200, &p).await,
                None => {
                    let msg = format!("pods {key:?} not found");
                    respond_status(&mut stream, 404, "NotFound", &msg).await
                }
            }
        } else if req.path != "/api/v1/pods" {
            req.status = 404;
            respond_status(
                &mut stream,
                404,
                "NotFound",
                "the fake serves /api/v1/pods only",
            )
            .await
        } else if req.is_watch() {
            // The log entry goes in when the answer is decided, before a long stream.
            watch_pods(&mut stream, shared, req).await
        } else {
            list_pods(&mut stream, shared, &mut req).await
        };
        if !keep || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// `namespace/name` of a `/api/v1/namespaces/NS/pods/NAME` path.
fn one_pod(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, name) = rest.split_once("/pods/")?;
    (!ns.contains('/') && !name.is_empty() && !name.contains('/')).then(|| format!("{ns}/{name}"))
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The node a request asks for (`fieldSelector=spec.nodeName=X`), or None
/// for all pods. Any other selector is an error the test must see.
fn node_selector(query: &BTreeMap<String, String>) -> Result<Option<String>, String> {
    let Some(sel) = query.get("fieldSelector").filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    match sel.strip_prefix("spec.nodeName=") {
        Some(node) if !node.contains(',') => Ok(Some(node.to_string())),
        _ => Err(format!(
            "the fake understands only spec.nodeName=X, not {sel:?}"
        )),
    }
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        _ => "Internal Server Error",
    }
}

async fn respond_json(stream: &mut TcpStream, code: u16, body: &Value) -> bool {
    let body = serde_json::to_vec(body).expect("json");
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        reason_phrase(code),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.is_ok() && stream.write_all(&body).await.is_ok()
}

async fn respond_status(stream: &mut TcpStream, code: u16, reason: &str, message: &str) -> bool {
    respond_json(stream, code, &status_json(code, reason, message)).await
}

/// List items come without kind and apiVersion, as the API server sends them.
fn list_item(pod: &Value) -> Value {
    let mut p = pod.clone();
    if let Some(o) = p.as_object_mut() {
        o.remove("kind");
        o.remove("apiVersion");
    }
    p
}

async fn list_pods(stream: &mut TcpStream, shared: &Shared, req: &mut Request) -> bool {
    let node = match node_selector(&req.query) {
        Ok(n) => n,
        Err(e) => {
            req.status = 400;
            shared.record(req.clone());
            return respond_status(stream, 400, "BadRequest", &e).await;
        }
    };
    let (rv, items) = {
        let st = shared.store();
        let items: Vec<Value> = st
            .pods
            .values()
            .filter(|p| node.is_none() || node_of(p) == node.as_deref())
            .map(list_item)
            .collect();
        (st.rv, items)
    };
    let limit: Option<usize> = req.query.get("limit").and_then(|l| l.parse().ok());
    if req.query.contains_key("continue") || limit.is_some_and(|l| items.len() > l) {
        // Paging is not needed for the few pods of a test; say so loudly
        // rather than answer something the real server would not.
        req.status = 500;
        shared.record(req.clone());
        return respond_status(stream, 500, "InternalError", "the fake does not page lists").await;
    }
    shared.record(req.clone());
    let body = json!({
        "kind": "PodList", "apiVersion": "v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    });
    respond_json(stream, 200, &body).await
}

async fn write_chunk(stream: &mut TcpStream, line: &Value) -> bool {
    let mut data = serde_json::to_vec(line).expect("json");
    data.push(b'\n');
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out).await.is_ok()
}

async fn end_chunks(stream: &mut TcpStream) -> bool {
    stream.write_all(b"0\r\n\r\n").await.is_ok()
}

async fn watch_pods(stream: &mut TcpStream, shared: &Shared, mut req: Request) -> bool {
    let node = match node_selector(&req.query) {
        Ok(n) => n,
        Err(e) => {
            req.status = 400;
            shared.record(req);
            return respond_status(stream, 400, "BadRequest", &e).await;
        }
    };
    let bookmarks = req.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let since = req.resource_version().unwrap_or("").to_string();
    let mine = |p: &Value| node.is_none() || node_of(p) == node.as_deref();

    let mut tick = shared.tick.subscribe();
    // What the watch starts with, decided under one lock.
    let (start, mut cursor, gone, style, mut expire_epoch, mut bookmark_epoch) = {
        let st = shared.store();
        let (start, cursor, gone) = match since.as_str() {
            // "Start at any/most recent": the current pods as ADDED, then changes.
            "" | "0" => (
                st.pods.values().filter(|p| mine(p)).cloned().collect(),
                st.rv,
                false,
            ),
            v => match v.parse::<u64>() {
                Ok(n) => (Vec::new(), n, n < st.oldest),
                Err(_) => (Vec::new(), 0, true),
            },
        };
        (
            start,
            cursor,
            gone,
            st.gone,
            st.expire_epoch,
            st.bookmark_epoch,
        )
    };
    let gone_status = || {
        status_json(
            410,
            "Expired",
            &format!(
                "too old resource version: {since} ({})",
                shared.store().oldest
            ),
        )
    };
    if gone && style == GoneStyle::HttpStatus {
        req.status = 410;
        shared.record(req);
        return respond_json(stream, 410, &gone_status()).await;
    }
    req.gone_event = gone;
    shared.record(req);
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    if gone {
        // The API server ends a watch after an ERROR event.
        return write_chunk(stream, &json!({"type": "ERROR", "object": gone_status()})).await
            && end_chunks(stream).await;
    }
    for p in start {
        if !write_chunk(stream, &json!({"type": "ADDED", "object": p})).await {
            return false;
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (events, expired, bookmark_rv) = {
            let st = shared.store();
            let events: Vec<Value> = st
                .history
                .iter()
                .filter(|e| e.rv > cursor && mine(&e.object))
                .map(|e| json!({"type": e.kind, "object": e.object}))
                .collect();
            cursor = cursor.max(st.history.last().map_or(cursor, |e| e.rv));
            let expired = st.expire_epoch != expire_epoch;
            expire_epoch = st.expire_epoch;
            let bookmark = (st.bookmark_epoch != bookmark_epoch).then_some(st.rv);
            bookmark_epoch = st.bookmark_epoch;
            (events, expired, bookmark)
        };
        for ev in &events {
            if !write_chunk(stream, ev).await {
                return false;
            }
        }
        if expired {
            return write_chunk(stream, &json!({"type": "ERROR", "object": gone_status()})).await
                && end_chunks(stream).await;
        }
        if let (Some(rv), true) = (bookmark_rv, bookmarks) {
            let bm = json!({"type": "BOOKMARK", "object": {
                "kind": "Pod", "apiVersion": "v1",
                "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null},
                "spec": {"containers": null}, "status": {},
            }});
            if !write_chunk(stream, &bm).await {
                return false;
            }
            cursor = cursor.max(rv);
        }
        tokio::select! {
            r = tick.changed() => if r.is_err() { return false },
            _ = tokio::time::sleep_until(deadline) => return end_chunks(stream).await,
        }
    }
}

/// A Pod as the API server returns it for `spec`: what `PodSpec::to_json`
/// holds plus the fields a scheduled, running pod carries (owner, uid,
/// timestamps, conditions, container statuses, service-account volume).
pub fn api_pod(spec: &PodSpec, node: &str) -> Value {
    let mut p = spec.to_json();
    let name = spec.name.as_str();
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let uid = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        (h >> 20) & 0xfff,
        h & 0xffff_ffff_ffff
    );
    let meta = p["metadata"].as_object_mut().expect("metadata");
    meta.insert("uid".into(), json!(uid));
    meta.insert("generateName".into(), json!(format!("{name}-7d4b9c8f6-")));
    meta.insert("creationTimestamp".into(), json!("2025-06-01T10:00:00Z"));
    meta.insert(
        "labels".into(),
        json!({"app": name, "pod-template-hash": "7d4b9c8f6", "security.istio.io/tlsMode": "istio"}),
    );
    meta.insert(
        "ownerReferences".into(),
        json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-7d4b9c8f6"),
                "uid": "0b5e3c1a-1111-4222-8333-444455556666", "controller": true, "blockOwnerDeletion": true}]),
    );
    let s = p["spec"].as_object_mut().expect("spec");
    s.insert("nodeName".into(), json!(node));
    s.insert("restartPolicy".into(), json!("Always"));
    s.insert("dnsPolicy".into(), json!("ClusterFirst"));
    s.insert("serviceAccountName".into(), json!("default"));
    s.insert("schedulerName".into(), json!("default-scheduler"));
    s.insert("terminationGracePeriodSeconds".into(), json!(30));
    s.insert("enableServiceLinks".into(), json!(true));
    s.insert("priority".into(), json!(0));
    s.insert(
        "tolerations".into(),
        json!([{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]),
    );
    s.insert(
        "volumes".into(),
        json!([{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}]),
    );
    let st = p["status"].as_object_mut().expect("status");
    st.insert("hostIP".into(), json!("192.0.2.10"));
    st.insert("hostIPs".into(), json!([{"ip": "192.0.2.10"}]));
    st.insert("qosClass".into(), json!("BestEffort"));
    st.insert("startTime".into(), json!("2025-06-01T10:00:01Z"));
    let running = spec.has_ip();
    st.insert(
        "conditions".into(),
        json!([
            {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2025-06-01T10:00:00Z"},
            {"type": "Initialized", "status": if running { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": "2025-06-01T10:00:02Z"},
            {"type": "Ready", "status": if running { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": "2025-06-01T10:00:05Z"},
        ]),
    );
    let statuses: Vec<Value> = p["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": running, "restartCount": 0,
                   "started": running,
                   "state": if running { json!({"running": {"startedAt": "2025-06-01T10:00:04Z"}}) }
                            else { json!({"waiting": {"reason": "ContainerCreating"}}) }})
        })
        .collect();
    p["status"]["containerStatuses"] = json!(statuses);
    p
}

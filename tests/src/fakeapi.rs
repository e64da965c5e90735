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
    /// Other kinds (nodes, daemonsets, configmaps...) by collection
    /// ("api/v1/nodes", "apis/apps/v1/daemonsets"), then NAMESPACE/NAME (or
    /// NAME for cluster-scoped kinds). Listed and read, never watched.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// Container logs by pod NAMESPACE/NAME (`.../pods/NAME/log`).
    logs: BTreeMap<String, String>,
    /// Pods created through the API (POST), by NAMESPACE/NAME, for the
    /// test's stand-in kubelet to run.
    created: Vec<String>,
    /// Counter for `generateName`.
    generated: u64,
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
                objects: BTreeMap::new(),
                logs: BTreeMap::new(),
                created: Vec::new(),
                generated: 0,
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

    /// Creates or replaces an object of another kind in `collection`
    /// (`api/v1/nodes`, `apis/apps/v1/daemonsets`, `api/v1/configmaps`: the
    /// path without namespace; its namespace comes from its metadata).
    pub fn put_object(&self, collection: &str, mut obj: Value) {
        let mut st = self.shared.store();
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let key = match obj["metadata"]["namespace"].as_str() {
            Some(ns) => format!("{ns}/{}", obj["metadata"]["name"].as_str().expect("name")),
            None => obj["metadata"]["name"].as_str().expect("name").to_string(),
        };
        st.objects
            .entry(collection.to_string())
            .or_default()
            .insert(key, obj);
    }

    /// A pod as the store holds it now.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .store()
            .pods
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    /// Every pod in the store, as NAMESPACE/NAME.
    pub fn pod_names(&self) -> Vec<String> {
        self.shared.store().pods.keys().cloned().collect()
    }

    /// Pods created through the API since the last call (NAMESPACE/NAME),
    /// for a test's stand-in kubelet.
    pub fn take_created(&self) -> Vec<String> {
        std::mem::take(&mut self.shared.store().created)
    }

    /// Sets what `GET .../pods/NAME/log` answers for a pod.
    pub fn set_log(&self, namespace: &str, name: &str, text: &str) {
        self.shared
            .store()
            .logs
            .insert(format!("{namespace}/{name}"), text.to_string());
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
        let mut close = false;
        let mut length = 0usize;
        for l in lines {
            let l = l.to_ascii_lowercase();
            if l.starts_with("connection:") && l.contains("close") {
                close = true;
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        while buf.len() < length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        let mut parts = request_line.split(' ');
        let (method, target) = (
            parts.next().unwrap_or_default().to_string(),
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
        let route = Route::of(&req.path);
        let keep = match (method.as_str(), route) {
            (_, Route::Proxy { pod, port, rest }) => {
                proxy(&mut stream, shared, &mut req, &pod, port, &rest).await
            }
            ("GET", Route::Log(key)) => {
                let log = shared.store().logs.get(&key).cloned();
                req.status = if log.is_some() { 200 } else { 404 };
                shared.record(req.clone());
                match log {
                    Some(l) => respond_text(&mut stream, 200, &l).await,
                    None => {
                        respond_status(
                            &mut stream,
                            404,
                            "NotFound",
                            &format!("no log for pod {key:?}"),
                        )
                        .await
                    }
                }
            }
            ("POST", Route::Pods(Some(ns))) => {
                create_pod(&mut stream, shared, &mut req, &ns, &body).await
            }
            ("DELETE", Route::Pod(key)) => {
                let (ns, name) = key.split_once('/').expect("ns/name");
                let gone = remove_shared(shared, ns, name);
                req.status = if gone.is_some() { 200 } else { 404 };
                shared.record(req.clone());
                match gone {
                    Some(p) => respond_json(&mut stream, 200, &p).await,
                    None => {
                        respond_status(
                            &mut stream,
                            404,
                            "NotFound",
                            &format!("pods {key:?} not found"),
                        )
                        .await
                    }
                }
            }
            ("GET", Route::Pod(key)) => {
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
            }
            // The log entry goes in when the answer is decided, before a long stream.
            ("GET", Route::Pods(None)) if req.is_watch() => {
                watch_pods(&mut stream, shared, req).await
            }
            ("GET", Route::Pods(ns)) if !req.is_watch() => {
                list_pods(&mut stream, shared, &mut req, ns.as_deref()).await
            }
            (
                "GET",
                Route::Objects {
                    collection,
                    namespace,
                    name,
                },
            ) => {
                get_objects(
                    &mut stream,
                    shared,
                    &mut req,
                    &collection,
                    namespace.as_deref(),
                    name.as_deref(),
                )
                .await
            }
            (m, _) => {
                req.status = if m == "GET" { 404 } else { 405 };
                shared.record(req.clone());
                let msg = format!("the fake does not serve {m} {}", req.path);
                respond_status(&mut stream, req.status, "NotFound", &msg).await
            }
        };
        if !keep || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// What a request path names.
enum Route {
    /// `/api/v1/pods` (None) or `/api/v1/namespaces/NS/pods`.
    Pods(Option<String>),
    /// `/api/v1/namespaces/NS/pods/NAME`: NS/NAME.
    Pod(String),
    /// `.../pods/NAME/log`.
    Log(String),
    /// `.../pods/NAME[:PORT]/proxy/REST`: the API server's pod proxy.
    Proxy {
        pod: String,
        port: Option<u16>,
        rest: String,
    },
    /// Any other kind: a list (all namespaces, one namespace) or one object.
    Objects {
        collection: String,
        namespace: Option<String>,
        name: Option<String>,
    },
    Unknown,
}

impl Route {
    fn of(path: &str) -> Route {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (group, rest) = match segs.first() {
            Some(&"api") if segs.len() >= 2 => (segs[..2].join("/"), &segs[2..]),
            Some(&"apis") if segs.len() >= 3 => (segs[..3].join("/"), &segs[3..]),
            _ => return Route::Unknown,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let Some((&resource, rest)) = rest.split_first() else {
            return Route::Unknown;
        };
        if group == "api/v1" && resource == "pods" {
            return match (namespace, rest) {
                (ns, []) => Route::Pods(ns),
                (Some(ns), [name]) => Route::Pod(format!("{ns}/{name}")),
                (Some(ns), [name, "log"]) => Route::Log(format!("{ns}/{name}")),
                (Some(ns), [target, "proxy", rest @ ..]) => {
                    let (name, port) = match target.split_once(':') {
                        Some((n, p)) => (n, p.parse().ok()),
                        None => (*target, None),
                    };
                    Route::Proxy {
                        pod: format!("{ns}/{name}"),
                        port,
                        rest: format!("/{}", rest.join("/")),
                    }
                }
                _ => Route::Unknown,
            };
        }
        match rest {
            [] => Route::Objects {
                collection: format!("{group}/{resource}"),
                namespace,
                name: None,
            },
            [name] => Route::Objects {
                collection: format!("{group}/{resource}"),
                namespace,
                name: Some(name.to_string()),
            },
            _ => Route::Unknown,
        }
    }
}

/// Whether `labels` satisfy a label selector (`k=v`, `k==v`, `k!=v`, `k`,
/// `!k`, comma-separated). Set-based selectors are an error the test sees.
fn labels_match(labels: &Value, selector: &str) -> Result<bool, String> {
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if term.contains(" in ") || term.contains(" notin ") || term.contains('(') {
            return Err(format!("the fake does not understand selector {term:?}"));
        }
        let ok = if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels[k.trim()].as_str() == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            labels.get(k).is_none()
        } else {
            labels.get(term).is_some()
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn remove_shared(shared: &Shared, namespace: &str, name: &str) -> Option<Value> {
    let pod = {
        let mut st = shared.store();
        let mut pod = st.pods.remove(&format!("{namespace}/{name}"))?;
        st.rv += 1;
        let rv = st.rv;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history.push(HistoryEvent {
            rv,
            kind: "DELETED",
            object: pod.clone(),
        });
        pod
    };
    shared.wake();
    Some(pod)
}

async fn create_pod(
    stream: &mut TcpStream,
    shared: &Shared,
    req: &mut Request,
    namespace: &str,
    body: &[u8],
) -> bool {
    let mut pod: Value = match serde_json::from_slice(body) {
        Ok(p) => p,
        Err(e) => {
            req.status = 400;
            shared.record(req.clone());
            return respond_status(stream, 400, "BadRequest", &format!("pod body: {e}")).await;
        }
    };
    let made: Result<Value, (u16, &str, String)> = (|| {
        let mut st = shared.store();
        if pod["metadata"]["name"].as_str().is_none() {
            let Some(prefix) = pod["metadata"]["generateName"].as_str().map(String::from) else {
                return Err((
                    422,
                    "Invalid",
                    "name or generateName is required".to_string(),
                ));
            };
            st.generated += 1;
            pod["metadata"]["name"] = json!(format!("{prefix}{:05x}", st.generated));
        }
        pod["metadata"]["namespace"] = json!(namespace);
        pod["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", st.rv));
        if pod.get("status").is_none() {
            pod["status"] = json!({"phase": "Pending"});
        }
        let key = key_of(&pod);
        if st.pods.contains_key(&key) {
            return Err((409, "AlreadyExists", format!("pods {key:?} already exists")));
        }
        st.rv += 1;
        let rv = st.rv;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.pods.insert(key.clone(), pod.clone());
        st.history.push(HistoryEvent {
            rv,
            kind: "ADDED",
            object: pod.clone(),
        });
        st.created.push(key);
        Ok(pod.clone())
    })();
    let pod = match made {
        Ok(p) => p,
        Err((code, reason, msg)) => {
            req.status = code;
            shared.record(req.clone());
            return respond_status(stream, code, reason, &msg).await;
        }
    };
    shared.wake();
    req.status = 201;
    shared.record(req.clone());
    respond_json(stream, 201, &pod).await
}

async fn get_objects(
    stream: &mut TcpStream,
    shared: &Shared,
    req: &mut Request,
    collection: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let selector = req.query.get("labelSelector").cloned().unwrap_or_default();
    let (rv, found) = {
        let st = shared.store();
        let all = st.objects.get(collection);
        let found: Result<Vec<Value>, String> = all
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|o| namespace.is_none() || o["metadata"]["namespace"].as_str() == namespace)
            .filter(|o| name.is_none() || o["metadata"]["name"].as_str() == name)
            .filter_map(
                |o| match labels_match(&o["metadata"]["labels"], &selector) {
                    Ok(true) => Some(Ok(o.clone())),
                    Ok(false) => None,
                    Err(e) => Some(Err(e)),
                },
            )
            .collect();
        (st.rv, found)
    };
    let found = match found {
        Ok(f) => f,
        Err(e) => {
            req.status = 400;
            shared.record(req.clone());
            return respond_status(stream, 400, "BadRequest", &e).await;
        }
    };
    if let Some(name) = name {
        req.status = if found.is_empty() { 404 } else { 200 };
        shared.record(req.clone());
        return match found.into_iter().next() {
            Some(o) => respond_json(stream, 200, &o).await,
            None => {
                respond_status(
                    stream,
                    404,
                    "NotFound",
                    &format!("{collection} {name:?} not found"),
                )
                .await
            }
        };
    }
    shared.record(req.clone());
    let kind = found
        .first()
        .and_then(|o| o["kind"].as_str())
        .map_or_else(|| "List".to_string(), |k| format!("{k}List"));
    let body = json!({
        "kind": kind,
        "apiVersion": collection.trim_start_matches("apis/").trim_start_matches("api/").rsplit_once('/').map_or("v1", |(g, _)| g),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": found.iter().map(list_item).collect::<Vec<_>>(),
    });
    respond_json(stream, 200, &body).await
}

/// The pod proxy: forwards a GET to the pod's IP and port, as the API
/// server does for `kubectl get --raw .../pods/NAME:PORT/proxy/PATH`.
async fn proxy(
    stream: &mut TcpStream,
    shared: &Shared,
    req: &mut Request,
    pod: &str,
    port: Option<u16>,
    rest: &str,
) -> bool {
    let ip = shared
        .store()
        .pods
        .get(pod)
        .and_then(|p| p["status"]["podIP"].as_str().map(String::from));
    let (Some(ip), Some(port)) = (ip, port) else {
        req.status = 503;
        shared.record(req.clone());
        let msg = format!("pod {pod:?} has no IP, or no port was given");
        return respond_status(stream, 503, "ServiceUnavailable", &msg).await;
    };
    let answer = async {
        let mut up = TcpStream::connect((ip.as_str(), port)).await?;
        let head = format!("GET {rest} HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\n\r\n");
        up.write_all(head.as_bytes()).await?;
        let mut all = Vec::new();
        up.read_to_end(&mut all).await?;
        Ok::<_, std::io::Error>(all)
    };
    let all = match tokio::time::timeout(Duration::from_secs(10), answer).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            req.status = 503;
            shared.record(req.clone());
            let msg = format!("error trying to reach service: dial tcp {ip}:{port}: {e}");
            return respond_status(stream, 503, "ServiceUnavailable", &msg).await;
        }
        Err(_) => {
            req.status = 504;
            shared.record(req.clone());
            return respond_status(stream, 504, "Timeout", "the pod did not answer in 10 s").await;
        }
    };
    let text = String::from_utf8_lossy(&all);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(502);
    req.status = code;
    shared.record(req.clone());
    respond_raw(stream, code, "application/octet-stream", body.as_bytes()).await
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
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        422 => "Unprocessable Entity",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
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

async fn respond_raw(stream: &mut TcpStream, code: u16, content_type: &str, body: &[u8]) -> bool {
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        reason_phrase(code),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.is_ok() && stream.write_all(body).await.is_ok()
}

async fn respond_text(stream: &mut TcpStream, code: u16, text: &str) -> bool {
    respond_raw(stream, code, "text/plain", text.as_bytes()).await
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

async fn list_pods(
    stream: &mut TcpStream,
    shared: &Shared,
    req: &mut Request,
    namespace: Option<&str>,
) -> bool {
    let selector = req.query.get("labelSelector").cloned().unwrap_or_default();
    if let Err(e) = labels_match(&Value::Null, &selector) {
        req.status = 400;
        shared.record(req.clone());
        return respond_status(stream, 400, "BadRequest", &e).await;
    }
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
            .filter(|p| namespace.is_none() || p["metadata"]["namespace"].as_str() == namespace)
            .filter(|p| labels_match(&p["metadata"]["labels"], &selector) == Ok(true))
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

/// A stand-in for the kubelets of the fake cluster's nodes: runs the pods
/// created through the API (`meshlane check --pre`'s probe pods) on this
/// machine, as a container runtime would run them on their node, and
/// reports back through the API (status, log), as a kubelet does.
///
/// The container's command runs with its image's binaries taken from this
/// build (`/usr/local/bin/NAME` is the built NAME), and each hostPath
/// volume is the directory `host_paths` names for that path (a bind mount
/// in a real runtime; here the mount path in the arguments is replaced by
/// it).
#[derive(Clone, Debug, Default)]
pub struct Kubelet {
    pub host_paths: BTreeMap<String, std::path::PathBuf>,
    /// Nodes whose image pulls fail (`ErrImagePull`, the pod stays Pending).
    pub pull_fails: std::collections::BTreeSet<String>,
}

impl Kubelet {
    /// Runs every pod created since the last call, to completion; returns
    /// their NAMESPACE/NAMEs.
    pub fn run_created(&self, api: &FakeApi) -> Result<Vec<String>> {
        let created = api.take_created();
        for key in &created {
            let (ns, name) = key.split_once('/').expect("NAMESPACE/NAME");
            let Some(mut pod) = api.pod(ns, name) else {
                continue;
            };
            let node = pod["spec"]["nodeName"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let container = pod["spec"]["containers"][0].clone();
            let cname = container["name"].clone();
            if self.pull_fails.contains(&node) {
                pod["status"] = json!({"phase": "Pending", "containerStatuses": [{
                    "name": cname, "ready": false, "restartCount": 0, "image": container["image"], "imageID": "",
                    "state": {"waiting": {"reason": "ErrImagePull", "message": format!("pull access denied for {}", container["image"])}}}]});
                api.apply(pod);
                continue;
            }
            let (code, log) = self.run(&pod["spec"], &container)?;
            api.set_log(ns, name, &log);
            pod["status"] = json!({"phase": if code == 0 { "Succeeded" } else { "Failed" }, "containerStatuses": [{
                "name": cname, "ready": false, "restartCount": 0, "image": container["image"], "imageID": "",
                "state": {"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }}}}]});
            api.apply(pod);
        }
        Ok(created)
    }

    /// Runs one container; its exit code and its log (stdout, then stderr).
    fn run(&self, spec: &Value, container: &Value) -> Result<(i32, String)> {
        let words: Vec<String> = container["command"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(container["args"].as_array().into_iter().flatten())
            .filter_map(|w| w.as_str().map(String::from))
            .collect();
        let (bin, args) = words
            .split_first()
            .context("a container without a command")?;
        let built = crate::meshlane_bin().with_file_name(
            bin.strip_prefix("/usr/local/bin/")
                .with_context(|| format!("the image has no {bin}"))?,
        );
        // Each volume mount: the mount path, and what stands for its hostPath here.
        let mounts: Vec<(String, String)> = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let vol = spec["volumes"]
                    .as_array()?
                    .iter()
                    .find(|v| v["name"] == m["name"])?;
                let host = vol["hostPath"]["path"].as_str()?;
                let here = self
                    .host_paths
                    .get(host)
                    .map_or_else(|| host.to_string(), |p| p.display().to_string());
                Some((m["mountPath"].as_str()?.to_string(), here))
            })
            .collect();
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                mounts
                    .iter()
                    .fold(a.clone(), |a, (at, here)| a.replace(at.as_str(), here))
            })
            .collect();
        let out = std::process::Command::new("timeout")
            .arg("60")
            .arg(&built)
            .args(&args)
            .env("MESHLANE_LOG", "warn")
            .output()
            .with_context(|| format!("running {}", built.display()))?;
        let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
        log.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.code().unwrap_or(-1), log))
    }
}

//! `/healthz`, `/readyz` and `/status` (the JSON of `meshlane status -o
//! json`, for `meshlane check`) on `--http-addr`, and `/metrics` there too or
//! on `--metrics-addr`.
//!
//! Served with hyper's HTTP/1.1 server: kube already links hyper 1 (as a
//! client), so the server half costs a feature flag, not a framework, and a
//! real HTTP implementation is more robust against odd probes and scrapers
//! (pipelining, slow clients, bad requests) than a hand-written responder.
//!
//! Each listener has an OS thread and a single-threaded runtime of its own,
//! and answers only from what the agent's loop and the metrics sampler
//! published: no client, however many or fast, takes time from the loop
//! that captures pods. Connections are capped per listener, so scrapers on
//! their own listener never queue ahead of the kubelet's probes.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, error, info, warn};

use crate::{
    health::{liveness, readiness, Shared},
    sampler::Sampler,
};

/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection is kept longer, whatever it does.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Connections served at once on one listener; more wait in its backlog.
const MAX_CONNECTIONS: usize = 32;

/// Where `/metrics` is served and how often its page reads the kernel's maps.
#[derive(Clone, Debug, clap::Args, serde::Serialize)]
pub struct MetricsOptions {
    /// Serve /metrics here instead of on --http-addr, which keeps /healthz
    /// and /readyz: 127.0.0.1:PORT for scrapers on the node only, the node's
    /// IP for a Prometheus elsewhere.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// Shortest time between two readings of the kernel's maps for /metrics
    /// (0 to 60). A scrape waits for a reading that starts after it
    /// arrives; one reading answers all scrapes waiting for it.
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = seconds)]
    #[serde(serialize_with = "as_seconds")]
    pub metrics_interval: Duration,
}

fn seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| (0.0..=60.0).contains(v))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?}: give a number of seconds from 0 to 60"))
}

fn as_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// What a listener answers.
#[derive(Clone, Copy, Debug)]
enum Routes {
    Probes,
    Metrics,
    All,
}

impl Routes {
    fn probes(self) -> bool {
        matches!(self, Routes::Probes | Routes::All)
    }
    fn metrics(self) -> bool {
        matches!(self, Routes::Metrics | Routes::All)
    }
    fn paths(self) -> &'static str {
        match self {
            Routes::Probes => "/healthz, /readyz, /status",
            Routes::Metrics => "/metrics",
            Routes::All => "/healthz, /readyz, /status, /metrics",
        }
    }
}

/// The listening sockets, bound before anything is attached so that a port
/// in use is an error at start.
pub struct Server {
    http: std::net::TcpListener,
    metrics: Option<std::net::TcpListener>,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
}

fn listen(addr: SocketAddr, flag: &str) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .with_context(|| format!("{flag} {addr}: cannot listen"))?;
    Ok(l)
}

impl Server {
    pub fn bind(http_addr: SocketAddr, metrics: &MetricsOptions) -> Result<Self> {
        let http = listen(http_addr, "--http-addr")?;
        let addr = http.local_addr()?;
        let metrics = metrics
            .metrics_addr
            .map(|a| listen(a, "--metrics-addr"))
            .transpose()?;
        let metrics_addr = match &metrics {
            Some(m) => m.local_addr()?,
            None => addr,
        };
        Ok(Self {
            http,
            metrics,
            addr,
            metrics_addr,
        })
    }

    /// Serves until the process exits.
    pub fn start(self, health: Shared, pages: Sampler, status: Sampler) -> Result<()> {
        let app = App {
            health,
            pages,
            status,
        };
        match self.metrics {
            Some(m) => {
                serve(self.http, Routes::Probes, app.clone())?;
                serve(m, Routes::Metrics, app)
            }
            None => serve(self.http, Routes::All, app),
        }
    }
}

fn serve(listener: std::net::TcpListener, routes: Routes, app: App) -> Result<()> {
    let addr = listener.local_addr()?;
    info!(%addr, "serving {}", routes.paths());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || rt.block_on(accept(listener, routes, app)))
        .with_context(|| format!("starting the HTTP thread for {addr}"))?;
    Ok(())
}

async fn accept(listener: std::net::TcpListener, routes: Routes, app: App) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            error!("http: cannot serve {}: {e}", routes.paths());
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: keep the listener, try again.
                warn!("http accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.respond(&req, routes).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, "http connection: {e}"),
                Err(_) => debug!(%peer, "http connection closed after {CONNECTION_LIFETIME:?}"),
            }
            drop(slot);
        });
    }
}

fn text(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// What the answers read: the agent's published health and the samplers'
/// pages.
#[derive(Clone)]
struct App {
    health: Shared,
    pages: Sampler,
    status: Sampler,
}

impl App {
    async fn respond<B>(&self, req: &Request<B>, routes: Routes) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(405, "only GET\n".into());
        }
        match req.uri().path() {
            "/healthz" if routes.probes() => match liveness(&self.health.get()) {
                Ok(()) => text(200, "ok\n".into()),
                Err(why) => text(503, format!("{why}\n")),
            },
            "/readyz" if routes.probes() => match readiness(&self.health.get()) {
                Ok(()) => text(200, "ready\n".into()),
                Err(why) => text(503, format!("not ready: {why}\n")),
            },
            "/metrics" if routes.metrics() => match self.pages.page().await {
                Some(page) => Response::builder()
                    .status(200)
                    .header(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(Full::new(page.body))
                    .expect("static response parts are valid"),
                None => text(503, "no metrics page read yet\n".into()),
            },
            // `meshlane status -o json` of this node, for `meshlane check`
            // (through the API server's pod proxy). 200 whether healthy or
            // not: the document says which.
            "/status" if routes.probes() => match self.status.page().await {
                Some(page) => Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Full::new(page.body))
                    .expect("static response parts are valid"),
                None => text(503, "no status read yet\n".into()),
            },
            _ => text(404, format!("not found: {}\n", routes.paths())),
        }
    }
}

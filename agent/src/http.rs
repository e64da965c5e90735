//! `/healthz`, `/readyz` and `/metrics` on `--http-addr`.
//!
//! Served with hyper's HTTP/1.1 server: kube already links hyper 1 (as a
//! client), so the server half costs a feature flag, not a framework, and a
//! real HTTP implementation is more robust against odd probes and scrapers
//! (pipelining, slow clients, bad requests) than a hand-written responder.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{
    bpf::{Layout, Maps},
    health::{liveness, readiness, Shared},
    metrics,
};

const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The listening socket, bound before anything is attached so that a port
/// in use is an error at start.
pub struct Server {
    listener: TcpListener,
    pub addr: SocketAddr,
}

impl Server {
    pub async fn bind(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("--http-addr {addr}: cannot listen"))?;
        let addr = listener.local_addr()?;
        Ok(Self { listener, addr })
    }

    /// Serves until the process exits.
    pub fn start(self, health: Shared, layout: Layout) {
        info!(addr = %self.addr, "serving /healthz, /readyz and /metrics");
        let layout = Arc::new(layout);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match self.listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and the like: keep the listener, try again.
                        warn!("http accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (health, layout) = (health.clone(), layout.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let resp = respond(&req, &health, &layout);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    if let Err(e) = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                    {
                        debug!(%peer, "http connection: {e}");
                    }
                });
            }
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

fn respond<B>(req: &Request<B>, health: &Shared, layout: &Layout) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(405, "only GET\n".into());
    }
    let h = health
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match req.uri().path() {
        "/healthz" => match liveness(&h) {
            Ok(()) => text(200, "ok\n".into()),
            Err(why) => text(503, format!("{why}\n")),
        },
        "/readyz" => match readiness(&h) {
            Ok(()) => text(200, "ready\n".into()),
            Err(why) => text(503, format!("not ready: {why}\n")),
        },
        "/metrics" => {
            // The kernel's side is read at scrape time from the pinned maps.
            let kernel = Maps::open(layout).map_err(|e| format!("{e:#}"));
            let body = metrics::render(&h, kernel.as_ref().ok());
            drop(h);
            if let Err(e) = kernel {
                warn!("metrics: opening the pinned maps: {e}");
            }
            Response::builder()
                .status(200)
                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts are valid")
        }
        _ => text(404, "not found: /healthz, /readyz, /metrics\n".into()),
    }
}

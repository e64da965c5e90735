//! The pages `/metrics` serves, read on a thread of their own.
//!
//! A page needs the kernel's counters and the maps' occupancy, that is walks
//! over maps of up to 65,536 entries. Scrapes never read the maps
//! themselves: each asks the sampler for a page and waits for one whose
//! reading started after it asked. One reading answers every scrape that
//! arrived before it started, and readings start at least `interval` apart,
//! so however many clients scrape however fast, the maps are walked at most
//! once per interval, by this thread, never by the agent's loop.
use std::{
    path::PathBuf,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use hyper::body::Bytes;
use tokio::sync::watch;
use tracing::warn;

use crate::{
    bpf::{Layout, Maps},
    health::Shared,
    metrics, status,
};

/// A rendered `/metrics` page, and when the reading behind it started.
#[derive(Clone, Debug)]
pub struct Page {
    pub started: Instant,
    pub body: Bytes,
}

/// How long past the interval a scrape waits for its reading before it
/// takes the newest page there is.
const PATIENCE: Duration = Duration::from_secs(5);

/// Asks for pages and receives them; clones share the one sampler thread,
/// which ends when the last clone is dropped.
#[derive(Clone)]
pub struct Sampler {
    ask: mpsc::SyncSender<()>,
    pages: watch::Receiver<Option<Page>>,
    wait: Duration,
}

impl Sampler {
    /// Starts the thread that renders the agent's `health` and the maps
    /// pinned under `layout`.
    pub fn start(layout: Layout, health: Shared, interval: Duration) -> Result<Self> {
        Self::spawn(interval, move || {
            let maps = Maps::open(&layout);
            if let Err(e) = &maps {
                warn!("metrics: opening the pinned maps: {e:#}");
            }
            metrics::render(&health.get(), maps.as_ref().ok())
        })
    }

    /// Starts the thread that reads `meshlane status`'s report (JSON) of
    /// the maps pinned under `layout` and the status file in `state_dir`,
    /// for `/status`: what `meshlane check` asks each node's agent.
    pub fn start_status(layout: Layout, state_dir: PathBuf, interval: Duration) -> Result<Self> {
        Self::spawn_named("status", interval, move || {
            match status::report(&layout, &state_dir) {
                Ok(r) => serde_json::to_string(&r).unwrap_or_else(|e| unreadable(&e)),
                Err(e) => unreadable(&e),
            }
        })
    }

    fn spawn(interval: Duration, read: impl FnMut() -> String + Send + 'static) -> Result<Self> {
        Self::spawn_named("metrics", interval, read)
    }

    fn spawn_named(
        name: &str,
        interval: Duration,
        read: impl FnMut() -> String + Send + 'static,
    ) -> Result<Self> {
        // One slot: a request already waiting for a reading stands for all.
        let (ask, asked) = mpsc::sync_channel(1);
        let (tx, pages) = watch::channel(None);
        thread::Builder::new()
            .name(name.into())
            .spawn(move || sample(&asked, &tx, interval, read))
            .with_context(|| format!("starting the {name} sampler thread"))?;
        Ok(Self {
            ask,
            pages,
            wait: interval + PATIENCE,
        })
    }

    /// A page read after this call, or the newest one if none comes in
    /// time (None before the first).
    pub async fn page(&self) -> Option<Page> {
        let asked = Instant::now();
        // Full means a reading is asked for and has not started: it will
        // answer this request too.
        let _ = self.ask.try_send(());
        let mut pages = self.pages.clone();
        let fresh = pages.wait_for(|p| p.as_ref().is_some_and(|p| p.started >= asked));
        if let Ok(Ok(p)) = tokio::time::timeout(self.wait, fresh).await {
            return p.clone();
        }
        let newest = pages.borrow().clone();
        newest
    }
}

/// `/status`'s answer when the state cannot be read: still JSON, with the
/// reason, and never `healthy`.
fn unreadable(e: &dyn std::fmt::Display) -> String {
    serde_json::json!({
        "schema": status::SCHEMA,
        "healthy": false,
        "error": format!("the agent cannot read its own state: {e:#}"),
    })
    .to_string()
}

/// The sampler thread: one reading per request that arrived since the last
/// one started, at least `interval` after it.
fn sample(
    asked: &mpsc::Receiver<()>,
    pages: &watch::Sender<Option<Page>>,
    interval: Duration,
    mut read: impl FnMut() -> String,
) {
    let mut last: Option<Instant> = None;
    while asked.recv().is_ok() {
        if let Some(last) = last {
            thread::sleep((last + interval).saturating_duration_since(Instant::now()));
        }
        // Whoever asked until now is answered by the reading starting now.
        while asked.try_recv().is_ok() {}
        let started = Instant::now();
        last = Some(started);
        let body = Bytes::from(read());
        pages.send_replace(Some(Page { started, body }));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    use super::*;

    fn counting(interval: Duration) -> (Sampler, Arc<AtomicUsize>) {
        let readings = Arc::new(AtomicUsize::new(0));
        let n = readings.clone();
        let s = Sampler::spawn(interval, move || {
            let i = n.fetch_add(1, Ordering::SeqCst) + 1;
            format!("reading {i}\n")
        })
        .expect("thread");
        (s, readings)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// 40 clients asking back to back for a second read the maps about
    /// once per interval, and each gets a page read after it asked.
    #[test]
    fn a_scrape_loop_costs_one_reading_per_interval() {
        let interval = Duration::from_millis(200);
        let (s, readings) = counting(interval);
        let run = Duration::from_secs(1);
        let pages = runtime().block_on(async {
            let clients: Vec<_> = (0..40)
                .map(|_| {
                    let s = s.clone();
                    tokio::spawn(async move {
                        let end = Instant::now() + run;
                        let mut got = 0;
                        while Instant::now() < end {
                            let asked = Instant::now();
                            let p = s.page().await.expect("a page");
                            assert!(p.started >= asked, "a page read before the scrape");
                            got += 1;
                        }
                        got
                    })
                })
                .collect();
            let mut pages = 0;
            for c in clients {
                pages += c.await.expect("client");
            }
            pages
        });
        let n = readings.load(Ordering::SeqCst);
        // One at the start, one per interval, and the last ones' wait.
        let most = (run.as_millis() / interval.as_millis()) as usize + 2;
        assert!(
            n <= most,
            "{n} readings for {pages} pages in {run:?} (at most {most})"
        );
        assert!(pages >= 40, "every client got pages: {pages}");
    }

    /// With no interval every scrape still gets its own fresh reading, and
    /// consecutive scrapes see readings in order.
    #[test]
    fn each_page_is_read_after_its_request() {
        let (s, readings) = counting(Duration::ZERO);
        runtime().block_on(async {
            for i in 1..=5 {
                let p = s.page().await.expect("a page");
                assert_eq!(p.body, Bytes::from(format!("reading {i}\n")));
            }
        });
        assert_eq!(readings.load(Ordering::SeqCst), 5);
    }
}

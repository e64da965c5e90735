//! Where the agent learns the node's pods: a pods file (tests, VMs, a node
//! without an API server) or the Kubernetes API server (`k8s`).
//!
//! Both hand the agent the same thing, a [`Snapshot`] of `pods::Pod`s read by
//! the same code (`pods.rs`), through a `tokio::sync::watch` channel: the
//! agent reconciles as soon as a snapshot changes, and a source that is in
//! trouble keeps its last good pods in the snapshot and only sets `error`.
use std::path::PathBuf;

use anyhow::Result;
use tokio::sync::watch;
use tracing::{error, info};

use crate::{k8s, pods};

/// The pod source `meshlane run` was given.
pub enum Source {
    /// `--pods FILE`, read every [`FILE_POLL`].
    File(PathBuf),
    /// This node's pods from the API server.
    Kubernetes(k8s::Options),
}

/// What a source knows now.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub pods: Vec<pods::Pod>,
    /// A complete view has arrived at least once (the file parsed, or the
    /// first list from the API server was applied): until then the agent is
    /// not ready.
    pub synced: bool,
    /// The source's current trouble; `pods` is the last good state.
    pub error: Option<String>,
    /// Errors met since the start (failed reads, watch errors).
    pub errors: u64,
}

/// How often the pods file is looked at; a change applies within a second.
pub const FILE_POLL: std::time::Duration = std::time::Duration::from_millis(200);

impl Source {
    /// How status shows the source.
    pub fn describe(&self) -> String {
        match self {
            Source::File(p) => format!("file {}", p.display()),
            Source::Kubernetes(o) => format!("kubernetes (node {})", o.node_name),
        }
    }

    /// The pods file, for the status field that predates other sources.
    pub fn file(&self) -> Option<&std::path::Path> {
        match self {
            Source::File(p) => Some(p),
            Source::Kubernetes(_) => None,
        }
    }

    /// Starts the source on the current tokio runtime. Configuration errors
    /// (an unreadable kubeconfig, say) come back here, before anything is
    /// attached; trouble later only ever shows in the snapshot.
    pub async fn spawn(&self) -> Result<watch::Receiver<Snapshot>> {
        let (tx, rx) = watch::channel(Snapshot::default());
        match self {
            Source::File(path) => {
                tokio::spawn(watch_file(path.clone(), tx));
            }
            Source::Kubernetes(opts) => k8s::spawn(opts, tx).await?,
        }
        Ok(rx)
    }
}

async fn watch_file(path: PathBuf, tx: watch::Sender<Snapshot>) {
    let mut tick = tokio::time::interval(FILE_POLL);
    let mut last: Option<Vec<u8>> = None;
    // Ends when the agent has gone (it holds the receiver).
    while !tx.is_closed() {
        tick.tick().await;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                let msg = format!("reading pods file {}: {e}", path.display());
                if tx.borrow().error.as_deref() != Some(msg.as_str()) {
                    error!("{msg}; keeping the last good pods");
                    last = None;
                    tx.send_modify(|s| {
                        s.error = Some(msg);
                        s.errors += 1;
                    });
                }
                continue;
            }
        };
        if last.as_deref() == Some(bytes.as_slice()) {
            continue;
        }
        let parsed = pods::parse(&String::from_utf8_lossy(&bytes));
        last = Some(bytes);
        match parsed {
            Ok(p) => {
                info!(pods = p.len(), "pods file loaded");
                tx.send_modify(|s| {
                    s.pods = p;
                    s.synced = true;
                    s.error = None;
                });
            }
            Err(e) => {
                let msg = format!("pods file {}: {e:#}", path.display());
                error!("{msg}; keeping the last good pods");
                tx.send_modify(|s| {
                    s.error = Some(msg);
                    s.errors += 1;
                });
            }
        }
    }
}

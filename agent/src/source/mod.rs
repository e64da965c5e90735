//! Where the agent learns the node's pods: a pods file (tests, VMs, a node
//! without an API server, `file.rs`) or the Kubernetes API server (`kube.rs`).
//!
//! Both hand the agent the same thing, a [`Snapshot`] of `pods::Pod`s read by
//! the same code (`pods.rs`), through a `tokio::sync::watch` channel: the
//! agent reconciles as soon as a snapshot changes, and a source that is in
//! trouble keeps its last good pods in the snapshot and only sets `error`.
use std::path::PathBuf;

use anyhow::Result;
use tokio::sync::watch;

mod file;
pub mod kube;
mod snapshot;

pub use file::FILE_POLL;
pub use snapshot::Snapshot;

/// The pod source `meshlane run` was given.
pub enum Source {
    /// `--pods FILE`, read every [`FILE_POLL`].
    File(PathBuf),
    /// This node's pods from the API server.
    Kubernetes(kube::Options),
}

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
                tokio::spawn(file::watch(path.clone(), tx));
            }
            Source::Kubernetes(opts) => kube::spawn(opts, tx).await?,
        }
        Ok(rx)
    }
}

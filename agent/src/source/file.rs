//! The pods file source: re-read on change, parse errors keep the last good pods.
use std::path::PathBuf;

use tokio::sync::watch;
use tracing::{error, info};

use super::snapshot::Snapshot;
use crate::pods;

/// How often the pods file is looked at; a change applies within a second.
pub const FILE_POLL: std::time::Duration = std::time::Duration::from_millis(200);

pub(super) async fn watch(path: PathBuf, tx: watch::Sender<Snapshot>) {
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

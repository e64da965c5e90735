//! Capture from the first packet: `meshlane-cni`, a chained CNI plugin,
//! tells the agent about each pod sandbox the runtime creates before any of
//! the pod's containers runs, and fails the sandbox of a meshed pod the
//! agent cannot confirm captured (the runtime retries it).
//!
//! - `proto`: the messages on the agent's socket, shared by both ends;
//! - `registry`: what the runtime registered, and how it binds a pod to the
//!   namespace the runtime named (pure);
//! - `server`: the agent's end of the socket;
//! - `spec`: the CNI specification's side (config, environment, results,
//!   error codes);
//! - `plugin`: the `meshlane-cni` binary's logic;
//! - `install`: `meshlane-cni install|uninstall`, which the DaemonSet runs to
//!   chain the plugin into the node's primary conflist.
//!
//! When the agent cannot be reached, the plugin decides by reading the pod
//! itself from the pod source named in its network config (`podSource`: the
//! agent's pods file or a kubeconfig): an unmeshed pod starts, a meshed pod
//! waits (bounded) for the agent and then fails, and a pod it cannot read
//! fails (see `plugin.rs`).
use std::{os::unix::fs::MetadataExt, path::Path};

use anyhow::{Context, Result};

pub mod install;
pub mod plugin;
pub mod proto;
mod registry;
pub mod server;
pub mod spec;

pub use registry::{Registration, Registry};

use crate::netns::{self, Netns};

/// The namespace at `path` (a runtime's CNI_NETNS), read as the scan reads
/// every namespace.
pub fn inspect(path: &Path) -> Result<Netns> {
    let inode = std::fs::metadata(path)
        .with_context(|| format!("network namespace {} (CNI_NETNS)", path.display()))?
        .ino();
    netns::inspect(vec![(inode, path.to_path_buf())])?
        .pop()
        .with_context(|| {
            format!(
                "network namespace {} (CNI_NETNS) cannot be entered",
                path.display()
            )
        })
}

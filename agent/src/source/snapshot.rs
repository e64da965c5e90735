//! What a pod source hands the agent.
use crate::pods;

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

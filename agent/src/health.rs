//! What the agent's loop tells the world about itself: attached, synced,
//! its pods, its errors, and when it last went round. /healthz, /readyz and
//! /metrics read it; the loop replaces it after every round.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::status::PodStatus;

/// What the agent tells the endpoints, updated after every reconcile.
#[derive(Clone, Debug)]
pub struct Health {
    /// The programs are attached (set once `Agent::start` has succeeded).
    pub attached: bool,
    /// The first complete pod list from the source has been applied.
    pub synced: bool,
    pub source_error: Option<String>,
    pub source_errors: u64,
    pub map_update_errors: u64,
    pub pods: Vec<PodStatus>,
    /// When the agent's loop last went round; a stuck loop fails /healthz.
    pub heartbeat: Instant,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            attached: false,
            synced: false,
            source_error: None,
            source_errors: 0,
            map_update_errors: 0,
            pods: Vec::new(),
            heartbeat: Instant::now(),
        }
    }
}

/// The newest [`Health`], replaced whole by the agent's loop. Readers take a
/// reference-counted copy and hold no lock while they work with it: however
/// many clients the endpoints serve, the loop only ever waits for a pointer
/// swap.
#[derive(Clone, Default)]
pub struct Shared(Arc<Mutex<Arc<Health>>>);

impl Shared {
    pub fn get(&self) -> Arc<Health> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set(&self, h: Health) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(h);
    }
}

/// The agent's loop goes round at least every few hundred milliseconds; this
/// long without a round means it is stuck.
const STUCK_AFTER: Duration = Duration::from_secs(10);
/// Alive: the loop went round recently.
pub fn liveness(h: &Health) -> Result<(), String> {
    let since = h.heartbeat.elapsed();
    if since > STUCK_AFTER {
        return Err(format!(
            "agent loop has not run for {:.1}s",
            since.as_secs_f64()
        ));
    }
    Ok(())
}

/// Ready: programs attached and the first complete pod list applied.
pub fn readiness(h: &Health) -> Result<(), String> {
    if !h.attached {
        return Err("programs not attached yet".into());
    }
    if !h.synced {
        return Err(match &h.source_error {
            Some(e) => format!("no pod list applied yet ({e})"),
            None => "no pod list applied yet".into(),
        });
    }
    Ok(())
}

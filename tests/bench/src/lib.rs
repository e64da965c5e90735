//! The benchmark behind `cargo xtask bench`: meshlane against iptables and
//! against no interception, with the same sidecar, in one run on one machine.
//!
//! * [`client`] and [`server`]: the load generator (`mbench client`,
//!   `mbench server`) and its wire format ([`proto`]), latency in [`hist`];
//! * [`run`]: the testbeds (one sandbox node per kind of interception) and the
//!   schedule (modes interleaved per repetition, then the scale runs);
//! * [`sys`]: CPU, memory, conntrack and BPF map readings;
//! * [`report`]: medians, ratios, goals, Markdown, JSON and SVG.

pub mod client;
pub mod hist;
pub mod proto;
pub mod report;
pub mod run;
pub mod server;
pub mod sys;

//! meshlane's node agent as a library: the `meshlane` binary is its command
//! line (`cli`), and tests and xtask use the same modules.
//!
//! By concern, each importing only those listed before it:
//! - `logging`, `output`: how log lines and command output look (text,
//!   JSON, YAML);
//! - `host`: facts of the machine (cgroup v2 mount, kernel release);
//! - `istio`: Istio's annotation, environment and container names;
//! - `pods`, `podconfig`: Pod objects, and their annotations as map entries;
//! - `iptables`: the rules Istio would write for a pod, for comparison;
//! - `source`: where pods come from (a file or the API server);
//! - `netns`: finding pods' network namespaces;
//! - `bpf`: the kernel objects (layout, load/adopt, maps, raw calls);
//! - `probe`: what the kernel offers against what the object needs;
//! - `listeners`: proxy listeners older than the programs;
//! - `status`, `reconcile`: pods' states, and the pure plan of a round;
//! - `health`, `metrics`, `sampler`, `http`: what the agent shows on its
//!   ports (`sampler` reads the maps for `/metrics` off the agent's loop);
//! - `cni`: the chained CNI plugin and the agent's socket for it;
//! - `agent`: the loop; `check`: the cluster-wide view (`meshlane check`,
//!   reading agents' `status` documents and nodes' `probe` reports through
//!   the API server); `cli`: the commands.
pub mod agent;
pub mod bpf;
pub mod check;
pub mod cli;
pub mod cni;
pub mod describe;
pub mod health;
pub mod host;
pub mod http;
pub mod iptables;
pub mod istio;
pub mod listeners;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod output;
pub mod podconfig;
pub mod pods;
pub mod probe;
pub mod reconcile;
pub mod sampler;
pub mod source;
pub mod status;
pub mod userns;

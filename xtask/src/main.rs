//! `cargo xtask`: set-up, build, test and demo for meshlane.
//!
//! Every command first installs what is missing (Debian packages, the
//! nightly's rust-src, bpf-linker built against LLVM 22) and says what it is
//! doing; running it again does nothing it already did.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use meshlane_tests::chart::{self, PythonTools};

mod bench;
mod demo;
mod vmtest;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the build and test dependencies (idempotent).
    Setup,
    /// Build the kernel programs (nightly, bpfel-unknown-none, bpf-linker).
    BuildEbpf,
    /// Build everything and run the unit and namespaced integration tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build, then run meshlane on a sandbox node and show where traffic goes.
    Demo,
    /// Run the conformance suite (Istio's real rules vs meshlane, every golden case) and print its tables.
    Conformance,
    /// Render deploy/chart/meshlane with its default values into deploy/manifests.
    RenderManifests,
    /// Boot other kernels under qemu and run the namespaced integration suite in each (see xtask/src/vmtest/).
    VmTest(vmtest::Opts),
    /// Benchmark meshlane against iptables and against no interception (release build).
    Bench(bench::Args),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::RenderManifests => {
            let tools = setup_python_tools()?;
            for p in chart::write_manifests(&tools)? {
                say(&format!("wrote {}", p.display()));
            }
            Ok(())
        }
        Cmd::BuildEbpf => {
            setup()?;
            build_ebpf()
        }
        Cmd::Test { args } => {
            setup()?;
            build_all()?;
            test(&args)
        }
        Cmd::Demo => {
            setup()?;
            build_all()?;
            demo::run()
        }
        Cmd::VmTest(opts) => {
            setup()?;
            build_all()?;
            vmtest::run_vm_test(&opts)
        }
        Cmd::Bench(args) => {
            setup()?;
            build_ebpf()?;
            bench::bench(&args)
        }
        Cmd::Conformance => {
            setup()?;
            build_all()?;
            say("conformance: every golden case under iptables-restore and under meshlane");
            run(Command::new("cargo")
                .args([
                    "test",
                    "-p",
                    "meshlane-tests",
                    "--test",
                    "conformance",
                    "--",
                    "--nocapture",
                ])
                .current_dir(root()))
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

pub fn say(msg: &str) {
    eprintln!("\x1b[1mxtask:\x1b[0m {msg}");
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Debian packages: LLVM 22 for bpf-linker, and the tools the tests and demo
/// drive (ip, iptables for the conformance comparison, bpftool to inspect,
/// haproxy as a real SO_ORIGINAL_DST-reading proxy, the CNI plugins).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "haproxy",
    "iperf3",
    // tests/tests/cni.rs: the bridge, host-local and loopback plugins a
    // runtime chains meshlane-cni after (/usr/lib/cni).
    "containernetworking-plugins",
    // tests/tests/cni.rs: a real runtime starting a container through the chain.
    "podman",
    "runc",
    "curl",
    "python3",
    // The venv of the chart tools (helm-python-sdk, kubernetes-validate, checkov).
    "python3-venv",
    // `cargo xtask vm-test`: qemu (TCG), a static busybox for the guest's
    // initramfs, and the decompressors for Debian's kernel modules.
    "qemu-system-x86",
    "busybox-static",
    "xz-utils",
    "zstd",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// What a build from scratch writes under target/ (workspace, kernel programs,
/// the VM row's kernel and initramfs), with room to spare. A full disk shows up
/// deep in the linker as a truncated `cc` failure; say it up front instead.
const NEEDED_FREE_BYTES: u64 = 6 << 30;

fn check_free_space() -> Result<()> {
    let dir = root();
    let st =
        nix::sys::statvfs::statvfs(&dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if free < NEEDED_FREE_BYTES {
        bail!(
            "only {:.1} GiB free on the file system of {} (a build and test run needs about {:.0} GiB): \
             free some space (old target/ directories, clones under /tmp) and run again",
            gib(free),
            dir.display(),
            gib(NEEDED_FREE_BYTES)
        );
    }
    say(&format!(
        "disk: {:.1} GiB free under {}",
        gib(free),
        dir.display()
    ));
    Ok(())
}

fn setup() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("meshlane's set-up and tests load eBPF programs and create network namespaces: run as root");
    }
    check_free_space()?;
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        say("apt packages: all present");
    } else {
        say(&format!("installing apt packages: {}", missing.join(" ")));
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let has_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        });
    if has_src {
        say("nightly rust-src: present");
    } else {
        say("adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if linker_ok {
        say(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
    } else {
        say(&format!(
            "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        ));
        run(Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
        .or_else(|_| {
            // Without --locked if the lock file pins something this toolchain refuses.
            run(Command::new("cargo")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
        })?;
    }
    setup_python_tools()?;
    Ok(())
}

/// The chart tests' Python packages (`chart::PYTHON_TOOLS`: Helm's engine,
/// the Kubernetes schemas, the PodMonitor CRD's models, checkov) in a venv
/// of their own, rebuilt only when the pinned list changes.
fn setup_python_tools() -> Result<PythonTools> {
    let dir = chart::python_tools_dir();
    if let Ok(tools) = PythonTools::find() {
        say(&format!("chart tools: present in {}", dir.display()));
        return Ok(tools);
    }
    say(&format!(
        "installing the chart tools ({}) into {} (about a minute)",
        chart::PYTHON_TOOLS.join(" "),
        dir.display()
    ));
    // The stamp is written last, so a broken install never looks present;
    // a stale or broken venv is replaced whole.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    run(Command::new(dir.join("bin/python3"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(chart::PYTHON_TOOLS))?;
    std::fs::write(
        dir.join(chart::PYTHON_TOOLS_STAMP),
        chart::python_tools_stamp(),
    )?;
    PythonTools::find()
}

/// A cargo for the nightly eBPF build, free of the variables the outer
/// (stable) cargo set for us.
fn nightly_cargo() -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly");
    for v in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        c.env_remove(v);
    }
    c
}

fn build_ebpf() -> Result<()> {
    let dir = root().join("ebpf/programs");
    say("building the kernel programs (ebpf/programs, nightly, bpfel-unknown-none)");
    run(nightly_cargo()
        .arg("build")
        .arg("--release")
        .current_dir(&dir))?;
    let obj = dir.join("target/bpfel-unknown-none/release/meshlane");
    if !obj.is_file() {
        bail!("expected the eBPF object at {}", obj.display());
    }
    say(&format!("eBPF object: {}", obj.display()));
    Ok(())
}

fn build_all() -> Result<()> {
    build_ebpf()?;
    say("building the agent (with the eBPF object embedded), the test sidecar and the tests");
    run(Command::new("cargo")
        .args(["build", "--workspace", "--bins"])
        .current_dir(root()))?;
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    say("running unit, property and integration tests (cargo test --workspace)");
    let mut child = Command::new("cargo")
        .env(chart::PYTHON_TOOLS_ENV, chart::python_tools_dir())
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    // Echo the output and add up every binary's "test result" line, so the
    // run ends with one total instead of the last binary's (often empty) doc-test line.
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let out = child.stdout.take().expect("piped");
    for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut w = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (w.next(), w.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match kind {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    // Kernel rows under qemu, only when asked: MESHLANE_VM_TEST=debian12
    // (comma-separated rows, as `vm-test --kernel`); .ci/run sets it.
    let vm_ok = match std::env::var("MESHLANE_VM_TEST") {
        Ok(rows) if !rows.trim().is_empty() => {
            let (p, f, s, ok) = vmtest::ci_rows(&rows)?;
            passed += p;
            failed += f;
            ignored += s;
            ok
        }
        _ => true,
    };
    // `cargo xtask bench --quick` once, so the benchmark cannot rot (no
    // thresholds: a run that completes passes).
    match bench::smoke() {
        Ok(()) => passed += 1,
        Err(e) => {
            eprintln!("bench smoke run failed: {e:#}");
            failed += 1;
        }
    }
    let ok = status.success() && vm_ok && failed == 0 && passed > 0;
    say(if ok {
        "all tests passed"
    } else {
        "TESTS FAILED"
    });
    // The total is the run's last line.
    if ignored > 0 {
        println!("meshlane: {passed} passed, {failed} failed, {ignored} skipped");
    } else {
        println!("meshlane: {passed} passed, {failed} failed");
    }
    if !ok {
        bail!("tests failed ({failed} failed, {passed} passed; cargo test exited with {status})");
    }
    Ok(())
}

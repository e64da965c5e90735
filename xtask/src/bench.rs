//! `cargo xtask bench`: builds release binaries and runs `mbench run`, which
//! measures meshlane against iptables and against no interception in one run
//! and writes results.json, results.md and one SVG per shape under
//! `<target>/bench/`. `--readme` puts the latest results.md into the bench
//! crate's README (tests/bench/README.md), between its bench markers.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{root, run, say};

#[derive(clap::Args)]
pub struct Args {
    /// A reduced run (under two minutes).
    #[arg(long)]
    quick: bool,
    /// The sidecar in every mode: test (mtest sidecar) or haproxy.
    #[arg(long, default_value = "test")]
    proxy: String,
    /// Modes (comma separated): direct, explicit, iptables, meshlane,
    /// meshlane+shortcut, meshlane+shortcut-app, unmeshed, ip6tables,
    /// meshlane-v6, iptables-dns, meshlane-dns.
    #[arg(long)]
    modes: Option<String>,
    /// Skip the kept-connections and churn runs.
    #[arg(long)]
    no_scale: bool,
    /// How idle CPUs wait during the run: poll (the default: no hypervisor
    /// round trip per wake-up, see tests/bench/README.md) or os (leave the
    /// machine as is).
    #[arg(long, default_value = "poll")]
    cpu_idle: String,
    /// Copy the results into tests/bench/README.md (between its bench
    /// markers) afterwards.
    #[arg(long)]
    readme: bool,
}

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";
/// Where `--readme` writes, relative to the repository root: the README of the
/// bench crate, beside the method it describes.
const BENCH_README: &str = "tests/bench/README.md";

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

pub fn bench(args: &Args) -> Result<()> {
    say("building release binaries (agent with the eBPF object, mtest, mbench)");
    run(Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "meshlane",
            "-p",
            "meshlane-tests",
            "-p",
            "meshlane-bench",
            "--bins",
        ])
        .current_dir(root()))?;
    let out = target_dir().join("bench");
    let mut cmd = Command::new(target_dir().join("release/mbench"));
    cmd.args([
        "run",
        "--proxy",
        &args.proxy,
        "--cpu-idle",
        &args.cpu_idle,
        "--out",
    ])
    .arg(&out);
    if args.quick {
        cmd.arg("--quick");
    }
    if let Some(m) = &args.modes {
        cmd.args(["--modes", m]);
    }
    if args.no_scale {
        cmd.arg("--no-scale");
    }
    run(&mut cmd)?;
    if args.readme {
        update_readme(&root().join(BENCH_README), &out.join("results.md"))?;
        say(&format!("{BENCH_README}: results updated"));
    }
    Ok(())
}

/// The quick bench with the debug binaries `cargo xtask test` just built, so
/// the bench cannot rot; it checks that every mode runs, not how fast.
pub fn smoke() -> Result<()> {
    say("bench smoke run (mbench run --quick, debug build; no thresholds)");
    let out = target_dir().join("bench-smoke");
    run(Command::new(target_dir().join("debug/mbench"))
        .args(["run", "--quick", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::null()))?;
    let md = std::fs::read_to_string(out.join("results.md")).with_context(|| {
        format!(
            "the smoke run wrote no {}",
            out.join("results.md").display()
        )
    })?;
    // Modes the code base cannot offer yet are reported as unavailable; a
    // mode that should work but produced no numbers is a failure.
    for must in [
        "| connection rate | connections/s |",
        "iptables",
        "explicit",
        // The run says how idle CPUs waited (held polling, or why not).
        "CPU idle: ",
        // The IPv6, DNS and unmeshed comparisons ran (their modes may be
        // n/a where the kernel or agent cannot offer them).
        "| meshlane-v6 vs ip6tables | connection rate |",
        "| meshlane-dns vs iptables-dns | UDP DNS query/answer |",
        "| unmeshed vs direct | getsockopt loop |",
    ] {
        if !md.contains(must) {
            bail!("the smoke run's results.md lacks {must:?}");
        }
    }
    Ok(())
}

/// Replaces what is between the bench markers in `readme` with `results`.
fn update_readme(readme: &Path, results: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let table = std::fs::read_to_string(results)
        .with_context(|| format!("reading {} (run the bench first)", results.display()))?;
    let new = splice(&text, &table)
        .with_context(|| format!("{} has no {BEGIN} ... {END} section", readme.display()))?;
    std::fs::write(readme, new).with_context(|| format!("writing {}", readme.display()))
}

fn splice(text: &str, table: &str) -> Option<String> {
    let a = text.find(BEGIN)? + BEGIN.len();
    let b = a + text[a..].find(END)?;
    Some(format!("{}\n{}\n{}", &text[..a], table.trim(), &text[b..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_the_section() {
        let readme = format!("# x\n\n## Benchmark\n{BEGIN}\nold\n{END}\n\n## Next\n");
        let out = splice(&readme, "| new |\n").unwrap();
        assert_eq!(
            out,
            format!("# x\n\n## Benchmark\n{BEGIN}\n| new |\n{END}\n\n## Next\n")
        );
        assert!(splice("no markers", "t").is_none());
    }
}

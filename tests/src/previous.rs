//! The `meshlane` agent of an earlier commit, built from this repository's
//! own history, for upgrade tests that need a real previous map layout.
//!
//! The commit is checked out with `git worktree add` into the target
//! directory, its kernel object and agent are built there (bounded in time),
//! the binary is kept under `target/previous-agent/<commit>/meshlane` and the
//! worktree removed. A second run finds the binary and builds nothing.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::workspace_root;

/// Longest a build of the previous agent may take (a cold build of the
/// kernel object and the agent takes a few minutes on 2 CPUs).
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Why a previous agent cannot be had here (the test skips loudly with it),
/// or its binary.
pub enum Previous {
    Built(PathBuf),
    Unavailable(String),
}

/// The target directory of the running test binary (`target/` holding
/// `debug/deps/<test>`), or `CARGO_TARGET_DIR`.
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("cannot read /proc/self/exe");
    exe.ancestors()
        .find(|a| a.join("CACHEDIR.TAG").is_file())
        .map_or_else(|| workspace_root().join("target"), Path::to_path_buf)
}

fn git(args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(workspace_root())
        .args(args)
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A cargo for a nested build: none of the variables `cargo test` set for
/// its test binaries (toolchain, target dir, flags) leak into it.
fn cargo(toolchain: Option<&str>, dir: &Path) -> Command {
    let mut c = Command::new("cargo");
    if let Some(t) = toolchain {
        c.arg(format!("+{t}"));
    }
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO") || k.starts_with("RUST") {
            c.env_remove(&k);
        }
    }
    c.current_dir(dir);
    c
}

/// Runs `c`, its output appended to `log`, killed after `deadline`.
fn run_bounded(mut c: Command, log: &Path, deadline: Instant, what: &str) -> Result<()> {
    let f = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut child = c
        .stdout(f.try_clone()?)
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    loop {
        if let Some(s) = child.try_wait()? {
            if s.success() {
                return Ok(());
            }
            bail!("{what} failed ({s}); see {}", log.display());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{what} took longer than {BUILD_TIMEOUT:?}; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Removes the worktree it holds, whatever happens to the build.
struct Worktree(PathBuf);

impl Drop for Worktree {
    fn drop(&mut self) {
        let _ = git(&[
            "worktree",
            "remove",
            "--force",
            &self.0.display().to_string(),
        ]);
        let _ = fs::remove_dir_all(&self.0);
        let _ = git(&["worktree", "prune"]);
    }
}

/// The agent of commit `rev` (any name git resolves), built if not cached.
pub fn agent_of(rev: &str) -> Result<Previous> {
    if git(&["rev-parse", "--is-inside-work-tree"]).is_err() {
        return Ok(Previous::Unavailable(format!(
            "{} is not a git checkout: the previous agent ({rev}) cannot be built",
            workspace_root().display()
        )));
    }
    let commit = match git(&[
        "rev-parse",
        "--verify",
        "--quiet",
        &format!("{rev}^{{commit}}"),
    ]) {
        Ok(c) if !c.is_empty() => c,
        _ => {
            return Ok(Previous::Unavailable(format!(
            "commit {rev} is not in this clone's history (a shallow clone? fetch with --unshallow)"
        )))
        }
    };
    let home = target_dir().join("previous-agent");
    let bin = home.join(&commit).join("meshlane");
    if bin.is_file() {
        return Ok(Previous::Built(bin));
    }
    fs::create_dir_all(&home)?;
    // One build at a time: tests run in parallel.
    let lock = fs::File::create(home.join("lock"))?;
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("locking the previous-agent build")?;
    if !bin.is_file() {
        build(&home, &commit, &bin)?;
    }
    Ok(Previous::Built(bin))
}

fn build(home: &Path, commit: &str, bin: &Path) -> Result<()> {
    let deadline = Instant::now() + BUILD_TIMEOUT;
    let src = home.join(format!("src-{commit}"));
    let log = home.join(format!("build-{commit}.log"));
    let _ = fs::remove_file(&log);
    if src.exists() {
        // Left by a build that was killed.
        drop(Worktree(src.clone()));
    }
    eprintln!(
        "building the agent of {commit} (log: {}); cached afterwards",
        log.display()
    );
    git(&[
        "worktree",
        "add",
        "--detach",
        &src.display().to_string(),
        commit,
    ])?;
    let tree = Worktree(src.clone());
    let mut ebpf = cargo(Some("nightly"), &src.join("ebpf/programs"));
    ebpf.args(["build", "--release"]);
    run_bounded(ebpf, &log, deadline, "building its kernel object")?;
    let mut agent = cargo(None, &src);
    // Its own target directory, kept: a rebuild of another commit reuses
    // the dependencies.
    agent
        .env("CARGO_TARGET_DIR", home.join("target"))
        .args(["build", "-p", "meshlane", "--bin", "meshlane"]);
    run_bounded(agent, &log, deadline, "building its agent")?;
    let built = home.join("target/debug/meshlane");
    let dir = bin.parent().expect("bin has a directory");
    fs::create_dir_all(dir)?;
    let tmp = dir.join("meshlane.tmp");
    fs::copy(&built, &tmp).with_context(|| format!("copying {}", built.display()))?;
    fs::rename(&tmp, bin)?;
    drop(tree);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit the clone lacks (a shallow CI clone) is a reason to skip,
    /// never a build attempt or a silent pass.
    #[test]
    fn a_commit_not_in_the_history_is_unavailable() {
        match agent_of("0123456789abcdef0123456789abcdef01234567").unwrap() {
            Previous::Unavailable(why) => assert!(
                why.contains("not in this clone's history") || why.contains("not a git checkout"),
                "{why}"
            ),
            Previous::Built(b) => panic!("built {}", b.display()),
        }
    }
}

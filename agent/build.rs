//! Embeds the kernel object built by `cargo xtask build-ebpf`, so the agent is
//! one self-contained binary (what a DaemonSet image wants). Without it the
//! agent still builds (plain `cargo build`/`clippy` on stable) and says at run
//! time how to get the object.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let default = manifest.join("../ebpf/programs/target/bpfel-unknown-none/release/meshlane");
    let src = env::var_os("MESHLANE_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-env-changed=MESHLANE_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", src.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("meshlane.bpf.o");
    let bytes = fs::read(&src).unwrap_or_default();
    if bytes.is_empty() {
        println!(
            "cargo:warning=eBPF object {} not found: this agent will need --ebpf-object (run `cargo xtask build-ebpf`)",
            src.display()
        );
    }
    fs::write(&out, bytes).unwrap();

    // The commit `meshlane_build_info` reports ("unknown" outside a git
    // checkout, e.g. an image built from a source tarball).
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(&manifest)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MESHLANE_GIT_COMMIT={commit}");
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/logs/HEAD");
    }
}

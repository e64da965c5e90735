//! Kernel rows: what `--kernel` names, resolved to a kernel image and its
//! modules (Debian packages fetched with apt-get and unpacked under
//! target/vm/kernels), or to the host run natively.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{run, say};

pub(super) enum Kernel {
    Image(Image),
    Native { release: String, why: String },
}

pub(super) struct Image {
    /// The row's label: what was asked for and what it resolved to.
    pub(super) label: String,
    pub(super) release: String,
    pub(super) vmlinuz: PathBuf,
    pub(super) modules: PathBuf,
}

impl Kernel {
    pub(super) fn resolve(spec: &str, work: &Path) -> Result<Kernel> {
        let kernels = work.join("kernels");
        fs::create_dir_all(&kernels)?;
        match spec {
            "host" => {
                let release = uname_r()?;
                let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{release}"));
                match fs::File::open(&vmlinuz) {
                    Ok(_) => {
                        let modules = PathBuf::from(format!("/lib/modules/{release}"));
                        Ok(Kernel::Image(Image {
                            label: format!("host {release}"),
                            release,
                            vmlinuz,
                            modules,
                        }))
                    }
                    Err(e) => Ok(Kernel::Native {
                        why: format!("{} is not readable ({e}): the host kernel cannot be booted under qemu, so this row runs on the host itself", vmlinuz.display()),
                        release,
                    }),
                }
            }
            "debian12" => {
                let apt = Apt::default();
                let pkg = meta_depends(&apt, "linux-image-amd64")?;
                Self::package(&apt, &format!("debian12 {pkg}"), &pkg, &kernels)
            }
            "newest" => {
                let apt = Apt::default();
                let meta = newest_series_meta()?;
                let pkg = meta_depends(&apt, &meta)?;
                Self::package(&apt, &format!("newest {pkg}"), &pkg, &kernels)
            }
            "debian11" => {
                let apt = Apt::bullseye(work)?;
                let pkg = meta_depends(&apt, "linux-image-amd64")?;
                Self::package(&apt, &format!("debian11 {pkg}"), &pkg, &kernels)
            }
            s if s.ends_with(".deb") => {
                let deb = fs::canonicalize(s).with_context(|| format!("--kernel {s}"))?;
                let stem = deb
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.split('_').next())
                    .unwrap_or("kernel")
                    .to_string();
                let dir = kernels.join(&stem);
                unpack(&deb, &dir)?;
                Self::from_tree(&format!("{stem} (file)"), &dir)
            }
            s if Path::new(s).is_dir() => Self::from_tree(s, Path::new(s)),
            s if s.starts_with("linux-image-") => Self::package(&Apt::default(), s, s, &kernels),
            other => bail!(
                "--kernel {other:?}: expected debian12, newest, debian11, host, a linux-image-… package name, a .deb file or an unpacked package directory"
            ),
        }
    }

    /// Downloads (once) and unpacks a Debian kernel package.
    fn package(apt: &Apt, label: &str, pkg: &str, kernels: &Path) -> Result<Kernel> {
        let dir = kernels.join(pkg);
        if !dir.join("boot").is_dir() {
            let dl = kernels.join("debs");
            fs::create_dir_all(&dl)?;
            let existing = find_deb(&dl, pkg);
            let deb = match existing {
                Some(d) => d,
                None => {
                    say(&format!("downloading {pkg} (apt-get download)"));
                    run(apt
                        .cmd("apt-get")
                        .args(["-q", "download", pkg])
                        .current_dir(&dl))
                    .with_context(|| format!("apt-get download {pkg}"))?;
                    find_deb(&dl, pkg).with_context(|| {
                        format!("apt-get download {pkg} left no .deb in {}", dl.display())
                    })?
                }
            };
            unpack(&deb, &dir)?;
        }
        Self::from_tree(label, &dir)
    }

    fn from_tree(label: &str, dir: &Path) -> Result<Kernel> {
        let vmlinuz = fs::read_dir(dir.join("boot"))
            .with_context(|| format!("{}: no boot/ directory", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .with_context(|| format!("{}: no boot/vmlinuz-*", dir.display()))?;
        let release = vmlinuz
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .unwrap_or_default()
            .to_string();
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|m| dir.join(m).join(&release))
            .find(|p| p.is_dir())
            .with_context(|| format!("{}: no lib/modules/{release}", dir.display()))?;
        Ok(Kernel::Image(Image {
            label: label.to_string(),
            release,
            vmlinuz,
            modules,
        }))
    }
}

fn uname_r() -> Result<String> {
    let out = Command::new("uname").arg("-r").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// apt with the machine's own package lists, or with a private set of lists
/// for an older Debian release (under target/vm/apt-NAME; the machine's
/// sources are not touched).
#[derive(Default)]
struct Apt {
    opts: Vec<String>,
}

impl Apt {
    /// Debian 11 (bullseye), whose 5.10 kernel is the oldest row offered.
    fn bullseye(work: &Path) -> Result<Apt> {
        let d = work.join("apt-debian11");
        for sub in ["lists/partial", "cache/archives/partial", "parts"] {
            fs::create_dir_all(d.join(sub))?;
        }
        let key = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg";
        fs::write(
            d.join("sources.list"),
            format!(
                "deb [{key}] http://deb.debian.org/debian bullseye main\n\
                 deb [{key}] http://deb.debian.org/debian-security bullseye-security main\n"
            ),
        )?;
        let p = |s: &str| d.join(s).display().to_string();
        let apt = Apt {
            opts: [
                format!("Dir::Etc::SourceList={}", p("sources.list")),
                format!("Dir::Etc::SourceParts={}", p("parts")),
                format!("Dir::State::Lists={}", p("lists")),
                format!("Dir::Cache={}", p("cache")),
            ]
            .into_iter()
            .flat_map(|o| ["-o".to_string(), o])
            .collect(),
        };
        let has_lists = fs::read_dir(d.join("lists"))?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with("_Packages"));
        if !has_lists {
            say("fetching Debian 11's package lists into target/vm/apt-debian11 (apt-get update)");
            run(apt.cmd("apt-get").args(["update", "-qq"]))?;
        }
        Ok(apt)
    }

    fn cmd(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.args(&self.opts).args(["-o", "APT::Sandbox::User=root"]);
        c
    }

    fn cache(&self, args: &[&str]) -> Result<String> {
        let out = self.cmd("apt-cache").args(args).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn is_host(&self) -> bool {
        self.opts.is_empty()
    }
}

/// The versioned kernel package a meta-package (`linux-image-amd64`)
/// depends on, reading the package lists after `apt-get update` if needed.
fn meta_depends(apt: &Apt, meta: &str) -> Result<String> {
    for attempt in 0..2 {
        let text = apt.cache(&["depends", meta])?;
        if let Some(pkg) = text.lines().find_map(|l| {
            l.trim()
                .strip_prefix("Depends: ")
                .filter(|d| d.starts_with("linux-image-"))
                .map(str::to_string)
        }) {
            return Ok(pkg);
        }
        if attempt == 0 && apt.is_host() {
            say("package lists have no kernel packages: apt-get update");
            run(Command::new("apt-get").args(["update", "-qq"]))?;
        }
    }
    bail!("the package lists offer no {meta}")
}

/// The newest `linux-image-X.Y-amd64` series meta-package the lists offer
/// (on Debian 12: the 6.12 series that came through backports), or the
/// default meta-package if there is none.
fn newest_series_meta() -> Result<String> {
    let text = Apt::default().cache(&[
        "search",
        "--names-only",
        r"^linux-image-[0-9]+\.[0-9]+-amd64$",
    ])?;
    let mut best: Option<(Vec<u32>, String)> = None;
    for l in text.lines() {
        let name = l.split_whitespace().next().unwrap_or_default();
        let Some(ver) = name
            .strip_prefix("linux-image-")
            .and_then(|r| r.strip_suffix("-amd64"))
        else {
            continue;
        };
        let key: Vec<u32> = ver.split('.').filter_map(|p| p.parse().ok()).collect();
        if best.as_ref().is_none_or(|(k, _)| key > *k) {
            best = Some((key, name.to_string()));
        }
    }
    Ok(best.map_or_else(|| "linux-image-amd64".to_string(), |(_, n)| n))
}

fn find_deb(dir: &Path, pkg: &str) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
        })
}

fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    if dir.join("boot").is_dir() {
        return Ok(());
    }
    say(&format!("unpacking {}", deb.display()));
    let tmp = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    fs::rename(&tmp, dir)?;
    Ok(())
}

//! `meshlane-cni install` and `uninstall`: what the DaemonSet runs to put
//! the plugin on a node, the way Istio's and Linkerd's CNI installers do.
//!
//! `install` copies the binary into the node's CNI bin directory, appends
//! meshlane-cni's entry to the primary network's conflist (the first
//! `.conflist`, `.conf` or `.json` in the conf directory, in name order, as
//! runtimes pick it; a single-plugin `.conf` becomes a `.conflist`), and
//! then watches: whenever another agent rewrites the file without the entry
//! (or a newer primary appears), it is inserted again. It never removes the
//! entry when it stops: a DaemonSet rollout must not open a window in which
//! meshed pods start uncaptured. `uninstall` (the chart's post-delete Job)
//! removes the entry and the binary.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The plugin's `type`, and its file name in the CNI bin directory.
pub const PLUGIN: &str = "meshlane-cni";

/// How often the conf directory is looked at.
pub const WATCH: Duration = Duration::from_secs(1);

/// The network config a runtime uses: the first config file by name.
pub fn primary(names: &[String]) -> Option<&String> {
    let mut confs: Vec<&String> = names
        .iter()
        .filter(|n| {
            !n.starts_with('.')
                && [".conflist", ".conf", ".json"]
                    .iter()
                    .any(|e| n.ends_with(e))
        })
        .collect();
    confs.sort();
    confs.into_iter().next()
}

/// `conf` with `entry` as its last plugin (a single-plugin config becomes
/// a list), or None when it already ends with exactly that entry.
pub fn with_entry(conf: &Value, entry: &Value) -> Result<Option<Value>> {
    let mut list = if conf.get("plugins").is_some() {
        conf.clone()
    } else if conf.get("type").is_some() {
        let mut single = conf.clone();
        let obj = single.as_object_mut().context("a config object")?;
        let version = obj.remove("cniVersion").unwrap_or(json!("1.0.0"));
        let name = obj.remove("name").unwrap_or(json!("k8s-pod-network"));
        json!({"cniVersion": version, "name": name, "plugins": [single]})
    } else {
        bail!("neither a conflist (plugins) nor a plugin config (type)");
    };
    let plugins = list["plugins"]
        .as_array_mut()
        .context("plugins is not a list")?;
    if plugins.last() == Some(entry) && plugins.iter().filter(|p| is_ours(p)).count() == 1 {
        return Ok(None);
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry.clone());
    Ok(Some(list))
}

/// `conf` without meshlane-cni's entry, or None when it has none.
pub fn without_entry(conf: &Value) -> Option<Value> {
    let plugins = conf.get("plugins")?.as_array()?;
    if !plugins.iter().any(is_ours) {
        return None;
    }
    let mut out = conf.clone();
    out["plugins"] = plugins.iter().filter(|p| !is_ours(p)).cloned().collect();
    Some(out)
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN)
}

/// Replaces `path` with `text` in one rename, so a runtime never reads half a file.
fn write_atomic(path: &Path, text: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let name = path.file_name().context("a file name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.meshlane-tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn names(dir: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("reading CNI conf dir {}", dir.display()))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

/// One look at the conf directory: inserts the entry where it is missing.
/// Returns what it did, for the log (None: nothing to do).
pub fn ensure(conf_dir: &Path, entry: &Value) -> Result<Option<String>> {
    let names = names(conf_dir)?;
    let Some(name) = primary(&names) else {
        return Ok(None);
    };
    let path = conf_dir.join(name);
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let conf: Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let Some(new) = with_entry(&conf, entry).with_context(|| path.display().to_string())? else {
        return Ok(None);
    };
    let pretty = serde_json::to_vec_pretty(&new)?;
    if path.extension().is_some_and(|e| e == "conflist") {
        write_atomic(&path, &pretty, 0o644)?;
        Ok(Some(format!("added meshlane-cni to {}", path.display())))
    } else {
        // A list is only read from a .conflist: write it beside, then
        // remove the single-plugin file (the list sorts first by stem).
        let list = path.with_extension("conflist");
        write_atomic(&list, &pretty, 0o644)?;
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        Ok(Some(format!(
            "{} became {} with meshlane-cni chained last",
            path.display(),
            list.display()
        )))
    }
}

/// Copies `exe` to `<bin dir>/meshlane-cni` when it differs.
pub fn install_binary(exe: &Path, bin_dir: &Path) -> Result<bool> {
    let dst = bin_dir.join(PLUGIN);
    let new = std::fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
    if std::fs::read(&dst).is_ok_and(|old| old == new) {
        return Ok(false);
    }
    write_atomic(&dst, &new, 0o755)?;
    Ok(true)
}

/// Removes the entry from every config in `conf_dir` and the binary from
/// `bin_dir`. Idempotent.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for name in names(conf_dir)? {
        let path = conf_dir.join(&name);
        let Ok(conf) = std::fs::read(&path).map(|t| serde_json::from_slice::<Value>(&t)) else {
            continue;
        };
        if let Some(new) = conf.ok().as_ref().and_then(without_entry) {
            write_atomic(&path, &serde_json::to_vec_pretty(&new)?, 0o644)?;
            changed.push(path);
        }
    }
    match std::fs::remove_file(bin_dir.join(PLUGIN)) {
        Ok(()) => changed.push(bin_dir.join(PLUGIN)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("removing the plugin binary"),
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Value {
        json!({"type": PLUGIN, "stateDir": "/run/meshlane"})
    }

    #[test]
    fn the_primary_is_the_first_config_by_name() {
        let n = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            primary(&n(&["99-x.conflist", "10-calico.conflist", "05-a.txt"])).unwrap(),
            "10-calico.conflist"
        );
        assert_eq!(
            primary(&n(&[".10-tmp.conflist", "20-b.conf"])).unwrap(),
            "20-b.conf"
        );
        assert!(primary(&n(&["kubeconfig"])).is_none());
    }

    #[test]
    fn the_entry_is_appended_once_and_removed() {
        let list = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]});
        let with = with_entry(&list, &entry()).unwrap().unwrap();
        assert_eq!(with["plugins"][1], entry());
        assert!(
            with_entry(&with, &entry()).unwrap().is_none(),
            "already there"
        );
        // A changed entry (new settings) replaces the old one, still last.
        let mut newer = entry();
        newer["timeoutMs"] = json!(5000);
        let replaced = with_entry(&with, &newer).unwrap().unwrap();
        assert_eq!(replaced["plugins"].as_array().unwrap().len(), 2);
        assert_eq!(replaced["plugins"][1], newer);
        // Another plugin appended after ours: ours moves back to last.
        let mut after = with.clone();
        after["plugins"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "portmap"}));
        let again = with_entry(&after, &entry()).unwrap().unwrap();
        assert_eq!(again["plugins"][2], entry());
        assert_eq!(without_entry(&with).unwrap(), list);
        assert!(without_entry(&list).is_none());
        // A single-plugin .conf becomes a list.
        let single = json!({"cniVersion": "0.4.0", "name": "n", "type": "ptp"});
        let l = with_entry(&single, &entry()).unwrap().unwrap();
        assert_eq!(l["plugins"][0], json!({"type": "ptp"}));
        assert_eq!(l["cniVersion"], "0.4.0");
        assert!(with_entry(&json!({"x": 1}), &entry()).is_err());
    }
}

/// The installer's command line (the plugin's, when CNI_COMMAND is unset).
#[derive(clap::Parser, Debug)]
#[command(
    name = "meshlane-cni",
    about = "meshlane's chained CNI plugin (run by the container runtime, with CNI_COMMAND set), \
             and its installer (run by the DaemonSet)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Copy this binary into the CNI bin directory, chain it last in the
    /// primary conflist, and keep it there (checking every second).
    Install(InstallArgs),
    /// Remove the entry from every config and the binary (idempotent).
    Uninstall {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        conf_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// The node's CNI bin directory, as mounted here.
    #[arg(long)]
    pub bin_dir: PathBuf,
    /// The node's CNI conf directory, as mounted here.
    #[arg(long)]
    pub conf_dir: PathBuf,
    /// The conf directory's path on the node (what the plugin, run by the
    /// runtime on the node, opens).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub host_conf_dir: PathBuf,
    /// The agent's --state-dir on the node (its socket is there).
    #[arg(long, default_value = "/run/meshlane")]
    pub state_dir: PathBuf,
    /// timeoutMs of the entry: how long ADD waits for a meshed pod.
    #[arg(long, default_value_t = super::spec::DEFAULT_TIMEOUT.as_millis() as u64)]
    pub timeout_ms: u64,
    /// Namespaces meshlane never captures (repeatable).
    #[arg(long = "exclude-namespace")]
    pub exclude_namespaces: Vec<String>,
    /// Give the plugin a kubeconfig for this pod's service account (token
    /// and CA copied into the conf dir, refreshed as the token rotates), so
    /// it can tell an unmeshed pod while the agent is down.
    #[arg(long, conflicts_with = "pods_file")]
    pub service_account_kubeconfig: bool,
    /// Or: the agent's --pods file on the node (nodes without an API server).
    #[arg(long)]
    pub pods_file: Option<PathBuf>,
    /// Install and insert once, then exit (no watching).
    #[arg(long)]
    pub once: bool,
}

/// The service account's files, as Kubernetes mounts them.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The files the installer writes beside the configs for the plugin.
const KUBECONFIG: &str = "meshlane-cni-kubeconfig";
const TOKEN: &str = "meshlane-cni-token";
const CA: &str = "meshlane-cni-ca.crt";

impl InstallArgs {
    /// The entry chained into the conflist.
    pub fn entry(&self) -> Value {
        let mut e = json!({
            "type": PLUGIN,
            "stateDir": self.state_dir,
            "timeoutMs": self.timeout_ms,
        });
        if !self.exclude_namespaces.is_empty() {
            e["excludeNamespaces"] = json!(self.exclude_namespaces);
        }
        if self.service_account_kubeconfig {
            e["podSource"] = json!({"kubeconfig": self.host_conf_dir.join(KUBECONFIG)});
        } else if let Some(f) = &self.pods_file {
            e["podSource"] = json!({"podsFile": f});
        }
        e
    }

    /// Writes the plugin's kubeconfig, token and CA into the conf dir when
    /// they differ from the service account's.
    fn refresh_kubeconfig(&self) -> Result<()> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .context("KUBERNETES_SERVICE_HOST is not set (not in a pod?)")?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let sa = Path::new(SA_DIR);
        for (from, to, mode) in [("token", TOKEN, 0o600), ("ca.crt", CA, 0o644)] {
            let new =
                std::fs::read(sa.join(from)).with_context(|| format!("reading {SA_DIR}/{from}"))?;
            let dst = self.conf_dir.join(to);
            if std::fs::read(&dst).ok().as_deref() != Some(new.as_slice()) {
                write_atomic(&dst, &new, mode)?;
            }
        }
        let at = |f: &str| self.host_conf_dir.join(f).display().to_string();
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    \
             server: https://{host}:{port}\n    certificate-authority: {}\nusers:\n\
             - name: meshlane-cni\n  user:\n    tokenFile: {}\ncontexts:\n- name: meshlane-cni\n  \
             context:\n    cluster: local\n    user: meshlane-cni\ncurrent-context: meshlane-cni\n",
            at(CA),
            at(TOKEN)
        );
        let dst = self.conf_dir.join(KUBECONFIG);
        if std::fs::read_to_string(&dst).ok().as_deref() != Some(text.as_str()) {
            write_atomic(&dst, text.as_bytes(), 0o600)?;
        }
        Ok(())
    }
}

/// `meshlane-cni install|uninstall`: logs to stderr, runs until SIGTERM.
pub fn main() -> std::process::ExitCode {
    use clap::Parser;
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Install(args) => install(&args),
        Command::Uninstall { bin_dir, conf_dir } => uninstall(&conf_dir, &bin_dir).map(|done| {
            for p in done {
                eprintln!("meshlane-cni: removed meshlane-cni from {}", p.display());
            }
        }),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshlane-cni: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn install(args: &InstallArgs) -> Result<()> {
    let exe = std::env::current_exe().context("finding this binary")?;
    if install_binary(&exe, &args.bin_dir)? {
        eprintln!(
            "meshlane-cni: installed {}",
            args.bin_dir.join(PLUGIN).display()
        );
    }
    let entry = args.entry();
    let term = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let t = term.clone();
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            signal_hook_store(sig, t);
        }
    }
    let mut last_error = String::new();
    loop {
        let r = (|| -> Result<()> {
            if args.service_account_kubeconfig {
                args.refresh_kubeconfig()?;
            }
            if let Some(did) = ensure(&args.conf_dir, &entry)? {
                eprintln!("meshlane-cni: {did}");
            }
            Ok(())
        })();
        match r {
            Ok(()) => last_error.clear(),
            Err(e) => {
                let msg = format!("{e:#}");
                if args.once {
                    bail!(msg);
                }
                if msg != last_error {
                    eprintln!("meshlane-cni: {msg}; trying again every {WATCH:?}");
                    last_error = msg;
                }
            }
        }
        if args.once {
            return Ok(());
        }
        let until = std::time::Instant::now() + WATCH;
        while std::time::Instant::now() < until {
            if term.load(std::sync::atomic::Ordering::Relaxed) {
                // The entry stays: see the module's comment.
                eprintln!(
                    "meshlane-cni: stopping; the plugin stays chained (uninstall removes it)"
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sets `flag` when `sig` arrives.
///
/// # Safety
/// Installs a process-wide signal handler; call from the main thread at start.
unsafe fn signal_hook_store(sig: libc::c_int, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    static FLAG: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
        std::sync::OnceLock::new();
    extern "C" fn on_signal(_: libc::c_int) {
        if let Some(f) = FLAG.get() {
            f.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _ = FLAG.set(flag);
    // SAFETY: on_signal is async-signal-safe (an atomic store).
    unsafe {
        libc::signal(sig, on_signal as *const () as libc::sighandler_t);
    }
}

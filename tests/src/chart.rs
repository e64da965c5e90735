//! meshlane's Helm chart, rendered by Helm's own engine and checked by the
//! tools a platform team would run on it.
//!
//! No helm binary comes from the package registries this project reaches,
//! but PyPI has Helm's Go SDK as a library (helm-python-sdk), the Kubernetes
//! OpenAPI schemas of every recent release (kubernetes-validate), models
//! generated from Prometheus Operator's CRDs (for the PodMonitor) and a
//! Kubernetes security linter (checkov). `cargo xtask setup` installs them
//! into one venv ([`python_tools_dir`]); `chart_tools.py` beside this file is
//! the bridge. Without the venv, [`PythonTools::find`] says why, and the
//! tests skip loudly (or fail, where xtask promised to install it).
use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};

/// The chart in this repository.
pub fn chart_dir() -> PathBuf {
    crate::workspace_root().join("deploy/chart/meshlane")
}

/// Where the manifests rendered from the chart's defaults are committed.
pub fn manifests_dir() -> PathBuf {
    crate::workspace_root().join("deploy/manifests")
}

/// The release the committed manifests are rendered for.
pub const RELEASE: &str = "meshlane";
pub const NAMESPACE: &str = "meshlane";

/// The image the committed manifests name: the chart requires one and none
/// is published, so a placeholder the user replaces (deploy/README.md).
pub const MANIFEST_IMAGE: &str = "your-registry.example/meshlane";

/// The Python packages the chart tests use, pinned. Changing this list makes
/// `cargo xtask setup` build the venv afresh.
pub const PYTHON_TOOLS: &[&str] = &[
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "checkov==3.3.30",
    // Pydantic models generated from Prometheus Operator 0.80's CRDs; the
    // newer releases need Python 3.14.
    "cloudcoil-models-prometheus-operator==0.80.1.0",
];

/// The file in the venv that records what was installed into it.
pub const PYTHON_TOOLS_STAMP: &str = "meshlane-requirements.txt";

/// Set by `cargo xtask test` to the venv it installed: the chart tests then
/// fail instead of skipping when a tool is missing.
pub const PYTHON_TOOLS_ENV: &str = "MESHLANE_PYTHON_TOOLS";

/// The venv `cargo xtask setup` installs the Python tools into: under the
/// user's cache (shared by work trees), else under target/.
pub fn python_tools_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(PYTHON_TOOLS_ENV) {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    match cache {
        Some(c) => c.join("meshlane/python-tools"),
        None => crate::workspace_root().join("target/python-tools"),
    }
}

/// The stamp's content for [`PYTHON_TOOLS`].
pub fn python_tools_stamp() -> String {
    PYTHON_TOOLS.join("\n") + "\n"
}

/// The venv with the chart tools, found and complete.
pub struct PythonTools {
    pub dir: PathBuf,
}

impl PythonTools {
    /// The venv, or why it cannot be used.
    pub fn find() -> Result<Self> {
        let dir = python_tools_dir();
        let stamp = std::fs::read_to_string(dir.join(PYTHON_TOOLS_STAMP)).unwrap_or_default();
        if stamp != python_tools_stamp() {
            bail!(
                "the chart tools ({}) are not installed at {}: run `cargo xtask setup`",
                PYTHON_TOOLS.join(", "),
                dir.display()
            );
        }
        Ok(Self { dir })
    }

    /// The venv, or: fail when `cargo xtask test` installed it (it must be
    /// there), else print SKIPPED past the test harness's capture and None.
    pub fn or_skip(test: &str) -> Option<Self> {
        match Self::find() {
            Ok(t) => Some(t),
            Err(e) if std::env::var_os(PYTHON_TOOLS_ENV).is_some() => {
                panic!("{test}: {e:#} ({PYTHON_TOOLS_ENV} is set: xtask installed them)")
            }
            Err(e) => {
                // Straight to fd 2: the harness captures eprintln! of passing tests.
                let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {e:#}");
                None
            }
        }
    }

    pub fn python(&self) -> PathBuf {
        self.dir.join("bin/python3")
    }

    pub fn checkov_bin(&self) -> PathBuf {
        self.dir.join("bin/checkov")
    }

    /// One request to chart_tools.py.
    fn call(&self, req: &Json) -> Result<Json> {
        let script = crate::workspace_root().join("tests/src/chart_tools.py");
        let mut child = Command::new(self.python())
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.python().display()))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(req.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        serde_json::from_slice(&out.stdout).context("chart_tools.py's answer")
    }

    /// Renders every template of `chart` with `values` over its defaults,
    /// as `helm template` does: values.schema.json first, then the
    /// templates (a `required` or `fail` message comes back as the error).
    pub fn render(&self, chart: &Path, values: &Json) -> Result<Rendering> {
        let v = self.call(&json!({
            "op": "render",
            "chart": chart,
            "release": RELEASE,
            "namespace": NAMESPACE,
            "values": values,
        }))?;
        let mut files: Vec<Rendered> = v["files"]
            .as_object()
            .context("files")?
            .iter()
            .map(|(name, t)| Rendered {
                name: name.clone(),
                text: t.as_str().unwrap_or_default().to_string(),
            })
            .collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Rendering {
            helm: v["helm"].as_str().unwrap_or("?").to_string(),
            files,
        })
    }

    /// `helm lint --strict` with `values`, for `kubernetes`: the messages
    /// of warning severity or worse, as `path: message`.
    pub fn lint(&self, chart: &Path, values: &Json, kubernetes: &str) -> Result<Vec<String>> {
        let v = self.call(&json!({
            "op": "lint",
            "chart": chart,
            "namespace": NAMESPACE,
            "values": values,
            "kubernetes": kubernetes,
        }))?;
        let mut out: Vec<String> = v["messages"]
            .as_array()
            .context("messages")?
            .iter()
            // 1 is info (e.g. "icon is recommended"), 2 warning, 3 error.
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .map(|m| format!("{}: {}", m["path"].as_str().unwrap_or("?"), m["error"]))
            .collect();
        out.extend(
            v["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e.to_string()),
        );
        Ok(out)
    }

    /// Each object against the Kubernetes OpenAPI schema of `kubernetes`
    /// (strict: unknown fields fail), the PodMonitor against its CRD's
    /// models. One result per object, in order.
    pub fn validate(&self, objects: &[Object], kubernetes: &str) -> Result<Vec<Validation>> {
        let v = self.call(&json!({
            "op": "validate",
            "kubernetes": kubernetes,
            "objects": objects.iter().map(|o| &o.value).collect::<Vec<_>>(),
        }))?;
        v["results"]
            .as_array()
            .context("results")?
            .iter()
            .map(|r| {
                Ok(Validation {
                    error: r["error"].as_str().map(String::from),
                    skipped: r["skipped"].as_str().map(String::from),
                })
            })
            .collect()
    }

    /// checkov's failed Kubernetes checks for every YAML file under `dir`.
    /// Offline: `--skip-download` keeps it from asking its vendor's API for
    /// guidelines.
    pub fn checkov(&self, dir: &Path) -> Result<Vec<Finding>> {
        let out = Command::new(self.checkov_bin())
            .args(["--framework", "kubernetes", "-o", "json", "--compact"])
            .args(["--quiet", "--skip-download", "-d"])
            .arg(dir)
            .output()
            .context("running checkov")?;
        // Exit 1 means findings; anything else without JSON is a failure.
        let text = String::from_utf8_lossy(&out.stdout);
        let doc: Json = serde_json::from_str(&text).with_context(|| {
            format!(
                "checkov ({}) printed no JSON: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let reports = match doc {
            Json::Array(a) => a,
            d => vec![d],
        };
        let mut findings = Vec::new();
        for r in &reports {
            let failed = r["results"]["failed_checks"].as_array();
            for c in failed.into_iter().flatten() {
                findings.push(Finding {
                    id: c["check_id"].as_str().unwrap_or("?").to_string(),
                    name: c["check_name"].as_str().unwrap_or("").to_string(),
                    resource: c["resource"].as_str().unwrap_or("").to_string(),
                    file: c["file_path"].as_str().unwrap_or("").to_string(),
                });
            }
        }
        Ok(findings)
    }
}

/// One rendered template file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// `<chart>/templates/<file>`, as Helm names it.
    pub name: String,
    pub text: String,
}

/// What Helm's engine made of the chart.
pub struct Rendering {
    /// The Helm SDK version that rendered it.
    pub helm: String,
    pub files: Vec<Rendered>,
}

/// The outcome of one object's schema check.
#[derive(Debug)]
pub struct Validation {
    pub error: Option<String>,
    /// Why the object could not be checked (said loudly by the caller).
    pub skipped: Option<String>,
}

/// One failed checkov check.
#[derive(Clone, Debug)]
pub struct Finding {
    pub id: String,
    pub name: String,
    pub resource: String,
    pub file: String,
}

/// The checks values.yaml accepts: `# checkov:accept ID: reason` lines.
pub fn accepted_findings(values_yaml: &str) -> BTreeMap<String, String> {
    values_yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("# checkov:accept "))
        .filter_map(|l| l.split_once(':'))
        .map(|(id, why)| (id.trim().to_string(), why.trim().to_string()))
        .collect()
}

/// Reads a YAML file into JSON values.
pub fn read_yaml(path: &Path) -> Result<Json> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Helm's coalescing of user values over the chart's: maps merge key by key,
/// anything else replaces, and `null` deletes the key.
pub fn merge_values(base: &mut Json, over: &Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                if v.is_null() {
                    b.remove(k);
                } else if let Some(slot) = b.get_mut(k) {
                    merge_values(slot, v);
                } else {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The chart's values.yaml with `overrides` coalesced over it (what the
/// templates see as `.Values`).
pub fn values(chart: &Path, overrides: &Json) -> Result<Json> {
    let mut v = read_yaml(&chart.join("values.yaml"))?;
    merge_values(&mut v, overrides);
    Ok(v)
}

/// One Kubernetes object from a rendered template.
#[derive(Clone, Debug)]
pub struct Object {
    /// The template it came from.
    pub source: String,
    pub value: Json,
}

impl Object {
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    /// Helm hooks are not part of the release's manifests.
    pub fn hook(&self) -> Option<&str> {
        self.value["metadata"]["annotations"]["helm.sh/hook"].as_str()
    }
}

/// Splits a rendered file into YAML documents (on `---` lines, as Helm does)
/// and drops the empty ones.
pub fn split_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let d = docs.last_mut().expect("one");
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.retain(|d| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

/// The Kubernetes objects in the rendered templates (NOTES.txt excluded).
pub fn objects(rendered: &[Rendered]) -> Result<Vec<Object>> {
    let mut out = Vec::new();
    for r in rendered.iter().filter(|r| r.name.ends_with(".yaml")) {
        for doc in split_documents(&r.text) {
            let value: Json = serde_yaml_ng::from_str(&doc)
                .with_context(|| format!("{}: rendered YAML does not parse:\n{doc}", r.name))?;
            out.push(Object {
                source: r.name.clone(),
                value,
            });
        }
    }
    Ok(out)
}

/// Helm's install order for the kinds this chart has (what `helm template`
/// and `helm install` sort by).
const KIND_ORDER: &[&str] = &[
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "DaemonSet",
    "Job",
];

fn kind_rank(kind: &str) -> usize {
    KIND_ORDER
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(KIND_ORDER.len())
}

/// The values the committed manifests are rendered with: the defaults and
/// the placeholder image.
pub fn manifest_values() -> Json {
    json!({"image": {"repository": MANIFEST_IMAGE}})
}

/// The committed manifest files rendered from the chart's defaults:
/// (file name, content). `meshlane.yaml` holds the release's objects (what
/// `kubectl apply -f` installs), `cleanup.yaml` the DaemonSet in cleanup
/// mode (what uninstalling without Helm applies over it). The uninstall
/// guard hook is Helm's alone.
pub fn manifest_files(tools: &PythonTools, chart: &Path) -> Result<Vec<(String, String)>> {
    let header = |what: &str, with: &str| {
        format!(
            "# {what}\n# Rendered from deploy/chart/meshlane with its default values{with} and \
             image.repository\n# {MANIFEST_IMAGE} (set yours), release {RELEASE}, namespace \
             {NAMESPACE}, by\n# `cargo xtask render-manifests`. Do not edit: \
             tests/tests/deploy.rs fails when this\n# file differs from a fresh render.\n"
        )
    };
    let sorted = |values: &Json| -> Result<Vec<(usize, String, String)>> {
        let r = tools.render(chart, values)?;
        let mut docs = Vec::new();
        for f in r.files.iter().filter(|r| r.name.ends_with(".yaml")) {
            for doc in split_documents(&f.text) {
                let v: Json = serde_yaml_ng::from_str(&doc)
                    .with_context(|| format!("{}: rendered YAML does not parse", f.name))?;
                if !v["metadata"]["annotations"]["helm.sh/hook"].is_null() {
                    continue;
                }
                let kind = v["kind"].as_str().unwrap_or("").to_string();
                docs.push((kind_rank(&kind), f.name.clone(), doc));
            }
        }
        // Stable: same kind keeps template-file order.
        docs.sort_by_key(|(rank, _, _)| *rank);
        Ok(docs)
    };
    let mut main = header(
        &format!("meshlane for `kubectl apply -f` (create the namespace {NAMESPACE} first)."),
        "",
    );
    for (_, source, doc) in sorted(&manifest_values())? {
        main.push_str(&format!("---\n# Source: {source}\n{doc}"));
    }
    let mut cleanup_values = manifest_values();
    merge_values(&mut cleanup_values, &json!({"cleanup": {"enabled": true}}));
    let mut cleanup = header(
        "The DaemonSet in cleanup mode: apply over meshlane.yaml's, wait for the rollout, then delete meshlane.yaml's objects.",
        " with cleanup.enabled=true",
    );
    for (_, source, doc) in sorted(&cleanup_values)? {
        if doc.contains("\nkind: DaemonSet\n") {
            cleanup.push_str(&format!("---\n# Source: {source}\n{doc}"));
        }
    }
    Ok(vec![
        ("meshlane.yaml".to_string(), main),
        ("cleanup.yaml".to_string(), cleanup),
    ])
}

/// Writes the manifests rendered from the chart's defaults into
/// deploy/manifests, and removes files there that no longer belong.
pub fn write_manifests(tools: &PythonTools) -> Result<Vec<PathBuf>> {
    let dir = manifests_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = manifest_files(tools, &chart_dir())?;
    for e in std::fs::read_dir(&dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !files.iter().any(|(n, _)| n == name) {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    let mut written = Vec::new();
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_merge_as_helm_coalesces_them() {
        let mut base = json!({"a": {"x": 1, "y": 2}, "b": 3, "c": [1]});
        merge_values(
            &mut base,
            &json!({"a": {"y": 5, "z": 6}, "b": null, "c": [2]}),
        );
        assert_eq!(base, json!({"a": {"x": 1, "y": 5, "z": 6}, "c": [2]}));
    }

    #[test]
    fn accepted_findings_are_read_from_comment_lines() {
        let text = "a: 1\n# checkov:accept CKV_K8S_19: host network, because\n  # checkov:accept CKV_K8S_8: no probe\n# other\n";
        let got = accepted_findings(text);
        assert_eq!(got.len(), 2);
        assert_eq!(got["CKV_K8S_19"], "host network, because");
        assert_eq!(got["CKV_K8S_8"], "no probe");
    }
}

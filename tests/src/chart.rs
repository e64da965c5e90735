//! Rendering meshlane's Helm chart without helm, and checking what comes out.
//!
//! Helm renders a chart with Go's `text/template` plus its own functions.
//! This module renders it with `gtmpl` (a Rust implementation of Go's
//! `text/template`) and the same context Helm builds (`.Values`, `.Release`,
//! `.Chart`). That is only faithful while the chart keeps to a subset both
//! handle the same way; `render` refuses values outside it, and the deploy
//! test compares this renderer with Helm's own engine where it is installed.
//! The subset (also in deploy/README.md):
//!
//! - actions: `{{ .Values.x.y }}`, `{{ .Release.Name }}`, `{{ .Release.Namespace }}`,
//!   `{{ .Release.Service }}`, `{{ .Chart.Name }}`, `{{ .Chart.Version }}`,
//!   `{{ .Chart.AppVersion }}`, `if`/`else`/`end`, `eq`/`ne`/`and`/`or`/`not`,
//!   `{{-`/`-}}` trimming and `{{/* comments */}}`;
//! - one function beyond Go's: `int64` (Sprig's), for every number printed,
//!   because Helm reads numbers in values files as float64 and prints
//!   1000670000 as `1.00067e+09`;
//! - no `range` over maps (Go sorts the keys, gtmpl does not), no `printf`
//!   (gtmpl's verbs differ), no `include`, `toYaml`, `quote`, `default`,
//!   `required`, `tpl`, `lookup` or other Sprig/Helm functions;
//! - every key a template reads exists in values.yaml (gtmpl fails on a
//!   missing key where Helm would print nothing: stricter, never different);
//! - string values hold no `"`, `\` or newline (templates quote them with
//!   plain `"..."`) and are not YAML 1.1 booleans (`on`, `off`, `yes`, `no`,
//!   `y`, `n`), which Helm would read as true/false.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use gtmpl::{FuncError, Template, Value};
#[cfg(test)]
use serde_json::json;
use serde_json::Value as Json;

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

/// One rendered template file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// `<chart>/templates/<file>`, as Helm names it.
    pub name: String,
    pub text: String,
}

/// Reads a YAML file into JSON values (what Helm's values become).
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

/// The chart's values.yaml with `overrides` coalesced over it.
pub fn values(chart: &Path, overrides: &Json) -> Result<Json> {
    let mut v = read_yaml(&chart.join("values.yaml"))?;
    merge_values(&mut v, overrides);
    Ok(v)
}

const YAML11_BOOLS: &[&str] = &["y", "yes", "n", "no", "on", "off"];

/// Converts values to template values, refusing what is outside the subset.
fn to_template(v: &Json, path: &str) -> Result<Value> {
    Ok(match v {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => number(n.as_f64().ok_or_else(|| anyhow!("{path}: {n}"))?),
        Json::String(s) => {
            if s.contains(['"', '\\', '\n']) {
                bail!("value {path} = {s:?}: the chart's templates quote strings with plain \"...\"; no '\"', '\\\\' or newline");
            }
            if YAML11_BOOLS.contains(&s.to_ascii_lowercase().as_str()) {
                bail!(
                    "value {path} = {s:?}: Helm's YAML reads this as a boolean; use true or false"
                );
            }
            Value::String(s.clone())
        }
        Json::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| to_template(x, &format!("{path}[{i}]")))
                .collect::<Result<_>>()?,
        ),
        Json::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), to_template(x, &format!("{path}.{k}"))?)))
                .collect::<Result<HashMap<_, _>>>()?,
        ),
    })
}

/// A number as Helm holds it: a float64, which Go prints with `%v`: plain
/// digits below 1e6, `1.00067e+09` from there on.
fn number(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 1e6 {
        return Value::from(f as i64);
    }
    if f.abs() >= 1e21 || (f != 0.0 && f.abs() < 1e-4) || (f.fract() == 0.0 && f.abs() >= 1e6) {
        // Rust's {:e} gives the same shortest digits as Go's 'g'; Go writes
        // the exponent with a sign and at least two digits.
        let s = format!("{f:e}");
        let (mant, exp) = s.split_once('e').expect("{:e} has an e");
        let exp: i32 = exp.parse().expect("exponent");
        let sign = if exp < 0 { '-' } else { '+' };
        return Value::String(format!("{mant}e{sign}{:02}", exp.abs()));
    }
    Value::from(f)
}

/// Sprig's `int64`: a number truncated, a numeric string parsed, else 0.
fn int64(args: &[Value]) -> Result<Value, FuncError> {
    let [v] = args else {
        return Err(FuncError::ExactlyXArgs("int64".into(), 1));
    };
    let n: i64 = match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f.trunc() as i64))
            .unwrap_or(0),
        // A big number from values arrives here as Go's %v text (see `number`).
        Value::String(s) => s
            .parse::<i64>()
            .ok()
            .or_else(|| s.parse::<f64>().ok().map(|f| f.trunc() as i64))
            .unwrap_or(0),
        Value::Bool(b) => i64::from(*b),
        _ => 0,
    };
    Ok(Value::from(n))
}

/// The `.Chart` object: Chart.yaml's fields under Helm's Go names.
fn chart_object(chart: &Path) -> Result<Value> {
    let meta = read_yaml(&chart.join("Chart.yaml"))?;
    let mut m = HashMap::new();
    for (go, yaml) in [
        ("Name", "name"),
        ("Version", "version"),
        ("AppVersion", "appVersion"),
    ] {
        let s = meta
            .get(yaml)
            .and_then(Json::as_str)
            .ok_or_else(|| anyhow!("Chart.yaml: {yaml} missing or not a string"))?;
        m.insert(go.to_string(), Value::String(s.to_string()));
    }
    Ok(Value::Object(m))
}

/// Renders every template of the chart (files under templates/ not starting
/// with `_`, NOTES.txt included) for `release` in `namespace`, in file-name
/// order, as Helm's engine would.
pub fn render(
    chart: &Path,
    release: &str,
    namespace: &str,
    overrides: &Json,
) -> Result<Vec<Rendered>> {
    let chart_name = read_yaml(&chart.join("Chart.yaml"))?
        .get("name")
        .and_then(Json::as_str)
        .map(String::from)
        .ok_or_else(|| anyhow!("Chart.yaml has no name"))?;
    let values = values(chart, overrides)?;
    let mut top = HashMap::new();
    top.insert("Values".to_string(), to_template(&values, "Values")?);
    top.insert("Chart".to_string(), chart_object(chart)?);
    let mut rel = HashMap::new();
    rel.insert("Name".to_string(), Value::from(release));
    rel.insert("Namespace".to_string(), Value::from(namespace));
    rel.insert("Service".to_string(), Value::from("Helm"));
    top.insert("Release".to_string(), Value::Object(rel));
    let context = gtmpl::Context::from(Value::Object(top));

    let dir = chart.join("templates");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('_'))
    });
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let file = f.file_name().and_then(|n| n.to_str()).expect("utf-8 name");
        let name = format!("{chart_name}/templates/{file}");
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let mut t = Template::default();
        t.add_func("int64", int64);
        t.parse(&text)
            .map_err(|e| anyhow!("parsing template {name}: {e}"))?;
        let text = t
            .render(&context)
            .map_err(|e| anyhow!("rendering template {name}: {e}"))?;
        out.push(Rendered { name, text });
    }
    Ok(out)
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

/// The committed manifest files rendered from the chart's defaults:
/// (file name, content). `meshlane.yaml` holds the release's objects (what
/// `kubectl apply -f` installs); `uninstall-job.yaml` holds the Helm hooks
/// (the cleanup Job), to run by hand when uninstalling without Helm.
pub fn manifest_files(chart: &Path) -> Result<Vec<(String, String)>> {
    let rendered = render(chart, RELEASE, NAMESPACE, &Json::Object(Default::default()))?;
    let mut docs: Vec<(usize, String, String, bool)> = Vec::new();
    for r in rendered.iter().filter(|r| r.name.ends_with(".yaml")) {
        for doc in split_documents(&r.text) {
            let v: Json = serde_yaml_ng::from_str(&doc)
                .with_context(|| format!("{}: rendered YAML does not parse", r.name))?;
            let kind = v["kind"].as_str().unwrap_or("").to_string();
            let hook = !v["metadata"]["annotations"]["helm.sh/hook"].is_null();
            docs.push((kind_rank(&kind), r.name.clone(), doc, hook));
        }
    }
    // Stable: same kind keeps template-file order.
    docs.sort_by_key(|(rank, _, _, _)| *rank);
    let header = |what: &str| {
        format!(
            "# {what}\n# Rendered from deploy/chart/meshlane with its default values (release \
             {RELEASE}, namespace {NAMESPACE})\n# by `cargo xtask render-manifests`. Do not edit: \
             tests/tests/deploy.rs fails when this file\n# differs from a fresh render.\n"
        )
    };
    let mut main = header(&format!(
        "meshlane for `kubectl apply -f` (create the namespace {NAMESPACE} first)."
    ));
    let mut hooks = header(
        "The uninstall cleanup Job (a Helm post-delete hook). Without Helm: apply it after deleting meshlane.yaml's objects.",
    );
    for (_, source, doc, hook) in docs {
        let target = if hook { &mut hooks } else { &mut main };
        target.push_str(&format!("---\n# Source: {source}\n{doc}"));
    }
    Ok(vec![
        ("meshlane.yaml".to_string(), main),
        ("uninstall-job.yaml".to_string(), hooks),
    ])
}

/// Writes the manifests rendered from the chart's defaults into deploy/manifests.
pub fn write_manifests() -> Result<Vec<PathBuf>> {
    let dir = manifests_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for (name, text) in manifest_files(&chart_dir())? {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        written.push(p);
    }
    Ok(written)
}

/// Checks an object against the Kubernetes API types (k8s-openapi, the
/// newest Kubernetes it knows). k8s-openapi ignores fields it does not know,
/// so the object is parsed into its type and written back, and the result
/// must equal the input: a misspelt or unknown field, a wrong type or a
/// value in the wrong place shows up as a difference.
pub fn validate(obj: &Object) -> Result<()> {
    use k8s_openapi::api::{
        apps::v1::DaemonSet,
        batch::v1::Job,
        core::v1::{Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    };
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Json) -> Result<Json> {
        let typed: T = serde_json::from_value(v.clone())?;
        Ok(serde_json::to_value(&typed)?)
    }
    let v = &obj.value;
    let api = v["apiVersion"].as_str().unwrap_or("");
    let back = match (api, obj.kind()) {
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(v),
        ("batch/v1", "Job") => round_trip::<Job>(v),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(v),
        ("v1", "Namespace") => round_trip::<Namespace>(v),
        ("v1", "Service") => round_trip::<Service>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(v)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(v),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(v),
        (a, k) => bail!("{}: {a} {k} is not a kind this check knows", obj.source),
    }
    .with_context(|| {
        format!(
            "{}: {} {} does not parse as the Kubernetes type",
            obj.source,
            obj.kind(),
            obj.name()
        )
    })?;
    let mut diffs = Vec::new();
    json_diff(v, &back, "", &mut diffs);
    if !diffs.is_empty() {
        bail!(
            "{}: {} {} has fields the Kubernetes API does not know or reads differently:\n  {}",
            obj.source,
            obj.kind(),
            obj.name(),
            diffs.join("\n  ")
        );
    }
    Ok(())
}

/// Where `input` and `back` differ, as JSON paths with both values.
pub fn json_diff(input: &Json, back: &Json, path: &str, out: &mut Vec<String>) {
    match (input, back) {
        (Json::Object(a), Json::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(vb) => json_diff(va, vb, &p, out),
                    None => out.push(format!("{p}: unknown field (value {va})")),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!(
                    "{path}.{k}: appears after the round trip ({})",
                    b[k]
                ));
            }
        }
        (Json::Array(a), Json::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                json_diff(va, vb, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} reads back as {b}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(v: &Value) -> String {
        gtmpl::template("{{ . }}", v.clone()).expect("prints")
    }

    /// Go's `%v` of a float64, as Helm prints a number from a values file.
    #[test]
    fn numbers_print_as_go_prints_a_float64() {
        for (f, go) in [
            (1337.0, "1337"),
            (999_999.0, "999999"),
            (1e6, "1e+06"),
            (1_000_670_000.0, "1.00067e+09"),
            (1_234_567.0, "1.234567e+06"),
            (0.5, "0.5"),
        ] {
            assert_eq!(show(&number(f)), go, "{f}");
        }
    }

    #[test]
    fn int64_prints_whole_numbers_whatever_helm_holds() {
        let t = |v: Value| int64(&[v]).map(|v| show(&v)).expect("int64");
        assert_eq!(t(number(1_000_670_000.0)), "1000670000");
        assert_eq!(t(Value::from("1000670000")), "1000670000");
        assert_eq!(t(Value::from(15001i64)), "15001");
        assert_eq!(t(Value::from("not a number")), "0");
    }

    #[test]
    fn values_outside_the_subset_are_refused() {
        for bad in [
            json!({"a": "on"}),
            json!({"a": "say \"hi\""}),
            json!({"a": ["x\ny"]}),
        ] {
            assert!(to_template(&bad, "Values").is_err(), "{bad}");
        }
        assert!(to_template(&json!({"a": "info", "b": 1, "c": true}), "Values").is_ok());
    }

    #[test]
    fn values_merge_as_helm_coalesces_them() {
        let mut base = json!({"a": {"x": 1, "y": 2}, "b": 3, "c": [1]});
        merge_values(
            &mut base,
            &json!({"a": {"y": 5, "z": 6}, "b": null, "c": [2]}),
        );
        assert_eq!(base, json!({"a": {"x": 1, "y": 5, "z": 6}, "c": [2]}));
    }
}

//! deploy/: the Helm chart, the manifests rendered from it and the Dockerfile.
//!
//! - Helm's own engine (helm-python-sdk, tests/src/chart.rs) renders the
//!   chart for every value set in [`scenarios`], after values.schema.json
//!   has accepted the values; a missing image is refused with the hint.
//! - Every object validates against the Kubernetes OpenAPI schema
//!   (kubernetes-validate, strict: unknown fields fail), the PodMonitor
//!   against its CRD's models.
//! - checkov's findings on every rendering are fixed, or accepted with a
//!   reason in values.yaml; a new one fails.
//! - The committed manifests are a fresh render of the defaults.
//! - The chart's values reach the agent: the rendered arguments go to the
//!   real `meshlane run --print-options`.
//! - The capabilities the chart grants are enough for the real agent on a
//!   real kernel, and each one is needed; cleanup mode's (none) are enough
//!   for `meshlane cleanup`. These read the committed manifests, so they run
//!   also where the Python tools are missing.
//! - The Dockerfile builds with the project's recipe and runs what the chart runs.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use meshlane_tests::{
    chart::{self, Object, PythonTools},
    meshlane_bin, pod_state, read_sidecar_log, workspace_root, Agent, Launch, Pod, PodSpec,
    ProbeResult, Proc, Sandbox, APP_UID, PROXY_UID,
};
use serde_json::{json, Value as Json};

const IMAGE: &str = "registry.example/mesh/meshlane";

/// The value sets every chart check runs with.
fn scenarios() -> Vec<(&'static str, Json)> {
    vec![
        ("defaults", json!({"image": {"repository": IMAGE}})),
        (
            "custom-ports",
            json!({
                "image": {"repository": IMAGE, "tag": "0.1.0-rc1", "pullPolicy": "Always"},
                // OpenShift-style uid: Helm holds it as float64 (1.00067e+09).
                "mesh": {"proxyUid": 1_000_670_000, "outboundCapturePort": 4140, "inboundCapturePort": 4143},
                "shortcut": {"enabled": true, "maxQueuedBytes": 1_048_576},
                "logLevel": "meshlane=debug,info",
                "http": {"bindAddress": "0.0.0.0", "port": 15999},
                "metrics": {"bindAddress": "127.0.0.1", "port": 15998},
                "priorityClassName": "",
                "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}, "limits": {"memory": "1Gi"}},
                "maxPods": 250,
                "extraArgs": ["--max-list-entries=64"],
                "extraEnv": [{"name": "NO_COLOR", "value": "1"}],
            }),
        ),
        (
            "tolerations-nodeselector",
            json!({
                "image": {"repository": IMAGE, "digest": format!("sha256:{}", "ab".repeat(32))},
                "imagePullSecrets": [{"name": "regcred"}],
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mesh", "effect": "NoSchedule"}],
                "nodeSelector": {"kubernetes.io/os": "linux", "mesh.example/enabled": "true"},
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}
                    ]}]}}},
                "podAnnotations": {"example.com/team": "platform"},
                "podLabels": {"team": "platform"},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
            }),
        ),
        (
            "hostpid",
            json!({
                "image": {"repository": IMAGE},
                "hostPID": true,
                "host": {"bpffs": "/sys/fs/bpf", "cgroup2": "/sys/fs/cgroup/unified", "netns": "/var/run/netns"},
                // Clusters before 1.30: the annotation instead of the field.
                "appArmor": {"annotation": true},
                "seLinuxOptions": null,
            }),
        ),
        (
            "json-logs-podmonitor",
            json!({
                "image": {"repository": IMAGE},
                "logFormat": "json",
                "podMonitor": {"enabled": true, "interval": "30s", "labels": {"release": "prometheus"}},
            }),
        ),
        (
            "metrics-beside-probes",
            json!({
                "image": {"repository": IMAGE},
                "metrics": {"bindAddress": ""},
                "podMonitor": {"enabled": true},
            }),
        ),
        (
            "cleanup-mode",
            json!({"image": {"repository": IMAGE}, "cleanup": {"enabled": true}}),
        ),
        (
            "cni",
            json!({
                "image": {"repository": IMAGE},
                "cni": {"enabled": true, "binDir": "/usr/libexec/cni", "confDir": "/etc/cni/conf.d"},
            }),
        ),
        (
            "cni-cleanup-mode",
            json!({
                "image": {"repository": IMAGE},
                "cleanup": {"enabled": true},
                "cni": {"enabled": true, "binDir": "/usr/libexec/cni", "confDir": "/etc/cni/conf.d"},
            }),
        ),
    ]
}

/// Kubernetes releases every rendering is validated for: the oldest that
/// has securityContext.appArmorProfile, and the newest kubernetes-validate
/// knows. Renderings with the annotation form also for 1.29.
const KUBERNETES: &[&str] = &["1.30.0", "1.37.0"];
const KUBERNETES_BEFORE_APPARMOR_FIELD: &str = "1.29.0";

/// The node's address, as the kubelet puts `status.hostIP` in the env.
const HOST_IP: &str = "192.0.2.7";

/// The `--metrics-addr` the values ask for (None: /metrics on the http port).
fn metrics_addr(r: &Render) -> Option<String> {
    let at = match r.v("metrics.bindAddress").as_str().expect("string") {
        "" => return None,
        "node" => HOST_IP,
        a => a,
    };
    Some(format!("{at}:{}", r.v("metrics.port")))
}

struct Render {
    name: &'static str,
    values: Json,
    objects: Vec<Object>,
}

/// Every scenario rendered by Helm's engine, once per test binary; None
/// (after a loud SKIPPED) without the Python tools.
fn rendered(test: &str) -> Option<&'static [Render]> {
    static ALL: OnceLock<Vec<Render>> = OnceLock::new();
    let tools = PythonTools::or_skip(test)?;
    Some(ALL.get_or_init(|| {
        let dir = chart::chart_dir();
        scenarios()
            .into_iter()
            .map(|(name, overrides)| {
                let r = tools
                    .render(&dir, &overrides)
                    .unwrap_or_else(|e| panic!("{name}: Helm's engine: {e:#}"));
                Render {
                    name,
                    values: chart::values(&dir, &overrides).expect("values"),
                    objects: chart::objects(&r.files).unwrap_or_else(|e| panic!("{name}: {e:#}")),
                }
            })
            .collect()
    }))
}

/// The committed manifests (a fresh render of the defaults, which
/// [`committed_manifests_are_a_fresh_render_of_the_defaults`] checks): what
/// the kernel tests read, so they need no Python.
fn committed(file: &str, overrides: &Json) -> Render {
    let p = chart::manifests_dir().join(file);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut values = chart::manifest_values();
    chart::merge_values(&mut values, overrides);
    Render {
        name: "committed",
        values: chart::values(&chart::chart_dir(), &values).expect("values"),
        objects: chart::objects(&[chart::Rendered {
            name: file.to_string(),
            text,
        }])
        .expect("committed manifests parse"),
    }
}

impl Render {
    fn all(&self, kind: &str) -> Vec<&Object> {
        self.objects.iter().filter(|o| o.kind() == kind).collect()
    }
    fn one(&self, kind: &str) -> &Json {
        let found = self.all(kind);
        assert_eq!(
            found.len(),
            1,
            "{}: exactly one {kind}: {found:?}",
            self.name
        );
        &found[0].value
    }
    fn pod(&self) -> &Json {
        &self.one("DaemonSet")["spec"]["template"]["spec"]
    }
    fn agent(&self) -> &Json {
        self.container("agent")
    }
    /// The DaemonSet's container `name`: the agent, and with cni.enabled
    /// the plugin's installer, nothing else.
    fn container(&self, name: &str) -> &Json {
        let c = self.one("DaemonSet")["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("containers");
        let cni = self.v("cni.enabled") == &json!(true);
        assert_eq!(c.len(), 1 + usize::from(cni), "agent and (cni) install-cni");
        c.iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }
    fn cleanup_mode(&self) -> bool {
        self.v("cleanup.enabled") == &json!(true)
    }
    fn v(&self, path: &str) -> &Json {
        path.split('.').fold(&self.values, |v, k| &v[k])
    }
    /// The image the values ask for.
    fn image(&self) -> String {
        let repo = self.v("image.repository").as_str().unwrap();
        match self.v("image.digest").as_str() {
            Some(d) if !d.is_empty() => format!("{repo}@{d}"),
            _ => {
                let tag = self.v("image.tag").as_str().unwrap_or("");
                let app = chart::read_yaml(&chart::chart_dir().join("Chart.yaml")).unwrap()
                    ["appVersion"]
                    .as_str()
                    .unwrap()
                    .to_string();
                format!("{repo}:{}", if tag.is_empty() { &app } else { tag })
            }
        }
    }
}

fn strings(v: &Json) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

#[test]
fn every_rendering_validates_against_the_kubernetes_schema() {
    let Some(all) = rendered("every_rendering_validates_against_the_kubernetes_schema") else {
        return;
    };
    let tools = PythonTools::find().expect("tools");
    let mut skipped = BTreeSet::new();
    for r in all {
        let cleanup = r.cleanup_mode();
        let kinds: BTreeSet<(String, bool)> = r
            .objects
            .iter()
            .map(|o| (o.kind().to_string(), o.hook().is_some()))
            .collect();
        let mut want: BTreeSet<(String, bool)> = [
            ("ServiceAccount", false),
            ("ClusterRole", false),
            ("ClusterRoleBinding", false),
            ("DaemonSet", false),
        ]
        .into_iter()
        .map(|(k, h)| (k.to_string(), h))
        .collect();
        if !cleanup {
            want.insert(("Job".into(), true));
        }
        if r.v("podMonitor.enabled") == &json!(true) && !cleanup {
            want.insert(("PodMonitor".into(), false));
        }
        assert_eq!(kinds, want, "{}: the chart's objects", r.name);
        let mut versions = KUBERNETES.to_vec();
        if r.v("appArmor.annotation") == &json!(true) {
            versions.push(KUBERNETES_BEFORE_APPARMOR_FIELD);
        }
        for k in &versions {
            let results = tools.validate(&r.objects, k).expect("validate");
            for (o, v) in r.objects.iter().zip(&results) {
                if let Some(e) = &v.error {
                    panic!(
                        "{} (Kubernetes {k}): {} {} is invalid: {e}",
                        r.name,
                        o.kind(),
                        o.name()
                    );
                }
                if let Some(why) = &v.skipped {
                    skipped.insert(format!("{} {}: {why}", o.kind(), o.name()));
                }
            }
        }
        eprintln!(
            "{}: {} objects valid for Kubernetes {versions:?}",
            r.name,
            r.objects.len()
        );
    }
    // The venv's stamp promises the CRD models: if they still cannot be
    // imported the venv is broken, and an unvalidated object must not pass.
    assert!(
        skipped.is_empty(),
        "NOT VALIDATED: {skipped:?}: reinstall the chart tools (remove {} and run `cargo xtask setup`)",
        tools.dir.display()
    );
}

/// Helm's own linter, strict (warnings fail), for every value set.
#[test]
fn helm_lint_is_clean_for_every_value_set() {
    let Some(tools) = PythonTools::or_skip("helm_lint_is_clean_for_every_value_set") else {
        return;
    };
    for (name, overrides) in scenarios() {
        let found = tools
            .lint(&chart::chart_dir(), &overrides, KUBERNETES[0])
            .expect("helm lint");
        assert!(
            found.is_empty(),
            "{name}: helm lint --strict:\n  {}",
            found.join("\n  ")
        );
    }
    // The linter does report: a value the schema refuses.
    let found = tools
        .lint(
            &chart::chart_dir(),
            &json!({"image": {"repository": IMAGE}, "logFormat": "xml"}),
            KUBERNETES[0],
        )
        .expect("helm lint");
    assert!(
        found.iter().any(|m| m.contains("logFormat")),
        "helm lint does not report a bad logFormat: {found:?}"
    );
}

/// The schema check can fail: an unknown field, a misspelt one and a wrong
/// type are each caught, in core objects and in the PodMonitor.
#[test]
fn validation_rejects_unknown_misspelt_and_mistyped_fields() {
    let Some(all) = rendered("validation_rejects_unknown_misspelt_and_mistyped_fields") else {
        return;
    };
    let tools = PythonTools::find().expect("tools");
    let r = all
        .iter()
        .find(|r| r.name == "json-logs-podmonitor")
        .expect("scenario");
    let find = |kind: &str| {
        r.objects
            .iter()
            .find(|o| o.kind() == kind)
            .unwrap_or_else(|| panic!("{kind}"))
            .clone()
    };
    let bad = |mut o: Object, edit: &dyn Fn(&mut Json), expect: &str| {
        edit(&mut o.value);
        let v = tools.validate(&[o], KUBERNETES[1]).expect("validate");
        let e = v[0]
            .error
            .clone()
            .unwrap_or_else(|| panic!("accepted, wanted {expect:?}"));
        assert!(e.contains(expect), "{expect:?} not in: {e}");
    };
    let ds = find("DaemonSet");
    bad(
        ds.clone(),
        &|v| v["spec"]["template"]["spec"]["hostPid"] = json!(true),
        "hostPid",
    );
    bad(
        ds.clone(),
        &|v| {
            v["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] =
                json!({})
        },
        "capabilites",
    );
    bad(
        ds.clone(),
        &|v| {
            v["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
                json!("15030")
        },
        "containerPort",
    );
    let pm = find("PodMonitor");
    bad(
        pm.clone(),
        &|v| v["spec"]["podMetricEndpoints"] = v["spec"]["podMetricsEndpoints"].clone(),
        "podMetricEndpoints",
    );
    bad(
        pm.clone(),
        &|v| v["spec"]["podMetricsEndpoints"][0]["honorLabels"] = json!("yes"),
        "honorLabels",
    );
    // The CRD's patterns come along: a Duration is Prometheus', not prose.
    bad(
        pm.clone(),
        &|v| v["spec"]["podMetricsEndpoints"][0]["interval"] = json!("30 seconds"),
        "interval",
    );
    let ok = tools.validate(&[ds, pm], KUBERNETES[1]).expect("validate");
    assert!(
        ok.iter().all(|v| v.error.is_none() && v.skipped.is_none()),
        "{ok:?}"
    );
}

/// The image must be named, with a hint, and values.schema.json refuses
/// what the templates could not use.
#[test]
fn a_missing_image_and_bad_values_are_refused_with_the_reason() {
    let Some(tools) =
        PythonTools::or_skip("a_missing_image_and_bad_values_are_refused_with_the_reason")
    else {
        return;
    };
    let dir = chart::chart_dir();
    let e = tools
        .render(&dir, &json!({}))
        .err()
        .expect("renders without an image");
    let e = format!("{e:#}");
    assert!(
        e.contains("image.repository is required") && e.contains("deploy/Dockerfile"),
        "{e}"
    );
    for (bad, says) in [
        (json!({"logFormat": "xml"}), "/logFormat"),
        (json!({"mesh": {"proxyUid": "1337"}}), "/mesh/proxyUid"),
        (json!({"tolerence": []}), "tolerence"),
        (json!({"image": {"digest": "latest"}}), "/image/digest"),
        (
            json!({"appArmor": {"profile": "unconfined"}}),
            "/appArmor/profile",
        ),
        (json!({"http": {"port": 70000}}), "/http/port"),
    ] {
        let mut v = json!({"image": {"repository": IMAGE}});
        chart::merge_values(&mut v, &bad);
        let e = tools
            .render(&dir, &v)
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"));
        assert!(format!("{e:#}").contains(says), "{bad}: {e:#}");
    }
    let mut v = json!({"image": {"repository": IMAGE}, "appArmor": {"profile": "Localhost"}});
    let e = tools
        .render(&dir, &v)
        .err()
        .expect("Localhost without a profile");
    assert!(
        format!("{e:#}").contains("appArmor.localhostProfile is required"),
        "{e:#}"
    );
    chart::merge_values(
        &mut v,
        &json!({"appArmor": {"localhostProfile": "meshlane"}}),
    );
    tools.render(&dir, &v).expect("Localhost with a profile");
    let v = json!({"image": {"repository": IMAGE}, "metrics": {"bindAddress": "127.0.0.1"}, "podMonitor": {"enabled": true}});
    let e = tools
        .render(&dir, &v)
        .err()
        .expect("PodMonitor for loopback metrics");
    assert!(format!("{e:#}").contains("loopback"), "{e:#}");
}

/// checkov's findings on every rendering: each is fixed, or its check id is
/// accepted in values.yaml with the reason; an accepted id no rendering
/// triggers any more must go from the list too.
#[test]
fn the_security_linter_finds_nothing_unexplained() {
    let Some(all) = rendered("the_security_linter_finds_nothing_unexplained") else {
        return;
    };
    let tools = PythonTools::find().expect("tools");
    let dir = tempdir("checkov");
    for r in all {
        let docs: Vec<String> = r
            .objects
            .iter()
            .map(|o| serde_yaml_ng::to_string(&o.value).expect("yaml"))
            .collect();
        std::fs::write(dir.join(format!("{}.yaml", r.name)), docs.join("---\n")).expect("write");
    }
    let findings = tools.checkov(&dir).expect("checkov");
    let values = std::fs::read_to_string(chart::chart_dir().join("values.yaml")).expect("values");
    let accepted = chart::accepted_findings(&values);
    let mut seen: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut new = Vec::new();
    for f in &findings {
        let file = Path::new(&f.file)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if accepted.contains_key(&f.id) {
            seen.entry(f.id.as_str()).or_default().insert(file);
        } else {
            new.push(format!("{} {} ({}, in {file})", f.id, f.name, f.resource));
        }
    }
    for (id, files) in &seen {
        eprintln!(
            "accepted {id} ({}): {}",
            files.iter().cloned().collect::<Vec<_>>().join(", "),
            accepted[*id]
        );
    }
    assert!(
        new.is_empty(),
        "checkov findings neither fixed nor accepted in values.yaml (`# checkov:accept ID: reason`):\n  {}",
        new.join("\n  ")
    );
    let stale: Vec<&String> = accepted
        .keys()
        .filter(|id| !seen.contains_key(id.as_str()))
        .collect();
    assert!(
        stale.is_empty(),
        "values.yaml accepts checks no rendering fails any more: remove {stale:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(what: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("meshlane-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[test]
fn committed_manifests_are_a_fresh_render_of_the_defaults() {
    let Some(tools) =
        PythonTools::or_skip("committed_manifests_are_a_fresh_render_of_the_defaults")
    else {
        return;
    };
    let files = chart::manifest_files(&tools, &chart::chart_dir()).expect("render");
    let dir = chart::manifests_dir();
    let mut names = BTreeSet::new();
    for (name, want) in &files {
        names.insert(name.clone());
        let p = dir.join(name);
        let got = std::fs::read_to_string(&p).unwrap_or_default();
        assert!(
            got == *want,
            "{} differs from a fresh render of deploy/chart/meshlane: run `cargo xtask render-manifests` and commit",
            p.display()
        );
    }
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("deploy/manifests")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(on_disk, names, "no stale files in deploy/manifests");
    let main = committed("meshlane.yaml", &json!({}));
    assert!(
        main.objects.iter().all(|o| o.hook().is_none()),
        "no hooks in meshlane.yaml"
    );
    let cleanup = committed("cleanup.yaml", &json!({"cleanup": {"enabled": true}}));
    assert_eq!(
        cleanup.objects.len(),
        1,
        "cleanup.yaml: the DaemonSet alone"
    );
    assert_eq!(
        cleanup.one("DaemonSet")["metadata"]["name"],
        main.one("DaemonSet")["metadata"]["name"],
        "cleanup.yaml replaces the agents' DaemonSet"
    );
}

#[test]
fn rbac_reads_pods_and_nothing_else() {
    let Some(all) = rendered("rbac_reads_pods_and_nothing_else") else {
        return;
    };
    for r in all {
        let name = r.name;
        let role = r.one("ClusterRole");
        assert_eq!(
            role["rules"],
            json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]),
            "{name}"
        );
        let binding = r.one("ClusterRoleBinding");
        assert_eq!(
            binding["roleRef"]["name"], role["metadata"]["name"],
            "{name}"
        );
        let sa = r.one("ServiceAccount");
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": chart::NAMESPACE}]),
            "{name}"
        );
        if r.cleanup_mode() {
            assert_eq!(
                r.pod()["automountServiceAccountToken"],
                json!(false),
                "{name}"
            );
        } else {
            assert_eq!(
                r.pod()["serviceAccountName"],
                sa["metadata"]["name"],
                "{name}"
            );
            // The uninstall guard needs no API access.
            let job = &r.one("Job")["spec"]["template"]["spec"];
            assert_eq!(job["automountServiceAccountToken"], json!(false), "{name}");
        }
    }
}

/// Scheduling and pod metadata follow the standard values.
#[test]
fn scheduling_and_pod_metadata_follow_the_values() {
    let Some(all) = rendered("scheduling_and_pod_metadata_follow_the_values") else {
        return;
    };
    for r in all {
        let name = r.name;
        let ds = r.one("DaemonSet");
        let pod = r.pod();
        let meta = &ds["spec"]["template"]["metadata"];
        for (key, value) in [
            ("tolerations", "tolerations"),
            ("nodeSelector", "nodeSelector"),
            ("imagePullSecrets", "imagePullSecrets"),
            ("affinity", "affinity"),
        ] {
            let want = r.v(value);
            let empty = want.is_null()
                || want.as_array().is_some_and(Vec::is_empty)
                || want.as_object().is_some_and(|m| m.is_empty());
            if empty {
                assert!(pod.get(key).is_none(), "{name}: {key}");
            } else {
                assert_eq!(&pod[key], want, "{name}: {key}");
            }
        }
        assert_eq!(
            ds["spec"]["updateStrategy"],
            *r.v("updateStrategy"),
            "{name}"
        );
        match r.v("priorityClassName").as_str() {
            Some("") => assert!(pod.get("priorityClassName").is_none(), "{name}"),
            p => assert_eq!(pod["priorityClassName"].as_str(), p, "{name}"),
        }
        // Extra labels never reach the selector (it cannot change on upgrade).
        let selector = &ds["spec"]["selector"]["matchLabels"];
        assert_eq!(selector.as_object().map(|m| m.len()), Some(3), "{name}");
        for (k, v) in selector.as_object().unwrap() {
            assert_eq!(&meta["labels"][k], v, "{name}: pods carry the selector");
        }
        for (k, v) in r.v("podLabels").as_object().into_iter().flatten() {
            assert_eq!(&meta["labels"][k], v, "{name}: podLabels");
        }
        for (k, v) in r.v("podAnnotations").as_object().into_iter().flatten() {
            assert_eq!(&meta["annotations"][k], v, "{name}: podAnnotations");
        }
        // Scrape annotations point where /metrics is, unless it is loopback only.
        let scrape = &meta["annotations"]["prometheus.io/scrape"];
        if r.cleanup_mode() || r.v("metrics.bindAddress") == &json!("127.0.0.1") {
            assert!(scrape.is_null(), "{name}: no scrape annotations");
        } else {
            assert_eq!(scrape, &json!("true"), "{name}");
            let port = if metrics_addr(r).is_some() {
                r.v("metrics.port")
            } else {
                r.v("http.port")
            };
            assert_eq!(
                meta["annotations"]["prometheus.io/port"],
                json!(port.to_string()),
                "{name}"
            );
            assert_eq!(
                meta["annotations"]["prometheus.io/path"],
                json!("/metrics"),
                "{name}"
            );
        }
        // The PodMonitor scrapes the port /metrics is on.
        if let Some(pm) = r.all("PodMonitor").first() {
            let ep = &pm.value["spec"]["podMetricsEndpoints"][0];
            let port = if metrics_addr(r).is_some() {
                "metrics"
            } else {
                "http"
            };
            assert_eq!(ep["port"], json!(port), "{name}");
            assert!(
                strings(&json!(r.agent()["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["name"].clone())
                    .collect::<Vec<_>>()))
                .contains(&port.to_string()),
                "{name}: the agent has a port named {port}"
            );
            assert_eq!(
                pm.value["spec"]["selector"]["matchLabels"], *selector,
                "{name}"
            );
            for (k, v) in r.v("podMonitor.labels").as_object().into_iter().flatten() {
                assert_eq!(&pm.value["metadata"]["labels"][k], v, "{name}");
            }
            if let Some(i) = r
                .v("podMonitor.interval")
                .as_str()
                .filter(|i| !i.is_empty())
            {
                assert_eq!(ep["interval"], json!(i), "{name}");
            }
        }
        // AppArmor and SELinux: the field, or the annotation for old clusters.
        let containers: Vec<&Json> = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(pod["initContainers"].as_array().into_iter().flatten())
            .filter(|c| c["name"] != "idle")
            .collect();
        for c in containers {
            let sc = &c["securityContext"];
            let cname = c["name"].as_str().unwrap();
            let annotation = &meta["annotations"]
                [format!("container.apparmor.security.beta.kubernetes.io/{cname}")];
            if r.v("appArmor.annotation") == &json!(true) {
                assert_eq!(annotation, &json!("unconfined"), "{name}: {cname}");
                assert!(sc.get("appArmorProfile").is_none(), "{name}: {cname}");
            } else {
                assert!(annotation.is_null(), "{name}: {cname}");
                assert_eq!(
                    sc["appArmorProfile"],
                    json!({"type": "Unconfined"}),
                    "{name}: {cname}"
                );
            }
            match r.v("seLinuxOptions") {
                Json::Null => assert!(sc.get("seLinuxOptions").is_none(), "{name}"),
                want => assert_eq!(&sc["seLinuxOptions"], want, "{name}: {cname}"),
            }
            assert_eq!(c["image"], json!(r.image()), "{name}: {cname}");
        }
    }
}

#[test]
fn daemonset_runs_on_the_node_with_named_capabilities_probes_and_host_mounts() {
    let Some(all) =
        rendered("daemonset_runs_on_the_node_with_named_capabilities_probes_and_host_mounts")
    else {
        return;
    };
    for r in all.iter().filter(|r| !r.cleanup_mode()) {
        let name = r.name;
        let ds = r.one("DaemonSet");
        let pod = r.pod();
        assert_eq!(pod["hostNetwork"], json!(true), "{name}");
        assert_eq!(
            pod["hostPID"],
            *r.v("hostPID"),
            "{name}: hostPID follows the value"
        );
        let c = r.agent();
        let sc = &c["securityContext"];
        assert_eq!(sc["privileged"], json!(false), "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], json!(false), "{name}");
        assert_eq!(sc["runAsUser"], json!(0), "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        let mut want = vec!["SYS_ADMIN"];
        if r.v("hostPID") == &json!(true) {
            want.push("SYS_PTRACE");
        }
        assert_eq!(strings(&sc["capabilities"]["add"]), want, "{name}");
        assert_eq!(c["resources"], *r.v("resources"), "{name}");

        // Probes reach the agent's HTTP port; /metrics has its own, if asked.
        let port = &c["ports"][0];
        assert_eq!(port["name"], json!("http"), "{name}");
        assert_eq!(port["containerPort"], *r.v("http.port"), "{name}");
        let metrics = metrics_addr(r).map(
            |_| json!({"name": "metrics", "containerPort": r.v("metrics.port"), "protocol": "TCP"}),
        );
        assert_eq!(c["ports"].get(1), metrics.as_ref(), "{name}");
        assert_eq!(
            c["ports"].as_array().map(Vec::len),
            Some(1 + usize::from(metrics.is_some())),
            "{name}"
        );
        assert_eq!(
            c["livenessProbe"]["httpGet"],
            json!({"path": "/healthz", "port": "http"}),
            "{name}"
        );
        assert_eq!(
            c["readinessProbe"]["httpGet"],
            json!({"path": "/readyz", "port": "http"}),
            "{name}"
        );

        // Stopping never detaches: preStop only reads, and nothing in the
        // agents' DaemonSet runs cleanup.
        let pre = strings(&c["lifecycle"]["preStop"]["exec"]["command"]);
        assert_eq!(
            &pre[..2],
            ["/usr/local/bin/meshlane", "status"],
            "{name}: {pre:?}"
        );
        assert!(
            !ds.to_string().contains("\"cleanup\""),
            "{name}: the agents' DaemonSet must never run meshlane cleanup"
        );

        // Host paths come from the values and land where the flags point.
        let mounts = mounts(pod, c);
        assert_eq!(
            mounts["/sys/fs/bpf"],
            (r.v("host.bpffs").as_str().unwrap().to_string(), false),
            "{name}"
        );
        assert_eq!(
            mounts["/host/cgroup"],
            (r.v("host.cgroup2").as_str().unwrap().to_string(), true),
            "{name}"
        );
        assert_eq!(
            mounts["/run/netns"],
            (r.v("host.netns").as_str().unwrap().to_string(), true),
            "{name}"
        );
        let props: Vec<(String, String)> = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| {
                Some((
                    m["mountPath"].as_str()?.into(),
                    m["mountPropagation"].as_str()?.into(),
                ))
            })
            .collect();
        assert!(
            props.contains(&("/sys/fs/bpf".into(), "HostToContainer".into())),
            "{name}"
        );
        assert!(
            props.contains(&("/run/netns".into(), "HostToContainer".into())),
            "{name}"
        );
    }
}

/// Uninstalling needs no node count: cleanup mode turns every node's pod
/// into `meshlane cleanup` (no capabilities) and an idle container, and
/// until then a pre-delete hook refuses `helm uninstall`, naming the fix.
#[test]
fn cleanup_mode_cleans_every_node_and_uninstall_waits_for_it() {
    let Some(all) = rendered("cleanup_mode_cleans_every_node_and_uninstall_waits_for_it") else {
        return;
    };
    for r in all {
        let name = r.name;
        let pod = r.pod();
        if r.cleanup_mode() {
            assert!(
                r.all("Job").is_empty(),
                "{name}: no uninstall guard in cleanup mode"
            );
            assert!(
                pod.get("hostNetwork").is_none() && pod.get("hostPID").is_none(),
                "{name}"
            );
            let init = pod["initContainers"].as_array().expect("init containers");
            let cni = r.v("cni.enabled") == &json!(true);
            assert_eq!(init.len(), 1 + usize::from(cni), "{name}");
            let c = init
                .iter()
                .find(|c| c["name"] == "cleanup")
                .expect("the cleanup init container");
            assert_eq!(
                strings(&c["command"]),
                ["/usr/local/bin/meshlane"],
                "{name}"
            );
            assert_eq!(strings(&c["args"])[0], "cleanup", "{name}");
            assert_eq!(
                c["securityContext"]["capabilities"],
                json!({"drop": ["ALL"]}),
                "{name}"
            );
            assert_eq!(
                mounts(pod, c).get("/sys/fs/bpf"),
                Some(&(r.v("host.bpffs").as_str().unwrap().to_string(), false)),
                "{name}"
            );
            let idle = &pod["containers"][0];
            assert_eq!(idle["image"], *r.v("cleanup.pauseImage"), "{name}");
            assert_eq!(
                idle["securityContext"]["runAsNonRoot"],
                json!(true),
                "{name}"
            );
            // The tolerations and node selection are the agents': every
            // node that had an agent gets a cleanup.
            assert_eq!(pod["tolerations"], *r.v("tolerations"), "{name}");
        } else {
            let job = r.one("Job");
            assert_eq!(
                job["metadata"]["annotations"]["helm.sh/hook"],
                json!("pre-delete"),
                "{name}"
            );
            assert!(
                job["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .ends_with("uninstall-needs-cleanup-enabled"),
                "{name}"
            );
            let spec = &job["spec"]["template"]["spec"];
            let c = &spec["containers"][0];
            assert_eq!(
                c["securityContext"]["capabilities"],
                json!({"drop": ["ALL"]}),
                "{name}"
            );
            assert!(
                spec.get("volumes").is_none(),
                "{name}: the guard touches nothing"
            );
            // The guard fails, and its log says what to do: meshlane
            // refuses the argument as a subcommand and prints it.
            let mut cmd = strings(&c["command"]);
            cmd.extend(strings(&c["args"]));
            assert_eq!(cmd[0], "/usr/local/bin/meshlane", "{name}");
            let out = Command::new(meshlane_bin())
                .args(&cmd[1..])
                .output()
                .expect("meshlane");
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{name}: the guard must fail");
            assert!(
                log.contains("cleanup.enabled=true")
                    && log.contains(&format!("helm upgrade {}", chart::RELEASE)),
                "{name}: the guard's log: {log}"
            );
        }
    }
}

/// cni.enabled adds the installer, which mounts the two CNI directories the
/// values name and chains the plugin with the node's paths, makes the state
/// directory the node's (the plugin reaches the agent's socket there), and
/// in cleanup mode an init container that unchains it; off, none of it
/// renders.
#[test]
fn the_cni_switch_installs_the_plugin_where_the_values_say() {
    let Some(all) = rendered("the_cni_switch_installs_the_plugin_where_the_values_say") else {
        return;
    };
    for r in all {
        let name = r.name;
        let pod = r.pod();
        let on = r.v("cni.enabled") == &json!(true);
        if !on {
            assert!(
                !r.objects
                    .iter()
                    .any(|o| o.value.to_string().contains("meshlane-cni")),
                "{name}"
            );
            continue;
        }
        let conf = r.v("cni.confDir").as_str().unwrap();
        let check_dirs = |c: &Json| {
            let m = mounts(pod, c);
            assert_eq!(
                m["/host/cni/bin"].0,
                r.v("cni.binDir").as_str().unwrap(),
                "{name}"
            );
            assert_eq!(m["/host/cni/net.d"].0, conf, "{name}");
            assert_eq!(
                c["securityContext"]["capabilities"],
                json!({"drop": ["ALL"]}),
                "{name}"
            );
            assert_eq!(
                c["command"],
                json!(["/usr/local/bin/meshlane-cni"]),
                "{name}"
            );
        };
        if r.cleanup_mode() {
            let u = pod["initContainers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "uninstall-cni")
                .expect("uninstall-cni in cleanup mode");
            assert_eq!(strings(&u["args"])[0], "uninstall", "{name}");
            check_dirs(u);
            continue;
        }
        let state = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "state")
            .expect("state volume");
        assert_eq!(state["hostPath"]["path"], json!("/run/meshlane"), "{name}");
        let c = r.container("install-cni");
        assert_eq!(c["image"], r.agent()["image"], "{name}");
        let args = strings(&c["args"]);
        assert_eq!(args[0], "install", "{name}");
        for want in [
            "--bin-dir=/host/cni/bin".to_string(),
            "--conf-dir=/host/cni/net.d".into(),
            format!("--host-conf-dir={conf}"),
            "--state-dir=/run/meshlane".into(),
        ] {
            assert!(args.contains(&want), "{name}: {want} in {args:?}");
        }
        check_dirs(c);
    }
}

/// mountPath -> (hostPath, readOnly) for the container's hostPath mounts.
fn mounts(pod: &Json, c: &Json) -> std::collections::BTreeMap<String, (String, bool)> {
    let mut out = std::collections::BTreeMap::new();
    for m in c["volumeMounts"].as_array().expect("mounts") {
        let vol = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("no volume for {m}"));
        if let Some(p) = vol["hostPath"]["path"].as_str() {
            out.insert(
                m["mountPath"].as_str().expect("path").to_string(),
                (p.to_string(), m["readOnly"] == json!(true)),
            );
        }
    }
    out
}

/// What a flag the chart passes must say, and the key `--print-options`
/// shows it under.
fn expected_flags(r: &Render, node: &str) -> Vec<(&'static str, &'static str, Json)> {
    let num = |p: &str| json!(r.v(p).as_f64().expect("number") as i64);
    let metrics = metrics_addr(r).map(|a| ("--metrics-addr", "metrics_addr", json!(a)));
    metrics
        .into_iter()
        .chain([
            ("--node-name", "node_name", json!(node)),
            (
                "--http-addr",
                "http_addr",
                json!(format!(
                    "{}:{}",
                    r.v("http.bindAddress").as_str().unwrap(),
                    r.v("http.port")
                )),
            ),
            (
                "--shortcut",
                "shortcut",
                json!(if r.v("shortcut.enabled") == &json!(true) {
                    "on"
                } else {
                    "off"
                }),
            ),
            (
                "--shortcut-max-queued",
                "shortcut_max_queued",
                num("shortcut.maxQueuedBytes"),
            ),
            ("--log-level", "log_level", r.v("logLevel").clone()),
            ("--log-format", "log_format", r.v("logFormat").clone()),
            ("--cgroup", "cgroup", json!("/host/cgroup")),
            ("--bpffs", "bpffs", json!("/sys/fs/bpf/meshlane")),
            ("--state-dir", "state_dir", json!("/run/meshlane")),
            ("--proxy-uid", "proxy_uid", num("mesh.proxyUid")),
            (
                "--outbound-capture-port",
                "outbound_capture_port",
                num("mesh.outboundCapturePort"),
            ),
            (
                "--inbound-capture-port",
                "inbound_capture_port",
                num("mesh.inboundCapturePort"),
            ),
            ("--max-pods", "max_pods", num("maxPods")),
        ])
        .chain(extra_args(r))
        .collect()
}

/// extraArgs as (flag, --print-options key, value).
fn extra_args(r: &Render) -> Vec<(&'static str, &'static str, Json)> {
    strings(r.v("extraArgs"))
        .into_iter()
        .map(|a| {
            let (flag, val) = a.split_once('=').expect("--flag=value");
            let key = flag.trim_start_matches('-').replace('-', "_");
            let want = val.parse::<i64>().map_or_else(|_| json!(val), |n| json!(n));
            // Leaked: a handful of short strings per test run.
            let flag: &'static str = Box::leak(flag.to_string().into_boxed_str());
            let key: &'static str = Box::leak(key.into_boxed_str());
            (flag, key, want)
        })
        .collect()
}

fn as_flag_text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// The kubelet's `$(VAR)` expansion of container args from the container's env.
fn expand(arg: &str, env: &[(String, String)]) -> String {
    let mut s = arg.to_string();
    for (k, v) in env {
        s = s.replace(&format!("$({k})"), v);
    }
    assert!(!s.contains("$("), "unresolved variable in {arg:?}");
    s
}

#[test]
fn chart_values_reach_the_agents_flags() {
    let help = Command::new(meshlane_bin())
        .args(["run", "--help"])
        .output()
        .expect("meshlane run --help");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let known =
        |flag: &str| help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n"));
    let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap_or("");
    let pods_required = usage.contains("--pods <FILE>") && !usage.contains("[--pods");
    let node = "node-test-1";
    let mut pending = BTreeSet::new();

    let Some(all) = rendered("chart_values_reach_the_agents_flags") else {
        return;
    };
    for r in all.iter().filter(|r| !r.cleanup_mode()) {
        let name = r.name;
        let c = r.agent();
        assert_eq!(c["command"], json!(["/usr/local/bin/meshlane"]), "{name}");
        let env: Vec<(String, String)> = c["env"]
            .as_array()
            .expect("env")
            .iter()
            .map(|e| {
                let v = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("spec.nodeName") => node.to_string(),
                    Some("status.hostIP") => HOST_IP.to_string(),
                    Some(other) => panic!("{name}: env from {other}: the test must learn it"),
                    None => e["value"].as_str().expect("value").to_string(),
                };
                (e["name"].as_str().expect("name").to_string(), v)
            })
            .collect();
        let args: Vec<String> = strings(&c["args"])
            .iter()
            .map(|a| expand(a, &env))
            .collect();
        assert_eq!(args[0], "run", "{name}");
        let table = expected_flags(r, node);
        let mut pass = vec!["run".to_string()];
        let mut checked = Vec::new();
        for a in &args[1..] {
            let (flag, val) = a
                .split_once('=')
                .unwrap_or_else(|| panic!("{name}: {a:?} is not --flag=value"));
            let (_, key, want) = table
                .iter()
                .find(|(f, _, _)| *f == flag)
                .unwrap_or_else(|| {
                    panic!(
                        "{name}: the chart passes {flag}, which this test does not check: add it"
                    )
                });
            // Every flag, existing in this agent or not: the rendered text.
            assert_eq!(val, as_flag_text(want), "{name}: {flag}");
            if known(flag) {
                pass.push(a.clone());
                checked.push((flag, *key, want.clone()));
            } else {
                pending.insert(flag.to_string());
            }
        }
        let seen: BTreeSet<&str> = args[1..]
            .iter()
            .filter_map(|a| a.split('=').next())
            .collect();
        for (flag, _, _) in &table {
            assert!(
                seen.contains(flag),
                "{name}: the chart does not pass {flag}"
            );
        }
        if pods_required {
            pass.push("--pods=/nonexistent/pods.yaml".into());
        }
        pass.push("--print-options".into());
        let out = Command::new(meshlane_bin())
            .args(&pass)
            .env_remove("MESHLANE_LOG")
            .env_remove("NODE_NAME")
            .output()
            .expect("meshlane run --print-options");
        assert!(
            out.status.success(),
            "{name}: meshlane {pass:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Json = serde_json::from_slice(&out.stdout).expect("--print-options prints JSON");
        for (flag, key, want) in &checked {
            let v = got.get(*key).unwrap_or_else(|| {
                panic!("{name}: --print-options has no {key:?} for {flag}: map the flag to its key here: {got:#}")
            });
            let same = v == want
                || (*key == "shortcut" && v == &json!(want == &json!("on")))
                || v.as_str() == Some(&as_flag_text(want));
            assert!(
                same,
                "{name}: {flag} reached the agent as {v}, the chart says {want}"
            );
        }
        if pods_required {
            eprintln!("NOTE: --pods is required by this agent: passed a placeholder; the chart relies on the Kubernetes API");
        } else {
            assert_eq!(
                got["pods"],
                Json::Null,
                "{name}: the chart reads pods from the API, no --pods"
            );
        }
        eprintln!(
            "{name}: {} flags checked through --print-options",
            checked.len()
        );
    }
    for p in &pending {
        eprintln!(
            "PENDING: this agent has no {p} yet: its value was checked in the rendered args only \
             (it is checked through --print-options automatically once the flag exists)"
        );
    }
}

#[test]
fn dockerfile_builds_with_the_project_recipe_and_runs_what_the_chart_runs() {
    let root = workspace_root();
    let docker = std::fs::read_to_string(root.join("deploy/Dockerfile")).expect("Dockerfile");
    let xtask = std::fs::read_to_string(root.join("xtask/src/main.rs")).expect("xtask");
    let build_rs = std::fs::read_to_string(root.join("agent/build.rs")).expect("agent/build.rs");
    let lines: Vec<&str> = docker.lines().map(str::trim).collect();

    let froms: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(
        froms.len(),
        2,
        "multi-stage: builder and runtime: {froms:?}"
    );
    assert!(froms[0].ends_with(" AS builder"), "{froms:?}");
    assert!(
        froms[1].contains("distroless/cc") || froms[1].contains("-slim"),
        "minimal runtime: {froms:?}"
    );

    // The same bpf-linker as `cargo xtask setup`, against the same LLVM.
    let version = xtask
        .lines()
        .find_map(|l| l.trim().strip_prefix("const BPF_LINKER_VERSION: &str = \""))
        .and_then(|l| l.strip_suffix("\";"))
        .expect("xtask's BPF_LINKER_VERSION");
    let linker = lines
        .iter()
        .find(|l| l.contains("cargo install") && l.contains("bpf-linker"))
        .expect("bpf-linker install");
    // (in the Dockerfile's command, in xtask's)
    for (docker_has, xtask_has) in [
        (
            format!("--version {version}"),
            "BPF_LINKER_VERSION".to_string(),
        ),
        (
            "--no-default-features".into(),
            "\"--no-default-features\"".into(),
        ),
        ("--features llvm-22".into(), "\"llvm-22\"".into()),
        (
            "LLVM_PREFIX=/usr/lib/llvm-22".into(),
            "\"LLVM_PREFIX\", \"/usr/lib/llvm-22\"".into(),
        ),
    ] {
        assert!(
            linker.contains(&docker_has),
            "{docker_has:?} not in {linker:?}"
        );
        assert!(
            xtask.contains(&xtask_has),
            "xtask's recipe has no {xtask_has}"
        );
    }
    assert!(
        docker.contains("llvm-22-dev libpolly-22-dev libzstd-dev"),
        "xtask's LLVM packages"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("rustup toolchain install nightly") && l.contains("rust-src")),
        "nightly with rust-src"
    );

    // The kernel object is built where agent/build.rs embeds it from, before the agent.
    let object = "target/bpfel-unknown-none/release/meshlane";
    assert!(
        build_rs.contains(&format!("../ebpf/programs/{object}")),
        "agent/build.rs reads {object}"
    );
    let ebpf = lines
        .iter()
        .position(|l| l.contains("cd ebpf/programs && cargo +nightly build --release"))
        .expect("eBPF build step, as `cargo xtask build-ebpf`");
    assert!(
        lines[ebpf + 1].contains(&format!("test -s {object}")),
        "the object is checked"
    );
    let agent = lines
        .iter()
        .position(|l| l.contains("cargo build --release --locked -p meshlane"))
        .expect("agent build");
    assert!(ebpf < agent, "eBPF object before the agent that embeds it");

    // The entrypoint is what the DaemonSet, cleanup mode and the uninstall
    // guard run (the committed manifests: the chart's defaults).
    let entry = lines
        .iter()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    let entry: Json = serde_json::from_str(entry).expect("exec-form ENTRYPOINT");
    let copy = lines
        .iter()
        .find(|l| l.starts_with("COPY --from=builder"))
        .expect("binary copied from the builder");
    assert!(
        copy.ends_with(entry[0].as_str().unwrap()),
        "{copy:?} vs {entry}"
    );
    let r = committed("meshlane.yaml", &json!({}));
    let cleanup = committed("cleanup.yaml", &json!({"cleanup": {"enabled": true}}));
    assert_eq!(r.agent()["command"], entry, "DaemonSet command");
    assert_eq!(
        cleanup.pod()["initContainers"][0]["command"],
        entry,
        "cleanup mode's command"
    );
    assert_eq!(
        r.agent()["lifecycle"]["preStop"]["exec"]["command"][0],
        entry[0],
        "preStop runs the same binary"
    );
    assert!(
        lines.contains(&"USER 0:0"),
        "runs as root (the chart's runAsUser 0)"
    );

    // Versions agree: chart appVersion, the default image tag, the workspace.
    let chart_meta = chart::read_yaml(&chart::chart_dir().join("Chart.yaml")).expect("Chart.yaml");
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let ws_version = cargo
        .lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| l.trim().strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("workspace version");
    assert_eq!(chart_meta["appVersion"], json!(ws_version));
    assert_eq!(
        r.agent()["image"],
        json!(format!("{}:{ws_version}", chart::MANIFEST_IMAGE)),
        "the default tag is the appVersion"
    );
}

// ---- the chart's capabilities on a real kernel --------------------------------

const READY: Duration = Duration::from_secs(10);

fn mtest() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mtest"))
}

/// `setpriv` giving exactly `caps` (Kubernetes names) to a root process, with
/// no_new_privs as `allowPrivilegeEscalation: false` sets it.
fn with_caps(caps: &[String]) -> Vec<String> {
    let mut set = String::from("-all");
    for c in caps {
        set.push_str(&format!(",+{}", c.to_ascii_lowercase()));
    }
    [
        "setpriv",
        &format!("--bounding-set={set}"),
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
    ]
    .map(String::from)
    .to_vec()
}

fn container_caps(c: &Json) -> Vec<String> {
    c["securityContext"]["capabilities"]["add"]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// A read-only bind mount of a cgroup, as the DaemonSet's /host/cgroup.
struct ReadOnlyBind(PathBuf);

impl ReadOnlyBind {
    fn new(src: &Path, at: PathBuf) -> Result<Self> {
        use nix::mount::{mount, MsFlags};
        std::fs::create_dir_all(&at)?;
        mount(Some(src), &at, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .context("bind mount")?;
        let guard = Self(at);
        mount(
            None::<&str>,
            &guard.0,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .context("remount read-only")?;
        Ok(guard)
    }
}

impl Drop for ReadOnlyBind {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Pod "a" (meshed, sidecar as uid 1337) and pod "b" (server on 9080).
struct Node {
    sb: Sandbox,
    a: Pod,
    b: Pod,
    log: PathBuf,
    _procs: Vec<Proc>,
}

fn node(tag: &str) -> Result<Node> {
    let mut sb = Sandbox::new(tag)?;
    let a = sb.add_pod("a")?;
    let b = sb.add_pod("b")?;
    let mut procs = vec![sb.start_server(&b, "b", &["0.0.0.0:9080"])?];
    let log = sb.dir().join("sidecar-a.jsonl");
    let mut sidecar = sb.spawn(
        &a,
        PROXY_UID,
        PROXY_UID,
        mtest(),
        &["sidecar", "--log", log.to_str().expect("utf-8")],
    )?;
    sidecar.wait_ready(READY)?;
    procs.push(sidecar);
    Ok(Node {
        sb,
        a,
        b,
        log,
        _procs: procs,
    })
}

impl Node {
    /// Where the app in A dialling B:9080 landed: Some(listener) if the sidecar got it.
    fn app_to_b(&self) -> Option<u16> {
        let to = format!("{}:9080", self.b.ip);
        let out = self
            .sb
            .run(
                &self.a,
                APP_UID,
                APP_UID,
                mtest(),
                &["probe", "--connect", &to],
            )
            .expect("probe");
        let p = ProbeResult::parse(&out).expect("probe output");
        assert!(p.connected, "app -> b: {p:?}");
        let local = p.local.clone().expect("local address");
        match read_sidecar_log(&self.log)
            .into_iter()
            .find(|r| r.peer == local)
        {
            Some(r) => Some(r.listener),
            None => {
                assert_eq!(
                    p.reply.as_ref().map(|r| r.server.as_str()),
                    Some("b"),
                    "{p:?}"
                );
                None
            }
        }
    }
}

/// Waits `for_` and returns Err with the reason if `pod` became active.
fn stays_inactive(agent: &mut Agent, pod: &str, for_: Duration) -> Result<String> {
    let start = Instant::now();
    while start.elapsed() < for_ {
        if let Some(s) = agent.exited() {
            return Ok(format!(
                "agent exited ({s}): {}",
                agent
                    .log()
                    .lines()
                    .find(|l| l.contains("Error"))
                    .unwrap_or("")
            ));
        }
        if let Ok(st) = agent.status() {
            if pod_state(&st, pod).as_deref() == Some("active") {
                bail!("{pod} became active");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = agent.status().ok();
    Ok(format!("{pod}: {:?}", st.and_then(|s| pod_state(&s, pod))))
}

#[test]
fn the_charts_capabilities_are_enough_and_each_is_needed() -> Result<()> {
    // The committed manifests: the chart's defaults, as a fresh render.
    let r = committed("meshlane.yaml", &json!({}));
    let caps = container_caps(r.agent());
    let cleanup_mode = committed("cleanup.yaml", &json!({"cleanup": {"enabled": true}}));
    let cleanup_pod = cleanup_mode.pod().clone();
    let job_caps = container_caps(&cleanup_pod["initContainers"][0]);
    assert!(!caps.is_empty());
    let n = node("deploycaps")?;
    let ro = ReadOnlyBind::new(n.sb.cgroup(), n.sb.dir().join("host-cgroup"))?;
    let pods = vec![PodSpec::meshed(&n.a), PodSpec::meshed(&n.b)];

    // Each capability removed in turn, and the set an eBPF agent is usually
    // given without SYS_ADMIN: the pods are never captured.
    let mut without: Vec<(String, Vec<String>)> = caps
        .iter()
        .map(|c| {
            (
                format!("without {c}"),
                caps.iter().filter(|x| *x != c).cloned().collect(),
            )
        })
        .collect();
    without.push((
        "BPF+PERFMON+NET_ADMIN, no SYS_ADMIN".into(),
        ["BPF", "PERFMON", "NET_ADMIN"].map(String::from).to_vec(),
    ));
    for (what, set) in without {
        let launch = Launch {
            wrapper: with_caps(&set),
            cgroup: Some(ro.0.clone()),
            ..Default::default()
        };
        let mut agent = Agent::spawn_with(&n.sb, &pods, &launch)?;
        let why = stays_inactive(&mut agent, "default/a", Duration::from_secs(4)).map_err(|e| {
            anyhow::anyhow!("{what}: {e}: the chart grants more than the agent needs")
        })?;
        eprintln!("{what} ({set:?}): not captured, as expected: {why}");
        drop(agent);
        assert_eq!(n.app_to_b(), None, "{what}: nothing may capture");
    }

    // Exactly the chart's set, attached through a read-only cgroup mount.
    let launch = Launch {
        wrapper: with_caps(&caps),
        cgroup: Some(ro.0.clone()),
        ..Default::default()
    };
    let mut agent = Agent::spawn_with(&n.sb, &pods, &launch)?;
    agent.wait_status(Duration::from_secs(15), |st| {
        pod_state(st, "default/a").as_deref() == Some("active")
    })?;
    assert_eq!(n.app_to_b(), Some(15001), "captured with exactly {caps:?}");
    eprintln!("with exactly {caps:?}: app -> b captured to 15001");

    // What the preStop hook runs only reads; SIGTERM does not detach. Its
    // exit code is the node's health, and here inbound capture cannot work
    // for b, which has no proxy (nor, today, for a, whose proxy listened
    // before the programs and is not found without hostPID): the hook fails
    // naming them, and the kubelet records that in a FailedPreStopHook event.
    let st = Command::new(meshlane_bin())
        .args(["status", "-o", "json", "--bpffs"])
        .arg(&agent.bpffs)
        .arg("--state-dir")
        .arg(&agent.state_dir)
        .output()?;
    let doc: Json = serde_json::from_slice(&st.stdout)
        .with_context(|| format!("status: {}", String::from_utf8_lossy(&st.stderr)))?;
    let problems = doc["problems"].as_array().context("problems")?;
    assert_eq!(st.status.code(), Some(1), "{doc:#}");
    assert!(
        problems.iter().all(|p| p["kind"] == "proxy-not-listening")
            && problems.iter().any(|p| p["subject"] == "default/b"),
        "{doc:#}"
    );
    let code = agent.stop()?;
    assert!(
        code.success(),
        "agent exit on SIGTERM: {code}\n{}",
        agent.log()
    );
    assert_eq!(
        n.app_to_b(),
        Some(15001),
        "interception stays after the agent stops"
    );

    // Cleanup mode's capabilities (none) remove everything.
    let empty_state = n.sb.dir().join("job-state");
    std::fs::create_dir_all(&empty_state)?;
    // Cleanup mode's own arguments, with its mount points moved to this sandbox's.
    let args: Vec<String> = strings(&cleanup_pod["initContainers"][0]["args"])
        .iter()
        .map(|a| {
            a.replace("/sys/fs/bpf/meshlane", &agent.bpffs.display().to_string())
                .replace("/run/meshlane", &empty_state.display().to_string())
        })
        .collect();
    assert_eq!(args[0], "cleanup");
    let mut cleanup = Command::new(&with_caps(&job_caps)[0]);
    cleanup
        .args(&with_caps(&job_caps)[1..])
        .arg(meshlane_bin())
        .args(&args);
    let out = cleanup.output()?;
    assert!(
        out.status.success(),
        "cleanup with {job_caps:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!agent.bpffs.exists(), "pins removed");
    // The kernel frees an unpinned link after an RCU grace period, so the
    // detach lands a moment after the unlink.
    let start = Instant::now();
    while n.app_to_b().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "still captured 3 s after the uninstall cleanup"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "cleanup with {job_caps:?}: detached within {:?}",
        start.elapsed()
    );
    // A second cleanup (the init container run again, as after a pod restart) also succeeds.
    let out = cleanup.output()?;
    assert!(
        out.status.success(),
        "second cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A process in a network namespace nobody pinned, running as another uid
/// (how pods look with runtimes that do not pin under /run/netns).
struct UnpinnedNetns(std::process::Child);

impl Drop for UnpinnedNetns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn with_host_pid_sys_ptrace_is_what_finds_unpinned_pod_namespaces() -> Result<()> {
    // The chart's defaults and, as hostPID: true adds it, SYS_PTRACE (the
    // rendering with hostPID is checked for exactly that set above).
    let r = committed("meshlane.yaml", &json!({"hostPID": true}));
    let mut caps = container_caps(r.agent());
    caps.push("SYS_PTRACE".into());
    assert!(caps.contains(&"SYS_PTRACE".to_string()), "{caps:?}");
    let n = node("deployptr")?;
    let hidden_ip = std::net::Ipv4Addr::new(10, 200, n.sb.index(), 250);
    let script = format!(
        "ip link set lo up && ip addr add {hidden_ip}/32 dev lo && exec setpriv --reuid={APP_UID} --regid={APP_UID} --clear-groups sleep 60"
    );
    let _hidden = UnpinnedNetns(
        Command::new("unshare")
            .args(["-n", "--", "sh", "-c", &script])
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut hidden = PodSpec::meshed(&n.a);
    hidden.name = "hidden".into();
    hidden.ip = Some(hidden_ip);
    let pods = vec![PodSpec::meshed(&n.a), hidden];

    let less: Vec<String> = caps
        .iter()
        .filter(|c| *c != "SYS_PTRACE")
        .cloned()
        .collect();
    let mut agent = Agent::spawn_with(
        &n.sb,
        &pods,
        &Launch {
            wrapper: with_caps(&less),
            cgroup: None,
            ..Default::default()
        },
    )?;
    agent.wait_status(Duration::from_secs(15), |st| {
        pod_state(st, "default/a").as_deref() == Some("active")
    })?;
    let why = stays_inactive(&mut agent, "default/hidden", Duration::from_secs(3))
        .map_err(|e| anyhow::anyhow!("without SYS_PTRACE: {e}"))?;
    eprintln!("without SYS_PTRACE: {why}");
    drop(agent);

    let mut agent = Agent::spawn_with(
        &n.sb,
        &pods,
        &Launch {
            wrapper: with_caps(&caps),
            cgroup: None,
            ..Default::default()
        },
    )?;
    agent.wait_status(Duration::from_secs(15), |st| {
        pod_state(st, "default/hidden").as_deref() == Some("active")
    })?;
    eprintln!("with {caps:?}: the unpinned namespace is found through /proc");
    Ok(())
}

// ---- migrating from Istio's iptables rules --------------------------------------

/// During a migration a pod can have Istio's rules (written by istio-init or
/// Istio's CNI before meshlane ran) and meshlane's programs at once. Every
/// connection must still reach the sidecar once, with the right original
/// destination: meshlane rewrites at connect() to 127.0.0.1:15001/15006,
/// which Istio's rules leave alone, and inbound stays with the rules until
/// the pod restarts without them.
#[test]
fn pods_keeping_istios_rules_during_the_migration_are_captured_once() -> Result<()> {
    use meshlane_tests::{data_dir, wait_sidecar_peer};
    let n = node("deploymig")?;
    let a_app = n.sb.start_server(&n.a, "a", &["0.0.0.0:9080"])?;
    n.sb.iptables_restore(&n.a, &data_dir().join("istio-cni/basic.rules"), false)?;
    let mut agent = Agent::start(&n.sb, &[PodSpec::meshed(&n.a), PodSpec::plain(&n.b)])?;
    let probe = |from: &Pod, uid: u32, to: &str| -> ProbeResult {
        let out =
            n.sb.run(from, uid, uid, mtest(), &["probe", "--connect", to])
                .expect("probe");
        ProbeResult::parse(&out).expect("probe output")
    };
    let once = |p: &ProbeResult, listener: u16, orig: &str, what: &str| {
        assert!(p.connected, "{what}: {p:?}");
        let local = p.local.clone().expect("local");
        let rec = wait_sidecar_peer(&n.log, &local).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(rec.listener, listener, "{what}: {rec:?}");
        assert_eq!(rec.orig_dst.as_deref(), Some(orig), "{what}: {rec:?}");
        let hops = read_sidecar_log(&n.log)
            .iter()
            .filter(|r| r.orig_dst.as_deref() == Some(orig))
            .count();
        assert_eq!(hops, 1, "{what}: reached the sidecar {hops} times");
    };
    let b9080 = format!("{}:9080", n.b.ip);
    let a9080 = format!("{}:9080", n.a.ip);
    once(
        &probe(&n.a, APP_UID, &b9080),
        15001,
        &b9080,
        "app -> b, rules and meshlane",
    );
    once(
        &probe(&n.a, PROXY_UID, &a9080),
        15006,
        &a9080,
        "proxy -> own pod IP",
    );
    let p = probe(&n.a, PROXY_UID, &b9080);
    assert_eq!(
        p.reply.as_ref().map(|r| r.server.as_str()),
        Some("b"),
        "proxy -> b direct: {p:?}"
    );
    // Inbound is the rules' (meshlane has no inbound capture yet).
    let p = probe(&n.b, APP_UID, &a9080);
    assert!(p.connected, "b -> a: {p:?}");
    let rec = wait_sidecar_peer(&n.log, p.local.as_deref().expect("local"))?;
    assert_eq!(
        (rec.listener, rec.orig_dst.as_deref()),
        (15006, Some(a9080.as_str())),
        "{rec:?}"
    );

    // The pod restarted without Istio's rules: meshlane alone captures it.
    n.sb.iptables_flush(&n.a)?;
    let c = probe(&n.a, APP_UID, &b9080);
    assert!(c.connected, "{c:?}");
    let rec = wait_sidecar_peer(&n.log, c.local.as_deref().expect("local"))?;
    assert_eq!(
        (rec.listener, rec.orig_dst.as_deref()),
        (15001, Some(b9080.as_str())),
        "{rec:?}"
    );
    agent.stop()?;
    drop(a_app);
    Ok(())
}

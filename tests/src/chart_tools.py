"""Helm's engine and the Kubernetes schema for tests/src/chart.rs.

Run with the Python of the venv `cargo xtask setup` makes (helm-python-sdk,
kubernetes-validate, cloudcoil-models-prometheus-operator). Reads a JSON
request on stdin, writes a JSON answer on stdout; errors go to stderr with
exit code 1 (a template's `required` or `fail` message among them).

    {"op": "render", "chart": DIR, "release": R, "namespace": NS, "values": {...}}
      -> {"helm": VERSION, "files": {"meshlane/templates/x.yaml": TEXT, ...}}
    {"op": "lint", "chart": DIR, "namespace": NS, "values": {...}, "kubernetes": "1.30.0"}
      -> {"messages": [{"severity": 1-3, "path": P, "error": TEXT}], "errors": [TEXT]}
    {"op": "validate", "kubernetes": "1.30.0", "objects": [{...}, ...]}
      -> {"results": [{"ok": bool, "skipped": REASON|null, "error": TEXT|null}, ...]}
"""

import json
import sys


def render(req):
    import helm_python as helm

    with helm.Chart.load(req["chart"]) as chart:
        # `helm install` and `helm template` check values.schema.json before
        # rendering; the SDK's render alone does not.
        chart.validate_schema(req["values"])
        files = chart.render(
            req["values"],
            name=req["release"],
            namespace=req["namespace"],
            is_install=True,
        )
    return {"helm": helm.helm_sdk_version(), "files": files}


def lint(req):
    import helm_python as helm

    # `helm lint --strict`: warnings count as errors.
    return helm.lint(
        req["chart"],
        req["values"],
        strict=True,
        namespace=req["namespace"],
        kube_version="v" + req["kubernetes"],
    )


def strip_none(v):
    if isinstance(v, dict):
        return {k: strip_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [strip_none(x) for x in v]
    return v


def diff(a, b, path, out):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k not in b:
                out.append(f"{path}.{k}: not in the CRD's schema")
            else:
                diff(a[k], b[k], f"{path}.{k}", out)
        for k in b:
            if k not in a:
                out.append(f"{path}.{k}: appears after the round trip")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{path}[{i}]", out)
    elif a != b:
        out.append(f"{path}: {a!r} reads back as {b!r}")


def validate_podmonitor(obj):
    """Prometheus Operator's CRD is not in kubernetes-validate. Its schema
    reaches us as the pydantic models cloudcoil generates from the CRD:
    parsed and dumped back, the object must come out unchanged (pydantic
    ignores unknown fields, so that is what catches them)."""
    try:
        from cloudcoil.models.prometheus_operator.v1 import PodMonitor
    except ImportError as e:
        return {"ok": True, "skipped": f"the PodMonitor CRD's models are not installed ({e})", "error": None}
    try:
        back = PodMonitor.model_validate(obj).model_dump(by_alias=True, exclude_none=True, mode="json")
    except Exception as e:  # pydantic's ValidationError names the field
        return {"ok": False, "skipped": None, "error": str(e)}
    problems = []
    diff(strip_none(obj), back, "", problems)
    return {"ok": not problems, "skipped": None, "error": "\n".join(problems) or None}


def validate(req):
    import functools

    import kubernetes_validate
    import kubernetes_validate.utils as kv_utils

    # It parses the (large) definitions file again for every object; the
    # schemas never change within a run.
    kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)

    results = []
    for obj in req["objects"]:
        if obj.get("apiVersion") == "monitoring.coreos.com/v1" and obj.get("kind") == "PodMonitor":
            results.append(validate_podmonitor(obj))
            continue
        try:
            kubernetes_validate.validate(obj, req["kubernetes"], strict=True)
            results.append({"ok": True, "skipped": None, "error": None})
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            results.append({"ok": False, "skipped": None, "error": f"{where}: {e.message}"})
        except kubernetes_validate.SchemaNotFoundError as e:
            results.append({"ok": False, "skipped": None, "error": e.message})
    return {"results": results}


def main():
    req = json.load(sys.stdin)
    op = {"render": render, "lint": lint, "validate": validate}[req["op"]]
    try:
        out = op(req)
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

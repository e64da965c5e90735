//! The shape of a JSON document (`-o json` of every command), checked key
//! by key, so that a schema change is made on purpose.
use serde_json::Value;

/// Checks `v` against `shape`, a JSON value that describes it:
/// - `"string"`, `"bool"`, `"u64"`, `"null"`; with a trailing `?` null is
///   allowed too;
/// - `[S]`: an array whose every element has shape S;
/// - `{"*": S}`: an object with any keys, every value of shape S;
/// - `{"?": S}`: null, or shape S;
/// - any other object: exactly these keys, each value of its shape.
///
/// Extra or missing keys fail: a schema change must be made here on purpose.
pub fn check_shape(v: &Value, shape: &Value, path: &str, errs: &mut Vec<String>) {
    let mut bad = |what: &str| errs.push(format!("{path}: {what}, got {v}"));
    match shape {
        Value::String(t) => {
            let (t, nullable) = match t.strip_suffix('?') {
                Some(t) => (t, true),
                None => (t.as_str(), false),
            };
            let ok = (nullable && v.is_null())
                || match t {
                    "string" => v.is_string(),
                    "bool" => v.is_boolean(),
                    "u64" => v.is_u64(),
                    "null" => v.is_null(),
                    // A document of its own (describe's recorded config).
                    "any" => !v.is_null(),
                    _ => panic!("unknown shape type {t}"),
                };
            if !ok {
                bad(&format!("expected {shape}"));
            }
        }
        Value::Array(s) => match v.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check_shape(item, &s[0], &format!("{path}[{i}]"), errs);
                }
            }
            None => bad("expected an array"),
        },
        Value::Object(s) if s.len() == 1 && s.contains_key("?") => {
            if !v.is_null() {
                check_shape(v, &s["?"], path, errs);
            }
        }
        Value::Object(s) => {
            let Some(obj) = v.as_object() else {
                return bad("expected an object");
            };
            if let Some(each) = s.get("*") {
                for (k, item) in obj {
                    check_shape(item, each, &format!("{path}.{k}"), errs);
                }
                return;
            }
            for k in obj.keys().filter(|k| !s.contains_key(*k)) {
                errs.push(format!("{path}: unexpected key {k:?}"));
            }
            for (k, each) in s {
                match obj.get(k) {
                    Some(item) => check_shape(item, each, &format!("{path}.{k}"), errs),
                    None => errs.push(format!("{path}: missing key {k:?}")),
                }
            }
        }
        _ => panic!("bad shape {shape}"),
    }
}

#[track_caller]
pub fn assert_shape(doc: &Value, shape: &Value, schema: &str) {
    assert_eq!(doc["schema"], schema, "{doc:#}");
    let mut errs = Vec::new();
    check_shape(doc, shape, "$", &mut errs);
    assert!(errs.is_empty(), "{}\n{doc:#}", errs.join("\n"));
}

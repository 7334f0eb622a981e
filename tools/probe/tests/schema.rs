//! The probe's real JSON validates against tools/probe/report.schema.json, checked by a tiny
//! validator for the subset of JSON Schema the file uses (type, enum, required, properties,
//! additionalProperties: false, items, $ref to #/definitions).

use serde_json::Value;

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => panic!("validator does not know type {t}"),
    }
}

fn validate(root: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.strip_prefix("#/definitions/").expect("only local refs");
        return validate(root, &root["definitions"][name], v, at, errs);
    }
    match schema.get("type") {
        Some(Value::String(t)) if !type_ok(t, v) => errs.push(format!("{at}: not {t}")),
        Some(Value::Array(ts)) if !ts.iter().any(|t| type_ok(t.as_str().unwrap(), v)) => {
            errs.push(format!("{at}: none of {ts:?}"))
        }
        _ => {}
    }
    if let Some(Value::Array(allowed)) = schema.get("enum") {
        if !allowed.contains(v) {
            errs.push(format!("{at}: {v} not in {allowed:?}"));
        }
    }
    if let (Some(obj), Some(props)) = (v.as_object(), schema.get("properties")) {
        for req in schema["required"].as_array().into_iter().flatten() {
            if !obj.contains_key(req.as_str().unwrap()) {
                errs.push(format!("{at}: missing {req}"));
            }
        }
        for (k, val) in obj {
            match props.get(k) {
                Some(s) => validate(root, s, val, &format!("{at}.{k}"), errs),
                None if schema["additionalProperties"] == Value::Bool(false) => {
                    errs.push(format!("{at}: unexpected {k}"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(s)) = (v.as_array(), schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            validate(root, s, item, &format!("{at}[{i}]"), errs);
        }
    }
}

fn schema() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/report.schema.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn real_report_validates_against_the_schema() {
    let report = vmm_probe::run(&vmm_probe::ProbeOpts::default()).unwrap();
    let json = serde_json::to_value(&report).unwrap();
    let schema = schema();
    let mut errs = Vec::new();
    validate(&schema, &schema, &json, "$", &mut errs);
    assert!(errs.is_empty(), "{errs:#?}");
}

#[test]
fn validator_rejects_what_the_schema_forbids() {
    let schema = schema();
    let bad = serde_json::json!({"version": 99, "host": {}, "kinds": [], "cells": [
        {"memory": "x", "mechanism": "nope", "outcome": {"kind": "works", "extra": 1},
         "evidence": "", "predicted": "", "matches_prediction": "yes"}
    ], "devices": [], "not_covered": []});
    let mut errs = Vec::new();
    validate(&schema, &schema, &bad, "$", &mut errs);
    let text = errs.join("\n");
    for want in [
        "$.version",
        "$.host: missing",
        "mechanism",
        "unexpected extra",
        "matches_prediction",
    ] {
        assert!(text.contains(want), "no error about {want}: {text}");
    }
}

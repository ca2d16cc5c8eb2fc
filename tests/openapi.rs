//! The OpenAPI document (docs/openapi.json, served at `GET /openapi.json`)
//! against the running daemon: every documented operation is called, each
//! answer's status must be documented for it and its JSON body must match
//! the documented schema (checked with a JSON Schema validator); and the
//! document's paths are exactly the routes of src/api.rs. So the document
//! cannot drift from the code.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn doc() -> Value {
    serde_json::from_str(fnrelay::api::OPENAPI).unwrap()
}

/// The documented path template that `path` (without query) matches.
fn template<'a>(doc: &'a Value, path: &str) -> Option<&'a str> {
    let path = path.split('?').next().unwrap();
    let parts: Vec<&str> = path.split('/').collect();
    doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .find(|t| {
            let tparts: Vec<&str> = t.split('/').collect();
            tparts.len() == parts.len()
                && tparts
                    .iter()
                    .zip(&parts)
                    .all(|(t, p)| (t.starts_with('{') && t.ends_with('}')) || t == p)
        })
}

/// Checks one answer against the document; returns the operation's key.
fn check(doc: &Value, method: &str, path: &str, status: u16, body: &str) -> String {
    let t = template(doc, path).unwrap_or_else(|| panic!("{path} is not in the document"));
    let op = &doc["paths"][t][method];
    assert!(op.is_object(), "{method} {t} is not in the document");
    let response = &op["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which the document does not list: {body}"
    );
    if let Some(schema) = response["content"]["application/json"]["schema"].as_object() {
        let instance: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{method} {path} {status}: not JSON ({e}): {body}"));
        let mut root = Value::Object(schema.clone());
        root["components"] = doc["components"].clone();
        let validator = jsonschema::validator_for(&root).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path} {status}: the body does not match the document: {errors:?}\n{body}"
        );
    }
    format!("{method} {t}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_documented() {
    let doc = doc();
    let d = start(
        r#"
[journal]
path = "{dir}/journal.db"
[delivery]
initial_backoff = "20ms"
max_backoff = "50ms"
max_attempts = 1
[streams.results]
backend = "file"
path = "{dir}/results.jsonl"
[queues.failures]
backend = "file"
path = "{dir}/nowhere/failures.jsonl"
[routes.default]
success = { kind = "STREAM", streamId = "results" }
failure = { kind = "QUEUE", queueId = "failures" }
"#,
    )
    .await;
    let deadline = (time::OffsetDateTime::now_utc() + Duration::from_secs(600))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (_, accepted) = d.post(&event("oa-1", 200)).await;
    let id = accepted["records"][0]["id"].as_str().unwrap().to_string();
    let dest = json!({"compartmentId": "ocid1.compartment.oc1..c",
                      "failure": {"kind": "STREAM", "streamId": "results"}});
    let calls: Vec<(&str, String, Option<Value>)> = vec![
        ("post", "/v1/completions".into(), Some(event("oa-2", 500))),
        (
            "post",
            "/v1/completions".into(),
            Some(json!({"completions": [event("oa-3", 200), event("oa-4", 200)]})),
        ),
        (
            "post",
            "/v1/completions".into(),
            Some(json!({"fnCallId": 7})),
        ),
        (
            "post",
            "/v1/completions".into(),
            Some({
                let mut e = event("oa-2", 200);
                e["functionId"] = json!("other");
                e
            }),
        ),
        (
            "post",
            "/v1/invocations".into(),
            Some(
                json!({"fnCallId": "oa-9", "functionId": "f", "applicationId": "a", "compartmentId": "c", "deadline": deadline}),
            ),
        ),
        (
            "post",
            "/v1/invocations".into(),
            Some(
                json!({"fnCallId": "oa-1", "functionId": "f", "applicationId": "a", "compartmentId": "c", "deadline": deadline}),
            ),
        ),
        (
            "post",
            "/v1/invocations".into(),
            Some(
                json!({"fnCallId": "oa-9", "functionId": "f", "applicationId": "a", "compartmentId": "c", "deadline": "soon"}),
            ),
        ),
        ("get", format!("/v1/records/{id}"), None),
        ("get", "/v1/records/01NOSUCH".into(), None),
        ("get", "/v1/records?fnCallId=oa-2".into(), None),
        ("get", "/v1/records".into(), None),
        ("get", "/v1/dead-letters".into(), None),
        (
            "post",
            "/v1/dead-letters/replay".into(),
            Some(json!({"all": true})),
        ),
        ("post", "/v1/dead-letters/replay".into(), Some(json!({}))),
        ("post", "/v1/admin/reload".into(), None),
        ("put", "/v1/functions/fx/destinations".into(), Some(dest)),
        (
            "put",
            "/v1/functions/fy/destinations".into(),
            Some(json!({"compartmentId": "c", "failure": {"kind": "QUEUE", "queueId": "nope"}})),
        ),
        ("get", "/v1/functions/fx/destinations".into(), None),
        ("get", "/v1/functions?limit=10".into(), None),
        ("delete", "/v1/functions/fx/destinations".into(), None),
        ("delete", "/v1/functions/fx/destinations".into(), None),
        ("get", "/v1/functions/fx/destinations".into(), None),
        ("get", "/metrics".into(), None),
        ("get", "/healthz".into(), None),
        ("get", "/readyz".into(), None),
        ("get", "/openapi.json".into(), None),
    ];
    // Let oa-2 (failure to a directory that does not exist... a file under
    // it is created) be delivered or dead-lettered first.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut covered = BTreeSet::new();
    for (method, path, body) in calls {
        let url = format!("{}{path}", d.url);
        let mut request = match method {
            "get" => d.http.get(url),
            "post" => d.http.post(url),
            "put" => d.http.put(url),
            _ => d.http.delete(url),
        };
        if let Some(body) = body {
            request = request.json(&body);
        }
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        covered.insert(check(&doc, method, &path, status, &text));
    }
    let documented: BTreeSet<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(t, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| format!("{m} {t}"))
        })
        .collect();
    let missed: Vec<_> = documented.difference(&covered).collect();
    assert!(missed.is_empty(), "operations not exercised: {missed:?}");
    let served: Value = d
        .http
        .get(format!("{}/openapi.json", d.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(served, doc, "the served document is docs/openapi.json");
    d.stop().await;
}

#[test]
fn the_documents_paths_are_the_routes_of_the_code() {
    let source =
        std::fs::read_to_string(format!("{}/src/api.rs", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut routes = BTreeSet::new();
    let mut rest = source.as_str();
    // The router's `.route("path", ...)` calls (a path literal first).
    while let Some(at) = rest.find(".route(") {
        rest = rest[at + ".route(".len()..].trim_start();
        if let Some(path) = rest.strip_prefix('"') {
            let end = path.find('"').unwrap();
            routes.insert(path[..end].to_string());
        }
    }
    let doc = doc();
    let documented: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        routes, documented,
        "src/api.rs routes vs docs/openapi.json paths"
    );
}

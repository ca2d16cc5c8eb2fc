//! Teams' own destinations (SPEC section 12): `PUT/GET/DELETE
//! /v1/functions/{functionId}/destinations` and `GET /v1/functions`;
//! precedence against inline destinations and the configuration's routes;
//! validation and policy; effective on every replica of a shared
//! PostgreSQL journal as soon as the PUT returns.

mod common;

use std::time::Duration;

use common::pg::TestDb;
use common::*;
use serde_json::json;

const RESOURCES: &str = r#"
[queues.failures]
backend = "file"
path = "{dir}/failures.jsonl"
[queues.fa]
backend = "file"
path = "{dir}/fa.jsonl"
[queues.team]
backend = "file"
path = "{dir}/team.jsonl"
[queues.secret]
backend = "file"
path = "{dir}/secret.jsonl"
[routes.default]
failure = { kind = "QUEUE", queueId = "failures" }
[routes.functions.fa]
failure = { kind = "QUEUE", queueId = "fa" }
[[policy.allow]]
compartment = "ocid1.compartment.oc1..c"
resources = ["queues.failures", "queues.fa", "queues.team"]
"#;

fn failed(call: &str, function: &str) -> serde_json::Value {
    let mut e = event(call, 500);
    e["functionId"] = json!(function);
    e
}

async fn put(d_url: &str, function: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .put(format!("{d_url}/v1/functions/{function}/destinations"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

/// The fnCallIds in a JSON-lines queue file.
fn calls(path: &std::path::Path) -> Vec<String> {
    read_lines(path)
        .iter()
        .map(|r| {
            r["data"]["request"]["fnCallId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn the_api_beats_the_configuration_and_inline_beats_the_api() {
    let d = start(&format!(
        "[journal]\npath = \"{{dir}}/journal.db\"\n{RESOURCES}"
    ))
    .await;
    let team = json!({"compartmentId": "ocid1.compartment.oc1..c",
                      "failure": {"kind": "QUEUE", "queueId": "team"}});
    // fb has only the default route; fa has a [routes.functions] entry.
    for f in ["fb", "fa"] {
        let (code, answer) = put(&d.url, f, team.clone()).await;
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["failure"]["queueId"], "team");
    }
    d.post(&failed("api-fb", "fb")).await;
    d.post(&failed("api-fa", "fa")).await;
    let mut inline = failed("inline-fb", "fb");
    inline["destinations"] = json!({"failure": {"kind": "QUEUE", "queueId": "failures"}});
    d.post(&inline).await;
    let dir = d.path().to_path_buf();
    wait_until("three records delivered", Duration::from_secs(10), || {
        let n = calls(&dir.join("team.jsonl")).len() + calls(&dir.join("failures.jsonl")).len();
        async move { n == 3 }
    })
    .await;
    assert_eq!(calls(&dir.join("team.jsonl")), ["api-fb", "api-fa"]);
    assert_eq!(calls(&dir.join("failures.jsonl")), ["inline-fb"]);
    assert!(calls(&dir.join("fa.jsonl")).is_empty());

    // GET shows it, the list pages, DELETE goes back to the configuration.
    let got: serde_json::Value = d
        .http
        .get(format!("{}/v1/functions/fb/destinations", d.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["failure"]["queueId"], "team");
    assert_eq!(got["updatedBy"], "(no token)");
    let list: serde_json::Value = d
        .http
        .get(format!("{}/v1/functions?limit=1", d.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["functions"][0]["functionId"], "fa");
    assert_eq!(list["next"], "fa");
    let status = d
        .http
        .delete(format!("{}/v1/functions/fb/destinations", d.url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 204);
    d.post(&failed("after-delete", "fb")).await;
    wait_until("back to the default route", Duration::from_secs(10), || {
        let n = calls(&dir.join("failures.jsonl")).len();
        async move { n == 2 }
    })
    .await;
    let status = d
        .http
        .get(format!("{}/v1/functions/fb/destinations", d.url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404);

    // Validation names the field; the policy answers 403.
    let (code, answer) = put(
        &d.url,
        "fc",
        json!({"compartmentId": "ocid1.compartment.oc1..c",
        "failure": {"kind": "QUEUE", "queueId": "nope"}}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(answer["fields"][0]["field"], "failure.queueId", "{answer}");
    let (code, answer) = put(
        &d.url,
        "fc",
        json!({"compartmentId": "ocid1.compartment.oc1..c",
        "failure": {"kind": "QUEUE", "queueId": "secret"}}),
    )
    .await;
    assert_eq!(code, 403, "{answer}");
    assert_eq!(answer["fields"][0]["field"], "failure.queueId");
    let (code, _) = put(
        &d.url,
        "fc",
        json!({"compartmentId": "ocid1.compartment.oc1..other",
        "failure": {"kind": "QUEUE", "queueId": "team"}}),
    )
    .await;
    assert_eq!(code, 403);
    let (code, answer) = put(
        &d.url,
        "fc",
        json!({"compartmentId": "ocid1.compartment.oc1..c",
        "failure": {"kind": "STREAM", "streamId": "x"}, "colour": 1}),
    )
    .await;
    assert_eq!(code, 400, "{answer}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_on_one_replica_holds_on_another_at_once() {
    let db = TestDb::create().await;
    let config = format!("{}{RESOURCES}", db.toml("30s"));
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().to_path_buf();
    let text = config.replace("{dir}", shared.to_str().unwrap());
    let one = start(&text).await;
    let two = start(&text).await;
    let (code, answer) = put(
        &one.url,
        "fz",
        json!({"compartmentId": "ocid1.compartment.oc1..c",
        "failure": {"kind": "QUEUE", "queueId": "team"}}),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    // Right after the PUT returned, the other replica routes by it.
    let (code, _) = two.post(&failed("replica-fz", "fz")).await;
    assert_eq!(code, 202);
    wait_until(
        "delivered to the team's queue",
        Duration::from_secs(15),
        || {
            let n = calls(&shared.join("team.jsonl")).len();
            async move { n == 1 }
        },
    )
    .await;
    assert_eq!(calls(&shared.join("team.jsonl")), ["replica-fz"]);
    one.stop().await;
    two.stop().await;
    db.drop_db().await;
}

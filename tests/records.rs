//! Finding a record (SPEC section 12): `GET /v1/records/{id}`,
//! `GET /v1/records?fnCallId=...` and `fnrelay records show`, against the
//! real binary: a record that failed twice and was dead-lettered shows its
//! state, destination, last error and each attempt.

mod common;

use std::time::Duration;

use common::process::{spawn, stop};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_record_shows_where_it_went_and_why() {
    let rx = Receiver::start().await;
    // Two server errors, then a refusal of the record itself.
    rx.script(&[(503, None), (503, None), (400, None)]);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[journal]
path = "data/journal.db"
[delivery]
initial_backoff = "20ms"
max_backoff = "50ms"
[streams.results]
backend = "file"
path = "data/results.jsonl"
[topics.hook]
backend = "webhook"
url = "{}"
allow_insecure_endpoint = true
allow_private_network = true
[routes.default]
success = {{ kind = "STREAM", streamId = "results" }}
failure = {{ kind = "NOTIFICATION", topicId = "hook" }}
"#,
        rx.url()
    );
    let p = spawn(dir.path(), &config, free_port()).await;
    let failed = post_many_to(&p.url, "lookup-failed", 1, 502).await;
    let ok = post_many_to(&p.url, "lookup-ok", 1, 200).await;
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        async move {
            let r = http.get(path).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let by_call = format!("{}/v1/records?fnCallId=lookup-failed-00000", p.url);
    wait_until(
        "the record is dead-lettered",
        Duration::from_secs(20),
        || {
            let by_call = by_call.clone();
            async move { get(by_call).await.1["state"] == "dead" }
        },
    )
    .await;
    let (status, record) = get(by_call).await;
    assert_eq!(status, 200);
    eprintln!("LOOKUP {}", serde_json::to_string_pretty(&record).unwrap());
    assert_eq!(record["id"], failed["lookup-failed-00000"].as_str());
    assert_eq!(record["attempts"], 3);
    assert_eq!(record["destination"]["type"], "Failure");
    assert_eq!(record["destination"]["kind"], "NOTIFICATION");
    assert_eq!(record["destination"]["resourceId"], "hook");
    assert_eq!(record["lastError"]["errorMessage"], "rejected");
    assert!(
        record["lastError"]["text"]
            .as_str()
            .unwrap()
            .contains("400"),
        "{record}"
    );
    let attempts = record["recentAttempts"].as_array().unwrap();
    let outcomes: Vec<(&str, &str)> = attempts
        .iter()
        .map(|a| {
            (
                a["outcome"].as_str().unwrap(),
                a["errorMessage"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("retry", "server_error"),
            ("retry", "server_error"),
            ("dead", "rejected")
        ]
    );
    assert!(
        attempts
            .iter()
            .all(|a| a["durationMs"].as_i64().unwrap() >= 0)
    );
    assert!(record["finishedAt"].is_string() && record["nextAttemptAt"].is_null());

    // The delivered one, by id.
    let id = ok["lookup-ok-00000"].clone();
    let by_id = format!("{}/v1/records/{id}", p.url);
    wait_until(
        "the success record is delivered",
        Duration::from_secs(20),
        || {
            let by_id = by_id.clone();
            async move { get(by_id).await.1["state"] == "delivered" }
        },
    )
    .await;
    let (_, record) = get(by_id).await;
    assert_eq!(record["destination"]["resourceId"], "results");
    assert_eq!(record["recentAttempts"][0]["outcome"], "success");

    // Unknown: 404 naming what was looked for.
    let (status, answer) = get(format!("{}/v1/records?fnCallId=never-posted", p.url)).await;
    assert_eq!(status, 404);
    assert!(answer["message"].as_str().unwrap().contains("never-posted"));

    // The CLI prints the same.
    let out = std::process::Command::new(binary())
        .args([
            "records",
            "show",
            "--fn-call-id",
            "lookup-failed-00000",
            "--url",
            &p.url,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["state"], "dead");
    assert_eq!(printed["recentAttempts"].as_array().unwrap().len(), 3);
    let out = std::process::Command::new(binary())
        .args(["records", "show", "01NOSUCHRECORD", "--url", &p.url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    stop(p).await;
}

//! The lost-completion watchdog against the real binary (SPEC section 12):
//! a missed deadline makes the failure record (also across a kill -9), a
//! completion that came first cancels it, a late completion gets the
//! watchdog record's id back and is not delivered twice.

mod common;

use std::time::Duration;

use common::process::{spawn, stop};
use common::*;
use serde_json::json;

const CONFIG: &str = r#"
[log]
format = "json"
[journal]
path = "data/journal.db"
[watchdog]
max_deadline = "1h"
poll_interval = "100ms"
[streams.results]
backend = "file"
path = "data/results.jsonl"
[queues.failures]
backend = "file"
path = "data/failures.jsonl"
[routes.default]
success = { kind = "STREAM", streamId = "results" }
failure = { kind = "QUEUE", queueId = "failures" }
"#;

fn started(call: &str, deadline: time::OffsetDateTime) -> serde_json::Value {
    json!({
        "fnCallId": call,
        "functionId": "ocid1.fnfunc.oc1..f",
        "applicationId": "ocid1.fnapp.oc1..a",
        "compartmentId": "ocid1.compartment.oc1..c",
        "deadline": deadline.format(&time::format_description::well_known::Rfc3339).unwrap(),
    })
}

async fn post(url: &str, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn failures(dir: &std::path::Path) -> Vec<serde_json::Value> {
    read_lines(&dir.join("data/failures.jsonl"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_deadline_makes_the_failure_record_even_across_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut p = spawn(dir.path(), CONFIG, port).await;
    let now = time::OffsetDateTime::now_utc();
    let soon = now + Duration::from_secs(1);

    // Bad deadlines are refused, naming the field and the limit.
    let (code, answer) = post(
        &p.url,
        "/v1/invocations",
        &started("bad", now - Duration::from_secs(5)),
    )
    .await;
    assert_eq!(code, 400, "{answer}");
    assert!(answer.to_string().contains("deadline"), "{answer}");
    let (code, answer) = post(
        &p.url,
        "/v1/invocations",
        &started("bad", now + Duration::from_secs(7200)),
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        answer.to_string().contains("watchdog.max_deadline"),
        "{answer}"
    );

    // A: never completes. B: completes before its deadline. C: its deadline
    // passes while the daemon is down.
    for (call, deadline) in [
        ("wd-a", soon),
        ("wd-b", soon),
        ("wd-c", now + Duration::from_secs(3)),
    ] {
        let (code, answer) = post(&p.url, "/v1/invocations", &started(call, deadline)).await;
        assert_eq!(code, 202, "{answer}");
        assert_eq!(answer["state"], "watching");
    }
    let (code, _) = post(&p.url, "/v1/completions", &event("wd-b", 200)).await;
    assert_eq!(code, 202);
    wait_until("A's failure record made", Duration::from_secs(10), || {
        let n = failures(dir.path()).len();
        async move { n >= 1 }
    })
    .await;
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let p = spawn(dir.path(), CONFIG, port).await;
    // At least once: the kill may land between A's write and its outcome
    // commit, so A may arrive twice, with the same id.
    let by_call = |dir: &std::path::Path| {
        let mut m: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
            Default::default();
        for r in failures(dir) {
            m.entry(
                r["data"]["request"]["fnCallId"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
            .or_default()
            .insert(r["id"].as_str().unwrap().to_string());
        }
        m
    };
    wait_until(
        "C's failure record made after the restart",
        Duration::from_secs(15),
        || {
            let n = by_call(dir.path()).len();
            async move { n >= 2 }
        },
    )
    .await;
    let calls = by_call(dir.path());
    assert_eq!(
        calls.keys().collect::<Vec<_>>(),
        ["wd-a", "wd-c"],
        "B completed first: no record for it"
    );
    assert!(
        calls.values().all(|ids| ids.len() == 1),
        "a copy carries the same id"
    );
    let got = failures(dir.path());
    let a = &got[0];
    eprintln!("WATCHDOG {a}");
    assert_eq!(a["data"]["response"]["status"], "504");
    assert_eq!(a["data"]["response"]["errorCode"], "FunctionInvokeTimeout");
    assert!(
        a["data"]["response"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("deadline"),
        "{a}"
    );
    let results = read_lines(&dir.path().join("data/results.jsonl"));
    assert_eq!(results.len(), 1, "B's own success record");

    // A's completion, late: its id is the watchdog record's; nothing new.
    let (code, answer) = post(&p.url, "/v1/completions", &event("wd-a", 500)).await;
    assert_eq!(code, 202, "{answer}");
    assert_eq!(answer["records"][0]["id"], a["id"]);
    // Registering a call whose record exists says so.
    let (code, answer) = post(
        &p.url,
        "/v1/invocations",
        &started("wd-a", now + Duration::from_secs(60)),
    )
    .await;
    assert_eq!((code, answer["state"].as_str()), (200, Some("completed")));
    let text = p.metrics().await;
    assert_eq!(
        metric(&text, "fnrelay_watchdog_total{result=\"fired\"}"),
        1.0,
        "C fired in this process"
    );
    assert_eq!(
        by_call(dir.path())
            .values()
            .map(|ids| ids.len())
            .sum::<usize>(),
        2,
        "not delivered again under a new id"
    );
    let lookup: serde_json::Value = reqwest::get(format!("{}/v1/records?fnCallId=wd-a", p.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(lookup["state"], "delivered");
    stop(p).await;
}

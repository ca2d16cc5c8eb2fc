//! The real `fnrelay` binary: kill -9 with records pending, SIGTERM, the
//! dead-letter log line, `check-config` and the `dead-letters` CLI.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::{spawn, stop};
use common::*;
use serde_json::json;

fn webhook_config(hook_port: u16) -> String {
    format!(
        r#"
[log]
format = "json"
[journal]
path = "data/journal.db"
[delivery]
workers = 16
initial_backoff = "100ms"
max_backoff = "500ms"
max_attempts = 1000
breaker_cool_down = "300ms"
[topics.hook]
backend = "webhook"
url = "http://127.0.0.1:{hook_port}/hook"
allow_insecure_endpoint = true
allow_private_network = true
[routes.default]
success = {{ kind = "NOTIFICATION", topicId = "hook" }}
failure = {{ kind = "NOTIFICATION", topicId = "hook" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_2000_pending_records_loses_none() {
    const N: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let hook_port = free_port();
    let port = free_port();
    let config = webhook_config(hook_port);
    let mut first = spawn(dir.path(), &config, port).await;

    // Post while the receiver is down: 50 concurrent clients, one event each.
    let http = reqwest::Client::new();
    let ids: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..50 {
        let (http, url, ids) = (http.clone(), first.url.clone(), ids.clone());
        clients.push(tokio::spawn(async move {
            for i in (c..N).step_by(50) {
                let call = format!("crash-{i:04}");
                let r = http
                    .post(format!("{url}/v1/completions"))
                    .json(&event(&call, if i % 3 == 0 { 500 } else { 200 }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
                let body: serde_json::Value = r.json().await.unwrap();
                let id = body["records"][0]["id"].as_str().unwrap().to_string();
                ids.lock().unwrap().insert(call, id);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let ids = ids.lock().unwrap().clone();
    assert_eq!(ids.len(), N);

    // kill -9 while records are pending and being retried.
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let rx = Receiver::start_on(format!("127.0.0.1:{hook_port}").parse().unwrap()).await;
    let second = spawn(dir.path(), &config, port).await;
    wait_until(
        "every record delivered",
        Duration::from_secs(120),
        || async {
            let seen: HashSet<String> = rx.seen().iter().map(|s| s.header("webhook-id")).collect();
            seen.len() >= N
        },
    )
    .await;

    let seen = rx.seen();
    let mut by_call: HashMap<String, Vec<String>> = HashMap::new();
    for s in &seen {
        let body = s.json();
        assert_eq!(body["id"].as_str().unwrap(), s.header("webhook-id"));
        let call = body["data"]["request"]["fnCallId"]
            .as_str()
            .unwrap()
            .to_string();
        by_call
            .entry(call)
            .or_default()
            .push(s.header("webhook-id"));
    }
    assert_eq!(by_call.len(), N, "every accepted record arrived");
    for (call, got) in &by_call {
        for id in got {
            assert_eq!(id, &ids[call], "{call}: a duplicate carries the same id");
        }
    }
    let duplicates = seen.len() - N;
    eprintln!(
        "kill -9 run: accepted {N}, received {} requests, {} distinct records, {duplicates} duplicates",
        seen.len(),
        by_call.len()
    );

    let text = reqwest::get(format!("{}/metrics", second.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let success = metric(
        &text,
        &deliveries("Success", "", "Success", "NOTIFICATION", "hook"),
    );
    let failure = metric(
        &text,
        &deliveries("Success", "", "Failure", "NOTIFICATION", "hook"),
    );
    assert_eq!(
        (success + failure) as usize,
        N,
        "the restarted daemon counts each delivery once"
    );
    assert_eq!(failure as usize, N.div_ceil(3));
    assert_eq!(metric(&text, "fnrelay_pending_records"), 0.0);
    stop(second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_and_keeps_undelivered_records_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let hook_port = free_port();
    let port = free_port();
    let config = webhook_config(hook_port);
    let first = spawn(dir.path(), &config, port).await;
    let http = reqwest::Client::new();
    let batch: Vec<_> = (0..50).map(|i| event(&format!("term-{i}"), 200)).collect();
    let r = http
        .post(format!("{}/v1/completions", first.url))
        .json(&json!({"completions": batch}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let log = stop(first).await;
    assert!(
        log.iter().any(|l| l.contains("fnrelay stopped")),
        "{log:#?}"
    );

    let rx = Receiver::start_on(format!("127.0.0.1:{hook_port}").parse().unwrap()).await;
    let second = spawn(dir.path(), &config, port).await;
    wait_until(
        "all 50 delivered after restart",
        Duration::from_secs(30),
        || async {
            rx.seen()
                .iter()
                .map(|s| s.header("webhook-id"))
                .collect::<HashSet<_>>()
                .len()
                == 50
        },
    )
    .await;
    stop(second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_log_line_and_cli_list_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    rx.script(&[(400, None)]);
    let port = free_port();
    let config = webhook_config(rx.addr.port());
    let p = spawn(dir.path(), &config, port).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/completions", p.url))
        .json(&event("dl-1", 503))
        .send()
        .await
        .unwrap();
    let id = r.json::<serde_json::Value>().await.unwrap()["records"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    wait_until("dead-letter log line", Duration::from_secs(10), || {
        let found = p.log.lock().unwrap().iter().any(|l| {
            l.contains("Invocation record delivery to failure destination failed due to - rejected: webhook answered 400")
        });
        async move { found }
    })
    .await;
    let line = p
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("failed due to"))
        .cloned()
        .unwrap();
    let json_line: serde_json::Value =
        serde_json::from_str(&line).expect("log.format = json gives JSON lines");
    assert_eq!(json_line["record_id"], id.as_str());
    assert_eq!(json_line["fn_call_id"], "dl-1");
    assert_eq!(json_line["attempts"], 1);

    let out = Command::new(binary())
        .args(["dead-letters", "--url", &p.url, "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["errorMessage"], "rejected");

    let out = Command::new(binary())
        .args(["dead-letters", "--url", &p.url, "replay", "--all"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"replayed\":1"));
    wait_until("replayed record delivered", Duration::from_secs(10), || {
        let n = rx.seen().len();
        async move { n == 2 }
    })
    .await;
    assert_eq!(rx.seen()[1].header("webhook-id"), id);
    stop(p).await;
}

#[test]
fn check_config_accepts_good_and_names_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(binary())
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };

    let out = run(&["check-config"]);
    assert!(out.status.success(), "embedded default is valid");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");
    // --offline: the example names brokers and queues this machine need not have.
    let out = run(&["check-config", "--offline", "--config", example]);
    assert!(
        out.status.success(),
        "config/example.toml is valid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let default = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
    let out = run(&["check-config", "--config", default]);
    assert!(out.status.success());

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[delivery]
max_record_age = "6h"
initial_backoff = "1h"
[queues.q]
backend = "file"
path = "q.jsonl"
[topics.t]
backend = "webhook"
url = "https://hooks.example.com/x"
secret_file = "/nonexistent/secret"
[routes.default]
failure = { kind = "QUEUE", queueId = "missing" }
"#,
    )
    .unwrap();
    let out = run(&["check-config", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "delivery.initial_backoff: 1h is more than delivery.max_backoff (5m)",
        "topics.t.secret_file: cannot read /nonexistent/secret",
        "routes.default.failure: queueId `missing` is not defined",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }

    std::fs::write(&bad, "[queues.q]\nbackend = \"kafka\"\n").unwrap();
    let out = run(&["check-config", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kafka"));

    let out = run(&["check-config", "--config", "/nonexistent/fnrelay.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/fnrelay.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_ingest_keeps_every_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let hook_port = free_port();
    let port = free_port();
    let config = webhook_config(hook_port);
    let mut first = spawn(dir.path(), &config, port).await;

    // 20 clients post as fast as they can; the daemon is killed while
    // requests are in flight. Only answers that said 202 count.
    let http = reqwest::Client::new();
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..20 {
        let (http, url, acked) = (http.clone(), first.url.clone(), acked.clone());
        clients.push(tokio::spawn(async move {
            for i in 0.. {
                let call = format!("mid-{c:02}-{i:05}");
                let Ok(r) = http
                    .post(format!("{url}/v1/completions"))
                    .json(&event(&call, 200))
                    .send()
                    .await
                else {
                    return;
                };
                if r.status() != 202 {
                    return;
                }
                let Ok(body) = r.json::<serde_json::Value>().await else {
                    return;
                };
                acked
                    .lock()
                    .unwrap()
                    .insert(call, body["records"][0]["id"].as_str().unwrap().to_string());
            }
        }));
    }
    wait_until("some records acknowledged", Duration::from_secs(30), || {
        let n = acked.lock().unwrap().len();
        async move { n >= 500 }
    })
    .await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let rx = Receiver::start_on(format!("127.0.0.1:{hook_port}").parse().unwrap()).await;
    let second = spawn(dir.path(), &config, port).await;
    wait_until(
        "every acknowledged record delivered",
        Duration::from_secs(120),
        || {
            let seen: HashSet<String> = rx.seen().iter().map(|s| s.header("webhook-id")).collect();
            let all = acked.values().all(|id| seen.contains(id));
            async move { all }
        },
    )
    .await;
    let seen = rx.seen();
    for s in &seen {
        let call = s.json()["data"]["request"]["fnCallId"]
            .as_str()
            .unwrap()
            .to_string();
        if let Some(id) = acked.get(&call) {
            assert_eq!(
                id,
                &s.header("webhook-id"),
                "{call}: same id as acknowledged"
            );
        }
    }
    let distinct: HashSet<String> = seen.iter().map(|s| s.header("webhook-id")).collect();
    eprintln!(
        "kill -9 mid-ingest: {} acknowledged, {} distinct delivered ({} committed without an answer reaching the client), {} requests",
        acked.len(),
        distinct.len(),
        distinct.len() - acked.len(),
        seen.len()
    );
    stop(second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_journal_is_refused_at_start() {
    // Two daemons on one journal would deliver and count every record
    // twice (a rolling update on a shared volume): the second must stop at
    // once with a clear message, and the first must keep working.
    let dir = tempfile::tempdir().unwrap();
    let config = webhook_config(free_port());
    let first = spawn(dir.path(), &config, free_port()).await;
    let path = dir.path().join("fnrelay.toml");
    let out = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || {
            Command::new(binary())
                .arg("--config")
                .arg(&path)
                .current_dir(&dir)
                .env(
                    "FNRELAY__SERVER__LISTEN",
                    format!("127.0.0.1:{}", free_port()),
                )
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!out.status.success(), "the second process must not run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is in use by another fnrelay process"),
        "names the reason: {err}"
    );
    let r = reqwest::get(format!("{}/readyz", first.url)).await.unwrap();
    assert_eq!(r.status(), 200, "the first keeps running");
}

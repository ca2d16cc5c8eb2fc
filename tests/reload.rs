//! Configuration reload against the real binary (SPEC section 9): SIGHUP
//! and `POST /v1/admin/reload` apply a good file, refuse a bad one with
//! every reason while the daemon keeps serving, add and remove resources,
//! and lose nothing when they happen under load.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::{Proc, spawn, stop};
use common::*;
use serde_json::json;

/// Rewrites the config file the daemon was started with.
fn rewrite(dir: &Path, config: &str) {
    std::fs::write(dir.join("fnrelay.toml"), config).unwrap();
}

async fn reload(p: &Proc) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/admin/reload", p.url))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// `fnrelay_config_info`'s hash label.
fn loaded_hash(metrics: &str) -> String {
    let line = metrics
        .lines()
        .find(|l| l.starts_with("fnrelay_config_info{"))
        .expect("fnrelay_config_info is exported");
    line.split('"').nth(1).unwrap().to_string()
}

const FILES: &str = r#"
[journal]
path = "data/journal.db"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_is_refused_with_every_reason_and_a_good_one_adds_a_resource() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path(), FILES, free_port()).await;
    let first_hash = loaded_hash(&p.metrics().await);

    // Three mistakes at once, one of them a key that needs a restart.
    let bad = FILES.replace(
        "[journal]\npath = \"data/journal.db\"",
        "[journal]\npath = \"data/other.db\"\n[delivery]\nmax_attempts = 0\nworkers = 0",
    );
    rewrite(dir.path(), &bad);
    let (code, answer) = reload(&p).await;
    assert_eq!(code, 422, "{answer}");
    let reasons = answer["reasons"].to_string();
    assert!(
        reasons.contains("delivery.max_attempts") && reasons.contains("delivery.workers"),
        "every invalid key is named: {answer}"
    );
    // Validation problems come first; the restart key is named once the
    // file is valid.
    rewrite(
        dir.path(),
        &FILES.replace("data/journal.db", "data/other.db"),
    );
    let (code, answer) = reload(&p).await;
    assert_eq!(code, 422, "{answer}");
    assert!(
        answer["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("journal.path: changes only with a restart"),
        "{answer}"
    );
    // SIGHUP with a file that does not parse: refused, logged, still serving.
    rewrite(dir.path(), "[server\nlisten = ");
    p.hangup();
    wait_until(
        "refused SIGHUP reload counted",
        Duration::from_secs(10),
        || async {
            metric(
                &p.metrics().await,
                "fnrelay_config_reloads_total{result=\"refused\"}",
            ) == 3.0
        },
    )
    .await;
    assert!(p.alive(), "SIGHUP does not kill the daemon");
    assert!(
        !p.log_lines("configuration reload refused").is_empty(),
        "the refusal is logged"
    );
    assert_eq!(
        loaded_hash(&p.metrics().await),
        first_hash,
        "old config stays"
    );
    let ids = post_many_to(&p.url, "still", 3, 200).await;
    assert_eq!(
        ids.len(),
        3,
        "ingest keeps working on the old configuration"
    );

    // A good file: a new stream, and the function f's success records go there.
    let good = format!(
        "{FILES}\n[streams.extra]\nbackend = \"file\"\npath = \"data/extra.jsonl\"\n\
         [routes.functions.\"ocid1.fnfunc.oc1..f\"]\n\
         success = {{ kind = \"STREAM\", streamId = \"extra\" }}\n\
         failure = {{ kind = \"QUEUE\", queueId = \"failures\" }}\n"
    );
    rewrite(dir.path(), &good);
    p.hangup();
    wait_until("applied SIGHUP reload", Duration::from_secs(10), || async {
        metric(
            &p.metrics().await,
            "fnrelay_config_reloads_total{result=\"applied\"}",
        ) == 1.0
    })
    .await;
    let new_hash = loaded_hash(&p.metrics().await);
    assert_ne!(new_hash, first_hash);
    let ids = post_many_to(&p.url, "extra", 5, 200).await;
    let path = dir.path().join("data/extra.jsonl");
    wait_until(
        "records in the added stream",
        Duration::from_secs(10),
        || {
            let n = read_lines(&path).len();
            async move { n == 5 }
        },
    )
    .await;
    let got: Vec<String> = read_lines(&path)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    for id in ids.values() {
        assert!(got.contains(id), "{id} delivered to streams.extra");
    }
    // The same file again through the API: applied, unchanged.
    let (code, answer) = reload(&p).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["changed"], false);
    assert_eq!(answer["hash"], new_hash.as_str());
    let log = stop(p).await;
    assert!(log.iter().any(|l| l.contains("configuration reloaded")));
}

fn hooks(url: &str, route_to: &str, concurrency: usize, grace: &str) -> String {
    format!(
        r#"
[journal]
path = "data/journal.db"
[delivery]
initial_backoff = "50ms"
max_backoff = "200ms"
breaker_cool_down = "200ms"
removed_resource_grace = "{grace}"
workers = {concurrency}
[topics.a]
backend = "webhook"
url = "{url}"
allow_insecure_endpoint = true
allow_private_network = true
concurrency = {concurrency}
max_batch = {concurrency}
[topics.b]
backend = "webhook"
url = "{url}"
allow_insecure_endpoint = true
allow_private_network = true
[routes.default]
success = {{ kind = "NOTIFICATION", topicId = "{route_to}" }}
failure = {{ kind = "NOTIFICATION", topicId = "{route_to}" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_nothing() {
    const N: usize = 3000;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(2));
    let dir = tempfile::tempdir().unwrap();
    let p = spawn(dir.path(), &hooks(&rx.url(), "a", 4, "5m"), free_port()).await;
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let posting = {
        let (url, acked) = (p.url.clone(), acked.clone());
        tokio::spawn(async move {
            for round in 0..30 {
                let ids = post_many_to(&url, &format!("load{round:02}"), N / 30, 200).await;
                acked.lock().unwrap().extend(ids);
            }
        })
    };
    // Reload ten times while posting: routes swap between a and b, limits
    // and the global cap change.
    for i in 0..10 {
        let (to, c) = if i % 2 == 0 { ("b", 1) } else { ("a", 16) };
        rewrite(dir.path(), &hooks(&rx.url(), to, c, "5m"));
        if i % 2 == 0 {
            p.hangup();
        } else {
            let (code, answer) = reload(&p).await;
            assert_eq!(code, 200, "{answer}");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    posting.await.unwrap();
    wait_until(
        "every record delivered",
        Duration::from_secs(60),
        || async { received(&rx).len() == N },
    )
    .await;
    let text = p.metrics().await;
    assert_eq!(
        metric(&text, "fnrelay_config_reloads_total{result=\"applied\"}"),
        10.0,
        "{text}"
    );
    wait_until("nothing pending", Duration::from_secs(20), || async {
        metric(&p.metrics().await, "fnrelay_pending_records") == 0.0
    })
    .await;
    assert_eq!(assert_conserved(&p.metrics().await), N as f64);
    let acked = acked.lock().unwrap().clone();
    account("ten reloads under load", N, &acked, &received(&rx), 0);
    stop(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_resource_keeps_its_records_through_the_grace_period() {
    let rx = Receiver::start().await;
    rx.set_default(503);
    let dir = tempfile::tempdir().unwrap();
    let only_b =
        |grace: &str| hooks(&rx.url(), "b", 4, grace).replace("[topics.a]", "[topics.gone]");
    let p = spawn(dir.path(), &hooks(&rx.url(), "a", 4, "30s"), free_port()).await;
    // Ten records for `a`, which is failing: they stay pending.
    let ids = post_many_to(&p.url, "kept", 10, 200).await;
    wait_until("attempts made", Duration::from_secs(10), || async {
        rx.seen().len() >= 10
    })
    .await;

    // `a` leaves the configuration: its records wait (30 s grace) ...
    rewrite(dir.path(), &only_b("30s"));
    let (code, answer) = reload(&p).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["removed"], json!(["topics.a"]));
    // ... and come back with it, to be delivered once it answers.
    rewrite(dir.path(), &hooks(&rx.url(), "a", 4, "30s"));
    let (code, answer) = reload(&p).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["added"], json!(["topics.a"]));
    rx.set_default(200);
    wait_until(
        "the kept records delivered",
        Duration::from_secs(20),
        || async {
            let got = received(&rx);
            let seen_ok = ids.keys().all(|c| got.contains_key(c));
            let text = p.metrics().await;
            seen_ok
                && metric(
                    &text,
                    &deliveries("Success", "", "Success", "NOTIFICATION", "a"),
                ) == 10.0
        },
    )
    .await;

    // Removed for longer than the grace period: dead-lettered as not_found.
    rx.set_default(503);
    let more = post_many_to(&p.url, "gone", 4, 200).await;
    assert_eq!(more.len(), 4);
    rewrite(dir.path(), &only_b("300ms"));
    let (code, answer) = reload(&p).await;
    assert_eq!(code, 200, "{answer}");
    wait_until(
        "dead-lettered after the grace",
        Duration::from_secs(20),
        || async {
            metric(
                &p.metrics().await,
                &deliveries("Error", "not_found", "Success", "NOTIFICATION", "a"),
            ) == 4.0
        },
    )
    .await;
    let text = p.metrics().await;
    assert_eq!(assert_conserved(&text), 14.0);
    stop(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_reloaded_with_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.token"), "secret-a\n").unwrap();
    std::fs::write(dir.path().join("b.token"), "secret-b\n").unwrap();
    let with = |file: &str| {
        format!(
            "{FILES}\n[[server.tokens]]\nname = \"sre\"\nfile = \"{file}\"\nscopes = [\"admin\"]\n"
        )
    };
    let p = spawn(dir.path(), &with("a.token"), free_port()).await;
    let http = reqwest::Client::new();
    let dead_letters = |token: &'static str| {
        let (http, url) = (http.clone(), p.url.clone());
        async move {
            http.get(format!("{url}/v1/dead-letters"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(dead_letters("secret-a").await, 200);
    assert_eq!(dead_letters("secret-b").await, 401);
    // The token's file changes in the configuration; the reload is asked
    // for with the old token and applies the new one.
    rewrite(dir.path(), &with("b.token"));
    let r = http
        .post(format!("{}/v1/admin/reload", p.url))
        .bearer_auth("secret-a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(dead_letters("secret-a").await, 401, "the old token is gone");
    assert_eq!(dead_letters("secret-b").await, 200, "the new one works");
    assert!(
        !p.log_lines("POST /v1/admin/reload by sre").is_empty(),
        "the reload names the token"
    );
    stop(p).await;
}

//! Replicas of the real binary sharing one PostgreSQL journal: a replica
//! killed mid-run, a replica paused past its lease, the database crashed and
//! restarted mid-run (a server of the test's own), and the same event posted
//! to two replicas at once.
//!
//! Each test prints one `FAULT` line: sent, acknowledged, delivered,
//! duplicates, dead, lost.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pg::{OwnServer, TestDb};
use common::process::{Proc, spawn, stop};
use common::*;
use serde_json::json;

fn config(journal: &str, hook: &str) -> String {
    format!(
        r#"
[log]
format = "json"
{journal}
[delivery]
initial_backoff = "50ms"
max_backoff = "300ms"
breaker_cool_down = "200ms"
attempt_timeout = "2s"
[topics.hook]
backend = "webhook"
url = "{hook}"
allow_insecure_endpoint = true
allow_private_network = true
[routes.default]
success = {{ kind = "NOTIFICATION", topicId = "hook" }}
failure = {{ kind = "NOTIFICATION", topicId = "hook" }}
"#
    )
}

async fn replica(root: &Path, n: usize, config: &str) -> Proc {
    let dir = root.join(format!("replica-{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    spawn(&dir, config, free_port()).await
}

/// Posts a batch to the first replica that takes it; returns the ids, or
/// None if none did.
async fn post_batch(
    http: &reqwest::Client,
    urls: &[String],
    start: usize,
    batch: &[serde_json::Value],
) -> Option<Vec<(String, String)>> {
    for k in 0..urls.len() {
        let url = &urls[(start + k) % urls.len()];
        let Ok(r) = http
            .post(format!("{url}/v1/completions"))
            .json(&json!({ "completions": batch }))
            .send()
            .await
        else {
            continue;
        };
        if r.status() != 202 {
            continue;
        }
        let Ok(body) = r.json::<serde_json::Value>().await else {
            continue;
        };
        return Some(
            body["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["fnCallId"].as_str().unwrap().to_string(),
                        r["id"].as_str().unwrap().to_string(),
                    )
                })
                .collect(),
        );
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_one_killed_mid_run_lose_nothing() {
    const N: usize = 20_000;
    let db = TestDb::create().await;
    let rx = Receiver::start().await;
    let root = tempfile::tempdir().unwrap();
    let config = config(&db.toml("5s"), &rx.url());
    let mut replicas = Vec::new();
    for n in 0..3 {
        replicas.push(replica(root.path(), n, &config).await);
    }
    let urls: Vec<String> = replicas.iter().map(|p| p.url.clone()).collect();
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let http = reqwest::Client::new();
    // Six clients post batches of 100 round-robin over the replicas.
    let batches: Vec<Vec<serde_json::Value>> = (0..N)
        .map(|i| event(&format!("three-{i:05}"), if i % 5 == 0 { 500 } else { 200 }))
        .collect::<Vec<_>>()
        .chunks(100)
        .map(<[_]>::to_vec)
        .collect();
    let queue = Arc::new(Mutex::new(
        batches.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (http, urls, queue, acked) = (http.clone(), urls.clone(), queue.clone(), acked.clone());
        clients.push(tokio::spawn(async move {
            loop {
                let Some((i, batch)) = queue.lock().unwrap().pop() else {
                    return;
                };
                let ids = post_batch(&http, &urls, i, &batch)
                    .await
                    .expect("a live replica takes the batch");
                let mut acked = acked.lock().unwrap();
                for (call, id) in ids {
                    if let Some(before) = acked.insert(call.clone(), id.clone()) {
                        assert_eq!(before, id, "{call}: one record id");
                    }
                }
            }
        }));
    }
    wait_until("a third acknowledged", Duration::from_secs(60), || {
        let n = acked.lock().unwrap().len();
        async move { n >= N / 3 }
    })
    .await;
    let mut killed = replicas.remove(1);
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), N);
    wait_until(
        "every acknowledged record delivered",
        Duration::from_secs(120),
        || {
            let n = received(&rx).len();
            async move { n >= N }
        },
    )
    .await;
    account("3 replicas, one killed", N, &acked, &received(&rx), 0);
    for p in replicas {
        stop(p).await;
    }
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_has_its_stale_outcomes_refused() {
    const N: usize = 300;
    let db = TestDb::create().await;
    let rx = Receiver::start().await;
    // Slow answers keep batches in flight when the replica is paused.
    rx.set_delay(Duration::from_millis(300));
    let root = tempfile::tempdir().unwrap();
    let config = config(&db.toml("3s"), &rx.url());
    let a = replica(root.path(), 0, &config).await;
    let mut acked = post_many_to(&a.url, "paused", N, 200).await;
    wait_until("a is sending", Duration::from_secs(20), || {
        let n = rx.seen().len();
        async move { n >= 1 }
    })
    .await;
    // Pause a with deliveries in flight; b takes its records over once the
    // leases end.
    let pid = a.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    rx.set_delay(Duration::ZERO);
    let b = replica(root.path(), 1, &config).await;
    acked.extend(post_many_to(&b.url, "paused-b", 100, 200).await);
    let b_delivered = deliveries("Success", "", "Success", "NOTIFICATION", "hook");
    // Every record arrived, and b re-sent the ones a was sending when it
    // stopped (after their leases ended): a's claims are stale now.
    wait_until(
        "b delivered every record, a's too",
        Duration::from_secs(60),
        || {
            let (distinct, copies) = (received(&rx).len(), rx.seen().len());
            async move { distinct >= N + 100 && copies > distinct }
        },
    )
    .await;
    let b_counted = metric(&b.metrics().await, &b_delivered);
    assert!(
        b_counted > 100.0,
        "b delivered a's records too: {b_counted}"
    );
    assert!(
        std::process::Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    // a wakes up and writes the outcomes of its old claims: refused, so the
    // counters of a and b together count each record once.
    wait_until("a answers again", Duration::from_secs(20), || async {
        reqwest::get(format!("{}/healthz", a.url)).await.is_ok()
    })
    .await;
    let total = || async {
        metric(&a.metrics().await, &b_delivered) + metric(&b.metrics().await, &b_delivered)
    };
    wait_until("every record counted", Duration::from_secs(30), || async {
        total().await >= (N + 100) as f64
    })
    .await;
    // a's outcomes for its old claims are refused (fenced), not counted.
    wait_until("a's stale outcomes refused", Duration::from_secs(20), || async {
        metric(
            &a.metrics().await,
            "fnrelay_outcomes_fenced_total{destination_kind=\"NOTIFICATION\",destination_id=\"hook\"}",
        ) >= 1.0
    })
    .await;
    assert_eq!(total().await, (N + 100) as f64, "each record counted once");
    account(
        "replica paused past its lease",
        N + 100,
        &acked,
        &received(&rx),
        0,
    );
    stop(a).await;
    stop(b).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run_gives_503s_and_loses_nothing() {
    let server = tokio::task::spawn_blocking(OwnServer::start).await.unwrap();
    let rx = Receiver::start().await;
    let journal = format!(
        "[journal]\nbackend = \"postgres\"\nurl = \"{}\"\nlease = \"5s\"\n",
        server.url()
    );
    let root = tempfile::tempdir().unwrap();
    let p = replica(root.path(), 0, &config(&journal, &rx.url())).await;
    let http = reqwest::Client::new();
    let mut acked = HashMap::new();
    let (mut sent, mut refused) = (0, 0);
    let mut post = async |i: usize| {
        let call = format!("cut-{i:05}");
        let r = http
            .post(format!("{}/v1/completions", p.url))
            .json(&event(&call, 200))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        if status == 202 {
            let body: serde_json::Value = r.json().await.unwrap();
            acked.insert(call, body["records"][0]["id"].as_str().unwrap().to_string());
        }
        status
    };
    for _ in 0..200 {
        assert_eq!(post(sent).await, 202);
        sent += 1;
    }
    // The database crashes (pg_ctl stop -m immediate).
    server.crash();
    for _ in 0..20 {
        let status = post(sent).await;
        sent += 1;
        assert!(status == 503 || status == 202, "{status}");
        if status == 503 {
            refused += 1;
        }
    }
    assert!(
        refused > 0,
        "ingest refuses while the journal is unreachable"
    );
    let ready = reqwest::get(format!("{}/readyz", p.url)).await.unwrap();
    assert_eq!(ready.status(), 503, "not ready without its journal");
    // It restarts (crash recovery): ingest and delivery resume without
    // restarting fnrelay.
    server.up();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = post(sent).await;
        sent += 1;
        if status == 202 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ingest accepts again in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acked_now = acked.clone();
    wait_until(
        "every acknowledged record delivered",
        Duration::from_secs(60),
        || {
            let got = received(&rx);
            let all = acked_now.keys().all(|c| got.contains_key(c));
            async move { all }
        },
    )
    .await;
    account("postgres restarted", sent, &acked, &received(&rx), 0);
    eprintln!("postgres restarted: {refused} of 20 posts answered 503 while it was down");
    stop(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_posted_to_two_replicas_at_once_is_one_record_delivered_once() {
    let db = TestDb::create().await;
    let rx = Receiver::start().await;
    let root = tempfile::tempdir().unwrap();
    let config = config(&db.toml("5s"), &rx.url());
    let a = replica(root.path(), 0, &config).await;
    let b = replica(root.path(), 1, &config).await;
    let http = reqwest::Client::new();
    let mut acked = HashMap::new();
    for i in 0..100 {
        let e = event(&format!("twice-{i:03}"), 500);
        let (ra, rb) = tokio::join!(
            http.post(format!("{}/v1/completions", a.url))
                .json(&e)
                .send(),
            http.post(format!("{}/v1/completions", b.url))
                .json(&e)
                .send(),
        );
        let (ra, rb): (serde_json::Value, serde_json::Value) = (
            ra.unwrap().json().await.unwrap(),
            rb.unwrap().json().await.unwrap(),
        );
        assert_eq!(
            ra["records"][0]["id"], rb["records"][0]["id"],
            "one record id"
        );
        acked.insert(
            format!("twice-{i:03}"),
            ra["records"][0]["id"].as_str().unwrap().to_string(),
        );
    }
    wait_until("delivered", Duration::from_secs(30), || {
        let n = received(&rx).len();
        async move { n >= 100 }
    })
    .await;
    let got = received(&rx);
    account("one event to two replicas", 200, &acked, &got, 0);
    let accepted = metric(&a.metrics().await, "fnrelay_events_accepted_total")
        + metric(&b.metrics().await, "fnrelay_events_accepted_total");
    assert_eq!(accepted, 100.0, "each event journaled once");
    assert!(got.values().all(|v| v.len() == 1), "delivered once each");
    stop(a).await;
    stop(b).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fnrelay_migrate_and_check_config_on_postgres() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fnrelay.toml");
    std::fs::write(&path, db.toml("30s")).unwrap();
    for _ in 0..2 {
        let out = std::process::Command::new(binary())
            .args(["--config", path.to_str().unwrap(), "migrate"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!(
                "journal schema at version {}",
                fnrelay::journal::SCHEMA_VERSION
            )
        );
    }
    let versions: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM fnrelay_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        versions as usize,
        fnrelay::journal::SCHEMA_VERSION,
        "each migration recorded once"
    );
    // check-config reads the version and changes nothing.
    let out = std::process::Command::new(binary())
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!(
        "schema version {}",
        fnrelay::journal::SCHEMA_VERSION
    )));
    // An unreachable database fails check-config, naming the key.
    std::fs::write(
        &path,
        format!(
            "[journal]\nbackend = \"postgres\"\nurl = \"postgres://postgres:s3cret@127.0.0.1:{}/x\"\n",
            free_port()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("journal.url"), "{err}");
    assert!(
        !err.contains("s3cret"),
        "the password is never shown: {err}"
    );
    // On the SQLite journal there is nothing to migrate: it says so.
    std::fs::write(&path, "[journal]\npath = \"j.db\"\n").unwrap();
    let out = std::process::Command::new(binary())
        .args(["--config", path.to_str().unwrap(), "migrate"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("postgres"));
    db.drop_db().await;
}

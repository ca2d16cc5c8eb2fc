//! The delivery engine (SPEC section 10) as users see it: the file
//! destination follows its path through rotation and deletion, a slow
//! destination does not hold a fast one's records, and an open breaker with
//! a backlog claims nothing but its probes.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

fn file_config(extra: &str) -> String {
    format!(
        r#"
[journal]
path = "{{dir}}/journal.db"
[delivery]
initial_backoff = "20ms"
max_backoff = "200ms"
breaker_cool_down = "100ms"
{extra}
[streams.results]
backend = "file"
path = "{{dir}}/out/results.jsonl"
[routes.default]
success = {{ kind = "STREAM", streamId = "results" }}
"#
    )
}

fn ids_in(path: &std::path::Path) -> HashSet<String> {
    if !path.exists() {
        return HashSet::new();
    }
    read_lines(path)
        .into_iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

async fn post_and_wait(d: &Daemon, prefix: &str, n: usize, total: f64) -> Vec<String> {
    let ids = post_many(d, prefix, n, 200).await;
    d.wait_metric(
        &deliveries("Success", "", "Success", "STREAM", "results"),
        total,
    )
    .await;
    ids.into_values().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_destination_follows_its_path_through_rename_delete_and_rmdir() {
    let d = start(&file_config("")).await;
    let out = d.path().join("out");
    let path = out.join("results.jsonl");

    let first = post_and_wait(&d, "before", 3, 3.0).await;
    assert!(first.iter().all(|id| ids_in(&path).contains(id)));

    // logrotate (or a consumer) renames the file.
    std::fs::rename(&path, out.join("results.jsonl.1")).unwrap();
    let after_rename = post_and_wait(&d, "renamed", 3, 6.0).await;
    let now = ids_in(&path);
    for id in &after_rename {
        assert!(
            now.contains(id),
            "{id} is in the file at the configured path"
        );
    }

    // Deleted.
    std::fs::remove_file(&path).unwrap();
    let after_delete = post_and_wait(&d, "deleted", 3, 9.0).await;
    let now = ids_in(&path);
    for id in &after_delete {
        assert!(now.contains(id), "{id} written after the delete");
    }

    // The whole directory removed.
    std::fs::remove_dir_all(&out).unwrap();
    let after_rmdir = post_and_wait(&d, "rmdir", 3, 12.0).await;
    let now = ids_in(&path);
    for id in &after_rmdir {
        assert!(
            now.contains(id),
            "{id} written after the directory was removed"
        );
    }
    let text = d.metrics().await;
    assert!(!text.contains("response_type=\"Error\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_webhook_does_not_hold_the_file_destination_next_to_it() {
    let slow = Receiver::start().await;
    slow.set_delay(Duration::from_secs(9));
    let toml = format!(
        r#"
[journal]
path = "{{dir}}/journal.db"
[delivery]
workers = 2
attempt_timeout = "20s"
[streams.results]
backend = "file"
path = "{{dir}}/results.jsonl"
# Small batches, several in flight: the fast lane needs shares of
# `workers` beyond its own first batch, while the slow lane holds them all.
concurrency = 4
max_batch = 8
[topics.slow]
backend = "webhook"
url = "{url}"
timeout = "15s"
allow_insecure_endpoint = true
allow_private_network = true
concurrency = 8
max_batch = 16
[routes.default]
success = {{ kind = "STREAM", streamId = "results" }}
failure = {{ kind = "NOTIFICATION", topicId = "slow" }}
"#,
        url = slow.url()
    );
    let d = start(&toml).await;
    // Fill the slow lane first: every one of its slots is busy for 9 s.
    post_many(&d, "slow", 200, 500).await;
    wait_until("the slow lane is busy", Duration::from_secs(5), || async {
        !slow.seen().is_empty()
    })
    .await;
    let started = std::time::Instant::now();
    let fast = post_many(&d, "fast", 1000, 200).await;
    d.wait_metric_for(
        &deliveries("Success", "", "Success", "STREAM", "results"),
        1000.0,
        Duration::from_secs(8),
    )
    .await;
    let took = started.elapsed();
    // Nothing of the slow lane has been answered yet: the fast lane
    // drained while every slow send was still waiting.
    let text = d.metrics().await;
    assert_eq!(
        metric(
            &text,
            &deliveries("Success", "", "Failure", "NOTIFICATION", "slow")
        ),
        0.0
    );
    assert!(took < Duration::from_secs(8), "fast lane took {took:?}");
    let got = ids_in(&d.path().join("results.jsonl"));
    assert!(fast.values().all(|id| got.contains(id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_with_a_backlog_claims_only_its_probes() {
    // Nothing listens: every send fails to connect (the destination's
    // failure). With the breaker open, the lane must not claim and release
    // its backlog over and over.
    let port = free_port();
    let toml = format!(
        r#"
[journal]
path = "{{dir}}/journal.db"
[delivery]
breaker_failure_threshold = 1
breaker_cool_down = "500ms"
[topics.down]
backend = "webhook"
url = "http://127.0.0.1:{port}/hook"
timeout = "1s"
allow_insecure_endpoint = true
allow_private_network = true
[routes.default]
success = {{ kind = "NOTIFICATION", topicId = "down" }}
"#
    );
    let d = start(&toml).await;
    post_many(&d, "backlog", 500, 200).await;
    let breaker =
        "fnrelay_circuit_breaker_state{destination_kind=\"NOTIFICATION\",destination_id=\"down\"}";
    let claimed =
        "fnrelay_records_claimed_total{destination_kind=\"NOTIFICATION\",destination_id=\"down\"}";
    wait_until("the breaker opens", Duration::from_secs(10), || async {
        metric(&d.metrics().await, breaker) >= 1.0
    })
    .await;
    let before = metric(&d.metrics().await, claimed);
    assert!(before >= 1.0, "the lane reports its claims");
    let window = Duration::from_secs(3);
    let t0 = std::time::Instant::now();
    tokio::time::sleep(window).await; // a measuring window, not a wait for a condition
    let during = metric(&d.metrics().await, claimed) - before;
    // One probe (one record) per cool-down at most, plus slack for timing.
    let probes = (t0.elapsed().as_millis() / 500) as f64 + 2.0;
    assert!(
        during <= probes,
        "claimed {during} records in {window:?} with the breaker open (at most {probes} probes)"
    );
    let text = d.metrics().await;
    assert_eq!(metric(&text, "fnrelay_pending_records"), 500.0);
    assert!(!text.contains("response_type=\"Error\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_cannot_be_opened_at_start_holds_records_until_it_can() {
    // The directory path is taken by a regular file: the destination cannot
    // be opened. The daemon still starts and accepts; the records wait
    // (the destination's failure, no attempts used) and arrive once an
    // operator frees the path.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("out"), "in the way").unwrap();
    let d = start_in(&file_config(""), dir).await;
    let ids = post_many(&d, "blocked", 5, 200).await;
    wait_until("the failure is seen", Duration::from_secs(10), || async {
        retries(&d.metrics().await, "STREAM", "results") >= 1.0
    })
    .await;
    let text = d.metrics().await;
    assert!(!text.contains("response_type=\"Error\""), "{text}");
    assert_eq!(metric(&text, "fnrelay_pending_records"), 5.0);
    std::fs::remove_file(d.path().join("out")).unwrap();
    d.wait_metric(
        &deliveries("Success", "", "Success", "STREAM", "results"),
        5.0,
    )
    .await;
    let got = ids_in(&d.path().join("out/results.jsonl"));
    assert!(ids.values().all(|id| got.contains(id)));
}

//! Throughput benchmark: the real daemon in-process on the embedded-default
//! shape (file destinations), driven over HTTP on loopback.
//!
//! `cargo bench --bench throughput` (env BENCH_EVENTS, BENCH_CLIENTS,
//! BENCH_BATCH, and BENCH_TARGET = file (default), amqp, nats-jetstream,
//! redis-streams, mqtt or nats: the broker targets need the local brokers).
//! Prints: accepted events/s (each 202 is after the journal's fsync) and
//! end-to-end events/s until every record is confirmed by its destination.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The resources and routes for a target; `{d}` is the temp dir, `{u}` a unique suffix.
fn target(name: &str) -> &'static str {
    match name {
        "file" => {
            r#"
[streams.results]
backend = "file"
path = "{d}/results.jsonl"
[queues.failures]
backend = "file"
path = "{d}/failures.jsonl"
[routes.default]
success = { kind = "STREAM", streamId = "results" }
failure = { kind = "QUEUE", queueId = "failures" }
"#
        }
        "amqp" => {
            r#"
[queues.q]
backend = "amqp"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "fnrelay-bench-{u}"
declare = true
[routes.default]
success = { kind = "QUEUE", queueId = "q", channelId = "fnrelay-bench-{u}" }
failure = { kind = "QUEUE", queueId = "q", channelId = "fnrelay-bench-{u}" }
"#
        }
        "nats-jetstream" => {
            r#"
[streams.s]
backend = "nats-jetstream"
url = "nats://127.0.0.1:4222"
subject = "fnrelay.bench.{u}"
stream = "FNRELAY_BENCH_{u}"
create_stream = true
[routes.default]
success = { kind = "STREAM", streamId = "s" }
failure = { kind = "STREAM", streamId = "s" }
"#
        }
        "redis-streams" => {
            r#"
[streams.s]
backend = "redis-streams"
url = "redis://127.0.0.1:6379"
stream_key = "fnrelay:bench:{u}"
[routes.default]
success = { kind = "STREAM", streamId = "s" }
failure = { kind = "STREAM", streamId = "s" }
"#
        }
        "mqtt" => {
            r#"
[topics.t]
backend = "mqtt"
url = "mqtt://127.0.0.1:1883"
topic = "fnrelay/bench/{u}"
[routes.default]
success = { kind = "NOTIFICATION", topicId = "t" }
failure = { kind = "NOTIFICATION", topicId = "t" }
"#
        }
        "nats" => {
            r#"
[topics.t]
backend = "nats"
url = "nats://127.0.0.1:4222"
subject = "fnrelay.bench.core.{u}"
[routes.default]
success = { kind = "NOTIFICATION", topicId = "t" }
failure = { kind = "NOTIFICATION", topicId = "t" }
"#
        }
        other => panic!("unknown BENCH_TARGET {other}"),
    }
}

fn main() {
    let events = env("BENCH_EVENTS", 20_000);
    let clients = env("BENCH_CLIENTS", 64);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for batch in [1, env("BENCH_BATCH", 100)] {
            run(events, clients, batch).await;
        }
    });
}

async fn run(events: usize, clients: usize, batch: usize) {
    let dir = tempfile::tempdir().unwrap();
    let name = std::env::var("BENCH_TARGET").unwrap_or_else(|_| "file".into());
    let unique = format!("{}_{batch}", std::process::id());
    let toml = format!(
        "[journal]\npath = \"{{d}}/journal.db\"\n[delivery]\nworkers = 32\n{}",
        target(&name)
    )
    .replace("{d}", &dir.path().display().to_string())
    .replace("{u}", &unique);
    let config = fnrelay::config::load(fnrelay::config::Source::Text(&toml)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let cancel = CancellationToken::new();
    let daemon = tokio::spawn(fnrelay::run(config, listener, cancel.clone()));
    let http = reqwest::Client::new();
    while http.get(format!("{url}/readyz")).send().await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let requests = events / batch;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for r in (c..requests).step_by(clients) {
                let completions: Vec<_> = (0..batch)
                    .map(|i| {
                        let n = r * batch + i;
                        serde_json::json!({
                            "fnCallId": format!("bench-{n}"),
                            "functionId": "ocid1.fnfunc.oc1..bench",
                            "applicationId": "ocid1.fnapp.oc1..bench",
                            "compartmentId": "ocid1.compartment.oc1..bench",
                            "status": if n.is_multiple_of(10) { 502 } else { 200 },
                        })
                    })
                    .collect();
                let body = if batch == 1 {
                    completions.into_iter().next().unwrap()
                } else {
                    serde_json::json!({ "completions": completions })
                };
                let resp = http
                    .post(format!("{url}/v1/completions"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 202);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let accepted = start.elapsed();
    let total = requests * batch;
    loop {
        let text = http
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let delivered: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("function_detached_deliveries_total{response_type=\"Success\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        if delivered as usize >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered = start.elapsed();
    println!(
        "{name}: batch={batch:>3} clients={clients} events={total}: accepted {:>8.0} events/s ({:.2}s), delivered end-to-end {:>8.0} events/s ({:.2}s)",
        total as f64 / accepted.as_secs_f64(),
        accepted.as_secs_f64(),
        total as f64 / delivered.as_secs_f64(),
        delivered.as_secs_f64(),
    );
    cancel.cancel();
    daemon.await.unwrap().unwrap();
}

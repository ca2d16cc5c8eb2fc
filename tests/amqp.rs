//! The `amqp` backend against the real RabbitMQ on 127.0.0.1:5672.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

const BROKER: &str = "127.0.0.1:5672";

fn config(addr: &str, extra: &str) -> String {
    format!(
        r#"{BROKER_PRELUDE}
[queues.jobs]
backend = "amqp"
url = "amqp://guest:guest@{addr}/%2f"
{extra}
[routes.default]
failure = {{ kind = "QUEUE", queueId = "jobs" }}
success = {{ kind = "QUEUE", queueId = "jobs" }}
"#
    )
}

/// Reads (and acks) every message of `queue`: (message_id, body, headers).
async fn drain(queue: &str) -> Vec<(String, serde_json::Value, String)> {
    let conn = Connection::connect(
        &format!("amqp://guest:guest@{BROKER}/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let props = &m.delivery.properties;
        let headers = format!("{:?}", props.headers());
        assert_eq!(*props.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            props.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        out.push((
            props.message_id().as_ref().unwrap().to_string(),
            serde_json::from_slice(&m.delivery.data).unwrap(),
            headers,
        ));
    }
    out
}

/// A connection to the test broker and a channel on it.
async fn broker() -> (Connection, lapin::Channel) {
    let conn = Connection::connect(
        &format!("amqp://guest:guest@{BROKER}/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = conn.create_channel().await.unwrap();
    (conn, channel)
}

/// Declares a durable queue on the broker, as an operator would.
async fn declare(queue: &str) {
    let (_conn, channel) = broker().await;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Whether a queue exists (a passive declare).
async fn exists(queue: &str) -> bool {
    let (_conn, channel) = broker().await;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok()
}

async fn delete(queue: &str) {
    let (_conn, channel) = broker().await;
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
}

#[tokio::test]
async fn records_arrive_persistent_with_message_id_and_channel_as_routing_key() {
    let queue = unique("fnrelay-amqp");
    // No `queue` key: the channelId is the routing key on the default
    // exchange, so it names the queue.
    declare(&queue).await;
    let d = start(&config(BROKER, "")).await;
    let mut e = event("amqp-1", 502);
    e["destinations"] =
        serde_json::json!({"failure": {"kind": "QUEUE", "queueId": "jobs", "channelId": queue}});
    let (_, answer) = d.post(&e).await;
    let id = answer["records"][0]["id"].as_str().unwrap().to_string();
    d.wait_metric(&deliveries("Success", "", "Failure", "QUEUE", "jobs"), 1.0)
        .await;
    let got = drain(&queue).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, id);
    assert_eq!(got[0].1["data"]["response"]["status"], "502");
    assert!(got[0].2.contains("function-id"), "{}", got[0].2);
    delete(&queue).await;
}

#[tokio::test]
async fn an_unroutable_record_waits_and_is_delivered_once_its_queue_exists() {
    // Unroutable means no queue is bound: the destination's failure, not the
    // record's (SPEC section 10). The record waits, using no attempts, and
    // arrives once an operator declares the queue.
    let missing = unique("fnrelay-nowhere");
    let d = start(&config(BROKER, &format!("routing_key = \"{missing}\""))).await;
    d.post(&event("amqp-unroutable", 200)).await;
    wait_until(
        "the unroutable publish is seen",
        Duration::from_secs(20),
        || async { retries(&d.metrics().await, "QUEUE", "jobs") >= 1.0 },
    )
    .await;
    let text = d.metrics().await;
    assert!(
        !text.contains("response_type=\"Error\""),
        "not dead-lettered: {text}"
    );
    assert_eq!(metric(&text, "fnrelay_pending_records"), 1.0);
    let conn = Connection::connect(
        &format!("amqp://guest:guest@{BROKER}/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    conn.create_channel()
        .await
        .unwrap()
        .queue_declare(
            missing.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    d.wait_metric_for(
        &deliveries("Success", "", "Success", "QUEUE", "jobs"),
        1.0,
        Duration::from_secs(30),
    )
    .await;
    let got = drain(&missing).await;
    assert_eq!(got.len(), 1);
    delete(&missing).await;
}

#[tokio::test]
async fn the_queue_key_publishes_to_that_queue_whatever_the_channel_id() {
    // The trap the shipped default route set: channelId = "failures" on the
    // default exchange named no queue, and every record came back. With
    // `queue`, the queue name is the routing key and the channelId travels
    // in the channel-id header.
    let queue = unique("fnrelay-amqp-queue");
    let d = start(
        &config(BROKER, &format!("queue = \"{queue}\"\ndeclare = true")).replace(
            "failure = { kind = \"QUEUE\", queueId = \"jobs\" }",
            "failure = { kind = \"QUEUE\", queueId = \"jobs\", channelId = \"failures\" }",
        ),
    )
    .await;
    let ids = post_many(&d, "amqp-queue", 50, 502).await;
    d.wait_metric(&deliveries("Success", "", "Failure", "QUEUE", "jobs"), 50.0)
        .await;
    let got = drain(&queue).await;
    assert_eq!(got.len(), 50);
    for (id, body, headers) in &got {
        assert!(ids.values().any(|v| v == id));
        assert_eq!(body["id"].as_str(), Some(id.as_str()));
        // The header's value, as lapin prints it: the bytes of "failures".
        let failures = format!("{:?}", b"failures".to_vec());
        assert!(
            headers.contains("channel-id") && headers.contains(&failures),
            "{headers}"
        );
    }
    let text = d.metrics().await;
    assert!(!text.contains("response_type=\"Error\""), "{text}");
    delete(&queue).await;
}

fn check_config(path: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(binary())
        .arg("check-config")
        .args(extra)
        .arg("--config")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn check_config_names_the_key_to_set_when_a_channel_id_routes_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = unique("fnrelay-nowhere");
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        config(BROKER, "")
            .replace("{dir}", dir.path().to_str().unwrap())
            .replace(
                "failure = { kind = \"QUEUE\", queueId = \"jobs\" }",
                &format!(
                    "failure = {{ kind = \"QUEUE\", queueId = \"jobs\", channelId = \"{nowhere}\" }}"
                ),
            ),
    )
    .unwrap();
    let (ok, _, err) = check_config(&path, &[]);
    assert!(!ok);
    assert!(
        err.contains(&format!("routing key `{nowhere}`"))
            && err.contains("routes.default.failure")
            && err.contains("set `queue = "),
        "{err}"
    );
}

#[tokio::test]
async fn check_config_declares_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("fnrelay-declare");
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        config(BROKER, &format!("queue = \"{queue}\"\ndeclare = true"))
            .replace("{dir}", dir.path().to_str().unwrap()),
    )
    .unwrap();
    let (ok, out, err) = check_config(&path, &[]);
    assert!(ok, "a queue the daemon will declare passes: {out}{err}");
    assert!(!exists(&queue).await, "check-config created nothing");
    let (ok, out, err) = check_config(&path, &["--declare"]);
    assert!(ok, "{out}{err}");
    assert!(exists(&queue).await, "--declare declared the queue");
    delete(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_message_is_logged_with_its_id_and_routing_key_never_its_body() {
    let missing = unique("fnrelay-returned");
    let dir = tempfile::tempdir().unwrap();
    let p = process::spawn(
        dir.path(),
        &config(BROKER, &format!("routing_key = \"{missing}\""))
            .replace("{dir}", dir.path().to_str().unwrap()),
        free_port(),
    )
    .await;
    let ids = post_many_to(&p.url, "returned-secret-call", 1, 200).await;
    let id = ids.values().next().unwrap().clone();
    wait_until(
        "the returned message is logged",
        Duration::from_secs(20),
        || {
            let found = !p.log_lines("returned the message").is_empty();
            async move { found }
        },
    )
    .await;
    let line = p.log_lines("returned the message").remove(0);
    assert!(line.contains(&id) && line.contains(&missing), "{line}");
    let log = process::stop(p).await;
    assert!(
        !log.iter()
            .any(|l| l.contains("returned-secret-call")
                || l.contains("Server returned us a message")),
        "the record's body is never logged:\n{}",
        log.join("\n")
    );
}

#[test]
fn check_config_fails_when_the_queue_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = unique("fnrelay-missing");
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        config(BROKER, &format!("queue = \"{missing}\""))
            .replace("{dir}", dir.path().to_str().unwrap()),
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "queues.jobs: queue `{missing}` does not exist on the broker"
        )),
        "{err}"
    );
    let out = std::process::Command::new(binary())
        .args([
            "check-config",
            "--offline",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "--offline does not connect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_mid_run_loses_nothing() {
    let queue = unique("fnrelay-amqp-cut");
    {
        // Declared up front: the proxy test is about the connection, not declaration.
        let conn = Connection::connect(
            &format!("amqp://guest:guest@{BROKER}/%2f"),
            ConnectionProperties::default(),
        )
        .await
        .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    let proxy = Proxy::start(BROKER).await;
    let d = start(&config(
        &proxy.addr.to_string(),
        &format!("routing_key = \"{queue}\""),
    ))
    .await;
    let ids = run_with_outage(&d, &proxy, "amqp-cut", "QUEUE", "jobs", "Success").await;
    let got: Vec<_> = drain(&queue)
        .await
        .into_iter()
        .map(|(id, body, _)| (id, body))
        .collect();
    let dups = assert_all_arrived(&ids, &got);
    eprintln!(
        "amqp outage run: {} records, {} messages, {dups} duplicates",
        ids.len(),
        got.len()
    );
    delete(&queue).await;
    tokio::time::timeout(Duration::from_secs(30), d.stop())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_resets_and_drops_between_the_binary_and_rabbitmq_lose_nothing() {
    let queue = unique("fnrelay-amqp-chaos");
    {
        let conn = Connection::connect(
            &format!("amqp://guest:guest@{BROKER}/%2f"),
            ConnectionProperties::default(),
        )
        .await
        .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    let proxy = Proxy::start_chaos(BROKER).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[log]\nformat = \"json\"\n{}",
        config(
            &proxy.addr.to_string(),
            &format!("routing_key = \"{queue}\"\nconfirm_timeout = \"3s\"")
        )
    );
    let ids = run_with_chaos(
        dir.path(),
        &config,
        &proxy,
        "amqp-chaos",
        ("QUEUE", "jobs", "Failure"),
        2000,
    )
    .await;
    let got: Vec<_> = drain(&queue)
        .await
        .into_iter()
        .map(|(id, body, _)| (id, body))
        .collect();
    let dups = assert_all_arrived(&ids, &got);
    eprintln!(
        "FAULT amqp chaos proxy: sent {n}, acknowledged {n}, delivered {n}, duplicates {dups}, dead 0, lost 0",
        n = ids.len()
    );
    delete(&queue).await;
}

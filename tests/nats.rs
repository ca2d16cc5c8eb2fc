//! The core `nats` backend against the real NATS server on 127.0.0.1:4222.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;

fn config(addr: &str, subject: &str) -> String {
    format!(
        r#"{BROKER_PRELUDE}
[topics.events]
backend = "nats"
url = "nats://{addr}"
subject = "{subject}"
[routes.default]
success = {{ kind = "NOTIFICATION", topicId = "events" }}
failure = {{ kind = "NOTIFICATION", topicId = "events" }}
"#
    )
}

#[tokio::test]
async fn records_reach_a_live_subscriber_with_msg_id() {
    let subject = format!("fnrelay.core.{}", unique("s").replace('-', "_"));
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let mut sub = client.subscribe(subject.clone()).await.unwrap();
    client.flush().await.unwrap();
    let d = start(&config("127.0.0.1:4222", &subject)).await;
    let ids = post_many(&d, "nats", 50, 200).await;
    d.wait_metric(
        &deliveries("Success", "", "Success", "NOTIFICATION", "events"),
        50.0,
    )
    .await;
    let mut got = Vec::new();
    while got.len() < 50 {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap()
            .unwrap();
        let id = m
            .headers
            .as_ref()
            .unwrap()
            .get("Nats-Msg-Id")
            .unwrap()
            .to_string();
        got.push((id, serde_json::from_slice(&m.payload).unwrap()));
    }
    assert_eq!(assert_all_arrived(&ids, &got), 0);
}

#[tokio::test]
async fn an_unreachable_server_is_retried_as_connection_failed() {
    let d = start(&config(
        &format!("127.0.0.1:{}", free_port()),
        "fnrelay.none",
    ))
    .await;
    d.post(&event("nats-down", 200)).await;
    wait_until("retried", Duration::from_secs(15), || async {
        metric(
            &d.metrics().await,
            "fnrelay_delivery_attempts_total{outcome=\"unavailable\",error_message=\"connection_failed\",destination_kind=\"NOTIFICATION\",destination_id=\"events\"}",
        ) >= 1.0
    })
    .await;
    assert_eq!(metric(&d.metrics().await, "fnrelay_pending_records"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_mid_run_loses_nothing_for_a_connected_subscriber() {
    // Publish + flush means the server has the message, so a subscriber
    // that stays connected gets every record even when fnrelay's own
    // connection is cut (a disconnected subscriber would not: at most once).
    let subject = format!("fnrelay.core.cut.{}", unique("s").replace('-', "_"));
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let mut sub = client.subscribe(subject.clone()).await.unwrap();
    client.flush().await.unwrap();
    let got: std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>> =
        Default::default();
    let sink = got.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let id = m
                .headers
                .as_ref()
                .unwrap()
                .get("Nats-Msg-Id")
                .unwrap()
                .to_string();
            sink.lock()
                .unwrap()
                .push((id, serde_json::from_slice(&m.payload).unwrap()));
        }
    });
    let proxy = common::proxy::Proxy::start("127.0.0.1:4222").await;
    let d = start(&config(&proxy.addr.to_string(), &subject)).await;
    let ids = run_with_outage(&d, &proxy, "nats-cut", "NOTIFICATION", "events", "Success").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let distinct: std::collections::HashSet<String> = got
            .lock()
            .unwrap()
            .iter()
            .map(|(id, _)| id.clone())
            .collect();
        if distinct.len() >= 1000 {
            break;
        }
        if std::time::Instant::now() > deadline {
            let mut missing: Vec<&String> = ids
                .iter()
                .filter(|(_, id)| !distinct.contains(*id))
                .map(|(c, _)| c)
                .collect();
            missing.sort();
            panic!(
                "subscriber has {} of 1000; missing {:?}",
                distinct.len(),
                missing
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let msgs = got.lock().unwrap().clone();
    let dups = assert_all_arrived(&ids, &msgs);
    eprintln!(
        "nats outage run: {} records, {} messages, {dups} duplicates",
        ids.len(),
        msgs.len()
    );
}

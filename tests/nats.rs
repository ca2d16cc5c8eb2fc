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
            "fnrelay_delivery_attempts_total{outcome=\"retry\",error_message=\"connection_failed\",destination_kind=\"NOTIFICATION\",destination_id=\"events\"}",
        ) >= 1.0
    })
    .await;
    assert_eq!(metric(&d.metrics().await, "fnrelay_pending_records"), 1.0);
}

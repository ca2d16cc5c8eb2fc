//! The `mqtt` backend against the real Mosquitto on 127.0.0.1:1883.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::proxy::Proxy;
use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const BROKER: (&str, u16) = ("127.0.0.1", 1883);

fn config(addr: &str, topic: &str) -> String {
    format!(
        r#"{BROKER_PRELUDE}
[topics.alerts]
backend = "mqtt"
url = "mqtt://{addr}"
topic = "{topic}"
[routes.default]
success = {{ kind = "NOTIFICATION", topicId = "alerts" }}
failure = {{ kind = "NOTIFICATION", topicId = "alerts" }}
"#
    )
}

/// A real subscriber (QoS 1) collecting (topic, body) from `filter`.
async fn subscribe(filter: &str) -> Arc<Mutex<Vec<(String, serde_json::Value)>>> {
    let got: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
    let mut options = MqttOptions::new(unique("sub"), BROKER.0, BROKER.1);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 64);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let (sink, subscribed) = (got.clone(), Arc::new(tokio::sync::Notify::new()));
    let ready = subscribed.clone();
    tokio::spawn(async move {
        let _client = client;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => ready.notify_one(),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    sink.lock()
                        .unwrap()
                        .push((p.topic.clone(), serde_json::from_slice(&p.payload).unwrap()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed.notified())
        .await
        .expect("subscribed");
    got
}

#[tokio::test]
async fn records_arrive_on_the_function_topic_with_qos_1() {
    let base = unique("fnrelay");
    let got = subscribe(&format!("{base}/#")).await;
    let d = start(&config(
        "127.0.0.1:1883",
        &format!("{base}/{{functionId}}/results"),
    ))
    .await;
    let (_, answer) = d.post(&event("mqtt-1", 504)).await;
    let id = answer["records"][0]["id"].as_str().unwrap().to_string();
    d.wait_metric(
        &deliveries("Success", "", "Failure", "NOTIFICATION", "alerts"),
        1.0,
    )
    .await;
    wait_until("subscriber got it", Duration::from_secs(10), || {
        let n = got.lock().unwrap().len();
        async move { n == 1 }
    })
    .await;
    let (topic, body) = got.lock().unwrap()[0].clone();
    assert_eq!(topic, format!("{base}/ocid1.fnfunc.oc1..f/results"));
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["data"]["response"]["status"], "504");
}

#[tokio::test]
async fn an_unreachable_broker_is_retried_as_connection_failed() {
    let port = free_port();
    let d = start(&config(&format!("127.0.0.1:{port}"), "fnrelay/none")).await;
    d.post(&event("mqtt-down", 200)).await;
    wait_until("retried", Duration::from_secs(10), || async {
        metric(
            &d.metrics().await,
            "fnrelay_delivery_attempts_total{outcome=\"unavailable\",error_message=\"connection_failed\",destination_kind=\"NOTIFICATION\",destination_id=\"alerts\"}",
        ) >= 2.0
    })
    .await;
    assert_eq!(
        metric(&d.metrics().await, "fnrelay_pending_records"),
        1.0,
        "still waiting, not dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_mid_run_loses_nothing() {
    let base = unique("fnrelay-cut");
    let got = subscribe(&format!("{base}/#")).await;
    let proxy = Proxy::start("127.0.0.1:1883").await;
    let d = start(&config(&proxy.addr.to_string(), &format!("{base}/records"))).await;
    let ids = run_with_outage(&d, &proxy, "mqtt-cut", "NOTIFICATION", "alerts", "Success").await;
    // The subscriber's own connection is direct; wait for its last messages.
    wait_until(
        "subscriber has every record",
        Duration::from_secs(30),
        || {
            let distinct: std::collections::HashSet<String> = got
                .lock()
                .unwrap()
                .iter()
                .map(|(_, b)| b["id"].as_str().unwrap().to_string())
                .collect();
            async move { distinct.len() >= 1000 }
        },
    )
    .await;
    let msgs: Vec<_> = got
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| (b["id"].as_str().unwrap().to_string(), b.clone()))
        .collect();
    let dups = assert_all_arrived(&ids, &msgs);
    eprintln!(
        "mqtt outage run: {} records, {} messages, {dups} duplicates",
        ids.len(),
        msgs.len()
    );
}

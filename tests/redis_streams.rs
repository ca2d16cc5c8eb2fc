//! The `redis-streams` backend against the real Redis on 127.0.0.1:6379.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::proxy::Proxy;
use common::*;

const SERVER: &str = "127.0.0.1:6379";

fn config(addr: &str, key: &str, extra: &str) -> String {
    format!(
        r#"{BROKER_PRELUDE}
[streams.results]
backend = "redis-streams"
url = "redis://{addr}"
stream_key = "{key}"
{extra}
[routes.default]
success = {{ kind = "STREAM", streamId = "results" }}
failure = {{ kind = "STREAM", streamId = "results" }}
"#
    )
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{SERVER}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Every entry: (id field, record JSON, key field).
async fn read_all(key: &str) -> Vec<(String, serde_json::Value, String)> {
    let mut conn = redis().await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    entries
        .into_iter()
        .map(|(_, fields)| {
            let f: HashMap<String, String> = fields.into_iter().collect();
            (
                f["id"].clone(),
                serde_json::from_str(&f["record"]).unwrap(),
                f["key"].clone(),
            )
        })
        .collect()
}

async fn del(key: &str) {
    let _: () = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut redis().await)
        .await
        .unwrap();
}

#[tokio::test]
async fn records_arrive_with_id_key_and_record_fields_and_maxlen_trims() {
    let key = unique("fnrelay:results");
    let d = start(&config(SERVER, &key, "maxlen = 5")).await;
    let ids = post_many(&d, "rs", 30, 200).await;
    d.wait_metric(
        &deliveries("Success", "", "Success", "STREAM", "results"),
        30.0,
    )
    .await;
    let got = read_all(&key).await;
    // MAXLEN ~ trims by whole nodes: fewer than 30 are kept, at least 5.
    assert!(got.len() >= 5 && got.len() < 30, "{} entries", got.len());
    for (id, body, fkey) in &got {
        assert_eq!(body["id"].as_str(), Some(id.as_str()));
        assert_eq!(fkey, "ocid1.fnfunc.oc1..f");
        let call = body["data"]["request"]["fnCallId"].as_str().unwrap();
        assert_eq!(&ids[call], id);
    }
    del(&key).await;
}

#[tokio::test]
async fn a_key_of_another_type_holds_records_until_it_is_fixed() {
    let key = unique("fnrelay:notastream");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("x")
        .query_async(&mut redis().await)
        .await
        .unwrap();
    let d = start(&config(SERVER, &key, "")).await;
    d.post(&event("rs-wrongtype", 500)).await;
    wait_until("WRONGTYPE seen", Duration::from_secs(20), || async {
        metric(
            &d.metrics().await,
            "fnrelay_delivery_attempts_total{outcome=\"unavailable\",error_message=\"rejected\",destination_kind=\"STREAM\",destination_id=\"results\"}",
        ) >= 1.0
    })
    .await;
    let text = d.metrics().await;
    assert!(!text.contains("response_type=\"Error\""), "{text}");
    // The operator removes the wrong key: the record arrives.
    del(&key).await;
    d.wait_metric_for(
        &deliveries("Success", "", "Failure", "STREAM", "results"),
        1.0,
        Duration::from_secs(30),
    )
    .await;
    del(&key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_mid_run_loses_nothing() {
    let key = unique("fnrelay:cut");
    let proxy = Proxy::start(SERVER).await;
    let d = start(&config(&proxy.addr.to_string(), &key, "timeout = \"2s\"")).await;
    let ids = run_with_outage(&d, &proxy, "rs-cut", "STREAM", "results", "Success").await;
    let got: Vec<_> = read_all(&key)
        .await
        .into_iter()
        .map(|(id, body, _)| (id, body))
        .collect();
    let dups = assert_all_arrived(&ids, &got);
    eprintln!(
        "redis outage run: {} records, {} entries, {dups} duplicates",
        ids.len(),
        got.len()
    );
    del(&key).await;
    tokio::time::timeout(Duration::from_secs(30), d.stop())
        .await
        .unwrap();
}

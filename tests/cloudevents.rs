//! Records as CloudEvents (SPEC section 12), read back with the CloudEvents
//! SDK (`cloudevents-sdk`), not by comparing strings: structured mode to a
//! webhook and a file, binary mode to a webhook (`ce-` headers), RabbitMQ
//! (`cloudEvents:` application properties) and NATS JetStream (`ce-`
//! headers). The SDK's HTTP binding parses HTTP requests; AMQP and NATS
//! headers are handed to the same binding under their HTTP names, so the
//! SDK checks every attribute.

mod common;

use std::time::Duration;

use cloudevents::{AttributesReader, Data, Event};
use common::*;
use serde_json::Value;

fn data_json(event: &Event) -> Value {
    match event.data() {
        Some(Data::Json(v)) => v.clone(),
        Some(Data::Binary(b)) => serde_json::from_slice(b).unwrap(),
        Some(Data::String(s)) => serde_json::from_str(s).unwrap(),
        None => Value::Null,
    }
}

/// What every record-as-event must carry.
fn check(event: &Event, id: &str, call: &str, failure: bool) {
    assert_eq!(event.id(), id);
    assert_eq!(event.source().to_string(), "/functions/ocid1.fnfunc.oc1..f");
    assert_eq!(
        event.ty(),
        if failure {
            "com.oraclecloud.functions.detached.failure"
        } else {
            "com.oraclecloud.functions.detached.success"
        }
    );
    assert_eq!(event.subject(), Some(call));
    assert!(event.time().is_some(), "time is the invocation's timestamp");
    let record = data_json(event);
    assert_eq!(record["id"], id, "data is the record");
    assert_eq!(record["data"]["request"]["fnCallId"], call);
}

fn to_event(headers: &axum::http::HeaderMap, body: &[u8]) -> Event {
    cloudevents::binding::http::to_event(headers, body.to_vec())
        .unwrap_or_else(|e| panic!("the SDK refuses the message: {e}"))
}

#[tokio::test]
async fn webhook_structured_and_binary_and_file_structured() {
    let rx = Receiver::start().await;
    let d = start(&format!(
        r#"
[journal]
path = "{{dir}}/journal.db"
[topics.structured]
backend = "webhook"
url = "{url}"
allow_insecure_endpoint = true
allow_private_network = true
format = "cloudevents"
[topics.binary]
backend = "webhook"
url = "{url}"
allow_insecure_endpoint = true
allow_private_network = true
format = "cloudevents"
cloudevents_mode = "binary"
[streams.file]
backend = "file"
path = "{{dir}}/events.jsonl"
format = "cloudevents"
[routes.default]
success = {{ kind = "STREAM", streamId = "file" }}
failure = {{ kind = "NOTIFICATION", topicId = "structured" }}
[routes.functions."ocid1.fnfunc.oc1..f"]
success = {{ kind = "NOTIFICATION", topicId = "binary" }}
failure = {{ kind = "NOTIFICATION", topicId = "structured" }}
"#,
        url = rx.url()
    ))
    .await;
    let failed = post_many(&d, "ce-fail", 2, 502).await;
    let ok = post_many(&d, "ce-ok", 2, 200).await;
    wait_until("four requests", Duration::from_secs(10), || {
        let n = rx.seen().len();
        async move { n == 4 }
    })
    .await;
    for seen in rx.seen() {
        let event = to_event(&seen.headers, &seen.body);
        let call = event.subject().unwrap().to_string();
        let structured = seen.header("content-type") == "application/cloudevents+json";
        if call.starts_with("ce-fail") {
            assert!(structured, "structured mode: {:?}", seen.headers);
            check(&event, &failed[&call], &call, true);
        } else {
            assert!(
                !structured && seen.header("ce-id") == ok[&call],
                "binary mode"
            );
            check(&event, &ok[&call], &call, false);
        }
    }
    d.stop().await;

    // A file resource (structured): one event per line, read by the SDK.
    let rx2 = Receiver::start().await;
    let d = start(&format!(
        r#"
[journal]
path = "{{dir}}/journal.db"
[streams.file]
backend = "file"
path = "{{dir}}/events.jsonl"
format = "cloudevents"
[topics.none]
backend = "webhook"
url = "{}"
allow_insecure_endpoint = true
allow_private_network = true
[routes.default]
success = {{ kind = "STREAM", streamId = "file" }}
"#,
        rx2.url()
    ))
    .await;
    let ids = post_many(&d, "ce-file", 3, 200).await;
    let path = d.path().join("events.jsonl");
    wait_until("three events in the file", Duration::from_secs(10), || {
        let n = read_lines(&path).len();
        async move { n == 3 }
    })
    .await;
    for line in std::fs::read_to_string(&path).unwrap().lines() {
        let event: Event = serde_json::from_str(line).expect("the SDK reads a structured event");
        let call = event.subject().unwrap().to_string();
        check(&event, &ids[&call], &call, false);
    }
    d.stop().await;
}

#[tokio::test]
async fn amqp_binary_mode_carries_cloud_events_application_properties() {
    use lapin::options::{BasicGetOptions, QueueDeleteOptions};
    let queue = unique("fnrelay-ce");
    let d = start(&format!(
        r#"{BROKER_PRELUDE}
[queues.q]
backend = "amqp"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "{queue}"
declare = true
format = "cloudevents"
cloudevents_mode = "binary"
[routes.default]
failure = {{ kind = "QUEUE", queueId = "q" }}
"#
    ))
    .await;
    let ids = post_many(&d, "ce-amqp", 3, 500).await;
    d.wait_metric(&deliveries("Success", "", "Failure", "QUEUE", "q"), 3.0)
        .await;
    let conn = lapin::Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut got = 0;
    while let Some(m) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        // The AMQP binding's `cloudEvents:` properties under their HTTP
        // names, for the SDK's binding to read.
        let mut headers = axum::http::HeaderMap::new();
        let props = &m.delivery.properties;
        headers.insert(
            "content-type",
            props
                .content_type()
                .as_ref()
                .unwrap()
                .as_str()
                .parse()
                .unwrap(),
        );
        for (name, value) in props.headers().as_ref().unwrap().inner() {
            if let Some(attr) = name.as_str().strip_prefix("cloudEvents:") {
                let lapin::types::AMQPValue::LongString(v) = value else {
                    panic!("{name}: {value:?}");
                };
                headers.insert(
                    axum::http::HeaderName::from_bytes(format!("ce-{attr}").as_bytes()).unwrap(),
                    String::from_utf8_lossy(v.as_bytes()).parse().unwrap(),
                );
            }
        }
        let event = to_event(&headers, &m.delivery.data);
        let call = event.subject().unwrap().to_string();
        check(&event, &ids[&call], &call, true);
        got += 1;
    }
    assert_eq!(got, 3);
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    d.stop().await;
}

#[tokio::test]
async fn jetstream_binary_mode_carries_ce_headers() {
    let name = unique("FNRELAY_CE").replace('-', "_");
    let subject = format!("fnrelay.{name}");
    let d = start(&format!(
        r#"{BROKER_PRELUDE}
[streams.js]
backend = "nats-jetstream"
url = "nats://127.0.0.1:4222"
subject = "{subject}"
stream = "{name}"
create_stream = true
format = "cloudevents"
cloudevents_mode = "binary"
[routes.default]
success = {{ kind = "STREAM", streamId = "js" }}
"#
    ))
    .await;
    let ids = post_many(&d, "ce-js", 3, 200).await;
    d.wait_metric(&deliveries("Success", "", "Success", "STREAM", "js"), 3.0)
        .await;
    let js = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await.unwrap());
    let mut stream = js.get_stream(&name).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        let mut headers = axum::http::HeaderMap::new();
        for (k, values) in m.headers.iter() {
            let k = k.to_string();
            if k.starts_with("ce-") || k.eq_ignore_ascii_case("content-type") {
                headers.insert(
                    axum::http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).unwrap(),
                    values[0].to_string().parse().unwrap(),
                );
            }
        }
        let event = to_event(&headers, &m.payload);
        let call = event.subject().unwrap().to_string();
        check(&event, &ids[&call], &call, false);
    }
    assert_eq!(last, 3);
    let _ = js.delete_stream(&name).await;
    d.stop().await;
}

#[test]
fn binary_mode_is_refused_where_there_are_no_headers() {
    let config = fnrelay::config::load_with_env(
        fnrelay::config::Source::Text(
            r#"
[streams.file]
backend = "file"
path = "x.jsonl"
format = "cloudevents"
cloudevents_mode = "binary"
[queues.plain]
backend = "file"
path = "y.jsonl"
cloudevents_mode = "structured"
"#,
        ),
        Some(Default::default()),
    )
    .unwrap();
    let err = config.validate().unwrap_err().to_string();
    assert!(
        err.contains("streams.file.cloudevents_mode: binary mode needs message headers"),
        "{err}"
    );
    assert!(
        err.contains("queues.plain.cloudevents_mode: only with format = \"cloudevents\""),
        "{err}"
    );
}

//! The OCI backends driven through the real daemon against the strict
//! local OCI server (tests/common/oci.rs): signatures, paths, body shapes,
//! limits, batching, and the services' error answers.

mod common;

use std::time::Duration;

use common::oci::{FINGERPRINT, Fault, OciServer, TENANCY, USER, key_file};
use common::*;
use serde_json::json;

const QUEUE: &str = "ocid1.queue.oc1.phx.aaaaqueue";
const STREAM: &str = "ocid1.stream.oc1.phx.aaaastream";
const TOPIC: &str = "ocid1.onstopic.oc1.phx.aaaatopic";

fn auth(server: &OciServer) -> String {
    format!(
        "endpoint = \"{}\"\ntenancy = \"{TENANCY}\"\nuser = \"{USER}\"\nfingerprint = \"{FINGERPRINT}\"\nkey_file = \"{}\"\nallow_insecure_endpoint = true\ntimeout = \"5s\"\n",
        server.url,
        key_file()
    )
}

fn config(server: &OciServer, extra: &str) -> String {
    format!(
        r#"{BROKER_PRELUDE}
{extra}
[queues."{QUEUE}"]
backend = "oci-queue"
{a}
[streams."{STREAM}"]
backend = "oci-streaming"
{a}
[topics."{TOPIC}"]
backend = "oci-notifications"
{a}
[routes.default]
success = {{ kind = "STREAM", streamId = "{STREAM}" }}
failure = {{ kind = "QUEUE", queueId = "{QUEUE}", channelId = "failures" }}
[routes.applications."ocid1.fnapp.oc1..notify"]
failure = {{ kind = "NOTIFICATION", topicId = "{TOPIC}" }}
"#,
        a = auth(server)
    )
}

async fn server(latency_ms: u64) -> OciServer {
    OciServer::start(
        &[
            &format!("queues/{QUEUE}"),
            &format!("streams/{STREAM}"),
            &format!("topics/{TOPIC}"),
        ],
        Duration::from_millis(latency_ms),
    )
    .await
}

fn attempts(outcome: &str, error: &str, kind: &str, id: &str) -> String {
    format!(
        "fnrelay_delivery_attempts_total{{outcome=\"{outcome}\",error_message=\"{error}\",destination_kind=\"{kind}\",destination_id=\"{id}\"}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_put_messages_batches_signed_records_with_their_channel() {
    let oci = server(30).await;
    let d = start(&config(&oci, "")).await;
    let ids = post_many(&d, "q", 60, 502).await;
    d.wait_metric(&deliveries("Success", "", "Failure", "QUEUE", QUEUE), 60.0)
        .await;
    let stored = oci.stored();
    let got: Vec<_> = stored
        .iter()
        .map(|s| {
            assert_eq!(s.resource, format!("queues/{QUEUE}"));
            assert_eq!(
                s.extra.as_deref(),
                Some("failures"),
                "channelId is the message channel"
            );
            (
                s.record["id"].as_str().unwrap().to_string(),
                s.record.clone(),
            )
        })
        .collect();
    assert_eq!(assert_all_arrived(&ids, &got), 0);
    let sizes: Vec<usize> = oci.requests().iter().map(|r| r.1).collect();
    assert!(
        sizes.iter().all(|n| *n <= 20),
        "PutMessages takes at most 20: {sizes:?}"
    );
    assert!(
        sizes.len() < 60 && sizes.iter().any(|n| *n > 1),
        "records share requests: {sizes:?}"
    );
    eprintln!(
        "oci-queue: 60 records in {} requests {sizes:?}",
        sizes.len()
    );
}

#[tokio::test]
async fn queue_429_with_retry_after_and_500_are_retried() {
    let oci = server(0).await;
    oci.fault(Fault::Status {
        status: 429,
        code: "TooManyRequests",
        retry_after: Some("1"),
    });
    oci.fault(Fault::Status {
        status: 500,
        code: "InternalServerError",
        retry_after: None,
    });
    let d = start(&config(&oci, "")).await;
    let (_, answer) = d.post(&event("q-throttled", 500)).await;
    d.wait_metric(&deliveries("Success", "", "Failure", "QUEUE", QUEUE), 1.0)
        .await;
    let text = d.metrics().await;
    assert_eq!(
        metric(&text, &attempts("unavailable", "throttled", "QUEUE", QUEUE)),
        1.0
    );
    assert_eq!(
        metric(&text, &attempts("retry", "server_error", "QUEUE", QUEUE)),
        1.0
    );
    assert_eq!(oci.stored()[0].record["id"], answer["records"][0]["id"]);
    let statuses: Vec<u16> = oci.requests().iter().map(|r| r.2).collect();
    assert_eq!(statuses, [429, 500, 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_message_in_a_batch_dead_letters_only_itself() {
    // A 400 for a PutMessages of many records is sent again record by
    // record: only the record at fault is dead-lettered.
    let oci = server(30).await;
    oci.poison(&["q-00004"]);
    let d = start(&config(&oci, "")).await;
    let ids = post_many(&d, "q", 12, 500).await;
    d.wait_metric(&deliveries("Success", "", "Failure", "QUEUE", QUEUE), 11.0)
        .await;
    d.wait_metric(
        &deliveries("Error", "rejected", "Failure", "QUEUE", QUEUE),
        1.0,
    )
    .await;
    let dead = d.dead_letters().await;
    assert_eq!(dead["deadLetters"].as_array().unwrap().len(), 1);
    assert_eq!(dead["deadLetters"][0]["id"], ids["q-00004"].as_str());
    // One PutMessages of the whole batch refused, then each record alone:
    // eleven stored, the bad one refused again.
    let requests = oci.requests();
    let refused = requests.iter().filter(|r| r.2 == 400).count();
    let singles = requests.iter().filter(|r| r.1 == 1 && r.2 == 200).count();
    assert_eq!((refused, singles), (2, 11), "{requests:?}");
    let stored: std::collections::HashSet<String> = oci
        .stored()
        .iter()
        .map(|s| s.record["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stored.len(), 11);
}

#[tokio::test]
async fn a_401_holds_the_record_until_the_credentials_work() {
    // OCI's own guidance retries 401: a key being rotated must not
    // dead-letter the backlog (SPEC section 10).
    let oci = server(0).await;
    oci.fault(Fault::Status {
        status: 401,
        code: "NotAuthenticated",
        retry_after: None,
    });
    let d = start(&config(&oci, "")).await;
    d.post(&event("q-401", 500)).await;
    d.wait_metric(&deliveries("Success", "", "Failure", "QUEUE", QUEUE), 1.0)
        .await;
    let text = d.metrics().await;
    assert_eq!(
        metric(
            &text,
            &attempts("unavailable", "unauthorized", "QUEUE", QUEUE)
        ),
        1.0
    );
    assert!(!text.contains("response_type=\"Error\""), "{text}");
    let statuses: Vec<u16> = oci.requests().iter().map(|r| r.2).collect();
    assert_eq!(statuses, [401, 200]);
}

#[tokio::test]
async fn the_strict_server_rejects_a_key_it_does_not_know() {
    // Same key, but a keyId (tenancy) the server does not trust: 401 on
    // every request. The destination is failing, not the record: the
    // breaker opens and the record waits in the journal.
    let oci = server(0).await;
    let text = config(&oci, "").replace(
        &format!("tenancy = \"{TENANCY}\""),
        "tenancy = \"ocid1.tenancy.oc1..other\"",
    );
    let d = start(&text).await;
    d.post(&event("q-wrong-key", 500)).await;
    let breaker = format!(
        "fnrelay_circuit_breaker_state{{destination_kind=\"QUEUE\",destination_id=\"{QUEUE}\"}}"
    );
    wait_until("the breaker opens", Duration::from_secs(20), || async {
        metric(&d.metrics().await, &breaker) >= 1.0
    })
    .await;
    let text = d.metrics().await;
    assert!(!text.contains("response_type=\"Error\""), "{text}");
    assert_eq!(metric(&text, "fnrelay_pending_records"), 1.0);
    assert!(oci.stored().is_empty());
    assert!(oci.requests().iter().all(|r| r.2 == 401));
}

#[tokio::test]
async fn a_missing_queue_holds_its_records_without_using_attempts() {
    let oci = OciServer::start(&[], Duration::ZERO).await;
    let d = start(&config(&oci, "")).await;
    d.post(&event("q-404", 500)).await;
    wait_until("404 seen", Duration::from_secs(20), || async {
        retries(&d.metrics().await, "QUEUE", QUEUE) >= 3.0
    })
    .await;
    let text = d.metrics().await;
    assert!(!text.contains("response_type=\"Error\""), "{text}");
    assert_eq!(metric(&text, "fnrelay_pending_records"), 1.0);
    assert_eq!(
        metric(&text, &attempts("retry", "not_found", "QUEUE", QUEUE)),
        0.0,
        "no attempt used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_retries_only_the_failed_entries() {
    let oci = server(30).await;
    oci.fail_entries_once(&["s-00003", "s-00007"]);
    let d = start(&config(&oci, "")).await;
    let ids = post_many(&d, "s", 20, 200).await;
    d.wait_metric(
        &deliveries("Success", "", "Success", "STREAM", STREAM),
        20.0,
    )
    .await;
    let stored = oci.stored();
    let got: Vec<_> = stored
        .iter()
        .map(|s| {
            assert_eq!(
                s.extra.as_deref(),
                Some("ocid1.fnfunc.oc1..f"),
                "key = functionId"
            );
            (
                s.record["id"].as_str().unwrap().to_string(),
                s.record.clone(),
            )
        })
        .collect();
    assert_eq!(
        assert_all_arrived(&ids, &got),
        0,
        "only the failed entries were resent"
    );
    let text = d.metrics().await;
    assert_eq!(
        metric(&text, &attempts("retry", "server_error", "STREAM", STREAM)),
        2.0
    );
    assert_eq!(
        metric(&text, &attempts("success", "", "STREAM", STREAM)),
        20.0
    );
}

#[tokio::test]
async fn streaming_throttled_then_delivered() {
    let oci = server(0).await;
    oci.fault(Fault::Status {
        status: 429,
        code: "TooManyRequests",
        retry_after: Some("1"),
    });
    let d = start(&config(&oci, "")).await;
    d.post(&event("s-429", 200)).await;
    d.wait_metric(&deliveries("Success", "", "Success", "STREAM", STREAM), 1.0)
        .await;
    assert_eq!(
        metric(
            &d.metrics().await,
            &attempts("unavailable", "throttled", "STREAM", STREAM)
        ),
        1.0
    );
}

#[tokio::test]
async fn notifications_publish_a_titled_record_and_truncate_an_oversize_one() {
    let oci = server(0).await;
    let d = start(&config(
        &oci,
        "[server]\nmax_error_message_bytes = 200000\nmax_body_bytes = 1000000",
    ))
    .await;
    let mut small = event("n-1", 502);
    small["applicationId"] = json!("ocid1.fnapp.oc1..notify");
    let mut big = event("n-big", 502);
    big["applicationId"] = json!("ocid1.fnapp.oc1..notify");
    big["errorMessage"] = json!("x".repeat(100_000));
    d.post(&small).await;
    d.post(&big).await;
    d.wait_metric(
        &deliveries("Success", "", "Failure", "NOTIFICATION", TOPIC),
        2.0,
    )
    .await;
    let stored = oci.stored();
    let by_call = |c: &str| {
        stored
            .iter()
            .find(|s| s.record["data"]["request"]["fnCallId"] == c)
            .unwrap()
            .clone()
    };
    let s = by_call("n-1");
    assert_eq!(
        s.extra.as_deref(),
        Some("fnrelay: ocid1.fnfunc.oc1..f failure")
    );
    assert_eq!(
        s.record["data"]["response"]["errorMessage"],
        "function failed"
    );
    let b = by_call("n-big");
    let msg = b.record["data"]["response"]["errorMessage"]
        .as_str()
        .unwrap();
    assert!(
        msg.ends_with("...[truncated]") && msg.len() < 64 * 1024,
        "{} bytes",
        msg.len()
    );
}

#[tokio::test]
async fn notifications_5xx_then_delivered() {
    let oci = server(0).await;
    oci.fault(Fault::Status {
        status: 503,
        code: "ServiceUnavailable",
        retry_after: None,
    });
    let d = start(&config(&oci, "")).await;
    let mut e = event("n-503", 500);
    e["applicationId"] = json!("ocid1.fnapp.oc1..notify");
    d.post(&e).await;
    d.wait_metric(
        &deliveries("Success", "", "Failure", "NOTIFICATION", TOPIC),
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &d.metrics().await,
            &attempts("retry", "server_error", "NOTIFICATION", TOPIC)
        ),
        1.0
    );
}

#[tokio::test]
async fn an_encrypted_key_from_an_oci_cli_config_profile() {
    let oci = server(0).await;
    let dir = tempfile::tempdir().unwrap();
    let cli = dir.path().join("oci-config");
    std::fs::write(
        &cli,
        format!(
            "[DEFAULT]\nuser=ocid1.user.oc1..nobody\nfingerprint=00:00\nkey_file=/nonexistent\ntenancy={TENANCY}\nregion=us-phoenix-1\n\n[FNRELAY]\nuser={USER}\nfingerprint={FINGERPRINT}\nkey_file={}\npass_phrase=fnrelay-test\n",
            key_file().replace("oci-test-key.pem", "oci-test-key-encrypted.pem")
        ),
    )
    .unwrap();
    let text = format!(
        r#"{BROKER_PRELUDE}
[streams."{STREAM}"]
backend = "oci-streaming"
endpoint = "{}"
oci_config_file = "{}"
oci_profile = "FNRELAY"
allow_insecure_endpoint = true
[routes.default]
success = {{ kind = "STREAM", streamId = "{STREAM}" }}
"#,
        oci.url,
        cli.display()
    );
    let d = start(&text).await;
    d.post(&event("cli-1", 200)).await;
    d.wait_metric(&deliveries("Success", "", "Success", "STREAM", STREAM), 1.0)
        .await;
}

#[test]
fn check_config_names_a_wrong_fingerprint_and_an_http_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            r#"[queues."{QUEUE}"]
backend = "oci-queue"
endpoint = "http://127.0.0.1:1"
tenancy = "{TENANCY}"
user = "{USER}"
fingerprint = "aa:bb:cc"
key_file = "{}"
"#,
            key_file()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .args([
            "check-config",
            "--offline",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "queues.\"{QUEUE}\".endpoint: http:// is accepted only with allow_insecure_endpoint"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "queues.\"{QUEUE}\".fingerprint: aa:bb:cc does not match the key"
        )),
        "{err}"
    );
}

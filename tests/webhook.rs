//! Webhook delivery against a real local HTTP receiver: retries with the
//! same webhook-id, Retry-After, signatures, dead letters and their replay,
//! record expiry, the circuit breaker, and the metrics of each.

mod common;

use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine;
use common::*;
use serde_json::json;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn config(receiver: &Receiver, extra_delivery: &str) -> String {
    format!(
        r#"
[journal]
path = "{{dir}}/journal.db"
[delivery]
workers = 4
initial_backoff = "50ms"
max_backoff = "2s"
{extra_delivery}
[topics.hook]
backend = "webhook"
url = "{url}"
secret_file = "{{dir}}/secret"
timeout = "2s"
allow_insecure_endpoint = true
allow_private_network = true
[routes.default]
success = {{ kind = "NOTIFICATION", topicId = "hook" }}
failure = {{ kind = "NOTIFICATION", topicId = "hook" }}
"#,
        url = receiver.url()
    )
}

async fn start_with_secret(toml: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).unwrap();
    start_in(toml, dir).await
}

fn attempts(outcome: &str, error: &str) -> String {
    format!(
        "fnrelay_delivery_attempts_total{{outcome=\"{outcome}\",error_message=\"{error}\",destination_kind=\"NOTIFICATION\",destination_id=\"hook\"}}"
    )
}

/// Verifies a Standard Webhooks signature independently of fnrelay's code.
fn verify(seen: &Seen) {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let key = hmac::Key::new(hmac::HMAC_SHA256, &key);
    let signed = format!(
        "{}.{}.{}",
        seen.header("webhook-id"),
        seen.header("webhook-timestamp"),
        std::str::from_utf8(&seen.body).unwrap()
    );
    let sig = seen.header("webhook-signature");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(sig.strip_prefix("v1,").expect("v1 signature"))
        .unwrap();
    hmac::verify(&key, signed.as_bytes(), &raw).expect("signature verifies");
}

#[tokio::test]
async fn retries_503_then_429_with_retry_after_then_delivers_with_one_webhook_id() {
    let rx = Receiver::start().await;
    rx.script(&[(503, None), (429, Some("1"))]);
    let d = start_with_secret(&config(&rx, "")).await;
    let (status, answer) = d.post(&event("wh-1", 502)).await;
    assert_eq!(status, 202);
    let id = answer["records"][0]["id"].as_str().unwrap().to_string();

    d.wait_metric(
        &deliveries("Success", "", "Failure", "NOTIFICATION", "hook"),
        1.0,
    )
    .await;
    let seen = rx.seen();
    assert_eq!(seen.len(), 3, "503, 429, 200");
    for s in &seen {
        assert_eq!(s.header("webhook-id"), id);
        assert_eq!(s.header("content-type"), "application/json");
        assert_eq!(s.json()["id"], id.as_str());
        verify(s);
    }
    assert_eq!(seen[2].json()["data"]["response"]["status"], "502");
    // Retry-After: 1 was honoured (never sooner than asked).
    let gap = seen[2].at - seen[1].at;
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");

    let text = d.metrics().await;
    assert_eq!(metric(&text, &attempts("retry", "server_error")), 1.0);
    assert_eq!(metric(&text, &attempts("unavailable", "throttled")), 1.0);
    assert_eq!(metric(&text, &attempts("success", "")), 1.0);
    assert!(
        !text.contains("response_type=\"Error\""),
        "retries are not failures: {text}"
    );
    assert_eq!(metric(&text, "fnrelay_pending_records"), 0.0);
}

#[tokio::test]
async fn a_400_dead_letters_after_one_attempt_and_can_be_replayed() {
    let rx = Receiver::start().await;
    rx.script(&[(400, None)]);
    let d = start_with_secret(&config(&rx, "")).await;
    let (_, answer) = d.post(&event("wh-400", 200)).await;
    let id = answer["records"][0]["id"].as_str().unwrap().to_string();

    d.wait_metric(
        &deliveries("Error", "rejected", "Success", "NOTIFICATION", "hook"),
        1.0,
    )
    .await;
    assert_eq!(rx.seen().len(), 1, "permanent errors are not retried");
    let text = d.metrics().await;
    assert_eq!(metric(&text, &attempts("dead", "rejected")), 1.0);
    assert_eq!(metric(&text, "fnrelay_dead_letters"), 1.0);

    let list = d.dead_letters().await;
    let dead = &list["deadLetters"][0];
    assert_eq!(dead["id"], id.as_str());
    assert_eq!(dead["errorMessage"], "rejected");
    assert_eq!(dead["attempts"], 1);
    assert!(
        dead["lastError"].as_str().unwrap().contains("400"),
        "{dead}"
    );
    assert_eq!(dead["record"]["id"], id.as_str());

    // The receiver is fixed; replay delivers the same record id.
    let r = d
        .http
        .post(format!("{}/v1/dead-letters/replay", d.url))
        .json(&json!({"ids": [id]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["replayed"], 1);
    d.wait_metric(
        &deliveries("Success", "", "Success", "NOTIFICATION", "hook"),
        1.0,
    )
    .await;
    let seen = rx.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("webhook-id"), id);
    assert_eq!(metric(&d.metrics().await, "fnrelay_dead_letters"), 0.0);
}

#[tokio::test]
async fn max_record_age_expires_a_record_that_keeps_failing() {
    let rx = Receiver::start().await;
    rx.set_default(503);
    let d = start_with_secret(&config(&rx, "max_record_age = \"1s\"\nmax_attempts = 1000")).await;
    d.post(&event("wh-old", 500)).await;
    d.wait_metric(
        &deliveries("Error", "record_expired", "Failure", "NOTIFICATION", "hook"),
        1.0,
    )
    .await;
    let tries = rx.seen().len();
    assert!(tries >= 2, "it was retried before expiring ({tries})");
    let text = d.metrics().await;
    assert_eq!(
        metric(&text, &attempts("retry", "server_error")),
        tries as f64
    );
    assert_eq!(metric(&text, "fnrelay_pending_records"), 0.0);
    assert_eq!(metric(&text, "fnrelay_dead_letters"), 1.0);
}

#[tokio::test]
async fn max_attempts_dead_letters_with_the_last_error_label() {
    let rx = Receiver::start().await;
    rx.set_default(500);
    let d = start_with_secret(&config(&rx, "max_attempts = 3")).await;
    d.post(&event("wh-tries", 500)).await;
    d.wait_metric(
        &deliveries("Error", "server_error", "Failure", "NOTIFICATION", "hook"),
        1.0,
    )
    .await;
    assert_eq!(rx.seen().len(), 3);
    // Two attempts that will be retried, then the one that dead-letters.
    let text = d.metrics().await;
    assert_eq!(metric(&text, &attempts("retry", "server_error")), 2.0);
    assert_eq!(metric(&text, &attempts("dead", "server_error")), 1.0);
    assert_conserved(&text);
}

#[tokio::test]
async fn circuit_breaker_opens_on_a_failing_destination_and_closes_when_it_recovers() {
    let rx = Receiver::start().await;
    rx.set_default(503);
    let d = start_with_secret(&config(
        &rx,
        "breaker_failure_threshold = 2\nbreaker_cool_down = \"300ms\"\nmax_attempts = 1000",
    ))
    .await;
    let batch: Vec<_> = (0..20).map(|i| event(&format!("cb-{i}"), 200)).collect();
    d.post(&json!({ "completions": batch })).await;
    let gauge =
        "fnrelay_circuit_breaker_state{destination_kind=\"NOTIFICATION\",destination_id=\"hook\"}";
    wait_until("breaker open", Duration::from_secs(10), || async {
        metric(&d.metrics().await, gauge) == 1.0
    })
    .await;
    // While open, records wait instead of hammering the receiver.
    let during = rx.seen().len();
    assert!(during < 20 * 3, "breaker limits attempts ({during})");
    rx.set_default(200);
    d.wait_metric(
        &deliveries("Success", "", "Success", "NOTIFICATION", "hook"),
        20.0,
    )
    .await;
    d.wait_metric(gauge, 0.0).await;
    let text = d.metrics().await;
    assert!(
        !text.contains("response_type=\"Error\""),
        "nothing dropped: {text}"
    );
    let mut ids: Vec<String> = rx
        .seen()
        .iter()
        .filter(|s| s.headers.contains_key("webhook-id"))
        .map(|s| s.header("webhook-id"))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);
}

#[tokio::test]
async fn an_unreachable_webhook_holds_records_without_using_attempts() {
    // Cannot connect: the destination's failure. The record waits past
    // max_attempts (only real sends count) and arrives once the receiver
    // is up.
    let port = free_port();
    let rx_url = format!("http://127.0.0.1:{port}/hook");
    let toml = format!(
        r#"
[journal]
path = "{{dir}}/journal.db"
[delivery]
initial_backoff = "20ms"
max_backoff = "100ms"
max_attempts = 2
breaker_failure_threshold = 1
breaker_cool_down = "100ms"
[topics.hook]
backend = "webhook"
url = "{rx_url}"
allow_insecure_endpoint = true
allow_private_network = true
[routes.default]
success = {{ kind = "NOTIFICATION", topicId = "hook" }}
"#
    );
    let d = start(&toml).await;
    d.post(&event("wh-down", 200)).await;
    wait_until(
        "more failed connects than max_attempts",
        Duration::from_secs(20),
        || async {
            metric(
                &d.metrics().await,
                &attempts("unavailable", "connection_failed"),
            ) >= 4.0
        },
    )
    .await;
    let text = d.metrics().await;
    assert!(!text.contains("response_type=\"Error\""), "{text}");
    let rx = Receiver::start_on(format!("127.0.0.1:{port}").parse().unwrap()).await;
    d.wait_metric(
        &deliveries("Success", "", "Success", "NOTIFICATION", "hook"),
        1.0,
    )
    .await;
    assert_eq!(rx.seen().len(), 1);
}

#[tokio::test]
async fn allowed_networks_open_a_private_range_without_opening_all() {
    let rx = Receiver::start().await;
    let toml = config(&rx, "").replace(
        "allow_private_network = true",
        "allowed_networks = [\"127.0.0.0/8\"]",
    );
    let d = start_with_secret(&toml).await;
    d.post(&event("wh-allowed", 200)).await;
    d.wait_metric(
        &deliveries("Success", "", "Success", "NOTIFICATION", "hook"),
        1.0,
    )
    .await;

    // Without the allowance the same URL is refused at validation.
    let refused = config(&rx, "").replace("allow_private_network = true", "");
    let parsed = fnrelay::config::load_with_env(
        fnrelay::config::Source::Text(&refused),
        Some(Default::default()),
    )
    .unwrap();
    let err = parsed.validate().unwrap_err().to_string();
    assert!(
        err.contains("topics.hook.url: points into a private or loopback network"),
        "{err}"
    );
}

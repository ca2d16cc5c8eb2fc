//! TLS to every broker, for real (SPEC section 6): TLS listeners of the real
//! services (RabbitMQ, Redis, Mosquitto, NATS with JetStream) and an HTTPS
//! webhook receiver, all with a certificate for `localhost` from a test CA.
//! Each backend delivers with that CA in its `tls_ca_file`; with another CA,
//! or reached by a name the certificate does not carry (127.0.0.1), its
//! records wait and the log says why: `connection_failed` with the
//! certificate error. `check-config` says the same for backends it connects.

mod common;

use std::time::Duration;

use common::process::{Proc, spawn, stop};
use common::tls::{HttpsReceiver, Pki};
use common::*;

/// A backend's resource table for a host, port and CA file.
type Resource = Box<dyn Fn(&str, u16, &str) -> String>;

/// One backend.
struct Case {
    kind: &'static str,
    id: &'static str,
    /// Whether `check-config` connects to it.
    checked: bool,
    resource: Resource,
}

fn config(case: &Case, host: &str, port: u16, ca: &std::path::Path) -> String {
    let field = match case.kind {
        "QUEUE" => "queueId",
        "STREAM" => "streamId",
        _ => "topicId",
    };
    format!(
        r#"
[journal]
path = "data/journal.db"
[delivery]
initial_backoff = "50ms"
max_backoff = "300ms"
breaker_failure_threshold = 1
breaker_cool_down = "300ms"
attempt_timeout = "5s"
{}
[routes.default]
success = {{ kind = "{}", {field} = "{}" }}
"#,
        (case.resource)(host, port, &ca.display().to_string()),
        case.kind,
        case.id
    )
}

async fn successes(p: &Proc, case: &Case) -> f64 {
    metric(
        &p.metrics().await,
        &deliveries("Success", "", "Success", case.kind, case.id),
    )
}

/// Delivers over TLS with the right CA; refuses another CA and a name the
/// certificate does not carry, saying why.
async fn delivers_with_its_ca_and_refuses_the_wrong_ca_or_name(case: Case, port: u16, pki: &Pki) {
    // The right CA: everything arrives.
    let dir = tempfile::tempdir().unwrap();
    let p = spawn(
        dir.path(),
        &config(&case, "localhost", port, &pki.ca),
        free_port(),
    )
    .await;
    post_many_to(&p.url, "tls", 20, 200).await;
    wait_until("20 records over TLS", Duration::from_secs(30), || async {
        successes(&p, &case).await == 20.0
    })
    .await;
    stop(p).await;

    for (what, host, ca, words) in [
        (
            "another CA",
            "localhost",
            &pki.other_ca,
            ["certificate", "UnknownIssuer"],
        ),
        (
            "a name not in the certificate",
            "127.0.0.1",
            &pki.ca,
            ["certificate", "NotValidForName"],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let text = config(&case, host, port, ca);
        let p = spawn(dir.path(), &text, free_port()).await;
        post_many_to(&p.url, "tls-refused", 1, 200).await;
        wait_until(
            &format!("{}: breaker opened ({what})", case.id),
            Duration::from_secs(30),
            || {
                let found = !p.log_lines("circuit breaker opened").is_empty();
                async move { found }
            },
        )
        .await;
        let line = p.log_lines("circuit breaker opened").remove(0);
        assert!(
            line.contains("connection_failed"),
            "{}, {what}: {line}",
            case.id
        );
        assert!(
            words.iter().any(|w| line.contains(w)),
            "{}, {what}: the certificate problem is named: {line}",
            case.id
        );
        let text_metrics = p.metrics().await;
        assert_eq!(successes(&p, &case).await, 0.0, "{text_metrics}");
        assert_eq!(
            metric(&text_metrics, "fnrelay_pending_records"),
            1.0,
            "the record waits"
        );
        stop(p).await;
        if case.checked {
            std::fs::write(dir.path().join("c.toml"), &text).unwrap();
            let out = std::process::Command::new(binary())
                .current_dir(dir.path())
                .args(["check-config", "--config", "c.toml"])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{}, {what}", case.id);
            assert!(
                err.contains(case.id) && words.iter().any(|w| err.contains(w)),
                "{}, {what}: check-config names the resource and the problem: {err}",
                case.id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_over_https_with_a_private_ca() {
    let pki = Pki::new();
    let rx = HttpsReceiver::start(&pki).await;
    let case = Case {
        kind: "NOTIFICATION",
        id: "hook",
        checked: false,
        resource: Box::new(|host, port, ca| {
            format!(
                "[topics.hook]\nbackend = \"webhook\"\nurl = \"https://{host}:{port}/hook\"\n\
                 allow_private_network = true\ntls_ca_file = \"{ca}\""
            )
        }),
    };
    delivers_with_its_ca_and_refuses_the_wrong_ca_or_name(case, rx.port, &pki).await;
    assert_eq!(
        rx.bodies.lock().unwrap().len(),
        20,
        "only the trusted run reached it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_over_rediss() {
    let pki = Pki::new();
    let redis = common::tls::redis(&pki).await;
    let key = unique("fnrelay-tls");
    let case = Case {
        kind: "STREAM",
        id: "s",
        checked: true,
        resource: Box::new(move |host, port, ca| {
            format!(
                "[streams.s]\nbackend = \"redis-streams\"\nurl = \"rediss://{host}:{port}\"\n\
                 stream_key = \"{key}\"\ntls_ca_file = \"{ca}\""
            )
        }),
    };
    delivers_with_its_ca_and_refuses_the_wrong_ca_or_name(case, redis.port, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_mqtts() {
    let pki = Pki::new();
    let mosquitto = common::tls::mosquitto(&pki).await;
    let case = Case {
        kind: "NOTIFICATION",
        id: "m",
        checked: true,
        resource: Box::new(|host, port, ca| {
            format!(
                "[topics.m]\nbackend = \"mqtt\"\nurl = \"mqtts://{host}:{port}\"\n\
                 topic = \"fnrelay/tls\"\ntls_ca_file = \"{ca}\""
            )
        }),
    };
    delivers_with_its_ca_and_refuses_the_wrong_ca_or_name(case, mosquitto.port, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_and_jetstream_over_tls() {
    let pki = Pki::new();
    let nats = common::tls::nats(&pki).await;
    let subject = unique("fnrelay.tls").replace('-', "_");
    let stream = unique("FNRELAY_TLS").replace('-', "_");
    let case = Case {
        kind: "STREAM",
        id: "js",
        checked: true,
        resource: Box::new(move |host, port, ca| {
            format!(
                "[streams.js]\nbackend = \"nats-jetstream\"\nurl = \"tls://{host}:{port}\"\n\
                 subject = \"{subject}\"\nstream = \"{stream}\"\ncreate_stream = true\ntls_ca_file = \"{ca}\""
            )
        }),
    };
    delivers_with_its_ca_and_refuses_the_wrong_ca_or_name(case, nats.port, &pki).await;
    let case = Case {
        kind: "NOTIFICATION",
        id: "n",
        checked: false,
        resource: Box::new(|host, port, ca| {
            format!(
                "[topics.n]\nbackend = \"nats\"\nurl = \"tls://{host}:{port}\"\n\
                 subject = \"fnrelay.tls.core\"\ntls_ca_file = \"{ca}\""
            )
        }),
    };
    delivers_with_its_ca_and_refuses_the_wrong_ca_or_name(case, nats.port, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_over_amqps() {
    let pki = Pki::new();
    let rabbit = common::tls::rabbitmq(&pki).await;
    let queue = unique("fnrelay-tls");
    let case = Case {
        kind: "QUEUE",
        id: "q",
        checked: true,
        resource: Box::new(move |host, port, ca| {
            format!(
                "[queues.q]\nbackend = \"amqp\"\nurl = \"amqps://guest:guest@{host}:{port}/%2f\"\n\
                 queue = \"{queue}\"\ndeclare = true\ntls_ca_file = \"{ca}\""
            )
        }),
    };
    delivers_with_its_ca_and_refuses_the_wrong_ca_or_name(case, rabbit.port, &pki).await;
}

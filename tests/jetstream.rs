//! The `nats-jetstream` backend against the real NATS server on 127.0.0.1:4222.

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use common::proxy::Proxy;
use common::*;

const SERVER: &str = "127.0.0.1:4222";

fn config(addr: &str, subject: &str, extra: &str) -> String {
    format!(
        r#"{BROKER_PRELUDE}
[streams.results]
backend = "nats-jetstream"
url = "nats://{addr}"
subject = "{subject}"
{extra}
[routes.default]
success = {{ kind = "STREAM", streamId = "results" }}
failure = {{ kind = "STREAM", streamId = "results" }}
"#
    )
}

async fn js() -> jetstream::Context {
    jetstream::new(async_nats::connect(SERVER).await.unwrap())
}

/// Creates a stream capturing `subject` on the shared server.
async fn create_stream(name: &str, subject: &str) {
    js().await
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Every message of the stream: (Nats-Msg-Id, body, key header).
async fn read_all(name: &str) -> Vec<(String, serde_json::Value, String)> {
    let js = js().await;
    let mut s = js.get_stream(name).await.unwrap();
    let last = s.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let m = s.get_raw_message(seq).await.unwrap();
        let header = |n: &str| m.headers.get(n).map(|v| v.to_string()).unwrap_or_default();
        out.push((
            header("Nats-Msg-Id"),
            serde_json::from_slice(&m.payload).unwrap(),
            header("Fnrelay-Key"),
        ));
    }
    out
}

#[tokio::test]
async fn records_arrive_with_msg_id_and_key_and_duplicates_are_absorbed() {
    let name = unique("FNRELAY").replace('-', "_");
    let subject = format!("fnrelay.{name}");
    let d = start(&config(
        SERVER,
        &subject,
        &format!("stream = \"{name}\"\ncreate_stream = true"),
    ))
    .await;
    // The start check creates the stream; wait for it before posting.
    wait_until("stream created", Duration::from_secs(10), || async {
        js().await.get_stream(&name).await.is_ok()
    })
    .await;
    let (_, answer) = d.post(&event("js-1", 200)).await;
    let id = answer["records"][0]["id"].as_str().unwrap().to_string();
    d.wait_metric(
        &deliveries("Success", "", "Success", "STREAM", "results"),
        1.0,
    )
    .await;
    let got = read_all(&name).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, id);
    assert_eq!(got[0].1["id"], id.as_str());
    assert_eq!(got[0].2, "ocid1.fnfunc.oc1..f");

    // A resend with the same record id (what a retry after a lost PubAck
    // does) is acknowledged as a duplicate and not stored twice.
    let ack = js()
        .await
        .send_publish(
            subject.clone(),
            async_nats::jetstream::message::PublishMessage::build()
                .payload(serde_json::to_vec(&got[0].1).unwrap().into())
                .message_id(&id),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(ack.duplicate);
    assert_eq!(read_all(&name).await.len(), 1);
    js().await.delete_stream(&name).await.unwrap();
}

#[tokio::test]
async fn no_responders_while_the_stream_is_missing_do_not_dead_letter() {
    // A subject without a stream answers "no responders", as JetStream does
    // while it restarts or elects a leader: the records wait, and arrive
    // once the stream is there.
    let name = unique("FNRELAY_LATE").replace('-', "_");
    let subject = format!("fnrelay.{name}");
    let d = start(&config(SERVER, &subject, "")).await;
    for i in 0..5 {
        d.post(&event(&format!("js-missing-{i}-{name}"), 500)).await;
    }
    wait_until("no responders seen", Duration::from_secs(20), || async {
        retries(&d.metrics().await, "STREAM", "results") >= 1.0
    })
    .await;
    let text = d.metrics().await;
    assert!(
        !text.contains("response_type=\"Error\""),
        "not dead-lettered: {text}"
    );
    create_stream(&name, &subject).await;
    d.wait_metric_for(
        &deliveries("Success", "", "Failure", "STREAM", "results"),
        5.0,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(read_all(&name).await.len(), 5);
    js().await.delete_stream(&name).await.unwrap();
}

#[test]
fn check_config_fails_when_the_stream_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let name = unique("MISSING").replace('-', "_");
    let path = dir.path().join("c.toml");
    let text = config(SERVER, "fnrelay.missing", &format!("stream = \"{name}\""));
    std::fs::write(&path, text.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
    let out = std::process::Command::new(binary())
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("streams.results: stream `{name}`: does not exist")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_mid_run_loses_nothing() {
    let name = unique("FNRELAY_CUT").replace('-', "_");
    let subject = format!("fnrelay.{name}");
    create_stream(&name, &subject).await;
    let proxy = Proxy::start(SERVER).await;
    let d = start(&config(
        &proxy.addr.to_string(),
        &subject,
        "ack_timeout = \"2s\"",
    ))
    .await;
    let ids = run_with_outage(&d, &proxy, "js-cut", "STREAM", "results", "Failure").await;
    let got: Vec<_> = read_all(&name)
        .await
        .into_iter()
        .map(|(id, body, _)| (id, body))
        .collect();
    let dups = assert_all_arrived(&ids, &got);
    eprintln!(
        "jetstream outage run: {} records, {} messages, {dups} duplicates",
        ids.len(),
        got.len()
    );
    assert_eq!(dups, 0, "Nats-Msg-Id dedup absorbs resends");
    js().await.delete_stream(&name).await.unwrap();
}

/// A nats-server with JetStream of this test's own (free port, own store),
/// so the test can kill and restart it without touching the shared server.
struct OwnServer {
    child: std::process::Child,
    port: u16,
    store: tempfile::TempDir,
}

impl OwnServer {
    async fn start(port: u16, store: tempfile::TempDir) -> Self {
        // Debian installs it in /usr/sbin, which is not on every PATH.
        let binary = if std::path::Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server"
        } else {
            "nats-server"
        };
        let child = std::process::Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server is installed (scripts/test.sh installs it)");
        let server = Self { child, port, store };
        wait_until("own nats-server up", Duration::from_secs(20), || async {
            async_nats::connect(format!("127.0.0.1:{port}"))
                .await
                .is_ok()
        })
        .await;
        server
    }

    /// kill -9, keeping the store for the restart.
    fn kill(mut self) -> (u16, tempfile::TempDir) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port = self.port;
        let store = std::mem::replace(&mut self.store, tempfile::tempdir().unwrap());
        (port, store)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_dead_letters_nothing_and_loses_nothing() {
    // max_attempts = 2: if the outage (no connection, then "no responders"
    // while JetStream starts) used attempts, records would die.
    let port = free_port();
    let server = OwnServer::start(port, tempfile::tempdir().unwrap()).await;
    let name = "FNRELAY_RESTART";
    let subject = "fnrelay.restart";
    jetstream::new(
        async_nats::connect(format!("127.0.0.1:{port}"))
            .await
            .unwrap(),
    )
    .create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let toml = format!(
        r#"
[journal]
path = "{{dir}}/journal.db"
[delivery]
initial_backoff = "50ms"
max_backoff = "500ms"
max_attempts = 2
breaker_cool_down = "200ms"
[streams.results]
backend = "nats-jetstream"
url = "nats://127.0.0.1:{port}"
subject = "{subject}"
ack_timeout = "1s"
[routes.default]
success = {{ kind = "STREAM", streamId = "results" }}
failure = {{ kind = "STREAM", streamId = "results" }}
"#
    );
    let d = start(&toml).await;
    let delivered = deliveries("Success", "", "Failure", "STREAM", "results");
    let mut ids = post_many(&d, "before", 50, 500).await;
    d.wait_metric(&delivered, 50.0).await;

    let (port, store) = server.kill();
    ids.extend(post_many(&d, "during", 100, 500).await);
    wait_until("the outage is seen", Duration::from_secs(20), || async {
        retries(&d.metrics().await, "STREAM", "results") >= 1.0
    })
    .await;
    let server = OwnServer::start(port, store).await;
    d.wait_metric_for(&delivered, 150.0, Duration::from_secs(60))
        .await;
    let text = d.metrics().await;
    assert!(
        !text.contains("response_type=\"Error\""),
        "nothing dead-lettered: {text}"
    );
    let js = jetstream::new(
        async_nats::connect(format!("127.0.0.1:{port}"))
            .await
            .unwrap(),
    );
    let mut s = js.get_stream(name).await.unwrap();
    let last = s.info().await.unwrap().state.last_sequence;
    let mut got = std::collections::HashSet::new();
    for seq in 1..=last {
        let m = s.get_raw_message(seq).await.unwrap();
        got.insert(m.headers.get("Nats-Msg-Id").unwrap().to_string());
    }
    for id in ids.values() {
        assert!(got.contains(id), "{id} is in the stream");
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_resets_and_drops_between_the_binary_and_nats_lose_nothing() {
    let name = unique("FNRELAY_CHAOS").replace('-', "_");
    let subject = format!("fnrelay.{name}");
    create_stream(&name, &subject).await;
    let proxy = Proxy::start_chaos(SERVER).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[log]\nformat = \"json\"\n{}",
        config(&proxy.addr.to_string(), &subject, "ack_timeout = \"2s\"")
    );
    let ids = run_with_chaos(
        dir.path(),
        &config,
        &proxy,
        "js-chaos",
        ("STREAM", "results", "Success"),
        2000,
    )
    .await;
    let got: Vec<_> = read_all(&name)
        .await
        .into_iter()
        .map(|(id, body, _)| (id, body))
        .collect();
    let dups = assert_all_arrived(&ids, &got);
    eprintln!(
        "FAULT jetstream chaos proxy: sent {n}, acknowledged {n}, delivered {n}, duplicates {dups}, dead 0, lost 0",
        n = ids.len()
    );
    js().await.delete_stream(&name).await.unwrap();
}

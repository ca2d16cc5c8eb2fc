//! Test harness: the real daemon (in-process on port 0, or the real binary),
//! a programmable webhook receiver (a real HTTP server), and helpers that
//! wait on conditions with timeouts instead of sleeping.

#![allow(dead_code)]

pub mod oci;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod tls;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

/// A daemon running in this process.
pub struct Daemon {
    pub url: String,
    pub dir: Option<tempfile::TempDir>,
    pub http: reqwest::Client,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), fnrelay::RunError>>>,
}

/// Writes `toml` (with `{dir}` replaced by a fresh temp dir) and starts the
/// daemon on an ephemeral port.
pub async fn start(toml: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    start_in(toml, dir).await
}

/// Like [`start`] in a given directory (restart on the same journal).
pub async fn start_in(toml: &str, dir: tempfile::TempDir) -> Daemon {
    let text = toml.replace("{dir}", dir.path().to_str().unwrap());
    let config = fnrelay::config::load_with_env(
        fnrelay::config::Source::Text(&text),
        Some(Default::default()),
    )
    .expect("test config parses");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(fnrelay::run(config, listener, cancel.clone()));
    let daemon = Daemon {
        url,
        dir: Some(dir),
        http: reqwest::Client::new(),
        cancel,
        task: Some(task),
    };
    wait_until("daemon ready", Duration::from_secs(10), || async {
        daemon
            .http
            .get(format!("{}/readyz", daemon.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    daemon
}

impl Daemon {
    /// POSTs a JSON body to the ingest endpoint.
    pub async fn post(&self, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}/v1/completions", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// GET /v1/dead-letters.
    pub async fn dead_letters(&self) -> serde_json::Value {
        self.http
            .get(format!("{}/v1/dead-letters", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The /metrics text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until a metric reaches `want`.
    pub async fn wait_metric(&self, name_and_labels: &str, want: f64) {
        self.wait_metric_for(name_and_labels, want, Duration::from_secs(20))
            .await
    }

    /// Waits until a metric reaches `want`, up to `timeout`.
    pub async fn wait_metric_for(&self, name_and_labels: &str, want: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics().await;
            let got = metric(&text, name_and_labels);
            if got == want {
                return;
            }
            if Instant::now() > deadline {
                panic!("metric {name_and_labels} is {got}, want {want}\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stops the daemon as SIGTERM would and returns the temp dir.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.cancel.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("daemon stops in time")
            .unwrap()
            .expect("daemon exits cleanly");
        self.dir.take().unwrap()
    }

    /// Reads a JSON-lines file under the temp dir.
    pub fn lines(&self, rel: &str) -> Vec<serde_json::Value> {
        read_lines(&self.path().join(rel))
    }

    /// The daemon's temp dir.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Parses a JSON-lines file (missing file = no lines).
pub fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// Value of a sample in Prometheus text, by its exact name and label text
/// (e.g. `fnrelay_pending_records` or `foo_total{a="b"}`); 0 if absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == name_and_labels).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// The delivery counter's sample name for one label combination.
pub fn deliveries(response: &str, error: &str, dt: &str, kind: &str, id: &str) -> String {
    format!(
        "function_detached_deliveries_total{{response_type=\"{response}\",error_message=\"{error}\",destination_type=\"{dt}\",destination_kind=\"{kind}\",destination_id=\"{id}\"}}"
    )
}

/// Polls `cond` until it holds, or panics after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A completion event.
pub fn event(call: &str, status: u16) -> serde_json::Value {
    serde_json::json!({
        "fnCallId": call,
        "functionId": "ocid1.fnfunc.oc1..f",
        "applicationId": "ocid1.fnapp.oc1..a",
        "compartmentId": "ocid1.compartment.oc1..c",
        "opcRequestId": format!("req-{call}"),
        "status": status,
        "errorCode": if status >= 300 { serde_json::json!("FunctionInvokeExecutionFailed") } else { serde_json::Value::Null },
        "errorMessage": if status >= 300 { serde_json::json!("function failed") } else { serde_json::Value::Null },
    })
}

/// One request the receiver saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
}

#[derive(Default)]
struct ReceiverState {
    script: Mutex<VecDeque<Answer>>,
    default_status: Mutex<u16>,
    delay: Mutex<Duration>,
    seen: Mutex<Vec<Seen>>,
}

/// A real HTTP webhook receiver whose answers the test scripts.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
    cancel: CancellationToken,
}

impl Receiver {
    /// Starts on an ephemeral port.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address.
    pub async fn start_on(addr: SocketAddr) -> Self {
        let state = Arc::new(ReceiverState::default());
        *state.default_status.lock().unwrap() = 200;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let app = Router::new().fallback(handle).with_state(state.clone());
        let stop = cancel.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .unwrap();
        });
        Self {
            addr,
            state,
            cancel,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Answers every request only after `delay` (a slow destination).
    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// Queues answers; once used up, the default status answers.
    pub fn script(&self, answers: &[(u16, Option<&str>)]) {
        let mut s = self.state.script.lock().unwrap();
        for (status, ra) in answers {
            s.push_back(Answer {
                status: *status,
                retry_after: ra.map(str::to_string),
            });
        }
    }

    pub fn set_default(&self, status: u16) {
        *self.state.default_status.lock().unwrap() = status;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn handle(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.seen.lock().unwrap().push(Seen {
        headers,
        body,
        at: Instant::now(),
    });
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let answer = state.script.lock().unwrap().pop_front();
    let answer = answer.unwrap_or(Answer {
        status: *state.default_status.lock().unwrap(),
        retry_after: None,
    });
    let mut r = (StatusCode::from_u16(answer.status).unwrap(), "answer").into_response();
    if let Some(ra) = answer.retry_after {
        r.headers_mut().insert("retry-after", ra.parse().unwrap());
    }
    r
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A name unique to this test run, for queues, streams, keys and topics on
/// the shared local brokers.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

/// Posts `n` events (batches of 100) named `{prefix}-{i}`; returns fnCallId -> record id.
pub async fn post_many(
    d: &Daemon,
    prefix: &str,
    n: usize,
    status: u16,
) -> std::collections::HashMap<String, String> {
    post_many_to(&d.url, prefix, n, status).await
}

/// [`post_many`] to a daemon at `url` (the in-process one or the binary).
pub async fn post_many_to(
    url: &str,
    prefix: &str,
    n: usize,
    status: u16,
) -> std::collections::HashMap<String, String> {
    let http = reqwest::Client::new();
    let mut ids = std::collections::HashMap::new();
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:05}")).collect();
    for chunk in names.chunks(100) {
        let batch: Vec<_> = chunk.iter().map(|c| event(c, status)).collect();
        let r = http
            .post(format!("{url}/v1/completions"))
            .json(&serde_json::json!({ "completions": batch }))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!(code, 202, "{answer}");
        for r in answer["records"].as_array().unwrap() {
            ids.insert(
                r["fnCallId"].as_str().unwrap().to_string(),
                r["id"].as_str().unwrap().to_string(),
            );
        }
    }
    ids
}

/// The chaos scenario against the real binary: `n` records posted while
/// the proxy delays chunks and resets or closes every connection after a
/// short life; once enough connections were broken mid-run, the proxy
/// calms down and every record must be confirmed, none dead-lettered.
pub async fn run_with_chaos(
    dir: &Path,
    config: &str,
    proxy: &proxy::Proxy,
    prefix: &str,
    (kind, id, dt): (&str, &str, &str),
    n: usize,
) -> std::collections::HashMap<String, String> {
    let config = config.replace("{dir}", dir.to_str().unwrap());
    let p = process::spawn(dir, &config, free_port()).await;
    let status = if dt == "Success" { 200 } else { 500 };
    // Post in parts of 100, a little apart, until `n` are in and the proxy
    // has broken connections in the middle of the run.
    let mut ids = std::collections::HashMap::new();
    let broken = || proxy.broken.load(std::sync::atomic::Ordering::SeqCst);
    let mut part = 0;
    while ids.len() < n || broken() < 5 {
        if part == 200 {
            let log = p.log.lock().unwrap().clone();
            panic!(
                "the proxy broke only {} connections in 200 parts; daemon log:\n{}",
                broken(),
                log[log.len().saturating_sub(30)..].join("\n")
            );
        }
        ids.extend(post_many_to(&p.url, &format!("{prefix}-{part}"), 100, status).await);
        part += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = ids.len();
    proxy.calm();
    proxy.cut();
    let delivered = deliveries("Success", "", dt, kind, id);
    wait_until(
        "every record confirmed",
        Duration::from_secs(50),
        || async { metric(&p.metrics().await, &delivered) >= n as f64 },
    )
    .await;
    let text = p.metrics().await;
    assert!(
        !text.contains("response_type=\"Error\""),
        "nothing dead-lettered: {text}"
    );
    wait_until("every outcome counted", Duration::from_secs(20), || async {
        metric(&p.metrics().await, "fnrelay_pending_records") == 0.0
    })
    .await;
    assert_eq!(assert_conserved(&p.metrics().await), n as f64);
    eprintln!(
        "chaos {prefix}: {} connections broken (reset or closed), {} retried attempts",
        proxy.broken.load(std::sync::atomic::Ordering::SeqCst),
        retries(&text, kind, id)
    );
    process::stop(p).await;
    ids
}

/// Checks that every posted record arrived and every copy carries its id.
/// `got` is (record id, body) per message read back. Returns the duplicates.
pub fn assert_all_arrived(
    ids: &std::collections::HashMap<String, String>,
    got: &[(String, serde_json::Value)],
) -> usize {
    let mut seen = std::collections::HashSet::new();
    for (id, body) in got {
        assert_eq!(
            body["id"].as_str(),
            Some(id.as_str()),
            "message id matches the body's id"
        );
        let call = body["data"]["request"]["fnCallId"].as_str().unwrap();
        assert_eq!(
            ids.get(call),
            Some(id),
            "{call}: same record id as accepted"
        );
        seen.insert(id.clone());
    }
    assert_eq!(seen.len(), ids.len(), "every accepted record arrived");
    got.len() - seen.len()
}

/// Path of the real binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fnrelay"))
}

/// Common `[journal]` and `[delivery]` for broker tests: fast retries, a
/// quick breaker, and no dead letters from attempts running out.
pub const BROKER_PRELUDE: &str = r#"
[journal]
path = "{dir}/journal.db"
[delivery]
workers = 16
initial_backoff = "50ms"
max_backoff = "500ms"
max_attempts = 10000
attempt_timeout = "5s"
breaker_cool_down = "200ms"
"#;

/// Sum of failed attempts that will be retried (any error, the record's
/// `retry` or the destination's `unavailable`) for a destination.
pub fn retries(text: &str, kind: &str, id: &str) -> f64 {
    text.lines()
        .filter(|l| {
            (l.starts_with("fnrelay_delivery_attempts_total{outcome=\"retry\"")
                || l.starts_with("fnrelay_delivery_attempts_total{outcome=\"unavailable\""))
                && l.contains(&format!(
                    "destination_kind=\"{kind}\",destination_id=\"{id}\""
                ))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The broker-outage scenario: 500 records flow, the connection is cut and
/// refused while 500 more are posted, the daemon sees failures, the broker
/// comes back, and all 1,000 are confirmed. Returns fnCallId -> record id.
pub async fn run_with_outage(
    d: &Daemon,
    proxy: &proxy::Proxy,
    prefix: &str,
    kind: &str,
    id: &str,
    dt: &str,
) -> std::collections::HashMap<String, String> {
    let delivered = deliveries("Success", "", dt, kind, id);
    let mut ids = post_many(
        d,
        &format!("{prefix}-a"),
        500,
        if dt == "Success" { 200 } else { 500 },
    )
    .await;
    wait_until(
        "first records confirmed",
        std::time::Duration::from_secs(30),
        || async { metric(&d.metrics().await, &delivered) >= 100.0 },
    )
    .await;
    proxy.set_down(true);
    proxy.cut();
    ids.extend(
        post_many(
            d,
            &format!("{prefix}-b"),
            500,
            if dt == "Success" { 200 } else { 500 },
        )
        .await,
    );
    wait_until(
        "the daemon noticed the outage",
        std::time::Duration::from_secs(30),
        || async { retries(&d.metrics().await, kind, id) >= 1.0 },
    )
    .await;
    proxy.set_down(false);
    d.wait_metric_for(&delivered, 1000.0, std::time::Duration::from_secs(90))
        .await;
    let text = d.metrics().await;
    assert!(
        !text.contains("response_type=\"Error\""),
        "nothing dead-lettered: {text}"
    );
    ids
}

/// Sum of every series whose line starts with `prefix`.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// SPEC section 7's conservation, from one process's metrics once it is
/// quiet: accepted = delivered + dead + skipped + pending (the gauges for
/// the states), and with the flows alone, accepted + replayed = delivered +
/// dead-lettered + skipped + pending. Returns accepted.
pub fn assert_conserved(text: &str) -> f64 {
    let accepted = metric(text, "fnrelay_events_accepted_total");
    let delivered = metric_sum(
        text,
        "function_detached_deliveries_total{response_type=\"Success\"",
    );
    let dead_lettered = metric_sum(
        text,
        "function_detached_deliveries_total{response_type=\"Error\"",
    );
    let skipped = metric_sum(text, "fnrelay_records_skipped_total");
    let pending = metric(text, "fnrelay_pending_records");
    let dead = metric(text, "fnrelay_dead_letters");
    let replayed = metric_sum(text, "fnrelay_dead_letters_replayed_total");
    assert_eq!(
        accepted,
        delivered + dead + skipped + pending,
        "accepted = delivered + dead + skipped + pending\n{text}"
    );
    assert_eq!(
        accepted + replayed,
        delivered + dead_lettered + skipped + pending,
        "accepted + replayed = delivered + dead-lettered + skipped + pending\n{text}"
    );
    accepted
}

/// The record ids the receiver saw, per fnCallId, checking each body's id
/// is the id it was sent under.
pub fn received(rx: &Receiver) -> std::collections::HashMap<String, Vec<String>> {
    let mut by_call: std::collections::HashMap<String, Vec<String>> =
        std::collections::HashMap::new();
    for s in rx.seen() {
        let body = s.json();
        let id = s.header("webhook-id");
        assert_eq!(body["id"].as_str(), Some(id.as_str()));
        let call = body["data"]["request"]["fnCallId"].as_str().unwrap();
        by_call.entry(call.to_string()).or_default().push(id);
    }
    by_call
}

/// Checks every acknowledged record arrived under its acknowledged id and
/// prints the FAULT line; returns (delivered, duplicates).
pub fn account(
    name: &str,
    sent: usize,
    acked: &std::collections::HashMap<String, String>,
    got: &std::collections::HashMap<String, Vec<String>>,
    dead: usize,
) -> (usize, usize) {
    let mut lost = 0;
    for (call, id) in acked {
        match got.get(call) {
            Some(ids) => {
                for got_id in ids {
                    assert_eq!(got_id, id, "{call}: a copy carries the acknowledged id");
                }
            }
            None => lost += 1,
        }
    }
    let delivered = got.len();
    let duplicates: usize = got.values().map(|v| v.len() - 1).sum();
    eprintln!(
        "FAULT {name}: sent {sent}, acknowledged {}, delivered {delivered}, duplicates {duplicates}, dead {dead}, lost {lost}",
        acked.len()
    );
    assert_eq!(lost, 0, "{name}: every acknowledged record is delivered");
    (delivered, duplicates)
}

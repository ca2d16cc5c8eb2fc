//! The benchmark harness (`cargo bench --bench harness`): starts the real
//! `fnrelay` binary with a generated config, drives it over loopback HTTP
//! with 64 concurrent connections, reads the destination back, and prints
//! one table with the median and spread (min-max) of repeated runs, next to
//! baselines measured in the same run:
//!
//! - a minimal HTTP server (this binary re-run as `noop-server`) that answers
//!   202 without work: the ceiling of this machine's loopback HTTP with this
//!   load generator;
//! - for RabbitMQ and JetStream, a raw client publishing the same messages
//!   pipelined as fast as the broker confirms.
//!
//! Scenarios: single events and batches of 100 to the file destination
//! (accepted/s, end-to-end/s, p50/p99 accept latency, CPU seconds per 100k
//! records, peak RSS); batches of 100 end to end to RabbitMQ and JetStream;
//! latency from 202 to the record in the file at a steady 1,000 events/s
//! (and the daemon's CPU there); a backlog accepted while the destination is
//! down (peak RSS, then time to first delivery after a restart, drain rate);
//! batches of 100 end to end on the PostgreSQL journal with 1 and with 3
//! replicas (each delivering to its own files).
//!
//! Environment: `BENCH_RUNS` (default 3), `BENCH_EVENTS` (default 100000),
//! `BENCH_BACKLOG` (default 1000000), `BENCH_ONLY` (comma-separated scenario
//! names: noop, file-1, file-100, amqp, jetstream, postgres, steady, backlog),
//! `BENCH_FNRELAY_BIN` (another fnrelay binary to measure). The broker
//! scenarios need the local RabbitMQ and NATS servers.

use std::collections::HashMap;
use std::io::{BufRead, Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

const CONNECTIONS: usize = 64;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("noop-server") {
        return noop_server();
    }
    let only: Option<Vec<String>> = std::env::var("BENCH_ONLY")
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().to_string()).collect());
    let want = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let runs = env("BENCH_RUNS", 3);
    let events = env("BENCH_EVENTS", 100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut table = Table::default();
    rt.block_on(async {
        if want("noop") {
            for _ in 0..runs {
                let r = noop_run(events).await;
                table.add("no-op HTTP server, single events", "requests/s", r);
            }
        }
        for (name, batch) in [("file-1", 1usize), ("file-100", 100)] {
            if !want(name) {
                continue;
            }
            let label = if batch == 1 {
                "file, single events"
            } else {
                "file, batches of 100"
            };
            for _ in 0..runs {
                let r = file_run(events, batch).await;
                for (k, v) in r {
                    table.add(label, k, v);
                }
            }
        }
        if want("amqp") {
            for _ in 0..runs {
                for (k, v) in amqp_run(events).await {
                    table.add("RabbitMQ (confirms), batches of 100", k, v);
                }
                table.add(
                    "RabbitMQ raw pipelined publisher (confirms)",
                    "messages/s",
                    amqp_raw(events).await,
                );
            }
        }
        if want("jetstream") {
            for _ in 0..runs {
                for (k, v) in jetstream_run(events).await {
                    table.add("JetStream (acks), batches of 100", k, v);
                }
                table.add(
                    "JetStream raw pipelined publisher (acks)",
                    "messages/s",
                    jetstream_raw(events).await,
                );
            }
        }
        if want("postgres") {
            for replicas in [1usize, 3] {
                for _ in 0..runs {
                    for (k, v) in postgres_run(events, replicas).await {
                        table.add(
                            &format!(
                                "PostgreSQL journal, {replicas} replica(s), batches of 100 to files"
                            ),
                            k,
                            v,
                        );
                    }
                }
            }
        }
        if want("steady") {
            for _ in 0..runs {
                for (k, v) in steady_run(1000, Duration::from_secs(10)).await {
                    table.add("file, steady 1,000 events/s", k, v);
                }
            }
        }
        if want("backlog") {
            let n = env("BENCH_BACKLOG", 1_000_000);
            for (k, v) in backlog_run(n).await {
                table.add(&format!("backlog of {n} while the file is down"), k, v);
            }
        }
    });
    table.print(runs);
}

// ---------------------------------------------------------------- results

#[derive(Default)]
struct Table {
    rows: Vec<(String, String, Vec<f64>)>,
}

impl Table {
    fn add(&mut self, scenario: &str, metric: &str, value: f64) {
        eprintln!("  {scenario} | {metric} | {}", fmt(value));
        match self
            .rows
            .iter_mut()
            .find(|(s, m, _)| s == scenario && m == metric)
        {
            Some(row) => row.2.push(value),
            None => self
                .rows
                .push((scenario.into(), metric.into(), vec![value])),
        }
    }

    fn print(&self, runs: usize) {
        println!();
        println!("| scenario | metric | median | spread (min-max) | runs |");
        println!("|---|---|---|---|---|");
        for (s, m, v) in &self.rows {
            let mut v = v.clone();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let median = v[v.len() / 2];
            println!(
                "| {s} | {m} | {} | {}-{} | {} |",
                fmt(median),
                fmt(v[0]),
                fmt(v[v.len() - 1]),
                v.len()
            );
        }
        println!("\n(runs per scenario requested: {runs})");
    }
}

fn fmt(x: f64) -> String {
    if x >= 100.0 {
        let s = format!("{:.0}", x);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        format!("{x:.2}")
    }
}

// ---------------------------------------------------------------- processes

/// The `fnrelay` binary cargo built next to this bench, or
/// `BENCH_FNRELAY_BIN` (to compare another build in the same run).
fn binary() -> PathBuf {
    std::env::var_os("BENCH_FNRELAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fnrelay")))
}

struct Daemon {
    child: Child,
    url: String,
}

impl Daemon {
    async fn start(dir: &Path, resources: &str, extra: &str) -> Self {
        let journal = format!(
            "[journal]\npath = \"{}/journal.db\"\nmax_pending = 5000000",
            dir.display()
        );
        Self::start_on(dir, &journal, resources, extra).await
    }

    async fn start_on(dir: &Path, journal: &str, resources: &str, extra: &str) -> Self {
        let port = free_port();
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
max_body_bytes = 4194304
{journal}
[log]
level = "warn"
{extra}
{resources}
"#
        );
        let path = dir.join("fnrelay.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.join("fnrelay.log")).unwrap();
        let mut child = Command::new(binary())
            .args(["--config", path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start fnrelay");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let t0 = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{url}/readyz")).send().await
                && r.status() == 200
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) || child.try_wait().ok().flatten().is_some() {
                let _ = child.kill();
                panic!(
                    "daemon not ready: {}",
                    std::fs::read_to_string(dir.join("fnrelay.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, url }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Never leave a daemon behind, even when a scenario panics.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// (user + system CPU seconds, peak RSS bytes) of a process.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let tick = 100.0; // USER_HZ on Linux
    let cpu = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0);
    (cpu / tick, hwm * 1024)
}

/// (busy, total) CPU jiffies of the whole machine, from /proc/stat: what
/// share of the cores the daemon, the load generator and the kernel left.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    // idle and iowait are the time no one used.
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

// ---------------------------------------------------------------- load

/// A completion event; one in ten is a failure.
fn event(n: usize) -> serde_json::Value {
    let mut e = serde_json::json!({
        "fnCallId": format!("bench-{n}"),
        "functionId": "ocid1.fnfunc.oc1..bench",
        "applicationId": "ocid1.fnapp.oc1..bench",
        "compartmentId": "ocid1.compartment.oc1..bench",
        "opcRequestId": format!("req-{n}"),
        "status": 200,
    });
    if n.is_multiple_of(10) {
        e["status"] = 502.into();
        e["errorCode"] = "FunctionInvokeExecutionFailed".into();
        e["errorMessage"] = "function failed".into();
    }
    e
}

fn bodies(events: usize, batch: usize, offset: usize) -> Vec<bytes::Bytes> {
    (0..events / batch)
        .map(|r| {
            let v = if batch == 1 {
                event(offset + r)
            } else {
                serde_json::json!({
                    "completions": (0..batch).map(|i| event(offset + r * batch + i)).collect::<Vec<_>>()
                })
            };
            bytes::Bytes::from(serde_json::to_vec(&v).unwrap())
        })
        .collect()
}

/// Posts every body over `CONNECTIONS` connections; returns the elapsed
/// time and each request's latency.
async fn drive(url: &str, bodies: Vec<bytes::Bytes>) -> (Duration, Vec<Duration>) {
    drive_all(&[url.to_string()], bodies).await
}

/// Like [`drive`], the connections spread round-robin over `urls`.
async fn drive_all(urls: &[String], bodies: Vec<bytes::Bytes>) -> (Duration, Vec<Duration>) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .build()
        .unwrap();
    let bodies = Arc::new(bodies);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let (http, bodies, next) = (http.clone(), bodies.clone(), next.clone());
        let url = format!("{}/v1/completions", urls[c % urls.len()]);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("post");
                assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    (start.elapsed(), lat)
}

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

/// Counts a growing file's lines, reading only what was appended since the
/// last call (re-reading the whole file every poll would take the cores
/// the daemon is being measured on).
struct Lines {
    path: PathBuf,
    offset: u64,
    n: usize,
    buf: Vec<u8>,
}

impl Lines {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            n: 0,
            buf: vec![0u8; 1 << 20],
        }
    }

    fn count(&mut self) -> usize {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return self.n;
        };
        if f.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return self.n;
        }
        loop {
            let k = f.read(&mut self.buf).unwrap_or(0);
            if k == 0 {
                return self.n;
            }
            self.offset += k as u64;
            self.n += self.buf[..k].iter().filter(|b| **b == b'\n').count();
        }
    }
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------- scenarios

fn noop_server() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap().port());
        let app = axum::Router::new().fallback(|| async {
            (
                axum::http::StatusCode::ACCEPTED,
                [("content-type", "application/json")],
                r#"{"accepted":1}"#,
            )
        });
        axum::serve(listener, app).await.unwrap();
    });
}

async fn noop_run(events: usize) -> f64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("noop-server")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = format!("http://127.0.0.1:{}", line.trim());
    let (took, _) = drive(&url, bodies(events, 1, 0)).await;
    let _ = child.kill();
    let _ = child.wait();
    events as f64 / took.as_secs_f64()
}

const FILE: &str = r#"
[streams.results]
backend = "file"
path = "{d}/results.jsonl"
[queues.failures]
backend = "file"
path = "{d}/failures.jsonl"
[routes.default]
success = { kind = "STREAM", streamId = "results" }
failure = { kind = "QUEUE", queueId = "failures" }
"#;

fn file_resources(dir: &Path) -> String {
    FILE.replace("{d}", &dir.display().to_string())
}

async fn file_run(events: usize, batch: usize) -> Vec<(&'static str, f64)> {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &file_resources(dir.path()), "").await;
    let (cpu0, _) = usage(d.pid());
    let (gen0, _) = usage(std::process::id());
    let (busy0, total0) = machine_cpu();
    let load = bodies(events, batch, 0);
    let start = Instant::now();
    let (accepted, mut lat) = drive(&d.url, load).await;
    let (a, b) = (
        dir.path().join("results.jsonl"),
        dir.path().join("failures.jsonl"),
    );
    let (mut a, mut b) = (Lines::new(&a), Lines::new(&b));
    wait_for(
        "every record in the files",
        Duration::from_secs(600),
        || a.count() + b.count() >= events,
    )
    .await;
    let e2e = start.elapsed();
    let (cpu1, rss) = usage(d.pid());
    let (gen1, _) = usage(std::process::id());
    let (busy1, total1) = machine_cpu();
    d.stop();
    vec![
        ("accepted events/s", events as f64 / accepted.as_secs_f64()),
        ("end-to-end events/s", events as f64 / e2e.as_secs_f64()),
        ("p50 accept latency ms", percentile(&mut lat, 0.50)),
        ("p99 accept latency ms", percentile(&mut lat, 0.99)),
        (
            "daemon CPU s per 100k records",
            (cpu1 - cpu0) * 100_000.0 / events as f64,
        ),
        (
            "load generator CPU s per 100k records",
            (gen1 - gen0) * 100_000.0 / events as f64,
        ),
        (
            "machine CPU busy % (all cores)",
            (busy1 - busy0) * 100.0 / (total1 - total0).max(1.0),
        ),
        ("peak RSS MB", rss as f64 / 1e6),
    ]
}

/// A fresh database on the local PostgreSQL; dropped by the caller.
async fn pg_admin(sql: &str) {
    let (client, conn) = tokio_postgres::connect(
        "postgres://postgres@127.0.0.1:5432/postgres",
        tokio_postgres::NoTls,
    )
    .await
    .expect("the local PostgreSQL on 127.0.0.1:5432");
    tokio::spawn(conn);
    client.batch_execute(sql).await.unwrap();
}

async fn postgres_run(events: usize, replicas: usize) -> Vec<(&'static str, f64)> {
    let db = format!(
        "fnrelay_bench_{}_{:08x}",
        std::process::id(),
        fastrand::u32(..)
    );
    pg_admin(&format!("CREATE DATABASE {db}")).await;
    let journal = format!(
        "[journal]\nbackend = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:5432/{db}\"\nmax_pending = 5000000\nlease = \"30s\""
    );
    let root = tempfile::tempdir().unwrap();
    let mut daemons = Vec::new();
    let mut dirs = Vec::new();
    for n in 0..replicas {
        let dir = root.path().join(format!("r{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        daemons.push(Daemon::start_on(&dir, &journal, &file_resources(&dir), "").await);
        dirs.push(dir);
    }
    let urls: Vec<String> = daemons.iter().map(|d| d.url.clone()).collect();
    let start = Instant::now();
    let (accepted, _) = drive_all(&urls, bodies(events, 100, 0)).await;
    let mut files: Vec<Lines> = dirs
        .iter()
        .flat_map(|d| [d.join("results.jsonl"), d.join("failures.jsonl")])
        .map(|f| Lines::new(&f))
        .collect();
    wait_for(
        "every record in the files",
        Duration::from_secs(900),
        || files.iter_mut().map(Lines::count).sum::<usize>() >= events,
    )
    .await;
    let e2e = start.elapsed();
    for d in daemons {
        d.stop();
    }
    pg_admin(&format!("DROP DATABASE {db} WITH (FORCE)")).await;
    vec![
        ("accepted events/s", events as f64 / accepted.as_secs_f64()),
        ("end-to-end events/s", events as f64 / e2e.as_secs_f64()),
    ]
}

async fn amqp_channel() -> lapin::Channel {
    let conn = lapin::Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    conn.create_channel().await.unwrap()
}

async fn amqp_count(channel: &lapin::Channel, queue: &str) -> usize {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .map(|q| q.message_count() as usize)
        .unwrap_or(0)
}

async fn amqp_delete(channel: &lapin::Channel, queue: &str) {
    let _ = channel
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await;
}

async fn amqp_run(events: usize) -> Vec<(&'static str, f64)> {
    let dir = tempfile::tempdir().unwrap();
    let queue = format!("fnrelay-bench-{}", fastrand::u32(..));
    let resources = format!(
        r#"
[queues.q]
backend = "amqp"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "{queue}"
declare = true
[routes.default]
success = {{ kind = "QUEUE", queueId = "q", channelId = "{queue}" }}
failure = {{ kind = "QUEUE", queueId = "q", channelId = "{queue}" }}
"#
    );
    let d = Daemon::start(dir.path(), &resources, "").await;
    let channel = amqp_channel().await;
    let start = Instant::now();
    let (accepted, _) = drive(&d.url, bodies(events, 100, 0)).await;
    let t0 = Instant::now();
    while amqp_count(&channel, &queue).await < events {
        assert!(t0.elapsed() < Duration::from_secs(600), "amqp drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e2e = start.elapsed();
    d.stop();
    amqp_delete(&channel, &queue).await;
    vec![
        ("accepted events/s", events as f64 / accepted.as_secs_f64()),
        ("end-to-end events/s", events as f64 / e2e.as_secs_f64()),
    ]
}

/// The same messages (a record-sized body, persistent, with a message id)
/// published on one confirm channel, with up to 1,024 unconfirmed.
async fn amqp_raw(events: usize) -> f64 {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    let channel = amqp_channel().await;
    let queue = format!("fnrelay-bench-raw-{}", fastrand::u32(..));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = record_body();
    let window = Arc::new(Semaphore::new(1024));
    let start = Instant::now();
    let mut pending = Vec::with_capacity(events);
    for n in 0..events {
        let permit = window.clone().acquire_owned().await.unwrap();
        let props = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("raw-{n}").into())
            .with_content_type("application/json".into());
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .unwrap();
        pending.push(tokio::spawn(async move {
            confirm.await.unwrap();
            drop(permit);
        }));
    }
    for p in pending {
        p.await.unwrap();
    }
    let rate = events as f64 / start.elapsed().as_secs_f64();
    amqp_delete(&channel, &queue).await;
    rate
}

fn record_body() -> Vec<u8> {
    br#"{"id":"01K1Q6K12C1BT01KRZJ000HKB9","version":"1.0","data":{"compartmentId":"ocid1.compartment.oc1..bench","functionId":"ocid1.fnfunc.oc1..bench","applicationId":"ocid1.fnapp.oc1..bench","request":{"opcRequestId":"req-1","fnCallId":"bench-1"},"response":{"status":"200","errorCode":null,"errorMessage":null,"timestamp":"2026-11-25T11:57:01.240Z"}}}"#.to_vec()
}

async fn jetstream_run(events: usize) -> Vec<(&'static str, f64)> {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("FNRELAY_BENCH_{}", fastrand::u32(..));
    let subject = format!("fnrelay.bench.{name}");
    let resources = format!(
        r#"
[streams.s]
backend = "nats-jetstream"
url = "nats://127.0.0.1:4222"
subject = "{subject}"
stream = "{name}"
create_stream = true
[routes.default]
success = {{ kind = "STREAM", streamId = "s" }}
failure = {{ kind = "STREAM", streamId = "s" }}
"#
    );
    let d = Daemon::start(dir.path(), &resources, "").await;
    let js = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await.unwrap());
    let start = Instant::now();
    let (accepted, _) = drive(&d.url, bodies(events, 100, 0)).await;
    let t0 = Instant::now();
    loop {
        let n = match js.get_stream(&name).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        };
        if n as usize >= events {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "jetstream drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e2e = start.elapsed();
    d.stop();
    let _ = js.delete_stream(&name).await;
    vec![
        ("accepted events/s", events as f64 / accepted.as_secs_f64()),
        ("end-to-end events/s", events as f64 / e2e.as_secs_f64()),
    ]
}

/// The same messages published with a Nats-Msg-Id, up to 1,024 acks
/// outstanding.
async fn jetstream_raw(events: usize) -> f64 {
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let js = async_nats::jetstream::new(client);
    let name = format!("FNRELAY_BENCH_RAW_{}", fastrand::u32(..));
    let subject = format!("fnrelay.bench.{name}");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let body = bytes::Bytes::from(record_body());
    let window = Arc::new(Semaphore::new(1024));
    let start = Instant::now();
    let mut pending = Vec::with_capacity(events);
    for n in 0..events {
        let permit = window.clone().acquire_owned().await.unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("raw-{n}").as_str());
        let ack = js
            .publish_with_headers(subject.clone(), headers, body.clone())
            .await
            .unwrap();
        pending.push(tokio::spawn(async move {
            ack.await.unwrap();
            drop(permit);
        }));
    }
    for p in pending {
        p.await.unwrap();
    }
    let rate = events as f64 / start.elapsed().as_secs_f64();
    let _ = js.delete_stream(&name).await;
    rate
}

/// Posts single events at `rate`/s for `length`, and times each record
/// from its 202 to its line in the file (the file is tailed every 1 ms).
async fn steady_run(rate: usize, length: Duration) -> Vec<(&'static str, f64)> {
    let dir = tempfile::tempdir().unwrap();
    let resources = r#"
[streams.results]
backend = "file"
path = "{d}/results.jsonl"
[routes.default]
success = { kind = "STREAM", streamId = "results" }
failure = { kind = "STREAM", streamId = "results" }
"#
    .replace("{d}", &dir.path().display().to_string());
    let d = Daemon::start(dir.path(), &resources, "").await;
    let file = dir.path().join("results.jsonl");
    let acked: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    let seen: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The tail runs on its own thread, polling every millisecond.
    let tail = {
        let (seen, stop, file) = (seen.clone(), stop.clone(), file.clone());
        std::thread::spawn(move || {
            let mut offset = 0u64;
            let mut partial = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut f) = std::fs::File::open(&file) {
                    let _ = f.seek(std::io::SeekFrom::Start(offset));
                    let mut buf = Vec::new();
                    let _ = f.read_to_end(&mut buf);
                    let now = Instant::now();
                    offset += buf.len() as u64;
                    partial.extend_from_slice(&buf);
                    while let Some(i) = partial.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = partial.drain(..=i).collect();
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line)
                            && let Some(id) = v["id"].as_str()
                        {
                            seen.lock().unwrap().insert(id.to_string(), now);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let (cpu0, _) = usage(d.pid());
    let http = reqwest::Client::new();
    let total = rate * length.as_secs() as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..total {
        let at = start + interval * n as u32;
        tokio::time::sleep_until(at.into()).await;
        let (http, url, acked) = (http.clone(), d.url.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(format!("{url}/v1/completions"))
                .json(&event(1_000_000 + n))
                .send()
                .await
                .unwrap();
            let t = Instant::now();
            assert_eq!(r.status(), 202);
            let v: serde_json::Value = r.json().await.unwrap();
            let id = v["records"][0]["id"].as_str().unwrap().to_string();
            acked.lock().unwrap().insert(id, t);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let busy = start.elapsed();
    let (cpu1, _) = usage(d.pid());
    wait_for("every record in the file", Duration::from_secs(60), || {
        seen.lock().unwrap().len() >= total
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tail.join().unwrap();
    d.stop();
    let acked = acked.lock().unwrap();
    let seen = seen.lock().unwrap();
    let mut lat: Vec<Duration> = acked
        .iter()
        .filter_map(|(id, t)| Some(seen.get(id)?.saturating_duration_since(*t)))
        .collect();
    vec![
        ("p50 202-to-file ms", percentile(&mut lat, 0.50)),
        ("p99 202-to-file ms", percentile(&mut lat, 0.99)),
        (
            "daemon CPU % of a core",
            (cpu1 - cpu0) / busy.as_secs_f64() * 100.0,
        ),
    ]
}

/// Accepts `n` records while the file destination cannot be written (its
/// directory is a file), stops the daemon, fixes the path, restarts, and
/// times the first delivery and the drain.
async fn backlog_run(n: usize) -> Vec<(&'static str, f64)> {
    let dir = tempfile::tempdir().unwrap();
    let blocked = dir.path().join("out");
    std::fs::write(&blocked, "not a directory").unwrap();
    let resources = r#"
[streams.results]
backend = "file"
path = "{d}/out/results.jsonl"
[routes.default]
success = { kind = "STREAM", streamId = "results" }
failure = { kind = "STREAM", streamId = "results" }
"#
    .replace("{d}", &dir.path().display().to_string());
    let d = Daemon::start(dir.path(), &resources, "").await;
    let mut peak = 0u64;
    let chunk = 100_000.min(n);
    let mut sent = 0;
    let t_ingest = Instant::now();
    while sent < n {
        drive(&d.url, bodies(chunk, 100, sent)).await;
        sent += chunk;
        peak = peak.max(usage(d.pid()).1);
    }
    let ingest = t_ingest.elapsed();
    peak = peak.max(usage(d.pid()).1);
    d.stop();
    std::fs::remove_file(&blocked).unwrap();
    let t0 = Instant::now();
    let d = Daemon::start(dir.path(), &resources, "").await;
    let file = dir.path().join("out/results.jsonl");
    wait_for("the first delivery", Duration::from_secs(120), || {
        std::fs::metadata(&file).is_ok_and(|m| m.len() > 0)
    })
    .await;
    let first = t0.elapsed();
    let t1 = Instant::now();
    let mut last_check = Instant::now();
    let mut peak2 = 0;
    let mut lines = Lines::new(&file);
    wait_for("the backlog drained", Duration::from_secs(1800), || {
        if last_check.elapsed() > Duration::from_millis(500) {
            last_check = Instant::now();
            peak2 = peak2.max(usage(d.pid()).1);
            lines.count() >= n
        } else {
            false
        }
    })
    .await;
    let drain = t1.elapsed();
    peak2 = peak2.max(usage(d.pid()).1);
    d.stop();
    vec![
        ("accepted events/s", n as f64 / ingest.as_secs_f64()),
        ("peak RSS while accepting MB", peak as f64 / 1e6),
        ("restart to first delivery s", first.as_secs_f64()),
        ("drain events/s", n as f64 / drain.as_secs_f64()),
        ("peak RSS while draining MB", peak2 as f64 / 1e6),
    ]
}

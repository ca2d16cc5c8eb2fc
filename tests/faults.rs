//! Fault injection against the real binary: kill -9 loops, a journal on a
//! filesystem that fills up, a failure destination that is down, hostile
//! clients (slowloris, thousands of idle connections, maximum-size batches
//! all at once) and SIGTERM with a slow client.
//!
//! Each test prints one `FAULT` line: sent, acknowledged, delivered,
//! duplicates, dead, lost.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::{Proc, spawn, stop};
use common::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn webhook_config(url: &str, extra: &str) -> String {
    format!(
        r#"
[log]
format = "json"
[journal]
path = "data/journal.db"
[delivery]
initial_backoff = "50ms"
max_backoff = "300ms"
breaker_cool_down = "200ms"
{extra}
[topics.hook]
backend = "webhook"
url = "{url}"
allow_insecure_endpoint = true
allow_private_network = true
[routes.default]
success = {{ kind = "NOTIFICATION", topicId = "hook" }}
failure = {{ kind = "NOTIFICATION", topicId = "hook" }}
"#
    )
}

/// Posts events `{prefix}-{i}` for i from a shared queue with `clients`
/// concurrent clients until the queue is empty or the daemon stops
/// answering; returns nothing, fills `acked` and re-queues what was not
/// acknowledged.
async fn post_until_gone(
    url: String,
    prefix: &'static str,
    todo: Arc<Mutex<Vec<usize>>>,
    acked: Arc<Mutex<HashMap<String, String>>>,
    clients: usize,
) {
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, todo, acked) = (http.clone(), url.clone(), todo.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(i) = todo.lock().unwrap().pop() else {
                    return;
                };
                let call = format!("{prefix}-{i:05}");
                let answer = http
                    .post(format!("{url}/v1/completions"))
                    .json(&event(&call, if i % 4 == 0 { 500 } else { 200 }))
                    .send()
                    .await;
                let id = match answer {
                    Ok(r) if r.status() == 202 => r
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|b| b["records"][0]["id"].as_str().map(str::to_string)),
                    _ => None,
                };
                match id {
                    Some(id) => {
                        acked.lock().unwrap().insert(call, id);
                    }
                    None => {
                        // Not acknowledged: post it again later.
                        todo.lock().unwrap().push(i);
                        return;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_five_times_in_a_5000_record_run_loses_nothing() {
    const N: usize = 5000;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = webhook_config(&rx.url(), "");
    let todo: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new((0..N).rev().collect()));
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut sent_attempts = 0;
    for round in 0..5 {
        let mut p = spawn(dir.path(), &config, port).await;
        let posting = tokio::spawn(post_until_gone(
            p.url.clone(),
            "k9",
            todo.clone(),
            acked.clone(),
            8,
        ));
        // Kill at a random point: after 400-1000 more acknowledgements.
        let target = acked.lock().unwrap().len() + 400 + fastrand::usize(..600);
        wait_until(
            "acknowledgements before the kill",
            Duration::from_secs(30),
            || {
                let n = acked.lock().unwrap().len();
                async move { n >= target }
            },
        )
        .await;
        p.child.kill().unwrap();
        p.child.wait().unwrap();
        posting.await.unwrap();
        sent_attempts += 1;
        eprintln!(
            "round {round}: killed at {} acknowledged",
            acked.lock().unwrap().len()
        );
    }
    // The last start posts what is left and delivers everything.
    let last = spawn(dir.path(), &config, port).await;
    post_until_gone(last.url.clone(), "k9", todo.clone(), acked.clone(), 8).await;
    assert!(
        todo.lock().unwrap().is_empty(),
        "every event acknowledged in the end"
    );
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), N);
    wait_until("every record delivered", Duration::from_secs(60), || {
        let n = received(&rx).len();
        async move { n >= N }
    })
    .await;
    let text = last.metrics().await;
    let dead = metric_sum(
        &text,
        "function_detached_deliveries_total{response_type=\"Error\"",
    );
    account("kill -9 x5", N, &acked, &received(&rx), dead as usize);
    assert_eq!(dead, 0.0);
    assert_eq!(sent_attempts, 5);
    stop(last).await;
}

/// A tmpfs of `size` mounted at `at` for the test; unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        // As root, or through passwordless sudo.
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
        let mut cmd = if root {
            std::process::Command::new("mount")
        } else {
            let mut c = std::process::Command::new("sudo");
            c.args(["-n", "mount"]);
            c
        };
        let out = cmd
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs for the journal and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umounted = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !umounted {
            let _ = std::process::Command::new("sudo")
                .args(["-n", "umount", "-l"])
                .arg(&self.0)
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_filesystem_answers_503_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let fs = dir.path().join("small");
    let _mount = Tmpfs::mount(&fs, "6m");
    // Space the test gives back later, as an operator growing a volume.
    std::fs::write(fs.join("reserve"), vec![1u8; 2 * 1024 * 1024]).unwrap();
    let config = format!(
        r#"
[log]
format = "json"
[journal]
path = "{}/journal.db"
[delivery]
initial_backoff = "50ms"
max_backoff = "300ms"
# Outcomes the full disk refused keep their leases until these end; then
# the records are sent again (same id) and counted.
attempt_timeout = "2s"
lease = "3s"
[queues.out]
backend = "file"
path = "out.jsonl"
[routes.default]
success = {{ kind = "QUEUE", queueId = "out" }}
failure = {{ kind = "QUEUE", queueId = "out" }}
"#,
        fs.display()
    );
    let port = free_port();
    let p = spawn(dir.path(), &config, port).await;
    let http = reqwest::Client::new();
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut sent = 0;
    let mut refused = 0;
    // Batches of 50 until the filesystem is full and a batch gets 503.
    let post = |from: usize| {
        let (http, url, acked) = (http.clone(), p.url.clone(), acked.clone());
        async move {
            let batch: Vec<_> = (from..from + 50)
                .map(|i| {
                    let mut e = event(&format!("full-{i:06}"), 500);
                    e["errorMessage"] = json!("x".repeat(1000));
                    e
                })
                .collect();
            let r = http
                .post(format!("{url}/v1/completions"))
                .json(&json!({ "completions": batch }))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            if status == 202 {
                let body: serde_json::Value = r.json().await.unwrap();
                for rec in body["records"].as_array().unwrap() {
                    acked.lock().unwrap().insert(
                        rec["fnCallId"].as_str().unwrap().into(),
                        rec["id"].as_str().unwrap().into(),
                    );
                }
            }
            status
        }
    };
    while refused == 0 {
        assert!(sent < 20_000, "the filesystem never filled up");
        match post(sent).await {
            202 => {}
            503 => refused += 1,
            other => panic!("answer {other} while the disk fills"),
        }
        sent += 50;
    }
    // Full: still alive, still refusing, never a 500 (and not a log line
    // per refusal).
    for _ in 0..100 {
        let status = post(sent).await;
        sent += 50;
        assert!(status == 503 || status == 202, "{status}");
    }
    let alive = http.get(format!("{}/healthz", p.url)).send().await.unwrap();
    assert_eq!(alive.status(), 200);

    // Space returns: ingest and delivery resume without a restart.
    std::fs::remove_file(fs.join("reserve")).unwrap();
    wait_until("ingest accepts again", Duration::from_secs(30), || {
        let next = sent;
        sent += 50;
        let post = post(next);
        async move { post.await == 202 }
    })
    .await;
    let acked = acked.lock().unwrap().clone();
    let out = dir.path().join("out.jsonl");
    let read = || {
        let mut got: HashMap<String, Vec<String>> = HashMap::new();
        for line in read_lines(&out) {
            let call = line["data"]["request"]["fnCallId"]
                .as_str()
                .unwrap()
                .to_string();
            got.entry(call)
                .or_default()
                .push(line["id"].as_str().unwrap().to_string());
        }
        got
    };
    wait_until(
        "every acknowledged record delivered",
        Duration::from_secs(40),
        || {
            let got = read();
            let all = acked.keys().all(|c| got.contains_key(c));
            async move { all }
        },
    )
    .await;
    account("journal filesystem full", sent, &acked, &read(), 0);
    wait_until("every outcome counted", Duration::from_secs(20), || async {
        metric(&p.metrics().await, "fnrelay_pending_records") == 0.0
    })
    .await;
    assert_eq!(assert_conserved(&p.metrics().await), acked.len() as f64);
    let log = stop(p).await;
    assert!(
        log.iter()
            .any(|l| l.contains("database or disk is full") || l.contains("No space left")),
        "the log names the cause"
    );
    // Repeated identical errors are rate-limited, with a count.
    let errors = log
        .iter()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .count();
    eprintln!("journal filesystem full: {errors} ERROR lines in the log");
    assert!(errors <= 20, "{errors} ERROR lines:\n{}", log.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_destination_that_is_down_dead_letters_at_its_limit_and_replays() {
    const N: usize = 100;
    let hook_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = webhook_config(
        &format!("http://127.0.0.1:{hook_port}/hook"),
        "max_record_age = \"3s\"",
    );
    let p = spawn(dir.path(), &config, free_port()).await;
    let http = reqwest::Client::new();
    let mut acked = HashMap::new();
    for i in 0..N {
        let call = format!("down-{i:04}");
        let r = http
            .post(format!("{}/v1/completions", p.url))
            .json(&event(&call, 502))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let body: serde_json::Value = r.json().await.unwrap();
        acked.insert(call, body["records"][0]["id"].as_str().unwrap().to_string());
    }
    // Nothing listens: the records wait, then dead-letter at max_record_age.
    let dead_series = "function_detached_deliveries_total{response_type=\"Error\"";
    wait_until(
        "every record dead-lettered",
        Duration::from_secs(30),
        || async { metric_sum(&p.metrics().await, dead_series) >= N as f64 },
    )
    .await;
    let text = p.metrics().await;
    let dead = metric_sum(&text, dead_series) as usize;
    assert_eq!(dead, N, "each counted once");
    assert_eq!(metric(&text, "fnrelay_dead_letters"), N as f64);
    assert_conserved(&text);
    // No traffic any more: the breaker does not stay "open" for ever.
    wait_until("the breaker leaves open", Duration::from_secs(10), || async {
        metric(
            &p.metrics().await,
            "fnrelay_circuit_breaker_state{destination_kind=\"NOTIFICATION\",destination_id=\"hook\"}",
        ) != 1.0
    })
    .await;

    // The destination comes back; the operator replays every dead letter.
    let rx = Receiver::start_on(format!("127.0.0.1:{hook_port}").parse().unwrap()).await;
    let r = http
        .post(format!("{}/v1/dead-letters/replay", p.url))
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while received(&rx).len() < N {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if waited.is_err() {
        let text = p.metrics().await;
        let log = p.log.lock().unwrap().clone();
        panic!(
            "replayed records not delivered: {} received\n{text}\n{}",
            received(&rx).len(),
            log[log.len().saturating_sub(20)..].join("\n")
        );
    }
    account("failure destination down", N, &acked, &received(&rx), dead);
    wait_until(
        "the replayed records counted",
        Duration::from_secs(10),
        || async { metric(&p.metrics().await, "fnrelay_pending_records") == 0.0 },
    )
    .await;
    assert_conserved(&p.metrics().await);
    stop(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_2000_idle_connections_do_not_stop_a_normal_client() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    let p = spawn(dir.path(), &webhook_config(&rx.url(), ""), free_port()).await;
    let addr = p.url.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    // 100 clients trickle a header, one byte every 200 ms.
    let trickling = Arc::new(AtomicUsize::new(0));
    let mut slow = Vec::new();
    for _ in 0..100 {
        let (addr, trickling) = (addr.clone(), trickling.clone());
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            trickling.fetch_add(1, Ordering::SeqCst);
            for b in
                b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    wait_until("slow clients connected", Duration::from_secs(10), || {
        let n = trickling.load(Ordering::SeqCst);
        async move { n == 100 }
    })
    .await;
    // A normal client keeps getting 202s, each quickly.
    let http = reqwest::Client::new();
    let mut acked = HashMap::new();
    let mut slowest = Duration::ZERO;
    for i in 0..300 {
        let call = format!("normal-{i:04}");
        let began = Instant::now();
        let r = http
            .post(format!("{}/v1/completions", p.url))
            .json(&event(&call, 200))
            .send()
            .await
            .unwrap();
        slowest = slowest.max(began.elapsed());
        assert_eq!(r.status(), 202);
        let body: serde_json::Value = r.json().await.unwrap();
        acked.insert(call, body["records"][0]["id"].as_str().unwrap().to_string());
    }
    let text = p.metrics().await;
    assert!(
        metric(&text, "fnrelay_http_connections_open") >= 2100.0,
        "the hostile connections were open meanwhile"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "slowest 202 took {slowest:?}"
    );
    wait_until("delivered", Duration::from_secs(30), || {
        let n = received(&rx).len();
        async move { n >= 300 }
    })
    .await;
    account("slowloris + 2,000 idle", 300, &acked, &received(&rx), 0);
    wait_until("every outcome counted", Duration::from_secs(20), || async {
        metric(&p.metrics().await, "fnrelay_pending_records") == 0.0
    })
    .await;
    assert_eq!(assert_conserved(&p.metrics().await), 300.0);
    eprintln!("slowest 202 under attack: {slowest:?}");
    for s in slow {
        s.abort();
    }
    drop(idle);
    stop(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_slow_client_and_a_slow_destination_exits_within_shutdown_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_secs(60));
    let mut config = webhook_config(&rx.url(), "attempt_timeout = \"60s\"\nlease = \"90s\"");
    config.push_str("[server]\nshutdown_timeout = \"3s\"\nbody_read_timeout = \"60s\"\n");
    let p = spawn(dir.path(), &config, free_port()).await;
    let (code, _) = post_json(&p, &event("slow-dest", 200)).await;
    assert_eq!(code, 202);
    wait_until("the delivery is in flight", Duration::from_secs(10), || {
        let n = rx.seen().len();
        async move { n == 1 }
    })
    .await;
    // A client sends half a body and then nothing.
    let addr = p.url.trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"fnCallId\"")
        .await
        .unwrap();
    wait_until(
        "the slow request is being read",
        Duration::from_secs(10),
        || async { metric(&p.metrics().await, "fnrelay_http_requests_in_flight") >= 2.0 },
    )
    .await;
    let began = Instant::now();
    let log = stop(p).await;
    let took = began.elapsed();
    eprintln!("FAULT sigterm with slow client: exited 0 in {took:?} (shutdown_timeout 3s)");
    // The measure includes running `kill` and reaping the process.
    assert!(took < Duration::from_millis(3300), "exited in {took:?}");
    assert!(log.iter().any(|l| l.contains("fnrelay stopped")));
    drop(s);
    // The record whose delivery was cut short is delivered at the next start.
    rx.set_delay(Duration::ZERO);
    let again = spawn(dir.path(), &config, free_port()).await;
    wait_until("delivered after restart", Duration::from_secs(30), || {
        let n = rx.seen().len();
        async move { n >= 2 }
    })
    .await;
    let ids: HashSet<String> = rx.seen().iter().map(|s| s.header("webhook-id")).collect();
    assert_eq!(ids.len(), 1, "the same record, resent with its id");
    stop(again).await;
}

async fn post_json(p: &Proc, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", p.url))
        .json(body)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_maximum_size_batches_at_once_stay_under_150_mb() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
[log]
format = "json"
[journal]
path = "data/journal.db"
[routes.default]
success = { kind = "NONE" }
failure = { kind = "NONE" }
"#;
    let p = spawn(dir.path(), config, free_port()).await;
    // 1,000 events of about 1 KiB: just under the 1 MiB default body limit.
    let batch = |c: usize| {
        let events: Vec<_> = (0..1000)
            .map(|i| {
                let mut e = event(&format!("mem-{c:03}-{i:04}"), 500);
                e["errorMessage"] = json!("m".repeat(780));
                e
            })
            .collect();
        let body = json!({ "completions": events }).to_string();
        assert!(
            body.len() > 1_000_000 && body.len() <= 1_048_576,
            "{}",
            body.len()
        );
        body
    };
    let http = reqwest::Client::new();
    let busy = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..200 {
        let (http, url, body, busy) = (http.clone(), p.url.clone(), batch(c), busy.clone());
        clients.push(tokio::spawn(async move {
            loop {
                // A connection that breaks under this overload (the server
                // closes a kept-alive connection as the client reuses it) is
                // retried as a runtime would: posting again is idempotent.
                let r = match http
                    .post(format!("{url}/v1/completions"))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                {
                    Ok(r) => r,
                    Err(e) if e.is_request() || e.is_connect() => {
                        busy.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50 + fastrand::u64(..200))).await;
                        continue;
                    }
                    Err(e) => panic!("{e}"),
                };
                match r.status().as_u16() {
                    202 => return,
                    503 => {
                        busy.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50 + fastrand::u64(..200))).await;
                    }
                    other => panic!("answer {other}"),
                }
            }
        }));
    }
    for c in clients {
        tokio::time::timeout(Duration::from_secs(50), c)
            .await
            .expect("every batch accepted in time")
            .unwrap();
    }
    let peak = p.peak_rss();
    let text = p.metrics().await;
    eprintln!(
        "FAULT 200 maximum-size batches: sent 200,000, acknowledged {}, peak RSS {} MB, {} answers 503 (budget full) or broken connections, retried",
        metric(&text, "fnrelay_events_accepted_total"),
        peak / 1_000_000,
        busy.load(Ordering::Relaxed)
    );
    assert_eq!(assert_conserved(&text), 200_000.0);
    assert!(peak < 150_000_000, "peak RSS {peak} bytes");
    stop(p).await;
}

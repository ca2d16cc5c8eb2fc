//! The front door's limits, driven over raw TCP: the connection cap, header,
//! body and idle deadlines, the body budget, and a shutdown that ends on
//! time whatever the clients do.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(server: &str) -> String {
    format!(
        r#"
[server]
{server}
[journal]
path = "{{dir}}/journal.db"
[queues.q]
backend = "file"
path = "{{dir}}/q.jsonl"
[routes.default]
success = {{ kind = "QUEUE", queueId = "q" }}
failure = {{ kind = "QUEUE", queueId = "q" }}
"#
    )
}

fn addr(d: &Daemon) -> String {
    d.url.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (or `limit` passes);
/// returns what arrived and how long it took.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(start + limit),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => panic!("the server did not close the connection within {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

fn request_head(addr: &str, len: usize) -> String {
    format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_connections_a_client_gets_503_and_a_freed_slot_serves_again() {
    let d = start(&config("max_connections = 20")).await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(addr(&d)).await.unwrap());
    }
    // The 21st connection is answered 503 with Retry-After, then closed.
    // (A client that keeps no connections, so each try is a new one.)
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    wait_until(
        "a connection over the cap is refused",
        Duration::from_secs(10),
        || async {
            let r = fresh.get(format!("{}/healthz", d.url)).send().await;
            r.is_ok_and(|r| r.status() == 503 && r.headers()["retry-after"] == "1")
        },
    )
    .await;
    assert!(
        metric(
            &d.metrics().await,
            "fnrelay_http_refused_total{reason=\"max_connections\"}"
        ) >= 1.0
    );
    idle.truncate(10);
    wait_until(
        "freed slots serve again",
        Duration::from_secs(10),
        || async {
            let (code, _) = d.post(&event("after-cap", 200)).await;
            code == 202
        },
    )
    .await;
}

#[tokio::test]
async fn a_header_that_never_ends_and_an_idle_keep_alive_are_closed() {
    let d = start(&config(
        "header_read_timeout = \"500ms\"\nidle_timeout = \"700ms\"",
    ))
    .await;

    // Slowloris: a header that never finishes.
    let mut slow = TcpStream::connect(addr(&d)).await.unwrap();
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let (_, took) = read_to_close(&mut slow, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(400),
        "closed after the header timeout, not before: {took:?}"
    );

    // A connection that never sends anything.
    let mut silent = TcpStream::connect(addr(&d)).await.unwrap();
    read_to_close(&mut silent, Duration::from_secs(5)).await;

    // A keep-alive connection: one request answered, then idle.
    let mut keep = TcpStream::connect(addr(&d)).await.unwrap();
    keep.write_all(format!("GET /healthz HTTP/1.1\r\nhost: {}\r\n\r\n", addr(&d)).as_bytes())
        .await
        .unwrap();
    let (answer, took) = read_to_close(&mut keep, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took >= Duration::from_millis(600),
        "kept alive until idle: {took:?}"
    );
}

#[tokio::test]
async fn a_body_that_trickles_past_its_deadline_gets_408_and_journals_nothing() {
    let d = start(&config("body_read_timeout = \"600ms\"")).await;
    let body = event("trickle", 200).to_string();
    let mut s = TcpStream::connect(addr(&d)).await.unwrap();
    s.write_all(request_head(&addr(&d), body.len()).as_bytes())
        .await
        .unwrap();
    s.write_all(&body.as_bytes()[..10]).await.unwrap();
    let (answer, took) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("server.body_read_timeout"), "{answer}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let text = d.metrics().await;
    assert_eq!(metric(&text, "fnrelay_pending_records"), 0.0);
}

#[tokio::test]
async fn over_the_body_budget_a_request_gets_503_before_its_body_is_read() {
    let d = start(&config(
        "max_body_bytes = 10000\nmax_body_bytes_in_flight = 10000\nbody_read_timeout = \"20s\"",
    ))
    .await;
    // One request announces 10,000 bytes and holds the whole budget.
    let mut holder = TcpStream::connect(addr(&d)).await.unwrap();
    holder
        .write_all(request_head(&addr(&d), 10_000).as_bytes())
        .await
        .unwrap();
    holder.write_all(b"{").await.unwrap();
    wait_until("the budget is full", Duration::from_secs(10), || async {
        let r = d
            .http
            .post(format!("{}/v1/completions", d.url))
            .json(&event("over-budget", 200))
            .send()
            .await
            .unwrap();
        r.status() == 503 && r.headers()["retry-after"] == "1"
    })
    .await;
    // Declared bodies over max_body_bytes get 413 without being read.
    let mut big = TcpStream::connect(addr(&d)).await.unwrap();
    big.write_all(request_head(&addr(&d), 20_000).as_bytes())
        .await
        .unwrap();
    let (answer, _) = read_to_close(&mut big, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Once the holder goes, the budget is back.
    drop(holder);
    wait_until(
        "the budget is released",
        Duration::from_secs(10),
        || async { d.post(&event("after-budget", 200)).await.0 == 202 },
    )
    .await;
}

#[tokio::test]
async fn shutdown_ends_on_time_with_a_slow_client_and_answers_newcomers_503() {
    let d = start(&config(
        "shutdown_timeout = \"2s\"\nbody_read_timeout = \"60s\"",
    ))
    .await;
    let body = event("slow-at-shutdown", 200).to_string();
    let mut slow = TcpStream::connect(addr(&d)).await.unwrap();
    slow.write_all(request_head(&addr(&d), body.len()).as_bytes())
        .await
        .unwrap();
    slow.write_all(&body.as_bytes()[..5]).await.unwrap();
    // The slow request is being read (the scrape itself is the other one).
    d.wait_metric("fnrelay_http_requests_in_flight", 2.0).await;

    let url = d.url.clone();
    let begun = Instant::now();
    let stopping = tokio::spawn(async move { d.stop().await });
    // Newcomers during the drain get a 503, not a refused connection.
    let http = reqwest::Client::new();
    wait_until(
        "a newcomer is answered 503",
        Duration::from_secs(2),
        || async {
            http.post(format!("{url}/v1/completions"))
                .json(&event("newcomer", 200))
                .send()
                .await
                .is_ok_and(|r| r.status() == 503)
        },
    )
    .await;
    stopping.await.unwrap();
    let took = begun.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "stopped within shutdown_timeout: {took:?}"
    );
    let (answer, _) = read_to_close(&mut slow, Duration::from_secs(1)).await;
    assert!(!answer.contains("202"), "{answer}");
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive_and_checked_before_the_body() {
    let d = start(&config("auth_token = \"s3cret\"")).await;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = d
            .http
            .post(format!("{}/v1/completions", d.url))
            .header("authorization", format!("{scheme} s3cret"))
            .json(&event(&format!("scheme-{scheme}"), 200))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{scheme}");
    }
    // A request without the token is refused without waiting for its body.
    let mut s = TcpStream::connect(addr(&d)).await.unwrap();
    s.write_all(request_head(&addr(&d), 5000).as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
        .await
        .expect("answered before the body")
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 401");
}

#[tokio::test]
async fn over_max_requests_in_flight_a_request_gets_503_at_once() {
    let d = start(&config(
        "max_requests_in_flight = 2\nbody_read_timeout = \"20s\"",
    ))
    .await;
    // Two requests hold both slots, their bodies half sent.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr(&d)).await.unwrap();
        s.write_all(request_head(&addr(&d), 500).as_bytes())
            .await
            .unwrap();
        s.write_all(b"{").await.unwrap();
        holders.push(s);
    }
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    wait_until(
        "a third request is refused",
        Duration::from_secs(10),
        || async {
            let r = fresh
                .post(format!("{}/v1/completions", d.url))
                .json(&event("third", 200))
                .send()
                .await
                .unwrap();
            r.status() == 503 && r.headers()["retry-after"] == "1"
        },
    )
    .await;
    drop(holders);
    wait_until("slots free again", Duration::from_secs(10), || async {
        d.post(&event("after-slots", 200)).await.0 == 202
    })
    .await;
    let text = d.metrics().await;
    assert!(
        metric(
            &text,
            "fnrelay_http_refused_total{reason=\"max_requests_in_flight\"}"
        ) >= 1.0
    );
}

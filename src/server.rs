//! The HTTP/1.1 server under the API: connection limits and timeouts, and a
//! shutdown that ends within `server.shutdown_timeout` whatever the clients
//! do.
//!
//! - At most `max_connections` open connections (lowered to fit the open-file
//!   limit); one more is answered 503 with Retry-After and closed, so the
//!   process never runs out of file descriptors.
//! - A request header must arrive within `header_read_timeout`; a connection
//!   with no request for `idle_timeout` is closed. (Body deadlines are the
//!   handlers': see [`crate::api`].)
//! - On shutdown: stop reading new requests on open connections (in-flight
//!   ones finish, then the connection closes), answer 503 to connections
//!   opened meanwhile, and drop whatever is still open at the deadline.
//!
//! HTTP/2 is not offered: runtimes post small events over HTTP/1.1, and one
//! protocol keeps the limits above simple and complete.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::logging::RateLimited;

/// Connections being refused at once (each for at most [`REFUSE_TIMEOUT`]);
/// beyond this a connection is closed without an answer.
const MAX_REFUSING: usize = 64;
/// How long a refused connection gets to read its 503.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// File descriptors kept for the journal, brokers and refusals when
/// `max_connections` is fitted to the open-file limit.
const RESERVED_FDS: u64 = 256;

/// What the server enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most open connections.
    pub max_connections: usize,
    /// Whole request header deadline.
    pub header_read_timeout: Duration,
    /// Keep-alive idle deadline.
    pub idle_timeout: Duration,
    /// Everything stops within this of the shutdown signal.
    pub shutdown_timeout: Duration,
}

/// Raises the soft open-file limit to the hard one and returns
/// `max_connections` fitted under it (with a warning when lowered).
pub fn fit_connections(wanted: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit (RLIMIT_NOFILE)");
            return wanted;
        }
    };
    let room = limit.saturating_sub(RESERVED_FDS).max(16) as usize;
    if wanted > room {
        tracing::warn!(
            max_connections = wanted,
            open_file_limit = limit,
            using = room,
            "server.max_connections does not fit the open-file limit; lowered (raise LimitNOFILE / ulimit -n)"
        );
        room
    } else {
        wanted
    }
}

/// Serves `app` on `listener` until `shutdown` fires, then drains as the
/// module documentation says and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let limits = Arc::new(limits);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let tracker = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let accept_errors = RateLimited::new(Duration::from_secs(10));
    let refusals = RateLimited::new(Duration::from_secs(10));

    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_error(&accept_errors, &e).await;
                continue;
            }
        };
        match open.clone().try_acquire_owned() {
            Ok(permit) => {
                tracker.spawn(connection(
                    stream,
                    app.clone(),
                    limits.clone(),
                    shutdown.clone(),
                    hard_stop.clone(),
                    permit,
                ));
            }
            Err(_) => {
                if let Some(suppressed) = refusals.allow("max_connections") {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        suppressed,
                        "connection refused with 503: server.max_connections reached"
                    );
                }
                refuse(stream, &refusing, "too many open connections; retry later");
            }
        }
    }

    // Draining: open connections finish their requests; new ones get 503.
    tracker.close();
    let deadline = Instant::now() + limits.shutdown_timeout;
    loop {
        tokio::select! {
            () = tracker.wait() => break,
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    connections = tracker.len(),
                    "shutdown timeout reached with client connections still open; closing them"
                );
                hard_stop.cancel();
                tracker.wait().await;
                break;
            }
            r = listener.accept() => match r {
                Ok((stream, _)) => refuse(stream, &refusing, "fnrelay is shutting down"),
                Err(e) => accept_error(&accept_errors, &e).await,
            },
        }
    }
    Ok(())
}

async fn accept_error(log: &RateLimited, e: &io::Error) {
    if let Some(suppressed) = log.allow("accept") {
        tracing::error!(error = %e, suppressed, "cannot accept a connection");
    }
    // Out of file descriptors or memory: give closing connections a moment
    // instead of spinning on accept.
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Writes a 503 and closes, after letting the client read it (closing with
/// unread input would reset the connection and lose the answer).
fn refuse(mut stream: TcpStream, refusing: &Arc<Semaphore>, why: &'static str) {
    let Ok(permit) = refusing.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let body = format!(r#"{{"error":"unavailable","message":"{why}"}}"#);
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(REFUSE_TIMEOUT, async {
            stream.write_all(answer.as_bytes()).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            let mut read = 0;
            while read < 65_536 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => read += n,
                }
            }
            io::Result::Ok(())
        })
        .await;
    });
}

/// When the connection last finished a request, and how many it is
/// handling.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection becomes idle-expired, if nothing happens first.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    stream: TcpStream,
    app: Router,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
    });
    let seen = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        seen.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(seen.clone());
        let mut app = app.clone();
        async move {
            let response = app.call(request.map(axum::body::Body::new)).await;
            drop(guard);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let idle_at = activity.idle_deadline(limits.idle_timeout);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(idle_at), if !closing => {
                let busy = activity.in_flight.load(Ordering::Relaxed) > 0;
                if busy {
                    activity.touch();
                } else if Instant::now() >= activity.idle_deadline(limits.idle_timeout) {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = hard_stop.cancelled() => return,
        }
    }
}

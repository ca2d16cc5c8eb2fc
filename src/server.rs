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
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::logging::RateLimited;
use crate::metrics::Metrics;

/// Connections being refused at once (each for at most [`REFUSE_TIMEOUT`]);
/// beyond this a connection is closed without an answer.
const MAX_REFUSING: usize = 64;
/// How long a refused connection gets to read its 503.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(3);
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
    metrics: Arc<Metrics>,
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
                metrics.connection(1);
                let metrics = metrics.clone();
                let conn = connection(
                    stream,
                    app.clone(),
                    limits.clone(),
                    shutdown.clone(),
                    hard_stop.clone(),
                    permit,
                );
                tracker.spawn(async move {
                    conn.await;
                    metrics.connection(-1);
                });
            }
            Err(_) => {
                metrics.refused("max_connections");
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
                Ok((stream, _)) => {
                    metrics.refused("shutting_down");
                    refuse(stream, &refusing, "fnrelay is shutting down");
                }
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
            // Answer after the request's header (an HTTP client ignores an
            // answer that comes before its request), or after a second.
            let mut head = Vec::with_capacity(1024);
            let mut chunk = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while head.len() < 16_384 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            stream.write_all(answer.as_bytes()).await?;
            stream.shutdown().await?;
            let mut read = 0;
            while read < 65_536 {
                match stream.read(&mut chunk).await? {
                    0 => break,
                    n => read += n,
                }
            }
            io::Result::Ok(())
        })
        .await;
    });
}

/// What a connection is doing, for its deadlines: when it last became
/// ready for a request (opened, or answered one), when the first byte of the
/// next request arrived, and how many requests it is handling.
struct Activity {
    start: Instant,
    ready_ms: AtomicU64,
    first_byte_ms: AtomicU64,
    in_flight: AtomicUsize,
}

const NONE: u64 = u64::MAX;

impl Activity {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// The deadline the connection is under now: the header deadline while
    /// a request's header is arriving, the idle deadline while waiting for
    /// one, none while a request is handled.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        match self.first_byte_ms.load(Ordering::Acquire) {
            NONE => Some(self.at(self.ready_ms.load(Ordering::Acquire)) + limits.idle_timeout),
            first => Some(self.at(first) + limits.header_read_timeout),
        }
    }
}

/// Ends a request: the connection is ready for the next one.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.ready_ms.store(a.now_ms(), Ordering::Release);
        a.first_byte_ms.store(NONE, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client socket, noting when a request's first byte arrives.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        let a = &self.activity;
        if buf.filled().len() > before
            && a.in_flight.load(Ordering::Acquire) == 0
            && a.first_byte_ms.load(Ordering::Acquire) == NONE
        {
            a.first_byte_ms.store(a.now_ms(), Ordering::Release);
        }
        result
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
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
        ready_ms: AtomicU64::new(0),
        first_byte_ms: AtomicU64::new(NONE),
        in_flight: AtomicUsize::new(0),
    });
    let seen = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        seen.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(seen.clone());
        let mut app = app.clone();
        async move {
            let response = app.call(request.map(axum::body::Body::new)).await;
            drop(guard);
            response
        }
    });
    let io = Watched {
        stream,
        activity: activity.clone(),
    };
    // The header and idle deadlines are this task's (hyper's header timer
    // would also run while a keep-alive connection is idle).
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        // Re-checked at least this often while a request is handled.
        let wake = activity.deadline(&limits).unwrap_or_else(|| {
            Instant::now() + limits.header_read_timeout.min(limits.idle_timeout)
        });
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
            () = tokio::time::sleep_until(wake) => {
                if activity.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    // Idle, or a header that did not arrive in time.
                    return;
                }
            }
            () = hard_stop.cancelled() => return,
        }
    }
}

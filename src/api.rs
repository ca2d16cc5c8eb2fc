//! The HTTP API: ingest (`POST /v1/completions`), admin (dead letters),
//! `/metrics`, `/healthz`, `/readyz`.
//!
//! Ingest validates, routes, builds records and appends them to the journal;
//! it answers 202 only after the journal commit. It never calls a
//! destination: it only wakes the dispatcher.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::auth::{Caller, Denied};
use crate::config::{Config, Scope};
use crate::journal::{Appended, Journal, JournalError, NewRecord, Target, now_ms};
use crate::logging::{Chain, RateLimited, clip};
use crate::metrics::Metrics;
use crate::record::{
    self, Completion, DestinationType, FieldError, Limits, build_record, parse_request,
};
use crate::routing::{self, DestSpec};

/// What a reload swaps: the configuration and the bearer token read with
/// it. A request runs on the one it started with.
pub struct Settings {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// The bearer tokens and their scopes.
    pub tokens: crate::auth::Tokens,
}

/// What handlers share.
pub struct AppState {
    settings: RwLock<Arc<Settings>>,
    /// The journal.
    pub journal: Arc<dyn Journal>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Wakes the dispatcher after an append.
    pub wake: Arc<Notify>,
    /// Fires when the daemon stops accepting.
    pub shutdown: CancellationToken,
    /// Wakes the watchdog when a watch is registered.
    pub watchdog_wake: Notify,
    /// Asks the reloader to reload the configuration (`None`: this daemon
    /// was given a fixed configuration, not a file).
    pub reload: Option<tokio::sync::mpsc::Sender<crate::reload::Request>>,
    /// Monotonic ULIDs: ids of one batch sort in accept order.
    pub ulids: Mutex<ulid::Generator>,
    /// Request budget: one permit per request being handled.
    pub requests: Arc<Semaphore>,
    /// Body budget: one permit per body byte held.
    pub body_bytes: Arc<Semaphore>,
    /// Repeated per-request errors, logged once per window.
    pub errors: RateLimited,
}

impl AppState {
    /// The state for `config`, with its budgets.
    pub fn new(
        config: Arc<Config>,
        journal: Arc<dyn Journal>,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
        tokens: crate::auth::Tokens,
    ) -> Self {
        let server = &config.server;
        Self {
            requests: Arc::new(Semaphore::new(server.max_requests_in_flight)),
            body_bytes: Arc::new(Semaphore::new(server.max_body_bytes_in_flight)),
            settings: RwLock::new(Arc::new(Settings { config, tokens })),
            journal,
            metrics,
            wake,
            shutdown,
            watchdog_wake: Notify::new(),
            reload: None,
            ulids: Mutex::new(ulid::Generator::new()),
            errors: RateLimited::new(Duration::from_secs(10)),
        }
    }

    /// The configuration and token in use now.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("settings lock").clone()
    }

    /// The configuration in use now.
    pub fn config(&self) -> Arc<Config> {
        self.settings().config.clone()
    }

    /// A reload: requests that start from now on use `config` and `token`;
    /// the request and body budgets take the new sizes (permits in use are
    /// kept until their requests end).
    pub fn reconfigure(&self, config: Arc<Config>, tokens: crate::auth::Tokens) {
        let mut settings = self.settings.write().expect("settings lock");
        let (old, new) = (&settings.config.server, &config.server);
        crate::reload::resize(
            &self.requests,
            old.max_requests_in_flight,
            new.max_requests_in_flight,
        );
        crate::reload::resize(
            &self.body_bytes,
            old.max_body_bytes_in_flight,
            new.max_body_bytes_in_flight,
        );
        *settings = Arc::new(Settings { config, tokens });
    }

    /// Logs a per-request error at most once per 10 s per kind and error
    /// text, with the number of lines suppressed meanwhile.
    fn log_error(&self, what: &'static str, error: &(dyn std::error::Error + 'static)) {
        let text = Chain(error).to_string();
        if let Some(suppressed) = self.errors.allow(&format!("{what}\0{text}")) {
            tracing::error!(
                error = %text,
                journal = %self.config().journal.path.display(),
                suppressed,
                "{what}"
            );
        }
    }
}

/// Errors the API answers with. Client errors name the field; internal
/// errors are logged once and never leak details.
#[derive(Debug)]
pub enum ApiError {
    /// 400: every bad field.
    BadRequest(Vec<FieldError>),
    /// 401: missing or wrong bearer token.
    Unauthorized,
    /// 403: destinations the compartment may not use.
    Forbidden(Vec<FieldError>),
    /// 403: a known token without the scope the endpoint needs.
    MissingScope {
        /// The token's name.
        name: String,
        /// The scope it lacks.
        scope: Scope,
    },
    /// 413: over `server.max_body_bytes`.
    PayloadTooLarge(usize),
    /// 415: not `application/json`.
    UnsupportedMediaType(String),
    /// 408: the body did not arrive within `server.body_read_timeout`.
    BodyTimeout(std::time::Duration),
    /// 409: a known fnCallId re-posted with other content.
    Conflict(Vec<FieldError>),
    /// 404: no such record (or resource).
    NotFound(String),
    /// 503 with Retry-After: 5 (journal over its high-water mark or
    /// failing, shutting down).
    Unavailable(&'static str),
    /// 503 with Retry-After: 1 (a request or body budget is momentarily
    /// full).
    Busy(&'static str),
    /// 500.
    Internal,
}

/// Most field errors in one answer; the rest are counted.
const MAX_FIELD_ERRORS: usize = 100;

fn capped(mut fields: Vec<FieldError>) -> Vec<FieldError> {
    if fields.len() > MAX_FIELD_ERRORS {
        let more = fields.len() - MAX_FIELD_ERRORS;
        fields.truncate(MAX_FIELD_ERRORS);
        fields.push(FieldError::new(
            "...",
            format!("{more} more errors not shown"),
        ));
    }
    fields
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::BadRequest(fields) => (StatusCode::BAD_REQUEST, {
                let fields = capped(fields);
                json!({"error": "invalid_request", "message": summary(&fields), "fields": fields})
            }),
            ApiError::Forbidden(fields) => (StatusCode::FORBIDDEN, {
                let fields = capped(fields);
                json!({"error": "forbidden", "message": summary(&fields), "fields": fields})
            }),
            ApiError::MissingScope { name, scope } => (
                StatusCode::FORBIDDEN,
                json!({"error": "forbidden", "message": format!("token `{name}` does not have the `{}` scope", scope.as_str())}),
            ),
            ApiError::NotFound(message) => (
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "message": message}),
            ),
            ApiError::Conflict(fields) => (StatusCode::CONFLICT, {
                let fields = capped(fields);
                json!({"error": "conflict", "message": summary(&fields), "fields": fields})
            }),
            ApiError::Unauthorized => {
                let mut r = (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": "unauthorized", "message": "missing or invalid bearer token"})),
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
            ApiError::PayloadTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "payload_too_large", "message": format!("body is over {limit} bytes (server.max_body_bytes)")}),
            ),
            ApiError::UnsupportedMediaType(got) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"error": "unsupported_media_type", "message": format!("Content-Type must be application/json, got `{}`", clip(&got))}),
            ),
            ApiError::BodyTimeout(limit) => {
                let mut r = (
                    StatusCode::REQUEST_TIMEOUT,
                    Json(json!({"error": "request_timeout", "message": format!("the body did not arrive within {} (server.body_read_timeout)", humantime::format_duration(limit))})),
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
            ApiError::Unavailable(why) => {
                let mut r = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"error": "unavailable", "message": why})),
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                return r;
            }
            ApiError::Busy(why) => {
                let mut r = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"error": "unavailable", "message": why})),
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return r;
            }
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "internal", "message": "internal error; see the daemon's log"}),
            ),
        };
        (status, Json(body)).into_response()
    }
}

fn summary(fields: &[FieldError]) -> String {
    fields
        .iter()
        .map(|f| format!("{}: {}", f.field, f.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Builds the router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(ingest))
        .route("/v1/dead-letters", get(list_dead))
        .route("/v1/dead-letters/replay", post(replay_dead))
        .route("/v1/admin/reload", post(reload))
        .route("/v1/invocations", post(watch_invocation))
        .route("/v1/functions", get(list_functions))
        .route(
            "/v1/functions/{functionId}/destinations",
            get(get_destinations)
                .put(put_destinations)
                .delete(delete_destinations),
        )
        .route("/v1/records", get(find_record))
        .route("/v1/records/{id}", get(record_by_id))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/openapi.json", get(openapi))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_requests,
        ))
        .with_state(state)
}

/// Over `server.max_requests_in_flight`, 503 at once: no queue in memory.
async fn limit_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = state.requests.clone().try_acquire_owned() else {
        state.metrics.refused("max_requests_in_flight");
        let limit = state.config().server.max_body_bytes;
        discard(request.into_body().into_data_stream(), limit).await;
        return ApiError::Busy(
            "too many requests in flight (server.max_requests_in_flight); retry later",
        )
        .into_response();
    };
    next.run(request).await
}

/// Reads and drops what is left of a request body (at most `limit` bytes,
/// for at most [`DISCARD_WITHIN`]) before an early answer. Closing a socket
/// with unread request bytes makes the kernel send a reset, and the client
/// then reports a broken connection instead of reading our 503 and its
/// Retry-After. Nothing is kept, so this costs no memory.
async fn discard<S, E>(mut body: S, limit: usize)
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
{
    use futures_util::StreamExt;
    let mut seen = 0usize;
    let _ = tokio::time::timeout(DISCARD_WITHIN, async {
        while let Some(Ok(chunk)) = body.next().await {
            seen += chunk.len();
            if seen > limit {
                break;
            }
        }
    })
    .await;
}

/// How long an early answer waits for the rest of the request body.
const DISCARD_WITHIN: Duration = Duration::from_secs(2);

/// Reads a body of at most `limit` bytes within `server.body_read_timeout`,
/// holding its size from the body budget (`server.max_body_bytes_in_flight`)
/// until the returned permit is dropped. Over the budget: 503 before reading.
async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<(Bytes, OwnedSemaphorePermit), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let over_budget = || {
        state.metrics.refused("max_body_bytes_in_flight");
        ApiError::Busy(
            "too many request bytes in flight (server.max_body_bytes_in_flight); retry later",
        )
    };
    let mut body = body.into_data_stream();
    // A body without Content-Length reserves a small share, then grows.
    let first = declared.unwrap_or(16 * 1024).min(limit).max(1);
    let Ok(mut permit) = state
        .body_bytes
        .clone()
        .try_acquire_many_owned(first as u32)
    else {
        discard(body, limit).await;
        return Err(over_budget());
    };
    let mut held = first;
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
    let timeout = state.config().server.body_read_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    use futures_util::StreamExt;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
            Err(_) => {
                state.metrics.refused("body_read_timeout");
                return Err(ApiError::BodyTimeout(timeout));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::BadRequest(vec![FieldError::new(
                    "body",
                    format!("cannot read the body: {e}"),
                )]));
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        if buf.len() + chunk.len() > held {
            let more = (buf.len() + chunk.len()).max(held * 2).min(limit) - held;
            let Ok(extra) = state.body_bytes.clone().try_acquire_many_owned(more as u32) else {
                drop(buf);
                discard(body, limit).await;
                return Err(over_budget());
            };
            permit.merge(extra);
            held += more;
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf.freeze(), permit))
}

/// The `Authorization: Bearer` token; the scheme is case-insensitive
/// (RFC 7235).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The caller, if its bearer token may act in `scope`: 401 without a known
/// token, 403 for a token without the scope.
fn authorize(state: &AppState, headers: &HeaderMap, scope: Scope) -> Result<Caller, ApiError> {
    state
        .settings()
        .tokens
        .check(bearer(headers), scope)
        .map_err(|denied| match denied {
            Denied::Unauthenticated => ApiError::Unauthorized,
            Denied::Scope { name, scope } => ApiError::MissingScope { name, scope },
        })
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(ct.to_string()))
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AcceptedRecord {
    fn_call_id: String,
    id: String,
}

async fn ingest(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    authorize(&state, &headers, Scope::Ingest)?;
    let config = state.config();
    let server = &config.server;
    if state.shutdown.is_cancelled() {
        discard(body.into_data_stream(), server.max_body_bytes).await;
        return Err(ApiError::Unavailable("fnrelay is shutting down"));
    }
    if state.journal.pending() >= config.journal.max_pending {
        discard(body.into_data_stream(), server.max_body_bytes).await;
        return Err(ApiError::Unavailable(
            "journal is over its high-water mark (journal.max_pending); retry later",
        ));
    }
    require_json(&headers)?;
    let (body, _budget) = read_body(&state, &headers, body, server.max_body_bytes).await?;
    let limits = Limits {
        max_batch_size: server.max_batch_size,
        max_id_bytes: server.max_id_bytes,
        max_error_message_bytes: server.max_error_message_bytes,
    };
    let (events, batch) = parse_request(&body, &limits).map_err(ApiError::BadRequest)?;
    let prefix = |i: usize| {
        if batch {
            format!("completions[{i}].")
        } else {
            String::new()
        }
    };

    let config = &*config;
    let team = team_routes(&state, &events).await.map_err(|e| {
        state.log_error("cannot read the functions' destinations", &e);
        ApiError::Unavailable("journal read failed; retry later")
    })?;
    let mut bad = Vec::new();
    let mut forbidden = Vec::new();
    let mut routed = Vec::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        for (side, dest) in [("success", &event.success), ("failure", &event.failure)] {
            if let Some(dest) = dest
                && let Err(reason) = config.check_dest(dest)
            {
                let field = dest.target().map_or("kind", |(k, _)| k.id_field());
                bad.push(FieldError::new(
                    format!("{}destinations.{side}.{field}", prefix(i)),
                    reason,
                ));
            }
        }
        let dt = event.destination_type();
        let dest = resolve(config, &team, event, dt);
        if let Some((kind, id)) = dest.as_ref().and_then(DestSpec::target)
            && !allowed(config, event, kind.table(), id)
        {
            forbidden.push(FieldError::new(
                format!("{}compartmentId", prefix(i)),
                format!(
                    "compartment `{}` may not use {}.{id} (no [[policy.allow]] rule permits it)",
                    event.compartment_id,
                    kind.table()
                ),
            ));
        }
        routed.push((dt, dest));
    }
    if !bad.is_empty() {
        return Err(ApiError::BadRequest(bad));
    }
    if !forbidden.is_empty() {
        return Err(ApiError::Forbidden(forbidden));
    }

    let accepted_at = OffsetDateTime::now_utc();
    let accepted_ms = (accepted_at.unix_timestamp_nanos() / 1_000_000) as i64;
    let ids = new_ids(&state, events.len());
    let records: Vec<NewRecord> = events
        .iter()
        .zip(routed.iter())
        .zip(ids)
        .map(|((event, (dt, dest)), id)| NewRecord {
            body: build_record(&id, event, accepted_at),
            id,
            fn_call_id: event.fn_call_id.clone(),
            function_id: event.function_id.clone(),
            destination_type: *dt,
            target: target_of(dest.as_ref()),
            accepted_at_ms: accepted_ms,
            digest: record::digest(event),
        })
        .collect();
    let skipped: Vec<Option<DestinationType>> = records
        .iter()
        .map(|r| r.target.is_none().then_some(r.destination_type))
        .collect();
    let appended = match state.journal.append(records).await {
        Ok(a) => a,
        Err(JournalError::Conflict(conflicts)) => {
            return Err(ApiError::Conflict(
                conflicts
                    .into_iter()
                    .map(|c| {
                        FieldError::new(
                            format!("{}fnCallId", prefix(c.index)),
                            format!(
                                "`{}` was accepted before as record {} with other content; differs: {}",
                                clip(&c.fn_call_id),
                                c.existing_id,
                                c.fields.join(", ")
                            ),
                        )
                    })
                    .collect(),
            ));
        }
        Err(e) => {
            state.log_error("cannot journal accepted events", &e);
            return Err(ApiError::Unavailable("journal write failed; retry later"));
        }
    };
    state.wake.notify_one();

    let new = appended.iter().filter(|a| !a.existing).count() as u64;
    state.metrics.accepted(new, appended.len() as u64 - new);
    // Count skips only when newly journaled; a re-post was counted already.
    for (record, skipped) in appended.iter().zip(skipped) {
        if let (false, Some(dt)) = (record.existing, skipped) {
            state.metrics.skipped(dt);
        }
    }
    let records: Vec<AcceptedRecord> = events
        .iter()
        .zip(appended)
        .map(|(e, a)| AcceptedRecord {
            fn_call_id: e.fn_call_id.clone(),
            id: a.id,
        })
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"accepted": records.len(), "records": records})),
    ))
}

/// `n` record ids (ULIDs, monotonic: the ids of one batch sort in accept
/// order).
fn new_ids(state: &AppState, n: usize) -> Vec<String> {
    let mut generator = state.ulids.lock().expect("ulid lock");
    let at = SystemTime::now();
    (0..n)
        .map(|_| match generator.generate_from_datetime(at) {
            Ok(id) => id.to_string(),
            Err(overflow) => overflow.commit_overflow_random().to_string(),
        })
        .collect()
}

/// Where a record with destination `dest` goes (`None`: NONE, skipped).
fn target_of(dest: Option<&DestSpec>) -> Option<Target> {
    dest.and_then(|d| {
        d.target().map(|(kind, resource)| Target {
            kind,
            resource_id: resource.to_string(),
            channel_id: d.channel().map(str::to_string),
        })
    })
}

/// The destinations teams set for the functions of `events`.
async fn team_routes(
    state: &AppState,
    events: &[Completion],
) -> Result<HashMap<String, routing::Route>, JournalError> {
    let mut ids: Vec<String> = events.iter().map(|e| e.function_id.clone()).collect();
    ids.sort();
    ids.dedup();
    Ok(state
        .journal
        .destinations_for(ids)
        .await?
        .into_iter()
        .map(|(f, d)| (f, d.route()))
        .collect())
}

/// Inline destination, else the team's, else the routes (see
/// [`routing::resolve`]).
fn resolve(
    config: &Config,
    team: &HashMap<String, routing::Route>,
    event: &Completion,
    dt: DestinationType,
) -> Option<DestSpec> {
    let inline = match dt {
        DestinationType::Success => event.success.clone(),
        DestinationType::Failure => event.failure.clone(),
    };
    routing::resolve(
        &config.routes,
        inline,
        team.get(&event.function_id),
        &event.function_id,
        &event.application_id,
        dt,
    )
}

fn allowed(config: &Config, event: &Completion, table: &str, id: &str) -> bool {
    let rules = &config.policy.allow;
    if rules.is_empty() {
        return true;
    }
    let name = format!("{table}.{id}");
    let quoted = format!("{table}.\"{id}\"");
    rules.iter().any(|rule| {
        rule.compartment == event.compartment_id
            && rule
                .applications
                .as_ref()
                .is_none_or(|apps| apps.contains(&event.application_id))
            && rule.resources.iter().any(|r| *r == name || *r == quoted)
    })
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn list_dead(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let _caller = authorize(&state, &headers, Scope::Admin)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let dead = state.journal.list_dead(q.after, limit).await.map_err(|e| {
        state.log_error("cannot list dead letters", &e);
        ApiError::Internal
    })?;
    let next = (dead.len() == limit)
        .then(|| dead.last().map(|d| d.id.clone()))
        .flatten();
    Ok(Json(json!({"deadLetters": dead, "next": next})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    #[serde(default)]
    ids: Option<Vec<String>>,
    #[serde(default)]
    all: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StartedInvocation {
    fn_call_id: String,
    function_id: String,
    application_id: String,
    compartment_id: String,
    #[serde(default)]
    opc_request_id: Option<String>,
    deadline: String,
}

/// `POST /v1/invocations` (ingest): a detached invocation has started; if
/// no completion for its fnCallId arrives by `deadline`, fnrelay makes the
/// failure record itself. 202 once the watch is committed.
async fn watch_invocation(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    authorize(&state, &headers, Scope::Ingest)?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::Unavailable("fnrelay is shutting down"));
    }
    require_json(&headers)?;
    let config = state.config();
    let (body, _budget) = read_body(&state, &headers, body, config.server.max_body_bytes).await?;
    let req: StartedInvocation = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(vec![FieldError::new("body", e.to_string())]))?;
    let mut bad = record::check_ids(
        &[
            ("fnCallId", &req.fn_call_id),
            ("functionId", &req.function_id),
            ("applicationId", &req.application_id),
            ("compartmentId", &req.compartment_id),
        ],
        config.server.max_id_bytes,
    );
    let now = now_ms();
    let deadline_ms = match OffsetDateTime::parse(
        &req.deadline,
        &time::format_description::well_known::Rfc3339,
    ) {
        Ok(t) => {
            let ms = (t.unix_timestamp_nanos() / 1_000_000) as i64;
            let max = config.watchdog.max_deadline;
            if ms <= now {
                bad.push(FieldError::new("deadline", "is in the past"));
            } else if ms - now > max.as_millis() as i64 {
                bad.push(FieldError::new(
                    "deadline",
                    format!(
                        "is more than {} from now (watchdog.max_deadline)",
                        humantime::format_duration(max)
                    ),
                ));
            }
            ms
        }
        Err(e) => {
            bad.push(FieldError::new(
                "deadline",
                format!("not an RFC 3339 time ({e})"),
            ));
            0
        }
    };
    if !bad.is_empty() {
        return Err(ApiError::BadRequest(bad));
    }
    // The record it would make must be allowed where it would go.
    let event = crate::watchdog::timeout_event(
        &req.fn_call_id,
        &req.function_id,
        &req.application_id,
        &req.compartment_id,
        req.opc_request_id.clone(),
        deadline_ms,
    );
    let team = team_routes(&state, std::slice::from_ref(&event))
        .await
        .map_err(|e| {
            state.log_error("cannot read the functions' destinations", &e);
            ApiError::Unavailable("journal read failed; retry later")
        })?;
    if let Some(dest) = resolve(&config, &team, &event, DestinationType::Failure)
        && let Some((kind, id)) = dest.target()
        && !allowed(&config, &event, kind.table(), id)
    {
        return Err(ApiError::Forbidden(vec![FieldError::new(
            "compartmentId",
            format!(
                "compartment `{}` may not use {}.{id} (no [[policy.allow]] rule permits it)",
                clip(&event.compartment_id),
                kind.table()
            ),
        )]));
    }
    let watched = state
        .journal
        .watch(crate::journal::Watch {
            fn_call_id: req.fn_call_id.clone(),
            function_id: req.function_id,
            application_id: req.application_id,
            compartment_id: req.compartment_id,
            opc_request_id: req.opc_request_id,
            deadline_ms,
        })
        .await
        .map_err(|e| {
            state.log_error("cannot journal a started invocation", &e);
            ApiError::Unavailable("journal write failed; retry later")
        })?;
    state.watchdog_wake.notify_one();
    Ok(match watched {
        crate::journal::Watched::Watching => (
            StatusCode::ACCEPTED,
            Json(
                json!({"fnCallId": req.fn_call_id, "state": "watching", "deadline": crate::journal::ms_to_rfc3339(deadline_ms)}),
            ),
        ),
        crate::journal::Watched::Completed { id } => (
            StatusCode::OK,
            Json(json!({"fnCallId": req.fn_call_id, "state": "completed", "id": id})),
        ),
    })
}

/// Journals the failure records the watchdog makes for invocations whose
/// completion did not come: routed by the configuration (the failure side;
/// a compartment the policy does not allow there gets no record, logged),
/// with no digest, so a late completion of the same call gets the record's
/// id back. Returns, per event, the record's id and whether it is new.
pub(crate) async fn journal_made_records(
    state: &AppState,
    events: Vec<Completion>,
) -> Result<Vec<Option<Appended>>, JournalError> {
    let config = state.config();
    let accepted_at = OffsetDateTime::now_utc();
    let accepted_ms = (accepted_at.unix_timestamp_nanos() / 1_000_000) as i64;
    let team = team_routes(state, &events).await?;
    let mut records = Vec::new();
    let mut index = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let dest = resolve(&config, &team, event, DestinationType::Failure);
        if let Some((kind, id)) = dest.as_ref().and_then(DestSpec::target)
            && !allowed(&config, event, kind.table(), id)
        {
            tracing::error!(fn_call_id = %clip(&event.fn_call_id), destination = %format!("{}.{id}", kind.table()), "watchdog: the policy no longer lets this compartment use its failure destination; no record made");
            continue;
        }
        let id = new_ids(state, 1).remove(0);
        records.push(NewRecord {
            body: build_record(&id, event, accepted_at),
            id,
            fn_call_id: event.fn_call_id.clone(),
            function_id: event.function_id.clone(),
            destination_type: DestinationType::Failure,
            target: target_of(dest.as_ref()),
            accepted_at_ms: accepted_ms,
            digest: Vec::new(),
        });
        index.push(i);
    }
    let skipped: Vec<bool> = records.iter().map(|r| r.target.is_none()).collect();
    let appended = state.journal.append(records).await?;
    state.wake.notify_one();
    let mut out: Vec<Option<Appended>> = vec![None; events.len()];
    for ((i, a), skipped) in index.into_iter().zip(appended).zip(skipped) {
        if !a.existing {
            state.metrics.accepted(1, 0);
            if skipped {
                state.metrics.skipped(DestinationType::Failure);
            }
        }
        out[i] = Some(a);
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DestinationsBody {
    compartment_id: String,
    #[serde(default)]
    success: Option<DestSpec>,
    #[serde(default)]
    failure: Option<DestSpec>,
}

/// A function's two sides as JSON, for logs.
fn sides_json(d: &crate::journal::FunctionDestinations) -> String {
    json!({"success": d.success, "failure": d.failure}).to_string()
}

fn destinations_json(d: &crate::journal::FunctionDestinations) -> serde_json::Value {
    json!({
        "functionId": d.function_id,
        "compartmentId": d.compartment_id,
        "success": d.success,
        "failure": d.failure,
        "updatedAt": crate::journal::ms_to_rfc3339(d.updated_at_ms),
        "updatedBy": d.updated_by,
    })
}

/// `PUT /v1/functions/{functionId}/destinations` (destinations scope): the
/// OCI shape; validated like inline destinations (defined resource, kind,
/// policy for the compartment); effective for every record accepted after
/// it returns, on every replica.
async fn put_destinations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(function_id): axum::extract::Path<String>,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authorize(&state, &headers, Scope::Destinations)?;
    require_json(&headers)?;
    let config = state.config();
    let (body, _budget) = read_body(&state, &headers, body, config.server.max_body_bytes).await?;
    let req: DestinationsBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(vec![FieldError::new("body", e.to_string())]))?;
    let mut bad = record::check_ids(
        &[
            ("functionId", &function_id),
            ("compartmentId", &req.compartment_id),
        ],
        config.server.max_id_bytes,
    );
    if req.success.is_none() && req.failure.is_none() {
        bad.push(FieldError::new(
            "success",
            "give `success`, `failure` or both (DELETE removes a function's destinations)",
        ));
    }
    let mut forbidden = Vec::new();
    // The policy is checked for the compartment; a rule that names
    // applications cannot cover a function's destinations.
    let probe = crate::watchdog::timeout_event("", &function_id, "", &req.compartment_id, None, 0);
    for (side, dest) in [("success", &req.success), ("failure", &req.failure)] {
        let Some(dest) = dest else { continue };
        if let Err(reason) = config.check_dest(dest) {
            let field = dest.target().map_or("kind", |(k, _)| k.id_field());
            bad.push(FieldError::new(format!("{side}.{field}"), reason));
        } else if let Some((kind, id)) = dest.target()
            && !allowed(&config, &probe, kind.table(), id)
        {
            forbidden.push(FieldError::new(
                format!("{side}.{}", kind.id_field()),
                format!(
                    "compartment `{}` may not use {}.{id} (no [[policy.allow]] rule permits it)",
                    clip(&req.compartment_id),
                    kind.table()
                ),
            ));
        }
    }
    if !bad.is_empty() {
        return Err(ApiError::BadRequest(bad));
    }
    if !forbidden.is_empty() {
        return Err(ApiError::Forbidden(forbidden));
    }
    let new = crate::journal::FunctionDestinations {
        function_id: function_id.clone(),
        compartment_id: req.compartment_id,
        success: req.success,
        failure: req.failure,
        updated_at_ms: now_ms(),
        updated_by: caller.to_string(),
    };
    let old = state
        .journal
        .put_destinations(new.clone())
        .await
        .map_err(|e| {
            state.log_error("cannot store a function's destinations", &e);
            ApiError::Unavailable("journal write failed; retry later")
        })?;
    tracing::info!(
        token = %caller,
        function_id = %clip(&function_id),
        old = %old.as_ref().map_or("(none)".to_string(), sides_json),
        new = %sides_json(&new),
        "function destinations changed"
    );
    Ok(Json(destinations_json(&new)))
}

/// `GET /v1/functions/{functionId}/destinations` (destinations scope).
async fn get_destinations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(function_id): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &headers, Scope::Destinations)?;
    let found = state
        .journal
        .destinations_for(vec![function_id.clone()])
        .await
        .map_err(|e| {
            state.log_error("cannot read a function's destinations", &e);
            ApiError::Internal
        })?;
    match found.get(&function_id) {
        Some(d) => Ok(Json(destinations_json(d))),
        None => Err(ApiError::NotFound(format!(
            "no destinations set for function `{}`: its records follow the configuration's routes",
            clip(&function_id)
        ))),
    }
}

/// `DELETE /v1/functions/{functionId}/destinations` (destinations scope):
/// the function's records follow the configuration's routes again.
async fn delete_destinations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(function_id): axum::extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    let caller = authorize(&state, &headers, Scope::Destinations)?;
    let old = state
        .journal
        .delete_destinations(function_id.clone())
        .await
        .map_err(|e| {
            state.log_error("cannot delete a function's destinations", &e);
            ApiError::Unavailable("journal write failed; retry later")
        })?;
    match old {
        Some(old) => {
            tracing::info!(
                token = %caller,
                function_id = %clip(&function_id),
                old = %sides_json(&old),
                new = "(none: the configuration's routes)",
                "function destinations changed"
            );
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(ApiError::NotFound(format!(
            "no destinations set for function `{}`",
            clip(&function_id)
        ))),
    }
}

#[derive(Deserialize)]
struct ListFunctions {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/functions?limit=&after=` (destinations scope): functions with
/// destinations set, by id.
async fn list_functions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ListFunctions>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &headers, Scope::Destinations)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let page = state
        .journal
        .list_destinations(q.after, limit)
        .await
        .map_err(|e| {
            state.log_error("cannot list functions' destinations", &e);
            ApiError::Internal
        })?;
    let next = (page.len() == limit).then(|| page.last().map(|d| d.function_id.clone()));
    Ok(Json(json!({
        "functions": page.iter().map(destinations_json).collect::<Vec<_>>(),
        "next": next.flatten(),
    })))
}

/// `GET /v1/records/{id}`: where a record is and why (admin).
async fn record_by_id(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &headers, Scope::Admin)?;
    lookup(&state, crate::journal::Lookup::Id(id)).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FindRecord {
    fn_call_id: Option<String>,
}

/// `GET /v1/records?fnCallId=...` (admin).
async fn find_record(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<FindRecord>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &headers, Scope::Admin)?;
    let Some(call) = q.fn_call_id.filter(|c| !c.is_empty()) else {
        return Err(ApiError::BadRequest(vec![FieldError::new(
            "fnCallId",
            "give ?fnCallId=... (or GET /v1/records/{id})",
        )]));
    };
    lookup(&state, crate::journal::Lookup::FnCallId(call)).await
}

async fn lookup(
    state: &AppState,
    by: crate::journal::Lookup,
) -> Result<Json<serde_json::Value>, ApiError> {
    let what = match &by {
        crate::journal::Lookup::Id(id) => format!("id `{}`", clip(id)),
        crate::journal::Lookup::FnCallId(c) => format!("fnCallId `{}`", clip(c)),
    };
    let view = state.journal.lookup(by).await.map_err(|e| {
        state.log_error("cannot look up a record", &e);
        ApiError::Internal
    })?;
    let Some(v) = view else {
        return Err(ApiError::NotFound(format!(
            "no record with {what} (never accepted, or pruned after journal.delivered_retention)"
        )));
    };
    Ok(Json(record_json(&v)))
}

/// The lookup answer (docs/delivery.md, "Finding a record").
fn record_json(v: &crate::journal::RecordView) -> serde_json::Value {
    use crate::journal::ms_to_rfc3339;
    let destination = match &v.target {
        Some(t) => json!({
            "type": v.destination_type,
            "kind": t.kind.as_str(),
            "resourceId": t.resource_id,
            "channelId": t.channel_id,
        }),
        None => json!({"type": v.destination_type, "kind": "NONE"}),
    };
    let attempts: Vec<serde_json::Value> = v
        .recent
        .iter()
        .map(|a| {
            json!({
                "at": ms_to_rfc3339(a.at_ms),
                "outcome": a.outcome,
                "errorMessage": a.error_message,
                "error": a.error,
                "durationMs": a.duration_ms,
            })
        })
        .collect();
    json!({
        "id": v.id,
        "fnCallId": v.fn_call_id,
        "functionId": v.function_id,
        "state": v.state,
        "destination": destination,
        "attempts": v.attempts,
        "nextAttemptAt": v.next_attempt_at_ms.map(ms_to_rfc3339),
        "acceptedAt": ms_to_rfc3339(v.accepted_at_ms),
        "finishedAt": v.finished_at_ms.map(ms_to_rfc3339),
        "lastError": v.last_error.as_ref().map(|text| json!({
            "errorMessage": v.error_label,
            "text": text,
        })),
        "recentAttempts": attempts,
    })
}

/// `POST /v1/admin/reload`: 200 with what changed, or 422 with every
/// reason the file was refused (the running configuration stays).
async fn reload(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, Scope::Admin)?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::Unavailable("fnrelay is shutting down"));
    }
    let Some(requests) = &state.reload else {
        return Err(ApiError::Unavailable("no reloader"));
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let request = crate::reload::Request {
        trigger: format!("POST /v1/admin/reload by {caller}"),
        reply: Some(reply),
    };
    if requests.send(request).await.is_err() {
        return Err(ApiError::Unavailable("fnrelay is shutting down"));
    }
    match answer.await {
        Ok(Ok(applied)) => Ok(Json(json!({
            "result": "applied",
            "hash": applied.hash,
            "changed": applied.changed,
            "added": applied.added,
            "removed": applied.removed,
        }))
        .into_response()),
        Ok(Err(refused)) => Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({
                "result": "refused",
                "error": "configuration reload refused; the running configuration stays",
                "reasons": refused.reasons,
            })),
        )
            .into_response()),
        Err(_) => Err(ApiError::Unavailable("fnrelay is shutting down")),
    }
}

async fn replay_dead(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authorize(&state, &headers, Scope::Admin)?;
    let (body, _budget) =
        read_body(&state, &headers, body, state.config().server.max_body_bytes).await?;
    let req: ReplayRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(vec![FieldError::new("body", e.to_string())]))?;
    let ids = match (req.ids, req.all) {
        (Some(ids), false) if !ids.is_empty() => Some(ids),
        (None, true) => None,
        _ => {
            return Err(ApiError::BadRequest(vec![FieldError::new(
                "body",
                "give either a non-empty `ids` list or `\"all\": true`",
            )]));
        }
    };
    let n = state
        .journal
        .replay_dead(ids, now_ms())
        .await
        .map_err(|e| {
            state.log_error("cannot replay dead letters", &e);
            ApiError::Internal
        })?;
    state.metrics.replayed(n);
    tracing::info!(records = n, token = %caller, "dead letters replayed on request");
    state.wake.notify_one();
    Ok(Json(json!({"replayed": n})))
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers, Scope::Metrics) {
        return e.into_response();
    }
    let config = state.config();
    let server = &config.server;
    state.metrics.http_in_flight(
        server.max_requests_in_flight - state.requests.available_permits(),
        server.max_body_bytes_in_flight - state.body_bytes.available_permits(),
    );
    let _ = readiness(&state).await;
    match state.journal.stats().await {
        Ok(stats) => state.metrics.journal(&stats, now_ms()),
        Err(e) => state.log_error("cannot read journal stats for /metrics", &e),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// The OpenAPI 3.1 document of this API (docs/openapi.json, built in).
pub const OPENAPI: &str = include_str!("../docs/openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    match readiness(&state).await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

/// What `/readyz` answers, also kept in the `fnrelay_ready` gauge.
async fn readiness(state: &AppState) -> Result<(), &'static str> {
    let result = if state.shutdown.is_cancelled() {
        Err("shutting down\n")
    } else {
        match tokio::time::timeout(Duration::from_secs(2), state.journal.check_writable()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                state.log_error("readiness: journal is not writable", &e);
                Err("journal not writable\n")
            }
            Err(_) => Err("journal not answering\n"),
        }
    };
    state.metrics.set_ready(result.is_ok());
    result
}

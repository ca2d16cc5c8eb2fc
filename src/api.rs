//! The HTTP API: ingest (`POST /v1/completions`), admin (dead letters),
//! `/metrics`, `/healthz`, `/readyz`.
//!
//! Ingest validates, routes, builds records and appends them to the journal;
//! it answers 202 only after the journal commit. It never calls a
//! destination: it only wakes the dispatcher.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::journal::{Journal, NewRecord, Target, now_ms};
use crate::metrics::Metrics;
use crate::record::{Completion, DestinationType, FieldError, Limits, build_record, parse_request};
use crate::routing::{self, DestSpec};

/// What handlers share.
pub struct AppState {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// The journal.
    pub journal: Arc<dyn Journal>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Wakes the dispatcher after an append.
    pub wake: Arc<Notify>,
    /// Fires when the daemon stops accepting.
    pub shutdown: CancellationToken,
    /// The bearer token, if one is configured.
    pub token: Option<String>,
    /// Monotonic ULIDs: ids of one batch sort in accept order.
    pub ulids: Mutex<ulid::Generator>,
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
    /// 413: over `server.max_body_bytes`.
    PayloadTooLarge(usize),
    /// 415: not `application/json`.
    UnsupportedMediaType(String),
    /// 503 with Retry-After.
    Unavailable(&'static str),
    /// 500.
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::BadRequest(fields) => (
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_request", "message": summary(&fields), "fields": fields}),
            ),
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
            ApiError::Forbidden(fields) => (
                StatusCode::FORBIDDEN,
                json!({"error": "forbidden", "message": summary(&fields), "fields": fields}),
            ),
            ApiError::PayloadTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "payload_too_large", "message": format!("body is over {limit} bytes (server.max_body_bytes)")}),
            ),
            ApiError::UnsupportedMediaType(got) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"error": "unsupported_media_type", "message": format!("Content-Type must be application/json, got `{got}`")}),
            ),
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
    let limit = state.config.server.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(ingest))
        .route("/v1/dead-letters", get(list_dead))
        .route("/v1/dead-letters/replay", post(replay_dead))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    aws_lc_rs::constant_time::verify_slices_are_equal(given.as_bytes(), expected.as_bytes())
        .map_err(|_| ApiError::Unauthorized)
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
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    authorize(&state, &headers)?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::Unavailable("fnrelay is shutting down"));
    }
    let server = &state.config.server;
    if state.journal.pending() >= state.config.journal.max_pending {
        return Err(ApiError::Unavailable(
            "journal is over its high-water mark (journal.max_pending); retry later",
        ));
    }
    require_json(&headers)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(server.max_body_bytes)
        } else {
            ApiError::BadRequest(vec![FieldError::new("body", rejection.body_text())])
        }
    })?;
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

    let config = &state.config;
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
        let dest = resolve(config, event, dt);
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
    let ids: Vec<String> = {
        let mut generator = state.ulids.lock().expect("ulid lock");
        let at = SystemTime::now();
        events
            .iter()
            .map(|_| match generator.generate_from_datetime(at) {
                Ok(id) => id.to_string(),
                Err(overflow) => overflow.commit_overflow_random().to_string(),
            })
            .collect()
    };
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
            target: dest.as_ref().and_then(|d| {
                d.target().map(|(kind, resource)| Target {
                    kind,
                    resource_id: resource.to_string(),
                    channel_id: d.channel().map(str::to_string),
                })
            }),
            accepted_at_ms: accepted_ms,
        })
        .collect();
    let skipped: Vec<Option<DestinationType>> = records
        .iter()
        .map(|r| r.target.is_none().then_some(r.destination_type))
        .collect();
    let appended = state.journal.append(records).await.map_err(|e| {
        tracing::error!(error = %e, "cannot journal accepted events");
        ApiError::Unavailable("journal write failed; retry later")
    })?;
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

/// Inline destination, else the routes (see [`routing::resolve`]).
fn resolve(config: &Config, event: &Completion, dt: DestinationType) -> Option<DestSpec> {
    let inline = match dt {
        DestinationType::Success => event.success.clone(),
        DestinationType::Failure => event.failure.clone(),
    };
    routing::resolve(
        &config.routes,
        inline,
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
    authorize(&state, &headers)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let dead = state.journal.list_dead(q.after, limit).await.map_err(|e| {
        tracing::error!(error = %e, "cannot list dead letters");
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

async fn replay_dead(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &headers)?;
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
            tracing::error!(error = %e, "cannot replay dead letters");
            ApiError::Internal
        })?;
    tracing::info!(records = n, "dead letters replayed on request");
    state.wake.notify_one();
    Ok(Json(json!({"replayed": n})))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.journal.stats().await {
        Ok(stats) => state.metrics.journal(&stats, now_ms()),
        Err(e) => tracing::warn!(error = %e, "cannot read journal stats for /metrics"),
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

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match tokio::time::timeout(Duration::from_secs(2), state.journal.check_writable()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: journal is not writable");
            (StatusCode::SERVICE_UNAVAILABLE, "journal not writable\n").into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "journal not answering\n").into_response(),
    }
}

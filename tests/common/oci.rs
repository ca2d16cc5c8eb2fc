//! A strict local stand-in for the OCI Queue, Streaming and Notifications
//! data planes. It checks what the services check: the request signature
//! (recomputing the signing string and verifying it with the public key),
//! keyId, date skew, x-content-sha256 and content-length, the paths, the
//! body shapes and the documented limits; and it can be told to answer with
//! the services' errors (429 with Retry-After, 5xx, 401) or to fail chosen
//! Streaming entries inside a 200.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const TENANCY: &str = "ocid1.tenancy.oc1..aaaatest";
pub const USER: &str = "ocid1.user.oc1..aaaatest";
pub const FINGERPRINT: &str = "21:7d:08:d5:9a:72:27:09:53:3c:a8:e2:82:c1:cf:18";

/// Path of the test API key (2048-bit, matching FINGERPRINT).
pub fn key_file() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/oci-test-key.pem").to_string()
}

/// An answer the server gives instead of processing the next request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// An OCI error answer.
    Status {
        status: u16,
        code: &'static str,
        retry_after: Option<&'static str>,
    },
}

/// One stored message.
#[derive(Debug, Clone)]
pub struct Stored {
    /// `queues/<id>`, `streams/<id>`, `topics/<id>`.
    pub resource: String,
    /// The record JSON (queue content, stream value, notification body).
    pub record: Value,
    /// Queue channel, stream key (decoded) or notification title.
    pub extra: Option<String>,
}

#[derive(Default)]
struct ServerState {
    key_id: String,
    public_key: Vec<u8>,
    resources: HashSet<String>,
    faults: Mutex<VecDeque<Fault>>,
    /// Streaming: fnCallIds whose entry fails once inside a 200.
    fail_entries: Mutex<HashSet<String>>,
    /// Queue: fnCallIds whose message makes the whole PutMessages a 400.
    poison: Mutex<HashSet<String>>,
    stored: Mutex<Vec<Stored>>,
    /// (resource, entries in the request, status answered)
    requests: Mutex<Vec<(String, usize, u16)>>,
    latency: Duration,
}

pub struct OciServer {
    pub url: String,
    state: Arc<ServerState>,
    cancel: CancellationToken,
}

impl OciServer {
    /// Serves `resources` (e.g. `queues/ocid1.queue.oc1..q`), trusting the
    /// test key under keyId `TENANCY/USER/FINGERPRINT`; each answer takes
    /// `latency`.
    pub async fn start(resources: &[&str], latency: Duration) -> Self {
        let pem = std::fs::read(key_file()).unwrap();
        let key = fnrelay::destination::oci::signer::parse_key(&pem).unwrap();
        use aws_lc_rs::signature::KeyPair;
        let state = Arc::new(ServerState {
            key_id: format!("{TENANCY}/{USER}/{FINGERPRINT}"),
            public_key: key.public_key().as_ref().to_vec(),
            resources: resources.iter().map(|s| s.to_string()).collect(),
            latency,
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let cancel = CancellationToken::new();
        let app = Router::new().fallback(handle).with_state(state.clone());
        let stop = cancel.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .unwrap();
        });
        Self { url, state, cancel }
    }

    pub fn fault(&self, f: Fault) {
        self.state.faults.lock().unwrap().push_back(f);
    }

    /// Queue messages carrying these fnCallIds are refused, and with them
    /// the whole request (400 InvalidParameter), as the service does with
    /// one bad message.
    pub fn poison(&self, calls: &[&str]) {
        self.state
            .poison
            .lock()
            .unwrap()
            .extend(calls.iter().map(|s| s.to_string()));
    }

    pub fn fail_entries_once(&self, calls: &[&str]) {
        self.state
            .fail_entries
            .lock()
            .unwrap()
            .extend(calls.iter().map(|s| s.to_string()));
    }

    pub fn stored(&self) -> Vec<Stored> {
        self.state.stored.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<(String, usize, u16)> {
        self.state.requests.lock().unwrap().clone()
    }
}

impl Drop for OciServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn error(status: u16, code: &str, message: &str) -> Response {
    let mut r = (
        StatusCode::from_u16(status).unwrap(),
        axum::Json(json!({"code": code, "message": message})),
    )
        .into_response();
    r.headers_mut()
        .insert("opc-request-id", "test-request".parse().unwrap());
    r
}

/// Checks the Authorization header as OCI does; `Err` is the 401 message.
fn verify_signature(
    state: &ServerState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    body_signed_required: bool,
) -> Result<(), String> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or("missing Authorization header")?;
    let params = auth
        .strip_prefix("Signature ")
        .ok_or("Authorization scheme is not Signature")?;
    let mut fields = HashMap::new();
    for part in params.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or("malformed Authorization parameter")?;
        fields.insert(k.trim(), v.trim().trim_matches('"'));
    }
    if fields.get("algorithm") != Some(&"rsa-sha256") {
        return Err("algorithm must be rsa-sha256".into());
    }
    if fields.get("version") != Some(&"1") {
        return Err("version must be 1".into());
    }
    if fields.get("keyId") != Some(&state.key_id.as_str()) {
        return Err(format!("unknown keyId {:?}", fields.get("keyId")));
    }
    let signed: Vec<&str> = fields
        .get("headers")
        .ok_or("no headers parameter")?
        .split(' ')
        .collect();
    let mut required = vec!["date", "(request-target)", "host"];
    if body_signed_required {
        required.extend(["content-length", "content-type", "x-content-sha256"]);
    }
    for r in required {
        if !signed.contains(&r) {
            return Err(format!("required header {r} is not signed"));
        }
    }
    let mut lines = Vec::new();
    for name in &signed {
        let value = match *name {
            "(request-target)" => format!(
                "{} {}",
                method.as_str().to_lowercase(),
                uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
            ),
            other => headers
                .get(other)
                .and_then(|v| v.to_str().ok())
                .ok_or(format!("signed header {other} is missing"))?
                .to_string(),
        };
        lines.push(format!("{name}: {value}"));
    }
    if signed.contains(&"x-content-sha256") {
        let sha =
            STANDARD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body).as_ref());
        if headers
            .get("x-content-sha256")
            .and_then(|v| v.to_str().ok())
            != Some(sha.as_str())
        {
            return Err("x-content-sha256 does not match the body".into());
        }
    }
    if signed.contains(&"content-length")
        && headers.get("content-length").and_then(|v| v.to_str().ok())
            != Some(body.len().to_string().as_str())
    {
        return Err("content-length does not match the body".into());
    }
    let date = headers
        .get("date")
        .and_then(|v| v.to_str().ok())
        .ok_or("no date")?;
    let at = httpdate::parse_http_date(date).map_err(|_| "date is not an HTTP date")?;
    let skew = SystemTime::now()
        .duration_since(at)
        .unwrap_or_else(|e| e.duration());
    if skew > Duration::from_secs(300) {
        return Err("date is more than 5 minutes off".into());
    }
    let sig = STANDARD
        .decode(fields.get("signature").ok_or("no signature")?)
        .map_err(|_| "signature is not base64")?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &state.public_key)
        .verify(lines.join("\n").as_bytes(), &sig)
        .map_err(|_| "signature does not verify".to_string())
}

async fn handle(
    State(state): State<Arc<ServerState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    tokio::time::sleep(state.latency).await;
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    let (service, resource) = match segments.as_slice() {
        ["20210201", "queues", id, "messages"] => ("queues", format!("queues/{id}")),
        ["20180418", "streams", id, "messages"] => ("streams", format!("streams/{id}")),
        ["20181201", "topics", id, "messages"] => ("topics", format!("topics/{id}")),
        _ => {
            return error(
                404,
                "NotAuthorizedOrNotFound",
                &format!("no such path {}", uri.path()),
            );
        }
    };
    if method != Method::POST {
        return error(405, "MethodNotAllowed", "only POST");
    }
    // Streaming PutMessages is signed by the SDKs without body headers.
    if let Err(why) = verify_signature(&state, &method, &uri, &headers, &body, service != "streams")
    {
        state.requests.lock().unwrap().push((resource, 0, 401));
        return error(401, "NotAuthenticated", &why);
    }
    if !state.resources.contains(&resource) {
        return error(
            404,
            "NotAuthorizedOrNotFound",
            "Authorization failed or requested resource not found",
        );
    }
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
        return error(
            400,
            "InvalidParameter",
            "content-type must be application/json",
        );
    }
    let Ok(json) = serde_json::from_slice::<Value>(&body) else {
        return error(400, "CannotParseRequest", "body is not JSON");
    };
    let fault = state.faults.lock().unwrap().pop_front();
    if let Some(Fault::Status {
        status,
        code,
        retry_after,
    }) = fault
    {
        state.requests.lock().unwrap().push((resource, 0, status));
        let mut r = error(status, code, "injected by the test");
        if let Some(ra) = retry_after {
            r.headers_mut().insert("retry-after", ra.parse().unwrap());
        }
        return r;
    }
    let answer = match service {
        "queues" => put_queue(&state, &resource, &json, body.len()),
        "streams" => put_stream(&state, &resource, &json),
        _ => publish(&state, &resource, &json),
    };
    match answer {
        Ok((n, v)) => {
            state.requests.lock().unwrap().push((resource, n, 200));
            let mut r = (StatusCode::OK, axum::Json(v)).into_response();
            r.headers_mut()
                .insert("opc-request-id", "test-request".parse().unwrap());
            r
        }
        Err((status, code, message)) => {
            state.requests.lock().unwrap().push((resource, 0, status));
            error(status, code, &message)
        }
    }
}

type Answer = Result<(usize, Value), (u16, &'static str, String)>;

fn bad(message: impl Into<String>) -> (u16, &'static str, String) {
    (400, "InvalidParameter", message.into())
}

fn only_keys(v: &Value, allowed: &[&str], what: &str) -> Result<(), (u16, &'static str, String)> {
    let obj = v
        .as_object()
        .ok_or_else(|| bad(format!("{what} must be an object")))?;
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(bad(format!("unknown field {k} in {what}"))),
        None => Ok(()),
    }
}

fn put_queue(state: &ServerState, resource: &str, json: &Value, size: usize) -> Answer {
    only_keys(json, &["messages"], "body")?;
    let messages = json["messages"]
        .as_array()
        .ok_or_else(|| bad("messages is required"))?;
    if messages.is_empty() || messages.len() > 20 {
        return Err((
            400,
            "LimitExceeded",
            format!("{} messages; 1 to 20 allowed", messages.len()),
        ));
    }
    if size > 512 * 1024 {
        return Err((400, "LimitExceeded", "request over 512 KB".into()));
    }
    let mut stored = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        only_keys(m, &["content", "metadata"], &format!("messages[{i}]"))?;
        let content = m["content"]
            .as_str()
            .ok_or_else(|| bad(format!("messages[{i}].content is required")))?;
        if content.len() > 256 * 1024 {
            return Err((
                400,
                "LimitExceeded",
                format!("messages[{i}].content over 256 KB"),
            ));
        }
        let channel = match m.get("metadata") {
            None => None,
            Some(meta) => {
                only_keys(meta, &["channelId", "customProperties"], "metadata")?;
                Some(
                    meta["channelId"]
                        .as_str()
                        .ok_or_else(|| {
                            bad(format!("messages[{i}].metadata.channelId is required"))
                        })?
                        .to_string(),
                )
            }
        };
        let record: Value =
            serde_json::from_str(content).map_err(|_| bad("content is not the record JSON"))?;
        if record["data"]["request"]["fnCallId"]
            .as_str()
            .is_some_and(|c| state.poison.lock().unwrap().contains(c))
        {
            return Err(bad(format!("messages[{i}].content is refused")));
        }
        stored.push(Stored {
            resource: resource.into(),
            record,
            extra: channel,
        });
    }
    let n = stored.len();
    let mut all = state.stored.lock().unwrap();
    let base = all.len();
    all.extend(stored);
    let ids: Vec<Value> = (0..n)
        .map(|i| json!({"id": base + i, "expireAfter": "2026-11-26T00:00:00Z"}))
        .collect();
    Ok((n, json!({ "messages": ids })))
}

fn put_stream(state: &ServerState, resource: &str, json: &Value) -> Answer {
    only_keys(json, &["messages"], "body")?;
    let messages = json["messages"]
        .as_array()
        .ok_or_else(|| bad("messages is required"))?;
    if messages.is_empty() {
        return Err(bad("messages must not be empty"));
    }
    let mut total = 0;
    let mut entries = Vec::new();
    let mut failures = 0;
    for (i, m) in messages.iter().enumerate() {
        only_keys(m, &["key", "value"], &format!("messages[{i}]"))?;
        let value = STANDARD
            .decode(
                m["value"]
                    .as_str()
                    .ok_or_else(|| bad(format!("messages[{i}].value is required")))?,
            )
            .map_err(|_| bad(format!("messages[{i}].value is not base64")))?;
        let key = match &m["key"] {
            Value::Null => None,
            k => Some(
                STANDARD
                    .decode(k.as_str().unwrap_or("!"))
                    .map_err(|_| bad("key is not base64"))?,
            ),
        };
        if value.len() > 1 << 20 || key.as_ref().is_some_and(|k| k.len() > 256) {
            return Err((
                400,
                "LimitExceeded",
                format!("messages[{i}] over the size limits"),
            ));
        }
        total += value.len() + key.as_ref().map_or(0, Vec::len);
        let record: Value =
            serde_json::from_slice(&value).map_err(|_| bad("value is not the record JSON"))?;
        let call = record["data"]["request"]["fnCallId"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if state.fail_entries.lock().unwrap().remove(&call) {
            failures += 1;
            entries.push(json!({"error": "InternalServerError", "errorMessage": "partition unavailable (injected)"}));
            continue;
        }
        let mut all = state.stored.lock().unwrap();
        entries.push(
            json!({"partition": "0", "offset": all.len(), "timestamp": "2026-11-25T00:00:00Z"}),
        );
        all.push(Stored {
            resource: resource.into(),
            record,
            extra: key.map(|k| String::from_utf8_lossy(&k).into_owned()),
        });
    }
    if total > 1 << 20 {
        return Err((400, "LimitExceeded", "request over 1 MB".into()));
    }
    Ok((
        messages.len(),
        json!({"failures": failures, "entries": entries}),
    ))
}

fn publish(state: &ServerState, resource: &str, json: &Value) -> Answer {
    only_keys(json, &["title", "body"], "body")?;
    let body = json["body"]
        .as_str()
        .ok_or_else(|| bad("body is required"))?;
    let title = json["title"].as_str().map(str::to_string);
    if body.len() + title.as_ref().map_or(0, String::len) > 64 * 1024 {
        return Err((400, "LimitExceeded", "message over 64 KB".into()));
    }
    let record = serde_json::from_str(body).map_err(|_| bad("body is not the record JSON"))?;
    state.stored.lock().unwrap().push(Stored {
        resource: resource.into(),
        record,
        extra: title,
    });
    Ok((
        1,
        json!({"messageId": ulid::Ulid::generate().to_string(), "timeStamp": "2026-11-25T00:00:00Z"}),
    ))
}

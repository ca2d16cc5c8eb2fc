//! Completion events and invocation records: parsing and validating the
//! ingest body (SPEC section 2) and building the record v1.0 (SPEC section 3).
//!
//! Pure code: no I/O, no clock except what callers pass in.

use std::cell::RefCell;
use std::fmt;

use serde::Serialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::routing::DestSpec;

/// Destination kind (OCI names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestKind {
    /// A queue.
    Queue,
    /// A stream.
    Stream,
    /// A notification topic.
    Notification,
}

impl DestKind {
    /// `QUEUE`, `STREAM` or `NOTIFICATION`.
    pub fn as_str(self) -> &'static str {
        match self {
            DestKind::Queue => "QUEUE",
            DestKind::Stream => "STREAM",
            DestKind::Notification => "NOTIFICATION",
        }
    }

    /// Parses the OCI name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "QUEUE" => Some(DestKind::Queue),
            "STREAM" => Some(DestKind::Stream),
            "NOTIFICATION" => Some(DestKind::Notification),
            _ => None,
        }
    }

    /// The config table holding resources of this kind.
    pub fn table(self) -> &'static str {
        match self {
            DestKind::Queue => "queues",
            DestKind::Stream => "streams",
            DestKind::Notification => "topics",
        }
    }

    /// The field naming a resource of this kind in a `Dest`.
    pub fn id_field(self) -> &'static str {
        match self {
            DestKind::Queue => "queueId",
            DestKind::Stream => "streamId",
            DestKind::Notification => "topicId",
        }
    }
}

/// Success or failure destination (OCI `DESTINATIONTYPE` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestinationType {
    /// Status 2xx.
    Success,
    /// Any other status.
    Failure,
}

impl DestinationType {
    /// `Success` or `Failure`, as the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationType::Success => "Success",
            DestinationType::Failure => "Failure",
        }
    }

    /// `success` or `failure`, as the log line of SPEC section 5 words it.
    pub fn lower(self) -> &'static str {
        match self {
            DestinationType::Success => "success",
            DestinationType::Failure => "failure",
        }
    }

    /// Parses [`DestinationType::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Success" => Some(DestinationType::Success),
            "Failure" => Some(DestinationType::Failure),
            _ => None,
        }
    }

    /// Which side a function's status goes to.
    pub fn for_status(status: u16) -> Self {
        if (200..300).contains(&status) {
            DestinationType::Success
        } else {
            DestinationType::Failure
        }
    }
}

/// Limits applied to events (from `[server]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most events per batch.
    pub max_batch_size: usize,
    /// Longest id field, bytes.
    pub max_id_bytes: usize,
    /// Longest errorMessage, bytes.
    pub max_error_message_bytes: usize,
}

/// A validated completion event.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Platform call id; the idempotency key of ingest.
    pub fn_call_id: String,
    /// Function id.
    pub function_id: String,
    /// Application id.
    pub application_id: String,
    /// Compartment id.
    pub compartment_id: String,
    /// Request id the caller got.
    pub opc_request_id: Option<String>,
    /// The function's HTTP status.
    pub status: u16,
    /// Error code, if any.
    pub error_code: Option<String>,
    /// Error text, if any.
    pub error_message: Option<String>,
    /// When the invocation ended; `None` means the time of accept.
    pub timestamp: Option<OffsetDateTime>,
    /// Inline destination for success, overriding routes.
    pub success: Option<DestSpec>,
    /// Inline destination for failure, overriding routes.
    pub failure: Option<DestSpec>,
}

impl Completion {
    /// Success or failure, by status.
    pub fn destination_type(&self) -> DestinationType {
        DestinationType::for_status(self.status)
    }
}

/// One bad field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// JSON path of the field, e.g. `completions[2].status`.
    pub field: String,
    /// Why it is rejected.
    pub reason: String,
}

impl FieldError {
    /// Builds a field error.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

const EVENT_FIELDS: &[&str] = &[
    "fnCallId",
    "functionId",
    "applicationId",
    "compartmentId",
    "opcRequestId",
    "status",
    "errorCode",
    "errorMessage",
    "timestamp",
    "destinations",
];

/// Parses an ingest body: one event, or `{"completions": [...]}`.
/// Returns every bad field, or the events in order.
pub fn parse_body(body: &[u8], limits: &Limits) -> Result<Vec<Completion>, Vec<FieldError>> {
    parse_request(body, limits).map(|(events, _)| events)
}

/// Like [`parse_body`], and says whether the body was a batch (field paths
/// then start with `completions[i].`).
///
/// The body is read in one pass: a batch's events are parsed and checked
/// one at a time (never the whole batch as a JSON tree), a batch over
/// `max_batch_size` stops at the first event too many, and a key repeated
/// in any object is refused, naming it.
pub fn parse_request(
    body: &[u8],
    limits: &Limits,
) -> Result<(Vec<Completion>, bool), Vec<FieldError>> {
    let duplicate = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let top = TopSeed {
        limits,
        duplicate: &duplicate,
    }
    .deserialize(&mut de)
    .and_then(|top| de.end().map(|()| top));
    let top = match top {
        Ok(top) => top,
        Err(e) => {
            if let Some(field) = duplicate.into_inner() {
                return Err(vec![field]);
            }
            if e.to_string().starts_with(TOO_MANY) {
                return Err(vec![FieldError::new(
                    "completions",
                    format!(
                        "more events than the batch limit of {} (server.max_batch_size)",
                        limits.max_batch_size
                    ),
                )]);
            }
            let reason = if e.is_data() {
                "must be a JSON object".to_string()
            } else {
                format!("not valid JSON: {e}")
            };
            return Err(vec![FieldError::new("body", reason)]);
        }
    };
    match top {
        Top::Batch {
            events,
            errors,
            other,
        } => {
            if let Some(other) = other {
                return Err(vec![FieldError::new(
                    clip_field(&other),
                    "unexpected field beside `completions`",
                )]);
            }
            if !errors.is_empty() {
                return Err(errors);
            }
            if events.is_empty() {
                return Err(vec![FieldError::new("completions", "must not be empty")]);
            }
            Ok((events, true))
        }
        Top::NotArray => Err(vec![FieldError::new("completions", "must be an array")]),
        Top::Single(map) => parse_event(Value::Object(map), "", limits).map(|e| (vec![e], false)),
    }
}

/// Marks the error a batch over its limit stops the parse with.
const TOO_MANY: &str = "fnrelay: too many events";

/// A field name from client input, clipped for echoing.
fn clip_field(name: &str) -> String {
    crate::logging::clip(name).to_string()
}

/// What the top-level object turned out to be.
enum Top {
    /// `{"completions": [...]}`: the events that parsed, every bad field,
    /// and a key found beside `completions`.
    Batch {
        events: Vec<Completion>,
        errors: Vec<FieldError>,
        other: Option<String>,
    },
    /// `completions` is not an array.
    NotArray,
    /// One event.
    Single(Map<String, Value>),
}

struct TopSeed<'a> {
    limits: &'a Limits,
    duplicate: &'a RefCell<Option<FieldError>>,
}

impl<'de> DeserializeSeed<'de> for TopSeed<'_> {
    type Value = Top;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Top, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_> {
    type Value = Top;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let mut fields = Map::new();
        let mut batch: Option<Top> = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "completions" {
                if batch.is_some() {
                    return Err(self.duplicate_key("completions".into()));
                }
                batch = Some(map.next_value_seed(EventsSeed {
                    limits: self.limits,
                    duplicate: self.duplicate,
                })?);
                continue;
            }
            let value = map.next_value_seed(StrictSeed {
                path: key.clone(),
                duplicate: self.duplicate,
            })?;
            if fields.contains_key(&key) {
                return Err(self.duplicate_key(key));
            }
            fields.insert(key, value);
        }
        Ok(match batch {
            Some(Top::Batch { events, errors, .. }) => Top::Batch {
                events,
                errors,
                other: fields.keys().next().cloned(),
            },
            Some(other) => other,
            None => Top::Single(fields),
        })
    }
}

impl TopSeed<'_> {
    fn duplicate_key<E: de::Error>(&self, path: String) -> E {
        duplicate_error(self.duplicate, path)
    }
}

fn duplicate_error<E: de::Error>(slot: &RefCell<Option<FieldError>>, path: String) -> E {
    let field = clip_field(&path);
    let key = field.rsplit('.').next().unwrap_or(&field).to_string();
    *slot.borrow_mut() = Some(FieldError::new(
        field,
        format!("duplicate key `{key}`: each key may appear once"),
    ));
    E::custom("duplicate key")
}

/// The `completions` array, parsed and checked one event at a time.
struct EventsSeed<'a> {
    limits: &'a Limits,
    duplicate: &'a RefCell<Option<FieldError>>,
}

impl<'de> DeserializeSeed<'de> for EventsSeed<'_> {
    type Value = Top;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Top, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EventsSeed<'_> {
    type Value = Top;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Top, A::Error> {
        let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        let mut errors = Vec::new();
        let mut i = 0;
        loop {
            let prefix = format!("completions[{i}]");
            let Some(value) = seq.next_element_seed(StrictSeed {
                path: prefix.clone(),
                duplicate: self.duplicate,
            })?
            else {
                break;
            };
            if i == self.limits.max_batch_size {
                return Err(de::Error::custom(TOO_MANY));
            }
            match parse_event(value, &format!("{prefix}."), self.limits) {
                Ok(e) => events.push(e),
                Err(mut e) => errors.append(&mut e),
            }
            i += 1;
        }
        Ok(Top::Batch {
            events,
            errors,
            other: None,
        })
    }

    // Anything but an array: read it (so the body is still checked as
    // JSON) and say so.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Top::NotArray)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Top, E> {
        Ok(Top::NotArray)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Top, E> {
        Ok(Top::NotArray)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Top, E> {
        Ok(Top::NotArray)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Top, E> {
        Ok(Top::NotArray)
    }
    fn visit_str<E>(self, _: &str) -> Result<Top, E> {
        Ok(Top::NotArray)
    }
    fn visit_unit<E>(self) -> Result<Top, E> {
        Ok(Top::NotArray)
    }
}

/// A JSON value with every object's keys unique; `path` names where it is.
struct StrictSeed<'a> {
    path: String,
    duplicate: &'a RefCell<Option<FieldError>>,
}

impl<'de> DeserializeSeed<'de> for StrictSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictSeed {
            path: format!("{}[{}]", self.path, items.len()),
            duplicate: self.duplicate,
        })? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            let value = map.next_value_seed(StrictSeed {
                path: path.clone(),
                duplicate: self.duplicate,
            })?;
            if fields.contains_key(&key) {
                return Err(duplicate_error(self.duplicate, path));
            }
            fields.insert(key, value);
        }
        Ok(Value::Object(fields))
    }
}

fn parse_event(value: Value, prefix: &str, limits: &Limits) -> Result<Completion, Vec<FieldError>> {
    let Value::Object(obj) = value else {
        let field = prefix.trim_end_matches('.');
        return Err(vec![FieldError::new(
            if field.is_empty() { "body" } else { field },
            "must be a JSON object",
        )]);
    };
    let mut errors = Vec::new();
    let path = |name: &str| format!("{prefix}{name}");

    for key in obj.keys() {
        if !EVENT_FIELDS.contains(&key.as_str()) {
            errors.push(FieldError::new(path(&clip_field(key)), "unknown field"));
        }
    }

    let mut id = |name: &str, required: bool| -> Option<String> {
        match obj.get(name) {
            None | Some(Value::Null) if required => {
                errors.push(FieldError::new(path(name), "is required"));
                None
            }
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => {
                errors.push(FieldError::new(path(name), "must not be empty"));
                None
            }
            Some(Value::String(s)) if s.len() > limits.max_id_bytes => {
                errors.push(FieldError::new(
                    path(name),
                    format!(
                        "is {} bytes, over the limit of {} (server.max_id_bytes)",
                        s.len(),
                        limits.max_id_bytes
                    ),
                ));
                None
            }
            Some(Value::String(s)) => match id_problem(s) {
                Some(reason) => {
                    errors.push(FieldError::new(path(name), reason));
                    None
                }
                None => Some(s.clone()),
            },
            Some(_) => {
                errors.push(FieldError::new(path(name), "must be a string"));
                None
            }
        }
    };
    let fn_call_id = id("fnCallId", true);
    let function_id = id("functionId", true);
    let application_id = id("applicationId", true);
    let compartment_id = id("compartmentId", true);
    let opc_request_id = id("opcRequestId", false);
    let error_code = id("errorCode", false);

    let error_message = match obj.get("errorMessage") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() > limits.max_error_message_bytes => {
            errors.push(FieldError::new(
                path("errorMessage"),
                format!(
                    "is {} bytes, over the limit of {} (server.max_error_message_bytes)",
                    s.len(),
                    limits.max_error_message_bytes
                ),
            ));
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new(
                path("errorMessage"),
                "must be a string or null",
            ));
            None
        }
    };

    let status = match obj.get("status") {
        None | Some(Value::Null) => {
            errors.push(FieldError::new(path("status"), "is required"));
            None
        }
        Some(v) => match parse_status(v) {
            Ok(s) => Some(s),
            Err(reason) => {
                errors.push(FieldError::new(path("status"), reason));
                None
            }
        },
    };

    let timestamp = match obj.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match OffsetDateTime::parse(s, &Rfc3339) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(FieldError::new(
                    path("timestamp"),
                    format!("not an RFC 3339 timestamp ({e})"),
                ));
                None
            }
        },
        Some(_) => {
            errors.push(FieldError::new(
                path("timestamp"),
                "must be an RFC 3339 string",
            ));
            None
        }
    };

    let (mut success, mut failure) = (None, None);
    match obj.get("destinations") {
        None | Some(Value::Null) => {}
        Some(Value::Object(d)) => {
            for key in d.keys() {
                if key != "success" && key != "failure" {
                    errors.push(FieldError::new(
                        path(&format!("destinations.{}", clip_field(key))),
                        "unknown field (expected success or failure)",
                    ));
                }
            }
            for (side, slot) in [("success", &mut success), ("failure", &mut failure)] {
                if let Some(v) = d.get(side) {
                    match parse_dest(v, &path(&format!("destinations.{side}")), limits) {
                        Ok(dest) => *slot = Some(dest),
                        Err(mut e) => errors.append(&mut e),
                    }
                }
            }
        }
        Some(_) => errors.push(FieldError::new(path("destinations"), "must be an object")),
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Completion {
        fn_call_id: fn_call_id.expect("checked"),
        function_id: function_id.expect("checked"),
        application_id: application_id.expect("checked"),
        compartment_id: compartment_id.expect("checked"),
        opc_request_id,
        status: status.expect("checked"),
        error_code,
        error_message,
        timestamp,
        success,
        failure,
    })
}

/// Every problem of the ids of a request other than an event
/// (`POST /v1/invocations`, a function's destinations): the rules of an
/// event's ids, and at most `max_bytes`.
pub fn check_ids(ids: &[(&str, &str)], max_bytes: usize) -> Vec<FieldError> {
    ids.iter()
        .filter_map(|(field, value)| {
            let problem = if value.is_empty() {
                Some("must not be empty".to_string())
            } else if value.len() > max_bytes {
                Some(format!(
                    "longer than {max_bytes} bytes (server.max_id_bytes)"
                ))
            } else {
                id_problem(value)
            };
            problem.map(|p| FieldError::new(*field, p))
        })
        .collect()
}

/// Why an id (fnCallId, functionId, a destination id, ...) is refused:
/// control characters, or white space at either end.
fn id_problem(s: &str) -> Option<String> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Some(format!(
            "must not contain control characters (found U+{:04X})",
            c as u32
        ));
    }
    if s.trim() != s {
        return Some(if s.trim().is_empty() {
            "must not be only white space".into()
        } else {
            "must not start or end with white space".into()
        });
    }
    None
}

/// The event fields a re-post is compared on, in digest order.
const DIGEST_FIELDS: &[&str] = &[
    "functionId",
    "applicationId",
    "compartmentId",
    "opcRequestId",
    "status",
    "errorCode",
    "errorMessage",
    "timestamp",
    "destinations",
];
const DIGEST_BYTES: usize = 8;

/// The event's field digests: 8 bytes of SHA-256 per field of
/// [`DIGEST_FIELDS`] (absent and present-but-empty differ). Stored with the
/// record so a re-post can be told apart, and what differs named, without
/// keeping the event.
pub fn digest(event: &Completion) -> Vec<u8> {
    let opt = |v: &Option<String>| match v {
        Some(s) => format!("s{s}"),
        None => "-".into(),
    };
    let dest = |d: &Option<DestSpec>| match d {
        Some(d) => serde_json::to_string(d).unwrap_or_default(),
        None => "-".into(),
    };
    let values = [
        event.function_id.clone(),
        event.application_id.clone(),
        event.compartment_id.clone(),
        opt(&event.opc_request_id),
        event.status.to_string(),
        opt(&event.error_code),
        opt(&event.error_message),
        event
            .timestamp
            .map_or_else(|| "-".into(), |t| t.unix_timestamp_nanos().to_string()),
        format!("{}|{}", dest(&event.success), dest(&event.failure)),
    ];
    let mut out = Vec::with_capacity(values.len() * DIGEST_BYTES);
    for v in values {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, v.as_bytes());
        out.extend_from_slice(&d.as_ref()[..DIGEST_BYTES]);
    }
    out
}

/// The fields whose digests differ (all of them if the digests have
/// different shapes).
pub fn differing_fields(stored: &[u8], new: &[u8]) -> Vec<&'static str> {
    // No digest: a record fnrelay makes itself (the watchdog's). Stored,
    // the late completion of that call gets its id back, whatever it says;
    // new, the completion that came first stays and the watchdog's is
    // dropped.
    if stored.is_empty() || new.is_empty() {
        return Vec::new();
    }
    if stored.len() != new.len() || stored.len() != DIGEST_FIELDS.len() * DIGEST_BYTES {
        return if stored == new {
            Vec::new()
        } else {
            DIGEST_FIELDS.to_vec()
        };
    }
    DIGEST_FIELDS
        .iter()
        .zip(stored.chunks(DIGEST_BYTES).zip(new.chunks(DIGEST_BYTES)))
        .filter(|(_, (a, b))| a != b)
        .map(|(name, _)| *name)
        .collect()
}

fn parse_status(v: &Value) -> Result<u16, String> {
    let n = match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not an integer between 100 and 599"))?,
        Value::String(s) => s.trim().parse::<u64>().map_err(|_| {
            format!(
                "\"{}\" is not an integer between 100 and 599",
                crate::logging::clip(s)
            )
        })?,
        _ => return Err("must be an integer or a numeric string".into()),
    };
    if (100..=599).contains(&n) {
        Ok(n as u16)
    } else {
        Err(format!("{n} is out of range 100-599"))
    }
}

fn parse_dest(v: &Value, path: &str, limits: &Limits) -> Result<DestSpec, Vec<FieldError>> {
    let Value::Object(obj) = v else {
        return Err(vec![FieldError::new(path, "must be an object")]);
    };
    let kind = match obj.get("kind") {
        Some(Value::String(k)) if k == "NONE" => None,
        Some(Value::String(k)) => match DestKind::parse(k) {
            Some(kind) => Some(kind),
            None => {
                return Err(vec![FieldError::new(
                    format!("{path}.kind"),
                    format!(
                        "unknown kind `{}` (expected NONE, QUEUE, STREAM or NOTIFICATION)",
                        crate::logging::clip(k)
                    ),
                )]);
            }
        },
        None => return Err(vec![FieldError::new(format!("{path}.kind"), "is required")]),
        Some(_) => {
            return Err(vec![FieldError::new(
                format!("{path}.kind"),
                "must be a string",
            )]);
        }
    };
    let mut errors = Vec::new();
    let allowed: &[&str] = match kind {
        None => &["kind"],
        Some(DestKind::Queue) => &["kind", "queueId", "channelId"],
        Some(DestKind::Stream) => &["kind", "streamId"],
        Some(DestKind::Notification) => &["kind", "topicId"],
    };
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) {
            errors.push(FieldError::new(
                format!("{path}.{}", clip_field(key)),
                format!(
                    "not a field of a {} destination",
                    kind.map_or("NONE", DestKind::as_str)
                ),
            ));
        }
    }
    let mut string = |name: &str, required: bool| -> Option<String> {
        match obj.get(name) {
            None | Some(Value::Null) if required => {
                errors.push(FieldError::new(format!("{path}.{name}"), "is required"));
                None
            }
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() || s.len() > limits.max_id_bytes => {
                errors.push(FieldError::new(
                    format!("{path}.{name}"),
                    format!("must be 1 to {} bytes", limits.max_id_bytes),
                ));
                None
            }
            Some(Value::String(s)) => match id_problem(s) {
                Some(reason) => {
                    errors.push(FieldError::new(format!("{path}.{name}"), reason));
                    None
                }
                None => Some(s.clone()),
            },
            Some(_) => {
                errors.push(FieldError::new(
                    format!("{path}.{name}"),
                    "must be a string",
                ));
                None
            }
        }
    };
    let dest = match kind {
        None => Some(DestSpec::None),
        Some(DestKind::Queue) => {
            let queue_id = string("queueId", true);
            let channel_id = string("channelId", false);
            queue_id.map(|queue_id| DestSpec::Queue {
                queue_id,
                channel_id,
            })
        }
        Some(DestKind::Stream) => {
            string("streamId", true).map(|stream_id| DestSpec::Stream { stream_id })
        }
        Some(DestKind::Notification) => {
            string("topicId", true).map(|topic_id| DestSpec::Notification { topic_id })
        }
    };
    match dest {
        Some(d) if errors.is_empty() => Ok(d),
        _ => Err(errors),
    }
}

/// The invocation record v1.0 (SPEC section 3). Field order is the OCI order.
#[derive(Debug, Serialize)]
pub struct InvocationRecord<'a> {
    /// ULID fixed at accept.
    pub id: &'a str,
    /// Always `1.0`.
    pub version: &'static str,
    /// The invocation's details.
    pub data: RecordData<'a>,
}

/// `data` of the record.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordData<'a> {
    compartment_id: &'a str,
    function_id: &'a str,
    application_id: &'a str,
    request: RecordRequest<'a>,
    response: RecordResponse<'a>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RecordRequest<'a> {
    opc_request_id: Option<&'a str>,
    fn_call_id: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RecordResponse<'a> {
    status: String,
    error_code: Option<&'a str>,
    error_message: Option<&'a str>,
    timestamp: String,
}

/// Formats a time as the record does: UTC, milliseconds, `Z`.
pub fn format_timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Builds the record JSON for an event accepted at `accepted_at` with `id`.
pub fn build_record(id: &str, event: &Completion, accepted_at: OffsetDateTime) -> String {
    let success = event.destination_type() == DestinationType::Success;
    let record = InvocationRecord {
        id,
        version: "1.0",
        data: RecordData {
            compartment_id: &event.compartment_id,
            function_id: &event.function_id,
            application_id: &event.application_id,
            request: RecordRequest {
                opc_request_id: event.opc_request_id.as_deref(),
                fn_call_id: &event.fn_call_id,
            },
            response: RecordResponse {
                status: event.status.to_string(),
                // The record carries no error on success (SPEC section 3).
                error_code: if success {
                    None
                } else {
                    event.error_code.as_deref()
                },
                error_message: if success {
                    None
                } else {
                    event.error_message.as_deref()
                },
                timestamp: format_timestamp(event.timestamp.unwrap_or(accepted_at)),
            },
        },
    };
    serde_json::to_string(&record).expect("record serializes")
}

/// Returns the record's `data.response.errorMessage` replaced by a truncated
/// one so that the JSON fits in `max_bytes`; `None` if it cannot fit.
/// Backends with size limits use it rather than dropping a record.
pub fn truncate_to_fit(record_json: &str, max_bytes: usize) -> Option<String> {
    if record_json.len() <= max_bytes {
        return Some(record_json.to_string());
    }
    let mut value: Value = serde_json::from_str(record_json).ok()?;
    let response: &mut Map<String, Value> = value
        .get_mut("data")?
        .get_mut("response")?
        .as_object_mut()?;
    let message = response.get("errorMessage")?.as_str()?.to_string();
    const MARKER: &str = "...[truncated]";
    let excess = record_json.len() - max_bytes + MARKER.len() + 16;
    if excess >= message.len() {
        return None;
    }
    let mut cut = message.len() - excess;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    response.insert(
        "errorMessage".into(),
        Value::String(format!("{}{MARKER}", &message[..cut])),
    );
    let out = serde_json::to_string(&value).ok()?;
    (out.len() <= max_bytes).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_batch_size: 3,
        max_id_bytes: 32,
        max_error_message_bytes: 32,
    };

    fn fields(body: &str) -> Vec<String> {
        match parse_body(body.as_bytes(), &LIMITS) {
            Ok(_) => vec![],
            Err(e) => e.into_iter().map(|f| f.field).collect(),
        }
    }

    const GOOD: &str = r#"{"fnCallId":"c1","functionId":"f","applicationId":"a","compartmentId":"k","status":200}"#;

    #[test]
    fn good_event_parses() {
        let events = parse_body(GOOD.as_bytes(), &LIMITS).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].status, 200);
        assert_eq!(events[0].destination_type(), DestinationType::Success);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: &[(&str, &[&str])] = &[
            (
                r#"{"functionId":"f","applicationId":"a","compartmentId":"k","status":200}"#,
                &["fnCallId"],
            ),
            (
                r#"{"fnCallId":"c","functionId":"f","applicationId":"a","compartmentId":"k","status":600}"#,
                &["status"],
            ),
            (
                r#"{"fnCallId":"c","functionId":"f","applicationId":"a","compartmentId":"k","status":"abc"}"#,
                &["status"],
            ),
            (
                r#"{"fnCallId":"c","functionId":"f","applicationId":"a","compartmentId":"k","status":99.5}"#,
                &["status"],
            ),
            (
                r#"{"fnCallId":"c","functionId":"f","applicationId":"a","compartmentId":"k","status":200,"timestamp":"yesterday"}"#,
                &["timestamp"],
            ),
            (
                r#"{"fnCallId":"c","functionId":"f","applicationId":"a","compartmentId":"k","status":200,"destinations":{"success":{"kind":"BUCKET"}}}"#,
                &["destinations.success.kind"],
            ),
            (
                r#"{"fnCallId":"c","functionId":"f","applicationId":"a","compartmentId":"k","status":200,"destinations":{"failure":{"kind":"QUEUE"}}}"#,
                &["destinations.failure.queueId"],
            ),
            (
                r#"{"fnCallId":"c","functionId":"f","applicationId":"a","compartmentId":"k","status":200,"destinations":{"failure":{"kind":"STREAM","queueId":"q","streamId":"s"}}}"#,
                &["destinations.failure.queueId"],
            ),
            (
                r#"{"fnCallId":"c","functionId":"f","applicationId":"a","compartmentId":"k","status":500,"errorMessage":"0123456789012345678901234567890123"}"#,
                &["errorMessage"],
            ),
            (
                r#"{"fnCallId":"c0123456789012345678901234567890123456789","functionId":7,"applicationId":"","compartmentId":"k","status":200,"extra":1}"#,
                &["extra", "fnCallId", "functionId", "applicationId"],
            ),
            (r#"[1]"#, &["body"]),
            (r#"{"#, &["body"]),
            (r#"{} x"#, &["body"]),
            // Duplicate keys, at any depth, are named.
            (
                r#"{"fnCallId":"c","functionId":"f","applicationId":"a","compartmentId":"k","status":200,"status":500}"#,
                &["status"],
            ),
            (
                r#"{"fnCallId":"c","functionId":"f","applicationId":"a","compartmentId":"k","status":200,"destinations":{"success":{"kind":"NONE","kind":"QUEUE"}}}"#,
                &["destinations.success.kind"],
            ),
            (r#"{"completions":[],"completions":[]}"#, &["completions"]),
            // Control characters and white space at the ends of ids.
            (
                r#"{"fnCallId":"c\nINFO forged","functionId":"f\u001b[31m","applicationId":"a\u0000","compartmentId":"k","status":200}"#,
                &["fnCallId", "functionId", "applicationId"],
            ),
            (
                r#"{"fnCallId":"   ","functionId":" f","applicationId":"a ","compartmentId":"k","status":200,"destinations":{"failure":{"kind":"QUEUE","queueId":"q\t"}}}"#,
                &[
                    "fnCallId",
                    "functionId",
                    "applicationId",
                    "destinations.failure.queueId",
                ],
            ),
            (r#"{"completions":{"a":1}}"#, &["completions"]),
        ];
        for (body, want) in cases {
            assert_eq!(fields(body), *want, "{body}");
        }
    }

    #[test]
    fn batch_errors_carry_the_index_and_limits_hold() {
        let body = format!(r#"{{"completions":[{GOOD},{{"fnCallId":"x"}}]}}"#);
        let got = fields(&body);
        assert_eq!(
            got,
            [
                "completions[1].functionId",
                "completions[1].applicationId",
                "completions[1].compartmentId",
                "completions[1].status"
            ]
        );
        let four = format!(r#"{{"completions":[{GOOD},{GOOD},{GOOD},{GOOD}]}}"#);
        assert_eq!(fields(&four), ["completions"]);
        assert_eq!(fields(r#"{"completions":[]}"#), ["completions"]);
        let dup = format!(r#"{{"completions":[{GOOD},{{"fnCallId":"a","fnCallId":"b"}}]}}"#);
        assert_eq!(fields(&dup), ["completions[1].fnCallId"]);
        let beside = format!(r#"{{"completions":[{GOOD}],"x":1}}"#);
        assert_eq!(fields(&beside), ["x"]);
    }

    #[test]
    fn echoed_input_is_clipped() {
        let long = "x".repeat(100_000);
        let body = format!(
            r#"{{"fnCallId":"c","functionId":"f","applicationId":"a","compartmentId":"k","status":"{long}","{long}":1}}"#
        );
        let errors = parse_body(body.as_bytes(), &LIMITS).unwrap_err();
        for e in &errors {
            assert!(e.field.len() < 200 && e.reason.len() < 300, "{e:?}");
        }
    }

    #[test]
    fn digests_name_the_fields_that_differ() {
        let a = parse_body(GOOD.as_bytes(), &LIMITS).unwrap().remove(0);
        let same = digest(&a);
        assert_eq!(
            differing_fields(&same, &digest(&a.clone())),
            Vec::<&str>::new()
        );
        let mut b = a.clone();
        b.status = 500;
        b.error_message = Some("x".into());
        assert_eq!(
            differing_fields(&same, &digest(&b)),
            ["status", "errorMessage"]
        );
        // Absent and present-but-empty are different content.
        let mut c = a.clone();
        c.opc_request_id = match a.opc_request_id {
            Some(_) => None,
            None => Some(String::new()),
        };
        assert_eq!(differing_fields(&same, &digest(&c)), ["opcRequestId"]);
        let mut d = a.clone();
        d.failure = Some(DestSpec::None);
        assert_eq!(differing_fields(&same, &digest(&d)), ["destinations"]);
        // "200" and 200 are the same status.
        let text = GOOD.replace(r#""status":200"#, r#""status":"200""#);
        let e = parse_body(text.as_bytes(), &LIMITS).unwrap().remove(0);
        assert!(differing_fields(&same, &digest(&e)).is_empty());
    }

    #[test]
    fn numeric_string_status_and_record_shape() {
        let body = r#"{"fnCallId":"c1","functionId":"f","applicationId":"a","compartmentId":"k","opcRequestId":"r","status":"502","errorCode":"FunctionInvokeExecutionFailed","errorMessage":"function failed","timestamp":"2024-08-11T23:47:41.264+02:00"}"#;
        let event = parse_body(body.as_bytes(), &LIMITS).unwrap().remove(0);
        let json = build_record(
            "01K1Q6K12C1BT01KRZJ000HKB9",
            &event,
            OffsetDateTime::UNIX_EPOCH,
        );
        assert_eq!(
            json,
            r#"{"id":"01K1Q6K12C1BT01KRZJ000HKB9","version":"1.0","data":{"compartmentId":"k","functionId":"f","applicationId":"a","request":{"opcRequestId":"r","fnCallId":"c1"},"response":{"status":"502","errorCode":"FunctionInvokeExecutionFailed","errorMessage":"function failed","timestamp":"2024-08-11T21:47:41.264Z"}}}"#
        );
    }

    #[test]
    fn success_record_has_null_errors_and_accept_time() {
        let mut event = parse_body(GOOD.as_bytes(), &LIMITS).unwrap().remove(0);
        event.error_code = Some("X".into());
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_723_412_861_264_000_000).unwrap();
        let json = build_record("ID", &event, at);
        assert!(json.contains(r#""response":{"status":"200","errorCode":null,"errorMessage":null,"timestamp":"2024-08-11T21:47:41.264Z"}"#), "{json}");
        assert!(json.contains(r#""opcRequestId":null"#));
    }

    #[test]
    fn truncation_keeps_the_record_valid_and_marked() {
        let mut event = parse_body(GOOD.as_bytes(), &LIMITS).unwrap().remove(0);
        event.status = 500;
        event.error_message = Some("é".repeat(500));
        let json = build_record("ID", &event, OffsetDateTime::UNIX_EPOCH);
        let cut = truncate_to_fit(&json, 400).unwrap();
        assert!(cut.len() <= 400);
        let v: Value = serde_json::from_str(&cut).unwrap();
        assert!(
            v["data"]["response"]["errorMessage"]
                .as_str()
                .unwrap()
                .ends_with("...[truncated]")
        );
        assert_eq!(truncate_to_fit(&json, 50), None);
        assert_eq!(
            truncate_to_fit(&json, 100_000).as_deref(),
            Some(json.as_str())
        );
    }
}

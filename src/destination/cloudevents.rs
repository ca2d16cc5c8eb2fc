//! Records as CloudEvents 1.0 (SPEC section 12), per resource with
//! `format = "cloudevents"`: `id` = record id, `source` =
//! `/functions/{functionId}`, `type` =
//! `com.oraclecloud.functions.detached.success|failure`, `subject` =
//! fnCallId, `time` = the invocation's timestamp, `datacontenttype` =
//! `application/json`, `data` = the record. Structured mode (the event as
//! one `application/cloudevents+json` document) works everywhere; binary
//! mode (the record as the body, the attributes in the message's headers)
//! where the protocol has headers: webhook (`ce-*`), AMQP (`cloudEvents:*`
//! application properties), NATS and JetStream (`ce-*`).

use bytes::Bytes;

use crate::record::DestinationType;

/// How a resource's records are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encoding {
    /// The record as SPEC section 3 has it.
    #[default]
    Oci,
    /// A CloudEvent, the whole event in the body.
    Structured,
    /// A CloudEvent, the record in the body and the attributes in headers.
    Binary,
}

/// A record's CloudEvents context attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// The record id.
    pub id: String,
    /// `/functions/{functionId}`.
    pub source: String,
    /// `com.oraclecloud.functions.detached.success|failure`.
    pub ty: &'static str,
    /// fnCallId.
    pub subject: String,
    /// The invocation's timestamp (RFC 3339), when the record has one.
    pub time: Option<String>,
}

impl Attributes {
    /// `(name, value)` pairs of the attributes, `specversion` and
    /// `datacontenttype` included, for binary mode headers.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            ("specversion", "1.0".to_string()),
            ("id", self.id.clone()),
            ("source", self.source.clone()),
            ("type", self.ty.to_string()),
            ("subject", self.subject.clone()),
            ("datacontenttype", "application/json".to_string()),
        ];
        if let Some(t) = &self.time {
            out.push(("time", t.clone()));
        }
        out
    }
}

/// The media type of a structured CloudEvent.
pub const STRUCTURED: &str = "application/cloudevents+json";

/// The attributes of a record.
pub fn attributes(
    id: &str,
    function_id: &str,
    fn_call_id: &str,
    destination_type: DestinationType,
    record: &serde_json::Value,
) -> Attributes {
    Attributes {
        id: id.to_string(),
        source: format!("/functions/{function_id}"),
        ty: match destination_type {
            DestinationType::Success => "com.oraclecloud.functions.detached.success",
            DestinationType::Failure => "com.oraclecloud.functions.detached.failure",
        },
        subject: fn_call_id.to_string(),
        time: record["data"]["response"]["timestamp"]
            .as_str()
            .map(str::to_string),
    }
}

/// Encodes a record body (the SPEC section 3 JSON) for `encoding`: the new
/// body, its content type, and the attributes for binary mode.
pub fn encode(
    encoding: Encoding,
    id: &str,
    function_id: &str,
    fn_call_id: &str,
    destination_type: DestinationType,
    body: Bytes,
) -> (Bytes, &'static str, Option<Attributes>) {
    if encoding == Encoding::Oci {
        return (body, "application/json", None);
    }
    let record: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let attrs = attributes(id, function_id, fn_call_id, destination_type, &record);
    match encoding {
        Encoding::Binary => (body, "application/json", Some(attrs)),
        _ => {
            let mut event = serde_json::Map::new();
            for (name, value) in attrs.pairs() {
                event.insert(name.to_string(), serde_json::Value::String(value));
            }
            event.insert("data".into(), record);
            let bytes = serde_json::to_vec(&event).expect("a JSON value");
            (Bytes::from(bytes), STRUCTURED, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_wraps_the_record_and_binary_keeps_it() {
        let body = Bytes::from_static(
            br#"{"id":"01R","data":{"response":{"timestamp":"2026-11-25T12:00:00.000Z"}}}"#,
        );
        let (out, ct, attrs) = encode(
            Encoding::Structured,
            "01R",
            "f",
            "call",
            DestinationType::Failure,
            body.clone(),
        );
        assert_eq!(ct, STRUCTURED);
        assert!(attrs.is_none());
        let event: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(event["type"], "com.oraclecloud.functions.detached.failure");
        assert_eq!(event["time"], "2026-11-25T12:00:00.000Z");
        assert_eq!(event["data"]["id"], "01R");
        let (out, ct, attrs) = encode(
            Encoding::Binary,
            "01R",
            "f",
            "call",
            DestinationType::Success,
            body.clone(),
        );
        assert_eq!((out, ct), (body, "application/json"));
        assert_eq!(attrs.unwrap().source, "/functions/f");
    }
}

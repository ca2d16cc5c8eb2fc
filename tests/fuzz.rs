//! Fuzzing (bolero) of the ingest parser and the config parser, bounded in
//! time (`FNRELAY_FUZZ_SECONDS`, 30 s per target by default), and a
//! proptest round trip: a valid event serialised and parsed back is the
//! same event.
//!
//! The fuzz targets take raw bytes half the time and, the other half, read
//! the bytes as choices in a small JSON grammar (event fields, nesting,
//! duplicate keys, control characters, huge numbers), so most inputs get
//! past the JSON syntax into validation. `cargo bolero test` runs the same
//! targets under libFuzzer for coverage-guided runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fnrelay::config::{self, Source};
use fnrelay::record::{Completion, Limits, build_record, digest, parse_request};
use proptest::prelude::*;
use time::OffsetDateTime;

const LIMITS: Limits = Limits {
    max_batch_size: 50,
    max_id_bytes: 64,
    max_error_message_bytes: 256,
};

fn fuzz_time() -> Duration {
    let seconds = std::env::var("FNRELAY_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(seconds)
}

/// Reads input bytes as choices.
struct Choices<'a>(&'a [u8]);

impl Choices<'_> {
    fn next(&mut self, n: usize) -> usize {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b as usize % n.max(1)
            }
            None => 0,
        }
    }
}

const KEYS: &[&str] = &[
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
    "success",
    "failure",
    "kind",
    "queueId",
    "streamId",
    "topicId",
    "channelId",
    "completions",
    "x",
];

const STRINGS: &[&str] = &[
    "c1",
    "",
    " ",
    " padded ",
    "line\\nbreak",
    "\\u0000",
    "\\u001b[31m",
    "QUEUE",
    "STREAM",
    "NOTIFICATION",
    "NONE",
    "q",
    "200",
    "5O0",
    "2024-08-11T23:47:41.264+02:00",
    "yesterday",
    "é✓",
    "\\ud800",
];

fn value(c: &mut Choices<'_>, depth: usize, out: &mut String) {
    match c.next(if depth > 4 { 6 } else { 9 }) {
        0 => out.push_str("null"),
        1 => out.push_str(["true", "false"][c.next(2)]),
        2 => out.push_str(
            [
                "200",
                "500",
                "99",
                "600",
                "-1",
                "1e400",
                "200.0",
                "18446744073709551616",
            ][c.next(8)],
        ),
        3..=5 => {
            out.push('"');
            out.push_str(STRINGS[c.next(STRINGS.len())]);
            out.push('"');
        }
        6 | 7 => object(c, depth + 1, out),
        _ => {
            out.push('[');
            for i in 0..c.next(4) {
                if i > 0 {
                    out.push(',');
                }
                value(c, depth + 1, out);
            }
            out.push(']');
        }
    }
}

fn object(c: &mut Choices<'_>, depth: usize, out: &mut String) {
    out.push('{');
    for i in 0..c.next(12) {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(KEYS[c.next(KEYS.len())]);
        out.push_str("\":");
        value(c, depth, out);
    }
    out.push('}');
}

/// A valid event's fields, each kept, replaced, dropped or repeated by the
/// choices, and maybe a stray key: mostly near-valid events.
fn event_object(c: &mut Choices<'_>, out: &mut String) {
    const VALID: &[(&str, &str)] = &[
        ("fnCallId", "\"c1\""),
        ("functionId", "\"ocid1.fnfunc.oc1..f\""),
        ("applicationId", "\"a\""),
        ("compartmentId", "\"k\""),
        ("opcRequestId", "\"r\""),
        ("status", "500"),
        ("errorCode", "\"FunctionInvokeExecutionFailed\""),
        ("errorMessage", "\"failed\""),
        ("timestamp", "\"2024-08-11T23:47:41.264+02:00\""),
        (
            "destinations",
            "{\"success\":{\"kind\":\"NONE\"},\"failure\":{\"kind\":\"QUEUE\",\"queueId\":\"q\",\"channelId\":\"c\"}}",
        ),
    ];
    out.push('{');
    let mut first = true;
    let mut key = |out: &mut String, k: &str| {
        if !first {
            out.push(',');
        }
        first = false;
        out.push('"');
        out.push_str(k);
        out.push_str("\":");
    };
    for (k, v) in VALID {
        match c.next(12) {
            0 => {
                key(out, k);
                value(c, 1, out);
            }
            1 => {}
            2 => {
                key(out, k);
                out.push_str(v);
                key(out, k);
                value(c, 1, out);
            }
            _ => {
                key(out, k);
                out.push_str(v);
            }
        }
    }
    if c.next(6) == 0 {
        key(out, KEYS[c.next(KEYS.len())]);
        value(c, 1, out);
    }
    out.push('}');
}

/// A body from the grammar: an event, or a batch of them, near-valid or
/// free-form.
fn body(bytes: &[u8]) -> Vec<u8> {
    let mut c = Choices(bytes);
    let mut out = String::new();
    let one = |c: &mut Choices<'_>, out: &mut String| {
        if c.next(4) == 0 {
            object(c, 1, out)
        } else {
            event_object(c, out)
        }
    };
    if c.next(3) == 0 {
        out.push_str("{\"completions\":[");
        for i in 0..c.next(8) {
            if i > 0 {
                out.push(',');
            }
            one(&mut c, &mut out);
        }
        out.push_str("]}");
    } else {
        one(&mut c, &mut out);
    }
    out.into_bytes()
}

/// What every accepted event must satisfy.
fn check_event(e: &Completion) {
    for id in [
        &e.fn_call_id,
        &e.function_id,
        &e.application_id,
        &e.compartment_id,
    ] {
        assert!(!id.is_empty() && id.len() <= LIMITS.max_id_bytes, "{id:?}");
        assert!(!id.chars().any(char::is_control), "{id:?}");
        assert_eq!(id.trim(), id.as_str());
    }
    assert!((100..=599).contains(&e.status));
    assert!(
        e.error_message
            .as_ref()
            .is_none_or(|m| m.len() <= LIMITS.max_error_message_bytes)
    );
    let record = build_record("01K1Q6K12C1BT01KRZJ000HKB9", e, OffsetDateTime::UNIX_EPOCH);
    let json: serde_json::Value = serde_json::from_str(&record).expect("the record is JSON");
    assert_eq!(json["data"]["request"]["fnCallId"], e.fn_call_id.as_str());
    assert_eq!(digest(e).len(), 72);
}

static INPUTS: AtomicUsize = AtomicUsize::new(0);
static ACCEPTED: AtomicUsize = AtomicUsize::new(0);

fn check_body(bytes: &[u8]) {
    INPUTS.fetch_add(1, Ordering::Relaxed);
    match parse_request(bytes, &LIMITS) {
        Ok((events, _)) => {
            ACCEPTED.fetch_add(1, Ordering::Relaxed);
            assert!(!events.is_empty() && events.len() <= LIMITS.max_batch_size);
            events.iter().for_each(check_event);
        }
        Err(fields) => {
            assert!(!fields.is_empty());
            for f in &fields {
                assert!(f.field.len() < 400 && f.reason.len() < 600, "{f:?}");
            }
        }
    }
}

#[test]
fn fuzz_ingest_parser() {
    bolero::check!()
        .with_test_time(fuzz_time())
        .with_max_len(4096)
        .for_each(|bytes: &[u8]| match bytes.split_first() {
            Some((mode, rest)) if mode % 2 == 0 => check_body(rest),
            _ => check_body(&body(bytes)),
        });
    let (inputs, accepted) = (
        INPUTS.load(Ordering::Relaxed),
        ACCEPTED.load(Ordering::Relaxed),
    );
    eprintln!("fuzz ingest parser: {inputs} inputs, {accepted} accepted as valid events");
    assert!(accepted > 0, "the grammar reaches valid events");
}

const TOML_PIECES: &[&str] = &[
    "[server]\n",
    "[journal]\n",
    "[delivery]\n",
    "[log]\n",
    "[queues.q]\n",
    "[streams.s]\n",
    "[topics.t]\n",
    "[routes.default]\n",
    "[[policy.allow]]\n",
    "backend = \"file\"\n",
    "backend = \"amqp\"\n",
    "backend = \"webhook\"\n",
    "backend = \"oci-queue\"\n",
    "backend = \"nope\"\n",
    "path = \"/tmp/fnrelay-fuzz/q.jsonl\"\n",
    "url = \"amqp://127.0.0.1:5672/%2f\"\n",
    "url = \"http://10.0.0.1/hook\"\n",
    "url = 7\n",
    "listen = \"127.0.0.1:0\"\n",
    "listen = \"nowhere\"\n",
    "max_body_bytes = 0\n",
    "max_id_bytes = 999999\n",
    "shutdown_timeout = \"5s\"\n",
    "shutdown_timeout = \"soon\"\n",
    "lease = \"1s\"\n",
    "concurrency = 0\n",
    "max_batch = 100000\n",
    "success = { kind = \"QUEUE\", queueId = \"q\" }\n",
    "failure = { kind = \"STREAM\", streamId = \"missing\" }\n",
    "compartment = \"c\"\nresources = [\"queues.q\"]\n",
    "x = [\n",
    "= =\n",
    "\"\\u0000\" = 1\n",
];

#[test]
fn fuzz_config_parser() {
    bolero::check!()
        .with_test_time(fuzz_time())
        .with_max_len(512)
        .for_each(|bytes: &[u8]| {
            let text = match bytes.split_first() {
                Some((mode, rest)) if mode % 4 == 0 => String::from_utf8_lossy(rest).into_owned(),
                _ => {
                    let mut c = Choices(bytes);
                    let mut t = String::new();
                    for _ in 0..c.next(24) {
                        t.push_str(TOML_PIECES[c.next(TOML_PIECES.len())]);
                    }
                    t
                }
            };
            // Never a panic: a config is either refused with reasons or valid.
            CONFIGS.fetch_add(1, Ordering::Relaxed);
            match config::load_with_env(Source::Text(&text), Some(Default::default())) {
                Ok(config) => {
                    PARSED.fetch_add(1, Ordering::Relaxed);
                    match config.validate() {
                        Ok(()) => {
                            VALID.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => assert!(!e.to_string().is_empty()),
                    }
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        });
    let (n, parsed, valid) = (
        CONFIGS.load(Ordering::Relaxed),
        PARSED.load(Ordering::Relaxed),
        VALID.load(Ordering::Relaxed),
    );
    eprintln!("fuzz config parser: {n} inputs, {parsed} parsed, {valid} valid");
    assert!(
        parsed > 0 && valid > 0,
        "the pieces reach parsed and valid configs"
    );
}

static CONFIGS: AtomicUsize = AtomicUsize::new(0);
static PARSED: AtomicUsize = AtomicUsize::new(0);
static VALID: AtomicUsize = AtomicUsize::new(0);

fn id() -> impl Strategy<Value = String> {
    // Printable, no control characters, no white space at the ends.
    "[A-Za-z0-9._:-][A-Za-z0-9._: é-]{0,40}[A-Za-z0-9._:-]|[A-Za-z0-9]"
}

prop_compose! {
    fn event()(
        fn_call_id in id(),
        function_id in id(),
        application_id in id(),
        compartment_id in id(),
        opc_request_id in proptest::option::of(id()),
        status in 100u16..=599,
        error_code in proptest::option::of(id()),
        error_message in proptest::option::of("(?s).{0,200}"),
        timestamp in proptest::option::of(0i64..4_000_000_000),
    ) -> serde_json::Value {
        let mut e = serde_json::json!({
            "fnCallId": fn_call_id,
            "functionId": function_id,
            "applicationId": application_id,
            "compartmentId": compartment_id,
            "status": status,
        });
        if let Some(v) = opc_request_id { e["opcRequestId"] = v.into(); }
        if let Some(v) = error_code { e["errorCode"] = v.into(); }
        if let Some(v) = error_message { e["errorMessage"] = v.into(); }
        if let Some(t) = timestamp {
            let t = OffsetDateTime::from_unix_timestamp(t).unwrap();
            e["timestamp"] = fnrelay::record::format_timestamp(t).into();
        }
        e
    }
}

proptest! {
    #[test]
    fn a_valid_event_parses_back_to_the_same_event(events in proptest::collection::vec(event(), 1..20)) {
        let limits = Limits { max_batch_size: 50, max_id_bytes: 255, max_error_message_bytes: 8192 };
        let body = if events.len() == 1 {
            events[0].to_string()
        } else {
            serde_json::json!({ "completions": events }).to_string()
        };
        let (parsed, batch) = parse_request(body.as_bytes(), &limits).expect("a valid event is accepted");
        prop_assert_eq!(batch, events.len() > 1);
        prop_assert_eq!(parsed.len(), events.len());
        for (p, e) in parsed.iter().zip(&events) {
            prop_assert_eq!(&p.fn_call_id, e["fnCallId"].as_str().unwrap());
            prop_assert_eq!(&p.function_id, e["functionId"].as_str().unwrap());
            prop_assert_eq!(&p.application_id, e["applicationId"].as_str().unwrap());
            prop_assert_eq!(&p.compartment_id, e["compartmentId"].as_str().unwrap());
            prop_assert_eq!(p.opc_request_id.as_deref(), e["opcRequestId"].as_str());
            prop_assert_eq!(u64::from(p.status), e["status"].as_u64().unwrap());
            prop_assert_eq!(p.error_code.as_deref(), e["errorCode"].as_str());
            prop_assert_eq!(p.error_message.as_deref(), e["errorMessage"].as_str());
            prop_assert_eq!(
                p.timestamp.map(fnrelay::record::format_timestamp),
                e["timestamp"].as_str().map(str::to_string)
            );
            // And the record built from it carries the same fields.
            let record: serde_json::Value =
                serde_json::from_str(&build_record("01K1Q6K12C1BT01KRZJ000HKB9", p, OffsetDateTime::UNIX_EPOCH)).unwrap();
            prop_assert_eq!(&record["data"]["request"]["fnCallId"], &e["fnCallId"]);
            prop_assert_eq!(&record["data"]["response"]["status"], &serde_json::Value::String(p.status.to_string()));
            // A success record carries no error (SPEC section 3).
            let message = if (200..300).contains(&p.status) {
                serde_json::Value::Null
            } else {
                e.get("errorMessage").cloned().unwrap_or(serde_json::Value::Null)
            };
            prop_assert_eq!(&record["data"]["response"]["errorMessage"], &message);
        }
    }
}

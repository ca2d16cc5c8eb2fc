//! Ingest API against the real daemon: validation, idempotency, routing,
//! auth, policy, limits, and the metrics each scenario leaves behind.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const BASE: &str = r#"
[server]
max_body_bytes = 4096
max_batch_size = 5
[journal]
path = "{dir}/journal.db"
[delivery]
workers = 4
initial_backoff = "50ms"
max_backoff = "1s"
[queues.failures]
backend = "file"
path = "{dir}/failures.jsonl"
[streams.results]
backend = "file"
path = "{dir}/results.jsonl"
[topics.alerts]
backend = "file"
path = "{dir}/alerts.jsonl"
[routes.default]
success = { kind = "STREAM", streamId = "results" }
failure = { kind = "QUEUE", queueId = "failures", channelId = "ch" }
[routes.functions."ocid1.fnfunc.oc1..quiet"]
success = { kind = "NONE" }
[routes.applications."ocid1.fnapp.oc1..loud"]
failure = { kind = "NOTIFICATION", topicId = "alerts" }
"#;

#[tokio::test]
async fn every_bad_field_gets_400_naming_it() {
    let d = start(BASE).await;
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            json!({"functionId": "f", "applicationId": "a", "compartmentId": "c", "status": 200}),
            "fnCallId",
        ),
        (
            json!({"fnCallId": "x", "applicationId": "a", "compartmentId": "c", "status": 200}),
            "functionId",
        ),
        (
            json!({"fnCallId": "x", "functionId": "f", "compartmentId": "c", "status": 200}),
            "applicationId",
        ),
        (
            json!({"fnCallId": "x", "functionId": "f", "applicationId": "a", "status": 200}),
            "compartmentId",
        ),
        (
            json!({"fnCallId": "x", "functionId": "f", "applicationId": "a", "compartmentId": "c"}),
            "status",
        ),
        (
            json!({"fnCallId": "x", "functionId": "f", "applicationId": "a", "compartmentId": "c", "status": 99}),
            "status",
        ),
        (
            json!({"fnCallId": "x", "functionId": "f", "applicationId": "a", "compartmentId": "c", "status": "2x0"}),
            "status",
        ),
        (
            json!({"fnCallId": "x", "functionId": "f", "applicationId": "a", "compartmentId": "c", "status": 200, "timestamp": "11/08/2024"}),
            "timestamp",
        ),
        (
            json!({"fnCallId": "x", "functionId": "f", "applicationId": "a", "compartmentId": "c", "status": 200, "errorCode": 5}),
            "errorCode",
        ),
        (
            json!({"fnCallId": "x", "functionId": "f", "applicationId": "a", "compartmentId": "c", "status": 200,
                "destinations": {"success": {"kind": "BUCKET"}}}),
            "destinations.success.kind",
        ),
        (
            json!({"fnCallId": "x", "functionId": "f", "applicationId": "a", "compartmentId": "c", "status": 500,
                "destinations": {"failure": {"kind": "QUEUE"}}}),
            "destinations.failure.queueId",
        ),
        (
            json!({"fnCallId": "x", "functionId": "f", "applicationId": "a", "compartmentId": "c", "status": 500,
                "destinations": {"failure": {"kind": "STREAM", "streamId": "nope"}}}),
            "destinations.failure.streamId",
        ),
        (
            json!({"fnCallId": "x", "functionId": "f", "applicationId": "a", "compartmentId": "c", "status": 200, "colour": "red"}),
            "colour",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = d.post(&body).await;
        assert_eq!(status, 400, "{body}");
        let fields: Vec<&str> = answer["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, [field], "{body} -> {answer}");
        assert!(answer["message"].as_str().unwrap().contains(field));
    }
    let (status, answer) = d
        .post(&json!({"fnCallId": "x", "functionId": "f", "applicationId": "a", "compartmentId": "c", "status": 200,
                      "destinations": {"success": {"kind": "STREAM", "streamId": "nope"}}}))
        .await;
    assert_eq!(status, 400);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("streamId `nope` is not defined"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_batch_with_one_bad_event_journals_nothing() {
    let d = start(BASE).await;
    let bad = json!({"completions": [event("b1", 200), event("b2", 502), {"fnCallId": "b3", "status": 200}]});
    let (status, answer) = d.post(&bad).await;
    assert_eq!(status, 400);
    let fields: Vec<&str> = answer["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "completions[2].functionId",
            "completions[2].applicationId",
            "completions[2].compartmentId"
        ]
    );
    // Too many events in one batch is also rejected whole.
    let six: Vec<_> = (0..6).map(|i| event(&format!("s{i}"), 200)).collect();
    let (status, answer) = d.post(&json!({ "completions": six })).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("server.max_batch_size")
    );

    // A good event afterwards is delivered, and only it.
    let (status, _) = d.post(&event("b4", 200)).await;
    assert_eq!(status, 202);
    wait_until("b4 delivered", Duration::from_secs(10), || async {
        d.lines("results.jsonl").len() == 1
    })
    .await;
    let text = d.metrics().await;
    assert_eq!(metric(&text, "fnrelay_events_accepted_total"), 1.0);
    assert!(d.lines("failures.jsonl").is_empty());
    assert_eq!(
        d.lines("results.jsonl")[0]["data"]["request"]["fnCallId"],
        "b4"
    );
}

#[tokio::test]
async fn reposting_a_fn_call_id_returns_the_same_id_and_delivers_once() {
    let d = start(BASE).await;
    let (s1, a1) = d.post(&event("dup-1", 200)).await;
    assert_eq!(s1, 202);
    let id = a1["records"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 26, "a ULID");
    wait_until("delivered", Duration::from_secs(10), || async {
        d.lines("results.jsonl").len() == 1
    })
    .await;
    // Again alone, and again inside a batch, after delivery.
    let (s2, a2) = d.post(&event("dup-1", 200)).await;
    let (s3, a3) = d
        .post(&json!({"completions": [event("dup-2", 200), event("dup-1", 200)]}))
        .await;
    assert_eq!((s2, s3), (202, 202));
    assert_eq!(a2["records"][0]["id"], id.as_str());
    assert_eq!(a3["records"][1], json!({"fnCallId": "dup-1", "id": id}));
    assert_eq!(a3["accepted"], 2);
    d.wait_metric(
        &deliveries("Success", "", "Success", "STREAM", "results"),
        2.0,
    )
    .await;
    let lines = d.lines("results.jsonl");
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids.iter().filter(|i| **i == id).count(),
        1,
        "delivered once: {ids:?}"
    );
    let text = d.metrics().await;
    assert_eq!(metric(&text, "fnrelay_events_accepted_total"), 2.0);
    assert_eq!(metric(&text, "fnrelay_events_duplicate_total"), 2.0);
}

#[tokio::test]
async fn status_routes_to_success_or_failure_and_none_is_skipped() {
    let d = start(BASE).await;
    let mut quiet = event("r-quiet", 200);
    quiet["functionId"] = json!("ocid1.fnfunc.oc1..quiet");
    let mut loud = event("r-loud", 504);
    loud["applicationId"] = json!("ocid1.fnapp.oc1..loud");
    let mut inline = event("r-inline", 200);
    inline["destinations"] = json!({"success": {"kind": "NOTIFICATION", "topicId": "alerts"}});
    let mut inline_none = event("r-inline-none", 500);
    inline_none["destinations"] = json!({"failure": {"kind": "NONE"}});
    let mut string_status = event("r-str", 201);
    string_status["status"] = json!("201");
    let (status, answer) = d
        .post(&json!({"completions": [event("r-ok", 200), event("r-fail", 502), quiet, loud, inline]}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let (status, _) = d.post(&inline_none).await;
    assert_eq!(status, 202);
    let (status, _) = d.post(&string_status).await;
    assert_eq!(status, 202);

    d.wait_metric(
        &deliveries("Success", "", "Success", "STREAM", "results"),
        2.0,
    )
    .await;
    d.wait_metric(
        &deliveries("Success", "", "Failure", "QUEUE", "failures"),
        1.0,
    )
    .await;
    d.wait_metric(
        &deliveries("Success", "", "Failure", "NOTIFICATION", "alerts"),
        1.0,
    )
    .await;
    d.wait_metric(
        &deliveries("Success", "", "Success", "NOTIFICATION", "alerts"),
        1.0,
    )
    .await;
    let text = d.metrics().await;
    assert_eq!(
        metric(
            &text,
            "fnrelay_records_skipped_total{destination_type=\"Success\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "fnrelay_records_skipped_total{destination_type=\"Failure\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "fnrelay_events_accepted_total"), 7.0);
    assert!(
        !text.contains("response_type=\"Error\""),
        "no error counted: {text}"
    );

    let results = d.lines("results.jsonl");
    let mut calls: Vec<&str> = results
        .iter()
        .map(|r| r["data"]["request"]["fnCallId"].as_str().unwrap())
        .collect();
    calls.sort();
    assert_eq!(calls, ["r-ok", "r-str"]);
    let str_record = results
        .iter()
        .find(|r| r["data"]["request"]["fnCallId"] == "r-str")
        .unwrap();
    assert_eq!(str_record["data"]["response"]["status"], "201");
    let failures = d.lines("failures.jsonl");
    assert_eq!(failures.len(), 1);
    let f = &failures[0];
    assert_eq!(f["version"], "1.0");
    assert_eq!(f["data"]["response"]["status"], "502");
    assert_eq!(
        f["data"]["response"]["errorCode"],
        "FunctionInvokeExecutionFailed"
    );
    assert_eq!(f["data"]["request"]["opcRequestId"], "req-r-fail");
    assert_eq!(f["id"], answer["records"][1]["id"]);
    let alerts = d.lines("alerts.jsonl");
    let mut calls: Vec<&str> = alerts
        .iter()
        .map(|r| r["data"]["request"]["fnCallId"].as_str().unwrap())
        .collect();
    calls.sort();
    assert_eq!(calls, ["r-inline", "r-loud"]);
}

#[tokio::test]
async fn auth_policy_size_and_content_type_answers() {
    let config = format!(
        "{BASE}\n[[policy.allow]]\ncompartment = \"ocid1.compartment.oc1..c\"\nresources = [\"streams.results\", \"queues.failures\"]\n"
    )
    .replace("[server]\n", "[server]\nauth_token = \"s3cret\"\n");
    let d = start(&config).await;
    let url = format!("{}/v1/completions", d.url);
    let body = event("auth-1", 200).to_string();

    let r = d
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = d
        .http
        .post(&url)
        .bearer_auth("wrong")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = d
        .http
        .get(format!("{}/v1/dead-letters", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "admin API needs the token too");

    let r = d
        .http
        .post(&url)
        .bearer_auth("s3cret")
        .header("content-type", "text/plain")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);

    let big =
        json!({"completions": [event(&"x".repeat(200), 500)], "pad": "y".repeat(5000)}).to_string();
    let r = d
        .http
        .post(&url)
        .bearer_auth("s3cret")
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let answer: serde_json::Value = r.json().await.unwrap();
    assert!(answer["message"].as_str().unwrap().contains("4096"));

    let mut other = event("auth-2", 200);
    other["compartmentId"] = json!("ocid1.compartment.oc1..other");
    let r = d
        .http
        .post(&url)
        .bearer_auth("s3cret")
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let answer: serde_json::Value = r.json().await.unwrap();
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("streams.results"),
        "{answer}"
    );

    // Allowed compartment, but an inline destination outside its rule.
    let mut sneaky = event("auth-3", 200);
    sneaky["destinations"] = json!({"success": {"kind": "NOTIFICATION", "topicId": "alerts"}});
    let r = d
        .http
        .post(&url)
        .bearer_auth("s3cret")
        .json(&sneaky)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let r = d
        .http
        .post(&url)
        .bearer_auth("s3cret")
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    d.wait_metric(
        &deliveries("Success", "", "Success", "STREAM", "results"),
        1.0,
    )
    .await;
    assert_eq!(
        metric(&d.metrics().await, "fnrelay_events_accepted_total"),
        1.0
    );
}

#[tokio::test]
async fn over_the_high_water_mark_ingest_answers_503_with_retry_after() {
    // A webhook nobody answers keeps records pending.
    let port = free_port();
    let config = format!(
        r#"
[journal]
path = "{{dir}}/journal.db"
max_pending = 3
[delivery]
initial_backoff = "10s"
max_backoff = "10s"
[topics.hook]
backend = "webhook"
url = "http://127.0.0.1:{port}/hook"
allow_insecure_endpoint = true
allow_private_network = true
[routes.default]
success = {{ kind = "NOTIFICATION", topicId = "hook" }}
"#
    );
    let d = start(&config).await;
    let (s, _) = d
        .post(&json!({"completions": [event("h1", 200), event("h2", 200), event("h3", 200)]}))
        .await;
    assert_eq!(s, 202);
    let r = d
        .http
        .post(format!("{}/v1/completions", d.url))
        .json(&event("h4", 200))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    // Already accepted records are all still there.
    let text = d.metrics().await;
    assert_eq!(metric(&text, "fnrelay_pending_records"), 3.0);
}

#[tokio::test]
async fn a_conflicting_repost_gets_409_naming_what_differs_and_changes_nothing() {
    let d = start(BASE).await;
    let (code, first) = d.post(&event("conf-1", 500)).await;
    assert_eq!(code, 202);
    let id = first["records"][0]["id"].as_str().unwrap().to_string();

    // Other status and message: 409, naming both, and the known record id.
    let mut changed = event("conf-1", 200);
    changed["errorMessage"] = json!("it worked after all");
    let (code, answer) = d.post(&changed).await;
    assert_eq!(code, 409, "{answer}");
    let reason = answer["fields"][0]["reason"].as_str().unwrap();
    assert_eq!(answer["fields"][0]["field"], "fnCallId");
    assert!(
        reason.contains("status") && reason.contains("errorMessage"),
        "{reason}"
    );
    assert!(reason.contains(&id), "{reason}");

    // In a batch: nothing of the batch is journaled.
    let (code, answer) = d
        .post(&json!({"completions": [event("conf-new", 200), changed]}))
        .await;
    assert_eq!(code, 409, "{answer}");
    assert_eq!(answer["fields"][0]["field"], "completions[1].fnCallId");
    // The same content again is an ordinary re-post.
    let (code, again) = d.post(&event("conf-1", 500)).await;
    assert_eq!(code, 202);
    assert_eq!(again["records"][0]["id"], id.as_str());
    let text = d.metrics().await;
    assert_eq!(metric(&text, "fnrelay_events_accepted_total"), 1.0);
    d.wait_metric(
        &deliveries("Success", "", "Failure", "QUEUE", "failures"),
        1.0,
    )
    .await;
    let lines = d.lines("failures.jsonl");
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["data"]["response"]["status"], "500");
}

#[tokio::test]
async fn duplicate_keys_control_characters_and_padded_ids_get_400() {
    let d = start(BASE).await;
    let url = format!("{}/v1/completions", d.url);
    let post = |body: String| {
        let (http, url) = (d.http.clone(), url.clone());
        async move {
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let (code, answer) = post(
        r#"{"fnCallId":"k1","functionId":"f","applicationId":"a","compartmentId":"c","status":200,"status":500}"#
            .into(),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(answer["fields"][0]["field"], "status");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("duplicate key `status`")
    );

    let mut forged = event("k2\nINFO fnrelay: forged line", 200);
    forged["functionId"] = json!(" f");
    let (code, answer) = d.post(&forged).await;
    assert_eq!(code, 400, "{answer}");
    let fields: Vec<&str> = answer["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["fnCallId", "functionId", "opcRequestId"]);
    let (code, _) = d.post(&event("   ", 200)).await;
    assert_eq!(code, 400);
    let text = d.metrics().await;
    assert_eq!(metric(&text, "fnrelay_events_accepted_total"), 0.0);
}

//! Named tokens with scopes (SPEC section 12), against every endpoint: a
//! table of token x endpoint -> allowed, 401 or 403.

mod common;

use common::*;

/// (name, scopes or None for the legacy all-scopes token)
const TOKENS: &[(&str, Option<&[&str]>)] = &[
    ("legacy", None),
    ("runtime", Some(&["ingest"])),
    ("sre", Some(&["admin", "metrics"])),
    ("team", Some(&["destinations"])),
];

/// (method, path, body, scope it needs; None = open)
const ENDPOINTS: &[(&str, &str, &str, Option<&str>)] = &[
    ("POST", "/v1/completions", "event", Some("ingest")),
    ("POST", "/v1/invocations", "started", Some("ingest")),
    (
        "GET",
        "/v1/records?fnCallId=tok-legacy-0",
        "",
        Some("admin"),
    ),
    ("GET", "/v1/dead-letters", "", Some("admin")),
    ("GET", "/v1/functions", "", Some("destinations")),
    (
        "GET",
        "/v1/functions/f/destinations",
        "",
        Some("destinations"),
    ),
    (
        "POST",
        "/v1/dead-letters/replay",
        r#"{"all": true}"#,
        Some("admin"),
    ),
    ("POST", "/v1/admin/reload", "", Some("admin")),
    (
        "PUT",
        "/v1/functions/f/destinations",
        r#"{"compartmentId": "c", "success": {"kind": "NONE"}}"#,
        Some("destinations"),
    ),
    (
        "DELETE",
        "/v1/functions/f/destinations",
        "",
        Some("destinations"),
    ),
    ("GET", "/v1/records/01NOSUCHRECORD", "", Some("admin")),
    ("GET", "/openapi.json", "", None),
    ("GET", "/metrics", "", Some("metrics")),
    ("GET", "/healthz", "", None),
    ("GET", "/readyz", "", None),
];

/// A caller: its name, its secret (if it sends one) and its scopes (`None`:
/// every scope).
type Caller = (String, Option<String>, Option<Vec<&'static str>>);

#[tokio::test]
async fn each_token_reaches_exactly_the_endpoints_of_its_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let mut toml = String::from(
        r#"
[server]
auth_token_file = "{dir}/legacy.token"
[journal]
path = "{dir}/journal.db"
[streams.results]
backend = "file"
path = "{dir}/results.jsonl"
[routes.default]
success = { kind = "STREAM", streamId = "results" }
"#,
    );
    std::fs::write(dir.path().join("legacy.token"), "secret-legacy\n").unwrap();
    for (name, scopes) in TOKENS.iter().skip(1) {
        std::fs::write(
            dir.path().join(format!("{name}.token")),
            format!("secret-{name}\n"),
        )
        .unwrap();
        let scopes: Vec<String> = scopes.unwrap().iter().map(|s| format!("\"{s}\"")).collect();
        toml.push_str(&format!(
            "[[server.tokens]]\nname = \"{name}\"\nfile = \"{{dir}}/{name}.token\"\nscopes = [{}]\n",
            scopes.join(", ")
        ));
    }
    let d = start_in(&toml, dir).await;
    let mut callers: Vec<Caller> = TOKENS
        .iter()
        .map(|(name, scopes)| {
            (
                name.to_string(),
                Some(format!("secret-{name}")),
                scopes.map(|s| s.to_vec()),
            )
        })
        .collect();
    callers.push(("no token".into(), None, Some(vec![])));
    callers.push((
        "unknown token".into(),
        Some("secret-nobody".into()),
        Some(vec![]),
    ));
    let mut failures = Vec::new();
    for (caller, secret, scopes) in &callers {
        for (i, (method, path, body, needs)) in ENDPOINTS.iter().enumerate() {
            let url = format!("{}{path}", d.url);
            let mut request = match *method {
                "GET" => d.http.get(url),
                "PUT" => d.http.put(url),
                "DELETE" => d.http.delete(url),
                _ => d.http.post(url),
            };
            if let Some(secret) = secret {
                request = request.bearer_auth(secret);
            }
            let body = match *body {
                "event" => event(&format!("tok-{caller}-{i}"), 200).to_string(),
                "started" => serde_json::json!({
                    "fnCallId": format!("tok-started-{caller}-{i}"),
                    "functionId": "f",
                    "applicationId": "a",
                    "compartmentId": "c",
                    "deadline": (time::OffsetDateTime::now_utc() + std::time::Duration::from_secs(600))
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap(),
                })
                .to_string(),
                other => other.to_string(),
            };
            if !body.is_empty() {
                request = request
                    .header("content-type", "application/json")
                    .body(body);
            }
            let status = request.send().await.unwrap().status().as_u16();
            let known = secret.as_deref().is_some_and(|s| s != "secret-nobody");
            let expected: &[u16] = match (needs, scopes) {
                // The legacy token may do everything.
                // (A record lookup may find nothing: 404 is past auth.)
                (_, None) => &[200, 202, 204, 404, 422],
                (None, _) => &[200],
                // /metrics is open while no named token has `metrics`
                // (here `sre` has it, so it is protected).
                (Some(scope), Some(scopes)) if scopes.contains(scope) => &[200, 202, 204, 404, 422],
                (Some(_), _) if known => &[403],
                (Some(_), _) => &[401],
            };
            if !expected.contains(&status) {
                failures.push(format!(
                    "{caller} {method} {path}: got {status}, want one of {expected:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A 403 names the token and the scope, never the secret.
    let r = d
        .http
        .get(format!("{}/v1/dead-letters", d.url))
        .bearer_auth("secret-runtime")
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(
        text.contains("token `runtime` does not have the `admin` scope")
            && !text.contains("secret"),
        "{text}"
    );
    d.stop().await;
}

#[tokio::test]
async fn metrics_stay_open_until_a_token_has_the_metrics_scope() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("runtime.token"), "secret-runtime\n").unwrap();
    let d = start_in(
        r#"
[[server.tokens]]
name = "runtime"
file = "{dir}/runtime.token"
scopes = ["ingest"]
[journal]
path = "{dir}/journal.db"
"#,
        dir,
    )
    .await;
    let status = d
        .http
        .get(format!("{}/metrics", d.url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200, "Prometheus scrapes without a token");
    let status = d
        .http
        .get(format!("{}/v1/dead-letters", d.url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401);
    d.stop().await;
}

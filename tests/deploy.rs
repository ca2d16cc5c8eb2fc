//! What deploy/ ships, checked against the real tools and a running
//! daemon: the alert rules with `promtool test rules` (Debian's
//! `prometheus` package, installed by scripts/test.sh), every metric name the
//! alerts and the dashboard use against a live scrape, the systemd unit with
//! `systemd-analyze verify`, the sysusers file with `systemd-sysusers`, and
//! the Kubernetes examples' configurations.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn repo(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (scripts/test.sh installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn alert_rules_are_valid_and_pass_their_unit_tests() {
    let (ok, out) = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(repo("deploy/prometheus-alerts.yaml")));
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = run(Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(repo("deploy/prometheus-alerts.test.yaml")));
    assert!(ok, "promtool test rules:\n{out}");
}

/// Metric names (`fnrelay_...`, `function_detached_...`) in a file.
fn names_in(path: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo(path)).unwrap();
    let mut names = BTreeSet::new();
    for prefix in ["fnrelay_", "function_detached_"] {
        let mut rest = text.as_str();
        while let Some(at) = rest.find(prefix) {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            // Skip words that merely contain the prefix (e.g. a file name).
            let before = rest[..at].chars().last();
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '/') {
                names.insert(tail[..end].to_string());
            }
            rest = &tail[end..];
        }
    }
    names
}

/// Every sample name the daemon can export, from the `# TYPE` lines of a
/// scrape (a family is declared before its first sample).
fn exported(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

#[tokio::test]
async fn every_metric_the_alerts_and_dashboard_use_is_exported() {
    // Families appear with their first series: one delivered record, one
    // dead-lettered (the receiver refuses it), one refused reload.
    let rx = common::Receiver::start().await;
    rx.set_default(400);
    let d = common::start(&format!(
        r#"
[journal]
path = "{{dir}}/journal.db"
[streams.results]
backend = "file"
path = "{{dir}}/results.jsonl"
[topics.hook]
backend = "webhook"
url = "{}"
allow_insecure_endpoint = true
allow_private_network = true
[routes.default]
success = {{ kind = "STREAM", streamId = "results" }}
failure = {{ kind = "NOTIFICATION", topicId = "hook" }}
"#,
        rx.url()
    ))
    .await;
    common::post_many(&d, "ok", 1, 200).await;
    common::post_many(&d, "failed", 1, 500).await;
    let reload = d
        .http
        .post(format!("{}/v1/admin/reload", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 422, "a fixed configuration cannot reload");
    common::wait_until(
        "both outcomes counted",
        std::time::Duration::from_secs(10),
        || async {
            let text = d.metrics().await;
            common::metric_sum(&text, "function_detached_deliveries_total") == 2.0
        },
    )
    .await;
    let scrape = d.metrics().await;
    let have = exported(&scrape);
    for file in [
        "deploy/prometheus-alerts.yaml",
        "deploy/grafana-dashboard.json",
    ] {
        let used = names_in(file);
        assert!(used.len() >= 5, "{file}: found {used:?}");
        let missing: Vec<_> = used.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics the daemon does not export: {missing:?}\nexported: {have:?}"
        );
    }
    d.stop().await;
}

#[test]
fn the_systemd_unit_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: skipped");
        return;
    }
    // As shipped, with the binary where the install step puts it: here,
    // the one this test suite built.
    let unit = std::fs::read_to_string(repo("deploy/fnrelay.service")).unwrap();
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(unit.contains("Restart=always"));
    assert!(unit.contains("LimitNOFILE="));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fnrelay.service");
    let binary = common::binary();
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/fnrelay", binary.to_str().unwrap()),
    )
    .unwrap();
    let (ok, out) = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
}

#[test]
fn the_sysusers_file_creates_the_units_user() {
    if Command::new("systemd-sysusers")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-sysusers is not installed: skipped");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let (ok, out) = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo("deploy/fnrelay.sysusers")));
    assert!(ok, "systemd-sysusers:\n{out}");
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("fnrelay:")),
        "{passwd}"
    );
    assert!(group.lines().any(|l| l.starts_with("fnrelay:")), "{group}");
    let unit = std::fs::read_to_string(repo("deploy/fnrelay.service")).unwrap();
    assert!(unit.contains("User=fnrelay") && unit.contains("Group=fnrelay"));
}

/// The `fnrelay.toml: |` blocks of a Kubernetes manifest.
fn embedded_configs(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut configs = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() != "fnrelay.toml: |" {
            continue;
        }
        let indent = line.len() - line.trim_start().len() + 2;
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            if !next.trim().is_empty() && next.len() - next.trim_start().len() < indent {
                break;
            }
            block.push_str(next.get(indent..).unwrap_or(""));
            block.push('\n');
            lines.next();
        }
        configs.push(block);
    }
    configs
}

#[test]
fn the_kubernetes_examples_route_both_sides_and_never_run_two_writers() {
    for file in [
        "deploy/kubernetes-sidecar.yaml",
        "deploy/kubernetes-replicas.yaml",
    ] {
        let configs = embedded_configs(Path::new(&repo(file)));
        assert_eq!(configs.len(), 1, "{file}");
        let config = fnrelay::config::load_with_env(
            fnrelay::config::Source::Text(&configs[0]),
            Some(Default::default()),
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        let route = &config.routes.default;
        for (side, dest) in [("success", &route.success), ("failure", &route.failure)] {
            let dest = dest
                .as_ref()
                .unwrap_or_else(|| panic!("{file}: routes.default.{side} is missing"));
            let (kind, id) = dest
                .target()
                .unwrap_or_else(|| panic!("{file}: routes.default.{side} is NONE"));
            assert!(
                config.resources(kind).contains_key(id),
                "{file}: routes.default.{side} names {id}, which is not defined"
            );
        }
    }
    let sidecar = std::fs::read_to_string(repo("deploy/kubernetes-sidecar.yaml")).unwrap();
    assert!(
        sidecar.contains("type: Recreate"),
        "the single-writer journal needs strategy Recreate"
    );
}

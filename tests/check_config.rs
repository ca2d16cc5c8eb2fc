//! `fnrelay check-config` as an operator runs it: every problem in one run
//! (parse and type errors with their key and source, then invalid values),
//! what it read and the configuration's hash, the journal checked without
//! being changed, and no side effect without `--declare`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn check_config(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(binary());
    cmd.current_dir(dir).arg("check-config").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // The test runner's own FNRELAY__ variables must not leak in.
    for (k, _) in std::env::vars() {
        if k.starts_with("FNRELAY__") && !env.iter().any(|(e, _)| *e == k) {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Every file under `dir`, relative.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

#[test]
fn every_problem_is_reported_in_one_run_with_its_key_and_source() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        r#"
[server]
listen = "not-an-address"
max_body_bytes = "lots"
colour = "blue"
[delivery]
workers = 0
max_attempts = "ten"
[streams.results]
backend = "carrier-pigeon"
[queues.failures]
backend = "file"
path = "data/failures.jsonl"
[routes.default]
failure = { kind = "QUEUE", queueId = "failures" }
success = { kind = "STREAM", streamId = "elsewhere" }
"#,
    )
    .unwrap();
    let (ok, _, err) = check_config(
        dir.path(),
        &["--config", "c.toml"],
        &[("FNRELAY__DELIVERY__INITIAL_BACKOFF", "soon")],
    );
    assert!(!ok);
    for (key, source) in [
        ("server.max_body_bytes", "(from file c.toml)"),
        ("server.colour", "(from file c.toml)"),
        ("delivery.max_attempts", "(from file c.toml)"),
        ("streams.results", "(from file c.toml)"),
        (
            "delivery.initial_backoff",
            "(from FNRELAY__DELIVERY__INITIAL_BACKOFF)",
        ),
    ] {
        let line = err
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("- {key}:")))
            .unwrap_or_else(|| panic!("{key} is reported:\n{err}"));
        assert!(line.contains(source), "{line}");
    }
    // Values that parsed are still validated in the same run.
    for key in [
        "server.listen",
        "delivery.workers",
        "routes.default.success",
    ] {
        assert!(err.contains(&format!("- {key}:")), "{key}:\n{err}");
    }
    assert!(err.contains("invalid configuration: 8 problem(s)"), "{err}");
    assert!(files(dir.path()) == ["c.toml"], "nothing created");
}

#[test]
fn a_good_file_says_what_was_read_and_its_hash_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
[journal]
path = "state/journal.db"
[queues.failures]
backend = "file"
path = "out/failures.jsonl"
[routes.default]
failure = { kind = "QUEUE", queueId = "failures" }
"#;
    std::fs::write(dir.path().join("c.toml"), text).unwrap();
    let (ok, out, err) = check_config(
        dir.path(),
        &["--config", "c.toml"],
        &[("FNRELAY__DELIVERY__WORKERS", "7")],
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("read: file c.toml; environment: FNRELAY__DELIVERY__WORKERS"),
        "{out}"
    );
    assert!(
        out.contains("journal: state/journal.db does not exist yet"),
        "{out}"
    );
    assert!(out.contains("configuration OK (hash "), "{out}");
    assert_eq!(files(dir.path()), ["c.toml"], "nothing created");
    // Without overrides the hash is the start of the file's SHA-256.
    let (ok, out, _) = check_config(dir.path(), &["--config", "c.toml"], &[]);
    assert!(ok);
    let sha = Command::new("sha256sum")
        .arg(dir.path().join("c.toml"))
        .output()
        .unwrap();
    let sha = String::from_utf8_lossy(&sha.stdout)[..16].to_string();
    assert!(out.contains(&format!("(hash {sha})")), "{out} vs {sha}");
    // --declare creates the file destination.
    let (ok, out, err) = check_config(dir.path(), &["--config", "c.toml", "--declare"], &[]);
    assert!(ok, "{out}{err}");
    assert!(dir.path().join("out/failures.jsonl").exists());
    assert!(
        !dir.path().join("state").exists(),
        "the journal is never created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_is_checked_without_being_changed() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
[journal]
path = "data/journal.db"
[queues.failures]
backend = "file"
path = "data/failures.jsonl"
[routes.default]
failure = { kind = "QUEUE", queueId = "failures" }
"#;
    std::fs::write(dir.path().join("c.toml"), config).unwrap();
    // A running daemon's journal: readable, in use, fine (a check before a
    // reload).
    let p = process::spawn(dir.path(), config, free_port()).await;
    post_many_to(&p.url, "cc", 3, 500).await;
    let journal = dir.path().join("data/journal.db");
    let before = std::fs::read(&journal).unwrap();
    let (ok, out, err) = check_config(dir.path(), &["--config", "c.toml"], &[]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("data/journal.db: a fnrelay journal, open in a running fnrelay"),
        "{out}"
    );
    process::stop(p).await;
    let after_stop = std::fs::read(&journal).unwrap();
    let (ok, out, err) = check_config(dir.path(), &["--config", "c.toml"], &[]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        after_stop,
        "check-config does not write the journal"
    );
    assert!(!before.is_empty());

    // Not a journal, and a journal directory that cannot be written.
    std::fs::write(dir.path().join("other.db"), b"plain text").unwrap();
    let (ok, _, err) = check_config(
        dir.path(),
        &["--config", "c.toml"],
        &[("FNRELAY__JOURNAL__PATH", "other.db")],
    );
    assert!(!ok);
    assert!(
        err.contains("journal.path: other.db is not a SQLite database"),
        "{err}"
    );
    let locked = dir.path().join("ro");
    std::fs::create_dir(&locked).unwrap();
    let mut perms = std::fs::metadata(&locked).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&locked, perms).unwrap();
    let (ok, _, err) = check_config(
        dir.path(),
        &["--config", "c.toml"],
        &[("FNRELAY__JOURNAL__PATH", "ro/journal.db")],
    );
    assert!(!ok);
    assert!(err.contains("journal.path: ro is read-only"), "{err}");
}

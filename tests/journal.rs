//! The journal contract, one suite run against both backends: SQLite and
//! the real PostgreSQL on 127.0.0.1:5432 (a database of each test's own).
//! Time is passed in, so leases and retries run on a made-up clock.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::pg::TestDb;
use fnrelay::error::ErrorLabel;
use fnrelay::journal::{
    Appended, AttemptNote, Conflict, Journal, JournalError, Lane, Lookup, NewRecord, Outcome,
    PgJournal, SqliteJournal, Target, Watch, Watched, now_ms,
};
use fnrelay::record::{DestKind, DestinationType};
use tokio::sync::Notify;

/// One journal under test, and what to clean up after it.
struct Store {
    journal: Arc<dyn Journal>,
    name: &'static str,
    db: Option<TestDb>,
    _dir: Option<tempfile::TempDir>,
}

impl Store {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let journal = SqliteJournal::open(&dir.path().join("j.db"), 64).unwrap();
        Self {
            journal: Arc::new(journal),
            name: "sqlite",
            db: None,
            _dir: Some(dir),
        }
    }

    async fn postgres() -> Self {
        let db = TestDb::create().await;
        let journal = PgJournal::open(&db.journal(), Arc::new(Notify::new()))
            .await
            .unwrap();
        Self {
            journal: Arc::new(journal),
            name: "postgres",
            db: Some(db),
            _dir: None,
        }
    }

    async fn done(self) {
        drop(self.journal);
        if let Some(db) = self.db {
            db.drop_db().await;
        }
    }
}

/// Runs `scenario` against SQLite, then PostgreSQL.
macro_rules! both {
    ($name:ident, $scenario:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            for store in [Store::sqlite().await, Store::postgres().await] {
                eprintln!("{}: {}", stringify!($name), store.name);
                $scenario(store.journal.as_ref()).await;
                store.done().await;
            }
        }
    };
}

fn record(id: &str, call: &str, at: i64, digest: u8) -> NewRecord {
    NewRecord {
        id: id.into(),
        fn_call_id: call.into(),
        function_id: "f".into(),
        destination_type: DestinationType::Failure,
        target: Some(Target {
            kind: DestKind::Queue,
            resource_id: "q".into(),
            channel_id: Some("c".into()),
        }),
        body: format!(r#"{{"id":"{id}"}}"#),
        accepted_at_ms: at,
        digest: vec![digest; 72],
    }
}

fn lane() -> Lane {
    Lane {
        kind: DestKind::Queue,
        resource_id: "q".into(),
    }
}

const LEASE: Duration = Duration::from_secs(60);

async fn idempotency_and_conflicts(j: &dyn Journal) {
    let got = j
        .append(vec![
            record("A", "c1", 1_000, 1),
            record("B", "c1", 1_000, 1),
            NewRecord {
                target: None,
                ..record("C", "c2", 1_000, 1)
            },
        ])
        .await
        .unwrap();
    let expect = |id: &str, existing| Appended {
        id: id.into(),
        existing,
    };
    assert_eq!(
        got,
        [expect("A", false), expect("A", true), expect("C", false)]
    );
    assert_eq!(j.pending(), 1, "a skipped record is not pending");
    // A re-post with other content: 409 material, and nothing of its
    // request is written.
    let mut other = vec![1u8; 72];
    other[4 * 8] = 2;
    match j
        .append(vec![
            record("D", "c3", 1_000, 1),
            NewRecord {
                digest: other,
                ..record("E", "c1", 1_000, 1)
            },
        ])
        .await
    {
        Err(JournalError::Conflict(c)) => assert_eq!(
            c,
            [Conflict {
                index: 1,
                fn_call_id: "c1".into(),
                existing_id: "A".into(),
                fields: vec!["status"],
            }]
        ),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let again = j.append(vec![record("F", "c3", 1_000, 1)]).await.unwrap();
    assert_eq!(
        again,
        [expect("F", false)],
        "c3 of the refused request was not kept"
    );
    j.resync().await.unwrap();
    assert_eq!(j.pending(), 2);
    assert_eq!(j.stats().await.unwrap().pending, 2);
}

async fn leases_and_fencing(j: &dyn Journal) {
    j.append(vec![
        record("A", "c1", 1_000, 1),
        record("B", "c2", 1_000, 1),
    ])
    .await
    .unwrap();
    let first = j.claim(&lane(), 2_000, 10, LEASE).await.unwrap();
    assert_eq!(first.len(), 2);
    assert!(
        j.claim(&lane(), 3_000, 10, LEASE).await.unwrap().is_empty(),
        "leased records are not claimed again"
    );
    // The lease runs out: another claim takes them, with a new token.
    let later = 2_000 + LEASE.as_millis() as i64 + 1;
    let second = j.claim(&lane(), later, 10, LEASE).await.unwrap();
    assert_eq!(second.len(), 2);
    assert!(
        second
            .iter()
            .all(|s| first.iter().all(|f| f.token != s.token))
    );
    let delivered = |c: &fnrelay::journal::Claimed| Outcome::Delivered {
        id: c.id.clone(),
        token: c.token,
        attempts: 1,
    };
    // The first claim's outcomes are refused; the second's are written.
    let stale = j
        .complete(first.iter().map(delivered).collect())
        .await
        .unwrap();
    assert_eq!(stale, [false, false]);
    let fresh = j
        .complete(second.iter().map(delivered).collect())
        .await
        .unwrap();
    assert_eq!(fresh, [true, true]);
    assert_eq!(j.pending(), 0);
    assert!(
        j.claim(&lane(), later * 2, 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
}

fn note(outcome: &str, label: Option<&str>, at_ms: i64) -> AttemptNote {
    AttemptNote {
        at_ms,
        outcome: outcome.into(),
        error_message: label.map(str::to_string),
        error: label.map(|l| format!("{l}: the text")),
        duration_ms: Some(7),
    }
}

fn json(n: &AttemptNote) -> Option<String> {
    Some(serde_json::to_string(n).unwrap())
}

async fn lookups_show_state_destination_and_recent_attempts(j: &dyn Journal) {
    let mut skipped = record("S", "c3", 1_000, 1);
    skipped.target = None;
    j.append(vec![
        record("A", "c1", 1_000, 1),
        record("B", "c2", 1_000, 1),
        skipped,
    ])
    .await
    .unwrap();
    let claimed = j.claim(&lane(), 1_000, 10, LEASE).await.unwrap();
    let (a, b) = (&claimed[0], &claimed[1]);
    let (retry, dead) = (
        note("retry", Some("server_error"), 2_000),
        note("dead", Some("rejected"), 2_000),
    );
    j.complete_noted(
        vec![
            Outcome::Retry {
                id: a.id.clone(),
                token: a.token,
                attempts: 1,
                next_attempt_at_ms: 50_000,
                error: "HTTP 503".into(),
            },
            Outcome::Dead {
                id: b.id.clone(),
                token: b.token,
                attempts: 1,
                error: "HTTP 400: bad".into(),
                label: ErrorLabel::Rejected,
            },
        ],
        vec![json(&retry), json(&dead)],
    )
    .await
    .unwrap();
    let b = j.lookup(Lookup::Id("B".into())).await.unwrap().unwrap();
    assert_eq!((b.state.as_str(), b.attempts), ("dead", 1));
    assert_eq!(b.error_label.as_deref(), Some("rejected"));
    assert_eq!(b.last_error.as_deref(), Some("HTTP 400: bad"));
    assert_eq!(b.recent, std::slice::from_ref(&dead));
    assert_eq!(b.fn_call_id, "c2");
    assert!(b.finished_at_ms.is_some());

    let a = j
        .lookup(Lookup::FnCallId("c1".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a.id.as_str(), a.state.as_str()), ("A", "pending"));
    assert_eq!(a.next_attempt_at_ms, Some(50_000));
    assert_eq!(a.recent, std::slice::from_ref(&retry));
    assert_eq!(
        a.target,
        Some(Target {
            kind: DestKind::Queue,
            resource_id: "q".into(),
            channel_id: Some("c".into()),
        })
    );
    assert_eq!(a.destination_type.as_deref(), Some("Failure"));

    // Claimed now (the real clock): in flight until its lease ends.
    let now = now_ms();
    let again = j.claim(&lane(), now, 10, LEASE).await.unwrap();
    assert_eq!(again.len(), 1);
    let a = j.lookup(Lookup::Id("A".into())).await.unwrap().unwrap();
    assert_eq!(a.state, "inflight");
    let success = note("success", None, now);
    j.complete_noted(
        vec![Outcome::Delivered {
            id: "A".into(),
            token: again[0].token,
            attempts: 2,
        }],
        vec![json(&success)],
    )
    .await
    .unwrap();
    let a = j.lookup(Lookup::Id("A".into())).await.unwrap().unwrap();
    assert_eq!((a.state.as_str(), a.attempts), ("delivered", 2));
    assert_eq!(a.recent, [retry, success], "oldest first");
    assert_eq!(a.function_id, "f");
    assert_eq!(a.target.unwrap().resource_id, "q");
    assert!(a.finished_at_ms.is_some());
    assert_eq!(a.next_attempt_at_ms, None);

    let s = j.lookup(Lookup::Id("S".into())).await.unwrap().unwrap();
    assert_eq!((s.state.as_str(), s.target), ("skipped", None));
    assert!(j.lookup(Lookup::Id("nope".into())).await.unwrap().is_none());
    assert!(
        j.lookup(Lookup::FnCallId("nope".into()))
            .await
            .unwrap()
            .is_none()
    );
}

fn watch(call: &str, deadline_ms: i64) -> Watch {
    Watch {
        fn_call_id: call.into(),
        function_id: "f".into(),
        application_id: "a".into(),
        compartment_id: "c".into(),
        opc_request_id: None,
        deadline_ms,
    }
}

async fn watches_fire_once_and_know_completed_calls(j: &dyn Journal) {
    assert_eq!(
        j.watch(watch("w1", 5_000)).await.unwrap(),
        Watched::Watching
    );
    assert_eq!(
        j.watch(watch("w2", 9_000)).await.unwrap(),
        Watched::Watching
    );
    j.append(vec![record("R", "done-call", 1_000, 1)])
        .await
        .unwrap();
    assert_eq!(
        j.watch(watch("done-call", 5_000)).await.unwrap(),
        Watched::Completed { id: "R".into() },
        "the record exists: nothing to wait for"
    );
    assert!(j.due_watches(4_999, 10, LEASE).await.unwrap().is_empty());
    let due = j.due_watches(6_000, 10, LEASE).await.unwrap();
    assert_eq!(due, [watch("w1", 5_000)]);
    // Registering again moves the deadline.
    assert_eq!(
        j.watch(watch("w2", 20_000)).await.unwrap(),
        Watched::Watching
    );
    assert!(
        j.due_watches(10_000, 10, LEASE)
            .await
            .unwrap()
            .iter()
            .all(|w| w.fn_call_id != "w2")
    );
    j.unwatch(vec!["w1".into()]).await.unwrap();
    assert!(
        j.due_watches(70_000, 10, LEASE)
            .await
            .unwrap()
            .iter()
            .all(|w| w.fn_call_id != "w1")
    );
    let later = j.due_watches(200_000, 10, LEASE).await.unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].fn_call_id, "w2");
}

async fn retries_dead_letters_and_replay(j: &dyn Journal) {
    j.append(vec![
        record("A", "c1", 1_000, 1),
        record("B", "c2", 1_000, 1),
    ])
    .await
    .unwrap();
    let claimed = j.claim(&lane(), 1_000, 10, LEASE).await.unwrap();
    let (a, b) = (&claimed[0], &claimed[1]);
    let applied = j
        .complete(vec![
            Outcome::Retry {
                id: a.id.clone(),
                token: a.token,
                attempts: 1,
                next_attempt_at_ms: 50_000,
                error: "HTTP 503".into(),
            },
            Outcome::Dead {
                id: b.id.clone(),
                token: b.token,
                attempts: 1,
                error: "HTTP 400: bad".into(),
                label: ErrorLabel::Rejected,
            },
        ])
        .await
        .unwrap();
    assert_eq!(applied, [true, true]);
    assert!(
        j.claim(&lane(), 10_000, 10, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );
    assert_eq!(j.next_due(&lane()).await.unwrap(), Some(50_000));
    let due = j.claim(&lane(), 50_000, 10, LEASE).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].id.as_str(), due[0].attempts), ("A", 1));

    let dead = j.list_dead(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, "B");
    assert_eq!(dead[0].error_message, "rejected");
    assert_eq!(dead[0].last_error, "HTTP 400: bad");
    assert_eq!(dead[0].record["id"], "B");
    let stats = j.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (1, 1));

    assert_eq!(j.replay_dead(None, 60_000).await.unwrap(), 1);
    assert!(j.list_dead(None, 10).await.unwrap().is_empty());
    let replayed = j.claim(&lane(), 60_000, 10, LEASE).await.unwrap();
    assert_eq!(replayed.len(), 1);
    assert_eq!((replayed[0].id.as_str(), replayed[0].attempts), ("B", 0));
    assert_eq!(
        replayed[0].age_from_ms, 60_000,
        "the age window starts again"
    );
    assert_eq!(j.pending_lanes().await.unwrap(), [lane()]);
}

async fn pruning_ends_idempotency_after_retention(j: &dyn Journal) {
    j.append(vec![record("A", "c1", 1_000, 1)]).await.unwrap();
    let c = j.claim(&lane(), 1_000, 10, LEASE).await.unwrap();
    j.complete(vec![Outcome::Delivered {
        id: c[0].id.clone(),
        token: c[0].token,
        attempts: 1,
    }])
    .await
    .unwrap();
    // Kept for the retention: a re-post is still the same record.
    assert_eq!(j.prune(0).await.unwrap(), 0);
    let again = j.append(vec![record("B", "c1", 2_000, 1)]).await.unwrap();
    assert_eq!(again[0].id, "A");
    // Past it, the mapping is gone.
    assert_eq!(j.prune(i64::MAX).await.unwrap(), 1);
    let after = j.append(vec![record("C", "c1", 3_000, 1)]).await.unwrap();
    assert_eq!(after[0].id, "C");
}

async fn expired_records_are_claimed_due_or_not(j: &dyn Journal) {
    j.append(vec![record("A", "c1", 1_000, 1)]).await.unwrap();
    let c = j.claim(&lane(), 1_000, 10, LEASE).await.unwrap();
    j.complete(vec![Outcome::Retry {
        id: c[0].id.clone(),
        token: c[0].token,
        attempts: 1,
        next_attempt_at_ms: i64::MAX / 2,
        error: "x".into(),
    }])
    .await
    .unwrap();
    let expired = j.claim_expired(&lane(), 5_000, 10, LEASE).await.unwrap();
    assert_eq!(expired.len(), 1, "not due, but past its age");
    assert!(
        j.claim_expired(&lane(), 5_000, 10, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "leased"
    );
}

both!(lookups, lookups_show_state_destination_and_recent_attempts);
both!(watches, watches_fire_once_and_know_completed_calls);
both!(idempotency_and_conflicts_on_both, idempotency_and_conflicts);
both!(leases_and_fencing_on_both, leases_and_fencing);
both!(
    retries_dead_letters_and_replay_on_both,
    retries_dead_letters_and_replay
);
both!(pruning_on_both, pruning_ends_idempotency_after_retention);
both!(
    expired_records_on_both,
    expired_records_are_claimed_due_or_not
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_database() {
    let db = TestDb::create().await;
    let a = PgJournal::open(&db.journal(), Arc::new(Notify::new()))
        .await
        .unwrap();
    let wake_b = Arc::new(Notify::new());
    let b = PgJournal::open(&db.journal(), wake_b.clone())
        .await
        .unwrap();

    // The same event posted to both at once: one record id for both.
    for i in 0..50 {
        let call = format!("same-{i}");
        let (ra, rb) = tokio::join!(
            a.append(vec![record(&format!("A{i:02}"), &call, 1_000, 1)]),
            b.append(vec![record(&format!("B{i:02}"), &call, 1_000, 1)]),
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra[0].id, rb[0].id, "{call}: one record id");
        assert!(
            ra[0].existing != rb[0].existing,
            "{call}: exactly one is new"
        );
    }
    b.resync().await.unwrap();
    assert_eq!(b.pending(), 50);

    // A replica's commit wakes the other's lanes (LISTEN/NOTIFY).
    let woken = wake_b.notified();
    a.append(vec![record("N", "notify", 1_000, 1)])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), woken)
        .await
        .expect("the other replica is woken");

    // Claims never overlap: each record goes to one replica.
    let lane = lane();
    let (ca, cb) = tokio::join!(
        a.claim(&lane, 2_000, 30, LEASE),
        b.claim(&lane, 2_000, 30, LEASE)
    );
    let (ca, cb) = (ca.unwrap(), cb.unwrap());
    assert_eq!(ca.len() + cb.len(), 51);
    assert!(ca.iter().all(|x| cb.iter().all(|y| x.id != y.id)));
    drop((a, b));
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_this_build_is_refused() {
    let db = TestDb::create().await;
    fnrelay::journal::migrate(&db.journal()).await.unwrap();
    // Migrating twice is a no-op.
    assert_eq!(
        fnrelay::journal::migrate(&db.journal()).await.unwrap(),
        fnrelay::journal::SCHEMA_VERSION
    );
    db.client()
        .await
        .execute("INSERT INTO fnrelay_schema (version) VALUES (99)", &[])
        .await
        .unwrap();
    match PgJournal::open(&db.journal(), Arc::new(Notify::new())).await {
        Err(e @ JournalError::SchemaTooNew { found: 99, .. }) => {
            assert!(e.to_string().contains("newer than this fnrelay knows"));
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_from_schema_4_keeps_what_lookups_show_of_delivered_records() {
    let db = TestDb::create().await;
    // Schema 4 kept a delivered record's summary in its fnrelay_accepted row.
    fnrelay::journal::migrate_to(&db.journal(), 4)
        .await
        .unwrap();
    db.client()
        .await
        .batch_execute(
            r#"INSERT INTO fnrelay_accepted (fn_call_id, id, digest, accepted_at, done_at, summary)
               VALUES ('old-delivered', 'D', NULL, 1000, 2000,
                       '{"functionId": "f", "destinationType": "Success", "kind": "QUEUE",
                         "resourceId": "q", "channelId": "c", "attempts": 2,
                         "recent": [{"atMs": 1500, "outcome": "retry",
                                     "errorMessage": "server_error", "error": "HTTP 503"}]}'),
                      ('old-skipped', 'S', NULL, 1000, 1000, NULL)"#,
        )
        .await
        .unwrap();
    // Opening migrates to this build's schema.
    let j = PgJournal::open(&db.journal(), Arc::new(Notify::new()))
        .await
        .unwrap();
    let d = j
        .lookup(Lookup::FnCallId("old-delivered".into()))
        .await
        .unwrap()
        .expect("the delivered record is still found");
    assert_eq!(
        (d.id.as_str(), d.state.as_str(), d.attempts),
        ("D", "delivered", 2)
    );
    assert_eq!(
        d.target,
        Some(Target {
            kind: DestKind::Queue,
            resource_id: "q".into(),
            channel_id: Some("c".into()),
        })
    );
    assert_eq!((d.accepted_at_ms, d.finished_at_ms), (1000, Some(2000)));
    assert_eq!(d.destination_type.as_deref(), Some("Success"));
    assert_eq!(d.recent.len(), 2, "the kept retry, then the delivery");
    assert_eq!(d.recent[0].outcome, "retry");
    let s = j.lookup(Lookup::Id("S".into())).await.unwrap().unwrap();
    assert_eq!(
        (s.state.as_str(), s.fn_call_id.as_str()),
        ("skipped", "old-skipped")
    );
    // The retention prunes migrated rows like new ones: the fnCallId is free.
    assert_eq!(j.prune(5_000).await.unwrap(), 2);
    assert!(j.lookup(Lookup::Id("D".into())).await.unwrap().is_none());
    let again = j
        .append(vec![record("D2", "old-delivered", 6_000, 1)])
        .await
        .unwrap();
    assert_eq!((again[0].id.as_str(), again[0].existing), ("D2", false));
    drop(j);
    db.drop_db().await;
}

/// Debian's PostgreSQL serves TLS with the `ssl-cert` package's snakeoil
/// certificate (CN and SAN `localhost`).
const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_is_verified_against_the_ca_file() {
    assert!(
        std::path::Path::new(SNAKEOIL).exists(),
        "{SNAKEOIL} (Debian's ssl-cert, which postgresql installs) is needed for the TLS test"
    );
    let db = TestDb::create().await;
    let tls_url = format!(
        "postgres://postgres@localhost:5432/{}?sslmode=require",
        db.name
    );
    let config = |ca: &str| fnrelay::config::JournalConfig {
        url: Some(fnrelay::config::Secret(tls_url.clone())),
        ca_file: Some(ca.into()),
        ..db.journal()
    };
    // The server's certificate chains to the CA file: connected over TLS.
    let j = PgJournal::open(&config(SNAKEOIL), Arc::new(Notify::new()))
        .await
        .unwrap();
    j.append(vec![record("A", "tls", 1_000, 1)]).await.unwrap();
    let encrypted: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.datname = current_database() AND a.application_name = 'fnrelay' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "fnrelay's connections use TLS");
    drop(j);
    // Another CA (the public roots): the certificate is refused.
    match PgJournal::open(
        &config("/etc/ssl/certs/ca-certificates.crt"),
        Arc::new(Notify::new()),
    )
    .await
    {
        Err(e) => {
            let text = fnrelay::logging::Chain(&e).to_string();
            assert!(text.contains("certificate"), "{text}");
            assert!(
                !text.contains("postgres@"),
                "the URL is not in the error: {text}"
            );
        }
        Ok(_) => panic!("an unverified server was accepted"),
    }
    db.drop_db().await;
}

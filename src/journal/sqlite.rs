//! The SQLite journal: one file in WAL mode with `synchronous = FULL`, owned
//! by one writer thread that does group commit.
//!
//! Every call is a command sent to the thread. The thread takes the first
//! command, drains whatever else is queued (up to `max_group_commit`), runs
//! them all in one transaction (each in its own savepoint, so one failing
//! command does not undo the others), commits with one fsync, and only then
//! answers each caller. Nobody hears "durable" before the commit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use async_trait::async_trait;
use rusqlite::{Connection, Transaction, params};
use tokio::sync::oneshot;

use super::{
    Appended, Claimed, DeadLetter, Journal, JournalError, NewRecord, Outcome, Stats, Target,
};
use crate::record::{DestKind, DestinationType, format_timestamp};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    id               TEXT PRIMARY KEY,
    fn_call_id       TEXT NOT NULL UNIQUE,
    function_id      TEXT NOT NULL,
    destination_type TEXT NOT NULL,
    kind             TEXT,
    resource_id      TEXT,
    channel_id       TEXT,
    body             TEXT,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    accepted_at      INTEGER NOT NULL,
    -- Start of the max_record_age window: accept time, or the last replay.
    age_from         INTEGER NOT NULL,
    -- pending: when the record is due. delivered/skipped/dead: when it got
    -- there (so the same index serves retention pruning).
    next_attempt_at  INTEGER NOT NULL,
    last_error       TEXT,
    error_label      TEXT
);
CREATE INDEX IF NOT EXISTS records_state_time ON records (state, next_attempt_at);
";

type Reply = Box<dyn FnOnce(Option<&str>) + Send>;
type Job = Box<dyn FnOnce(&Transaction<'_>, &Counters) -> Reply + Send>;
type Tx = Connection;

#[derive(Default)]
struct Counters {
    pending: AtomicU64,
}

/// The SQLite journal. Cheap to share behind an `Arc`.
pub struct SqliteJournal {
    tx: mpsc::Sender<Job>,
    counters: Arc<Counters>,
    path: PathBuf,
}

impl SqliteJournal {
    /// Opens (or creates) the journal and starts its writer thread. Records
    /// left `inflight` by a previous process go back to `pending`.
    pub fn open(path: &Path, max_group_commit: usize) -> Result<Self, JournalError> {
        let open_err = |source| JournalError::Open {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "busy_timeout", 5000)?;
        conn.execute_batch(SCHEMA)?;
        let reset = conn.execute(
            "UPDATE records SET state = 'pending' WHERE state = 'inflight'",
            [],
        )?;
        if reset > 0 {
            tracing::info!(
                records = reset,
                "records claimed before the last stop are pending again"
            );
        }
        let pending: i64 = conn.query_row(
            "SELECT count(*) FROM records WHERE state IN ('pending', 'inflight')",
            [],
            |r| r.get(0),
        )?;
        let pending = pending as u64;
        let counters = Arc::new(Counters {
            pending: AtomicU64::new(pending),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_counters = counters.clone();
        std::thread::Builder::new()
            .name("fnrelay-journal".into())
            .spawn(move || writer(conn, rx, thread_counters, max_group_commit.max(1)))
            .map_err(open_err)?;
        Ok(Self {
            tx,
            counters,
            path: path.to_path_buf(),
        })
    }

    /// Runs `f` in the next group-commit transaction and waits for the commit.
    async fn run<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: FnOnce(&Tx, &Counters) -> rusqlite::Result<T> + Send + 'static,
    {
        let (done, wait) = oneshot::channel::<Result<T, JournalError>>();
        let job: Job = Box::new(move |tx, counters| {
            let result = tx
                .execute_batch("SAVEPOINT cmd")
                .and_then(|()| match f(tx, counters) {
                    Ok(v) => tx.execute_batch("RELEASE cmd").map(|()| v),
                    Err(e) => {
                        tx.execute_batch("ROLLBACK TO cmd; RELEASE cmd")?;
                        Err(e)
                    }
                });
            Box::new(move |commit_error: Option<&str>| {
                let answer = match (result, commit_error) {
                    (Err(e), _) => Err(JournalError::Sqlite(e)),
                    (Ok(_), Some(msg)) => Err(JournalError::Commit(msg.to_string())),
                    (Ok(v), None) => Ok(v),
                };
                let _ = done.send(answer);
            })
        });
        self.tx.send(job).map_err(|_| JournalError::Closed)?;
        wait.await.map_err(|_| JournalError::Closed)?
    }
}

fn writer(
    mut conn: Connection,
    rx: mpsc::Receiver<Job>,
    counters: Arc<Counters>,
    max_group: usize,
) {
    let mut replies: Vec<Reply> = Vec::new();
    while let Ok(first) = rx.recv() {
        let tx = match conn.transaction() {
            Ok(tx) => tx,
            Err(e) => {
                // Dropping the job drops its reply channel: the caller gets
                // `JournalError::Closed` and nothing was written.
                tracing::error!(error = %e, "journal cannot begin a transaction");
                drop(first);
                continue;
            }
        };
        let mut next = Some(first);
        let mut n = 0;
        while let Some(job) = next {
            replies.push(job(&tx, &counters));
            n += 1;
            next = if n < max_group {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let commit = tx.commit();
        let err = commit.as_ref().err().map(|e| {
            tracing::error!(error = %e, "journal commit failed");
            e.to_string()
        });
        for reply in replies.drain(..) {
            reply(err.as_deref());
        }
    }
}

fn dest_type(s: &str) -> DestinationType {
    DestinationType::parse(s).unwrap_or(DestinationType::Failure)
}

fn row_to_claimed(r: &rusqlite::Row<'_>) -> rusqlite::Result<Claimed> {
    let kind: String = r.get(4)?;
    Ok(Claimed {
        id: r.get(0)?,
        fn_call_id: r.get(1)?,
        function_id: r.get(2)?,
        destination_type: dest_type(&r.get::<_, String>(3)?),
        target: Target {
            kind: DestKind::parse(&kind).unwrap_or(DestKind::Queue),
            resource_id: r.get(5)?,
            channel_id: r.get(6)?,
        },
        body: r.get(7)?,
        attempts: r.get(8)?,
        accepted_at_ms: r.get(9)?,
        age_from_ms: r.get(10)?,
    })
}

#[async_trait]
impl Journal for SqliteJournal {
    async fn append(&self, records: Vec<NewRecord>) -> Result<Vec<Appended>, JournalError> {
        self.run(move |tx, counters| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO records (id, fn_call_id, function_id, destination_type, kind, resource_id,
                     channel_id, body, state, accepted_at, age_from, next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?10)
                 ON CONFLICT (fn_call_id) DO NOTHING",
            )?;
            let mut existing = tx.prepare_cached("SELECT id FROM records WHERE fn_call_id = ?1")?;
            let mut out = Vec::with_capacity(records.len());
            let mut added = 0u64;
            for r in records {
                let (kind, resource, channel, state) = match &r.target {
                    Some(t) => (
                        Some(t.kind.as_str()),
                        Some(t.resource_id.as_str()),
                        t.channel_id.as_deref(),
                        "pending",
                    ),
                    None => (None, None, None, "skipped"),
                };
                let body = r.target.as_ref().map(|_| r.body.as_str());
                let n = insert.execute(params![
                    r.id,
                    r.fn_call_id,
                    r.function_id,
                    r.destination_type.as_str(),
                    kind,
                    resource,
                    channel,
                    body,
                    state,
                    r.accepted_at_ms,
                ])?;
                if n == 1 {
                    if state == "pending" {
                        added += 1;
                    }
                    out.push(Appended {
                        id: r.id,
                        existing: false,
                    });
                } else {
                    let id: String = existing.query_row([&r.fn_call_id], |row| row.get(0))?;
                    out.push(Appended { id, existing: true });
                }
            }
            // Counted before commit; a failed commit over-counts until restart,
            // which only makes the high-water check stricter.
            counters.pending.fetch_add(added, Ordering::Relaxed);
            Ok(out)
        })
        .await
    }

    async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<Claimed>, JournalError> {
        self.run(move |tx, _| {
            let mut stmt = tx.prepare_cached(
                "UPDATE records SET state = 'inflight'
                 WHERE id IN (SELECT id FROM records WHERE state = 'pending' AND next_attempt_at <= ?1
                              ORDER BY next_attempt_at LIMIT ?2)
                 RETURNING id, fn_call_id, function_id, destination_type, kind, resource_id, channel_id,
                           body, attempts, accepted_at, age_from",
            )?;
            let rows = stmt.query_map(params![now_ms, limit as i64], row_to_claimed)?;
            let mut out: Vec<Claimed> = rows.collect::<Result<_, _>>()?;
            // RETURNING order is unspecified; deliver the oldest due first.
            out.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(out)
        })
        .await
    }

    async fn next_due(&self) -> Result<Option<i64>, JournalError> {
        self.run(|tx, _| {
            tx.query_row(
                "SELECT min(next_attempt_at) FROM records WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn complete(&self, outcomes: Vec<Outcome>) -> Result<(), JournalError> {
        let now = now_ms();
        self.run(move |tx, counters| {
            let mut finished = 0u64;
            for outcome in outcomes {
                match outcome {
                    Outcome::Delivered { id, attempts } => {
                        // The body is at its destination; keep only what
                        // idempotent re-posts need until retention ends.
                        finished += tx.execute(
                            "UPDATE records SET state = 'delivered', attempts = ?2, body = NULL,
                                 next_attempt_at = ?3, last_error = NULL, error_label = NULL
                             WHERE id = ?1 AND state = 'inflight'",
                            params![id, attempts, now],
                        )? as u64;
                    }
                    Outcome::Retry {
                        id,
                        attempts,
                        next_attempt_at_ms,
                        error,
                    } => {
                        tx.execute(
                            "UPDATE records SET state = 'pending', attempts = ?2, next_attempt_at = ?3,
                                 last_error = ?4
                             WHERE id = ?1 AND state = 'inflight'",
                            params![id, attempts, next_attempt_at_ms, error],
                        )?;
                    }
                    Outcome::Release {
                        id,
                        next_attempt_at_ms,
                    } => {
                        tx.execute(
                            "UPDATE records SET state = 'pending', next_attempt_at = ?2
                             WHERE id = ?1 AND state = 'inflight'",
                            params![id, next_attempt_at_ms],
                        )?;
                    }
                    Outcome::Dead {
                        id,
                        attempts,
                        error,
                        label,
                    } => {
                        finished += tx.execute(
                            "UPDATE records SET state = 'dead', attempts = ?2, next_attempt_at = ?3,
                                 last_error = ?4, error_label = ?5
                             WHERE id = ?1 AND state = 'inflight'",
                            params![id, attempts, now, error, label.as_str()],
                        )? as u64;
                    }
                }
            }
            let _ = counters
                .pending
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some(p.saturating_sub(finished)));
            Ok(())
        })
        .await
    }

    async fn list_dead(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, JournalError> {
        self.run(move |tx, _| {
            let mut stmt = tx.prepare_cached(
                "SELECT id, fn_call_id, function_id, destination_type, kind, resource_id, attempts,
                        coalesce(error_label, 'other'), coalesce(last_error, ''), accepted_at, body
                 FROM records WHERE state = 'dead' AND id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after.unwrap_or_default(), limit as i64], |r| {
                let accepted: i64 = r.get(9)?;
                let body: String = r.get(10)?;
                Ok(DeadLetter {
                    id: r.get(0)?,
                    fn_call_id: r.get(1)?,
                    function_id: r.get(2)?,
                    destination_type: r.get(3)?,
                    destination_kind: r.get(4)?,
                    destination_id: r.get(5)?,
                    attempts: r.get(6)?,
                    error_message: r.get(7)?,
                    last_error: r.get(8)?,
                    accepted_at: ms_to_rfc3339(accepted),
                    record: serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn replay_dead(
        &self,
        ids: Option<Vec<String>>,
        now_ms: i64,
    ) -> Result<u64, JournalError> {
        self.run(move |tx, counters| {
            const SET: &str =
                "UPDATE records SET state = 'pending', attempts = 0, next_attempt_at = ?1,
                                   age_from = ?1, error_label = NULL";
            let n = match ids {
                None => tx.execute(&format!("{SET} WHERE state = 'dead'"), params![now_ms])?,
                Some(ids) => {
                    let mut stmt =
                        tx.prepare_cached(&format!("{SET} WHERE state = 'dead' AND id = ?2"))?;
                    let mut n = 0;
                    for id in ids {
                        n += stmt.execute(params![now_ms, id])?;
                    }
                    n
                }
            } as u64;
            counters.pending.fetch_add(n, Ordering::Relaxed);
            Ok(n)
        })
        .await
    }

    async fn prune(&self, before_ms: i64) -> Result<u64, JournalError> {
        self.run(move |tx, _| {
            let n = tx.execute(
                "DELETE FROM records WHERE state IN ('delivered', 'skipped') AND next_attempt_at < ?1",
                params![before_ms],
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn stats(&self) -> Result<Stats, JournalError> {
        let wal = {
            let mut p = self.path.clone().into_os_string();
            p.push("-wal");
            PathBuf::from(p)
        };
        let wal_bytes = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        let mut stats = self
            .run(|tx, _| {
                let (pending, oldest): (i64, Option<i64>) = tx.query_row(
                    "SELECT count(*), min(accepted_at) FROM records WHERE state IN ('pending', 'inflight')",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let dead: i64 =
                    tx.query_row("SELECT count(*) FROM records WHERE state = 'dead'", [], |r| r.get(0))?;
                let pages: i64 = tx.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                let page_size: i64 = tx.query_row("PRAGMA page_size", [], |r| r.get(0))?;
                Ok(Stats {
                    pending: pending as u64,
                    oldest_pending_ms: oldest,
                    dead: dead as u64,
                    size_bytes: (pages * page_size) as u64,
                })
            })
            .await?;
        stats.size_bytes += wal_bytes;
        Ok(stats)
    }

    async fn check_writable(&self) -> Result<(), JournalError> {
        self.run(|tx, _| {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS readiness (k INTEGER PRIMARY KEY, at INTEGER);
                 INSERT OR REPLACE INTO readiness (k, at) VALUES (1, unixepoch());",
            )
        })
        .await
    }

    fn pending(&self) -> u64 {
        self.counters.pending.load(Ordering::Relaxed)
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn ms_to_rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .map(format_timestamp)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(id: &str, call: &str, target: bool) -> NewRecord {
        NewRecord {
            id: id.into(),
            fn_call_id: call.into(),
            function_id: "f".into(),
            destination_type: DestinationType::Failure,
            target: target.then(|| Target {
                kind: DestKind::Queue,
                resource_id: "q".into(),
                channel_id: Some("c".into()),
            }),
            body: format!(r#"{{"id":"{id}"}}"#),
            accepted_at_ms: 1_000,
        }
    }

    #[tokio::test]
    async fn idempotent_append_claim_retry_dead_replay() {
        let dir = tempfile::tempdir().unwrap();
        let j = SqliteJournal::open(&dir.path().join("j.db"), 64).unwrap();
        let got = j
            .append(vec![
                new("A", "c1", true),
                new("B", "c1", true),
                new("C", "c2", false),
            ])
            .await
            .unwrap();
        assert_eq!(
            got,
            [
                Appended {
                    id: "A".into(),
                    existing: false
                },
                Appended {
                    id: "A".into(),
                    existing: true
                },
                Appended {
                    id: "C".into(),
                    existing: false
                },
            ]
        );
        assert_eq!(j.pending(), 1);
        let claimed = j.claim_due(1_000, 10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].target.channel_id.as_deref(), Some("c"));
        assert!(
            j.claim_due(1_000, 10).await.unwrap().is_empty(),
            "inflight is not claimed twice"
        );
        j.complete(vec![Outcome::Retry {
            id: "A".into(),
            attempts: 1,
            next_attempt_at_ms: 5_000,
            error: "503".into(),
        }])
        .await
        .unwrap();
        assert!(j.claim_due(4_999, 10).await.unwrap().is_empty());
        assert_eq!(j.next_due().await.unwrap(), Some(5_000));
        let again = j.claim_due(5_000, 10).await.unwrap();
        assert_eq!(again[0].attempts, 1);
        j.complete(vec![Outcome::Dead {
            id: "A".into(),
            attempts: 2,
            error: "400 bad".into(),
            label: crate::error::ErrorLabel::Rejected,
        }])
        .await
        .unwrap();
        assert_eq!(j.pending(), 0);
        let dead = j.list_dead(None, 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].last_error, "400 bad");
        assert_eq!(dead[0].record["id"], "A");
        assert_eq!(j.stats().await.unwrap().dead, 1);
        assert_eq!(j.replay_dead(None, 9_000).await.unwrap(), 1);
        let replayed = j.claim_due(9_000, 10).await.unwrap();
        assert_eq!((replayed[0].attempts, replayed[0].age_from_ms), (0, 9_000));
        j.complete(vec![Outcome::Delivered {
            id: "A".into(),
            attempts: 1,
        }])
        .await
        .unwrap();
        let stats = j.stats().await.unwrap();
        assert_eq!((stats.pending, stats.dead), (0, 0));
        // Re-post after delivery still answers the same id.
        let again = j.append(vec![new("Z", "c1", true)]).await.unwrap();
        assert_eq!(
            again[0],
            Appended {
                id: "A".into(),
                existing: true
            }
        );
        assert_eq!(j.prune(i64::MAX).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn inflight_records_are_pending_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        {
            let j = SqliteJournal::open(&path, 64).unwrap();
            j.append(vec![new("A", "c1", true)]).await.unwrap();
            assert_eq!(j.claim_due(1_000, 10).await.unwrap().len(), 1);
        }
        let j = SqliteJournal::open(&path, 64).unwrap();
        assert_eq!(j.pending(), 1);
        assert_eq!(j.claim_due(1_000, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_appends_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(SqliteJournal::open(&dir.path().join("j.db"), 64).unwrap());
        let mut tasks = Vec::new();
        for i in 0..200 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                j.append(vec![new(&format!("R{i:04}"), &format!("c{i}"), true)])
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(j.stats().await.unwrap().pending, 200);
    }
}

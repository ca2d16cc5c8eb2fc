//! The SQLite journal: one file in WAL mode with `synchronous = FULL`, owned
//! by one process (an exclusive lock on `<path>.lock`) and by one writer
//! thread in it that does group commit.
//!
//! Every write is a command sent to the thread. The thread takes the first
//! command, drains whatever else is queued (up to `max_group_commit`), runs
//! them all in one transaction (each in its own savepoint, so one failing
//! command does not undo the others), commits with one fsync, and only then
//! answers each caller. Nobody hears "durable" before the commit. When SQLite
//! rolls the whole transaction back itself (a full disk, an I/O error), every
//! command of that transaction is told so and no later command runs in it.
//!
//! Reads (claims, due times, dead letters, gauges) use a second connection,
//! so they never wait behind the writer's fsyncs. Claims are leases kept in
//! memory: a claim writes nothing, and one outcome write per record (batched
//! with others) ends it. The in-memory gauges move only when a commit
//! succeeded and are recounted from the database by [`Journal::resync`].

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::{
    Appended, Claimed, Conflict, DeadLetter, FunctionDestinations, Journal, JournalError, Lane,
    Lookup, NewRecord, Outcome, RecordView, Stats, Target, Watch, Watched, parse_notes,
};
use crate::logging::RateLimited;
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
    error_label      TEXT,
    -- The event's field digests (record::digest), to tell a re-post of the
    -- same event from a conflicting one.
    digest           BLOB
);
-- Finished records by when they got there (pruning, dead letters). Pending
-- rows are not in it, so accepting a record does not touch it.
DROP INDEX IF EXISTS records_state_time;
CREATE INDEX IF NOT EXISTS records_done ON records (state, next_attempt_at) WHERE state <> 'pending';
-- A lane's due records, oldest due first; only the backlog is indexed.
CREATE INDEX IF NOT EXISTS records_lane_due ON records (kind, resource_id, next_attempt_at)
    WHERE state = 'pending';
-- The oldest pending record, for the gauge, without a scan.
CREATE INDEX IF NOT EXISTS records_pending_age ON records (accepted_at) WHERE state = 'pending';
-- Started invocations the watchdog waits on (SPEC section 12).
CREATE TABLE IF NOT EXISTS watches (
    fn_call_id     TEXT PRIMARY KEY,
    function_id    TEXT NOT NULL,
    application_id TEXT NOT NULL,
    compartment_id TEXT NOT NULL,
    opc_request_id TEXT,
    deadline       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS watches_deadline ON watches (deadline);
-- Destinations teams set per function through the API (JSON documents).
CREATE TABLE IF NOT EXISTS destinations (
    function_id TEXT PRIMARY KEY,
    doc         TEXT NOT NULL
);
";

/// Appends the note `?8` (JSON, or NULL for none) to a record's kept
/// attempts, dropping the oldest beyond `?9`.
const APPEND_NOTE: &str = "CASE WHEN ?8 IS NULL THEN recent
    WHEN recent IS NULL THEN '[' || ?8 || ']'
    WHEN json_array_length(recent) >= ?9 THEN json_insert(json_remove(recent, '$[0]'), '$[#]', json(?8))
    ELSE json_insert(recent, '$[#]', json(?8)) END";

/// Changes to the in-memory state, applied only after the commit.
#[derive(Default)]
struct Delta {
    pending: i64,
    dead: i64,
    /// Absolute values from a recount.
    set: Option<(u64, u64)>,
    /// Records this commit added (with their rowids), handed to their
    /// lanes' claims without a read back from the database.
    fresh: Vec<(i64, Claimed)>,
}

/// Records committed by this process and not claimed yet, per lane. Every
/// one is pending and unleased: it leaves here when it is leased, by
/// either claim path, and only a leased record can get an outcome.
#[derive(Default)]
struct Fresh {
    order: VecDeque<String>,
    items: foldhash::HashMap<String, (i64, Claimed)>,
}

/// Most fresh records kept per lane; past that they are read back from
/// the database like any other (a lane whose destination is down).
const FRESH_PER_LANE: usize = 16_384;
/// One claim in this many reads the database first, so that due retries
/// are not starved by a constant stream of fresh records.
const DATABASE_FIRST_EVERY: u32 = 4;

type Reply = Box<dyn FnOnce(Option<&str>, &Shared) + Send>;
/// A command run in the group transaction: its reply, and whether it
/// failed part way with no savepoint to undo its own writes (the writer
/// then rolls the whole group back, so nothing is half-committed).
type Job = Box<dyn FnOnce(&Connection) -> (Reply, bool) + Send>;

struct Lease {
    token: u64,
    until_ms: i64,
    lane: Lane,
    /// The record's rowid: claims and due times scan the lane index for
    /// rowids only (a covering scan) and skip leased ones by rowid.
    rowid: i64,
}

#[derive(Default)]
struct Leases {
    by_id: foldhash::HashMap<String, Lease>,
    /// The end of each lease in `by_id`, by rowid: a claim's scan of the
    /// lane index skips leased rows with one integer lookup each.
    by_rowid: foldhash::HashMap<i64, i64>,
    per_lane: HashMap<Lane, usize>,
    fresh: HashMap<Lane, Fresh>,
    turns: HashMap<Lane, u32>,
}

impl Leases {
    fn live(&self, id: &str, now_ms: i64) -> bool {
        self.by_id.get(id).is_some_and(|l| l.until_ms > now_ms)
    }

    fn live_rowid(&self, rowid: i64, now_ms: i64) -> bool {
        self.by_rowid
            .get(&rowid)
            .is_some_and(|until| *until > now_ms)
    }

    fn insert(&mut self, id: String, lease: Lease) {
        let lane = lease.lane.clone();
        if let Some(f) = self.fresh.get_mut(&lane) {
            f.items.remove(&id);
        }
        let (rowid, until) = (lease.rowid, lease.until_ms);
        match self.by_id.insert(id, lease) {
            Some(old) if old.rowid != rowid => {
                self.by_rowid.remove(&old.rowid);
            }
            Some(_) => {}
            None => *self.per_lane.entry(lane).or_default() += 1,
        }
        self.by_rowid.insert(rowid, until);
    }

    /// Ends the lease if `token` still holds it.
    fn end(&mut self, id: &str, token: u64) {
        if self.by_id.get(id).is_some_and(|l| l.token == token) {
            let lease = self.by_id.remove(id).expect("present");
            self.by_rowid.remove(&lease.rowid);
            if let Some(n) = self.per_lane.get_mut(&lease.lane) {
                *n -= 1;
                if *n == 0 {
                    self.per_lane.remove(&lease.lane);
                }
            }
        }
    }

    fn held(&self, lane: &Lane) -> usize {
        self.per_lane.get(lane).copied().unwrap_or(0)
    }

    /// Hands committed records to their lanes (called after the commit,
    /// before any outcome of theirs can be committed).
    fn add_fresh(&mut self, records: Vec<(i64, Claimed)>) {
        for (rowid, r) in records {
            if self.by_id.contains_key(&r.id) {
                continue;
            }
            let lane = Lane {
                kind: r.target.kind,
                resource_id: r.target.resource_id.clone(),
            };
            let f = self.fresh.entry(lane).or_default();
            if f.items.len() < FRESH_PER_LANE {
                f.order.push_back(r.id.clone());
                f.items.insert(r.id.clone(), (rowid, r));
            }
        }
    }

    /// Leases up to `limit` fresh records of `lane` into `out`.
    fn take_fresh(
        &mut self,
        lane: &Lane,
        limit: usize,
        until_ms: i64,
        tokens: &AtomicU64,
        out: &mut Vec<Claimed>,
    ) {
        let mut taken = Vec::new();
        if let Some(f) = self.fresh.get_mut(lane) {
            while out.len() + taken.len() < limit {
                let Some(id) = f.order.pop_front() else { break };
                if let Some(c) = f.items.remove(&id) {
                    taken.push(c);
                }
            }
            if f.order.is_empty() {
                f.order.shrink_to(64);
            }
        }
        for (rowid, mut c) in taken {
            c.token = tokens.fetch_add(1, Ordering::Relaxed);
            self.insert(
                c.id.clone(),
                Lease {
                    token: c.token,
                    until_ms,
                    lane: lane.clone(),
                    rowid,
                },
            );
            out.push(c);
        }
    }

    fn has_fresh(&self, lane: &Lane) -> bool {
        self.fresh.get(lane).is_some_and(|f| !f.items.is_empty())
    }
}

struct Shared {
    pending: AtomicU64,
    dead: AtomicU64,
    next_token: AtomicU64,
    /// `journal.attempts_kept`.
    attempts_kept: AtomicU64,
    /// Every function's API destinations, as committed (this process is
    /// the journal's only writer).
    destinations: std::sync::RwLock<HashMap<String, FunctionDestinations>>,
    leases: Mutex<Leases>,
}

impl Shared {
    fn apply(&self, d: Delta) {
        if let Some((pending, dead)) = d.set {
            self.pending.store(pending, Ordering::Relaxed);
            self.dead.store(dead, Ordering::Relaxed);
        }
        let add = |c: &AtomicU64, by: i64| {
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_add_signed(by))
            });
        };
        add(&self.pending, d.pending);
        add(&self.dead, d.dead);
        if !d.fresh.is_empty() {
            self.leases().add_fresh(d.fresh);
        }
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The SQLite journal. Cheap to share behind an `Arc`.
pub struct SqliteJournal {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// Held for the life of the journal: the exclusive lock.
    _lock: File,
}

const COLUMNS: &str =
    "id, fn_call_id, function_id, destination_type, kind, resource_id, channel_id,
     body, attempts, accepted_at, age_from";

/// Checks a journal path without changing anything (`check-config`): an
/// existing journal is read (never written) and must be writable with its
/// directory; a missing one needs its nearest existing ancestor to be a
/// writable directory. Says what it found.
pub fn check(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let writable = |p: &Path| -> Result<(), String> {
        match std::fs::metadata(p) {
            Ok(m) if m.permissions().readonly() => Err(format!("{} is read-only", p.display())),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("cannot read {}: {e}", p.display())),
        }
    };
    if !path.exists() {
        let mut dir = path.parent();
        while let Some(d) = dir {
            let d = if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            };
            if d.exists() {
                if !d.is_dir() {
                    return Err(format!("{} is not a directory", d.display()));
                }
                writable(d)?;
                return Ok(format!(
                    "{shown} does not exist yet; it will be created at the first start (in {})",
                    d.display()
                ));
            }
            dir = d.parent();
        }
        return Ok(format!("{shown} will be created at the first start"));
    }
    if path.is_dir() {
        return Err(format!("{shown} is a directory, not a journal file"));
    }
    writable(path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // SQLite writes its -wal and -shm files beside the database.
        writable(dir)?;
    }
    // Read-only: SQLite writes nothing (a running daemon's WAL is read
    // through its shared memory; a closed journal needs no -wal or -shm).
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("cannot open {shown}: {e}"))?;
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'records'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| format!("{shown} is not a SQLite database: {e}"))?;
    if tables == 0 {
        return Err(format!(
            "{shown} is a SQLite database but not a fnrelay journal (no records table)"
        ));
    }
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    let in_use = File::options()
        .write(true)
        .open(PathBuf::from(lock))
        .is_ok_and(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)));
    Ok(format!(
        "{shown}: a fnrelay journal{}",
        if in_use {
            ", open in a running fnrelay"
        } else {
            ""
        }
    ))
}

impl SqliteJournal {
    /// How many attempts to keep per record for lookups
    /// (`journal.attempts_kept`).
    pub fn set_attempts_kept(&self, n: usize) {
        self.shared.attempts_kept.store(
            n.clamp(1, super::MAX_ATTEMPTS_KEPT) as u64,
            Ordering::Relaxed,
        );
    }

    /// Opens (or creates) the journal and starts its writer thread. Fails
    /// with [`JournalError::Locked`] when another process has it open.
    pub fn open(path: &Path, max_group_commit: usize) -> Result<Self, JournalError> {
        let open_err = |source| JournalError::Open {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let lock_path = {
            let mut p = path.as_os_str().to_owned();
            p.push(".lock");
            PathBuf::from(p)
        };
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| JournalError::Open {
                path: lock_path.display().to_string(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(JournalError::Locked {
                    path: path.display().to_string(),
                    lock: lock_path.display().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(JournalError::Open {
                    path: lock_path.display().to_string(),
                    source,
                });
            }
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "busy_timeout", 5000)?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.pragma_update(None, "cache_size", -16384)?;
        // Checkpoint every ~40 MB of WAL instead of 4 MB: a hot page written
        // many times between checkpoints is copied to the database once.
        conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
        conn.execute_batch(SCHEMA)?;
        // Journals written before digests: add the column (old rows keep
        // NULL, which matches any re-post).
        let has_digest: bool = conn.query_row(
            "SELECT count(*) FROM pragma_table_info('records') WHERE name = 'digest'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has_digest {
            conn.execute_batch("ALTER TABLE records ADD COLUMN digest BLOB")?;
        }
        // Journals written before lookups kept no attempts.
        let has_recent: bool = conn.query_row(
            "SELECT count(*) FROM pragma_table_info('records') WHERE name = 'recent'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has_recent {
            conn.execute_batch("ALTER TABLE records ADD COLUMN recent TEXT")?;
        }
        // Journals written before leases kept claims in the row.
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
        let (pending, dead) = count(&conn)?;
        let destinations: HashMap<String, FunctionDestinations> = {
            let mut stmt = conn.prepare("SELECT doc FROM destinations")?;
            let docs = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let mut map = HashMap::new();
            for doc in docs {
                if let Ok(d) = serde_json::from_str::<FunctionDestinations>(&doc?) {
                    map.insert(d.function_id.clone(), d);
                }
            }
            map
        };
        let shared = Arc::new(Shared {
            pending: AtomicU64::new(pending),
            dead: AtomicU64::new(dead),
            next_token: AtomicU64::new(1),
            attempts_kept: AtomicU64::new(10),
            destinations: std::sync::RwLock::new(destinations),
            leases: Mutex::new(Leases::default()),
        });
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.pragma_update(None, "busy_timeout", 5000)?;
        // Claims read the bodies just written: keep them cached (16 MiB).
        reader.pragma_update(None, "cache_size", -16384)?;
        reader.set_prepared_statement_cache_capacity(64);
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("fnrelay-journal".into())
            .spawn(move || writer(conn, rx, thread_shared, max_group_commit.max(1)))
            .map_err(open_err)?;
        Ok(Self {
            tx,
            shared,
            reader: Arc::new(Mutex::new(reader)),
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// Runs `f` in the next group-commit transaction, in a savepoint of its
    /// own, and waits for the commit; its [`Delta`] reaches the gauges only
    /// if the commit succeeded. A failure undoes only this command.
    async fn run<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<(T, Delta)> + Send + 'static,
    {
        self.run_in(true, f).await
    }

    /// [`run`](Self::run) without the savepoint, for commands whose failure
    /// is rare and may fail their whole group (outcomes): a savepoint copies
    /// every page the command touches that the group touched before (the
    /// sub-journal), 9% of the writer's time under batched load. If such a
    /// command fails, the writer rolls the group back and every command in
    /// it is told so: nothing is half-committed.
    async fn run_unsaved<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<(T, Delta)> + Send + 'static,
    {
        self.run_in(false, f).await
    }

    async fn run_in<T, F>(&self, savepoint: bool, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<(T, Delta)> + Send + 'static,
    {
        let (done, wait) = oneshot::channel::<Result<T, JournalError>>();
        let job: Job = Box::new(move |conn| {
            let (result, poisoned) = if savepoint {
                let result = exec_cached(conn, "SAVEPOINT cmd").and_then(|()| match f(conn) {
                    Ok(v) => exec_cached(conn, "RELEASE cmd").map(|()| v),
                    Err(e) => {
                        // Fails too when SQLite already rolled everything
                        // back; the writer sees that and ends the group.
                        let _ = conn.execute_batch("ROLLBACK TO cmd; RELEASE cmd");
                        Err(e)
                    }
                });
                (result, false)
            } else {
                let result = f(conn);
                let poisoned = result.is_err();
                (result, poisoned)
            };
            let reply: Reply = Box::new(move |commit_error: Option<&str>, shared: &Shared| {
                let answer = match (result, commit_error) {
                    (Err(e), _) => Err(JournalError::Sqlite(e)),
                    (Ok(_), Some(msg)) => Err(JournalError::Commit(msg.to_string())),
                    (Ok((v, delta)), None) => {
                        shared.apply(delta);
                        Ok(v)
                    }
                };
                let _ = done.send(answer);
            });
            (reply, poisoned)
        });
        self.tx.send(job).map_err(|_| JournalError::Closed)?;
        wait.await.map_err(|_| {
            JournalError::Commit("the journal could not begin a transaction (see the log)".into())
        })?
    }

    /// Runs `f` on the read connection, off the async threads.
    async fn read<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Shared) -> rusqlite::Result<T> + Send + 'static,
    {
        let reader = self.reader.clone();
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn, &shared)
        })
        .await
        .map_err(|_| JournalError::Closed)?
        .map_err(JournalError::Sqlite)
    }

    /// Claims rows chosen by `select` (rowid, id; ordered), skipping live
    /// leases; with `use_fresh`, serves the lane's fresh records too.
    #[allow(clippy::too_many_arguments)]
    async fn claim_where(
        &self,
        lane: &Lane,
        select: &'static str,
        bound: i64,
        now_ms: i64,
        limit: usize,
        lease: Duration,
        use_fresh: bool,
    ) -> Result<Vec<Claimed>, JournalError> {
        let lane = lane.clone();
        let until_ms = now_ms.saturating_add(lease.as_millis() as i64);
        self.read(move |conn, shared| {
            let mut leases = shared.leases();
            let mut out = Vec::with_capacity(limit);
            let database_first = use_fresh && {
                let turn = leases.turns.entry(lane.clone()).or_default();
                *turn = turn.wrapping_add(1);
                turn.is_multiple_of(DATABASE_FIRST_EVERY)
            };
            if use_fresh && !database_first {
                leases.take_fresh(&lane, limit, until_ms, &shared.next_token, &mut out);
                if out.len() == limit {
                    return Ok(out);
                }
            }
            let scan = limit - out.len() + leases.held(&lane);
            let mut ids = conn.prepare_cached(select)?;
            let rows = ids
                .query_map(
                    params![lane.kind.as_str(), lane.resource_id, bound, scan as i64],
                    |r| r.get::<_, i64>(0),
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut fetch =
                conn.prepare_cached(&format!("SELECT {COLUMNS} FROM records WHERE rowid = ?1"))?;
            for rowid in rows {
                if out.len() == limit {
                    break;
                }
                if leases.live_rowid(rowid, now_ms) {
                    continue;
                }
                let Some(mut claimed) = fetch.query_row([rowid], row_to_claimed).optional()? else {
                    continue;
                };
                claimed.token = shared.next_token.fetch_add(1, Ordering::Relaxed);
                leases.insert(
                    claimed.id.clone(),
                    Lease {
                        token: claimed.token,
                        until_ms,
                        lane: lane.clone(),
                        rowid,
                    },
                );
                out.push(claimed);
            }
            if database_first && out.len() < limit {
                leases.take_fresh(&lane, limit, until_ms, &shared.next_token, &mut out);
            }
            Ok(out)
        })
        .await
    }
}

fn count(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    let pending: i64 = conn.query_row(
        "SELECT count(*) FROM records WHERE state = 'pending'",
        [],
        |r| r.get(0),
    )?;
    let dead: i64 = conn.query_row(
        "SELECT count(*) FROM records WHERE state <> 'pending' AND state = 'dead'",
        [],
        |r| r.get(0),
    )?;
    Ok((pending as u64, dead as u64))
}

/// Runs a statement without parameters from the connection's statement
/// cache (the writer runs BEGIN, SAVEPOINT, RELEASE and COMMIT for every
/// command; parsing them each time showed in profiles).
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn writer(conn: Connection, rx: mpsc::Receiver<Job>, shared: Arc<Shared>, max_group: usize) {
    let mut replies: Vec<Reply> = Vec::new();
    // A full disk fails every group: one line per kind of error per 10 s.
    let errors = RateLimited::new(Duration::from_secs(10));
    let path = conn.path().unwrap_or_default().to_string();
    let log = |what: &str, e: &dyn std::fmt::Display| {
        let text = format!("{what}: {e}");
        if let Some(suppressed) = errors.allow(&text) {
            tracing::error!(journal = %path, error = %e, suppressed, "{what}");
        }
    };
    while let Ok(first) = rx.recv() {
        if let Err(e) = exec_cached(&conn, "BEGIN IMMEDIATE") {
            // Dropping the job drops its reply channel: the caller hears that
            // nothing was written.
            log("journal cannot begin a transaction", &e);
            drop(first);
            continue;
        }
        let mut next = Some(first);
        let mut n = 0;
        let mut rolled_back = false;
        while let Some(job) = next {
            let (reply, poisoned) = job(&conn);
            replies.push(reply);
            n += 1;
            if poisoned && !conn.is_autocommit() {
                // A command without a savepoint failed part way: its writes
                // cannot be undone alone, so none of the group's are kept.
                let _ = conn.execute_batch("ROLLBACK");
            }
            if poisoned || conn.is_autocommit() {
                // SQLite ended the transaction itself (SQLITE_FULL, IOERR...),
                // or we did: everything this group wrote is gone. Do not let
                // the next command open a transaction of its own.
                rolled_back = true;
                break;
            }
            next = if n < max_group {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let err = if rolled_back {
            let msg = "SQLite rolled the group-commit transaction back after an error in one of its commands (see the journal error logged with it)";
            log(
                "journal transaction rolled back; its commands were not written",
                &format!("{n} commands"),
            );
            Some(msg.to_string())
        } else {
            exec_cached(&conn, "COMMIT").err().map(|e| {
                log("journal commit failed", &e);
                let _ = conn.execute_batch("ROLLBACK");
                e.to_string()
            })
        };
        for reply in replies.drain(..) {
            reply(err.as_deref(), &shared);
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
        token: 0,
    })
}

#[async_trait]
impl Journal for SqliteJournal {
    async fn append(&self, records: Vec<NewRecord>) -> Result<Vec<Appended>, JournalError> {
        self.run(move |tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO records (id, fn_call_id, function_id, destination_type, kind, resource_id,
                     channel_id, body, state, accepted_at, age_from, next_attempt_at, digest)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?10, ?11)
                 ON CONFLICT (fn_call_id) DO NOTHING",
            )?;
            let mut existing =
                tx.prepare_cached("SELECT id, digest FROM records WHERE fn_call_id = ?1")?;
            let mut conflicts = Vec::new();
            let mut out = Vec::with_capacity(records.len());
            let mut added = 0i64;
            let mut fresh = Vec::new();
            for (index, r) in records.into_iter().enumerate() {
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
                    r.digest,
                ])?;
                if n == 1 {
                    out.push(Appended {
                        id: r.id.clone(),
                        existing: false,
                    });
                    if let Some(target) = r.target {
                        added += 1;
                        let rowid = tx.last_insert_rowid();
                        fresh.push((rowid, Claimed {
                            id: r.id,
                            fn_call_id: r.fn_call_id,
                            function_id: r.function_id,
                            destination_type: r.destination_type,
                            target,
                            body: r.body,
                            attempts: 0,
                            accepted_at_ms: r.accepted_at_ms,
                            age_from_ms: r.accepted_at_ms,
                            token: 0,
                        }));
                    }
                } else {
                    let (id, digest): (String, Option<Vec<u8>>) = existing
                        .query_row([&r.fn_call_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
                    // Rows journaled before digests existed match anything.
                    let fields = digest
                        .map(|d| crate::record::differing_fields(&d, &r.digest))
                        .unwrap_or_default();
                    if !fields.is_empty() {
                        conflicts.push(Conflict {
                            index,
                            fn_call_id: r.fn_call_id,
                            existing_id: id.clone(),
                            fields,
                        });
                    }
                    out.push(Appended { id, existing: true });
                }
            }
            if !conflicts.is_empty() {
                // Nothing of this request is written; other requests in the
                // same group commit are not touched.
                tx.execute_batch("ROLLBACK TO cmd")?;
                return Ok((Err(conflicts), Delta::default()));
            }
            Ok((
                Ok(out),
                Delta {
                    pending: added,
                    fresh,
                    ..Delta::default()
                },
            ))
        })
        .await?
        .map_err(JournalError::Conflict)
    }

    async fn claim(
        &self,
        lane: &Lane,
        now_ms: i64,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, JournalError> {
        self.claim_where(
            lane,
            "SELECT rowid FROM records INDEXED BY records_lane_due
             WHERE kind = ?1 AND resource_id = ?2 AND state = 'pending' AND next_attempt_at <= ?3
             ORDER BY next_attempt_at LIMIT ?4",
            now_ms,
            now_ms,
            limit,
            lease,
            true,
        )
        .await
    }

    async fn claim_expired(
        &self,
        lane: &Lane,
        age_from_before_ms: i64,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, JournalError> {
        self.claim_where(
            lane,
            "SELECT rowid FROM records INDEXED BY records_lane_due
             WHERE kind = ?1 AND resource_id = ?2 AND state = 'pending' AND age_from < ?3
             ORDER BY next_attempt_at LIMIT ?4",
            age_from_before_ms,
            now_ms(),
            limit,
            lease,
            false,
        )
        .await
    }

    async fn pending_lanes(&self) -> Result<Vec<Lane>, JournalError> {
        self.read(|conn, _| {
            let mut stmt = conn.prepare_cached(
                "SELECT DISTINCT kind, resource_id FROM records INDEXED BY records_lane_due
                 WHERE state = 'pending'",
            )?;
            let rows = stmt.query_map([], |r| {
                let kind: String = r.get(0)?;
                Ok(Lane {
                    kind: DestKind::parse(&kind).unwrap_or(DestKind::Queue),
                    resource_id: r.get(1)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn next_due(&self, lane: &Lane) -> Result<Option<i64>, JournalError> {
        let lane = lane.clone();
        self.read(move |conn, shared| {
            let leases = shared.leases();
            if leases.has_fresh(&lane) {
                return Ok(Some(0));
            }
            let held = leases.held(&lane);
            let mut stmt = conn.prepare_cached(
                "SELECT rowid, next_attempt_at FROM records INDEXED BY records_lane_due
                 WHERE kind = ?1 AND resource_id = ?2 AND state = 'pending'
                 ORDER BY next_attempt_at LIMIT ?3",
            )?;
            let mut rows = stmt.query(params![
                lane.kind.as_str(),
                lane.resource_id,
                held as i64 + 1
            ])?;
            while let Some(row) = rows.next()? {
                let rowid: i64 = row.get(0)?;
                if !leases.by_rowid.contains_key(&rowid) {
                    return Ok(Some(row.get::<_, i64>(1)?));
                }
            }
            // Everything due is leased (in flight). Leases end with their
            // outcome, which wakes the lane; one that runs out (a hung
            // send) is seen at the lane's next poll.
            Ok(None)
        })
        .await
    }

    async fn complete_noted(
        &self,
        outcomes: Vec<Outcome>,
        notes: Vec<Option<String>>,
    ) -> Result<Vec<bool>, JournalError> {
        let now = now_ms();
        let kept = self.shared.attempts_kept.load(Ordering::Relaxed) as i64;
        let ended: Vec<(String, u64)> = outcomes
            .iter()
            .map(|o| (o.id().to_string(), o.token()))
            .collect();
        // Fencing: only outcomes whose claim still holds are written.
        let holds: Vec<bool> = {
            let leases = self.shared.leases();
            outcomes
                .iter()
                .map(|o| {
                    leases
                        .by_id
                        .get(o.id())
                        .is_some_and(|l| l.token == o.token())
                })
                .collect()
        };
        let result = self
            .run_unsaved(move |tx| {
                let mut delta = Delta::default();
                let mut applied = Vec::with_capacity(outcomes.len());
                // ?8: the attempt note (JSON) or NULL; ?9: how many to keep.
                let mut delivered = tx.prepare_cached(&format!(
                    // The body is at its destination; keep only what
                    // idempotent re-posts need until retention ends.
                    "UPDATE records SET state = 'delivered', attempts = ?2, body = NULL,
                         next_attempt_at = ?3, last_error = NULL, error_label = NULL,
                         recent = {APPEND_NOTE}
                     WHERE id = ?1 AND state = 'pending'"
                ))?;
                let mut retry = tx.prepare_cached(&format!(
                    "UPDATE records SET attempts = ?2, next_attempt_at = ?3, last_error = ?4,
                         recent = {APPEND_NOTE}
                     WHERE id = ?1 AND state = 'pending'"
                ))?;
                let mut release = tx.prepare_cached(&format!(
                    "UPDATE records SET next_attempt_at = max(next_attempt_at, ?2),
                         recent = {APPEND_NOTE}
                     WHERE id = ?1 AND state = 'pending'"
                ))?;
                let mut dead = tx.prepare_cached(&format!(
                    "UPDATE records SET state = 'dead', attempts = ?2, next_attempt_at = ?3,
                         last_error = ?4, error_label = ?5, recent = {APPEND_NOTE}
                     WHERE id = ?1 AND state = 'pending'"
                ))?;
                let none: Option<&str> = None;
                for ((outcome, holds), note) in outcomes.into_iter().zip(holds).zip(notes) {
                    if !holds {
                        applied.push(false);
                        continue;
                    }
                    let changed = match outcome {
                        Outcome::Delivered { id, attempts, .. } => {
                            let n = delivered.execute(params![
                                id, attempts, now, none, none, none, none, note, kept
                            ])? as i64;
                            delta.pending -= n;
                            n == 1
                        }
                        Outcome::Retry {
                            id,
                            attempts,
                            next_attempt_at_ms,
                            error,
                            ..
                        } => {
                            retry.execute(params![
                                id,
                                attempts,
                                next_attempt_at_ms,
                                error,
                                none,
                                none,
                                none,
                                note,
                                kept
                            ])? == 1
                        }
                        Outcome::Release {
                            id,
                            next_attempt_at_ms,
                            ..
                        } => {
                            // A release due now without a note writes
                            // nothing: ending the lease is enough.
                            if next_attempt_at_ms > now || note.is_some() {
                                release.execute(params![
                                    id,
                                    next_attempt_at_ms,
                                    none,
                                    none,
                                    none,
                                    none,
                                    none,
                                    note,
                                    kept
                                ])?;
                            }
                            true
                        }
                        Outcome::Dead {
                            id,
                            attempts,
                            error,
                            label,
                            ..
                        } => {
                            let n = dead.execute(params![
                                id,
                                attempts,
                                now,
                                error,
                                label.as_str(),
                                none,
                                none,
                                note,
                                kept
                            ])? as i64;
                            delta.pending -= n;
                            delta.dead += n;
                            n == 1
                        }
                    };
                    applied.push(changed);
                }
                Ok((applied, delta))
            })
            .await;
        // Written: these claims are over. Not written (the journal cannot
        // write): the leases stay until they run out, then the records are
        // claimed and sent again (twice, never lost) without a tight loop of
        // resends while the journal is failing.
        if result.is_ok() {
            let mut leases = self.shared.leases();
            for (id, token) in ended {
                leases.end(&id, token);
            }
        }
        result
    }

    async fn lookup(&self, by: Lookup) -> Result<Option<RecordView>, JournalError> {
        let now = now_ms();
        self.read(move |conn, shared| {
            let (sql, key) = match by {
                Lookup::Id(id) => ("id", id),
                Lookup::FnCallId(call) => ("fn_call_id", call),
            };
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT id, fn_call_id, function_id, destination_type, kind, resource_id, channel_id,
                        state, attempts, accepted_at, next_attempt_at, last_error, error_label, recent
                 FROM records WHERE {sql} = ?1"
            ))?;
            let mut rows = stmt.query(params![key])?;
            let Some(r) = rows.next()? else {
                return Ok(None);
            };
            let id: String = r.get(0)?;
            let kind: Option<String> = r.get(4)?;
            let mut state: String = r.get(7)?;
            let at: i64 = r.get(10)?;
            let pending = state == "pending";
            if pending && shared.leases().live(&id, now) {
                state = "inflight".into();
            }
            let target = match (kind.as_deref().and_then(DestKind::parse), r.get::<_, Option<String>>(5)?) {
                (Some(kind), Some(resource_id)) => Some(Target {
                    kind,
                    resource_id,
                    channel_id: r.get(6)?,
                }),
                _ => None,
            };
            Ok(Some(RecordView {
                id,
                fn_call_id: r.get(1)?,
                function_id: r.get(2)?,
                destination_type: Some(r.get(3)?),
                target,
                attempts: r.get(8)?,
                next_attempt_at_ms: pending.then_some(at),
                accepted_at_ms: r.get(9)?,
                finished_at_ms: (!pending).then_some(at),
                last_error: r.get(11)?,
                error_label: r.get(12)?,
                recent: parse_notes(r.get::<_, Option<String>>(13)?.as_deref()),
                state,
            }
            .with_first_delivery()))
        })
        .await
    }

    async fn watch(&self, watch: Watch) -> Result<Watched, JournalError> {
        self.run(move |tx| {
            let existing: Option<String> = tx
                .query_row(
                    "SELECT id FROM records WHERE fn_call_id = ?1",
                    params![watch.fn_call_id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = existing {
                return Ok((Watched::Completed { id }, Delta::default()));
            }
            tx.execute(
                "INSERT INTO watches (fn_call_id, function_id, application_id, compartment_id,
                     opc_request_id, deadline) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (fn_call_id) DO UPDATE SET deadline = excluded.deadline",
                params![
                    watch.fn_call_id,
                    watch.function_id,
                    watch.application_id,
                    watch.compartment_id,
                    watch.opc_request_id,
                    watch.deadline_ms
                ],
            )?;
            Ok((Watched::Watching, Delta::default()))
        })
        .await
    }

    async fn due_watches(
        &self,
        now_ms: i64,
        limit: usize,
        _lease: Duration,
    ) -> Result<Vec<Watch>, JournalError> {
        // One process and one watchdog task: no lease needed.
        self.read(move |conn, _| {
            let mut stmt = conn.prepare_cached(
                "SELECT fn_call_id, function_id, application_id, compartment_id, opc_request_id,
                        deadline
                 FROM watches WHERE deadline <= ?1 ORDER BY deadline LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now_ms, limit as i64], |r| {
                Ok(Watch {
                    fn_call_id: r.get(0)?,
                    function_id: r.get(1)?,
                    application_id: r.get(2)?,
                    compartment_id: r.get(3)?,
                    opc_request_id: r.get(4)?,
                    deadline_ms: r.get(5)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn unwatch(&self, fn_call_ids: Vec<String>) -> Result<(), JournalError> {
        self.run(move |tx| {
            let mut stmt = tx.prepare_cached("DELETE FROM watches WHERE fn_call_id = ?1")?;
            for call in &fn_call_ids {
                stmt.execute(params![call])?;
            }
            Ok(((), Delta::default()))
        })
        .await
    }

    async fn put_destinations(
        &self,
        destinations: FunctionDestinations,
    ) -> Result<Option<FunctionDestinations>, JournalError> {
        // The map holds what is committed (this process is the only
        // writer), so the old entry comes from it, not from a read.
        let doc = serde_json::to_string(&destinations).expect("serializable");
        let function_id = destinations.function_id.clone();
        self.run(move |tx| {
            tx.execute(
                "INSERT INTO destinations (function_id, doc) VALUES (?1, ?2)
                 ON CONFLICT (function_id) DO UPDATE SET doc = excluded.doc",
                params![function_id, doc],
            )?;
            Ok(((), Delta::default()))
        })
        .await?;
        Ok(self
            .shared
            .destinations
            .write()
            .expect("destinations lock")
            .insert(destinations.function_id.clone(), destinations))
    }

    async fn delete_destinations(
        &self,
        function_id: String,
    ) -> Result<Option<FunctionDestinations>, JournalError> {
        let key = function_id.clone();
        self.run(move |tx| {
            tx.execute(
                "DELETE FROM destinations WHERE function_id = ?1",
                params![key],
            )?;
            Ok(((), Delta::default()))
        })
        .await?;
        Ok(self
            .shared
            .destinations
            .write()
            .expect("destinations lock")
            .remove(&function_id))
    }

    async fn list_destinations(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<FunctionDestinations>, JournalError> {
        let all = self.shared.destinations.read().expect("destinations lock");
        let mut out: Vec<FunctionDestinations> = all
            .values()
            .filter(|d| after.as_ref().is_none_or(|a| d.function_id > *a))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.function_id.cmp(&b.function_id));
        out.truncate(limit);
        Ok(out)
    }

    async fn destinations_for(
        &self,
        function_ids: Vec<String>,
    ) -> Result<HashMap<String, FunctionDestinations>, JournalError> {
        let all = self.shared.destinations.read().expect("destinations lock");
        if all.is_empty() {
            return Ok(HashMap::new());
        }
        Ok(function_ids
            .into_iter()
            .filter_map(|f| all.get(&f).cloned().map(|d| (f, d)))
            .collect())
    }

    async fn list_dead(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, JournalError> {
        self.read(move |conn, _| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, fn_call_id, function_id, destination_type, kind, resource_id, attempts,
                        coalesce(error_label, 'other'), coalesce(last_error, ''), accepted_at, body
                 FROM records WHERE state <> 'pending' AND state = 'dead' AND id > ?1
                 ORDER BY id LIMIT ?2",
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
        self.run(move |tx| {
            const SET: &str =
                "UPDATE records SET state = 'pending', attempts = 0, next_attempt_at = ?1,
                                   age_from = ?1, error_label = NULL";
            let n = match ids {
                None => tx.execute(
                    &format!("{SET} WHERE state <> 'pending' AND state = 'dead'"),
                    params![now_ms],
                )?,
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
            Ok((
                n,
                Delta {
                    pending: n as i64,
                    dead: -(n as i64),
                    ..Delta::default()
                },
            ))
        })
        .await
    }

    async fn prune(&self, before_ms: i64) -> Result<u64, JournalError> {
        self.run(move |tx| {
            let n = tx.execute(
                "DELETE FROM records WHERE state <> 'pending' AND state IN ('delivered', 'skipped')
                     AND next_attempt_at < ?1",
                params![before_ms],
            )?;
            Ok((n as u64, Delta::default()))
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
            .read(|conn, shared| {
                let oldest: Option<i64> = conn.query_row(
                    "SELECT min(accepted_at) FROM records WHERE state = 'pending'",
                    [],
                    |r| r.get(0),
                )?;
                let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
                Ok(Stats {
                    pending: shared.pending.load(Ordering::Relaxed),
                    oldest_pending_ms: oldest,
                    dead: shared.dead.load(Ordering::Relaxed),
                    size_bytes: (pages * page_size) as u64,
                })
            })
            .await?;
        stats.size_bytes += wal_bytes;
        Ok(stats)
    }

    async fn check_writable(&self) -> Result<(), JournalError> {
        self.run(|tx| {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS readiness (k INTEGER PRIMARY KEY, at INTEGER);
                 INSERT OR REPLACE INTO readiness (k, at) VALUES (1, unixepoch());",
            )?;
            Ok(((), Delta::default()))
        })
        .await
    }

    fn pending(&self) -> u64 {
        self.shared.pending.load(Ordering::Relaxed)
    }

    async fn resync(&self) -> Result<(), JournalError> {
        self.run(|tx| {
            let counted = count(tx)?;
            Ok((
                (),
                Delta {
                    set: Some(counted),
                    ..Delta::default()
                },
            ))
        })
        .await
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A Unix-millisecond time as the record formats times.
pub(crate) fn ms_to_rfc3339(ms: i64) -> String {
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
            digest: Vec::new(),
        }
    }

    fn lane() -> Lane {
        Lane {
            kind: DestKind::Queue,
            resource_id: "q".into(),
        }
    }

    const LEASE: Duration = Duration::from_secs(60);

    /// The ids of the journal's rows matching `condition`, sorted, read
    /// through a connection of the test's own.
    fn ids_where(path: &Path, condition: &str) -> Vec<String> {
        let c = Connection::open(path).unwrap();
        c.prepare(&format!(
            "SELECT id FROM records WHERE {condition} ORDER BY id"
        ))
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
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
        let claimed = j.claim(&lane(), 1_000, 10, LEASE).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].target.channel_id.as_deref(), Some("c"));
        assert!(
            j.claim(&lane(), 1_000, 10, LEASE).await.unwrap().is_empty(),
            "a leased record is not claimed twice"
        );
        let applied = j
            .complete(vec![Outcome::Retry {
                id: "A".into(),
                token: claimed[0].token,
                attempts: 1,
                next_attempt_at_ms: 5_000,
                error: "503".into(),
            }])
            .await
            .unwrap();
        assert_eq!(applied, [true]);
        assert!(j.claim(&lane(), 4_999, 10, LEASE).await.unwrap().is_empty());
        assert_eq!(j.next_due(&lane()).await.unwrap(), Some(5_000));
        let again = j.claim(&lane(), 5_000, 10, LEASE).await.unwrap();
        assert_eq!(again[0].attempts, 1);
        j.complete(vec![Outcome::Dead {
            id: "A".into(),
            token: again[0].token,
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
        assert_eq!(j.stats().await.unwrap().dead, 0);
        let replayed = j.claim(&lane(), 9_000, 10, LEASE).await.unwrap();
        assert_eq!((replayed[0].attempts, replayed[0].age_from_ms), (0, 9_000));
        j.complete(vec![Outcome::Delivered {
            id: "A".into(),
            token: replayed[0].token,
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
    async fn unfinished_claims_are_due_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        {
            let j = SqliteJournal::open(&path, 64).unwrap();
            j.append(vec![new("A", "c1", true)]).await.unwrap();
            assert_eq!(j.claim(&lane(), 1_000, 10, LEASE).await.unwrap().len(), 1);
        }
        let j = SqliteJournal::open(&path, 64).unwrap();
        assert_eq!(j.pending(), 1);
        assert_eq!(j.claim(&lane(), 1_000, 10, LEASE).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_expired_lease_is_claimed_again_and_the_old_claim_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let j = SqliteJournal::open(&dir.path().join("j.db"), 64).unwrap();
        j.append(vec![new("A", "c1", true)]).await.unwrap();
        let lease = Duration::from_millis(500);
        let first = j.claim(&lane(), 1_000, 10, lease).await.unwrap();
        assert!(j.claim(&lane(), 1_499, 10, lease).await.unwrap().is_empty());
        assert_eq!(j.next_due(&lane()).await.unwrap(), None, "all leased");
        let second = j.claim(&lane(), 1_500, 10, lease).await.unwrap();
        assert_eq!(second.len(), 1, "claimable again once the lease ended");
        assert_ne!(first[0].token, second[0].token);
        // The first claimant answers late: its outcome is not written.
        let late = j
            .complete(vec![Outcome::Dead {
                id: "A".into(),
                token: first[0].token,
                attempts: 1,
                error: "late".into(),
                label: crate::error::ErrorLabel::Rejected,
            }])
            .await
            .unwrap();
        assert_eq!(late, [false]);
        let now = j
            .complete(vec![Outcome::Delivered {
                id: "A".into(),
                token: second[0].token,
                attempts: 1,
            }])
            .await
            .unwrap();
        assert_eq!(now, [true]);
        let stats = j.stats().await.unwrap();
        assert_eq!((stats.pending, stats.dead), (0, 0));
    }

    #[tokio::test]
    async fn an_outcome_that_cannot_be_written_keeps_its_lease_until_it_runs_out() {
        // The journal refuses writes: no storm of re-claims and resends;
        // the record comes back once its lease has run out.
        let dir = tempfile::tempdir().unwrap();
        let j = SqliteJournal::open(&dir.path().join("j.db"), 64).unwrap();
        j.append(vec![new("A", "c1", true)]).await.unwrap();
        let lease = Duration::from_millis(500);
        let got = j.claim(&lane(), 1_000, 10, lease).await.unwrap();
        j.run(|tx| {
            tx.execute_batch("PRAGMA query_only = 1")?;
            Ok(((), Delta::default()))
        })
        .await
        .unwrap();
        let failed = j
            .complete(vec![Outcome::Delivered {
                id: "A".into(),
                token: got[0].token,
                attempts: 1,
            }])
            .await;
        assert!(failed.is_err(), "the write must fail");
        assert!(j.claim(&lane(), 1_001, 10, lease).await.unwrap().is_empty());
        let again = j.claim(&lane(), 1_500, 10, lease).await.unwrap();
        assert_eq!(again.len(), 1, "claimable once the lease ran out");
        assert_eq!(j.pending(), 1);
    }

    #[tokio::test]
    async fn a_second_process_on_the_same_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let _first = SqliteJournal::open(&path, 64).unwrap();
        match SqliteJournal::open(&path, 64) {
            Err(e @ JournalError::Locked { .. }) => {
                assert!(
                    e.to_string().contains("in use by another fnrelay process"),
                    "{e}"
                )
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a second journal on the same file was opened"),
        }
    }

    #[tokio::test]
    async fn a_rolled_back_group_fails_exactly_its_commands_and_writes_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let j = Arc::new(SqliteJournal::open(&path, 1024).unwrap());
        j.append(vec![new("A", "c-a", true)]).await.unwrap();
        // Cap the file near its current size, so a group of large appends
        // hits SQLITE_FULL part way and SQLite rolls the transaction back.
        {
            let c = Connection::open(&path).unwrap();
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
            drop(c);
            let cap = pages + 8;
            j.run(move |tx| {
                tx.query_row(&format!("PRAGMA max_page_count = {cap}"), [], |_| Ok(()))?;
                tx.execute_batch("PRAGMA cache_size = 2")?;
                Ok(((), Delta::default()))
            })
            .await
            .unwrap();
        }
        let mut tasks = Vec::new();
        for i in 0..40 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = new(&format!("R{i:03}"), &format!("c{i}"), true);
                r.body = "x".repeat(3000);
                j.append(vec![r]).await
            }));
        }
        let mut ok = Vec::new();
        let mut failed = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Ok(_) => ok.push(format!("R{i:03}")),
                Err(_) => failed += 1,
            }
        }
        assert!(failed > 0, "the cap was not reached");
        // What the callers heard is exactly what the journal holds.
        let stored = ids_where(&path, "id LIKE 'R%'");
        assert_eq!(stored, ok, "acknowledged = stored");
        assert_eq!(
            j.pending(),
            1 + ok.len() as u64,
            "the gauge moved only with commits"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outcome_commands_that_fail_part_way_write_nothing() {
        // Outcomes run without a savepoint: a command that fails part way
        // must roll its whole group back, never leave some of its outcomes
        // written while its caller hears it failed.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let j = Arc::new(SqliteJournal::open(&path, 1024).unwrap());
        let ids: Vec<String> = (0..60).map(|i| format!("R{i:03}")).collect();
        j.append(
            ids.iter()
                .map(|id| new(id, &format!("c-{id}"), true))
                .collect(),
        )
        .await
        .unwrap();
        let claimed = j.claim(&lane(), now_ms(), 100, LEASE).await.unwrap();
        assert_eq!(claimed.len(), 60);
        // The second outcome of one command fails with a statement error
        // that leaves the transaction open (unlike SQLITE_FULL, which SQLite
        // rolls back itself): its first outcome was already written.
        j.run(|tx| {
            tx.execute_batch(
                "CREATE TEMP TRIGGER fail_one BEFORE UPDATE ON records
                 WHEN old.id = 'R031' BEGIN SELECT RAISE(ABORT, 'injected'); END",
            )?;
            Ok(((), Delta::default()))
        })
        .await
        .unwrap();
        let note = serde_json::json!({"atMs": 1, "outcome": "success"}).to_string();
        // Twenty commands of three outcomes each, sent together.
        let mut tasks = Vec::new();
        for chunk in claimed.chunks(3) {
            let j = j.clone();
            let outcomes: Vec<Outcome> = chunk
                .iter()
                .map(|c| Outcome::Delivered {
                    id: c.id.clone(),
                    token: c.token,
                    attempts: 2,
                })
                .collect();
            let notes = vec![Some(note.clone()); outcomes.len()];
            let chunk_ids: Vec<String> = chunk.iter().map(|c| c.id.clone()).collect();
            tasks.push(tokio::spawn(async move {
                (chunk_ids, j.complete_noted(outcomes, notes).await)
            }));
        }
        let (mut ok, mut failed) = (Vec::new(), 0);
        for t in tasks {
            let (chunk_ids, result) = t.await.unwrap();
            match result {
                Ok(applied) => {
                    assert!(applied.iter().all(|a| *a));
                    ok.extend(chunk_ids);
                }
                Err(_) => failed += 1,
            }
        }
        assert!(failed > 0, "the injected failure was not reached");
        assert!(
            !ok.contains(&"R030".to_string()),
            "R030 shares R031's command"
        );
        let delivered = ids_where(&path, "state = 'delivered'");
        ok.sort();
        assert_eq!(delivered, ok, "written = what callers heard was written");
        assert_eq!(
            j.pending(),
            60 - ok.len() as u64,
            "the gauge moved with commits only"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fresh_and_database_claims_hand_out_each_record_once() {
        // Appends, claims (fresh records and database reads alternate) and
        // outcomes run concurrently: every record is claimed exactly once
        // and none comes back after its outcome.
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(SqliteJournal::open(&dir.path().join("j.db"), 64).unwrap());
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let j = j.clone();
                tokio::spawn(async move {
                    for b in 0..25 {
                        let batch = (0..10)
                            .map(|i| {
                                let n = w * 1000 + b * 10 + i;
                                new(&format!("R{n:05}"), &format!("c{n}"), true)
                            })
                            .collect();
                        j.append(batch).await.unwrap();
                    }
                })
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while seen.len() < 1000 {
            assert!(
                std::time::Instant::now() < deadline,
                "claimed {}",
                seen.len()
            );
            let got = j.claim(&lane(), i64::MAX / 2, 37, LEASE).await.unwrap();
            let outcomes = got
                .iter()
                .map(|c| {
                    assert!(seen.insert(c.id.clone()), "{} claimed twice", c.id);
                    Outcome::Delivered {
                        id: c.id.clone(),
                        token: c.token,
                        attempts: 1,
                    }
                })
                .collect::<Vec<_>>();
            let applied = j.complete(outcomes).await.unwrap();
            assert!(applied.iter().all(|a| *a));
            if got.is_empty() {
                tokio::task::yield_now().await;
            }
        }
        for w in writers {
            w.await.unwrap();
        }
        for _ in 0..8 {
            assert!(
                j.claim(&lane(), i64::MAX / 2, 100, LEASE)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
        assert_eq!(j.pending(), 0);
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
        j.resync().await.unwrap();
        assert_eq!(j.pending(), 200);
    }

    #[tokio::test]
    async fn a_conflicting_repost_writes_nothing_of_its_request_and_spares_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(SqliteJournal::open(&dir.path().join("j.db"), 64).unwrap());
        let with = |id: &str, call: &str, digest: &[u8]| NewRecord {
            digest: digest.to_vec(),
            ..new(id, call, true)
        };
        j.append(vec![with("A", "c1", &[1; 72])]).await.unwrap();

        // Many requests share commits; one of them re-posts c1 with other
        // content beside a new event.
        let mut tasks = Vec::new();
        for i in 0..50 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                j.append(vec![with(&format!("R{i:02}"), &format!("n{i}"), &[1; 72])])
                    .await
            }));
        }
        let mut other = [1u8; 72];
        other[4 * 8] = 9; // status
        other[6 * 8] = 9; // errorMessage
        let conflict = j
            .append(vec![
                with("B", "new-beside", &[1; 72]),
                with("C", "c1", &other),
            ])
            .await;
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        match conflict {
            Err(JournalError::Conflict(c)) => assert_eq!(
                c,
                [Conflict {
                    index: 1,
                    fn_call_id: "c1".into(),
                    existing_id: "A".into(),
                    fields: vec!["status", "errorMessage"],
                }]
            ),
            other => panic!("expected a conflict, got {other:?}"),
        }
        // The request's other event was not written; the group was.
        assert_eq!(j.stats().await.unwrap().pending, 51);
        assert_eq!(j.pending(), 51);
        // The same content again is an ordinary re-post.
        let again = j.append(vec![with("D", "c1", &[1; 72])]).await.unwrap();
        assert_eq!(again[0].id, "A");
        assert!(again[0].existing);
    }
}

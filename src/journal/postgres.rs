//! The PostgreSQL journal (SPEC section 11): one database shared by any
//! number of replicas.
//!
//! Tables (created and migrated by [`migrate`] under an advisory lock):
//!
//! - `fnrelay_accepted`: one row per fnCallId ever accepted (record id,
//!   field digests), written once: idempotency across replicas through its
//!   primary key, pruned with its `fnrelay_done` row.
//! - `fnrelay_done`: what a delivered or skipped record was (destination,
//!   attempts, recent attempts, when), for lookups; insert-only, pruned
//!   after `journal.delivered_retention`.
//! - `fnrelay_records`: the hot table: records waiting (`pending`) and dead
//!   letters (`dead`). A delivered record leaves it. `due_at` is the next
//!   attempt, and while a record is claimed, the end of its lease (pgmq's
//!   visibility timeout): an expired lease is simply due again. `token` is
//!   the claim token (0 when not claimed); an outcome is written only where
//!   the token still holds.
//!
//! Ingest group-commits: concurrent appends of this replica share one
//! transaction (each in a savepoint, so a conflicting re-post rolls back
//! only its own request), and the COMMIT returns before any 202. Claims take
//! a lane's due records with `FOR UPDATE SKIP LOCKED`. A `NOTIFY` at commit
//! wakes every replica's lanes; lanes also poll, so a lost notification
//! costs at most a poll interval.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio_postgres::AsyncMessage;

use super::{
    Appended, Claimed, Conflict, DeadLetter, FunctionDestinations, Journal, JournalError, Lane,
    Lookup, NewRecord, Outcome, RecordView, Stats, Target, Watch, Watched, ms_to_rfc3339, now_ms,
    parse_notes,
};
use crate::config::JournalConfig;
use crate::logging::RateLimited;
use crate::record::{DestKind, DestinationType};

/// The schema versions this build knows, in order. Never edit one that has
/// shipped: add the next.
const MIGRATIONS: &[&str] = &[
    // 1: the accepted table, the hot records table, claim tokens.
    "CREATE TABLE fnrelay_accepted (
        fn_call_id  text PRIMARY KEY,
        id          text NOT NULL,
        digest      bytea,
        accepted_at bigint NOT NULL,
        done_at     bigint
    );
    CREATE INDEX fnrelay_accepted_done ON fnrelay_accepted (done_at) WHERE done_at IS NOT NULL;
    CREATE TABLE fnrelay_records (
        id               text PRIMARY KEY,
        fn_call_id       text NOT NULL,
        function_id      text NOT NULL,
        destination_type text NOT NULL,
        kind             text NOT NULL,
        resource_id      text NOT NULL,
        channel_id       text,
        body             text NOT NULL,
        state            text NOT NULL,
        attempts         integer NOT NULL DEFAULT 0,
        accepted_at      bigint NOT NULL,
        age_from         bigint NOT NULL,
        due_at           bigint NOT NULL,
        token            bigint NOT NULL DEFAULT 0,
        last_error       text,
        error_label      text
    ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01,
            autovacuum_analyze_scale_factor = 0.02);
    CREATE INDEX fnrelay_records_lane_due ON fnrelay_records (kind, resource_id, due_at)
        WHERE state = 'pending';
    CREATE INDEX fnrelay_records_pending_age ON fnrelay_records (accepted_at)
        WHERE state = 'pending';
    CREATE INDEX fnrelay_records_dead ON fnrelay_records (id) WHERE state = 'dead';
    CREATE SEQUENCE fnrelay_claim_tokens;",
    // 2: record lookups: each record's last attempts, and what a delivered
    // record was (its row leaves the hot table) kept with its fnCallId.
    "ALTER TABLE fnrelay_records ADD COLUMN recent jsonb;
    ALTER TABLE fnrelay_accepted ADD COLUMN summary jsonb;
    CREATE INDEX fnrelay_accepted_id ON fnrelay_accepted (id);",
    // 3: started invocations the lost-completion watchdog waits on.
    "CREATE TABLE fnrelay_watches (
        fn_call_id     text PRIMARY KEY,
        function_id    text NOT NULL,
        application_id text NOT NULL,
        compartment_id text NOT NULL,
        opc_request_id text,
        deadline       bigint NOT NULL,
        claimed_until  bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX fnrelay_watches_deadline ON fnrelay_watches (deadline);",
    // 4: destinations teams set per function through the API.
    "CREATE TABLE fnrelay_destinations (
        function_id text PRIMARY KEY,
        doc         jsonb NOT NULL
    );",
    // 5: what a delivered (or skipped) record was moves to an insert-only
    // table: updating its `fnrelay_accepted` row wrote a new tuple and an
    // entry in each of that table's indexes for every delivered record.
    // `fnrelay_accepted` is now written once, at accept.
    "CREATE TABLE fnrelay_done (
        id               text PRIMARY KEY,
        fn_call_id       text NOT NULL,
        function_id      text,
        destination_type text,
        kind             text,
        resource_id      text,
        channel_id       text,
        attempts         integer NOT NULL DEFAULT 0,
        done_at          bigint NOT NULL,
        recent           jsonb
    ) WITH (autovacuum_vacuum_scale_factor = 0.05);
    CREATE INDEX fnrelay_done_at ON fnrelay_done USING brin (done_at);
    INSERT INTO fnrelay_done (id, fn_call_id, function_id, destination_type, kind, resource_id,
                              channel_id, attempts, done_at, recent)
        SELECT id, fn_call_id, summary->>'functionId', summary->>'destinationType',
               summary->>'kind', summary->>'resourceId', summary->>'channelId',
               coalesce((summary->>'attempts')::integer, 0), done_at,
               nullif(summary->'recent', 'null'::jsonb)
        FROM fnrelay_accepted WHERE done_at IS NOT NULL
        ON CONFLICT (id) DO NOTHING;
    DROP INDEX fnrelay_accepted_id;
    DROP INDEX fnrelay_accepted_done;
    ALTER TABLE fnrelay_accepted DROP COLUMN summary, DROP COLUMN done_at;",
];

/// The schema version this build creates and knows.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// SQL appending the note `note` (JSON text, or NULL) to `recent`, keeping
/// at most `kept` entries.
fn append_note(recent: &str, note: &str, kept: &str) -> String {
    format!(
        "CASE WHEN {note} IS NULL THEN {recent}
              WHEN {recent} IS NULL THEN jsonb_build_array({note}::jsonb)
              WHEN jsonb_array_length({recent}) >= {kept} THEN ({recent} - 0) || jsonb_build_array({note}::jsonb)
              ELSE {recent} || jsonb_build_array({note}::jsonb) END"
    )
}

/// A statement from the connection's cache: prepared once per connection,
/// so the hot path sends one round trip per statement, not two.
async fn cached(
    c: &impl GenericClient,
    sql: &str,
) -> Result<tokio_postgres::Statement, JournalError> {
    c.prepare_cached(sql).await.map_err(pg)
}

/// The advisory lock migrations run under (any constant shared by builds).
const MIGRATION_LOCK: i64 = 0x666e_7265_6c61_7901;
/// The channel replicas wake each other on.
const CHANNEL: &str = "fnrelay_records";
/// Appends one group-commit transaction takes at most.
const MAX_GROUP: usize = 256;
/// Transactions appending at once (each on its own connection).
const APPENDERS: usize = 4;
/// How often the pending gauge is recounted from the database.
const RECOUNT_EVERY: Duration = Duration::from_secs(2);

/// A journal in a shared PostgreSQL database.
pub struct PgJournal {
    pool: Pool,
    appends: mpsc::Sender<AppendJob>,
    pending: Arc<AtomicU64>,
    wake: Arc<Notify>,
    /// `journal.attempts_kept`.
    attempts_kept: AtomicU64,
}

type AppendResult = Result<Result<Vec<Appended>, Vec<Conflict>>, JournalError>;

struct AppendJob {
    records: Vec<NewRecord>,
    reply: oneshot::Sender<AppendResult>,
}

fn pg(e: tokio_postgres::Error) -> JournalError {
    JournalError::Postgres(e)
}

fn pool_error(e: deadpool_postgres::PoolError) -> JournalError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => JournalError::Postgres(e),
        other => JournalError::Unavailable(other.to_string()),
    }
}

/// TLS for the database: rustls with the roots of `ca_file`, or the
/// system's. Used only when the URL's `sslmode` asks for it.
fn tls(config: &JournalConfig) -> Result<tokio_postgres_rustls::MakeRustlsConnect, JournalError> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            use rustls_pki_types::pem::PemObject;
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    JournalError::Unavailable(format!(
                        "cannot read journal.ca_file {}: {e}",
                        path.display()
                    ))
                })?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    JournalError::Unavailable(format!("journal.ca_file {}: {e}", path.display()))
                })?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| JournalError::Unavailable(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
}

fn pg_config(config: &JournalConfig) -> Result<tokio_postgres::Config, JournalError> {
    let url = config.postgres_url().map_err(JournalError::Unavailable)?;
    let mut pg: tokio_postgres::Config = url.parse().map_err(|e| {
        JournalError::Unavailable(format!("journal.url is not a PostgreSQL URL ({e})"))
    })?;
    if pg.get_application_name().is_none() {
        pg.application_name("fnrelay");
    }
    // TLS is verified, always: `sslmode=require` checks the server against
    // `journal.ca_file` (or the system's roots). The default `prefer` means
    // TLS only when a `ca_file` is given, since an unverified "maybe TLS"
    // protects nothing.
    if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Prefer {
        if config.ca_file.is_some() {
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
        } else {
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
    }
    pg.connect_timeout(Duration::from_secs(5));
    Ok(pg)
}

/// Applies the migrations this build knows, under an advisory lock so
/// replicas starting together do not race. Refuses a schema newer than
/// this build. Returns the schema version.
pub async fn migrate(config: &JournalConfig) -> Result<usize, JournalError> {
    migrate_to(config, MIGRATIONS.len()).await
}

/// [`migrate`], stopping at schema version `target` (at most
/// [`SCHEMA_VERSION`]): how the upgrade tests build an older schema.
pub async fn migrate_to(config: &JournalConfig, target: usize) -> Result<usize, JournalError> {
    let target = target.min(MIGRATIONS.len());
    let pg_config = pg_config(config)?;
    let (mut client, connection) = pg_config.connect(tls(config)?).await.map_err(pg)?;
    let conn = tokio::spawn(connection);
    let result = async {
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg)?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS fnrelay_schema (
                    version integer PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .map_err(pg)?;
        let current: i32 = client
            .query_one("SELECT coalesce(max(version), 0) FROM fnrelay_schema", &[])
            .await
            .map_err(pg)?
            .get(0);
        let current = current as usize;
        if current > MIGRATIONS.len() {
            return Err(JournalError::SchemaTooNew {
                found: current,
                known: MIGRATIONS.len(),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().take(target).skip(current) {
            let version = (i + 1) as i32;
            let tx = client.transaction().await.map_err(pg)?;
            tx.batch_execute(sql).await.map_err(pg)?;
            tx.execute(
                "INSERT INTO fnrelay_schema (version) VALUES ($1)",
                &[&version],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            tracing::info!(version, "journal schema migrated");
        }
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg)?;
        Ok(current.max(target))
    }
    .await;
    drop(client);
    let _ = conn.await;
    result
}

/// Checks, without changing anything, that the database answers, is
/// writable (not a standby) and holds a schema this build can use. Returns
/// the schema version (0: not created yet; the first start creates it).
pub async fn check(config: &JournalConfig) -> Result<usize, JournalError> {
    let pg_config = pg_config(config)?;
    let (client, connection) = pg_config.connect(tls(config)?).await.map_err(pg)?;
    let conn = tokio::spawn(connection);
    let result = async {
        let standby: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(pg)?
            .get(0);
        if standby {
            return Err(JournalError::Unavailable(
                "the database is a read-only standby; point journal.url at the primary".into(),
            ));
        }
        let exists: bool = client
            .query_one("SELECT to_regclass('fnrelay_schema') IS NOT NULL", &[])
            .await
            .map_err(pg)?
            .get(0);
        if !exists {
            return Ok(0);
        }
        let version: i32 = client
            .query_one("SELECT coalesce(max(version), 0) FROM fnrelay_schema", &[])
            .await
            .map_err(pg)?
            .get(0);
        if version as usize > MIGRATIONS.len() {
            return Err(JournalError::SchemaTooNew {
                found: version as usize,
                known: MIGRATIONS.len(),
            });
        }
        Ok(version as usize)
    }
    .await;
    drop(client);
    let _ = conn.await;
    result
}

impl PgJournal {
    /// How many attempts to keep per record for lookups
    /// (`journal.attempts_kept`).
    pub fn set_attempts_kept(&self, n: usize) {
        self.attempts_kept.store(
            n.clamp(1, super::MAX_ATTEMPTS_KEPT) as u64,
            Ordering::Relaxed,
        );
    }

    /// Connects, migrates the schema, and starts the appenders, the
    /// listener that wakes `wake` when another replica commits records, and
    /// the pending recount.
    pub async fn open(config: &JournalConfig, wake: Arc<Notify>) -> Result<Self, JournalError> {
        migrate(config).await?;
        let pg_config = pg_config(config)?;
        let manager = Manager::from_config(
            pg_config.clone(),
            tls(config)?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.max_connections)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| JournalError::Unavailable(e.to_string()))?;
        let pending = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel::<AppendJob>(4096);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..APPENDERS {
            tokio::spawn(appender(pool.clone(), rx.clone(), pending.clone()));
        }
        tokio::spawn(listen(pg_config, tls(config)?, wake.clone()));
        let journal = Self {
            pool,
            appends: tx,
            pending,
            wake,
            attempts_kept: AtomicU64::new(10),
        };
        journal.resync().await?;
        tokio::spawn(recount(journal.pool.clone(), journal.pending.clone()));
        Ok(journal)
    }
}

/// Keeps one connection listening on [`CHANNEL`]; reconnects after a loss.
async fn listen(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    wake: Arc<Notify>,
) {
    let errors = RateLimited::new(Duration::from_secs(60));
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let statement = format!("LISTEN {CHANNEL}");
                let listening = client.batch_execute(&statement);
                tokio::pin!(listening);
                // Drive the connection while LISTEN runs, then read
                // notifications until it ends.
                let mut listened = false;
                loop {
                    tokio::select! {
                        r = &mut listening, if !listened => {
                            listened = true;
                            if r.is_err() { break; }
                            // Records may have arrived while not listening.
                            wake.notify_one();
                        }
                        m = messages.next() => match m {
                            Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => break,
                        }
                    }
                }
            }
            Err(e) => {
                if let Some(suppressed) = errors.allow(&e.to_string()) {
                    tracing::warn!(error = %crate::logging::Chain(&e), suppressed, "journal: cannot listen for new records; lanes poll meanwhile");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Recounts the pending gauge (the high-water check reads it) every
/// [`RECOUNT_EVERY`], or less often when counting is slow.
async fn recount(pool: Pool, pending: Arc<AtomicU64>) {
    loop {
        let began = std::time::Instant::now();
        if let Ok(n) = count_pending(&pool).await {
            pending.store(n, Ordering::Relaxed);
        }
        let took = began.elapsed();
        tokio::time::sleep(RECOUNT_EVERY.max(took * 20)).await;
    }
}

async fn count_pending(pool: &Pool) -> Result<u64, JournalError> {
    let client = pool.get().await.map_err(pool_error)?;
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM fnrelay_records WHERE state = 'pending'",
            &[],
        )
        .await
        .map_err(pg)?
        .get(0);
    Ok(n as u64)
}

/// Takes appends and commits them in groups.
async fn appender(
    pool: Pool,
    jobs: Arc<Mutex<mpsc::Receiver<AppendJob>>>,
    pending: Arc<AtomicU64>,
) {
    loop {
        let mut group = Vec::new();
        {
            let mut rx = jobs.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut n = first.records.len();
            group.push(first);
            while n < MAX_GROUP * 16 && group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => {
                        n += job.records.len();
                        group.push(job);
                    }
                    Err(_) => break,
                }
            }
        }
        match commit_group(&pool, &group).await {
            Ok((results, added)) => {
                pending.fetch_add(added, Ordering::Relaxed);
                for (job, result) in group.into_iter().zip(results) {
                    let _ = job.reply.send(Ok(result));
                }
            }
            Err(e) => {
                let text = crate::logging::Chain(&e).to_string();
                for job in group {
                    let _ = job.reply.send(Err(JournalError::Commit(text.clone())));
                }
            }
        }
    }
}

/// One transaction for the whole group; each job in a savepoint.
async fn commit_group(
    pool: &Pool,
    group: &[AppendJob],
) -> Result<(Vec<Result<Vec<Appended>, Vec<Conflict>>>, u64), JournalError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let mut tx = client.transaction().await.map_err(pg)?;
    let mut results = Vec::with_capacity(group.len());
    let mut added = 0u64;
    for job in group {
        let sp = tx.savepoint("request").await.map_err(pg)?;
        match append_one(&sp, &job.records).await? {
            Ok((appended, n)) => {
                sp.commit().await.map_err(pg)?;
                added += n;
                results.push(Ok(appended));
            }
            Err(conflicts) => {
                sp.rollback().await.map_err(pg)?;
                results.push(Err(conflicts));
            }
        }
    }
    if added > 0 {
        tx.execute(&cached(&tx, "SELECT pg_notify($1, '')").await?, &[&CHANNEL])
            .await
            .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)?;
    Ok((results, added))
}

/// Appends one request's records. `Ok(Err)` when a re-post conflicts (the
/// caller rolls the savepoint back).
async fn append_one(
    tx: &impl GenericClient,
    records: &[NewRecord],
) -> Result<Result<(Vec<Appended>, u64), Vec<Conflict>>, JournalError> {
    let calls: Vec<&str> = records.iter().map(|r| r.fn_call_id.as_str()).collect();
    let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let digests: Vec<&[u8]> = records.iter().map(|r| r.digest.as_slice()).collect();
    let accepted: Vec<i64> = records.iter().map(|r| r.accepted_at_ms).collect();
    let inserted: HashSet<String> = tx
        .query(
            &cached(
                tx,
                "INSERT INTO fnrelay_accepted (fn_call_id, id, digest, accepted_at)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int8[])
             ON CONFLICT (fn_call_id) DO NOTHING
             RETURNING fn_call_id",
            )
            .await?,
            &[&calls, &ids, &digests, &accepted],
        )
        .await
        .map_err(pg)?
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    // The first occurrence of an inserted fnCallId is new; anything else is
    // a re-post (of an earlier request, or earlier in this one).
    let mut first_seen = HashSet::new();
    let is_new: Vec<bool> = records
        .iter()
        .map(|r| inserted.contains(&r.fn_call_id) && first_seen.insert(r.fn_call_id.as_str()))
        .collect();
    let known: HashMap<String, (String, Option<Vec<u8>>)> = if is_new.iter().all(|n| *n) {
        HashMap::new()
    } else {
        let others: Vec<&str> = records
            .iter()
            .zip(&is_new)
            .filter(|(_, new)| !**new)
            .map(|(r, _)| r.fn_call_id.as_str())
            .collect();
        tx.query(
            &cached(
                tx,
                "SELECT fn_call_id, id, digest FROM fnrelay_accepted WHERE fn_call_id = ANY($1)",
            )
            .await?,
            &[&others],
        )
        .await
        .map_err(pg)?
        .into_iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect()
    };
    let mut out = Vec::with_capacity(records.len());
    let mut conflicts = Vec::new();
    for (index, (r, new)) in records.iter().zip(&is_new).enumerate() {
        if *new {
            out.push(Appended {
                id: r.id.clone(),
                existing: false,
            });
            continue;
        }
        let Some((id, digest)) = known.get(&r.fn_call_id) else {
            // Accepted by a transaction that has not committed and then
            // rolled back: nothing to compare with; the caller retries.
            return Err(JournalError::Commit(format!(
                "fnCallId {} is being written by another request; retry",
                crate::logging::clip(&r.fn_call_id)
            )));
        };
        let fields = digest
            .as_deref()
            .map(|d| crate::record::differing_fields(d, &r.digest))
            .unwrap_or_default();
        if !fields.is_empty() {
            conflicts.push(Conflict {
                index,
                fn_call_id: r.fn_call_id.clone(),
                existing_id: id.clone(),
                fields,
            });
        }
        out.push(Appended {
            id: id.clone(),
            existing: true,
        });
    }
    if !conflicts.is_empty() {
        return Ok(Err(conflicts));
    }
    let fresh: Vec<(&NewRecord, &Target)> = records
        .iter()
        .zip(&is_new)
        .filter(|(_, new)| **new)
        .filter_map(|(r, _)| r.target.as_ref().map(|t| (r, t)))
        .collect();
    // Records without a destination are done as they are accepted.
    let skipped: Vec<&NewRecord> = records
        .iter()
        .zip(&is_new)
        .filter(|(r, new)| **new && r.target.is_none())
        .map(|(r, _)| r)
        .collect();
    if !skipped.is_empty() {
        let ids: Vec<&str> = skipped.iter().map(|r| r.id.as_str()).collect();
        let calls: Vec<&str> = skipped.iter().map(|r| r.fn_call_id.as_str()).collect();
        let functions: Vec<&str> = skipped.iter().map(|r| r.function_id.as_str()).collect();
        let types: Vec<&str> = skipped
            .iter()
            .map(|r| r.destination_type.as_str())
            .collect();
        let at: Vec<i64> = skipped.iter().map(|r| r.accepted_at_ms).collect();
        tx.execute(
            &cached(
                tx,
                "INSERT INTO fnrelay_done (id, fn_call_id, function_id, destination_type, done_at)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[])",
            )
            .await?,
            &[&ids, &calls, &functions, &types, &at],
        )
        .await
        .map_err(pg)?;
    }
    if !fresh.is_empty() {
        let col = |f: &dyn Fn(&NewRecord, &Target) -> String| -> Vec<String> {
            fresh.iter().map(|(r, t)| f(r, t)).collect()
        };
        let ids = col(&|r, _| r.id.clone());
        let calls = col(&|r, _| r.fn_call_id.clone());
        let functions = col(&|r, _| r.function_id.clone());
        let types = col(&|r, _| r.destination_type.as_str().to_string());
        let kinds = col(&|_, t| t.kind.as_str().to_string());
        let resources = col(&|_, t| t.resource_id.clone());
        let channels: Vec<Option<&str>> =
            fresh.iter().map(|(_, t)| t.channel_id.as_deref()).collect();
        let bodies: Vec<&str> = fresh.iter().map(|(r, _)| r.body.as_str()).collect();
        let at: Vec<i64> = fresh.iter().map(|(r, _)| r.accepted_at_ms).collect();
        tx.execute(
            &cached(
                tx,
                "INSERT INTO fnrelay_records (id, fn_call_id, function_id, destination_type, kind,
                 resource_id, channel_id, body, state, accepted_at, age_from, due_at)
             SELECT id, call, func, dt, kind, res, chan, body, 'pending', at, at, at
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::text[], $9::int8[])
                  AS n(id, call, func, dt, kind, res, chan, body, at)",
            )
            .await?,
            &[
                &ids, &calls, &functions, &types, &kinds, &resources, &channels, &bodies, &at,
            ],
        )
        .await
        .map_err(pg)?;
    }
    Ok(Ok((out, fresh.len() as u64)))
}

const RETURNING: &str = "RETURNING r.id, r.fn_call_id, r.function_id, r.destination_type, r.kind,
    r.resource_id, r.channel_id, r.body, r.attempts, r.accepted_at, r.age_from, r.token";

fn row_to_claimed(row: &tokio_postgres::Row) -> Claimed {
    let kind: String = row.get(4);
    let attempts: i32 = row.get(8);
    let token: i64 = row.get(11);
    Claimed {
        id: row.get(0),
        fn_call_id: row.get(1),
        function_id: row.get(2),
        destination_type: DestinationType::parse(row.get(3)).unwrap_or(DestinationType::Failure),
        target: Target {
            kind: DestKind::parse(&kind).unwrap_or(DestKind::Queue),
            resource_id: row.get(5),
            channel_id: row.get(6),
        },
        body: row.get(7),
        attempts: attempts as u32,
        accepted_at_ms: row.get(9),
        age_from_ms: row.get(10),
        token: token as u64,
    }
}

impl PgJournal {
    async fn claim_where(
        &self,
        lane: &Lane,
        condition: &str,
        bound: i64,
        now: i64,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, JournalError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let sql = format!(
            "WITH c AS MATERIALIZED (
                 SELECT id FROM fnrelay_records
                 WHERE kind = $1 AND resource_id = $2 AND state = 'pending' AND {condition}
                 ORDER BY due_at LIMIT $4 FOR UPDATE SKIP LOCKED)
             UPDATE fnrelay_records r SET due_at = $5, token = nextval('fnrelay_claim_tokens')
             FROM c WHERE r.id = c.id {RETURNING}"
        );
        let until = now + lease.as_millis() as i64;
        let rows = client
            .query(
                &cached(&client, &sql).await?,
                &[
                    &lane.kind.as_str(),
                    &lane.resource_id,
                    &bound,
                    &(limit as i64),
                    &until,
                    &now,
                ],
            )
            .await
            .map_err(pg)?;
        let mut claimed: Vec<Claimed> = rows.iter().map(row_to_claimed).collect();
        claimed.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(claimed)
    }
}

#[async_trait]
impl Journal for PgJournal {
    async fn append(&self, records: Vec<NewRecord>) -> Result<Vec<Appended>, JournalError> {
        let (reply, answer) = oneshot::channel();
        self.appends
            .send(AppendJob { records, reply })
            .await
            .map_err(|_| JournalError::Closed)?;
        match answer.await.map_err(|_| JournalError::Closed)?? {
            Ok(appended) => Ok(appended),
            Err(conflicts) => Err(JournalError::Conflict(conflicts)),
        }
    }

    async fn claim(
        &self,
        lane: &Lane,
        now_ms: i64,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, JournalError> {
        // $6 (now) is unused by this condition but keeps one statement shape.
        self.claim_where(
            lane,
            "due_at <= $3 AND $6::int8 IS NOT NULL",
            now_ms,
            now_ms,
            limit,
            lease,
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
        // Due or not, but never a record another claim holds.
        self.claim_where(
            lane,
            "age_from < $3 AND (token = 0 OR due_at <= $6)",
            age_from_before_ms,
            now_ms(),
            limit,
            lease,
        )
        .await
    }

    async fn pending_lanes(&self) -> Result<Vec<Lane>, JournalError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                "SELECT DISTINCT kind, resource_id FROM fnrelay_records WHERE state = 'pending'",
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(Lane {
                    kind: DestKind::parse(r.get(0))?,
                    resource_id: r.get(1),
                })
            })
            .collect())
    }

    async fn next_due(&self, lane: &Lane) -> Result<Option<i64>, JournalError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_one(
                &cached(
                    &client,
                    "SELECT min(due_at) FROM fnrelay_records
                 WHERE kind = $1 AND resource_id = $2 AND state = 'pending'",
                )
                .await?,
                &[&lane.kind.as_str(), &lane.resource_id],
            )
            .await
            .map_err(pg)?;
        Ok(row.get(0))
    }

    async fn complete_noted(
        &self,
        outcomes: Vec<Outcome>,
        notes: Vec<Option<String>>,
    ) -> Result<Vec<bool>, JournalError> {
        let now = now_ms();
        let kept = self.attempts_kept.load(Ordering::Relaxed) as i32;
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(pg)?;
        let mut applied: HashSet<String> = HashSet::new();

        let (mut d_ids, mut d_tokens, mut d_attempts, mut d_notes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut r_ids, mut r_tokens, mut r_attempts, mut r_at, mut r_errors, mut r_notes) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let (mut l_ids, mut l_tokens, mut l_at, mut l_notes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut x_ids, mut x_tokens, mut x_attempts, mut x_errors, mut x_labels, mut x_notes) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for (o, note) in outcomes.iter().zip(&notes) {
            let note = note.as_deref();
            match o {
                Outcome::Delivered {
                    id,
                    token,
                    attempts,
                } => {
                    d_ids.push(id.as_str());
                    d_tokens.push(*token as i64);
                    d_attempts.push(*attempts as i32);
                    d_notes.push(note);
                }
                Outcome::Retry {
                    id,
                    token,
                    attempts,
                    next_attempt_at_ms,
                    error,
                } => {
                    r_ids.push(id.as_str());
                    r_tokens.push(*token as i64);
                    r_attempts.push(*attempts as i32);
                    r_at.push(*next_attempt_at_ms);
                    r_errors.push(error.as_str());
                    r_notes.push(note);
                }
                Outcome::Release {
                    id,
                    token,
                    next_attempt_at_ms,
                } => {
                    l_ids.push(id.as_str());
                    l_tokens.push(*token as i64);
                    l_at.push(*next_attempt_at_ms);
                    l_notes.push(note);
                }
                Outcome::Dead {
                    id,
                    token,
                    attempts,
                    error,
                    label,
                } => {
                    x_ids.push(id.as_str());
                    x_tokens.push(*token as i64);
                    x_attempts.push(*attempts as i32);
                    x_errors.push(error.as_str());
                    x_labels.push(label.as_str());
                    x_notes.push(note);
                }
            }
        }
        let mut collect = |rows: Vec<tokio_postgres::Row>| {
            applied.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        };
        let mut delivered = 0u64;
        if !d_ids.is_empty() {
            let rows = tx
                .query(
                    &cached(
                        &tx,
                        &format!(
                            // The row leaves the hot table; what a lookup shows
                            // of a delivered record goes to the insert-only
                            // `fnrelay_done`.
                            "WITH d AS (
                         DELETE FROM fnrelay_records r
                         USING unnest($1::text[], $2::int8[], $4::int4[], $5::text[])
                             AS o(id, token, attempts, note)
                         WHERE r.id = o.id AND r.token = o.token AND r.state = 'pending'
                         RETURNING r.id, r.fn_call_id, r.function_id, r.destination_type, r.kind,
                             r.resource_id, r.channel_id, o.attempts, {} AS recent)
                     INSERT INTO fnrelay_done (id, fn_call_id, function_id, destination_type,
                         kind, resource_id, channel_id, attempts, done_at, recent)
                     SELECT id, fn_call_id, function_id, destination_type, kind, resource_id,
                         channel_id, attempts, $3, recent FROM d
                     RETURNING id",
                            append_note("r.recent", "o.note", "$6")
                        ),
                    )
                    .await?,
                    &[&d_ids, &d_tokens, &now, &d_attempts, &d_notes, &kept],
                )
                .await
                .map_err(pg)?;
            delivered = rows.len() as u64;
            collect(rows);
        }
        if !r_ids.is_empty() {
            collect(
                tx.query(
                    &cached(&tx, &format!(
                        "UPDATE fnrelay_records r SET attempts = o.attempts, due_at = o.at,
                         last_error = o.error, token = 0, recent = {}
                     FROM unnest($1::text[], $2::int8[], $3::int4[], $4::int8[], $5::text[], $6::text[])
                          AS o(id, token, attempts, at, error, note)
                     WHERE r.id = o.id AND r.token = o.token AND r.state = 'pending'
                     RETURNING r.id",
                        append_note("r.recent", "o.note", "$7")
                    )).await?,
                    &[
                        &r_ids, &r_tokens, &r_attempts, &r_at, &r_errors, &r_notes, &kept,
                    ],
                )
                .await
                .map_err(pg)?,
            );
        }
        if !l_ids.is_empty() {
            collect(
                tx.query(
                    &cached(&tx, &format!(
                        "UPDATE fnrelay_records r SET due_at = o.at, token = 0, recent = {}
                     FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[]) AS o(id, token, at, note)
                     WHERE r.id = o.id AND r.token = o.token AND r.state = 'pending'
                     RETURNING r.id",
                        append_note("r.recent", "o.note", "$5")
                    )).await?,
                    &[&l_ids, &l_tokens, &l_at, &l_notes, &kept],
                )
                .await
                .map_err(pg)?,
            );
        }
        let mut dead = 0u64;
        if !x_ids.is_empty() {
            let rows = tx
                .query(
                    &cached(&tx, &format!(
                        "UPDATE fnrelay_records r SET state = 'dead', attempts = o.attempts,
                         last_error = o.error, error_label = o.label, due_at = $6, token = 0,
                         recent = {}
                     FROM unnest($1::text[], $2::int8[], $3::int4[], $4::text[], $5::text[], $7::text[])
                          AS o(id, token, attempts, error, label, note)
                     WHERE r.id = o.id AND r.token = o.token AND r.state = 'pending'
                     RETURNING r.id",
                        append_note("r.recent", "o.note", "$8")
                    )).await?,
                    &[
                        &x_ids, &x_tokens, &x_attempts, &x_errors, &x_labels, &now, &x_notes,
                        &kept,
                    ],
                )
                .await
                .map_err(pg)?;
            dead = rows.len() as u64;
            collect(rows);
        }
        tx.commit().await.map_err(pg)?;
        let gone = delivered + dead;
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                Some(p.saturating_sub(gone))
            });
        Ok(outcomes.iter().map(|o| applied.contains(o.id())).collect())
    }

    async fn lookup(&self, by: Lookup) -> Result<Option<RecordView>, JournalError> {
        let now = now_ms();
        let client = self.pool.get().await.map_err(pool_error)?;
        let id = match by {
            Lookup::Id(id) => id,
            Lookup::FnCallId(call) => {
                let Some(row) = client
                    .query_opt(
                        "SELECT id FROM fnrelay_accepted WHERE fn_call_id = $1",
                        &[&call],
                    )
                    .await
                    .map_err(pg)?
                else {
                    return Ok(None);
                };
                row.get(0)
            }
        };
        // Waiting or dead: the hot table.
        if let Some(r) = client
            .query_opt(
                "SELECT function_id, destination_type, kind, resource_id, channel_id, state,
                        attempts, due_at, token, last_error, error_label, recent::text,
                        fn_call_id, accepted_at
                 FROM fnrelay_records WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(pg)?
        {
            let state: String = r.get(5);
            let due: i64 = r.get(7);
            let token: i64 = r.get(8);
            let pending = state == "pending";
            let inflight = pending && token != 0 && due > now;
            let attempts: i32 = r.get(6);
            return Ok(Some(RecordView {
                id,
                fn_call_id: r.get(12),
                function_id: r.get(0),
                destination_type: Some(r.get(1)),
                target: DestKind::parse(r.get::<_, &str>(2)).map(|kind| Target {
                    kind,
                    resource_id: r.get(3),
                    channel_id: r.get(4),
                }),
                attempts: attempts as u32,
                next_attempt_at_ms: (pending && !inflight).then_some(due),
                accepted_at_ms: r.get(13),
                finished_at_ms: (!pending).then_some(due),
                last_error: r.get(9),
                error_label: r.get(10),
                recent: parse_notes(r.get::<_, Option<&str>>(11)),
                state: if inflight { "inflight".into() } else { state },
            }));
        }
        // Delivered, or skipped (no destination).
        let Some(r) = client
            .query_opt(
                "SELECT d.fn_call_id, d.function_id, d.destination_type, d.kind, d.resource_id,
                        d.channel_id, d.attempts, d.done_at, d.recent::text, a.accepted_at
                 FROM fnrelay_done d LEFT JOIN fnrelay_accepted a USING (fn_call_id)
                 WHERE d.id = $1",
                &[&id],
            )
            .await
            .map_err(pg)?
        else {
            return Ok(None);
        };
        let kind: Option<&str> = r.get(3);
        let target = match (
            kind.and_then(DestKind::parse),
            r.get::<_, Option<String>>(4),
        ) {
            (Some(kind), Some(resource_id)) => Some(Target {
                kind,
                resource_id,
                channel_id: r.get(5),
            }),
            _ => None,
        };
        let attempts: i32 = r.get(6);
        let done_at: i64 = r.get(7);
        let view = RecordView {
            id,
            fn_call_id: r.get(0),
            function_id: r.get::<_, Option<String>>(1).unwrap_or_default(),
            state: if kind.is_some() {
                "delivered".into()
            } else {
                "skipped".into()
            },
            destination_type: r.get(2),
            target,
            attempts: attempts as u32,
            next_attempt_at_ms: None,
            accepted_at_ms: r.get::<_, Option<i64>>(9).unwrap_or(done_at),
            finished_at_ms: Some(done_at),
            last_error: None,
            error_label: None,
            recent: parse_notes(r.get::<_, Option<&str>>(8)),
        };
        Ok(Some(view.with_first_delivery()))
    }

    async fn watch(&self, watch: Watch) -> Result<Watched, JournalError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        // One statement: the record's id if the call is known, else the
        // watch registered (or its deadline moved).
        let row = client
            .query_one(
                &cached(
                    &client,
                    "WITH known AS (SELECT id FROM fnrelay_accepted WHERE fn_call_id = $1),
                      w AS (INSERT INTO fnrelay_watches (fn_call_id, function_id, application_id,
                                compartment_id, opc_request_id, deadline)
                            SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS (SELECT 1 FROM known)
                            ON CONFLICT (fn_call_id) DO UPDATE SET deadline = EXCLUDED.deadline,
                                claimed_until = 0)
                 SELECT (SELECT id FROM known)",
                )
                .await?,
                &[
                    &watch.fn_call_id,
                    &watch.function_id,
                    &watch.application_id,
                    &watch.compartment_id,
                    &watch.opc_request_id,
                    &watch.deadline_ms,
                ],
            )
            .await
            .map_err(pg)?;
        Ok(match row.get::<_, Option<String>>(0) {
            Some(id) => Watched::Completed { id },
            None => Watched::Watching,
        })
    }

    async fn due_watches(
        &self,
        now_ms: i64,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Watch>, JournalError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let until = now_ms + lease.as_millis() as i64;
        let rows = client
            .query(
                "UPDATE fnrelay_watches w SET claimed_until = $2
                 WHERE fn_call_id IN (
                     SELECT fn_call_id FROM fnrelay_watches
                     WHERE deadline <= $1 AND claimed_until <= $1
                     ORDER BY deadline LIMIT $3 FOR UPDATE SKIP LOCKED)
                 RETURNING fn_call_id, function_id, application_id, compartment_id,
                           opc_request_id, deadline",
                &[&now_ms, &until, &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| Watch {
                fn_call_id: r.get(0),
                function_id: r.get(1),
                application_id: r.get(2),
                compartment_id: r.get(3),
                opc_request_id: r.get(4),
                deadline_ms: r.get(5),
            })
            .collect())
    }

    async fn unwatch(&self, fn_call_ids: Vec<String>) -> Result<(), JournalError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        client
            .execute(
                "DELETE FROM fnrelay_watches WHERE fn_call_id = ANY($1)",
                &[&fn_call_ids],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn put_destinations(
        &self,
        destinations: FunctionDestinations,
    ) -> Result<Option<FunctionDestinations>, JournalError> {
        let doc = serde_json::to_string(&destinations).expect("serializable");
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_one(
                "WITH old AS (SELECT doc FROM fnrelay_destinations WHERE function_id = $1),
                      up AS (INSERT INTO fnrelay_destinations (function_id, doc)
                             VALUES ($1, $2::text::jsonb)
                             ON CONFLICT (function_id) DO UPDATE SET doc = EXCLUDED.doc)
                 SELECT (SELECT doc::text FROM old)",
                &[&destinations.function_id, &doc],
            )
            .await
            .map_err(pg)?;
        Ok(row
            .get::<_, Option<&str>>(0)
            .and_then(|d| serde_json::from_str(d).ok()))
    }

    async fn delete_destinations(
        &self,
        function_id: String,
    ) -> Result<Option<FunctionDestinations>, JournalError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_opt(
                "DELETE FROM fnrelay_destinations WHERE function_id = $1 RETURNING doc::text",
                &[&function_id],
            )
            .await
            .map_err(pg)?;
        Ok(row.and_then(|r| serde_json::from_str(r.get::<_, &str>(0)).ok()))
    }

    async fn list_destinations(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<FunctionDestinations>, JournalError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                "SELECT doc::text FROM fnrelay_destinations WHERE function_id > $1
                 ORDER BY function_id LIMIT $2",
                &[&after.unwrap_or_default(), &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .filter_map(|r| serde_json::from_str(r.get::<_, &str>(0)).ok())
            .collect())
    }

    async fn destinations_for(
        &self,
        function_ids: Vec<String>,
    ) -> Result<std::collections::HashMap<String, FunctionDestinations>, JournalError> {
        // Read at every ingest request: a change made on any replica holds
        // for every record accepted after its PUT returned.
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                &cached(
                    &client,
                    "SELECT doc::text FROM fnrelay_destinations WHERE function_id = ANY($1)",
                )
                .await?,
                &[&function_ids],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .filter_map(|r| serde_json::from_str::<FunctionDestinations>(r.get::<_, &str>(0)).ok())
            .map(|d| (d.function_id.clone(), d))
            .collect())
    }

    async fn list_dead(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, JournalError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                "SELECT id, fn_call_id, function_id, destination_type, kind, resource_id, attempts,
                        coalesce(error_label, 'other'), coalesce(last_error, ''), accepted_at, body
                 FROM fnrelay_records WHERE state = 'dead' AND id > $1 ORDER BY id LIMIT $2",
                &[&after.unwrap_or_default(), &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| {
                let attempts: i32 = r.get(6);
                let body: String = r.get(10);
                DeadLetter {
                    id: r.get(0),
                    fn_call_id: r.get(1),
                    function_id: r.get(2),
                    destination_type: r.get(3),
                    destination_kind: r.get(4),
                    destination_id: r.get(5),
                    attempts: attempts as u32,
                    error_message: r.get(7),
                    last_error: r.get(8),
                    accepted_at: ms_to_rfc3339(r.get(9)),
                    record: serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
                }
            })
            .collect())
    }

    async fn replay_dead(
        &self,
        ids: Option<Vec<String>>,
        now_ms: i64,
    ) -> Result<u64, JournalError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        const SET: &str = "UPDATE fnrelay_records SET state = 'pending', attempts = 0, due_at = $1,
                               age_from = $1, error_label = NULL, token = 0 WHERE state = 'dead'";
        let n = match ids {
            None => client.execute(SET, &[&now_ms]).await,
            Some(ids) => {
                client
                    .execute(&format!("{SET} AND id = ANY($2)"), &[&now_ms, &ids])
                    .await
            }
        }
        .map_err(pg)?;
        if n > 0 {
            self.pending.fetch_add(n, Ordering::Relaxed);
            let _ = client
                .execute("SELECT pg_notify($1, '')", &[&CHANNEL])
                .await;
            self.wake.notify_one();
        }
        Ok(n)
    }

    async fn prune(&self, before_ms: i64) -> Result<u64, JournalError> {
        // In slices, so no transaction holds many locks or runs long.
        let client = self.pool.get().await.map_err(pool_error)?;
        let mut total = 0;
        loop {
            let n: i64 = client
                .query_one(
                    "WITH d AS (DELETE FROM fnrelay_done WHERE id IN (
                             SELECT id FROM fnrelay_done WHERE done_at < $1 LIMIT 5000)
                         RETURNING fn_call_id),
                     a AS (DELETE FROM fnrelay_accepted
                         WHERE fn_call_id IN (SELECT fn_call_id FROM d))
                     SELECT count(*) FROM d",
                    &[&before_ms],
                )
                .await
                .map_err(pg)?
                .get(0);
            let n = n as u64;
            total += n;
            if n < 5000 {
                return Ok(total);
            }
        }
    }

    async fn stats(&self) -> Result<Stats, JournalError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_one(
                "SELECT
                    (SELECT min(accepted_at) FROM fnrelay_records WHERE state = 'pending'),
                    (SELECT count(*) FROM fnrelay_records WHERE state = 'dead'),
                    pg_total_relation_size('fnrelay_records') + pg_total_relation_size('fnrelay_accepted')
                        + pg_total_relation_size('fnrelay_done')",
                &[],
            )
            .await
            .map_err(pg)?;
        let dead: i64 = row.get(1);
        let size: i64 = row.get(2);
        Ok(Stats {
            pending: self.pending.load(Ordering::Relaxed),
            oldest_pending_ms: row.get(0),
            dead: dead as u64,
            size_bytes: size as u64,
        })
    }

    async fn check_writable(&self) -> Result<(), JournalError> {
        // A transaction id is only given to a transaction that may write:
        // this fails on a standby or a read-only database.
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.query_one("SELECT txid_current()", &[])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)
    }

    fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    async fn resync(&self) -> Result<(), JournalError> {
        let n = count_pending(&self.pool).await?;
        self.pending.store(n, Ordering::Relaxed);
        Ok(())
    }
}

//! The journal: the durable store of accepted records and their delivery
//! state. Only this module touches the database.
//!
//! States: `pending` (waiting for `next_attempt_at`), `delivered`, `dead`,
//! `skipped` (NONE destination). A record leaves `pending` only by a
//! confirmed delivery or a dead letter.
//!
//! Claims are leases (SPEC section 10): [`Journal::claim`] hands out a
//! lane's due records with a claim token and a lease; an outcome is written
//! only while its token still holds (fencing), and a record whose lease ran
//! out is claimable again in the running process. A crash loses every lease,
//! so everything not delivered is due again at the next start
//! (at-least-once, never lost).
//!
//! The [`Journal`] trait is the seam for other stores: a PostgreSQL journal
//! shared by replicas keeps the lease and token in the row and claims with
//! `FOR UPDATE SKIP LOCKED` (SPEC section 11); the SQLite journal, owned by
//! one process (an exclusive lock file), keeps leases in memory, so a claim
//! writes nothing.

mod postgres;
mod sqlite;

pub use postgres::{PgJournal, SCHEMA_VERSION, check as check_postgres, migrate, migrate_to};
pub(crate) use sqlite::ms_to_rfc3339;
pub use sqlite::{SqliteJournal, check as check_sqlite, now_ms};

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::ErrorLabel;
use crate::record::{DestKind, DestinationType};

/// A record to append at accept time.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// ULID made at accept.
    pub id: String,
    /// Idempotency key.
    pub fn_call_id: String,
    /// Function id.
    pub function_id: String,
    /// Success or failure.
    pub destination_type: DestinationType,
    /// `None` for a NONE destination: journaled as `skipped`.
    pub target: Option<Target>,
    /// The record JSON.
    pub body: String,
    /// Accept time, Unix milliseconds.
    pub accepted_at_ms: i64,
    /// The event's field digests ([`crate::record::digest`]): a re-post of
    /// this fnCallId is the same event only if they match.
    pub digest: Vec<u8>,
}

/// A re-post of a journaled fnCallId whose content differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Position of the event in its request.
    pub index: usize,
    /// The fnCallId.
    pub fn_call_id: String,
    /// The record already journaled for it.
    pub existing_id: String,
    /// The event fields that differ.
    pub fields: Vec<&'static str>,
}

/// Where a record goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Kind.
    pub kind: DestKind,
    /// Resource id.
    pub resource_id: String,
    /// Channel (QUEUE only).
    pub channel_id: Option<String>,
}

/// Result of appending one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The record id: the new one, or the one already stored for this fnCallId.
    pub id: String,
    /// True if this fnCallId was already journaled (nothing new was written).
    pub existing: bool,
}

/// A record claimed for delivery.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Record id.
    pub id: String,
    /// fnCallId.
    pub fn_call_id: String,
    /// Function id.
    pub function_id: String,
    /// Success or failure.
    pub destination_type: DestinationType,
    /// Destination.
    pub target: Target,
    /// Record JSON.
    pub body: String,
    /// Attempts made before this claim.
    pub attempts: u32,
    /// Accept time, Unix ms.
    pub accepted_at_ms: i64,
    /// Start of the `max_record_age` window (accept, or last replay), Unix ms.
    pub age_from_ms: i64,
    /// The claim token: outcomes are written only while it still holds.
    pub token: u64,
}

/// A lane: the destination resource whose records are claimed together.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lane {
    /// Kind of the resource.
    pub kind: DestKind,
    /// Resource id.
    pub resource_id: String,
}

/// What happened to a claimed record.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Confirmed by the destination.
    Delivered {
        /// Record id.
        id: String,
        /// Claim token.
        token: u64,
        /// Attempts including this one.
        attempts: u32,
    },
    /// Failed; try again at `next_attempt_at_ms`.
    Retry {
        /// Record id.
        id: String,
        /// Claim token.
        token: u64,
        /// Attempts including this one.
        attempts: u32,
        /// When.
        next_attempt_at_ms: i64,
        /// Error text.
        error: String,
    },
    /// Not attempted, or the destination as a whole failed (breaker open,
    /// shutdown, cannot connect): due again at `next_attempt_at_ms` without
    /// counting an attempt.
    Release {
        /// Record id.
        id: String,
        /// Claim token.
        token: u64,
        /// When it may be claimed again.
        next_attempt_at_ms: i64,
    },
    /// Given up.
    Dead {
        /// Record id.
        id: String,
        /// Claim token.
        token: u64,
        /// Attempts made.
        attempts: u32,
        /// Error text.
        error: String,
        /// The error label, kept for listing.
        label: ErrorLabel,
    },
}

/// A dead letter as the admin API lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Record id.
    pub id: String,
    /// fnCallId.
    pub fn_call_id: String,
    /// Function id.
    pub function_id: String,
    /// `Success` or `Failure`.
    pub destination_type: String,
    /// `QUEUE`, `STREAM`, `NOTIFICATION`.
    pub destination_kind: String,
    /// Resource id.
    pub destination_id: String,
    /// Attempts made.
    pub attempts: u32,
    /// Error label.
    pub error_message: String,
    /// Last error text.
    pub last_error: String,
    /// Accept time, RFC 3339.
    pub accepted_at: String,
    /// The record JSON.
    pub record: serde_json::Value,
}

/// How a record is looked up.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// By record id.
    Id(String),
    /// By the platform's call id.
    FnCallId(String),
}

/// One attempt as the journal keeps it for lookups (the last
/// `journal.attempts_kept` per record), stored as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptNote {
    /// When the attempt ended, Unix ms.
    pub at_ms: i64,
    /// `success`, `retry`, `unavailable` (the destination refused as a
    /// whole; no attempt used) or `dead`.
    pub outcome: String,
    /// The error label, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// The raw error text, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the send took (absent for a delivery at the first attempt,
    /// which keeps no note: the record's own row says when).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
}

/// A record as a lookup shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordView {
    /// Record id.
    pub id: String,
    /// fnCallId.
    pub fn_call_id: String,
    /// Function id (empty when the journal no longer has it).
    pub function_id: String,
    /// `pending`, `inflight`, `delivered`, `dead` or `skipped`.
    pub state: String,
    /// `Success` or `Failure`, when known.
    pub destination_type: Option<String>,
    /// Where it goes (`None`: NONE, skipped).
    pub target: Option<Target>,
    /// Attempts made.
    pub attempts: u32,
    /// When a pending record is next due, Unix ms.
    pub next_attempt_at_ms: Option<i64>,
    /// Accept time, Unix ms.
    pub accepted_at_ms: i64,
    /// When it was delivered, dead-lettered or skipped, Unix ms.
    pub finished_at_ms: Option<i64>,
    /// Last error label.
    pub error_label: Option<String>,
    /// Last error text.
    pub last_error: Option<String>,
    /// The most recent attempts, oldest first.
    pub recent: Vec<AttemptNote>,
}

/// Parses a kept attempts array (JSON); an unreadable one shows as empty.
pub fn parse_notes(json: Option<&str>) -> Vec<AttemptNote> {
    json.and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default()
}

impl RecordView {
    /// A delivery at the first attempt keeps no note (the hot path writes
    /// nothing extra); the lookup shows it from the record's own row.
    pub fn with_first_delivery(mut self) -> Self {
        if self.state == "delivered"
            && self.recent.last().is_none_or(|n| n.outcome != "success")
            && let Some(at_ms) = self.finished_at_ms
        {
            self.recent.push(AttemptNote {
                at_ms,
                outcome: "success".into(),
                error_message: None,
                error: None,
                duration_ms: None,
            });
        }
        self
    }
}

/// Destinations a team set for one function through the API (SPEC
/// section 12), stored in the journal so every replica uses them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionDestinations {
    /// The function.
    pub function_id: String,
    /// The compartment the policy was checked for.
    pub compartment_id: String,
    /// Where success records go (`None`: not set here; the configuration
    /// decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success: Option<crate::routing::DestSpec>,
    /// Where failure records go (`None`: not set here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<crate::routing::DestSpec>,
    /// When it was set, Unix ms.
    pub updated_at_ms: i64,
    /// The name of the token that set it.
    pub updated_by: String,
}

impl FunctionDestinations {
    /// As a route.
    pub fn route(&self) -> crate::routing::Route {
        crate::routing::Route {
            success: self.success.clone(),
            failure: self.failure.clone(),
        }
    }
}

/// A started invocation the lost-completion watchdog waits on (SPEC
/// section 12): without a completion by `deadline_ms`, fnrelay makes its
/// failure record itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// The call's id: the completion it waits for has the same.
    pub fn_call_id: String,
    /// Function id.
    pub function_id: String,
    /// Application id.
    pub application_id: String,
    /// Compartment id.
    pub compartment_id: String,
    /// The request id the caller got, if known.
    pub opc_request_id: Option<String>,
    /// When to give up waiting, Unix ms.
    pub deadline_ms: i64,
}

/// What registering a watch found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watched {
    /// Registered (or its deadline updated).
    Watching,
    /// The call's record already exists: nothing to wait for.
    Completed {
        /// The record's id.
        id: String,
    },
}

/// Attempts kept per record at most (`journal.attempts_kept`).
pub const MAX_ATTEMPTS_KEPT: usize = 100;

/// Gauges, read without scanning the backlog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records waiting for delivery.
    pub pending: u64,
    /// Accept time of the oldest of them, Unix ms.
    pub oldest_pending_ms: Option<i64>,
    /// Dead letters in the journal.
    pub dead: u64,
    /// Database size on disk, bytes.
    pub size_bytes: u64,
}

/// A journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The database reported an error.
    #[error("journal database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL reported an error (or the connection to it failed).
    #[error("journal database error")]
    Postgres(#[source] tokio_postgres::Error),
    /// The database cannot be reached or used (pool timeout, bad URL, TLS).
    #[error("journal unavailable: {0}")]
    Unavailable(String),
    /// The database's schema is newer than this build knows.
    #[error(
        "the journal's schema is at version {found}, newer than this fnrelay knows ({known}); run a newer fnrelay"
    )]
    SchemaTooNew {
        /// Version in the database.
        found: usize,
        /// Newest version this build knows.
        known: usize,
    },
    /// Another process holds the journal.
    #[error(
        "journal {path} is in use by another fnrelay process (lock file {lock} is held); two processes on one journal would deliver every record twice"
    )]
    Locked {
        /// Database path.
        path: String,
        /// Lock file.
        lock: String,
    },
    /// Opening the file or its directory failed.
    #[error("cannot open journal at {path}")]
    Open {
        /// Database path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The transaction holding this command failed to commit, or was rolled
    /// back: nothing of this command was written.
    #[error("journal commit failed, nothing was written: {0}")]
    Commit(String),
    /// The journal's writer thread has stopped.
    #[error("journal is closed")]
    Closed,
    /// Events re-post known fnCallIds with other content; nothing of the
    /// request was written.
    #[error("{} event(s) re-post a known fnCallId with other content", .0.len())]
    Conflict(Vec<Conflict>),
}

/// The journal seam.
#[async_trait]
pub trait Journal: Send + Sync + 'static {
    /// Appends a batch in one transaction, idempotent on fnCallId. Returns
    /// once the batch is durable, one [`Appended`] per input in order.
    async fn append(&self, records: Vec<NewRecord>) -> Result<Vec<Appended>, JournalError>;

    /// Claims up to `limit` of a lane's records due at `now_ms` (oldest due
    /// first) for `lease`: until the lease ends nobody else claims them.
    async fn claim(
        &self,
        lane: &Lane,
        now_ms: i64,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, JournalError>;

    /// Claims up to `limit` of a lane's records whose `max_record_age`
    /// window started before `age_from_before_ms`, due or not (to
    /// dead-letter them on time while the lane's breaker is open).
    async fn claim_expired(
        &self,
        lane: &Lane,
        age_from_before_ms: i64,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, JournalError>;

    /// The lanes that have records waiting (to find records whose resource
    /// left the configuration).
    async fn pending_lanes(&self) -> Result<Vec<Lane>, JournalError>;

    /// When the lane's next record that is not leased is due, if it has
    /// any. (A lease that runs out is seen by the lane's periodic poll.)
    async fn next_due(&self, lane: &Lane) -> Result<Option<i64>, JournalError>;

    /// Records outcomes in one transaction. An outcome whose claim token no
    /// longer holds (its lease ended and the record was claimed again) is
    /// not written. Returns, per outcome, whether it changed the record, so
    /// each final outcome is counted once. The leases end when the outcomes
    /// are written; if they are not, the leases run out and the records are
    /// claimed again.
    async fn complete(&self, outcomes: Vec<Outcome>) -> Result<Vec<bool>, JournalError> {
        let notes = vec![None; outcomes.len()];
        self.complete_noted(outcomes, notes).await
    }

    /// [`Journal::complete`], keeping with each outcome its attempt note
    /// (an [`AttemptNote`] as JSON; `None` keeps nothing), of which the last
    /// `attempts_kept` per record stay for lookups.
    async fn complete_noted(
        &self,
        outcomes: Vec<Outcome>,
        notes: Vec<Option<String>>,
    ) -> Result<Vec<bool>, JournalError>;

    /// A record by id or fnCallId, with its recent attempts.
    async fn lookup(&self, by: Lookup) -> Result<Option<RecordView>, JournalError>;

    /// Registers a started invocation durably (committed on return), or
    /// says its record exists already. Registering again moves the
    /// deadline.
    async fn watch(&self, watch: Watch) -> Result<Watched, JournalError>;

    /// Watches whose deadline is at or before `now_ms`, at most `limit`,
    /// each held for `lease` so that one replica fires it.
    async fn due_watches(
        &self,
        now_ms: i64,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Watch>, JournalError>;

    /// Forgets watches (fired, or their record exists).
    async fn unwatch(&self, fn_call_ids: Vec<String>) -> Result<(), JournalError>;

    /// Sets a function's destinations (committed on return); returns the
    /// ones it replaced.
    async fn put_destinations(
        &self,
        destinations: FunctionDestinations,
    ) -> Result<Option<FunctionDestinations>, JournalError>;

    /// Removes a function's destinations; returns them.
    async fn delete_destinations(
        &self,
        function_id: String,
    ) -> Result<Option<FunctionDestinations>, JournalError>;

    /// Functions with destinations, by function id after `after`.
    async fn list_destinations(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<FunctionDestinations>, JournalError>;

    /// The destinations set for these functions (the ingest path: answered
    /// from memory where the journal is this process's own).
    async fn destinations_for(
        &self,
        function_ids: Vec<String>,
    ) -> Result<std::collections::HashMap<String, FunctionDestinations>, JournalError>;

    /// Dead letters, oldest first, after the given id.
    async fn list_dead(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, JournalError>;

    /// Moves dead letters (all, or the given ids) back to pending with zero
    /// attempts; returns how many.
    async fn replay_dead(&self, ids: Option<Vec<String>>, now_ms: i64)
    -> Result<u64, JournalError>;

    /// Deletes delivered and skipped records that reached that state before `before_ms`.
    async fn prune(&self, before_ms: i64) -> Result<u64, JournalError>;

    /// Current gauges.
    async fn stats(&self) -> Result<Stats, JournalError>;

    /// Proves a write transaction commits (readiness).
    async fn check_writable(&self) -> Result<(), JournalError>;

    /// Records waiting for delivery, kept in memory for the high-water check.
    /// Moves only with committed transactions.
    fn pending(&self) -> u64;

    /// Recounts the in-memory gauges from the database.
    async fn resync(&self) -> Result<(), JournalError>;
}

impl Outcome {
    /// The record id.
    pub fn id(&self) -> &str {
        match self {
            Outcome::Delivered { id, .. }
            | Outcome::Retry { id, .. }
            | Outcome::Release { id, .. }
            | Outcome::Dead { id, .. } => id,
        }
    }

    /// The claim token it was made under.
    pub fn token(&self) -> u64 {
        match self {
            Outcome::Delivered { token, .. }
            | Outcome::Retry { token, .. }
            | Outcome::Release { token, .. }
            | Outcome::Dead { token, .. } => *token,
        }
    }
}

//! `file` backend: appends one record per line (JSON lines) to a local file
//! and fsyncs before the record counts as delivered. It serves any kind and
//! makes the embedded default run with no broker.
//!
//! A lane's batch is one `write` and one `fdatasync`; concurrent batches
//! share one writer thread per file, which merges them (group commit, as in
//! the journal). Before and after each write the writer checks that the
//! configured path still names the open file, and reopens it when it was
//! renamed or deleted, so nothing is counted into a file nobody will read.

mod client;
mod config;
mod encode;

pub use config::FileConfig;

use async_trait::async_trait;

use crate::destination::{Check, Destination, OutgoingRecord};
use crate::error::{DeliveryError, ErrorLabel};

/// Why a file write failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Opening, writing or syncing failed.
    #[error("cannot write {path}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The writer thread is gone (the daemon is stopping).
    #[error("file writer for {path} stopped")]
    WriterStopped {
        /// The file.
        path: String,
    },
}

impl From<FileError> for DeliveryError {
    fn from(e: FileError) -> Self {
        // No file error is the record's fault: a full disk or a wrong
        // permission is the destination's, fixed by an operator, and the
        // records wait for that (breaker open, no attempts used), not die.
        match e {
            FileError::Io { path, source } => {
                let label = match source.kind() {
                    std::io::ErrorKind::PermissionDenied => ErrorLabel::Forbidden,
                    std::io::ErrorKind::NotFound => ErrorLabel::NotFound,
                    _ => ErrorLabel::Other,
                };
                DeliveryError::unavailable(label, format!("cannot write {path}"))
                    .with_source(source)
            }
            FileError::WriterStopped { .. } => {
                DeliveryError::unavailable(ErrorLabel::Other, e.to_string())
            }
        }
    }
}

/// A JSON-lines file destination.
pub struct FileDestination {
    writer: client::Writer,
    path: std::path::PathBuf,
}

#[async_trait]
impl Destination for FileDestination {
    fn backend(&self) -> &'static str {
        "file"
    }

    async fn send(&self, record: &OutgoingRecord) -> Result<(), DeliveryError> {
        self.writer
            .append(encode::line(record))
            .await
            .map_err(Into::into)
    }

    async fn check(&self, check: &Check<'_>) -> Result<(), DeliveryError> {
        client::Writer::probe(&self.path, check.declare).map_err(Into::into)
    }

    async fn send_batch(&self, records: &[OutgoingRecord]) -> Vec<Result<(), DeliveryError>> {
        let mut lines = Vec::with_capacity(records.iter().map(|r| r.body.len() + 1).sum());
        for r in records {
            encode::push_line(&mut lines, r);
        }
        match self.writer.append(lines).await {
            Ok(()) => records.iter().map(|_| Ok(())).collect(),
            Err(e) => {
                let e = DeliveryError::from(e);
                records.iter().map(|_| Err(e.replicate())).collect()
            }
        }
    }
}

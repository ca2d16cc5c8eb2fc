//! `file` backend: appends one record per line (JSON lines) to a local file
//! and fsyncs before the record counts as delivered. It serves any kind and
//! makes the embedded default run with no broker.
//!
//! Concurrent sends share one writer thread per file, so a burst of records
//! costs one `write` and one `fsync` (group commit, as in the journal).

mod client;
mod config;
mod encode;

pub use config::FileConfig;

use async_trait::async_trait;

use crate::destination::{Destination, OutgoingRecord};
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
        // Every file error is retryable: a full disk or a wrong permission is
        // fixed by an operator, and the record must wait for that, not die.
        match e {
            FileError::Io { ref source, .. } => {
                let label = match source.kind() {
                    std::io::ErrorKind::PermissionDenied => ErrorLabel::Forbidden,
                    std::io::ErrorKind::NotFound => ErrorLabel::NotFound,
                    _ => ErrorLabel::Other,
                };
                let message = e.to_string();
                DeliveryError::retry(label, message).with_source(e)
            }
            FileError::WriterStopped { .. } => {
                DeliveryError::retry(ErrorLabel::Other, e.to_string())
            }
        }
    }
}

/// A JSON-lines file destination.
pub struct FileDestination {
    writer: client::Writer,
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
}

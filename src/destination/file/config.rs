//! Options of the `file` backend.

use std::path::PathBuf;

use serde::Deserialize;

use super::{FileDestination, FileError, client};

/// `backend = "file"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// File the records are appended to; its directory is created if missing.
    pub path: PathBuf,
}

impl FileConfig {
    /// Problems as `(key, reason)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.path.as_os_str().is_empty() {
            out.push(("path".into(), "must not be empty".into()));
        } else if self.path.is_dir() {
            out.push((
                "path".into(),
                format!("{} is a directory", self.path.display()),
            ));
        }
        out
    }

    /// Opens the file (creating its directory) and starts its writer.
    pub fn build(&self) -> Result<FileDestination, FileError> {
        Ok(FileDestination {
            writer: client::Writer::open(&self.path)?,
            path: self.path.clone(),
        })
    }
}

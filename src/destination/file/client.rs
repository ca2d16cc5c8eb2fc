//! The one writer thread per file: drains queued batches, writes them with
//! one `write` and one `fdatasync`, then answers every sender.
//!
//! The path is checked against the open descriptor before and after every
//! write: when the file was renamed (logrotate, a consumer taking it) or
//! deleted, or its directory removed, the writer reopens the configured path
//! (recreating the directory and the file) and writes the batch there. A
//! record counts as delivered only once it is on disk in the file the
//! configured path names.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::FileError;

type Job = (Vec<u8>, oneshot::Sender<Result<(), std::io::Error>>);

/// How many times one batch is rewritten when the file keeps moving under
/// the writer before the batch fails (and is retried by the dispatcher).
const MAX_REOPENS: usize = 3;

/// Handle to a file's writer thread. The thread ends when the handle drops.
pub struct Writer {
    tx: mpsc::Sender<Job>,
    path: String,
}

impl Writer {
    /// Opens `path` for appending and starts the writer thread. A path that
    /// cannot be opened now (a directory that cannot be created, a
    /// permission) does not stop the daemon: it is logged, and every batch
    /// tries again, failing as the destination's failure until it works.
    pub fn open(path: &Path) -> Result<Self, FileError> {
        let display = path.display().to_string();
        let io = |source| FileError::Io {
            path: display.clone(),
            source,
        };
        let file = OpenFile::at(path);
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("fnrelay-file".into())
            .spawn(move || run(file, rx))
            .map_err(io)?;
        Ok(Self { tx, path: display })
    }

    /// Whether the path can be appended to (the check at start and in
    /// `check-config`). With `declare`, creates the directory and file like
    /// a write; without, changes nothing: an existing file is opened for
    /// appending (and closed), a missing one needs its nearest existing
    /// ancestor to be a writable directory.
    pub fn probe(path: &Path, declare: bool) -> Result<(), FileError> {
        let io = |source| FileError::Io {
            path: path.display().to_string(),
            source,
        };
        if declare {
            let mut open = OpenFile {
                path: path.to_path_buf(),
                file: None,
                id: (0, 0),
            };
            return open.reopen().map_err(io);
        }
        if path.exists() {
            return OpenOptions::new()
                .append(true)
                .open(path)
                .map(drop)
                .map_err(io);
        }
        let mut dir = path.parent();
        while let Some(d) = dir {
            let d = if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            };
            match std::fs::metadata(d) {
                Ok(m) if !m.is_dir() => {
                    return Err(io(std::io::Error::new(
                        std::io::ErrorKind::NotADirectory,
                        format!("{} is not a directory", d.display()),
                    )));
                }
                Ok(m) if m.permissions().readonly() => {
                    return Err(io(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!("{} is read-only", d.display()),
                    )));
                }
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir = d.parent(),
                Err(e) => return Err(io(e)),
            }
        }
        Ok(())
    }

    /// Appends `lines` (whole lines) and returns once they are on disk in
    /// the file at the configured path.
    pub async fn append(&self, lines: Vec<u8>) -> Result<(), FileError> {
        let (done, wait) = oneshot::channel();
        let stopped = || FileError::WriterStopped {
            path: self.path.clone(),
        };
        self.tx.send((lines, done)).map_err(|_| stopped())?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(FileError::Io {
                path: self.path.clone(),
                source,
            }),
            Err(_) => Err(stopped()),
        }
    }
}

/// The open file and the identity (device, inode) it had when opened.
struct OpenFile {
    path: PathBuf,
    file: Option<File>,
    id: (u64, u64),
}

impl OpenFile {
    /// Opened at the first write (building a destination changes nothing
    /// on disk; the check at start creates it).
    fn at(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            file: None,
            id: (0, 0),
        }
    }

    /// (Re)opens the configured path, creating its directory and the file,
    /// and makes a new file's directory entry durable, or a crash could lose
    /// the file with records already counted in it.
    fn reopen(&mut self) -> std::io::Result<()> {
        self.file = None;
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)?;
        }
        let existed = self.path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        if !existed && let Some(dir) = dir {
            File::open(dir)?.sync_all()?;
        }
        let meta = file.metadata()?;
        self.id = (meta.dev(), meta.ino());
        self.file = Some(file);
        Ok(())
    }

    /// Whether the configured path still names the open file.
    fn still_there(&self) -> bool {
        self.file.is_some()
            && std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }

    /// Writes `buf` and syncs it, into the file the path names when the
    /// sync returns.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        for _ in 0..MAX_REOPENS {
            if !self.still_there() {
                if self.file.is_some() {
                    tracing::warn!(path = %self.path.display(), "file destination was renamed or deleted; reopening the configured path");
                }
                self.reopen()?;
            }
            let file = self.file.as_mut().expect("reopened");
            let before = file.metadata()?.len();
            if let Err(e) = file.write_all(buf).and_then(|()| file.sync_data()) {
                // Cut a partial write so the retry does not leave half a line.
                let _ = file.set_len(before);
                self.file = None;
                return Err(e);
            }
            if self.still_there() {
                return Ok(());
            }
            // Moved while we wrote: the batch went with the old file (a
            // duplicate there is fine, at least once); write it again where
            // the configured path points now.
        }
        Err(std::io::Error::other(format!(
            "{} kept being renamed or deleted during {MAX_REOPENS} writes",
            self.path.display()
        )))
    }
}

fn run(mut file: OpenFile, rx: mpsc::Receiver<Job>) {
    let mut buf = Vec::new();
    let mut waiting = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some((lines, done)) = next {
            buf.extend_from_slice(&lines);
            waiting.push(done);
            next = if buf.len() < 8 << 20 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let result = file.write(&buf);
        if let Err(e) = &result {
            tracing::error!(path = %file.path.display(), error = %e, "file destination write failed");
        }
        for done in waiting.drain(..) {
            let answer = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            };
            let _ = done.send(answer);
        }
        buf.clear();
    }
}

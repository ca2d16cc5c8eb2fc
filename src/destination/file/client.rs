//! The one writer thread per file: drains queued lines, writes them, fsyncs
//! once, then answers every sender.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::FileError;

type Job = (Vec<u8>, oneshot::Sender<Result<(), std::io::ErrorKind>>);

/// Handle to a file's writer thread. The thread ends when the handle drops.
pub struct Writer {
    tx: mpsc::Sender<Job>,
    path: String,
}

impl Writer {
    /// Opens `path` for appending and starts the writer thread.
    pub fn open(path: &Path) -> Result<Self, FileError> {
        let display = path.display().to_string();
        let io = |source| FileError::Io {
            path: display.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        if !existed {
            // Make the new file's directory entry durable too, or a crash
            // could lose the file with records already counted in it.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            }
        }
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("fnrelay-file".into())
            .spawn(move || run(file, rx))
            .map_err(io)?;
        Ok(Self { tx, path: display })
    }

    /// Appends `line` and returns once it is on disk.
    pub async fn append(&self, line: Vec<u8>) -> Result<(), FileError> {
        let (done, wait) = oneshot::channel();
        let stopped = || FileError::WriterStopped {
            path: self.path.clone(),
        };
        self.tx.send((line, done)).map_err(|_| stopped())?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(kind)) => Err(FileError::Io {
                path: self.path.clone(),
                source: kind.into(),
            }),
            Err(_) => Err(stopped()),
        }
    }
}

fn run(mut file: File, rx: mpsc::Receiver<Job>) {
    let mut buf = Vec::new();
    let mut waiting = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some((line, done)) = next {
            buf.extend_from_slice(&line);
            waiting.push(done);
            next = if buf.len() < 8 << 20 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let before = file.metadata().map(|m| m.len());
        let result = file.write_all(&buf).and_then(|()| file.sync_data());
        let answer = result.map_err(|e| {
            tracing::error!(error = %e, "file destination write failed");
            // Cut a partial write so the retry does not leave half a line.
            if let Ok(len) = before {
                let _ = file.set_len(len);
            }
            e.kind()
        });
        for done in waiting.drain(..) {
            let _ = done.send(answer);
        }
        buf.clear();
    }
}

//! The real `fnrelay` binary as a child process: start it on a port with a
//! config file, read its log, stop it with SIGTERM or kill it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{binary, wait_until};

pub struct Proc {
    pub child: Child,
    pub url: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A failing test must not leave a daemon running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary with `config` and waits for /readyz.
pub async fn spawn(dir: &Path, config: &str, port: u16) -> Proc {
    let path = dir.join("fnrelay.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(binary())
        .arg("--config")
        .arg(&path)
        .current_dir(dir)
        .env("FNRELAY__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_until("binary ready", Duration::from_secs(20), || async {
        http.get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    Proc { child, url, log }
}

impl Proc {
    /// The daemon's /metrics text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Peak resident memory (VmHWM) of the process, in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    /// Sends SIGHUP (what `systemctl reload` sends).
    pub fn hangup(&self) {
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The log lines so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// SIGTERM, then waits; asserts exit 0 and returns the log.
pub async fn stop(mut p: Proc) -> Vec<String> {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(p.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let code = tokio::task::spawn_blocking(move || {
        let code = p.child.wait().unwrap();
        (code, p)
    })
    .await
    .unwrap();
    let (code, p) = code;
    assert!(code.success(), "SIGTERM exits 0, got {code:?}");
    p.log.lock().unwrap().clone()
}

//! A database of the test's own on the local PostgreSQL (127.0.0.1:5432,
//! user postgres, trust auth), dropped by `drop_db`.

use fnrelay::config::{JournalBackend, JournalConfig, Secret};

pub const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

pub struct TestDb {
    pub name: String,
    pub url: String,
}

async fn admin() -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect(&format!("{SERVER}/postgres"), tokio_postgres::NoTls)
            .await
            .expect("the local PostgreSQL on 127.0.0.1:5432 (scripts/test.sh starts it)");
    tokio::spawn(conn);
    client
}

impl TestDb {
    /// Creates a fresh, empty database.
    pub async fn create() -> Self {
        let name = format!("fnrelay_t_{}_{:08x}", std::process::id(), fastrand::u32(..));
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Self {
            url: format!("{SERVER}/{name}"),
            name,
        }
    }

    /// A `[journal]` on this database.
    pub fn journal(&self) -> JournalConfig {
        JournalConfig {
            backend: JournalBackend::Postgres,
            url: Some(Secret(self.url.clone())),
            ..JournalConfig::default()
        }
    }

    /// The `[journal]` TOML for this database.
    pub fn toml(&self, lease: &str) -> String {
        format!(
            "[journal]\nbackend = \"postgres\"\nurl = \"{}\"\nlease = \"{lease}\"\n",
            self.url
        )
    }

    /// A client on this database.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    /// Drops the database (whoever is still connected).
    pub async fn drop_db(self) {
        let _ = admin()
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// A PostgreSQL server of the test's own (initdb in a temp dir, a free
/// port), so the test can crash and restart it without touching the shared
/// one. Runs as the `postgres` user when the test runs as root (PostgreSQL
/// refuses root).
pub struct OwnServer {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    pub port: u16,
}

fn as_postgres(program: &std::path::Path, args: &[&str]) -> std::process::Output {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let mut cmd = if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        std::process::Command::new(program)
    };
    cmd.args(args)
        .output()
        .expect("running a PostgreSQL binary")
}

impl OwnServer {
    pub fn start() -> Self {
        let version = std::fs::read_dir("/usr/lib/postgresql")
            .expect("Debian's postgresql package (scripts/test.sh installs it)")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .expect("a PostgreSQL version under /usr/lib/postgresql");
        let bin = std::path::PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        let dir = tempfile::tempdir().unwrap();
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let data = dir.path().join("data");
        let out = as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let server = Self {
            port: super::free_port(),
            bin,
            dir,
        };
        server.up();
        server
    }

    /// Starts the server and waits until it accepts connections.
    pub fn up(&self) {
        let data = self.dir.path().join("data");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        let out = as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server at once, as a crash would (`-m immediate`).
    pub fn crash(&self) {
        let data = self.dir.path().join("data");
        let out = as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}

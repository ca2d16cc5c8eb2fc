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

//! The `fnrelay` binary: parses the command line, sets up logging and calls
//! [`fnrelay::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fnrelay::config::{self, Config, Source};
use tokio_util::sync::CancellationToken;

/// Delivers the results of detached function invocations to their success
/// and failure destinations, with retries.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). Without it, the embedded default is used.
    #[arg(long, short, env = "FNRELAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Validate the configuration and exit 0, or non-zero naming every problem.
    /// Also connects to each broker destination and checks its queue, stream
    /// or exchange exists, unless --offline.
    CheckConfig {
        /// Only check the file; do not connect to destinations.
        #[arg(long)]
        offline: bool,
    },
    /// Print the embedded default configuration.
    PrintDefaultConfig,
    /// Create or migrate the PostgreSQL journal's schema and exit (replicas
    /// also do it at start, under an advisory lock).
    Migrate,
    /// List or replay dead letters through a running daemon's admin API.
    DeadLetters {
        /// Base URL of the daemon.
        #[arg(long, default_value = "http://127.0.0.1:8080", env = "FNRELAY_URL")]
        url: String,
        /// File holding the bearer token, if the daemon requires one.
        #[arg(long, env = "FNRELAY_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        action: DeadAction,
    },
}

#[derive(Subcommand)]
enum DeadAction {
    /// Print dead letters as JSON lines.
    List {
        /// Most to print.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Put dead letters back in the delivery queue.
    Replay {
        /// Record ids to replay.
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, config::ConfigError> {
    load_traced(path).map(|l| l.config)
}

/// Reads and validates the configuration, keeping its hash and sources.
fn load_traced(path: Option<&PathBuf>) -> Result<config::Loaded, config::ConfigError> {
    let loaded = match path {
        Some(p) => config::load_traced(Source::File(p), None)?,
        None => config::load_traced(Source::Text(config::DEFAULT_TOML), None)?,
    };
    loaded.config.validate()?;
    Ok(loaded)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig { offline } => match load(cli.config.as_ref()) {
            Ok(config) => {
                if !offline && let Err(problems) = check_destinations(&config) {
                    eprintln!("{problems}");
                    return ExitCode::FAILURE;
                }
                if !offline && let Err(problem) = check_journal(&config) {
                    eprintln!("{problem}");
                    return ExitCode::FAILURE;
                }
                let what = cli
                    .config
                    .as_ref()
                    .map_or("embedded default".to_string(), |p| p.display().to_string());
                println!("configuration OK: {what}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Migrate => match load(cli.config.as_ref())
            .map_err(anyhow::Error::from)
            .and_then(migrate)
        {
            Ok(version) => {
                println!("journal schema at version {version}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fnrelay: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::PrintDefaultConfig => {
            print!("{}", config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Command::Run => {
            let loaded = match load_traced(cli.config.as_ref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            fnrelay::logging::init(&loaded.config);
            let origin = match &cli.config {
                Some(p) => fnrelay::reload::Origin::File(p.clone()),
                None => fnrelay::reload::Origin::Embedded,
            };
            match serve(loaded, origin) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("fnrelay: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::DeadLetters {
            url,
            token_file,
            action,
        } => match dead_letters(&url, token_file.as_ref(), action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fnrelay: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Builds every destination and runs its check; the error lists each failure.
fn check_destinations(config: &Config) -> Result<(), String> {
    let registry = fnrelay::destination::Registry::build(config)
        .map_err(|e| format!("invalid configuration:\n  - {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let failed = runtime.block_on(registry.check_all());
    if failed.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = failed
        .iter()
        .map(|(name, e)| format!("  - {name}: {}", e.full_message()))
        .collect();
    Err(format!("destination check failed:\n{}", lines.join("\n")))
}

/// For the PostgreSQL journal: connects and reads the schema version,
/// changing nothing. (The SQLite journal is opened at start.)
fn check_journal(config: &Config) -> Result<(), String> {
    if config.journal.backend != config::JournalBackend::Postgres {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    match runtime.block_on(fnrelay::journal::check_postgres(&config.journal)) {
        Ok(0) => {
            println!(
                "journal: PostgreSQL reachable; its schema is created at the first start (or by `fnrelay migrate`)"
            );
            Ok(())
        }
        Ok(version) => {
            println!("journal: PostgreSQL reachable, schema version {version}");
            Ok(())
        }
        Err(e) => Err(format!(
            "journal check failed:\n  - journal.url: {}",
            fnrelay::logging::Chain(&e)
        )),
    }
}

fn migrate(config: Config) -> anyhow::Result<usize> {
    if config.journal.backend != config::JournalBackend::Postgres {
        bail!("journal.backend is not \"postgres\": the SQLite journal migrates itself at start");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(fnrelay::journal::migrate(&config.journal))?)
}

fn serve(loaded: config::Loaded, origin: fnrelay::reload::Origin) -> anyhow::Result<()> {
    let config::Loaded { config, hash, .. } = loaded;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&config.server.listen)
            .await
            .with_context(|| {
                format!("cannot listen on {} (server.listen)", config.server.listen)
            })?;
        let shutdown = CancellationToken::new();
        fnrelay::shutdown::on_signal(shutdown.clone());
        fnrelay::run_with(config, hash, origin, listener, shutdown).await?;
        Ok(())
    })
}

fn dead_letters(url: &str, token_file: Option<&PathBuf>, action: DeadAction) -> anyhow::Result<()> {
    let token = match token_file {
        Some(p) => Some(
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        ),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = reqwest::Client::new();
        let auth = |r: reqwest::RequestBuilder| match &token {
            Some(t) => r.bearer_auth(t.trim()),
            None => r,
        };
        match action {
            DeadAction::List { limit } => {
                let mut after: Option<String> = None;
                let mut printed = 0;
                while printed < limit {
                    let mut params = vec![("limit", (limit - printed).min(1000).to_string())];
                    if let Some(a) = &after {
                        params.push(("after", a.clone()));
                    }
                    let page_url =
                        url::Url::parse_with_params(&format!("{url}/v1/dead-letters"), &params)
                            .with_context(|| format!("bad --url {url}"))?;
                    let resp = auth(client.get(page_url))
                        .send()
                        .await
                        .context("cannot reach the daemon")?;
                    if !resp.status().is_success() {
                        bail!(
                            "daemon answered {}: {}",
                            resp.status(),
                            resp.text().await.unwrap_or_default()
                        );
                    }
                    let page: serde_json::Value = resp.json().await?;
                    let items = page["deadLetters"].as_array().cloned().unwrap_or_default();
                    for item in &items {
                        println!("{item}");
                    }
                    printed += items.len();
                    match page["next"].as_str() {
                        Some(n) if !items.is_empty() => after = Some(n.to_string()),
                        _ => break,
                    }
                }
            }
            DeadAction::Replay { ids, all } => {
                if ids.is_empty() && !all {
                    bail!("give --id ID (repeatable) or --all");
                }
                let body = if all {
                    serde_json::json!({"all": true})
                } else {
                    serde_json::json!({"ids": ids})
                };
                let resp = auth(
                    client
                        .post(format!("{url}/v1/dead-letters/replay"))
                        .json(&body),
                )
                .send()
                .await
                .context("cannot reach the daemon")?;
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                if !status.is_success() {
                    bail!("daemon answered {status}: {text}");
                }
                println!("{text}");
            }
        }
        Ok(())
    })
}

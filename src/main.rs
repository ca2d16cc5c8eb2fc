//! The `fnrelay` binary: parses the command line, sets up logging and calls
//! [`fnrelay::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fnrelay::config::{self, Config, Source};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Validate the configuration and exit 0, or non-zero naming every
    /// problem (parse and type errors with their key and whether they came
    /// from the file or the environment, then invalid values). Unless
    /// --offline, also checks the journal (reads it, or connects to
    /// PostgreSQL) and connects to each destination to check its queue,
    /// stream, exchange or routing; changes nothing unless --declare.
    CheckConfig {
        /// Only check the file; do not touch the journal or destinations.
        #[arg(long)]
        offline: bool,
        /// Create what the configuration asks to create (`declare = true`
        /// queues and exchanges, `create_stream = true` streams, file
        /// destinations) instead of only looking.
        #[arg(long, conflicts_with = "offline")]
        declare: bool,
    },
    /// Print the embedded default configuration.
    PrintDefaultConfig,
    /// Create or migrate the PostgreSQL journal's schema and exit (replicas
    /// also do it at start, under an advisory lock).
    Migrate,
    /// Look up a record through a running daemon's admin API.
    Records {
        /// Base URL of the daemon.
        #[arg(
            long,
            default_value = "http://127.0.0.1:8080",
            env = "FNRELAY_URL",
            global = true
        )]
        url: String,
        /// File holding a bearer token with the admin scope, if needed.
        #[arg(long, env = "FNRELAY_TOKEN_FILE", global = true)]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        action: RecordsAction,
    },
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
enum RecordsAction {
    /// Print one record: state, destination, attempts, last error and its
    /// recent attempts (as JSON).
    Show {
        /// The record id.
        #[arg(required_unless_present = "fn_call_id")]
        id: Option<String>,
        /// Look up by the platform's call id instead.
        #[arg(long, conflicts_with = "id")]
        fn_call_id: Option<String>,
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
        Command::CheckConfig { offline, declare } => {
            check_config(cli.config.as_ref(), offline, declare)
        }
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
        Command::Records {
            url,
            token_file,
            action: RecordsAction::Show { id, fn_call_id },
        } => match show_record(&url, token_file.as_ref(), id, fn_call_id) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fnrelay: {e:#}");
                ExitCode::FAILURE
            }
        },
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

/// `check-config`: every problem in one run, then the journal and the
/// destinations (unless `offline`); exits 1 when anything is wrong.
fn check_config(path: Option<&PathBuf>, offline: bool, declare: bool) -> ExitCode {
    let source = match path {
        Some(p) => Source::File(p),
        None => Source::Text(config::DEFAULT_TOML),
    };
    let (loaded, issues) = config::diagnose(source, None);
    let Some(loaded) = loaded else {
        eprintln!("invalid configuration: {} problem(s)", issues.len());
        for issue in &issues {
            eprintln!("  - {issue}");
        }
        return ExitCode::FAILURE;
    };
    println!("read: {}", loaded.sources.join("; "));
    let mut problems = Vec::new();
    if !offline {
        match check_journal(&loaded.config) {
            Ok(what) => println!("journal: {what}"),
            Err(e) => problems.push(format!("journal: {e}")),
        }
        match check_destinations(&loaded.config, declare) {
            Ok(n) => println!(
                "destinations: {n} checked{}",
                if declare {
                    " (declared where configured)"
                } else {
                    " (nothing created; --declare creates what the configuration declares)"
                }
            ),
            Err(failed) => problems.extend(failed),
        }
    }
    if !problems.is_empty() {
        eprintln!("check failed: {} problem(s)", problems.len());
        for p in &problems {
            eprintln!("  - {p}");
        }
        return ExitCode::FAILURE;
    }
    println!("configuration OK (hash {})", loaded.hash);
    ExitCode::SUCCESS
}

/// Builds every destination and runs its check (creating nothing unless
/// `declare`); the error lists each failure.
fn check_destinations(config: &Config, declare: bool) -> Result<usize, Vec<String>> {
    let registry =
        fnrelay::destination::Registry::build(config).map_err(|e| vec![format!("{e}")])?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| vec![e.to_string()])?;
    let failed = runtime.block_on(registry.check_all(declare));
    if failed.is_empty() {
        return Ok(registry.iter().count());
    }
    Err(failed
        .iter()
        .map(|(name, e)| format!("{name}: {}", e.full_message()))
        .collect())
}

/// The journal, changing nothing: the SQLite file (or where it will be
/// created) is read; PostgreSQL is connected to and its schema version read.
fn check_journal(config: &Config) -> Result<String, String> {
    if config.journal.backend == config::JournalBackend::Sqlite {
        return fnrelay::journal::check_sqlite(&config.journal.path)
            .map_err(|e| format!("journal.path: {e}"));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    match runtime.block_on(fnrelay::journal::check_postgres(&config.journal)) {
        Ok(0) => Ok(
            "PostgreSQL reachable; its schema is created at the first start (or by `fnrelay migrate`)"
                .into(),
        ),
        Ok(version) => Ok(format!("PostgreSQL reachable, schema version {version}")),
        Err(e) => Err(format!("journal.url: {}", fnrelay::logging::Chain(&e))),
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

/// `fnrelay records show`: GET /v1/records/{id} or ?fnCallId=, printed as
/// indented JSON.
fn show_record(
    url: &str,
    token_file: Option<&PathBuf>,
    id: Option<String>,
    fn_call_id: Option<String>,
) -> anyhow::Result<()> {
    let token = match token_file {
        Some(p) => Some(
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        ),
        None => None,
    };
    let address = match (id, fn_call_id) {
        (Some(id), _) => {
            let mut u = url::Url::parse(url).with_context(|| format!("bad --url {url}"))?;
            u.path_segments_mut()
                .map_err(|_| anyhow::anyhow!("bad --url {url}"))?
                .extend(["v1", "records", &id]);
            u
        }
        (None, Some(call)) => {
            url::Url::parse_with_params(&format!("{url}/v1/records"), [("fnCallId", call)])
                .with_context(|| format!("bad --url {url}"))?
        }
        (None, None) => bail!("give a record id or --fn-call-id"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut request = reqwest::Client::new().get(address);
        if let Some(t) = &token {
            request = request.bearer_auth(t.trim());
        }
        let resp = request.send().await.context("cannot reach the daemon")?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "daemon answered {status}: {}",
                body["message"].as_str().unwrap_or_default()
            );
        }
        println!("{}", serde_json::to_string_pretty(&body)?);
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

//! `walcast`: the transactional outbox relay from PostgreSQL to Apache Kafka.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use walcast_core::config::{Config, LogFormat};
use walcast_core::{Error, ErrorKind};
use walcast_postgres::ConnectOptions;
use walcast_runtime::{timeline, Relay};

mod debezium;
mod ops;
mod outbox_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "walcast",
    version,
    about = "Relays committed outbox INSERTs from a PostgreSQL replication slot to Kafka; confirms the slot only after Kafka acknowledged them."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ConfigArgs {
    /// The configuration file (TOML).
    #[arg(long, short, env = "WALCAST_CONFIG")]
    config: Option<PathBuf>,
    /// Override one option: `--set section.key=value` (repeatable; applied
    /// after the file and `WALCAST_<SECTION>__<KEY>` environment variables).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// With `[[pipelines]]`: only the pipeline on this slot (`run` runs
    /// just it; the operator commands act on it).
    #[arg(long, value_name = "SLOT")]
    pipeline: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay until SIGTERM/SIGINT.
    Run(ConfigArgs),
    /// Validate the configuration (no I/O) and print it with secrets redacted;
    /// `walcast config from-debezium FILE` converts a Debezium connector.
    #[command(args_conflicts_with_subcommands = true)]
    Config {
        #[command(flatten)]
        args: ConfigArgs,
        #[command(subcommand)]
        convert: Option<ConfigCommand>,
    },
    /// Print records of the outbox topics as they arrive (topic, partition,
    /// offset, key, headers, value), for demos and debugging.
    Tail {
        #[command(flatten)]
        config: ConfigArgs,
        /// Topics to read, as a regex (default: every topic the configured
        /// routes render: outbox.topic for outbox.tables, each
        /// [[outbox.route]]'s and [[outbox.message_route]]'s topic or template).
        #[arg(long)]
        topic_regex: Option<String>,
        /// Stop after this many records.
        #[arg(long)]
        max_records: Option<u64>,
        /// Stop when nothing arrived for this long.
        #[arg(long, default_value_t = 30_000)]
        idle_timeout_ms: u64,
    },
    /// Slot maintenance.
    Slot {
        #[command(subcommand)]
        command: SlotCommand,
    },
    #[command(flatten)]
    Ops(ops::OpsCommand),
    /// Outbox table maintenance (`walcast outbox prune`, `walcast outbox rotate`).
    Outbox {
        #[command(subcommand)]
        command: outbox_cmd::OutboxCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Convert a Debezium PostgreSQL connector with the Outbox EventRouter
    /// (a Kafka Connect .properties file, or the connector's JSON) into a
    /// walcast configuration, printed on stdout. Exits 2 naming every
    /// option walcast does not support.
    FromDebezium {
        /// The connector's properties (or JSON) file.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum SlotCommand {
    /// Accept a gap after the slot was dropped or invalidated: drops an
    /// invalidated slot and forgets walcast's record of it, so the next `run`
    /// creates a new slot at the current position. Events committed between
    /// the last confirmed position and the new slot will NOT be relayed.
    AcceptGap(ConfigArgs),
    #[command(flatten)]
    Manage(ops::slot::SlotManage),
}

/// The configuration; with `--pipeline`, that pipeline's alone.
fn load(args: &ConfigArgs) -> Result<Config, Error> {
    let cfg = Config::load(args.config.as_deref(), std::env::vars(), &args.set)?;
    let Some(slot) = &args.pipeline else {
        return Ok(cfg);
    };
    if cfg.pipelines.is_empty() {
        return Err(Error::operator(format!(
            "--pipeline {slot} is given, but the configuration has no [[pipelines]]"
        ))
        .with_hint("remove --pipeline: the configuration runs one pipeline, on postgres.slot"));
    }
    let slots: Vec<&str> = cfg.pipelines.iter().map(|p| p.slot.as_str()).collect();
    let list = slots.join(", ");
    cfg.pipeline_configs()?
        .into_iter()
        .find(|c| &c.postgres.slot == slot)
        .ok_or_else(|| {
            Error::operator(format!(
                "--pipeline {slot}: no [[pipelines]] entry has this slot"
            ))
            .with_hint(format!("pass one of: {list}"))
        })
}

/// The slot of every pipeline the configuration file runs, whatever
/// `--pipeline` says.
pub(crate) fn all_slots(args: &ConfigArgs) -> Result<Vec<String>, Error> {
    let cfg = Config::load(args.config.as_deref(), std::env::vars(), &args.set)?;
    Ok(if cfg.pipelines.is_empty() {
        vec![cfg.postgres.slot.clone()]
    } else {
        cfg.pipelines.iter().map(|p| p.slot.clone()).collect()
    })
}

/// Every pipeline's configuration (one without `[[pipelines]]`; with
/// `--pipeline`, that one), for commands that report on all of them.
pub(crate) fn load_all(args: &ConfigArgs) -> Result<Vec<Config>, Error> {
    let cfg = load(args)?;
    if cfg.pipelines.is_empty() {
        Ok(vec![cfg])
    } else {
        cfg.pipeline_configs()
    }
}

/// The configuration of the one pipeline an operator command acts on:
/// with several `[[pipelines]]`, `--pipeline` must name it.
pub(crate) fn load_one(args: &ConfigArgs) -> Result<Config, Error> {
    let cfg = load(args)?;
    match cfg.pipelines.as_slice() {
        [] => Ok(cfg),
        [_] => Ok(cfg.pipeline_configs()?.remove(0)),
        several => {
            let list: Vec<&str> = several.iter().map(|p| p.slot.as_str()).collect();
            Err(Error::operator(format!(
                "the configuration has {} pipelines (slots {}): this command acts on one",
                several.len(),
                list.join(", ")
            ))
            .with_hint(format!(
                "pass --pipeline SLOT, once per pipeline (one of: {})",
                list.join(", ")
            )))
        }
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cfg.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn exit_code(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::OperatorAction => 2,
        ErrorKind::Permanent => 3,
        _ => 1,
    }
}

fn main() {
    let cli = Cli::parse();
    let code = match real_main(cli) {
        Ok(()) => 0,
        Err(e) if e.downcast_ref::<ops::Exit>().is_some() => {
            e.downcast_ref::<ops::Exit>().map_or(1, |x| x.0)
        }
        Err(e) => {
            let kind = e
                .downcast_ref::<Error>()
                .map(|e| e.kind())
                .unwrap_or(ErrorKind::OperatorAction);
            match e.downcast_ref::<Error>() {
                // walcast's own error already shows its source and the fix;
                // the alternate form would repeat the source chain after it.
                Some(err) if e.to_string() == err.to_string() => {
                    eprintln!("walcast: error ({kind}): {err}")
                }
                _ => eprintln!("walcast: error ({kind}): {e:#}"),
            }
            exit_code(kind)
        }
    };
    std::process::exit(code);
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config {
            convert: Some(ConfigCommand::FromDebezium { file }),
            ..
        } => {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                Error::operator(format!("cannot read {}", file.display())).with_source(e)
            })?;
            let props = debezium::parse_connector(&text)
                .map_err(|e| Error::operator(format!("{}: {e}", file.display())))?;
            match debezium::convert(&props) {
                Ok(toml) => {
                    print!("{toml}");
                    Ok(())
                }
                Err(problems) => {
                    eprintln!(
                        "walcast: error (operator_action): {} has {} option(s) walcast does not support; nothing was written:",
                        file.display(),
                        problems.len()
                    );
                    for p in &problems {
                        eprintln!("  - {p}");
                    }
                    Err(ops::Exit(2).into())
                }
            }
        }
        Command::Config {
            args,
            convert: None,
        } => {
            let cfg = load(&args)?;
            println!(
                "{}",
                toml::to_string_pretty(&redacted(&cfg)).context("printing the configuration")?
            );
            Ok(())
        }
        Command::Run(args) => {
            let cfg = load(&args)?;
            init_logging(&cfg);
            // One thread for the relay's tasks: the pipeline and the
            // replication reader hand every message to each other, and on one
            // thread that is a function call, not a cross-thread wake-up
            // (librdkafka keeps its own threads; blocking work goes to the
            // blocking pool). Measured: docs/performance.md.
            // Several pipelines ([[pipelines]]) get a thread each, up to the
            // machine's cores: each pipeline's tasks stay together.
            let pipelines = cfg.pipelines.len().max(1);
            let rt = if pipelines == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(pipelines.min(cores))
                    .enable_all()
                    .build()
            }
            .context("starting the async runtime")?;
            rt.block_on(run(cfg))?;
            Ok(())
        }
        Command::Tail {
            config,
            topic_regex,
            max_records,
            idle_timeout_ms,
        } => {
            let cfg = load(&config)?;
            let regex = match topic_regex {
                Some(r) => r,
                None => cfg.routes()?.topics_regex(),
            };
            tail(
                &cfg,
                &regex,
                max_records,
                Duration::from_millis(idle_timeout_ms),
            )
        }
        Command::Slot {
            command: SlotCommand::AcceptGap(args),
        } => {
            let cfg = load_one(&args)?;
            init_logging(&cfg);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let done = rt.block_on(async {
                let opts = tool_options_writing(&cfg).await?;
                walcast_postgres::accept_slot_gap(&opts).await
            })?;
            println!("{done}");
            Ok(())
        }
        Command::Slot {
            command: SlotCommand::Manage(cmd),
        } => ops::slot::run(cmd),
        Command::Ops(cmd) => ops::run(cmd),
        Command::Outbox { command } => outbox_cmd::run(command),
    }
}

fn tail(cfg: &Config, regex: &str, max: Option<u64>, idle: Duration) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.bootstrap_servers)
        .set("group.id", format!("walcast-tail-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "1000");
    for (k, v) in &cfg.kafka.properties {
        if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
            c.set(k, v);
        }
    }
    let consumer: BaseConsumer = c.create().context("creating the Kafka consumer")?;
    consumer
        .subscribe(&[&format!("^{}", regex.trim_start_matches('^'))])
        .context("subscribing")?;
    let show = |b: Option<&[u8]>| match b {
        None => "null".to_string(),
        Some(b) => String::from_utf8_lossy(b).into_owned(),
    };
    let mut seen = 0u64;
    // A rebalance (a new topic matching the regex) re-reads from the start:
    // print each (topic, partition, offset) once.
    let mut printed = std::collections::HashSet::new();
    let mut last = Instant::now();
    while last.elapsed() < idle && max.is_none_or(|m| seen < m) {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(e)) => eprintln!("walcast tail: {e}"),
            Some(Ok(m)) => {
                if !printed.insert((m.topic().to_string(), m.partition(), m.offset())) {
                    continue;
                }
                seen += 1;
                last = Instant::now();
                let headers: Vec<String> = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| format!("{}={}", h.key, show(h.value)))
                            .collect()
                    })
                    .unwrap_or_default();
                println!(
                    "topic={} partition={} offset={} key={} headers=[{}] value={}",
                    m.topic(),
                    m.partition(),
                    m.offset(),
                    show(m.key()),
                    headers.join(", "),
                    show(m.payload())
                );
            }
        }
    }
    Ok(())
}

fn redacted(cfg: &Config) -> Config {
    let mut c = cfg.clone();
    if c.postgres.password.is_some() {
        c.postgres.password = Some(walcast_core::config::Secret::new("<redacted>"));
    }
    for (k, v) in c.kafka.properties.iter_mut() {
        if k.contains("password") || k.contains("secret") || k.contains("key") {
            *v = "<redacted>".into();
        }
    }
    c
}

/// Connection options for the operator tools that only read walcast's slot
/// record (`check`, `status`, `publication sync`): the state directory's
/// copy, without opening (or creating) the Kafka state topic.
pub(crate) fn tool_options(cfg: &Config) -> Result<ConnectOptions, Error> {
    let dir = cfg.state_dir(|k| std::env::var_os(k))?;
    walcast_runtime::connect_options(
        cfg,
        walcast_postgres::SlotState::new(vec![std::sync::Arc::new(
            walcast_postgres::FileStore::new(dir),
        )]),
    )
}

/// Connection options for the tools that change walcast's slot record
/// (`slot create`, `slot advance`, `slot drop`): both copies, as `run`.
pub(crate) async fn tool_options_writing(cfg: &Config) -> Result<ConnectOptions, Error> {
    walcast_runtime::connect_options(cfg, walcast_runtime::state_stores(cfg).await?)
}

/// `walcast run`: the relay until SIGTERM/SIGINT.
async fn run(cfg: Config) -> Result<(), Error> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: stopping (outstanding deliveries are awaited)");
        let _ = stop_tx.send(true);
    });
    let relay = Relay::new(cfg)?;
    // A hidden debugging aid (issue 14): the pipeline's counters every 10 ms as CSV.
    let timeline = match std::env::var_os(timeline::TIMELINE_ENV) {
        Some(path) if !path.is_empty() => {
            let path = PathBuf::from(path);
            let t = timeline::Timeline::start(&path, relay.progress()).map_err(|e| {
                Error::operator(format!(
                    "cannot write the timeline file {} ({})",
                    path.display(),
                    timeline::TIMELINE_ENV
                ))
                .with_hint("name a file in a writable directory, or unset the variable")
                .with_source(e)
            })?;
            tracing::info!(path = %path.display(), "writing the counters' timeline every 10 ms");
            Some(t)
        }
        _ => None,
    };
    let result = relay.run(stop_rx).await;
    if let Some(t) = timeline {
        let path = t.path().display().to_string();
        if let Err(e) = t.finish().await {
            tracing::warn!(path, error = %e, "the timeline file is incomplete");
        }
    }
    result
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

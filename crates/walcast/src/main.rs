//! `walcast`: the transactional outbox relay from PostgreSQL to Apache Kafka.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use walcast_core::config::{Config, LogFormat};
use walcast_core::failpoint::Failpoints;
use walcast_core::outbox::OutboxFilter;
use walcast_core::pipeline::{Pipeline, PipelineExit, PipelineSettings, Progress};
use walcast_core::route::{Router, TopicTemplate};
use walcast_core::sink::EventSink;
use walcast_core::source::ReplicationSource;
use walcast_core::state::SlotRecordStore;
use walcast_core::{Decision, Error, ErrorKind};
use walcast_kafka::{KafkaRecordStore, KafkaSink, QueueLimits, TopicLimits};
use walcast_postgres::{ConnectOptions, FileStore, SlotState};

mod ops;

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
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay until SIGTERM/SIGINT.
    Run(ConfigArgs),
    /// Validate the configuration (no I/O) and print it with secrets redacted.
    Config(ConfigArgs),
    /// Print records of the outbox topics as they arrive (topic, partition,
    /// offset, key, headers, value), for demos and debugging.
    Tail {
        #[command(flatten)]
        config: ConfigArgs,
        /// Topics to read, as a regex (default: derived from outbox.topic).
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

fn load(args: &ConfigArgs) -> Result<Config, Error> {
    Config::load(args.config.as_deref(), std::env::vars(), &args.set)
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
        Command::Config(args) => {
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
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
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
            let regex = topic_regex.unwrap_or_else(|| {
                let t = &cfg.outbox.topic;
                format!(
                    "^{}$",
                    t.replace('.', "\\.").replace("${routedByValue}", ".+")
                )
            });
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
            let cfg = load(&args)?;
            init_logging(&cfg);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let done = rt.block_on(async {
                let opts = connect_options(&cfg, state_stores(&cfg).await?)?;
                walcast_postgres::accept_slot_gap(&opts).await
            })?;
            println!("{done}");
            Ok(())
        }
        Command::Slot {
            command: SlotCommand::Manage(cmd),
        } => ops::slot::run(cmd),
        Command::Ops(cmd) => ops::run(cmd),
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

/// walcast's slot record stores (delivery rule 5): the state directory and
/// the compacted Kafka topic. Opening the topic creates it when missing.
async fn state_stores(cfg: &Config) -> Result<SlotState, Error> {
    let dir = cfg.state_dir(|k| std::env::var_os(k))?;
    match &cfg.pipeline.state_dir {
        Some(given) if given.is_relative() => tracing::info!(
            "pipeline.state_dir {} is relative: walcast's slot records are kept in {}",
            given.display(),
            dir.display()
        ),
        _ => {}
    }
    if cfg.pipeline.state_dir.is_none() && std::path::Path::new("walcast-state").is_dir() {
        tracing::warn!(
            "found walcast-state in the working directory (the former default state directory); walcast now keeps its slot records in {}. Set pipeline.state_dir to the old directory's absolute path to keep using it",
            dir.display()
        );
    }
    let kafka = KafkaRecordStore::open(&cfg.kafka, &cfg.pipeline.state_topic).await?;
    tracing::info!(
        state_dir = %dir.display(),
        state_topic = %cfg.pipeline.state_topic,
        "walcast's slot records: the state directory and the Kafka topic"
    );
    let stores: Vec<Arc<dyn SlotRecordStore>> =
        vec![Arc::new(FileStore::new(dir)), Arc::new(kafka)];
    Ok(SlotState::new(stores))
}

/// Connection options for the operator tools that only read walcast's slot
/// record (`check`, `status`, `publication sync`): the state directory's
/// copy, without opening (or creating) the Kafka state topic.
pub(crate) fn tool_options(cfg: &Config) -> Result<ConnectOptions, Error> {
    let dir = cfg.state_dir(|k| std::env::var_os(k))?;
    connect_options(cfg, SlotState::new(vec![Arc::new(FileStore::new(dir))]))
}

/// Connection options for the tools that change walcast's slot record
/// (`slot create`, `slot advance`, `slot drop`): both copies, as `run`.
pub(crate) async fn tool_options_writing(cfg: &Config) -> Result<ConnectOptions, Error> {
    connect_options(cfg, state_stores(cfg).await?)
}

fn connect_options(cfg: &Config, state: SlotState) -> Result<ConnectOptions, Error> {
    Ok(ConnectOptions {
        pg: cfg.postgres.clone(),
        password: cfg.postgres_password()?,
        tables: cfg.outbox_tables()?,
        columns: cfg.outbox.columns.clone(),
        state,
        max_row_bytes: cfg.pipeline.max_row_bytes,
    })
}

async fn run(cfg: Config) -> Result<(), Error> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: stopping (outstanding deliveries are awaited)");
        let _ = stop_tx.send(true);
    });
    // Resolved before any I/O: a missing state directory is a setup error.
    cfg.state_dir(|k| std::env::var_os(k))?;
    let mut opts: Option<ConnectOptions> = None;
    // Test-only crash points, read once; `None` unless WALCAST_FAILPOINTS is set.
    let failpoints = Failpoints::from_env()?.map(Arc::new);
    if failpoints.is_some() {
        let var = walcast_core::failpoint::ENV_VAR;
        tracing::warn!(
            "{var}={} is set: this process will abort itself there (a test tool, never for production)",
            std::env::var(var).unwrap_or_default()
        );
    }
    if walcast_core::ack::BROKEN_ACK_FOR_TESTS {
        tracing::error!(
            "this walcast was built with the feature broken-ack-for-tests: it acknowledges a transaction when its FIRST event is delivered and LOSES DATA. It exists only to prove that the reliability suite catches such a bug"
        );
    }
    let progress = Arc::new(Progress::default());
    // The topics' record size limits, read by each run's sink and kept here
    // so a limit one run learnt sizes the next run's producer.
    let topic_limits = TopicLimits::default();
    let initial = Duration::from_millis(cfg.pipeline.restart_backoff_initial_ms);
    let max = Duration::from_millis(cfg.pipeline.restart_backoff_max_ms);
    let mut backoff = initial;
    loop {
        if *stop_rx.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        match run_once(
            &cfg,
            &mut opts,
            &progress,
            &failpoints,
            &topic_limits,
            stop_rx.clone(),
        )
        .await
        {
            Ok(PipelineExit::Shutdown {
                confirmed,
                abandoned_events,
            }) => {
                tracing::info!(%confirmed, abandoned_events, "stopped");
                return Ok(());
            }
            Ok(PipelineExit::SourceEnded { confirmed }) => {
                tracing::warn!(%confirmed, "the server ended the replication stream; reconnecting");
            }
            Err(e) => match e.kind().decision() {
                Decision::Exit => {
                    tracing::error!(kind = %e.kind(), "{e}");
                    return Err(e);
                }
                Decision::RestartFromSlot => {
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = initial;
                    }
                    tracing::warn!(
                        kind = %e.kind(),
                        backoff_ms = backoff.as_millis() as u64,
                        "{e}; restarting from the slot's confirmed position"
                    );
                }
            },
        }
        let mut stop = stop_rx.clone();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        backoff = (backoff * 2).min(max);
    }
}

async fn run_once(
    cfg: &Config,
    opts: &mut Option<ConnectOptions>,
    progress: &Arc<Progress>,
    failpoints: &Option<Arc<Failpoints>>,
    topic_limits: &TopicLimits,
    stop: watch::Receiver<bool>,
) -> Result<PipelineExit, Error> {
    let template = TopicTemplate::parse(&cfg.outbox.topic)?;
    let mut sink = KafkaSink::connect(
        &cfg.kafka,
        QueueLimits {
            max_in_flight_events: cfg.pipeline.max_in_flight_events,
            max_in_flight_bytes: cfg.pipeline.max_in_flight_bytes,
        },
        &template,
        topic_limits,
        Duration::from_secs(10),
    )
    .await?;
    if opts.is_none() {
        *opts = Some(connect_options(cfg, state_stores(cfg).await?)?);
    }
    let opts = opts
        .as_ref()
        .ok_or_else(|| Error::permanent("connection options missing"))?;
    let connected = walcast_postgres::connect(opts).await?;
    let mut source = connected.source;
    tracing::info!(
        slot = %cfg.postgres.slot,
        publication = %cfg.postgres.publication,
        start_lsn = %connected.start_lsn,
        created_slot = connected.created_slot,
        server_version = connected.info.server_version_num,
        "streaming from the slot"
    );
    let filter = OutboxFilter::new(cfg.outbox_tables()?, cfg.outbox.columns.clone())
        .with_partitions(connected.partitions.clone());
    let router = Router::new(template);
    let mut pipeline = Pipeline::new(
        PipelineSettings {
            max_in_flight_events: cfg.pipeline.max_in_flight_events,
            max_in_flight_bytes: cfg.pipeline.max_in_flight_bytes,
            shutdown_timeout: Duration::from_millis(cfg.pipeline.shutdown_timeout_ms),
            stall_warning_after: Duration::from_secs(10),
            delivery_timeout: Duration::from_millis(cfg.kafka.delivery_timeout_ms),
        },
        filter,
        router,
        progress.clone(),
    )
    .with_failpoints(failpoints.clone());
    // walcast's slot record is written ahead of every reported position by
    // the source itself (walcast_postgres: the write-ahead gate).
    let run = pipeline.run(&mut source, &mut sink, connected.start_lsn, stop, |_| {});
    // A swapped outbox table never shows in the stream: watch the catalog.
    let catalog = connected.catalog.clone();
    let watch = async {
        match cfg.postgres.catalog_check_interval_ms {
            0 => std::future::pending().await,
            ms => walcast_postgres::watch_catalog(opts, catalog, Duration::from_millis(ms)).await,
        }
    };
    let result = tokio::select! {
        r = run => r,
        e = watch => Err(e),
    };
    match result {
        Ok(exit) => {
            if let Err(e) = source.shutdown().await {
                tracing::warn!("{e}");
            }
            sink.abort();
            Ok(exit)
        }
        Err(e) => {
            // Drop everything queued so nothing of this run is delivered after
            // the next one starts; the next run replays from the slot.
            sink.abort();
            if e.kind().decision() == Decision::Exit {
                // Stopping: the pipeline confirmed what was delivered before
                // the bad input; make sure the server has it.
                if let Err(e) = source.shutdown().await {
                    tracing::warn!("{e}");
                }
            } else {
                drop(source);
            }
            Err(e)
        }
    }
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

//! `walcast status`: the slot as Postgres sees it, and the relay's own view.

use std::time::Duration;

use serde_json::json;
use walcast_postgres::{AdminSession, SlotStatus};

use super::human_bytes;
use super::metrics::{self, Relay};
use crate::ConfigArgs;

/// `walcast status` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print JSON instead of a table (one object per line with --watch).
    #[arg(long)]
    json: bool,
    /// Show it again every SECONDS until interrupted.
    #[arg(long, value_name = "SECONDS")]
    watch: Option<u64>,
}

pub(crate) fn run(args: StatusArgs) -> anyhow::Result<()> {
    // every pipeline, or the one --pipeline names
    let cfgs = crate::load_all(&args.config)?;
    let opts = cfgs
        .iter()
        .map(crate::tool_options)
        .collect::<Result<Vec<_>, _>>()?;
    let rt = super::runtime()?;
    let relay = |cfg: &walcast_core::config::Config| {
        let listen = cfg.metrics.listen.clone();
        let pipeline = cfg.postgres.slot.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                metrics::read(listen.as_deref(), &pipeline, Duration::from_secs(3))
            })
            .await
            .unwrap_or(Relay::NotConfigured)
        }
    };
    rt.block_on(async {
        let Some(every) = args.watch else {
            let mut views = Vec::new();
            for (cfg, opts) in cfgs.iter().zip(&opts) {
                let mut s = AdminSession::open(opts).await?;
                let pg = s.slot_status().await?;
                views.push((cfg, pg, relay(cfg).await));
            }
            print(&views, args.json, false)?;
            return anyhow::Ok(());
        };
        let every = Duration::from_secs(every.max(1));
        let mut sessions: Vec<Option<AdminSession<'_>>> = opts.iter().map(|_| None).collect();
        loop {
            let mut views = Vec::new();
            for ((cfg, opts), session) in cfgs.iter().zip(&opts).zip(sessions.iter_mut()) {
                if session.is_none() {
                    match AdminSession::open(opts).await {
                        Ok(s) => *session = Some(s),
                        Err(e) => eprintln!("walcast status ({}): {e}", cfg.postgres.slot),
                    }
                }
                if let Some(s) = session.as_mut() {
                    match s.slot_status().await {
                        Ok(pg) => views.push((cfg, pg, relay(cfg).await)),
                        Err(e) => {
                            eprintln!("walcast status ({}): {e}", cfg.postgres.slot);
                            *session = None;
                        }
                    }
                }
            }
            if !views.is_empty() {
                print(&views, args.json, true)?;
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    })
}

/// One pipeline's view: its configuration, its slot as Postgres sees it,
/// and the relay's metrics.
type View<'a> = (&'a walcast_core::config::Config, SlotStatus, Relay);

/// Prints the views: one pipeline as before; several one after the other
/// (JSON: `{"pipelines": [...]}`).
fn print(views: &[View<'_>], as_json: bool, watching: bool) -> anyhow::Result<()> {
    if as_json {
        let v = match views {
            [(cfg, pg, relay)] => to_json(cfg, pg, relay),
            _ => json!({
                "pipelines": views
                    .iter()
                    .map(|(cfg, pg, relay)| to_json(cfg, pg, relay))
                    .collect::<Vec<_>>()
            }),
        };
        if watching {
            println!("{}", serde_json::to_string(&v)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        return Ok(());
    }
    if watching && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        print!("\x1b[2J\x1b[H");
    }
    let tables: Vec<String> = views
        .iter()
        .map(|(cfg, pg, relay)| table(cfg, pg, relay))
        .collect();
    print!("{}", tables.join("\n"));
    Ok(())
}

fn to_json(
    _cfg: &walcast_core::config::Config,
    pg: &SlotStatus,
    relay: &Relay,
) -> serde_json::Value {
    let slot = pg.state.as_ref().map(|s| {
        json!({
            "name": pg.slot,
            "plugin": s.plugin,
            "slot_type": s.slot_type,
            "database": s.database,
            "active": s.active,
            "active_pid": s.active_pid,
            "restart_lsn": s.restart_lsn.map(|l| l.to_string()),
            "confirmed_flush_lsn": s.confirmed_flush_lsn.map(|l| l.to_string()),
            "lag_bytes": s.lag_bytes,
            "wal_status": s.wal_status,
            "safe_wal_size": s.safe_wal_size,
        })
    });
    let record = pg.record.as_ref().map(|r| {
        json!({
            "confirmed_lsn": r.confirmed_upper.to_string(),
            "confirmed_lower": r.confirmed_lower.to_string(),
            "updated_at_unix": r.updated_at_unix,
            "origin": r.origin,
        })
    });
    let relay = match relay {
        Relay::NotConfigured => json!({"configured": false}),
        Relay::Unreachable { url, error } => {
            json!({"configured": true, "url": url, "reachable": false, "error": error})
        }
        Relay::View { url, view } => json!({
            "configured": true,
            "url": url,
            "reachable": true,
            "lsn": view.lsn.iter().map(|(k, v)| (k.clone(), json!(v.to_string()))).collect::<serde_json::Map<_, _>>(),
            "replication_lag_bytes": view.replication_lag_bytes,
            "in_flight_events": view.in_flight_events,
            "in_flight_bytes": view.in_flight_bytes,
            "last_ack_age_seconds": view.last_ack_age_seconds,
            "kafka_blocked_seconds": view.kafka_blocked_seconds,
            "ready": view.ready.map(|r| r >= 1.0),
            "restarts": view.restarts,
        }),
    };
    json!({
        "slot_name": pg.slot,
        "slot": slot,
        "server_lsn": pg.server_lsn.to_string(),
        "max_slot_wal_keep_size": pg.max_slot_wal_keep_size,
        "record": record,
        "relay": relay,
    })
}

fn table(cfg: &walcast_core::config::Config, pg: &SlotStatus, relay: &Relay) -> String {
    let mut out = String::new();
    let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<20}{v}\n"));
    let p = &cfg.postgres;
    let header = format!(
        "Postgres {}:{} (database {}), slot {}\n",
        p.host, p.port, p.database, pg.slot
    );
    match &pg.state {
        None => {
            row("slot", "does not exist".into());
            row("server lsn", pg.server_lsn.to_string());
        }
        Some(s) => {
            row(
                "slot",
                format!(
                    "{} {} slot, {}",
                    s.slot_type.as_deref().unwrap_or("?"),
                    s.plugin.as_deref().unwrap_or("?"),
                    if s.active {
                        format!(
                            "active (pid {})",
                            s.active_pid
                                .map(|p| p.to_string())
                                .unwrap_or_else(|| "?".into())
                        )
                    } else {
                        "inactive (no walcast reading it)".into()
                    }
                ),
            );
            row(
                "wal_status",
                s.wal_status.clone().unwrap_or_else(|| "?".into()),
            );
            let lsn = |l: Option<walcast_core::Lsn>| {
                l.map(|l| l.to_string()).unwrap_or_else(|| "-".into())
            };
            row("restart_lsn", lsn(s.restart_lsn));
            row("confirmed_flush_lsn", lsn(s.confirmed_flush_lsn));
            row("server lsn", pg.server_lsn.to_string());
            row(
                "lag",
                s.lag_bytes
                    .map(|b| {
                        format!(
                            "{} ({b} bytes of WAL not yet confirmed)",
                            human_bytes(b as f64)
                        )
                    })
                    .unwrap_or_else(|| "-".into()),
            );
            row(
                "safe_wal_size",
                match s.safe_wal_size {
                    Some(b) => format!(
                        "{} more WAL before the slot is at risk",
                        human_bytes(b as f64)
                    ),
                    None => format!(
                        "unlimited (max_slot_wal_keep_size = {})",
                        pg.max_slot_wal_keep_size.as_deref().unwrap_or("?")
                    ),
                },
            );
        }
    }
    row(
        "walcast record",
        match &pg.record {
            Some(r) => format!(
                "last confirmed {} ({}s ago) in {}",
                r.confirmed_upper,
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs().saturating_sub(r.updated_at_unix))
                    .unwrap_or(0),
                r.origin
            ),
            None => format!(
                "none (pipeline.state_dir, pipeline.state_topic = {})",
                cfg.pipeline.state_topic
            ),
        },
    );
    let mut relay_text = String::new();
    let mut rrow = |k: &str, v: String| relay_text.push_str(&format!("  {k:<20}{v}\n"));
    let relay_header = match relay {
        Relay::NotConfigured => {
            "Relay: not configured (no [metrics] listen); only the Postgres view is shown\n"
                .to_string()
        }
        Relay::Unreachable { url, error } => {
            format!("Relay: {url} not reachable ({error}); only the Postgres view is shown\n")
        }
        Relay::View { url, view } => {
            let f = |v: Option<f64>| v.map(|v| format!("{v}")).unwrap_or_else(|| "-".into());
            rrow(
                "ready",
                match view.ready {
                    Some(r) if r >= 1.0 => "yes".into(),
                    Some(_) => "no (see /readyz for why)".into(),
                    None => "-".into(),
                },
            );
            for pos in ["server_wal_end", "received", "published", "confirmed"] {
                if let Some(l) = view.lsn.get(pos) {
                    rrow(&format!("lsn {pos}"), l.to_string());
                }
            }
            rrow(
                "lag",
                view.replication_lag_bytes
                    .map(human_bytes)
                    .unwrap_or_else(|| "-".into()),
            );
            rrow(
                "in flight",
                format!(
                    "{} events, {}",
                    f(view.in_flight_events),
                    view.in_flight_bytes
                        .map(human_bytes)
                        .unwrap_or_else(|| "-".into())
                ),
            );
            rrow(
                "last ack age",
                format!("{} s", f(view.last_ack_age_seconds)),
            );
            rrow(
                "kafka blocked",
                format!("{} s", f(view.kafka_blocked_seconds)),
            );
            rrow("restarts", f(view.restarts));
            format!("Relay ({url})\n")
        }
    };
    format!("{header}{out}{relay_header}{relay_text}")
}

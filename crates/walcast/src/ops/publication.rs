//! `walcast publication sync`.

use clap::Subcommand;
use walcast_postgres::AdminSession;

use super::Exit;
use crate::ConfigArgs;

/// Publication commands.
#[derive(Debug, Subcommand)]
pub(crate) enum PublicationCommand {
    /// Create or alter the publication to exactly the outbox tables.
    ///
    /// Afterwards it publishes INSERTs of exactly the outbox tables via the
    /// partition root (publish = 'insert', publish_via_partition_root =
    /// true). The SQL runs as postgres.user on a replication connection: that
    /// role must own the tables and the publication (and have REPLICATION);
    /// otherwise give the owner the SQL of --print-sql. Removing anything
    /// (other tables, schemas, published updates and deletes) needs --yes.
    Sync(SyncArgs),
}

/// `walcast publication sync` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct SyncArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Also remove what is not walcast's (without: print it and exit 1).
    #[arg(long)]
    yes: bool,
    /// Only print the SQL (for the owner to run, e.g. piped into psql);
    /// change nothing.
    #[arg(long, conflicts_with = "yes")]
    print_sql: bool,
}

pub(crate) fn sync(args: SyncArgs) -> anyhow::Result<()> {
    let cfg = crate::load_one(&args.config)?;
    let opts = crate::tool_options(&cfg)?;
    let name = &cfg.postgres.publication;
    super::runtime()?.block_on(async {
        let mut s = AdminSession::open(&opts).await?;
        let plan = s.publication_plan().await?;
        if args.print_sql {
            for r in &plan.removes {
                println!("-- removes {r}");
            }
            for sql in &plan.statements {
                println!("{sql};");
            }
            return Ok(());
        }
        if plan.statements.is_empty() {
            println!(
                "publication {name} already publishes INSERTs of exactly {} via the partition root (nothing to do)",
                cfg.outbox_tables()?
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Ok(());
        }
        let destructive = !plan.removes.is_empty();
        let verb = if destructive && !args.yes {
            "Would run"
        } else {
            "Running"
        };
        println!(
            "{verb} on publication {name}{}:",
            if plan.exists { "" } else { " (it does not exist)" }
        );
        for sql in &plan.statements {
            println!("  {sql};");
        }
        for a in &plan.adds {
            println!("Adds: {a}");
        }
        for r in &plan.removes {
            println!("Removes: {r}");
        }
        if destructive {
            println!(
                "What is removed no longer reaches any subscriber of publication {name}; walcast itself relays only the outbox tables."
            );
            if !args.yes {
                println!("\nNothing was done. Run again with --yes to apply it.");
                return Err(Exit(1).into());
            }
        }
        s.apply_publication_plan(&plan).await?;
        println!("Done.");
        Ok(())
    })
}

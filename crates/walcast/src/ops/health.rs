//! `walcast health`: a health check that needs nothing but the binary
//! (container images have no curl).

use std::time::Duration;

use super::{http, Exit};

/// `walcast health` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct HealthArgs {
    /// The endpoint.
    #[arg(long, default_value = "http://127.0.0.1:9187/readyz")]
    url: String,
    /// Give up after this long.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

pub(crate) fn run(args: HealthArgs) -> anyhow::Result<()> {
    match http::get(&args.url, Duration::from_millis(args.timeout_ms)) {
        Ok(r) => {
            let body = r.body.trim();
            println!("{} {}", r.status, body.lines().next().unwrap_or_default());
            if (200..300).contains(&r.status) {
                Ok(())
            } else {
                Err(Exit(1).into())
            }
        }
        Err(e) => {
            println!("unreachable: {}: {e:#}", args.url);
            Err(Exit(1).into())
        }
    }
}

//! The withdrawal example: the service side ([`record_withdrawal`]), the two
//! consumers ([`PartnerSync`], [`Notification`]) and the check that every
//! withdrawal's side effects happened exactly once ([`verify`]).
#![warn(missing_docs)]

use serde::{Deserialize, Serialize};
use tokio_postgres::{GenericClient, Transaction};
use walcast_consumer::{Delivery, Handler, HandlerError};
use walcast_outbox::{migrations, Event, Outbox};

/// The aggregate type: walcast routes the events to `<prefix>.Withdrawal`.
pub const AGGREGATE: &str = "Withdrawal";

/// The example's tables: the outbox and `processed_events` (the libraries'
/// migrations), the withdrawals, and one side-effect table per consumer
/// (deliberately without unique constraints, so a second side effect would
/// show).
pub async fn setup<C: GenericClient + Sync>(c: &C, publication: &str) -> anyhow::Result<()> {
    migrations::apply(c, migrations::Layout::Plain).await?;
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS withdrawal (id text PRIMARY KEY, account text NOT NULL, \
             amount_cents bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE IF NOT EXISTS partner_sync (withdrawal_id text NOT NULL, amount_cents bigint NOT NULL, \
             synced_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE IF NOT EXISTS notification (withdrawal_id text NOT NULL, message text NOT NULL, \
             sent_at timestamptz NOT NULL DEFAULT now());",
    )
    .await?;
    let exists = c
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some();
    if !exists {
        c.batch_execute(&format!(
            "CREATE PUBLICATION {publication} FOR TABLE outbox \
             WITH (publish = 'insert', publish_via_partition_root = true)"
        ))
        .await?;
    }
    Ok(())
}

/// The `WithdrawalRequested` event's payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WithdrawalRequested {
    /// Withdrawal id.
    pub withdrawal_id: String,
    /// Account.
    pub account: String,
    /// Amount.
    pub amount_cents: i64,
}

/// Records a withdrawal and its event in one transaction.
pub async fn record_withdrawal(
    tx: &Transaction<'_>,
    id: &str,
    account: &str,
    amount_cents: i64,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO withdrawal (id, account, amount_cents) VALUES ($1, $2, $3)",
        &[&id, &account, &amount_cents],
    )
    .await?;
    let event = Event::json(
        AGGREGATE,
        account,
        "WithdrawalRequested",
        &WithdrawalRequested {
            withdrawal_id: id.to_string(),
            account: account.to_string(),
            amount_cents,
        },
    )?
    .correlation_id(id);
    Outbox::default().enqueue(tx, &event).await?;
    Ok(())
}

/// Consumer 1: tells the payment partner (here: a row in `partner_sync`).
#[derive(Debug, Default)]
pub struct PartnerSync;

impl Handler for PartnerSync {
    async fn handle(&self, tx: &Transaction<'_>, e: &Delivery) -> Result<(), HandlerError> {
        let w: WithdrawalRequested = e.json()?;
        if w.amount_cents <= 0 {
            return Err(HandlerError::permanent("amount must be positive"));
        }
        tx.execute(
            "INSERT INTO partner_sync (withdrawal_id, amount_cents) VALUES ($1, $2)",
            &[&w.withdrawal_id, &w.amount_cents],
        )
        .await?;
        Ok(())
    }
}

/// Consumer 2: notifies the customer (here: a row in `notification`).
#[derive(Debug, Default)]
pub struct Notification;

impl Handler for Notification {
    async fn handle(&self, tx: &Transaction<'_>, e: &Delivery) -> Result<(), HandlerError> {
        let w: WithdrawalRequested = e.json()?;
        let message = format!(
            "Your withdrawal of {}.{:02} was requested",
            w.amount_cents / 100,
            w.amount_cents % 100
        );
        tx.execute(
            "INSERT INTO notification (withdrawal_id, message) VALUES ($1, $2)",
            &[&w.withdrawal_id, &message],
        )
        .await?;
        Ok(())
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Withdrawals recorded.
    pub withdrawals: i64,
    /// Withdrawals without a partner sync.
    pub partner_missing: i64,
    /// Withdrawals synced more than once.
    pub partner_repeated: i64,
    /// Withdrawals without a notification.
    pub notification_missing: i64,
    /// Withdrawals notified more than once.
    pub notification_repeated: i64,
}

impl Report {
    /// Every withdrawal's side effects happened exactly once.
    pub fn exactly_once(&self) -> bool {
        self.partner_missing == 0
            && self.partner_repeated == 0
            && self.notification_missing == 0
            && self.notification_repeated == 0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} withdrawals; partner sync: {} missing, {} repeated; notification: {} missing, {} repeated",
            self.withdrawals,
            self.partner_missing,
            self.partner_repeated,
            self.notification_missing,
            self.notification_repeated
        )
    }
}

/// Counts, per withdrawal, its partner syncs and notifications.
pub async fn verify<C: GenericClient + Sync>(c: &C) -> anyhow::Result<Report> {
    let row = c
        .query_one(
            "WITH p AS (SELECT withdrawal_id, count(*) n FROM partner_sync GROUP BY 1), \
                  n AS (SELECT withdrawal_id, count(*) n FROM notification GROUP BY 1) \
             SELECT count(*), \
                    count(*) FILTER (WHERE p.n IS NULL), count(*) FILTER (WHERE p.n > 1), \
                    count(*) FILTER (WHERE n.n IS NULL), count(*) FILTER (WHERE n.n > 1) \
             FROM withdrawal w LEFT JOIN p ON p.withdrawal_id = w.id LEFT JOIN n ON n.withdrawal_id = w.id",
            &[],
        )
        .await?;
    Ok(Report {
        withdrawals: row.get(0),
        partner_missing: row.get(1),
        partner_repeated: row.get(2),
        notification_missing: row.get(3),
        notification_repeated: row.get(4),
    })
}

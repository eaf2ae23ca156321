//! The writer over `sqlx` (feature `sqlx`): the same statements as the
//! tokio-postgres entry point, one generic entry point over everything that
//! can lend a Postgres connection ([`sqlx::Acquire`]): a
//! `&mut Transaction<'_, Postgres>` (the event commits or rolls back with
//! your business rows), a `&mut PgConnection` or a `&PgPool` (autocommit).
//! No `sqlx` macros, so no `DATABASE_URL` or offline query data at build
//! time.

use sqlx::{Acquire, PgConnection, Postgres};

use crate::{
    json_texts, message_contents, Error, Event, Mode, Outbox, Payloads, Result, EMIT_SQL,
    RENDER_JSONB_SQL,
};

fn sqlx_err(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
    let context = context.into();
    move |source| Error::Sqlx { context, source }
}

impl Outbox {
    /// [`Outbox::enqueue`] over sqlx: writes one event on `conn` (for
    /// atomicity with your business rows, `&mut tx` of a
    /// `sqlx::Transaction<'_, Postgres>`; also `&mut PgConnection` or
    /// `&PgPool`). Never commits.
    pub async fn enqueue_sqlx<'c, A>(&self, conn: A, event: &Event) -> Result<()>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        self.enqueue_batch_sqlx(conn, std::slice::from_ref(event))
            .await
            .map(|_| ())
    }

    /// [`Outbox::enqueue_batch`] over sqlx: `events` in one statement (then
    /// one DELETE in [`Mode::InsertDelete`]), in slice order. Returns the
    /// number of events written. Never commits.
    pub async fn enqueue_batch_sqlx<'c, A>(&self, conn: A, events: &[Event]) -> Result<u64>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        if events.is_empty() {
            return Ok(0);
        }
        let mut conn = conn
            .acquire()
            .await
            .map_err(sqlx_err("acquiring a connection"))?;
        let conn: &mut PgConnection = &mut conn;
        if self.mode == Mode::Message {
            return self.emit_messages_sqlx(conn, events).await;
        }
        let rows = self.rows(events)?;
        let insert = sqlx::query(&self.insert_sql)
            .bind(&rows.ids)
            .bind(&rows.types)
            .bind(&rows.keys)
            .bind(&rows.etypes);
        let insert = match &rows.payloads {
            Payloads::Text(t) => insert.bind(t),
            Payloads::Bytes(b) => insert.bind(b),
        };
        let n = insert
            .bind(&rows.correlation_ids)
            .bind(&rows.traceparents)
            .execute(&mut *conn)
            .await
            .map_err(sqlx_err(format!("INSERT INTO {}", self.table)))?
            .rows_affected();
        if self.mode == Mode::InsertDelete {
            // After the INSERT, never pipelined with it.
            sqlx::query(&self.delete_sql)
                .bind(&rows.ids)
                .bind(&rows.keys)
                .execute(&mut *conn)
                .await
                .map_err(sqlx_err(format!("DELETE FROM {}", self.table)))?;
        }
        Ok(n)
    }

    async fn emit_messages_sqlx(&self, conn: &mut PgConnection, events: &[Event]) -> Result<u64> {
        let json = json_texts(events);
        let rendered: Vec<Option<String>> = if json.iter().any(Option::is_some) {
            sqlx::query_scalar(RENDER_JSONB_SQL)
                .bind(&json)
                .fetch_all(&mut *conn)
                .await
                .map_err(sqlx_err("rendering JSON payloads as jsonb"))?
        } else {
            json
        };
        let contents = message_contents(events, rendered);
        // The messages, not the result rows: a SELECT's row count.
        let n = sqlx::query(EMIT_SQL)
            .bind(&self.prefix)
            .bind(&contents)
            .execute(&mut *conn)
            .await
            .map_err(sqlx_err("pg_logical_emit_message"))?
            .rows_affected();
        Ok(n)
    }
}

//! The database: connection pool for REST, migrations, and the embedded
//! PostgreSQL used when no `DATABASE_URL` is given.

pub mod embedded;
mod tls;

pub use tls::Tls;

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};

mod migrations {
    refinery::embed_migrations!("sql");
}

/// Advisory lock key held while migrating, so replicas starting together
/// do not race each other.
const MIGRATION_LOCK: i64 = 0x6f72_6463_0000_0001;

/// How long sent data may go unacknowledged before a connection counts as
/// dead (TCP_USER_TIMEOUT).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses a URL and applies the connection settings every ordercast
/// connection uses: a connect timeout, TCP keepalives (an idle connection to
/// a dead peer is noticed) and a TCP user timeout (so is a busy one: without
/// it a query sent to a host that went away, a failover to another address
/// or a partition, waits for the kernel's retransmissions, about 15 minutes,
/// and with it every stream resuming through that pooled connection). A URL's
/// own `connect_timeout` or `tcp_user_timeout` (seconds) wins. Its TLS
/// parameters are for `tls`.
pub fn pg_config(url: &str) -> anyhow::Result<tokio_postgres::Config> {
    let split = tls::split(url).context("DATABASE_URL's TLS parameters")?;
    let mut config: tokio_postgres::Config =
        split.rest.parse().context("DATABASE_URL is not a valid PostgreSQL URL")?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    // A URL's `keepalives=0` or `keepalives_idle` wins, as the timeouts'
    // do. The parsed config cannot tell an explicit `keepalives_idle=7200`
    // from tokio-postgres's default (2 h), so the string is asked.
    if config.get_keepalives() && !names_parameter(&split.rest, "keepalives_idle") {
        config.keepalives_idle(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name("ordercast");
    }
    // TLS needs a host name (for SNI and `verify-full`): a string that gives
    // only `hostaddr` gets its addresses as names, as libpq uses them.
    if config.get_hosts().is_empty() {
        for addr in config.get_hostaddrs().to_vec() {
            config.host(addr.to_string());
        }
    }
    Ok(config)
}

/// Whether a connection string (`postgres://...?k=v&...` or `k=v k=v`)
/// gives the parameter `name`.
fn names_parameter(conn: &str, name: &str) -> bool {
    // A URL as tokio-postgres tells one: by its scheme (a quoted value may
    // hold `://`).
    let url = ["postgres://", "postgresql://"].iter().find_map(|scheme| conn.strip_prefix(scheme));
    match url {
        Some(rest) => {
            rest.split_once('?').is_some_and(|(_, q)| q.split('&').any(|p| p.split('=').next() == Some(name)))
        }
        // One that cannot be read is refused by tokio-postgres as well.
        None => key_values(conn).is_ok_and(|kv| kv.iter().any(|(k, _)| k == name)),
    }
}

/// The settings of a key-value connection string (`host=db password='a b'`),
/// read as libpq and tokio-postgres read them: spaces around `=` are
/// allowed, a value quoted with `'` may hold spaces, and `\` takes the next
/// character as it is. Errors name the setting, never its value (a
/// password).
pub(crate) fn key_values(conn: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut it = conn.chars().peekable();
    let mut out = Vec::new();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            match it.peek() {
                None => return Ok(out),
                Some(_) => anyhow::bail!("a setting of the connection string has no name before its `=`"),
            }
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            anyhow::bail!("the connection string's {key:?} has no `=` after it");
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    None => anyhow::bail!("the connection string's {key:?} opens a quote it does not close"),
                    Some('\'') => break,
                    Some('\\') => value.extend(it.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(it.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// `value` as a key-value connection string holds it (see `key_values`):
/// quoted when it is empty or holds a space, a quote or a backslash.
pub(crate) fn conn_value(value: &str) -> String {
    if !value.is_empty() && !value.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\') {
        return value.to_string();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

/// The server's side of noticing a dead peer, set on every connection (the
/// client's side is in `pg_config`). PostgreSQL's defaults leave it to the
/// kernel: a backend whose client's host died (no FIN, no RST: a crash, a
/// cut cable) sits idle about two hours before the session ends, holding
/// its locks: the outbox relay's and the processor's session advisory
/// locks, so no standby takes over, and the row locks of a transaction it
/// had open. With these, about 25 s (or 30 s with data unacknowledged).
/// Settings, not startup `options`, so a session-mode pool can pass them.
pub const SESSION_KEEPALIVES: &str = "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
     SET tcp_keepalives_count = 3; SET tcp_user_timeout = 30000";

/// For a session held for as long as ordercast runs (the LISTEN connection,
/// the outbox relay's and the processor's), whose statements have their own
/// bounds: a database or role default of a statement, lock, transaction
/// (PostgreSQL 17) or idle-in-transaction timeout would fail a long read of
/// the change log again at every try (the listener stalled, every client
/// with it), and `idle_session_timeout` (PostgreSQL 14) would end the
/// session while it waits for a notification, and with it the relay's and
/// the processor's advisory locks and their work in flight.
pub const HELD_SESSION: &str = "SET lock_timeout = 0; SET statement_timeout = 0; \
     SET idle_in_transaction_session_timeout = 0; \
     SELECT set_config('idle_session_timeout', '0', false) WHERE current_setting('server_version_num')::int >= 140000; \
     SELECT set_config('transaction_timeout', '0', false) WHERE current_setting('server_version_num')::int >= 170000";

/// How many ids already taken a new order skips before its write gives up
/// (REST's create, the Kafka ingest's): each costs one failed INSERT.
pub const ORDER_ID_ATTEMPTS: usize = 100;

/// What moves the orders' id sequence past ids written by hand.
pub const MOVE_ORDER_ID_SEQUENCE: &str =
    "SELECT setval(pg_get_serial_sequence('orders', 'id'), (SELECT max(id) FROM orders))";

/// The error once `ORDER_ID_ATTEMPTS` ids drawn in a row were taken.
pub fn order_id_sequence_behind() -> anyhow::Error {
    anyhow::anyhow!(
        "the orders' id sequence is behind ids written by hand ({ORDER_ID_ATTEMPTS} taken in a row): to move it \
         past them: {MOVE_ORDER_ID_SEQUENCE}"
    )
}

/// Logs the ids a new order (or a batch's) skipped because they were taken.
pub fn warn_order_ids_taken(writer: &str, taken: usize) {
    if taken > 0 {
        log::warn!(
            "{writer}: {taken} order ids were already taken by rows written with ids of their own; to move the id \
             sequence past them: {MOVE_ORDER_ID_SEQUENCE}"
        );
    }
}

/// The id drawn from the sequence for a new order is another row's: a DBA
/// inserted rows with ids of their own, ahead of the sequence. The next try
/// draws the next id.
pub fn order_id_taken(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| db.code().code() == "23505" && db.constraint() == Some("orders_pkey"))
}

/// TLS for connections to `url`, as its `sslmode`, `sslrootcert`, `sslcert`
/// and `sslkey` ask (see `tls`): every ordercast connection is opened with it.
pub fn tls(url: &str) -> anyhow::Result<Tls> {
    tls::split(url).and_then(|s| s.connector()).context("TLS to PostgreSQL")
}

/// The pool behind the REST API. Waits are bounded so a request answers 503
/// when the database is away instead of hanging.
pub fn pool(url: &str, size: usize, timeout: Duration) -> anyhow::Result<Pool> {
    let manager =
        Manager::from_config(pg_config(url)?, tls(url)?, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
            Box::pin(async move {
                client.batch_execute(SESSION_KEEPALIVES).await.map_err(deadpool_postgres::HookError::Backend)
            })
        }))
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts { wait: Some(timeout), create: Some(timeout), recycle: Some(timeout) })
        .build()
        .context("Failed to build the database pool")
}

/// Opens a plain connection and drives it on a task.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    connect_as(url, None).await
}

/// `connect`, named `application_name` in `pg_stat_activity` when given
/// (over the URL's).
pub async fn connect_as(url: &str, application_name: Option<&str>) -> anyhow::Result<tokio_postgres::Client> {
    let mut config = pg_config(url)?;
    if let Some(name) = application_name {
        config.application_name(name);
    }
    let (client, connection) =
        config.connect(tls(url)?).await.map_err(describe).context("Failed to connect to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            log::debug!("database connection closed: {e}");
        }
    });
    client.batch_execute(SESSION_KEEPALIVES).await.map_err(describe)?;
    Ok(client)
}

/// Applies the migrations in `sql/`.
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    let mut client = connect(url).await?;
    refuse_sql_ascii(&client).await?;
    // A database or role's timeouts do not apply to the wait for another
    // replica's migrations (with `lock_timeout`, a replica starting while
    // another migrated failed at once) nor to a long migration (with
    // `statement_timeout`, it failed at every start). The migrations' own
    // locks keep `lock_timeout`: an ALTER TABLE waiting behind a dump would
    // queue every writer of that table behind it.
    client.batch_execute(HELD_SESSION).await.map_err(describe)?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(describe)
        .context("Failed to take the migration lock")?;
    client.batch_execute("RESET lock_timeout").await.map_err(describe)?;
    // Migrations this binary does not know (a newer ordercast ran them) are
    // no reason to stop: in a rolling upgrade the older instances restart
    // on the newer schema (docs/deploy.md says which upgrades allow it).
    let runner = migrations::migrations::runner().set_abort_missing(false);
    let ours = runner.get_migrations().iter().map(|m| m.version()).max().unwrap_or(0);
    let report = runner.run_async(&mut client).await.context("Failed to apply migrations")?;
    for m in report.applied_migrations() {
        log::info!("applied migration {}", m);
    }
    // With `abort_missing` off, refinery only logs a migration of ours it
    // skipped because a newer one was applied first: refused here.
    let applied: Vec<i32> = client
        .query("SELECT version FROM refinery_schema_history", &[])
        .await
        .map_err(describe)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let newest = applied.iter().copied().max();
    if let Some(skipped) = runner.get_migrations().iter().find(|m| !applied.contains(&m.version())) {
        anyhow::bail!(
            "migration {skipped} was not applied: the database has newer ones (up to V{}), applied out of order",
            newest.unwrap_or(0)
        );
    }
    if let Some(newest) = newest.filter(|n| *n > ours) {
        log::warn!(
            "the database has migrations up to V{newest}, newer than this ordercast's (up to V{ours}): a newer \
             version migrated it. Running on it, as in a rolling upgrade; see docs/deploy.md before rolling back"
        );
    }
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await.map_err(describe)?;
    Ok(())
}

/// A database whose encoding is `SQL_ASCII` keeps text as the bytes a client
/// sent, unchecked and unconverted: a DBA's psql in a Latin-1 terminal
/// writes names that are not UTF-8, which no reader of the change log can
/// take (tokio-postgres refuses such text) and no JSON can carry. Refused
/// before anything is written, with the way out.
async fn refuse_sql_ascii(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    let row = client.query_one("SELECT current_setting('server_encoding')", &[]).await.map_err(describe)?;
    if row.get::<_, String>(0) == "SQL_ASCII" {
        anyhow::bail!(
            "the database's encoding is SQL_ASCII: PostgreSQL keeps text there as the bytes a client sent, \
             unchecked, and a DBA's psql in a Latin-1 terminal writes names ordercast cannot read or send. Create \
             the database with the UTF8 encoding (CREATE DATABASE ... TEMPLATE template0 ENCODING 'UTF8' LOCALE \
             'C.UTF-8') and move the data there"
        );
    }
    Ok(())
}

/// A rule's error as users read it: the message, and the hint when the rule
/// gives one (`orders_guard` lists the allowed statuses there).
pub fn message_with_hint(db: &tokio_postgres::error::DbError) -> String {
    match db.hint() {
        Some(hint) => format!("{} ({hint})", db.message()),
        None => db.message().to_string(),
    }
}

/// tokio-postgres prints only "db error" for server errors: this spells out
/// the message, code and detail. For other errors it prints only their kind
/// ("error connecting to server", "error performing TLS handshake"): this
/// adds what caused it (connection refused, certificate verify failed).
pub fn describe(e: tokio_postgres::Error) -> anyhow::Error {
    match e.as_db_error() {
        Some(db) => anyhow::anyhow!(
            "{} (SQLSTATE {}){}",
            db.message(),
            db.code().code(),
            db.detail().map(|d| format!(": {d}")).unwrap_or_default()
        ),
        None => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text = format!("{text}: {c}");
                cause = c.source();
            }
            anyhow::anyhow!(text)
        }
    }
}

/// A read-only REPEATABLE READ transaction: every statement in it sees one
/// snapshot, so a position read in it (positions are visible as a prefix)
/// covers exactly the rows read beside it.
pub async fn snapshot(
    client: &mut deadpool_postgres::Client,
) -> Result<deadpool_postgres::Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}

/// Runs `statement` as a portal in `tx` and hands its rows to `take` until
/// it returns false or the rows run out. Rows are fetched in chunks (32,
/// doubling up to 4,096), so a reader that stops early (a page cut at its
/// bytes) has had PostgreSQL send the rest of one chunk at most, not every
/// row the statement would give.
pub async fn portal_rows(
    tx: &tokio_postgres::Transaction<'_>,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    mut take: impl FnMut(tokio_postgres::Row) -> Result<bool, tokio_postgres::Error>,
) -> Result<(), tokio_postgres::Error> {
    use futures_util::TryStreamExt;
    let portal = tx.bind(statement, params).await?;
    let mut chunk = 32;
    loop {
        let mut rows = std::pin::pin!(tx.query_portal_raw(&portal, chunk).await?);
        let mut n = 0;
        while let Some(row) = rows.try_next().await? {
            n += 1;
            if !take(row)? {
                return Ok(());
            }
        }
        if n < chunk {
            return Ok(());
        }
        chunk = (chunk * 2).min(4096);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_strings_are_read_as_libpq_reads_them() {
        let kv = key_values(" host = db password='it\\'s a \\\\ secret' user=a\\ b\tdbname='' ").unwrap();
        let want = [("host", "db"), ("password", "it's a \\ secret"), ("user", "a b"), ("dbname", "")];
        assert_eq!(kv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>(), want);
        for (k, v) in &kv {
            let again = key_values(&format!("{k}={}", conn_value(v))).unwrap();
            assert_eq!(again, [(k.clone(), v.clone())], "{v:?} written back as {}", conn_value(v));
        }
        for bad in ["host", "host db", "=db", "host=db =x"] {
            assert!(key_values(bad).is_err(), "{bad}");
        }
        assert!(!key_values("password='s3cret").unwrap_err().to_string().contains("s3cret"), "no value in errors");
    }

    #[test]
    fn every_connection_notices_a_dead_peer_unless_the_url_says_otherwise() {
        let c = pg_config("postgres://u@db/orders").unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(c.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(c.get_application_name(), Some("ordercast"));
        let c = pg_config("postgres://u@db/orders?connect_timeout=2&tcp_user_timeout=7&application_name=x").unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(7)));
        assert_eq!(c.get_application_name(), Some("x"));
        let c = pg_config("postgres://u@db/orders?keepalives_idle=60").unwrap();
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(60));
        assert!(!pg_config("postgres://u@db/orders?keepalives=0").unwrap().get_keepalives());
        // Also when it is the value tokio-postgres takes by default: before,
        // an explicit 2 h was taken for no value and replaced by 10 s.
        for url in ["postgres://u@db/orders?sslmode=disable&keepalives_idle=7200", "host=db keepalives_idle=7200"] {
            assert_eq!(pg_config(url).unwrap().get_keepalives_idle(), Duration::from_secs(7200), "{url}");
        }
        let named_so = pg_config("postgres://u:keepalives_idle=1@db/orders").unwrap();
        assert_eq!(named_so.get_keepalives_idle(), Duration::from_secs(10), "a password is no parameter");
        // Nor is a quoted value's text: before, this password was read as
        // giving keepalives_idle, and the 2 h default stayed.
        let quoted = pg_config("host=db password='x keepalives_idle=5'").unwrap();
        assert_eq!(quoted.get_keepalives_idle(), Duration::from_secs(10));
        // A quoted `://` does not make the string a URL.
        let c = pg_config("host=db password='a://b' keepalives_idle=7200").unwrap();
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(7200));
        assert_eq!(quoted.get_password(), Some(&b"x keepalives_idle=5"[..]));
        // Only hostaddr: its address is the host TLS needs.
        let c = pg_config("hostaddr=10.0.0.5 dbname=x user=u").unwrap();
        assert_eq!(c.get_hosts(), [tokio_postgres::config::Host::Tcp("10.0.0.5".into())]);
    }
}

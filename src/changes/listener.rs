//! The one dedicated LISTEN connection.
//!
//! It is not taken from the pool: a pooled client's connection is driven by
//! the pool and notifications would be dropped. On every wake-up (a NOTIFY
//! doorbell, or an idle tick) it reads the change log after its position in
//! batches and publishes to the hub, so a burst costs one round trip per
//! batch, not one per change, and a missed notification costs at most one tick.
//!
//! The idle tick doubles as the watchdog: a read that does not answer within
//! `QUERY_TIMEOUT` means the connection is open but dead, and it is replaced.
//! Reconnects back off exponentially with jitter and catch up from the log,
//! so connected clients lose nothing across a dropped connection.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

use super::{Change, LogRows, READ_SQL};
use crate::hub::Hub;

pub const CHANNEL: &str = "ordercast_changes";
const READ_BATCH: i64 = 2000;
const IDLE_TICK: Duration = Duration::from_secs(1);
/// Minimum spacing of publishes per subscriber (see `coalescing_gap`).
const GAP_PER_SUBSCRIBER: Duration = Duration::from_micros(5);
/// Never hold changes back longer than this.
const MAX_GAP: Duration = Duration::from_millis(50);

/// How long to wait after a publish before the next one, given the number of
/// subscriptions: bounds publishes x subscribers per second.
pub fn coalescing_gap(subscriptions: usize) -> Duration {
    (GAP_PER_SUBSCRIBER * subscriptions.min(u32::MAX as usize) as u32).min(MAX_GAP)
}
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What `/api/health` reports about the listener.
#[derive(Debug, Default)]
pub struct ListenerState {
    pub connected: AtomicBool,
    pub position: AtomicI64,
    pub reconnects: AtomicU64,
    pub notifications: AtomicU64,
    pub last_read: Mutex<Option<Instant>>,
    pub last_error: Mutex<Option<String>>,
}

impl ListenerState {
    pub fn healthy(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
            && self
                .last_read
                .lock()
                .unwrap() // unwrap: the lock is never held across a panic
                .is_some_and(|t| t.elapsed() < QUERY_TIMEOUT + IDLE_TICK * 2)
    }
}

/// Published positions (the last of each batch) remembered with their
/// commit times, to find how far back the log still holds what was pushed
/// when it lost commits (`last_kept`).
const RECENT: usize = 64;

/// Runs until the hub shuts down.
pub async fn run(url: String, hub: Hub, state: Arc<ListenerState>) {
    let mut at = Position { pos: hub.position(), mark: None, recent: VecDeque::new(), unrecorded: None };
    state.position.store(at.pos, Ordering::Relaxed);
    let mut backoff = BACKOFF_MIN;
    let mut read_limit = READ_BATCH;
    loop {
        let started = Instant::now();
        // A panic in a session (a bug) is a lost connection too: without
        // this, it would end the task, and with it every push, while the
        // server went on serving. The position is the last one published.
        let result = crate::error::caught(session(&url, &hub, &state, &mut at, &mut read_limit))
            .await
            .unwrap_or_else(|panic| Err(anyhow::anyhow!("the change listener panicked: {panic}")));
        state.connected.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => return, // the hub is gone: shutting down
            Err(e) => {
                log::warn!("LISTEN connection lost, reconnecting: {e:#}");
                *state.last_error.lock().unwrap() = Some(format!("{e:#}")); // unwrap: see above
            }
        }
        state.reconnects.fetch_add(1, Ordering::Relaxed);
        if started.elapsed() > Duration::from_secs(30) {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(crate::backoff::next(&mut backoff, BACKOFF_MAX)).await;
    }
}

/// Where the listener is: the last position published, and what tells it
/// apart (once known), to recognise it on reconnect.
struct Position {
    pos: i64,
    mark: Option<Mark>,
    /// Recently published positions and their marks, oldest first.
    recent: VecDeque<(i64, Mark)>,
    /// Lost positions (after, through] not yet recorded (`record_loss`
    /// failed): retried while listening.
    unrecorded: Option<(i64, i64)>,
}

/// What tells a position the listener stands at apart from the same
/// number in another history of the log.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mark {
    /// The commit time (microseconds) of the transaction that holds it.
    Commit(i64),
    /// It is the position just past a recorded loss, which no transaction
    /// holds: when that record (`change_rewinds`) was made (microseconds).
    Floor(i64),
}

impl Position {
    fn published(&mut self, pos: i64, committed_micros: i64) {
        self.pos = pos;
        self.remember(Mark::Commit(committed_micros));
    }

    fn remember(&mut self, mark: Mark) {
        self.mark = Some(mark);
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((self.pos, mark));
    }
}

/// What the log holds at a position the listener stood at.
#[derive(Debug, Clone, PartialEq)]
enum Held {
    /// The transaction there, and when it committed (microseconds).
    Committed(i64),
    /// Retention has passed it: gone for every client alike, no sign of loss.
    Pruned,
    /// No transaction holds it: lost, unless it is the position just past a
    /// recorded loss; then when those records were made (microseconds).
    Missing(Vec<i64>),
}

impl Held {
    /// Whether this is still the position `mark` was taken at.
    fn still(&self, mark: Mark) -> bool {
        match (self, mark) {
            (Held::Committed(t), Mark::Commit(m)) => *t == m,
            (Held::Missing(floors), Mark::Floor(d)) => floors.contains(&d),
            (Held::Pruned, _) => true,
            _ => false,
        }
    }

    /// What to remember of a position the log holds so: its commit, or the
    /// newest recorded loss it is just past. Nothing when pruned, or lost.
    fn mark(&self) -> Option<Mark> {
        match self {
            Held::Committed(micros) => Some(Mark::Commit(*micros)),
            Held::Missing(floors) => floors.iter().max().map(|&made| Mark::Floor(made)),
            Held::Pruned => None,
        }
    }
}

/// What the log holds at each of `positions`.
async fn held(client: &impl tokio_postgres::GenericClient, positions: &[i64]) -> anyhow::Result<HashMap<i64, Held>> {
    type Time = chrono::DateTime<chrono::Utc>;
    let rows = client
        .query(
            "SELECT p, (SELECT committed_at FROM \
                        (SELECT base_pos, committed_at FROM change_tx WHERE end_pos >= p ORDER BY end_pos LIMIT 1) t \
                        WHERE t.base_pos < p), \
                    p <= (SELECT pruned_through FROM change_retention), \
                    ARRAY(SELECT detected_at FROM change_rewinds WHERE through_pos = p - 1) \
             FROM unnest($1::bigint[]) p",
            &[&positions],
        )
        .await
        .map_err(crate::db::describe)?;
    Ok(rows
        .iter()
        .map(|r| {
            let held = match (r.get::<_, Option<Time>>(1), r.get::<_, bool>(2)) {
                (Some(t), _) => Held::Committed(t.timestamp_micros()),
                (None, true) => Held::Pruned,
                (None, false) => Held::Missing(r.get::<_, Vec<Time>>(3).iter().map(Time::timestamp_micros).collect()),
            };
            (r.get(0), held)
        })
        .collect())
}

/// Those of `published` that the log no longer holds as published: no
/// transaction at their position (`pos`), or one whose commit time
/// (microseconds) `committed` refuses. Positions retention has passed are
/// not among them (the log cannot tell). The outbox relay's check of what
/// it published against the log (`workflow::outbox`).
pub(crate) async fn not_held<'a, T>(
    client: &impl tokio_postgres::GenericClient,
    published: &'a [T],
    pos: impl Fn(&T) -> i64,
    committed: impl Fn(&T, i64) -> bool,
) -> anyhow::Result<Vec<&'a T>> {
    let mut lost = Vec::new();
    // One statement per few thousand positions: a takeover's late read can
    // bring tens of thousands.
    for chunk in published.chunks(5000) {
        let positions: Vec<i64> = chunk.iter().map(&pos).collect();
        let held = held(client, &positions).await?;
        lost.extend(chunk.iter().filter(|p| match held.get(&pos(p)) {
            Some(Held::Committed(micros)) => !committed(p, *micros),
            Some(Held::Pruned) => false,
            Some(Held::Missing(_)) | None => true,
        }));
    }
    Ok(lost)
}

/// What to remember of position `pos` as the log holds it now (see
/// `Held::mark`).
async fn mark_at(client: &impl tokio_postgres::GenericClient, pos: i64) -> anyhow::Result<Option<Mark>> {
    Ok(held(client, &[pos]).await?.get(&pos).and_then(Held::mark))
}

/// Whether the log still holds what was pushed: the head is not below the
/// highest position handed out (`top`), and the listener's position is
/// still the one it stood at (the transaction there committed when it did,
/// or it is still the position just past the same recorded loss).
/// Otherwise the database lost commits that were pushed (a failover to a
/// standby that missed them, a restored backup, a crash under
/// `synchronous_commit = off`), and their positions are, or will be,
/// numbered again.
///
/// Besides the listener's own position, the newest position handed out
/// outside the live stream whose commit is known (`handed_out`: a catch-up
/// read's newest change, a page's head) is checked the same way when it is
/// further on: catch-up reads and pages run ahead of the listener, and new
/// commits can take a lost position before the listener is back.
async fn log_kept(
    client: &tokio_postgres::Client,
    at: &Position,
    handed_out: Option<(i64, i64)>,
    top: i64,
    head: i64,
) -> anyhow::Result<bool> {
    if head < top {
        return Ok(false);
    }
    let checks: Vec<(i64, Mark)> = at
        .mark
        .map(|m| (at.pos, m))
        .into_iter()
        .chain(handed_out.filter(|&(p, _)| p > at.pos).map(|(p, m)| (p, Mark::Commit(m))))
        .collect();
    if checks.is_empty() {
        return Ok(true);
    }
    let positions: Vec<i64> = checks.iter().map(|&(p, _)| p).collect();
    let now = held(client, &positions).await?;
    Ok(checks.iter().all(|(p, mark)| now.get(p).is_some_and(|h| h.still(*mark))))
}

/// The newest position the listener recently stood at that the log still
/// holds as it was (at or below `head`): the positions after it may be
/// numbered again. 0 when none is found.
async fn last_kept(client: &tokio_postgres::Client, recent: &VecDeque<(i64, Mark)>, head: i64) -> anyhow::Result<i64> {
    let positions: Vec<i64> = recent.iter().map(|&(p, _)| p).filter(|&p| p <= head).collect();
    let now = held(client, &positions).await?;
    Ok(recent.iter().rev().find(|(p, mark)| now.get(p).is_some_and(|h| h.still(*mark))).map_or(0, |&(p, _)| p))
}

/// Records that positions `after+1 ..= through` were pushed and lost, and
/// moves the log past them: under the sequencer's lock, the position
/// sequence goes past `through + 1` (no commit is numbered with a lost
/// position again) and the record makes `change_head()` answer at least
/// `through + 1` (a client that reloads is given a position past the range
/// at once). Returns the head then (every position up to it is committed,
/// lost or skipped, and the next commit comes after it) and what tells it
/// apart, read in the same transaction, before any client is told to resync
/// and could write again: the commit there, or the end of a recorded loss
/// (this one, or an earlier one).
async fn record_loss(
    client: &mut tokio_postgres::Client,
    after: i64,
    through: i64,
) -> anyhow::Result<(i64, Option<Mark>)> {
    let record = async {
        let d = crate::db::describe;
        let tx = client.build_transaction().read_only(false).start().await.map_err(d)?;
        super::lock_sequencer(&tx, "5s").await.map_err(d)?;
        super::move_sequence_to(&tx, through + 1).await.map_err(d)?;
        tx.execute("INSERT INTO change_rewinds (after_pos, through_pos) VALUES ($1, $2)", &[&after, &through])
            .await
            .map_err(d)?;
        let head: i64 = tx.query_one("SELECT change_head()", &[]).await.map_err(d)?.get(0);
        let mark = mark_at(&tx, head).await?;
        tx.commit().await.map_err(d)?;
        Ok::<_, anyhow::Error>((head, mark))
    };
    tokio::time::timeout(QUERY_TIMEOUT * 2, record).await.context("recording the loss did not answer")?
}

/// A query of the listener's start, bounded like its reads: a connection
/// that stopped answering is replaced.
async fn bounded<T>(query: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(QUERY_TIMEOUT, query)
        .await
        .context("watchdog: a query of the listener's start did not answer")?
}

/// Changes after `at` up to `pruned` were pruned before the listener read
/// them: the hub lets every subscription go, so each catches up from the log
/// and its client is told to resync.
async fn gap(hub: &Hub, at: i64, pruned: i64) -> Result<(), crate::hub::HubClosed> {
    log::error!(
        "changes {}..={pruned} were pruned before the listener read them; \
         live clients catch up from the log and are told to resync",
        at + 1
    );
    hub.gap(pruned).await
}

/// Merges two lost ranges (after, through] into one that covers both.
fn merge(a: Option<(i64, i64)>, b: (i64, i64)) -> (i64, i64) {
    a.map_or(b, |a| (a.0.min(b.0), a.1.max(b.1)))
}

/// How many changes the next read asks for: `READ_BATCH`, cut to an
/// eighth by each read that outlasts `QUERY_TIMEOUT` (rows are counted,
/// not measured: 2,000 changes of megabyte rows cannot arrive in time, and
/// the same read again would time out again, forever), and doubled back by
/// each full read that answers within an eighth of it (a short or empty
/// read, at the idle tick say, says nothing about how large a full one is).
/// A read `READ_BYTES` cut after `fitted` rows sets it to that many: the
/// database would send the rest only to have it dropped.
fn next_read_limit(limit: i64, answered: Option<(Duration, bool)>, fitted: Option<usize>) -> i64 {
    match (answered, fitted) {
        (None, _) => (limit / 8).max(1),
        (Some(_), Some(n)) => (n as i64).clamp(1, READ_BATCH),
        (Some((t, true)), None) if t < QUERY_TIMEOUT / 8 => (limit * 2).min(READ_BATCH),
        (Some(_), None) => limit,
    }
}

async fn session(
    url: &str,
    hub: &Hub,
    state: &ListenerState,
    at: &mut Position,
    read_limit: &mut i64,
) -> anyhow::Result<()> {
    let mut config = crate::db::pg_config(url)?;
    config.application_name("ordercast-listener");
    let (mut client, mut connection) = config.connect(crate::db::tls(url)?).await.map_err(crate::db::describe)?;
    let wake = Arc::new(Notify::new());
    let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<String>();
    {
        let wake = wake.clone();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            let reason = loop {
                match messages.next().await {
                    Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break e.to_string(),
                    None => break "connection closed".to_string(),
                }
            };
            let _ = closed_tx.send(reason);
        });
    }
    client
        // A read its watchdog gave up on (`QUERY_TIMEOUT`) is not left
        // running on the server for long: the listener reconnects, and the
        // backend would notice only when it sends rows.
        .batch_execute(&format!(
            "{}; {}; SET statement_timeout = {}; LISTEN {CHANNEL}",
            crate::db::SESSION_KEEPALIVES,
            crate::db::HELD_SESSION,
            2 * QUERY_TIMEOUT.as_millis()
        ))
        .await
        .map_err(crate::db::describe)
        .context("LISTEN failed")?;
    let read = client.prepare(READ_SQL).await.map_err(crate::db::describe)?;
    let horizon = client.prepare("SELECT pruned_through FROM change_retention").await.map_err(crate::db::describe)?;
    // Positions only grow, unless the database lost commits that were
    // pushed: then commits are numbered again with positions clients hold,
    // and every live client must reload (after the head).
    // Read before the head: a position handed out after the head was read
    // is no sign of loss.
    let handed_out = hub.handed_out_commit();
    let top = hub.handed_out().max(at.pos).max(handed_out.map_or(0, |(p, _)| p));
    let head: i64 = bounded(async { client.query_one("SELECT change_head()", &[]).await.map_err(crate::db::describe) })
        .await?
        .get(0);
    if !bounded(log_kept(&client, at, handed_out, top, head)).await? {
        // Recorded before the hub rewinds: a client resuming from a lost
        // position after this is told to resync by its feed (`Feed::open`);
        // one that subscribed before is by the rewind.
        let kept = bounded(last_kept(&client, &at.recent, head)).await?.min(top - 1);
        log::error!(
            "the change log no longer holds what was pushed through position {top} (its head is {head}, \
             positions after {kept} may be numbered again): the database lost commits; live clients and \
             clients resuming from those positions are told to resync"
        );
        let lost = merge(at.unrecorded, (kept, top));
        *at = match record_loss(&mut client, lost.0, lost.1).await {
            Ok((end, mark)) => {
                let mut past = Position { pos: end, mark: None, recent: VecDeque::new(), unrecorded: None };
                // Learnt before the rewind: a mark read after it could
                // already be another history's.
                if let Some(mark) = mark {
                    past.remember(mark);
                }
                past
            }
            Err(e) => {
                // A database that refuses writes (read-only after a
                // failover, say) must not keep live clients from hearing of
                // the loss: they resync now, the record is retried.
                log::error!("could not record the lost positions (will retry): {e:#}");
                Position { pos: head, mark: None, recent: VecDeque::new(), unrecorded: Some(lost) }
            }
        };
        if hub.rewind(at.pos).await.is_err() {
            return Ok(());
        }
        state.position.store(at.pos, Ordering::Relaxed);
    }
    if at.mark.is_none() {
        // Nothing read yet (a quiet log since the start, or a rewind): learn
        // what is at the position now (a commit, or the end of a recorded
        // loss), so that the next reconnect can recognise it.
        if let Some(mark) = bounded(mark_at(&client, at.pos)).await? {
            at.remember(mark);
        }
    }
    state.connected.store(true, Ordering::Relaxed);
    log::info!("listening for changes after position {}", at.pos);

    let mut last_publish = Instant::now();
    let mut last_record_try = Instant::now();
    let mut last_horizon: Option<Instant> = None;
    loop {
        // Drain everything committed after our position.
        loop {
            let limit = *read_limit;
            let after = at.pos;
            let asked = Instant::now();
            let LogRows { rows, cut } = match tokio::time::timeout(
                QUERY_TIMEOUT,
                super::read_rows(&client, &read, after, limit as i32),
            )
            .await
            {
                Ok(rows) => rows.map_err(crate::db::describe)?,
                Err(_) => {
                    *read_limit = next_read_limit(limit, None, None);
                    anyhow::bail!(
                        "watchdog: the change-log read of up to {limit} changes did not answer in {} s \
                         (the next reads ask for up to {read_limit})",
                        QUERY_TIMEOUT.as_secs()
                    );
                }
            };
            *read_limit =
                next_read_limit(limit, Some((asked.elapsed(), rows.len() as i64 == limit)), cut.then_some(rows.len()));
            // A read counts for health once its rows are read (below): one
            // that fails on a row it cannot read is no read.
            let read_done = || *state.last_read.lock().unwrap() = Some(Instant::now()); // unwrap: never poisoned

            // A gap: retention pruned changes this connection had not read
            // yet (it was away or behind for longer than the retention).
            // Clients must not see the stream jump unannounced.
            let Some(last) = rows.last() else {
                read_done();
                // A read that found nothing carries no horizon: the log may
                // have been pruned past this position and be empty now. Live
                // clients are told now, not at the next commit (hours away,
                // on a quiet system). Asked at the first such read of a
                // connection, then once per idle tick at most (empty reads
                // also follow doorbells of changes already read).
                if last_horizon.is_some_and(|t| t.elapsed() < IDLE_TICK) {
                    break;
                }
                last_horizon = Some(Instant::now());
                let pruned = tokio::time::timeout(QUERY_TIMEOUT, client.query_one(&horizon, &[]))
                    .await
                    .context("watchdog: reading the retention horizon did not answer")?
                    .map_err(crate::db::describe)?
                    .get(0);
                if pruned > at.pos {
                    if gap(hub, at.pos, pruned).await.is_err() {
                        return Ok(());
                    }
                    // No transaction holds it any more: nothing to mark.
                    at.pos = pruned;
                    at.mark = None;
                    state.position.store(at.pos, Ordering::Relaxed);
                    // What committed after the horizon was read is read now.
                    continue;
                }
                break;
            };
            let pruned: i64 = last.try_get("pruned").map_err(crate::db::describe)?;
            // A row that cannot be read (a `change_read` replaced by hand)
            // fails the session: it is read again after a reconnect, and
            // nothing after it is published before it.
            let changes = rows
                .iter()
                .map(|r| Change::from_row(r).map(Arc::new))
                .collect::<Result<Vec<_>, _>>()
                .map_err(crate::db::describe)
                .context("reading the change log")?;
            read_done();
            if pruned > at.pos && gap(hub, at.pos, pruned).await.is_err() {
                return Ok(());
            }
            // unwrap: not empty
            let newest = changes.last().unwrap();
            // More may wait: a full read, one that ends past its window
            // (positions up to `after + limit`), which a wide gap in the
            // positions (a transaction that failed after the sequencer had
            // numbered it) cuts down to the first transaction after the gap,
            // or one `READ_BYTES` cut.
            let full = rows.len() as i64 == limit || newest.pos >= after + limit || cut;
            at.published(newest.pos, newest.committed_micros);
            last_publish = Instant::now();
            if hub.publish(changes).await.is_err() {
                return Ok(());
            }
            state.position.store(at.pos, Ordering::Relaxed);
            if !full {
                break;
            }
        }
        if let Some((after, through)) = at.unrecorded.filter(|_| last_record_try.elapsed() >= IDLE_TICK) {
            // A loss the database refused to record: retried once a second
            // at most. The live stream goes on where it is; the record makes
            // resumes from the lost positions resync from now on.
            last_record_try = Instant::now();
            match record_loss(&mut client, after, through).await {
                Ok(_) => {
                    log::info!("recorded the lost positions {}..={through}", after + 1);
                    at.unrecorded = None;
                }
                Err(e) => log::debug!("could not record the lost positions yet: {e:#}"),
            }
        }
        // Coalesce bursts of small commits. Every published batch wakes every
        // subscriber once, so the publish rate times the subscriber count is
        // the fan-out's cost: at 1,000 clients x 1,000 single-row commits/s,
        // publishing each commit alone means a million session wake-ups and
        // socket writes a second, more than two cores can do, and everyone
        // falls behind. Spacing publishes by a few microseconds per subscriber
        // keeps that product bounded (~200,000 wake-ups/s) while a small
        // audience (100 clients: 0.5 ms) keeps sub-millisecond latency.
        let gap = coalescing_gap(hub.stats.subscriptions.load(Ordering::Relaxed));
        if let Some(wait) = gap.checked_sub(last_publish.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        tokio::select! {
            _ = wake.notified() => {
                state.notifications.fetch_add(1, Ordering::Relaxed);
            }
            _ = tokio::time::sleep(IDLE_TICK) => {}
            reason = &mut closed => {
                anyhow::bail!("the LISTEN connection closed: {}", reason.unwrap_or_default());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_limit_shrinks_on_a_timeout_and_grows_back_on_fast_full_reads_only() {
        assert_eq!(next_read_limit(READ_BATCH, None, None), 250);
        assert_eq!(next_read_limit(3, None, None), 1);
        assert_eq!(next_read_limit(1, None, None), 1);
        let fast = Duration::from_millis(5);
        assert_eq!(next_read_limit(250, Some((fast, true)), None), 500);
        assert_eq!(next_read_limit(1500, Some((fast, true)), None), READ_BATCH);
        // An empty or short read (the idle tick's), or a slow one: no growth.
        assert_eq!(next_read_limit(250, Some((fast, false)), None), 250);
        assert_eq!(next_read_limit(250, Some((QUERY_TIMEOUT / 2, true)), None), 250);
    }

    #[test]
    fn a_read_cut_by_its_bytes_sets_the_limit_to_the_rows_that_fitted() {
        let fast = Duration::from_millis(5);
        assert_eq!(next_read_limit(READ_BATCH, Some((fast, false)), Some(4)), 4);
        assert_eq!(next_read_limit(READ_BATCH, Some((fast, false)), Some(1)), 1);
        // Then small rows again: it doubles back.
        assert_eq!(next_read_limit(4, Some((fast, true)), None), 8);
    }
}

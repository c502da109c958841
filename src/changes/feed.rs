//! A session's gapless stream of changes.
//!
//! A feed subscribes to the hub first (learning the position `H` the live
//! stream starts after), then reads `(since, H]` from the change log, then
//! passes on live changes. If the hub drops the subscription because the
//! client fell behind, the feed subscribes again and catches up from the log
//! from the last change it delivered: a slow client loses nothing and costs the
//! others nothing. Only when the log no longer holds the client's position is
//! it told to resync.
//!
//! `next()` is cancel-safe: state changes only after an await completes, so it
//! can sit in a `select!` beside client frames and heartbeats. A catch-up read
//! in flight when `next()` is dropped is kept and resumed by the next call, not
//! started again: a query already sent cannot be taken back (the database runs
//! it anyway), so restarting it on every client frame would make a chatty
//! client far behind never progress while the database ran every abandoned read.
//!
//! Feeds that catch up from the same position at the same time (clients that
//! reconnect together after a restart, or fell behind together) share one
//! read and its changes (`SharedReads`): one query, one copy in memory.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::future::{FutureExt, Shared, WeakShared};
use tokio_postgres::error::SqlState;

use super::{log_bounds, read_after, CatchUp, Frames, SharedChange, Side};
use crate::domain::Filter;
use crate::hub::{Batch, Hub, HubClosed, SharedBatch, Subscription};

/// Changes read from the log per catch-up query.
const CATCH_UP_BATCH: i32 = 1000;
/// Pause before retrying a catch-up read while the database is away.
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// Slots a drained buffer may keep (32 bytes each).
const KEEP_BUFFERED: usize = 64;

#[derive(Debug, Clone)]
pub enum Item {
    Change(SharedChange),
    /// A live batch shared with every unfiltered client, all of it after this
    /// feed's position: send its pre-built frames / events as one write.
    Batch(Arc<SharedBatch>),
    /// A change that moved an order between customers, as a viewer confined
    /// to one of them sees it (`leave` or `enter`: see `changes::Move`),
    /// instead of the full change, which shows the other customer's row.
    /// (The change and the side: an item stays as small as the others.)
    Redacted(SharedChange, Side),
    /// The client's position is no longer (or not yet) in the log: it must
    /// reload its state; the stream continues after `position`.
    Resync {
        reason: &'static str,
        position: i64,
    },
}

pub struct Feed {
    hub: Hub,
    pool: Pool,
    filter: Filter,
    /// The customer (folded) the client's token is confined to: a move
    /// between customers reaches it redacted (`Item::Redacted`).
    viewer: Option<String>,
    sub: Option<Subscription>,
    /// Log position read up to (may pass non-matching changes).
    scan: i64,
    /// Position of the last item handed out: the client's resume position.
    last: i64,
    catch_up_to: Option<i64>,
    /// The hub dropped the subscription (the client fell behind).
    resubscribe: bool,
    buf: VecDeque<Item>,
    /// The catch-up read in flight, from `scan`: kept when `next()` is
    /// dropped, resumed by the next call.
    reading: Option<CatchUpRead>,
    /// How often this feed recovered from lagging, for tests and metrics.
    pub recoveries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Hub(#[from] HubClosed),
    #[error(transparent)]
    Db(#[from] crate::error::ApiError),
}

impl Feed {
    /// Opens a feed of changes after `since` (None: from now on). `viewer`:
    /// the customer (folded) the client's token is confined to, if any; the
    /// filter must then be confined to that customer too.
    pub async fn open(
        hub: &Hub,
        pool: &Pool,
        filter: Filter,
        since: Option<i64>,
        viewer: Option<String>,
    ) -> Result<Feed, FeedError> {
        let sub = hub.subscribe(filter.clone()).await?;
        let live_from = sub.start;
        let mut feed = Feed {
            hub: hub.clone(),
            pool: pool.clone(),
            filter,
            viewer,
            sub: Some(sub),
            scan: live_from,
            last: live_from,
            catch_up_to: None,
            resubscribe: false,
            buf: VecDeque::new(),
            reading: None,
            recoveries: 0,
        };
        if let Some(since) = since {
            let (head, pruned, renumbered) = resume_bounds_on_a_live_connection(pool, since).await?;
            if since < pruned {
                feed.buf.push_back(Item::Resync { reason: "position_expired", position: live_from });
            } else if renumbered || since > head.max(live_from) {
                feed.buf.push_back(Item::Resync { reason: "position_unknown", position: live_from });
            } else {
                feed.scan = since;
                feed.last = since;
                feed.catch_up_to = Some(live_from);
            }
        }
        Ok(feed)
    }

    /// A resync decided when the feed was opened (the client's position is
    /// gone), so the session can say so before `ready`.
    pub fn take_initial_resync(&mut self) -> Option<(&'static str, i64)> {
        match self.buf.front() {
            Some(Item::Resync { reason, position }) if self.catch_up_to.is_none() => {
                let r = (*reason, *position);
                self.hub.stats.resyncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.buf.pop_front();
                self.last = self.last.max(r.1);
                Some(r)
            }
            _ => None,
        }
    }

    /// The client's resume position: everything up to here was handed out.
    pub fn position(&self) -> i64 {
        self.last
    }

    /// Moves the resume position past changes this feed's filter skipped.
    ///
    /// A filtered client's position is its last *matching* change, however
    /// far the log has moved on: resuming from there rescans everything
    /// since, and once retention has passed it, gets `resync` although
    /// nothing it wanted was lost. When the feed is live and has handed out
    /// everything it has, every change up to the hub's position was either
    /// handed out or did not match, so that position is where the client
    /// stands. Returns it when it moved (the session tells the client), or
    /// `None` when there is nothing new or items are still to be handed out.
    ///
    /// The hub's position is read before the queue is checked: it is stored
    /// after every change up to it is in the queues, so if the queue is then
    /// empty and the subscription not lagged, nothing up to it is missing.
    pub fn progress(&mut self) -> Option<i64> {
        if !self.buf.is_empty() || self.catch_up_to.is_some() || self.resubscribe {
            return None;
        }
        let published = self.hub.position();
        let sub = self.sub.as_mut()?;
        if let Some(batch) = sub.try_recv() {
            self.accept(batch);
            return None;
        }
        if sub.lagged() || published <= self.last {
            return None;
        }
        self.last = published;
        Some(published)
    }

    /// Whether the filter passes a move on the viewer's side alone: the row
    /// before the change for `leave`, after it for `enter`.
    fn passes_side(&self, c: &super::Change, side: Side) -> bool {
        let (status, customer) = match side {
            Side::Leave => (c.old_status.as_deref(), c.old_customer.as_deref()),
            Side::Enter => (c.status.as_deref(), c.customer.as_deref()),
        };
        self.filter.matches(c.order_id, status, None, customer, None)
    }

    /// Hands out a buffered item, keeping the resume position.
    fn pop_buffered(&mut self) -> Option<Item> {
        while let Some(item) = self.buf.pop_front() {
            match &item {
                Item::Change(c) if c.pos <= self.last => continue,
                Item::Change(c) => {
                    self.last = c.pos;
                    if let (Some(moved), Some(viewer)) = (&c.moved, &self.viewer) {
                        // A confined viewer never gets the full change of a
                        // move, nor one that its filter passes only for the
                        // other customer's side (the status the order has
                        // there, say); one confined to neither customer (its
                        // filter would not pass the change) gets nothing.
                        match moved.side(viewer) {
                            Some(side) if self.passes_side(c, side) => return Some(Item::Redacted(c.clone(), side)),
                            _ => continue,
                        }
                    }
                }
                Item::Batch(b) => self.last = b.changes.last().map_or(self.last, |c| c.pos),
                Item::Redacted(c, _) => self.last = c.pos,
                Item::Resync { position, .. } => {
                    self.hub.stats.resyncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.last = self.last.max(*position)
                }
            }
            return Some(item);
        }
        // Drained. A catch-up read (1,000 changes) or a large batch for a
        // filtered client grew the buffer to thousands of slots: a session
        // that goes quiet does not keep them.
        if self.buf.capacity() > KEEP_BUFFERED {
            self.buf = VecDeque::new();
        }
        None
    }

    /// Buffers a live batch: shared as a whole when all of it is new to this
    /// feed, else change by change (duplicates are skipped when handed out).
    /// A confined viewer's feed takes every change on its own, to see moves
    /// redacted (its filter names its customer, so the hub does not hand it
    /// shared batches anyway).
    fn accept(&mut self, batch: Batch) {
        match batch {
            Batch::Shared(b) if self.viewer.is_none() && b.changes.first().is_some_and(|c| c.pos > self.last) => {
                self.buf.push_back(Item::Batch(b))
            }
            batch => self.buf.extend(batch.changes().iter().cloned().map(Item::Change)),
        }
    }

    /// The next item if one is at hand without waiting or reading the log:
    /// lets a session gather everything queued into one socket write.
    pub fn try_next(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.pop_buffered() {
                return Some(item);
            }
            if self.catch_up_to.is_some() || self.resubscribe {
                return None;
            }
            let batch = self.sub.as_mut()?.try_recv()?;
            self.accept(batch);
        }
    }

    /// The next item; `None` once the hub has shut down.
    pub async fn next(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.pop_buffered() {
                return Some(item);
            }
            if self.catch_up_to.is_some() || self.resubscribe {
                // Boxed: rare paths that should not size every idle session.
                if !Box::pin(self.recover()).await {
                    return None;
                }
                continue;
            }
            let sub = self.sub.as_mut()?;
            match sub.recv().await {
                Some(batch) => self.accept(batch),
                // Fell behind: subscribe again and catch up from the log.
                None if sub.lagged() => self.resubscribe = true,
                None => return None,
            }
        }
    }

    /// Subscribes again after lagging, or reads the next part of the log
    /// while catching up. False once the hub has shut down.
    async fn recover(&mut self) -> bool {
        if self.resubscribe {
            // The old subscription stays until the new one is in hand: if
            // this future is dropped while subscribing (it sits in a
            // `select!`), the next call simply tries again.
            return match self.hub.subscribe(self.filter.clone()).await {
                Ok(sub) => {
                    self.recoveries += 1;
                    self.resubscribe = false;
                    if self.sub.as_ref().is_some_and(|old| old.epoch != sub.epoch) {
                        // The log lost commits that were pushed (`Hub::rewind`):
                        // positions the client holds may be numbered again,
                        // so it must reload, then go on after `sub.start`.
                        self.buf.push_back(Item::Resync { reason: "position_unknown", position: sub.start });
                        self.last = sub.start;
                        self.scan = sub.start;
                        self.catch_up_to = None;
                    } else {
                        self.scan = self.last;
                        self.catch_up_to = Some(sub.start);
                    }
                    self.sub = Some(sub);
                    true
                }
                Err(HubClosed) => false,
            };
        }
        let Some(until) = self.catch_up_to else { return true };
        if self.scan >= until {
            self.catch_up_to = None;
            return true;
        }
        // `scan` changes only when the read completes, so a read kept from a
        // dropped call still reads from the right position.
        let read = self.reading.get_or_insert_with(|| {
            let epoch = self.sub.as_ref().map_or(0, |s| s.epoch);
            self.hub.catch_up_reads.read(&self.pool, &self.hub, epoch, self.scan, until)
        });
        let result = read.await;
        self.reading = None;
        match result {
            Ok(changes) if changes.is_empty() => self.scan = until,
            Ok(changes) => {
                // unwrap: not empty
                let newest = changes.last().unwrap();
                self.scan = newest.pos;
                self.hub.note_handed_out(newest.pos, Some(newest.committed_micros));
                self.buf.extend(changes.iter().filter(|c| c.matches(&self.filter)).cloned().map(Item::Change));
            }
            Err(CatchUpError::Pruned) => {
                // The log dropped the client's position while it was behind:
                // say so, and go on live after `until`.
                self.buf.push_back(Item::Resync { reason: "position_expired", position: until });
                self.scan = until;
                self.catch_up_to = None;
            }
            // `read_log` has waited before answering: try again.
            Err(CatchUpError::Db(_)) => {}
        }
        true
    }
}

/// The frames of a redacted item (`Item::Redacted`).
pub fn redacted(c: &super::Change, side: Side) -> &Frames {
    // expect: an item is redacted only for a change that moved
    c.moved.as_ref().expect("a redacted change is a move").frames(side)
}

/// `resume_bounds` on a pooled connection, asked again on another when the
/// one taken turns out ended by the server while it sat in the pool (a
/// restart, a pooler or an admin cutting sessions): that shows only when it
/// is used, and the stream would be refused (4503) for a connection the
/// pool would have replaced a moment later. Each one found dead is taken
/// out of the pool, so this ends after at most the pool's size.
async fn resume_bounds_on_a_live_connection(
    pool: &Pool,
    since: i64,
) -> Result<(i64, i64, bool), crate::error::ApiError> {
    let mut tries = pool.status().max_size + 1;
    loop {
        let client = pool.get().await?;
        match resume_bounds(&client, since).await {
            Ok(bounds) => return Ok(bounds),
            Err(e) if tries > 1 && (client.is_closed() || e.code() == Some(&SqlState::ADMIN_SHUTDOWN)) => {
                tries -= 1;
                drop(deadpool_postgres::Object::take(client));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Where the log stands for a client resuming after `since`: the head, the
/// retention horizon, and whether `since` lies in a range of positions the
/// database lost after they were pushed (recorded by the listener, see
/// `change_rewinds`): the client may hold changes that are gone, and the
/// changes now numbered before its position would be skipped.
async fn resume_bounds(
    client: &deadpool_postgres::Client,
    since: i64,
) -> Result<(i64, i64, bool), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT change_head(), (SELECT pruned_through FROM change_retention), \
                    EXISTS (SELECT 1 FROM change_rewinds WHERE after_pos < $1 AND through_pos >= $1)",
            &[&since],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

/// A catch-up read: owned, so that it can outlive the `next()` call that
/// started it, and shared by the feeds that read from the same position.
type CatchUpRead = Shared<LogRead>;
type LogRead = Pin<Box<dyn Future<Output = ReadOutcome> + Send>>;
type ReadOutcome = Result<Arc<Vec<SharedChange>>, CatchUpError>;
/// The hub's epoch and the position a read is after.
type ReadKey = (u64, i64);
/// A read in flight: the hub's position when it started, whether it has
/// finished, and the read.
type ReadEntry = (i64, Arc<AtomicBool>, WeakShared<LogRead>);

/// The catch-up reads in flight, by the hub's epoch and the position they
/// read after, each with the hub's position when it was started. A feed
/// joins a read only if that position is at or past the end of its own
/// catch-up: every change up to there had been published, so committed,
/// before the read began, and the read sees them (a read begun earlier could
/// come back empty, which would end the feed's catch-up short). Entries
/// whose read no feed holds any longer are swept from time to time; a read
/// that has finished is never joined.
///
/// Each read runs as a task of its own: a session drops `next()` whenever
/// something else comes first (a client's frame, a write that waits), and
/// a read polled only through it would hold its pooled connection, idle,
/// for as long as the session is busy elsewhere (up to a minute for a
/// client that reads slowly): a few such sessions took every connection
/// of the streams' pool.
#[derive(Default)]
pub struct SharedReads {
    reads: std::sync::Mutex<HashMap<ReadKey, ReadEntry>>,
    /// The map's size at which the next sweep runs (amortised: doubles).
    sweep_at: std::sync::atomic::AtomicUsize,
    /// Changes a read asks for (0: `CATCH_UP_BATCH`): halved when the
    /// database cuts a read short, as many as fitted when `READ_BYTES`
    /// cut it, doubled back after a full read.
    limit: std::sync::atomic::AtomicI32,
}

impl SharedReads {
    /// The read of the log after `scan` for a feed catching up to `until`:
    /// one in flight that it may join, or a new one.
    fn read(&self, pool: &Pool, hub: &Hub, epoch: u64, scan: i64, until: i64) -> CatchUpRead {
        use std::sync::atomic::Ordering;
        let mut reads = self.reads.lock().unwrap(); // unwrap: never held across a panic
        if let Some((started_at, done, weak)) = reads.get(&(epoch, scan)) {
            // Never one that has finished: its answer is old (a failure
            // would be handed out again at once, with no pause, to a feed
            // that retries in a loop).
            if let Some(read) = weak.upgrade().filter(|_| !done.load(Ordering::Acquire) && *started_at >= until) {
                return read;
            }
        }
        if reads.len() >= self.sweep_at.load(Ordering::Relaxed) {
            reads.retain(|_, (_, _, weak)| weak.upgrade().is_some());
            self.sweep_at.store((reads.len() * 2).max(64), Ordering::Relaxed);
        }
        // The hub's position now, before the read takes its snapshot (it is
        // taken when the task first runs, after this).
        let started_at = hub.position();
        let done = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (pool, reads, done) = (pool.clone(), hub.catch_up_reads.clone(), done.clone());
            async move {
                let outcome = read_log(pool, reads, scan).await;
                done.store(true, Ordering::Release);
                outcome
            }
        });
        // A read no feed holds any longer (their sessions ended) is not
        // finished for nobody: dropping the last handle stops it.
        let abort = AbortOnDrop(task.abort_handle());
        let read: LogRead = Box::pin(async move {
            let _abort = abort;
            match task.await {
                Ok(outcome) => outcome,
                Err(e) => {
                    // A panic (a bug): paced as a failed read is.
                    log::error!("catch-up read failed, retrying: {e}");
                    tokio::time::sleep(RETRY_DELAY).await;
                    Err(CatchUpError::Db(Arc::new(anyhow::anyhow!("the catch-up read ended before it answered: {e}"))))
                }
            }
        });
        let read = read.shared();
        // expect: a read not yet polled has no result, so it downgrades
        reads.insert((epoch, scan), (started_at, done, read.downgrade().expect("a fresh read")));
        read
    }
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the log after `scan`. A failure is answered only after
/// `RETRY_DELAY`, so a retry is paced even when `next()` is dropped meanwhile.
async fn read_log(pool: Pool, reads: Arc<SharedReads>, scan: i64) -> ReadOutcome {
    let result = read_log_once(&pool, &reads.limit, scan).await;
    if let Err(CatchUpError::Db(e)) = &result {
        log::warn!("catch-up read failed, retrying: {e:#}");
        tokio::time::sleep(RETRY_DELAY).await;
    }
    result.map(Arc::new)
}

async fn read_log_once(
    pool: &Pool,
    limits: &std::sync::atomic::AtomicI32,
    scan: i64,
) -> Result<Vec<SharedChange>, CatchUpError> {
    use std::sync::atomic::Ordering;
    let client = pool.get().await.map_err(|e| CatchUpError::Db(Arc::new(e.into())))?;
    // A read the database cut short (a `statement_timeout` set for the
    // role: large rows) is asked again at once for half as many changes,
    // and the next reads ask for as many (doubled back after a full read).
    // Before, it failed the same way at every try, and the client stalled.
    let mut limit = match limits.load(Ordering::Relaxed) {
        0 => CATCH_UP_BATCH,
        n => n,
    };
    let CatchUp { changes, pruned: seen, cut } = loop {
        match read_after(&client, scan, limit).await {
            Err(e) if limit > 1 && e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
                limit /= 2;
                limits.store(limit, Ordering::Relaxed);
            }
            read => break read.map_err(|e| CatchUpError::Db(Arc::new(e.into())))?,
        }
    };
    // Large rows: the next reads ask for as many as fitted in this one, not
    // for rows the database would send only to have them dropped.
    let next = super::next_limit(limit, CATCH_UP_BATCH, changes.len(), cut);
    if next != limit {
        limits.store(next, Ordering::Relaxed);
    }
    // Rows come with the horizon of their own snapshot: past `scan`, some
    // changes after it were gone before the read. A prune committed after
    // the read does not matter to it (the next read sees it). A read with
    // no rows has no horizon: it is checked by a second statement, after
    // the read, not before (a prune committed between a check and the read
    // would let the read skip the pruned changes unnoticed; pruning only
    // moves forward, so one that the read saw shows here too).
    let pruned = match seen {
        Some(pruned) => pruned,
        None => log_bounds(&client).await.map_err(|e| CatchUpError::Db(Arc::new(e.into())))?.1,
    };
    if scan < pruned {
        return Err(CatchUpError::Pruned);
    }
    Ok(changes)
}

#[derive(Clone)]
enum CatchUpError {
    /// The position to continue from is no longer in the log.
    Pruned,
    /// The database is away; try again.
    Db(Arc<anyhow::Error>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Status;

    /// Sessions buffer items by the thousand (a catch-up read) and move them
    /// through every `next()`: a redacted change must not make them larger.
    #[test]
    fn an_item_stays_four_words() {
        assert!(std::mem::size_of::<Item>() <= 32, "{}", std::mem::size_of::<Item>());
    }

    /// A session that caught up on thousands of changes and goes quiet
    /// holds no buffer sized for them.
    #[test]
    fn a_drained_buffer_gives_its_memory_back() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let hub = Hub::start(0, 10_000);
            // Never connected: a feed without `since` reads nothing.
            let pool =
                crate::db::pool("postgres://nobody@127.0.0.1:1/none", 1, std::time::Duration::from_secs(1)).unwrap();
            // A filtered feed takes a batch change by change.
            let pending = Filter { statuses: [Status::Pending].into(), ..Filter::default() };
            let mut feed = Feed::open(&hub, &pool, pending, None, None).await.unwrap();
            hub.publish((1..=2000).map(crate::hub::tests::change).collect()).await.unwrap();
            let mut last = 0;
            while last < 2000 {
                match feed.next().await {
                    Some(Item::Change(c)) => last = c.pos,
                    other => panic!("expected a change, got {}", other.is_some()),
                }
            }
            assert!(feed.buf.capacity() >= 2000, "{}", feed.buf.capacity());
            assert!(feed.try_next().is_none());
            assert!(feed.buf.capacity() <= KEEP_BUFFERED, "{}", feed.buf.capacity());
        });
    }
}

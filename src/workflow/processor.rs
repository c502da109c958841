//! The processor: drives `pending` orders through their life.
//!
//! `pending` -> `processing` -> each step in turn (payment, then inventory)
//! -> `processed`. When a step fails for good, the steps already done are
//! compensated in reverse (the payment is refunded when inventory fails) and
//! the order becomes `failed` with an `error_message` saying what happened.
//! An order a user cancels while it is processed, or once it is processed,
//! gets its steps compensated too, and so does one another writer marks
//! `failed` while it is processed (a trigger notes the cancellation or
//! failure in `order_undo`, so it is found even when its processor is
//! gone). Statuses change through the database's own rules (`orders_guard`),
//! as actor `processor`, so the history and every browser see each move.
//!
//! Ownership: a batch of pending orders is claimed with one statement
//! (`FOR UPDATE SKIP LOCKED`, so instances never claim the same order) that
//! also takes a session advisory lock per order on the processor's dedicated
//! connection. The lock lives as long as that session: when a processor dies,
//! PostgreSQL releases its locks, and another one (or the same one after a
//! restart) resumes the orders left in `processing` — it finds them with a
//! periodic scan that tries their locks.
//!
//! Idempotency: each step and compensation is recorded in `order_steps`
//! before it is called (`started`, counting attempts) and after (`done` or
//! `failed`). A resumed order skips what is recorded as done or failed and
//! calls a `started` step again with the same idempotency key (the order id),
//! so a crash in the middle of a payment never charges twice. A step that
//! keeps being unavailable is given up after `MAX_ATTEMPTS` calls and the
//! order fails (compensated) instead of being retried forever.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use futures_util::future::BoxFuture;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::Statement;

use super::steps::{OrderRef, StepError, Steps};
use super::Dedicated;

/// Session advisory lock class 'ocpr'; the key is `workflow_lock_key(id)`.
const LOCK_CLASS: i32 = 0x6f63_7072;
/// A missed doorbell costs at most this long.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often orders left in `processing` are looked for.
const RESUME_EVERY: Duration = Duration::from_secs(5);
/// How long an order sent back to retry (a step unavailable) waits before
/// it is taken again: the pause after a step's first call, doubled after
/// each further call up to `RETRY_MAX` (kept in the step's record, so that
/// every processor waits: `NOTE_SQL`). The order is given up about 25 minutes
/// after the step's first call (`MAX_ATTEMPTS` calls and the pauses after them).
const RETRY_AFTER: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How many candidates one takeover scan looks at, however few slots are
/// free: orders held by live processors come first in id order and would
/// otherwise hide an orphan behind them for a scan each.
const RESUME_WINDOW: i64 = 256;
/// Calls of a step that keeps being unavailable before the order fails.
pub const MAX_ATTEMPTS: i32 = 10;
/// A step's call (execute or compensate) not answered within this long is
/// taken as unavailable: retried with the same idempotency key, counted
/// toward `MAX_ATTEMPTS`. Without a limit, a service that took the request
/// and never answered held the order, and its lock, for good: not even a
/// cancel could undo its charge.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopping processor lets its orders finish before leaving them
/// to be resumed.
const DRAIN: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Longest error_message written: what the API accepts in a PATCH, so the
/// message can be edited back through it.
const MAX_MESSAGE: usize = 2000;

const CLAIM_SQL: &str = "\
WITH a AS (SELECT set_config('ordercast.actor', 'processor', true)), \
     c AS (SELECT id FROM orders WHERE status = 'pending' ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
UPDATE orders o SET status = 'processing' FROM a, c WHERE o.id = c.id \
RETURNING o.id, pg_advisory_lock($2, workflow_lock_key(o.id))::text";

const SET_STATUS_SQL: &str = "\
WITH a AS (SELECT set_config('ordercast.actor', 'processor', true)) \
UPDATE orders SET status = $2, error_message = $3 FROM a WHERE id = $1 AND status = 'processing' RETURNING id";

/// Says on an order cancelled or failed by another writer that a step's
/// compensation failed for good (once: the text is not added twice), after
/// what the message said, cut to leave room for it.
const UNDO_FAILED_SQL: &str = "\
WITH a AS (SELECT set_config('ordercast.actor', 'processor', true)) \
UPDATE orders SET error_message = concat_ws('; ', left(error_message, greatest($3 - length($2) - 2, 0)), $2) FROM a \
WHERE id = $1 AND status IN ('cancelled', 'failed') AND strpos(coalesce(error_message, ''), $2) = 0";

const LOAD_SQL: &str = "SELECT status, customer_name, product, quantity, amount FROM orders WHERE id = $1";

/// The steps to undo: those done, and those begun and never answered (their
/// call may have taken effect; `Step::compensate` voids its key). A step is
/// begun only after the ones before it are done, so only an order cancelled
/// while its processor waited for a step (or was gone), or a step given up
/// after `MAX_ATTEMPTS` unanswered calls, has one of the latter.
/// With each, what its call answered (`Step::compensate`'s `done`), or
/// NULL for one never answered.
const DONE_STEPS_SQL: &str = "\
SELECT step, CASE outcome WHEN 'done' THEN coalesce(detail, '') END FROM order_steps \
WHERE order_id = $1 AND action = 'execute' AND outcome IN ('done', 'started')";

/// An order's steps begun and not done, or refused: with `Ctx::runs`,
/// those another instance recorded (see `Ctx::foreign`).
const OPEN_STEPS_SQL: &str = "\
SELECT step, outcome, coalesce(detail, '') FROM order_steps \
WHERE order_id = $1 AND action = 'execute' AND outcome IN ('started', 'failed') ORDER BY id";

/// For a row of `orders`: another writer cancelled it or marked it failed,
/// and it has steps to undo (as `DONE_STEPS_SQL` finds them) without a
/// finished compensation (`order_steps_left`, V19).
const UNDO_DUE_SQL: &str = "orders.status IN ('cancelled', 'failed') AND order_steps_left(orders.id)";

/// See `begin`: a step's record is created, or counted as one more attempt
/// while it is `started`; nothing is returned when it is already finished.
/// A compensation's is committed asynchronously: should a database crash
/// forget it, the compensation is called again, which is idempotent.
const BEGIN_SQL: &str = "\
WITH a AS (SELECT set_config('synchronous_commit', 'off', true)) \
INSERT INTO order_steps (order_id, step, action, outcome) SELECT $1, $2, $3, 'started' FROM a \
ON CONFLICT (order_id, step, action) DO UPDATE \
   SET attempts = order_steps.attempts + 1, started_at = now() WHERE order_steps.outcome = 'started' \
RETURNING outcome, detail, attempts";

/// The CTE `a` that commits its statement durably even where the database
/// or role sets `synchronous_commit = off` (a common tuning): `off` is
/// raised to `on` for this commit, a stricter setting (`remote_apply`) kept.
macro_rules! durably {
    () => {
        "WITH a AS (SELECT set_config('synchronous_commit', \
         CASE current_setting('synchronous_commit') WHEN 'off' THEN 'on' \
         ELSE current_setting('synchronous_commit') END, true)) "
    };
}

/// `BEGIN_SQL` committed durably, before a step's `execute` is called: it is
/// the only sign that the call (a charge, a reservation) may have taken
/// effect. Forgotten by a database crash, an order cancelled afterwards
/// would find no step to undo and keep its charge (`durably!`).
const BEGIN_DURABLE_SQL: &str = concat!(
    durably!(),
    "INSERT INTO order_steps (order_id, step, action, outcome) SELECT $1, $2, $3, 'started' FROM a \
     ON CONFLICT (order_id, step, action) DO UPDATE \
        SET attempts = order_steps.attempts + 1, started_at = now() WHERE order_steps.outcome = 'started' \
     RETURNING outcome, detail, attempts"
);

/// Which of the two begins `action` takes.
fn begin_sql(action: &str) -> &'static str {
    match action {
        EXECUTE => BEGIN_DURABLE_SQL,
        _ => BEGIN_SQL,
    }
}

const RECORD_SQL: &str =
    "SELECT outcome, detail, attempts FROM order_steps WHERE order_id = $1 AND step = $2 AND action = $3";

const FINISH_SQL: &str = "\
WITH a AS (SELECT set_config('synchronous_commit', 'off', true)) \
UPDATE order_steps SET outcome = $4, detail = $5, finished_at = now() FROM a \
WHERE order_id = $1 AND step = $2 AND action = $3 AND outcome = 'started'";

/// `FINISH_SQL` committed durably, for a refusal (`failed`): the steps
/// before it are compensated next, outside the database, and a refusal a
/// database crash forgot would have the step called again, succeed (a stock
/// answer differs from one call to the next) and the order go on with its
/// payment refunded (`durably!`).
const FINISH_DURABLE_SQL: &str = concat!(
    durably!(),
    "UPDATE order_steps SET outcome = $4, detail = $5, finished_at = now() FROM a \
     WHERE order_id = $1 AND step = $2 AND action = $3 AND outcome = 'started'"
);

/// Which of the two finishes `outcome` takes.
fn finish_sql(outcome: &str) -> &'static str {
    match outcome {
        "failed" => FINISH_DURABLE_SQL,
        _ => FINISH_SQL,
    }
}

/// Also sets when the step may be called again (V26): `RETRY_AFTER` after
/// its first call, doubling with each call up to `RETRY_MAX`.
const NOTE_SQL: &str = "\
WITH a AS (SELECT set_config('synchronous_commit', 'off', true)) \
UPDATE order_steps SET detail = $4, \
       retry_at = now() + least(make_interval(secs => $5 * power(2, least(attempts - 1, 20))), \
                                make_interval(secs => $6)) \
FROM a WHERE order_id = $1 AND step = $2 AND action = $3 AND outcome = 'started'";

/// Releases an order's lock on the dedicated connection when its task ends.
const UNLOCK_SQL: &str = "SELECT pg_advisory_unlock($1, workflow_lock_key($2))";

/// What `/api/health` reports about the processor. Counters are per process.
#[derive(Debug, Default)]
pub struct ProcessorState {
    pub enabled: AtomicBool,
    pub connected: AtomicBool,
    pub in_flight: AtomicUsize,
    /// Pending orders this instance moved to processing.
    pub claimed: AtomicU64,
    /// Orders found in processing with no live owner and taken over.
    pub resumed: AtomicU64,
    pub processed: AtomicU64,
    pub failed: AtomicU64,
    /// Orders cancelled by someone else while or after they were processed,
    /// or marked failed by someone else while processed (their steps
    /// compensated).
    pub cancelled: AtomicU64,
    pub compensations: AtomicU64,
    /// Compensations refused for good (a refund declined): left for a person,
    /// said in the order's error message and in `last_error`.
    pub compensations_failed: AtomicU64,
    /// Order attempts that stopped on an error and wait to be resumed.
    pub retries: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl ProcessorState {
    fn error(&self, e: String) {
        *self.last_error.lock().unwrap() = Some(e); // unwrap: never held across a panic
    }

    pub fn health(&self) -> Value {
        if !self.enabled.load(Ordering::Relaxed) {
            return json!({"enabled": false});
        }
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "enabled": true,
            "state": if self.connected.load(Ordering::Relaxed) { "running" } else { "reconnecting" },
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "claimed": n(&self.claimed),
            "resumed": n(&self.resumed),
            "processed": n(&self.processed),
            "failed": n(&self.failed),
            "cancelled": n(&self.cancelled),
            "compensations": n(&self.compensations),
            "compensations_failed": n(&self.compensations_failed),
            "retries": n(&self.retries),
            "last_error": *self.last_error.lock().unwrap(), // unwrap: never held across a panic
        })
    }
}

/// How one attempt at an order ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    Processed,
    /// Failed with this error message, the done steps compensated.
    Failed(String),
    /// Cancelled, or marked failed, by another writer; its steps
    /// compensated (done, or begun and never answered).
    Cancelled,
    /// Deleted, or no longer in processing: nothing to do.
    Skipped,
    /// A step could not be reached; the order stays in processing and is resumed.
    Retry(String),
}

pub struct Processor {
    url: String,
    ctx: Arc<Ctx>,
    concurrency: usize,
}

/// What each order's task needs.
struct Ctx {
    pool: Pool,
    steps: Steps,
    state: Arc<ProcessorState>,
    step_timeout: Duration,
}

impl Processor {
    pub fn new(url: &str, steps: Steps, concurrency: usize, state: Arc<ProcessorState>) -> anyhow::Result<Processor> {
        let names: HashSet<&str> = steps.iter().map(|s| s.name()).collect();
        anyhow::ensure!(names.len() == steps.len(), "two workflow steps have the same name");
        // Its own pool: a busy processor must not take connections from REST.
        let pool = crate::db::pool(url, concurrency.clamp(1, 8), Duration::from_secs(5))?;
        state.enabled.store(true, Ordering::Relaxed);
        Ok(Processor {
            url: url.to_string(),
            ctx: Arc::new(Ctx { pool, steps, state, step_timeout: STEP_TIMEOUT }),
            concurrency: concurrency.max(1),
        })
    }

    /// The time a step's call may take before it counts as unavailable
    /// (`STEP_TIMEOUT` unless set).
    pub fn with_step_timeout(mut self, limit: Duration) -> Processor {
        // expect: set right after `new`, before any task holds the context
        Arc::get_mut(&mut self.ctx).expect("the context is not shared yet").step_timeout = limit;
        self
    }

    /// Runs until `shutdown` flips; reconnects with backoff on database errors.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        log::info!(
            "order processor: {} at a time, steps {}",
            self.concurrency,
            self.ctx.steps.iter().map(|s| s.name()).collect::<Vec<_>>().join(" -> ")
        );
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            let result = self.session(&mut shutdown).await;
            self.ctx.state.connected.store(false, Ordering::Relaxed);
            self.ctx.state.in_flight.store(0, Ordering::Relaxed);
            match result {
                Ok(()) => return,
                Err(e) => {
                    log::warn!("order processor: {e:#}; reconnecting");
                    self.ctx.state.error(format!("{e:#}"));
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = BACKOFF_MIN;
            }
            if crate::backoff::sleep(&mut backoff, BACKOFF_MAX, &mut shutdown).await {
                return;
            }
        }
    }

    /// One session of the dedicated connection. Its end (an error) drops the
    /// order tasks and the locks together, so no order is worked on unowned.
    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        let conn = Dedicated::open(&self.url, "ordercast-processor").await?;
        let claim = conn.client.prepare(CLAIM_SQL).await.map_err(crate::db::describe)?;
        let unlock = conn.client.prepare(UNLOCK_SQL).await.map_err(crate::db::describe)?;
        self.ctx.state.connected.store(true, Ordering::Relaxed);
        let mut work = Work {
            tasks: JoinSet::new(),
            orders: HashMap::new(),
            taken_over: HashSet::new(),
            retry_at: HashMap::new(),
        };
        let mut next_scan = Instant::now();
        let mut scan_after = 0i64;
        // Orders to take over (or to try again) come before new ones: while
        // a scan fills every slot it may with them, there may be more, and
        // the next free slot goes to the next scan, not to a claim. But not
        // every slot: `reserved` of them stay for new orders, or while calls
        // to undo orders hang (a refund service down, each call waiting out
        // its time limit) their retries took every slot, and no new order
        // was claimed for as long.
        let mut backlog = false;
        let reserved = reserved(self.concurrency);
        while !*shutdown.borrow() {
            if Instant::now() >= next_scan && work.room_to_take_over(self.concurrency) > 0 {
                let (after, filled) = self.resume(&conn, &mut work, scan_after).await?;
                scan_after = after;
                backlog = filled;
                next_scan = if filled { Instant::now() } else { Instant::now() + RESUME_EVERY };
            }
            // An order sent back to retry is looked for once it is due.
            if let Some(due) = work.retry_at.values().min() {
                next_scan = next_scan.min(*due);
            }
            // Claim in batches (a quarter of the capacity at least, or when
            // idle): each claim is a synchronous commit. With a backlog, into
            // the reserved slots only, as they free.
            let free = work.free(self.concurrency);
            let claimable = if backlog { free.min(reserved.saturating_sub(work.claimed())) } else { free };
            if claimable > 0 && (backlog || claimable * 4 >= self.concurrency || work.tasks.is_empty()) {
                let limit = claimable as i64;
                let rows = conn.client.query(&claim, &[&limit, &LOCK_CLASS]).await.map_err(crate::db::describe)?;
                for row in rows {
                    self.ctx.state.claimed.fetch_add(1, Ordering::Relaxed);
                    work.spawn(&self.ctx, row.get(0), false);
                }
            }
            self.ctx.state.in_flight.store(work.tasks.len(), Ordering::Relaxed);
            tokio::select! {
                Some(done) = work.tasks.join_next_with_id() => self.finished(&conn, &unlock, &mut work, done).await?,
                r = conn.wait(IDLE_POLL) => r?,
                // A dropped sender (the server never started) also means stop.
                r = shutdown.changed() => if r.is_err() { break },
            }
        }
        let deadline = Instant::now() + DRAIN;
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, work.tasks.join_next_with_id()).await {
            self.finished(&conn, &unlock, &mut work, done).await?;
        }
        if !work.tasks.is_empty() {
            log::info!("order processor: leaving {} orders in processing to be resumed", work.tasks.len());
        }
        Ok(())
    }

    /// Takes over orders in processing whose owner is gone (their lock is
    /// free), and cancelled orders whose undoing is not finished: begun and
    /// interrupted (a compensation unavailable, its processor gone mid-way),
    /// or not begun because the order was cancelled while its processor was
    /// gone, or once it was processed (`order_undo`). Scans in id order from
    /// `after`, so orders held by live processors do not hide the orphans
    /// behind them. Orders this processor sent back to retry are not taken
    /// again before they are due (`RETRY_AFTER`). Returns where to go on,
    /// and whether the orders taken filled every free slot (there may be
    /// more).
    async fn resume(&self, conn: &Dedicated, work: &mut Work, after: i64) -> anyhow::Result<(i64, bool)> {
        let limit = work.room_to_take_over(self.concurrency) as i64;
        if limit == 0 {
            return Ok((after, false));
        }
        let window = limit.max(RESUME_WINDOW);
        let now = Instant::now();
        work.retry_at.retain(|_, due| *due > now);
        let mine: Vec<i64> = work.orders.values().chain(work.retry_at.keys()).copied().collect();
        // Two indexed scans: `orders_status_id_idx`, and the few
        // cancellations whose undoing is not known to be finished
        // (`order_undo`; a note stays while a compensation is unavailable).
        // Not those with a step not due to be called again yet (V26): a
        // step's pause holds while its order is processing, and a
        // compensation's always; an order cancelled meanwhile is undone at
        // once.
        let candidates: Vec<i64> = conn
            .client
            .query(
                "SELECT id FROM ( \
                   SELECT id FROM orders WHERE status = 'processing' AND id > $1 \
                   UNION \
                   SELECT order_id FROM order_undo WHERE order_id > $1 \
                 ) c WHERE id <> ALL($2) \
                   AND NOT EXISTS (SELECT 1 FROM order_steps s JOIN orders o ON o.id = s.order_id \
                                   WHERE s.order_id = c.id AND s.outcome = 'started' AND s.retry_at > now() \
                                     AND (s.action = 'compensate' OR o.status = 'processing')) \
                 ORDER BY id LIMIT $3",
                &[&after, &mine, &window],
            )
            .await
            .map_err(crate::db::describe)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if candidates.is_empty() {
            return Ok((0, false));
        }
        // In id order, until `limit` are held: the rest are not tried (the
        // scan stops pulling rows at the limit).
        let locked: Vec<i64> = conn
            .client
            .query(
                "SELECT id FROM unnest($2::bigint[]) id WHERE pg_try_advisory_lock($1, workflow_lock_key(id)) LIMIT $3",
                &[&LOCK_CLASS, &candidates, &limit],
            )
            .await
            .map_err(crate::db::describe)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Their owner may have finished some between the scan and the locks,
        // and let go of them: those are not taken over (a new statement sees
        // what committed before the locks were taken). A cancelled one whose
        // steps (done, or begun and never answered) are not all undone is:
        // `drive` compensates them.
        let orphans: Vec<i64> = conn
            .client
            .query(
                &format!(
                    "SELECT id FROM orders WHERE id = ANY($1) \
                       AND (status = 'processing' OR {UNDO_DUE_SQL}) ORDER BY id"
                ),
                &[&locked],
            )
            .await
            .map_err(crate::db::describe)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Nothing is left to undo automatically for the rest: their notes go
        // (while the locks are held, so no drive of theirs is running), then
        // the locks. One cancelled since the check above (it was processed
        // then) keeps the note its cancellation just made.
        let finished: Vec<i64> = locked.iter().copied().filter(|id| !orphans.contains(id)).collect();
        if !finished.is_empty() {
            conn.client
                .execute(
                    &format!(
                        "DELETE FROM order_undo u WHERE u.order_id = ANY($1) AND NOT EXISTS \
                           (SELECT 1 FROM orders WHERE orders.id = u.order_id AND {UNDO_DUE_SQL})"
                    ),
                    &[&finished],
                )
                .await
                .map_err(crate::db::describe)?;
            conn.client
                .execute(
                    "SELECT pg_advisory_unlock($1, workflow_lock_key(id)) FROM unnest($2::bigint[]) id",
                    &[&LOCK_CLASS, &finished],
                )
                .await
                .map_err(crate::db::describe)?;
        }
        let filled = orphans.len() as i64 == limit;
        for id in orphans {
            log::info!("order processor: taking over order {id}, its processing or undoing unfinished");
            self.ctx.state.resumed.fetch_add(1, Ordering::Relaxed);
            work.spawn(&self.ctx, id, true);
        }
        // Where the next scan goes on: after the last order locked when the
        // slots ran out (the candidates after it were not tried), else after
        // the window, or from the start once the scan reached the end.
        let next = if locked.len() as i64 == limit {
            *locked.iter().max().expect("limit > 0 locked")
        } else if (candidates.len() as i64) < window {
            0
        } else {
            candidates[candidates.len() - 1]
        };
        Ok((next, filled))
    }

    async fn finished(
        &self,
        conn: &Dedicated,
        unlock: &Statement,
        work: &mut Work,
        done: Result<(tokio::task::Id, Finish), tokio::task::JoinError>,
    ) -> anyhow::Result<()> {
        let task = match &done {
            Ok((task, _)) => *task,
            Err(e) => e.id(),
        };
        let Some(id) = work.orders.remove(&task) else { return Ok(()) };
        work.taken_over.remove(&task);
        if matches!(done, Ok((_, Finish::Cancelled))) {
            // Every step is undone (or its undoing failed, left for a
            // person): the cancellation's note goes, under the lock (else the
            // next scan would take the order up again).
            conn.client
                .execute("DELETE FROM order_undo WHERE order_id = $1", &[&id])
                .await
                .map_err(crate::db::describe)?;
        }
        conn.client.execute(unlock, &[&LOCK_CLASS, &id]).await.map_err(crate::db::describe)?;
        let state = &self.ctx.state;
        match done {
            Ok((_, Finish::Processed)) => {
                state.processed.fetch_add(1, Ordering::Relaxed);
            }
            Ok((_, Finish::Failed(msg))) => {
                log::info!("order {id} failed: {msg}");
                state.failed.fetch_add(1, Ordering::Relaxed);
            }
            Ok((_, Finish::Cancelled)) => {
                state.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            Ok((_, Finish::Skipped)) => {}
            Ok((_, Finish::Retry(why))) => {
                work.retry_at.insert(id, Instant::now() + RETRY_AFTER);
                log::warn!("order {id}: {why}; it is taken up again later");
                state.retries.fetch_add(1, Ordering::Relaxed);
                state.error(format!("order {id}: {why}"));
            }
            Err(e) => {
                work.retry_at.insert(id, Instant::now() + RETRY_AFTER);
                log::error!("order {id}: the processing task ended abnormally: {e}");
                state.retries.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Slots of the processor's `concurrency` that orders taken over (or tried
/// again) may not take: new orders always get a quarter (but with one slot,
/// which both share).
fn reserved(concurrency: usize) -> usize {
    if concurrency < 2 {
        0
    } else {
        concurrency.div_ceil(4)
    }
}

/// The orders this session works on, by task.
struct Work {
    tasks: JoinSet<Finish>,
    orders: HashMap<tokio::task::Id, i64>,
    /// The tasks of orders taken over or tried again (not claimed).
    taken_over: HashSet<tokio::task::Id>,
    /// Orders sent back to retry, and when they are due again.
    retry_at: HashMap<i64, Instant>,
}

impl Work {
    fn free(&self, concurrency: usize) -> usize {
        concurrency.saturating_sub(self.tasks.len())
    }

    /// Free slots orders taken over may take: all but the reserved ones.
    fn room_to_take_over(&self, concurrency: usize) -> usize {
        self.free(concurrency).min((concurrency - reserved(concurrency)).saturating_sub(self.taken_over.len()))
    }

    /// Tasks of claimed (new) orders.
    fn claimed(&self) -> usize {
        self.tasks.len().saturating_sub(self.taken_over.len())
    }

    fn spawn(&mut self, ctx: &Arc<Ctx>, id: i64, taken_over: bool) {
        let ctx = ctx.clone();
        let handle = self.tasks.spawn(async move {
            match ctx.drive(id).await {
                Ok(finish) => finish,
                Err(e) => Finish::Retry(format!("{e:#}")),
            }
        });
        self.orders.insert(handle.id(), id);
        if taken_over {
            self.taken_over.insert(handle.id());
        }
    }
}

/// What `compensate` did: each step undone or not, for an error message,
/// and the compensations that failed for good.
#[derive(Default)]
struct Compensated {
    report: Vec<String>,
    failed: Vec<String>,
}

/// The recorded state of one step or compensation.
struct Record {
    outcome: String,
    detail: Option<String>,
    attempts: i32,
}

const EXECUTE: &str = "execute";
const COMPENSATE: &str = "compensate";

impl Ctx {
    /// A step's call, answered within `step_timeout` or taken as unavailable.
    async fn call(&self, call: BoxFuture<'_, Result<String, StepError>>) -> Result<String, StepError> {
        match tokio::time::timeout(self.step_timeout, call).await {
            Ok(answer) => answer,
            Err(_) => Err(StepError::Unavailable(format!("no answer within {} s", self.step_timeout.as_secs_f64()))),
        }
    }

    /// One attempt at an order, from wherever its records say it stands.
    async fn drive(&self, id: i64) -> anyhow::Result<Finish> {
        // A connection is taken per statement, never held across a step: the
        // steps' latency must not tie up the pool.
        let db = &self.pool;
        let Some((status, order)) = load(db, id).await? else { return Ok(Finish::Skipped) };
        match status.as_str() {
            "processing" => {}
            "cancelled" | "failed" => return self.undo(db, &order, &status).await,
            _ => return Ok(Finish::Skipped),
        }
        if let Some(finish) = self.foreign(db, &order).await? {
            return Ok(finish);
        }
        for (i, step) in self.steps.iter().enumerate() {
            // Before the first step the status was just read above.
            if i > 0 {
                match load(db, id).await?.map(|(s, _)| s).as_deref() {
                    Some("processing") => {}
                    Some(s @ ("cancelled" | "failed")) => return self.undo(db, &order, s).await,
                    _ => return Ok(Finish::Skipped),
                }
            }
            let rec = begin(db, id, step.name(), EXECUTE).await?;
            if rec.outcome == "started" && rec.attempts > MAX_ATTEMPTS {
                // Given up: none of its calls was answered, and any may have
                // taken effect, so it is undone with the done ones (its
                // compensation voids the key) before it is recorded failed.
                let why = format!(
                    "gave up after {MAX_ATTEMPTS} attempts: {}",
                    rec.detail.as_deref().unwrap_or("unavailable")
                );
                let compensated = match self.compensate(db, &order).await? {
                    Ok(done) => done.report,
                    Err(retry) => return Ok(retry),
                };
                finish(db, id, step.name(), EXECUTE, "failed", &why).await?;
                return self.failed(db, &order, step.name(), &why, compensated).await;
            }
            let failure = match rec.outcome.as_str() {
                "done" => None,
                "failed" => Some(rec.detail.unwrap_or_default()),
                _ => match self.call(step.execute(&order)).await {
                    Ok(detail) => {
                        finish(db, id, step.name(), EXECUTE, "done", &detail).await?;
                        None
                    }
                    Err(StepError::Rejected(why)) => {
                        finish(db, id, step.name(), EXECUTE, "failed", &why).await?;
                        Some(why)
                    }
                    Err(StepError::Unavailable(why)) => {
                        note(db, id, step.name(), EXECUTE, &why).await?;
                        return Ok(Finish::Retry(format!("{} unavailable: {why}", step.name())));
                    }
                },
            };
            if let Some(why) = failure {
                let compensated = match self.compensate(db, &order).await? {
                    Ok(done) => done.report,
                    Err(retry) => return Ok(retry),
                };
                return self.failed(db, &order, step.name(), &why, compensated).await;
            }
        }
        Ok(match set_status(db, id, "processed", None).await? {
            true => Finish::Processed,
            false => self.after_race(db, &order).await?,
        })
    }

    /// Whether this processor runs the step called `name`.
    fn runs(&self, name: &str) -> bool {
        self.steps.iter().any(|s| s.name() == name)
    }

    /// An order in processing with a step this processor does not run (its
    /// list of steps changed in a rolling deploy, or was rolled back) begun
    /// and not done, or refused, by another instance. Refused: the order
    /// fails, its steps undone, as the instance that refused it would have
    /// done. Begun: the order waits for an instance that runs the step (this
    /// one cannot finish or undo it). Before, both were overlooked and the
    /// order marked processed, a refused reservation's payment kept.
    async fn foreign(&self, db: &Pool, order: &OrderRef) -> anyhow::Result<Option<Finish>> {
        let open: Vec<(String, String, String)> = {
            let (client, stmt) = prepared(db, OPEN_STEPS_SQL).await?;
            let rows = client.query(&stmt, &[&order.id]).await.map_err(crate::db::describe)?;
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .filter(|(step, ..): &(String, String, String)| !self.runs(step))
                .collect()
        };
        if let Some((step, _, why)) = open.iter().find(|(_, outcome, _)| outcome == "failed") {
            let compensated = match self.compensate(db, order).await? {
                Ok(done) => done.report,
                Err(retry) => return Ok(Some(retry)),
            };
            return Ok(Some(self.failed(db, order, step, why, compensated).await?));
        }
        Ok(open.first().map(|(step, ..)| {
            Finish::Retry(format!(
                "{step}: this processor does not run that step; an instance that does will finish the order"
            ))
        }))
    }

    /// `step` failed for good and the steps before it are undone: the order
    /// fails with a message saying so (unless it left processing meanwhile).
    async fn failed(
        &self,
        db: &Pool,
        order: &OrderRef,
        step: &str,
        why: &str,
        compensated: Vec<String>,
    ) -> anyhow::Result<Finish> {
        let mut message = format!("{step} failed: {why}");
        if !compensated.is_empty() {
            message.push_str(&format!("; compensated: {}", compensated.join("; ")));
        }
        let message: String = message.chars().take(MAX_MESSAGE).collect();
        Ok(match set_status(db, order.id, "failed", Some(&message)).await? {
            true => Finish::Failed(message),
            false => self.after_race(db, order).await?,
        })
    }

    /// The order left processing under our feet: if another writer
    /// cancelled it or marked it failed, undo what was done.
    async fn after_race(&self, db: &Pool, order: &OrderRef) -> anyhow::Result<Finish> {
        match load(db, order.id).await?.map(|(s, _)| s).as_deref() {
            Some(s @ ("cancelled" | "failed")) => self.undo(db, order, s).await,
            _ => Ok(Finish::Skipped),
        }
    }

    /// Another writer cancelled the order, or marked it failed (`status`):
    /// neither may keep a payment or a reservation, so its steps are undone.
    /// A compensation that failed for good is said in the order's error
    /// message (the dashboard shows it), for a person to act on.
    async fn undo(&self, db: &Pool, order: &OrderRef, status: &str) -> anyhow::Result<Finish> {
        Ok(match self.compensate(db, order).await? {
            Ok(done) => {
                if !done.report.is_empty() {
                    log::info!(
                        "order {} was {status} by another writer; compensated: {}",
                        order.id,
                        done.report.join("; ")
                    );
                }
                for failure in &done.failed {
                    let (client, stmt) = prepared(db, UNDO_FAILED_SQL).await?;
                    let text = format!("{failure}; left for a person");
                    client
                        .execute(&stmt, &[&order.id, &text, &(MAX_MESSAGE as i32)])
                        .await
                        .map_err(crate::db::describe)?;
                }
                Finish::Cancelled
            }
            Err(retry) => retry,
        })
    }

    /// Compensates every step recorded as done, or begun and never answered
    /// (`DONE_STEPS_SQL`), last first, each at most once. Returns what was
    /// done (for the error message), or the `Retry` to return when a
    /// compensation could not be reached.
    async fn compensate(&self, db: &Pool, order: &OrderRef) -> anyhow::Result<Result<Compensated, Finish>> {
        let done: HashMap<String, Option<String>> = {
            // Back to the pool before any step is called.
            let (client, stmt) = prepared(db, DONE_STEPS_SQL).await?;
            let rows = client.query(&stmt, &[&order.id]).await.map_err(crate::db::describe)?;
            rows.iter().map(|r| (r.get(0), r.get(1))).collect()
        };
        // A step this processor does not run (added, renamed or removed in
        // another instance's configuration, a rolling deploy) cannot be
        // undone here, and the compensations go last step first: the order
        // waits, its note kept, for an instance that runs it. Before, its
        // record was skipped and the note deleted: nothing undid it.
        for step in done.keys().filter(|d| !self.runs(d)) {
            let (client, stmt) = prepared(db, RECORD_SQL).await?;
            let undone = client
                .query_opt(&stmt, &[&order.id, step, &COMPENSATE])
                .await
                .map_err(crate::db::describe)?
                .is_some_and(|r| r.get::<_, String>(0) != "started");
            if !undone {
                return Ok(Err(Finish::Retry(format!(
                    "compensating {step}: this processor does not run that step; an instance that does will undo it"
                ))));
            }
        }
        let mut out = Compensated::default();
        for (step, answered) in self.steps.iter().rev().filter_map(|s| Some((s, done.get(s.name())?.as_deref()))) {
            let rec = begin(db, order.id, step.name(), COMPENSATE).await?;
            let detail = match rec.outcome.as_str() {
                "done" => rec.detail.unwrap_or_default(),
                "failed" => {
                    let why = rec.detail.unwrap_or_default();
                    out.failed.push(format!("compensating {} failed: {why}", step.name()));
                    format!("FAILED: {why}")
                }
                _ => match self.call(step.compensate(order, answered)).await {
                    Ok(detail) => {
                        finish(db, order.id, step.name(), COMPENSATE, "done", &detail).await?;
                        self.state.compensations.fetch_add(1, Ordering::Relaxed);
                        detail
                    }
                    // Cannot be undone automatically: recorded, said in the
                    // error message, left for a person.
                    Err(StepError::Rejected(why)) => {
                        finish(db, order.id, step.name(), COMPENSATE, "failed", &why).await?;
                        let failure = format!("compensating {} failed: {why}", step.name());
                        log::error!("order {}: {failure}; left for a person", order.id);
                        self.state.compensations_failed.fetch_add(1, Ordering::Relaxed);
                        self.state.error(format!("order {}: {failure}; left for a person", order.id));
                        out.failed.push(failure);
                        format!("FAILED: {why}")
                    }
                    Err(StepError::Unavailable(why)) => {
                        note(db, order.id, step.name(), COMPENSATE, &why).await?;
                        return Ok(Err(Finish::Retry(format!("compensating {} unavailable: {why}", step.name()))));
                    }
                },
            };
            out.report.push(format!("{} ({detail})", step.name()));
        }
        Ok(Ok(out))
    }
}

async fn client(pool: &Pool) -> anyhow::Result<deadpool_postgres::Client> {
    pool.get().await.context("no database connection for the processor")
}

/// A pooled connection and its prepared statement for `sql`: each connection
/// prepares a statement once and keeps it (`prepare_cached`), so the
/// statements that run for every order cost no preparation round trip.
async fn prepared(pool: &Pool, sql: &str) -> anyhow::Result<(deadpool_postgres::Client, Statement)> {
    let client = client(pool).await?;
    let stmt = client.prepare_cached(sql).await.map_err(crate::db::describe)?;
    Ok((client, stmt))
}

async fn load(db: &Pool, id: i64) -> anyhow::Result<Option<(String, OrderRef)>> {
    let (client, stmt) = prepared(db, LOAD_SQL).await?;
    let row = client.query_opt(&stmt, &[&id]).await.map_err(crate::db::describe)?;
    Ok(row.map(|r| {
        let amount: Decimal = r.get(4);
        (r.get(0), OrderRef { id, customer: r.get(1), product: r.get(2), quantity: r.get(3), amount })
    }))
}

/// Records that a step is about to be called (or finds what is recorded).
///
/// The step records are committed without waiting for the WAL flush
/// (`synchronous_commit = off`): a database crash may forget the last few
/// hundred milliseconds of them, which only means a step is called again
/// with the same idempotency key — the case every step handles anyway. The
/// status updates stay synchronous, and flush every record before them.
async fn begin(db: &Pool, id: i64, step: &str, action: &str) -> anyhow::Result<Record> {
    let (client, stmt) = prepared(db, begin_sql(action)).await?;
    let row = client.query_opt(&stmt, &[&id, &step, &action]).await.map_err(crate::db::describe)?;
    drop(client);
    let row = match row {
        Some(row) => row,
        None => {
            let (client, stmt) = prepared(db, RECORD_SQL).await?;
            client.query_one(&stmt, &[&id, &step, &action]).await.map_err(crate::db::describe)?
        }
    };
    Ok(Record { outcome: row.get(0), detail: row.get(1), attempts: row.get(2) })
}

async fn finish(db: &Pool, id: i64, step: &str, action: &str, outcome: &str, detail: &str) -> anyhow::Result<()> {
    let (client, stmt) = prepared(db, finish_sql(outcome)).await?;
    client.execute(&stmt, &[&id, &step, &action, &outcome, &detail]).await.map_err(crate::db::describe)?;
    Ok(())
}

/// Keeps the last error of a step that stays `started`, for the history and
/// for the message when it is given up.
async fn note(db: &Pool, id: i64, step: &str, action: &str, detail: &str) -> anyhow::Result<()> {
    let (client, stmt) = prepared(db, NOTE_SQL).await?;
    let (after, max) = (RETRY_AFTER.as_secs_f64(), RETRY_MAX.as_secs_f64());
    client.execute(&stmt, &[&id, &step, &action, &detail, &after, &max]).await.map_err(crate::db::describe)?;
    Ok(())
}

/// Moves an order on from processing; false when it is no longer there.
async fn set_status(db: &Pool, id: i64, status: &str, error_message: Option<&str>) -> anyhow::Result<bool> {
    let (client, stmt) = prepared(db, SET_STATUS_SQL).await?;
    let rows = client.execute(&stmt, &[&id, &status, &error_message]).await.map_err(crate::db::describe)?;
    Ok(rows == 1)
}

/// `ordercast process`: the processor alone, with the simulated steps.
pub async fn run_standalone(
    settings: &crate::config::Settings,
    url: &str,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    settings.workflow.validate()?;
    crate::db::migrate(url).await?;
    let wf = &settings.workflow;
    let processor = Processor::new(url, super::steps::simulated(wf), wf.concurrency, Arc::default())?;
    processor.run(shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// What raises a database's or role's `synchronous_commit = off` for one
    /// commit (a stricter setting, `remote_apply` say, is kept).
    const DURABLE: &str = durably!();

    #[test]
    fn a_steps_start_is_committed_durably_and_a_compensations_is_not() {
        assert!(super::begin_sql(super::EXECUTE).contains(DURABLE));
        assert!(super::begin_sql(super::COMPENSATE).contains("set_config('synchronous_commit', 'off', true)"));
    }

    #[test]
    fn a_refusal_is_committed_durably_and_other_finishes_are_not() {
        assert!(super::finish_sql("failed").contains(DURABLE));
        assert!(super::finish_sql("done").contains("set_config('synchronous_commit', 'off', true)"));
    }
}

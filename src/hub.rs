//! The hub: fans each change out to the sessions that want it.
//!
//! One task owns the registry of subscriptions; the listener publishes batches
//! to it and sessions subscribe through the same channel, so a subscription
//! learns exactly which position it starts after (no gap, no double).
//!
//! Fan-out never awaits a client: each subscription has a queue bounded by a
//! change budget, pushed to without waiting (a short uncontended lock and a
//! wake-up, handed to the session's worker thread through its `Relay`). A
//! subscription whose budget is spent is marked *lagged* and
//! dropped from the registry; its session then catches up from the change log
//! (see `changes::feed`). Changes are shared (`Arc`), never copied per client:
//! unfiltered subscriptions all receive the same `Arc<SharedBatch>`, whose
//! frames are concatenated once for all of them.
//!
//! Filters are indexed: a subscription is filed under its order ids, else its
//! customer, else its statuses, else under "all". A change visits only the
//! buckets for its own id, customer and statuses, so 10,000 clients each
//! following one order cost O(matching clients) per change, not O(all).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use futures_util::task::AtomicWaker;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use crate::changes::SharedChange;
use crate::domain::{Filter, Status};

/// What a session receives: a batch shared with every unfiltered client, or
/// the changes that matched its filter (with their bytes, summed once: see
/// `Batch::bytes`).
#[derive(Debug, Clone)]
pub enum Batch {
    Shared(Arc<SharedBatch>),
    Own(Vec<SharedChange>, usize),
}

impl Batch {
    pub fn changes(&self) -> &[SharedChange] {
        match self {
            Batch::Shared(b) => &b.changes,
            Batch::Own(v, _) => v,
        }
    }

    /// The changes that matched one subscription's filter.
    fn own(changes: Vec<SharedChange>) -> Batch {
        let bytes = changes.iter().map(|c| c.bytes()).sum();
        Batch::Own(changes, bytes)
    }

    /// The bytes a queue holding this batch keeps alive, against the
    /// per-client byte budget (`QUEUE_BYTES`).
    fn bytes(&self) -> usize {
        match self {
            Batch::Shared(b) => b.bytes,
            Batch::Own(_, bytes) => *bytes,
        }
    }
}

/// The most a client's queue holds, in bytes of frames, before the client
/// counts as slow and catches up from the log (which is read 4 MiB of row
/// images at a time): the change budget alone let a client that keeps up
/// slowly hold thousands of megabyte-long changes (a DBA's `UPDATE` of a
/// long column). A batch the listener read counts about four times its
/// images (a change's WebSocket frame and SSE event, and a shared batch's
/// frames put together): this holds about four such batches. With the
/// default change budget (4,096), the change budget binds first unless the
/// changes queued average over 16 KiB of frames each (64 MiB / 4,096).
pub const QUEUE_BYTES: usize = 64 << 20;

/// One published batch as every unfiltered client gets it: the changes, and
/// their WebSocket frames and SSE events concatenated once, so a WebSocket
/// session hands the whole batch to its connection as one shared buffer
/// (one queue operation and, usually, one socket write per batch instead of
/// per change), and an SSE stream views of it, cut between changes (the HTTP
/// layer copies what it is handed: see `routes::sse`).
#[derive(Debug)]
pub struct SharedBatch {
    pub changes: Vec<SharedChange>,
    pub ws_frames: Bytes,
    pub sse_events: Bytes,
    /// The changes' frames and the concatenations (see `Batch::bytes`).
    bytes: usize,
}

impl SharedBatch {
    pub fn new(changes: Vec<SharedChange>) -> SharedBatch {
        let concat = |part: fn(&SharedChange) -> &Bytes| -> Bytes {
            if let [one] = changes.as_slice() {
                return part(one).clone();
            }
            let mut out = BytesMut::with_capacity(changes.iter().map(|c| part(c).len()).sum());
            for c in &changes {
                out.extend_from_slice(part(c));
            }
            out.freeze()
        };
        let ws_frames = concat(|c| &c.ws_frame);
        let sse_events = concat(|c| &c.sse);
        let own: usize = changes.iter().map(|c| c.bytes()).sum();
        let bytes = if changes.len() > 1 { own + ws_frames.len() + sse_events.len() } else { own };
        SharedBatch { changes, ws_frames, sse_events, bytes }
    }
}

/// Counters shown by `/api/health` and the metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    pub subscriptions: AtomicUsize,
    /// Changes handed to client queues.
    pub deliveries: AtomicU64,
    /// Subscriptions dropped for falling behind (they catch up from the log).
    pub lagged: AtomicU64,
    pub published: AtomicU64,
    /// Clients told to resync (their position was gone).
    pub resyncs: AtomicU64,
    /// Clients closed for not reading (4008).
    pub slow_disconnects: AtomicU64,
    /// Times the hub's task panicked and went on with every subscription
    /// let go (see `supervise`).
    pub restarts: AtomicU64,
    /// Commit (the sequencer's clock) to fan-out into client queues.
    pub commit_to_push: crate::metrics::Histogram,
}

enum Command {
    Subscribe(Filter, Option<Arc<Relay>>, oneshot::Sender<Subscription>),
    Publish(Vec<SharedChange>),
    /// The live stream jumps to this position: what came before it is no
    /// longer in the log.
    Gap(i64),
    /// The log went back to this position: the positions after it will be
    /// numbered again.
    Rewind(i64),
    /// Publishes these changes and panics half way: after the unfiltered
    /// subscriptions got them, before the filtered ones do.
    #[cfg(test)]
    Fail(Vec<SharedChange>),
}

/// Handle to the hub task. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    commands: mpsc::Sender<Command>,
    position: Arc<AtomicI64>,
    /// The highest position handed to a client by anything but the live
    /// stream (catch-up reads, the positions of REST pages and snapshots),
    /// which can be ahead of `position`: the listener counts it as pushed
    /// when it checks that the log kept what was pushed.
    handed_out: Arc<AtomicI64>,
    /// The newest position handed out outside the live stream whose commit
    /// is known (a catch-up read's newest change, a page's head), with the
    /// commit time (microseconds) of the transaction there: the listener
    /// checks that the log still holds that commit there.
    handed_out_commit: Arc<Mutex<Option<(i64, i64)>>>,
    pub stats: Arc<HubStats>,
    /// Catch-up reads of the log in flight, shared by the feeds that read
    /// from the same position (`changes::feed`).
    pub catch_up_reads: Arc<crate::changes::feed::SharedReads>,
}

/// A session's live feed. Dropping it unsubscribes.
pub struct Subscription {
    id: u64,
    /// Every change after this position is delivered here (until lagged).
    pub start: i64,
    /// How many times the log had gone back (`Hub::rewind`) when this
    /// subscription was made.
    pub epoch: u64,
    queue: Arc<Queue>,
    unsubscribe: mpsc::UnboundedSender<u64>,
}

/// A subscription's queue, shared by the hub (which pushes without ever
/// waiting) and the session (which pops). One small allocation per
/// subscription; no buffer until something is queued.
#[derive(Default)]
struct Queue {
    /// Locked through `Queue::lock`.
    inner: Mutex<Queued>,
    waker: AtomicWaker,
    /// The subscribing thread's relay, which wakes this session for the hub.
    relay: Option<Arc<Relay>>,
}

impl Queue {
    /// The queue's state. Held only for pushes, pops and flags; should the
    /// hub's task panic while holding it (see `supervise`), the poison is
    /// cleared: the hub then marks the subscription lagged, and the session
    /// drains what is queued and catches up from the change log.
    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.inner.lock().unwrap_or_else(|poisoned| {
            self.inner.clear_poison();
            poisoned.into_inner()
        })
    }
}

/// Wakes a worker thread's sessions from that thread.
///
/// The hub runs on another thread than the sessions, and waking a task of a
/// single-threaded runtime from outside costs a system call (the runtime's
/// event-fd write) and often a thread wake-up: per client per batch, that was
/// as many system calls as socket writes. Instead the hub hands the wakers of
/// a thread's sessions to that thread's relay and wakes the relay once per
/// publish; the relay, a task on the sessions' own runtime, wakes them there,
/// where a wake-up is a push onto the local run queue.
struct Relay {
    // unwrap on lock: never held across a panic (pushes and swaps only)
    wakers: Mutex<Vec<Waker>>,
    waker: AtomicWaker,
    /// False once the relay's task has ended. It ends only with its runtime,
    /// which the sessions it wakes run on, so a waker handed over just as it
    /// ends has no task left to wake.
    alive: AtomicBool,
}

thread_local! {
    static RELAY: RefCell<Option<Arc<Relay>>> = const { RefCell::new(None) };
}

impl Relay {
    /// The calling thread's relay, started on first use. Only single-threaded
    /// runtimes (the HTTP workers) get one: on a multi-threaded runtime a
    /// session's task may run on any thread, so it is woken directly.
    fn current() -> Option<Arc<Relay>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
            return None;
        }
        RELAY.with(|cell| {
            let mut cell = cell.borrow_mut();
            if let Some(relay) = cell.as_ref().filter(|r| r.alive.load(Ordering::Acquire)) {
                return Some(relay.clone());
            }
            let relay =
                Arc::new(Relay { wakers: Mutex::default(), waker: AtomicWaker::new(), alive: AtomicBool::new(true) });
            handle.spawn(relay.clone().run());
            *cell = Some(relay.clone());
            Some(relay)
        })
    }

    fn run(self: Arc<Relay>) -> impl std::future::Future<Output = ()> {
        /// Marks the relay dead when its task ends (the runtime shuts down)
        /// and wakes whatever it still held.
        struct Ended(Arc<Relay>);
        impl Drop for Ended {
            fn drop(&mut self) {
                self.0.alive.store(false, Ordering::Release);
                let wakers = std::mem::take(&mut *self.0.wakers.lock().unwrap());
                wakers.into_iter().for_each(Waker::wake);
            }
        }
        // Made before the future, which owns it from the start: a task that
        // its runtime drops before ever polling it still marks the relay
        // dead (inside the async block, the guard would exist only once
        // polled, and a dead relay could stay in the thread's cell as alive).
        let ended = Ended(self.clone());
        async move {
            let _ended = ended;
            let mut batch = Vec::new();
            std::future::poll_fn(|cx| {
                self.waker.register(cx.waker());
                std::mem::swap(&mut batch, &mut *self.wakers.lock().unwrap());
                batch.drain(..).for_each(Waker::wake);
                Poll::<()>::Pending
            })
            .await
        }
    }
}

/// Relays with wakers handed over during one publish: each is woken once, at
/// the end of it.
#[derive(Default)]
struct Wakes(Vec<Arc<Relay>>);

impl Wakes {
    fn wake(&mut self, queue: &Queue) {
        match &queue.relay {
            Some(relay) if relay.alive.load(Ordering::Acquire) => {
                let Some(waker) = queue.waker.take() else { return };
                let mut wakers = relay.wakers.lock().unwrap();
                if wakers.is_empty() && !self.0.iter().any(|r| Arc::ptr_eq(r, relay)) {
                    self.0.push(relay.clone());
                }
                wakers.push(waker);
            }
            _ => queue.waker.wake(),
        }
    }

    fn flush(&mut self) {
        for relay in self.0.drain(..) {
            relay.waker.wake();
        }
    }
}

impl Drop for Wakes {
    /// Wakes the relays handed wakers even when the publish panicked half
    /// way: a relay left holding wakers it was not woken for would never be
    /// woken again (a relay is added to a publish only when it holds none).
    fn drop(&mut self) {
        self.flush();
    }
}

#[derive(Default)]
struct Queued {
    batches: VecDeque<Batch>,
    /// Changes in `batches`, against the per-client budget.
    changes: usize,
    /// Their bytes, against `QUEUE_BYTES`.
    bytes: usize,
    /// The budget ran out: the hub dropped this subscription.
    lagged: bool,
    /// The hub let go of it (lagged, or the hub stopped).
    closed: bool,
}

impl Queued {
    fn pop(&mut self) -> Option<Batch> {
        let batch = self.batches.pop_front()?;
        self.changes = self.changes.saturating_sub(batch.changes().len());
        self.bytes = self.bytes.saturating_sub(batch.bytes());
        if self.batches.is_empty() && self.batches.capacity() > 64 {
            self.batches = VecDeque::new();
        }
        Some(batch)
    }
}

impl Subscription {
    /// The next batch; `None` when the hub dropped this subscription
    /// (check `lagged()`) or shut down.
    pub async fn recv(&mut self) -> Option<Batch> {
        std::future::poll_fn(|cx| {
            self.queue.waker.register(cx.waker());
            let mut q = self.queue.lock();
            match q.pop() {
                Some(b) => Poll::Ready(Some(b)),
                None if q.closed => Poll::Ready(None),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// The next batch if one is queued, without waiting; `None` also when
    /// the subscription was dropped (the async `recv` tells which).
    pub fn try_recv(&mut self) -> Option<Batch> {
        self.pop()
    }

    fn pop(&self) -> Option<Batch> {
        self.queue.lock().pop()
    }

    pub fn lagged(&self) -> bool {
        self.queue.lock().lagged
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.unsubscribe.send(self.id);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the hub has shut down")]
pub struct HubClosed;

impl Hub {
    /// Starts the hub task. `position` is the change-log position the first
    /// published batch follows; `max_queued` the per-client change budget.
    pub fn start(position: i64, max_queued: usize) -> Hub {
        Hub::start_with(position, max_queued, QUEUE_BYTES)
    }

    /// `start` with a per-client byte budget other than `QUEUE_BYTES`.
    pub fn start_with(position: i64, max_queued: usize, max_bytes: usize) -> Hub {
        let (commands, command_rx) = mpsc::channel(256);
        let (unsubscribe, unsubscribe_rx) = mpsc::unbounded_channel();
        let hub = Hub {
            commands,
            position: Arc::new(AtomicI64::new(position)),
            handed_out: Arc::new(AtomicI64::new(position)),
            handed_out_commit: Arc::default(),
            stats: Arc::default(),
            catch_up_reads: Arc::default(),
        };
        let registry = Registry {
            subs: HashMap::new(),
            all: Members::new(),
            by_id: HashMap::new(),
            by_customer: HashMap::new(),
            by_status: Default::default(),
            next_id: 0,
            publishing: position,
            max_queued: max_queued.max(1),
            max_bytes,
            position: hub.position.clone(),
            handed_out: hub.handed_out.clone(),
            handed_out_commit: hub.handed_out_commit.clone(),
            epoch: 0,
            stats: hub.stats.clone(),
            unsubscribe,
            #[cfg(test)]
            fail_next: false,
        };
        tokio::spawn(supervise(registry, command_rx, unsubscribe_rx));
        hub
    }

    /// The position of the last change published. Stored after the change
    /// is in the queue of every subscription it matches: a live subscription
    /// whose queue is empty after this was read has had every change it
    /// matches up to here (or was lagged, see `Subscription::lagged`).
    pub fn position(&self) -> i64 {
        self.position.load(Ordering::Acquire)
    }

    /// Notes a position handed to a client outside the live stream (see
    /// `handed_out`), with the commit time (microseconds) of the transaction
    /// that holds it when known (see `handed_out_commit`; none for a head
    /// that is the retention horizon, or just past a recorded loss). Once
    /// per catch-up read or page, not per change.
    pub fn note_handed_out(&self, pos: i64, committed_micros: Option<i64>) {
        self.handed_out.fetch_max(pos, Ordering::Relaxed);
        if let Some(micros) = committed_micros {
            // unwrap: never held across a panic
            let mut newest = self.handed_out_commit.lock().unwrap();
            if newest.is_none_or(|(p, _)| p < pos) {
                *newest = Some((pos, micros));
            }
        }
    }

    /// The newest position handed out outside the live stream whose commit
    /// is known, and its commit time.
    pub fn handed_out_commit(&self) -> Option<(i64, i64)> {
        *self.handed_out_commit.lock().unwrap() // unwrap: see `note_handed_out`
    }

    /// The highest position handed to a client, live or not.
    pub fn handed_out(&self) -> i64 {
        self.handed_out.load(Ordering::Relaxed).max(self.position())
    }

    pub async fn subscribe(&self, filter: Filter) -> Result<Subscription, HubClosed> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Subscribe(filter, Relay::current(), tx)).await.map_err(|_| HubClosed)?;
        rx.await.map_err(|_| HubClosed)
    }

    /// Publishes changes in position order. Waits only if the hub task itself
    /// is behind (never for clients).
    pub async fn publish(&self, changes: Vec<SharedChange>) -> Result<(), HubClosed> {
        if changes.is_empty() {
            return Ok(());
        }
        self.commands.send(Command::Publish(changes)).await.map_err(|_| HubClosed)
    }

    /// The changes after the last publish up to `pruned` were pruned from
    /// the log before they were read: the live stream goes on after
    /// `pruned`. Every subscription is let go as if it had lagged, so each
    /// feed catches up from the log and finds out for itself whether its
    /// position is gone (then it tells its client to resync).
    pub async fn gap(&self, pruned: i64) -> Result<(), HubClosed> {
        self.commands.send(Command::Gap(pruned)).await.map_err(|_| HubClosed)
    }

    /// The log went back to `head` (the database lost commits that were
    /// pushed): the live stream restarts after `head`, and every subscriber
    /// is dropped, to learn it from its next subscription's `epoch`.
    pub async fn rewind(&self, head: i64) -> Result<(), HubClosed> {
        self.commands.send(Command::Rewind(head)).await.map_err(|_| HubClosed)
    }
}

struct Sub {
    queue: Arc<Queue>,
    filter: Filter,
}

impl Drop for Sub {
    /// The session sees the end of its subscription once it has taken what
    /// was queued.
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.waker.wake();
    }
}

#[derive(PartialEq, Eq, Hash)]
enum Bucket {
    All,
    Id(i64),
    Customer(String),
    Status(Status),
}

/// Subscriptions removed in one round at most (removals come before
/// commands: the hub's `select!` is biased), which bounds the set of
/// removed ids a round builds.
const REMOVALS_PER_ROUND: usize = 4096;

/// The subscriptions filed under one bucket. Most buckets of one order or
/// one customer hold a single subscription, kept inline: a stream following
/// 1,000 orders files itself under 1,000 buckets, and with an allocation
/// for each it cost 141 KB of server memory against 92.9 KB inline
/// (`ordercast-bench idle-ids:1000:1000`, medians of three runs).
type Members = smallvec::SmallVec<[u64; 1]>;

struct Registry {
    subs: HashMap<u64, Sub>,
    all: Members,
    by_id: HashMap<i64, Members>,
    by_customer: HashMap<String, Members>,
    by_status: [Members; 7],
    next_id: u64,
    /// The last position of the batch being published (stored in `position`
    /// once it is in every queue).
    publishing: i64,
    max_queued: usize,
    max_bytes: usize,
    position: Arc<AtomicI64>,
    handed_out: Arc<AtomicI64>,
    handed_out_commit: Arc<Mutex<Option<(i64, i64)>>>,
    /// See `Subscription::epoch`.
    epoch: u64,
    stats: Arc<HubStats>,
    unsubscribe: mpsc::UnboundedSender<u64>,
    /// The next publish panics half way (`Command::Fail`).
    #[cfg(test)]
    fail_next: bool,
}

fn buckets(filter: &Filter) -> Vec<Bucket> {
    if !filter.ids.is_empty() {
        filter.ids.iter().map(Bucket::Id).collect()
    } else if let Some(c) = &filter.customer {
        vec![Bucket::Customer(c.clone())]
    } else if !filter.statuses.is_empty() {
        filter.statuses.iter().map(|s| Bucket::Status(*s)).collect()
    } else {
        vec![Bucket::All]
    }
}

fn status_index(s: Option<&str>) -> Option<usize> {
    let s = s?;
    Status::ALL.iter().position(|st| st.as_str() == s)
}

/// Runs the registry, and runs it again should it panic (a defect: nothing
/// in it is expected to). Every subscription is then let go as lagged, so
/// each session catches up from the change log, and the live stream goes on
/// after the batch that was being published: nothing is lost and no session
/// is left waiting on a hub that is gone. Subscription ids go on where they
/// were, so that the old subscriptions' unsubscribes name none of the new.
async fn supervise(
    mut registry: Registry,
    mut commands: mpsc::Receiver<Command>,
    mut unsubscribes: mpsc::UnboundedReceiver<u64>,
) {
    loop {
        match crate::error::caught(registry.run(&mut commands, &mut unsubscribes)).await {
            Ok(()) => break,
            Err(panic) => {
                log::error!("the hub failed ({panic}); every subscription catches up from the change log");
                registry.lag_all();
                registry.position.fetch_max(registry.publishing, Ordering::AcqRel);
                // Counted once the hub has gone on: whoever sees the count
                // sees the subscriptions let go and the position moved.
                registry.stats.restarts.fetch_add(1, Ordering::Release);
            }
        }
    }
    log::debug!("hub stopped");
}

impl Registry {
    async fn run(&mut self, commands: &mut mpsc::Receiver<Command>, unsubscribes: &mut mpsc::UnboundedReceiver<u64>) {
        loop {
            tokio::select! {
                biased;
                Some(id) = unsubscribes.recv() => {
                    // Clients leaving together (a load balancer restarting)
                    // are removed together: each bucket they were in is
                    // scanned once per round, not once per client.
                    let mut ids = vec![id];
                    while ids.len() < REMOVALS_PER_ROUND {
                        match unsubscribes.try_recv() {
                            Ok(id) => ids.push(id),
                            Err(_) => break,
                        }
                    }
                    self.remove_many(&ids);
                }
                cmd = commands.recv() => match cmd {
                    Some(Command::Subscribe(filter, relay, reply)) => self.subscribe(filter, relay, reply),
                    Some(Command::Publish(changes)) => self.publish(changes),
                    Some(Command::Gap(pruned)) => self.gap(pruned),
                    Some(Command::Rewind(head)) => self.rewind(head),
                    #[cfg(test)]
                    Some(Command::Fail(changes)) => {
                        self.fail_next = true;
                        self.publish(changes);
                    }
                    None => break,
                },
            }
        }
    }

    fn bucket_mut(&mut self, bucket: &Bucket) -> &mut Members {
        match bucket {
            Bucket::All => &mut self.all,
            Bucket::Id(id) => self.by_id.entry(*id).or_default(),
            Bucket::Customer(c) => self.by_customer.entry(c.clone()).or_default(),
            Bucket::Status(s) => &mut self.by_status[s.index()],
        }
    }

    fn subscribe(&mut self, filter: Filter, relay: Option<Arc<Relay>>, reply: oneshot::Sender<Subscription>) {
        self.next_id += 1;
        let id = self.next_id;
        let queue = Arc::new(Queue { relay, ..Queue::default() });
        let subscription = Subscription {
            id,
            start: self.position.load(Ordering::Acquire),
            epoch: self.epoch,
            queue: queue.clone(),
            unsubscribe: self.unsubscribe.clone(),
        };
        // Filed before it is handed over: a subscription is never out there
        // unknown to the registry (whose restart lets every one it knows go).
        for b in buckets(&filter) {
            self.bucket_mut(&b).push(id);
        }
        self.subs.insert(id, Sub { queue, filter });
        self.stats.subscriptions.store(self.subs.len(), Ordering::Relaxed);
        // A session gone while subscribing drops it unsent, which removes it.
        let _ = reply.send(subscription);
    }

    /// Removes subscriptions, each bucket they were in scanned once (one by
    /// one, many clients lagging together in one bucket would cost a scan of
    /// the bucket each); buckets of one order or customer left empty go.
    fn remove_many(&mut self, ids: &[u64]) {
        let gone: HashSet<u64> = ids.iter().copied().collect();
        let mut touched = HashSet::new();
        for id in ids {
            if let Some(sub) = self.subs.remove(id) {
                touched.extend(buckets(&sub.filter));
            }
        }
        for b in touched {
            let bucket = self.bucket_mut(&b);
            bucket.retain(|x| !gone.contains(x));
            if bucket.is_empty() {
                match b {
                    Bucket::Id(i) => {
                        self.by_id.remove(&i);
                    }
                    Bucket::Customer(c) => {
                        self.by_customer.remove(&c);
                    }
                    _ => {}
                }
            }
        }
        self.stats.subscriptions.store(self.subs.len(), Ordering::Relaxed);
    }

    /// Hands a batch to one subscription without waiting. Returns false when
    /// the subscription must go (lagged or gone).
    fn deliver(&self, id: u64, batch: Batch, wakes: &mut Wakes) -> bool {
        let Some(sub) = self.subs.get(&id) else { return true };
        let (n, bytes) = (batch.changes().len(), batch.bytes());
        {
            let mut q = sub.queue.lock();
            if q.closed {
                return false;
            }
            // A client is slow when what it has not taken yet would go past
            // its budget, in changes or in bytes. One with nothing queued
            // takes any batch: a batch larger than the budget (the listener
            // reads up to 2,000 changes at once) says nothing about the
            // client, and the queue stays bounded by the larger of the two.
            if q.changes > 0 && (q.changes + n > self.max_queued || q.bytes + bytes > self.max_bytes) {
                q.lagged = true;
                return false;
            }
            q.batches.push_back(batch);
            q.changes += n;
            q.bytes += bytes;
        }
        wakes.wake(&sub.queue);
        self.stats.deliveries.fetch_add(n as u64, Ordering::Relaxed);
        true
    }

    // `gap` and `rewind` mark every subscription lagged before they move
    // `position`: a session that reads the moved position then finds its
    // subscription lagged (see `Feed::progress`), never a live one that it
    // could take the jump for published changes.
    fn gap(&mut self, pruned: i64) {
        self.lag_all();
        // Subscribing from here on starts after the gap.
        self.position.fetch_max(pruned, Ordering::AcqRel);
    }

    fn rewind(&mut self, head: i64) {
        self.epoch += 1;
        self.lag_all();
        self.publishing = head;
        self.position.store(head, Ordering::Release);
        self.handed_out.store(head, Ordering::Relaxed);
        *self.handed_out_commit.lock().unwrap() = None; // unwrap: see `Hub::note_handed_out`
    }

    /// Drops every subscription as lagged: each session subscribes again.
    /// The indexes are emptied whole (removing the subscriptions one by one
    /// scans a bucket each: quadratic, at 10,000 clients in one bucket, while
    /// publishing waits).
    fn lag_all(&mut self) {
        for sub in self.subs.values() {
            sub.queue.lock().lagged = true;
        }
        self.subs.clear();
        self.all.clear();
        self.by_id.clear();
        self.by_customer.clear();
        self.by_status.iter_mut().for_each(Members::clear);
        self.stats.subscriptions.store(0, Ordering::Relaxed);
    }

    fn publish(&mut self, changes: Vec<SharedChange>) {
        let Some(last) = changes.last().map(|c| c.pos) else { return };
        self.publishing = last;
        self.stats.published.fetch_add(changes.len() as u64, Ordering::Relaxed);
        let now = chrono::Utc::now().timestamp_micros();
        for c in &changes {
            self.stats.commit_to_push.observe_micros(now.saturating_sub(c.committed_micros).max(0) as u64);
        }
        let mut dropped = Vec::new();
        let mut wakes = Wakes::default();

        if !self.all.is_empty() {
            let shared = Arc::new(SharedBatch::new(changes.clone()));
            for &id in &self.all {
                if !self.deliver(id, Batch::Shared(shared.clone()), &mut wakes) {
                    dropped.push(id);
                }
            }
        }

        #[cfg(test)]
        if std::mem::take(&mut self.fail_next) {
            panic!("a test's failure half way through a publish");
        }

        if !(self.by_id.is_empty() && self.by_customer.is_empty() && self.by_status.iter().all(Members::is_empty)) {
            let mut own: HashMap<u64, Vec<SharedChange>> = HashMap::new();
            let mut candidates: Vec<u64> = Vec::new();
            for change in &changes {
                candidates.clear();
                if let Some(ids) = self.by_id.get(&change.order_id) {
                    candidates.extend_from_slice(ids);
                }
                if !self.by_customer.is_empty() {
                    for c in [change.customer.as_deref(), change.old_customer.as_deref()].into_iter().flatten() {
                        if let Some(ids) = self.by_customer.get(&crate::domain::fold_case(c)) {
                            candidates.extend_from_slice(ids);
                        }
                    }
                }
                for s in [change.status.as_deref(), change.old_status.as_deref()] {
                    if let Some(i) = status_index(s) {
                        candidates.extend_from_slice(&self.by_status[i]);
                    }
                }
                for &id in &candidates {
                    let Some(sub) = self.subs.get(&id) else { continue };
                    if !change.matches(&sub.filter) {
                        continue;
                    }
                    let list = own.entry(id).or_default();
                    // A change can reach a subscription through two buckets.
                    if list.last().is_none_or(|c| c.pos != change.pos) {
                        list.push(change.clone());
                    }
                }
            }
            for (id, list) in own {
                if !self.deliver(id, Batch::own(list), &mut wakes) {
                    dropped.push(id);
                }
            }
        }

        wakes.flush();
        for id in &dropped {
            if self.subs.get(id).is_some_and(|s| s.queue.lock().lagged) {
                self.stats.lagged.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.remove_many(&dropped);
        self.position.store(last, Ordering::Release);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    pub(crate) fn change(pos: i64) -> SharedChange {
        Arc::new(crate::changes::Change {
            pos,
            committed_micros: 0,
            order_id: pos,
            status: Some("pending".into()),
            old_status: None,
            customer: Some("c".into()),
            old_customer: None,
            ws_frame: Bytes::from_static(b"x"),
            sse: Bytes::from_static(b"x"),
            moved: None,
        })
    }

    /// The next batch, which must come by a wake-up: when the deadline
    /// passes first, the test fails even if the batch is queued by then.
    async fn woken(sub: &mut Subscription) -> Batch {
        tokio::select! {
            biased;
            _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("not woken within 5 s"),
            batch = sub.recv() => batch.expect("a batch"),
        }
    }

    /// Waits until the hub's counters say what `done` asks (the hub task
    /// works on its own: a publish is queued, not yet delivered, when
    /// `publish` returns).
    async fn until(hub: &Hub, done: impl Fn(&HubStats) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done(&hub.stats) {
            assert!(tokio::time::Instant::now() < deadline, "the hub did not get there within 5 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// 20,000 clients leaving at once (a load balancer restarting) are
    /// removed in a few scans of their bucket: the hub goes on at once.
    /// Before, each was a scan of the bucket, and the hub published nothing
    /// for seconds (this test took 40 s without the fix in a debug build).
    #[tokio::test]
    async fn many_clients_leaving_at_once_do_not_stall_the_hub() {
        let hub = Hub::start(0, 16);
        let mut subs = Vec::new();
        for _ in 0..20_000 {
            subs.push(hub.subscribe(Filter::default()).await.unwrap());
        }
        drop(subs);
        // A generous bound: about 0.1 s here with the fix, 40 s without.
        let next = async {
            let mut last = hub.subscribe(Filter::default()).await.unwrap();
            hub.publish(vec![change(1)]).await.unwrap();
            woken(&mut last).await
        };
        let batch = tokio::time::timeout(Duration::from_secs(10), next).await.expect("the hub went on within 10 s");
        assert_eq!(batch.changes()[0].pos, 1);
        assert_eq!(hub.stats.subscriptions.load(Ordering::Relaxed), 1);
    }

    fn multi_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// On a single-threaded runtime (as the HTTP workers run) a session is
    /// subscribed with its thread's relay, and the hub, on another runtime,
    /// reaches it through the relay alone: `Wakes` never wakes such a session
    /// directly, so a relay that failed to pass wakers on would leave `recv`
    /// waiting forever.
    #[test]
    fn a_worker_threads_sessions_are_woken_through_its_relay() {
        let hub_rt = multi_thread();
        let hub = hub_rt.block_on(async { Hub::start(0, 100) });
        let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
        let session_hub = hub.clone();
        let session = std::thread::spawn(move || {
            current_thread().block_on(async move {
                let mut subs = Vec::new();
                for _ in 0..3 {
                    subs.push(session_hub.subscribe(Filter::default()).await.unwrap());
                }
                let relays: Vec<_> = subs.iter().map(|s| s.queue.relay.clone().expect("a relay")).collect();
                assert!(relays.iter().all(|r| Arc::ptr_eq(r, &relays[0])), "one relay per thread");
                subscribed_tx.send(()).unwrap();
                let mut seen = Vec::new();
                for sub in &mut subs {
                    for _ in 0..2 {
                        let batch = woken(sub).await;
                        seen.extend(batch.changes().iter().map(|c| c.pos));
                    }
                }
                seen
            })
        });
        subscribed_rx.recv().unwrap();
        hub_rt.block_on(async {
            hub.publish(vec![change(1), change(2)]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            hub.publish(vec![change(3)]).await.unwrap();
        });
        assert_eq!(session.join().unwrap(), [1, 2, 3, 1, 2, 3, 1, 2, 3]);
    }

    /// A relay whose task its runtime dropped before ever running it is
    /// dead too (the main future here finishes without yielding, so the
    /// spawned relay is never polled).
    #[test]
    fn a_relay_never_run_before_its_runtime_ended_is_dead() {
        let relay = current_thread().block_on(async { Relay::current().unwrap() });
        assert!(!relay.alive.load(Ordering::Acquire));
    }

    /// A relay lives as long as its runtime: a later runtime on the same
    /// thread starts a new one instead of handing wakers to a dead task.
    #[test]
    fn a_relay_whose_runtime_ended_is_replaced() {
        let hub_rt = multi_thread();
        let hub = hub_rt.block_on(async { Hub::start(0, 100) });
        let (step_tx, step_rx) = std::sync::mpsc::channel();
        let (publish_tx, publish_rx) = std::sync::mpsc::channel::<()>();
        let session_hub = hub.clone();
        let session = std::thread::spawn(move || {
            let first = current_thread().block_on(async {
                let sub = session_hub.subscribe(Filter::default()).await.unwrap();
                sub.queue.relay.clone().unwrap()
            });
            // The runtime is gone, and with it the relay's task.
            assert!(!first.alive.load(Ordering::Acquire));
            current_thread().block_on(async {
                let mut sub = session_hub.subscribe(Filter::default()).await.unwrap();
                let second = sub.queue.relay.clone().unwrap();
                assert!(!Arc::ptr_eq(&first, &second) && second.alive.load(Ordering::Acquire));
                step_tx.send(()).unwrap();
                publish_rx.recv().unwrap();
                let batch = woken(&mut sub).await;
                batch.changes().iter().map(|c| c.pos).collect::<Vec<_>>()
            })
        });
        step_rx.recv().unwrap();
        hub_rt.block_on(hub.publish(vec![change(7)])).unwrap();
        publish_tx.send(()).unwrap();
        assert_eq!(session.join().unwrap(), [7]);
    }

    /// A batch larger than the per-client budget goes to a client with
    /// nothing queued; it is the next one, on top of what it has not taken,
    /// that finds the client slow. Before, every client was let go (and
    /// caught up from the log) for one large transaction.
    #[test]
    fn a_batch_larger_than_the_budget_reaches_a_client_that_keeps_up() {
        let rt = multi_thread();
        rt.block_on(async {
            let hub = Hub::start(0, 10);
            let mut sub = hub.subscribe(Filter::default()).await.unwrap();
            hub.publish((1..=11).map(change).collect()).await.unwrap();
            assert_eq!(woken(&mut sub).await.changes().len(), 11);
            assert!(!sub.lagged());
            // Taken: the next large batch is welcome too.
            hub.publish((12..=30).map(change).collect()).await.unwrap();
            assert_eq!(woken(&mut sub).await.changes().len(), 19);
            // Not taken: the one after it finds the client slow.
            hub.publish((31..=42).map(change).collect()).await.unwrap();
            hub.publish(vec![change(43)]).await.unwrap();
            until(&hub, |s| s.lagged.load(Ordering::Relaxed) == 1).await;
            assert_eq!(woken(&mut sub).await.changes().len(), 12);
            assert_eq!(sub.recv().await.map(|b| b.changes().len()), None, "let go after what it was given");
            assert!(sub.lagged());
        });
    }

    /// A change whose WebSocket frame and SSE event are `n` bytes each.
    fn sized(pos: i64, n: usize) -> SharedChange {
        let mut c = Arc::into_inner(change(pos)).expect("not shared yet");
        c.ws_frame = Bytes::from(vec![b'x'; n]);
        c.sse = Bytes::from(vec![b'x'; n]);
        Arc::new(c)
    }

    /// A client is slow when its queue would hold more than its byte budget,
    /// however few changes that is; one that takes what it is given is not.
    #[test]
    fn a_queue_past_its_byte_budget_lags_whatever_its_count() {
        let rt = multi_thread();
        rt.block_on(async {
            let hub = Hub::start_with(0, 1000, 100);
            let mut idle = hub.subscribe(Filter::default()).await.unwrap();
            let mut reader = hub.subscribe(Filter::default()).await.unwrap();
            // Larger than the budget, into an empty queue: taken.
            hub.publish(vec![sized(1, 200)]).await.unwrap();
            assert_eq!(woken(&mut reader).await.changes()[0].pos, 1);
            assert_eq!(woken(&mut idle).await.changes()[0].pos, 1);
            // 40 bytes each (a frame and an event of 20): 40 + 40 fit, 40
            // more do not.
            for pos in [2, 3] {
                hub.publish(vec![sized(pos, 20)]).await.unwrap();
                assert_eq!(woken(&mut reader).await.changes()[0].pos, pos);
            }
            hub.publish(vec![sized(4, 20)]).await.unwrap();
            until(&hub, |s| s.lagged.load(Ordering::Relaxed) == 1).await;
            assert_eq!(woken(&mut reader).await.changes()[0].pos, 4);
            assert_eq!(woken(&mut idle).await.changes()[0].pos, 2);
            assert_eq!(woken(&mut idle).await.changes()[0].pos, 3);
            assert_eq!(idle.recv().await.map(|_| ()), None, "let go after what it was given");
            assert!(idle.lagged() && !reader.lagged());
            // Own batches (a filtered client's) count the same way: two
            // changes of 60 bytes, taken into an empty queue, then 60 more.
            let pending = Filter { statuses: [Status::Pending].into(), ..Filter::default() };
            let mut filtered = hub.subscribe(pending).await.unwrap();
            hub.publish(vec![sized(5, 30), sized(6, 30)]).await.unwrap();
            assert_eq!(woken(&mut reader).await.changes().len(), 2);
            hub.publish(vec![sized(7, 30)]).await.unwrap();
            until(&hub, |s| s.lagged.load(Ordering::Relaxed) == 2).await;
            assert_eq!(woken(&mut filtered).await.changes().len(), 2);
            assert_eq!(filtered.recv().await.map(|_| ()), None);
            assert!(filtered.lagged());
        });
    }

    /// A panic in the hub's task, half way through a publish (the
    /// unfiltered client got the batch, the filtered one did not), lets
    /// every subscription go as lagged, its session to catch up from the log;
    /// the relay of the sessions' thread still wakes them; and the hub goes
    /// on: new subscriptions start after the batch that failed, get what
    /// follows, and the old subscriptions leaving does not remove them.
    /// Before, the panic ended the task and every session waited on a hub
    /// that was gone.
    #[test]
    fn a_panic_in_the_hub_lets_every_subscription_go_and_the_hub_goes_on() {
        fn positions(batch: Batch) -> Vec<i64> {
            batch.changes().iter().map(|c| c.pos).collect()
        }
        let hub_rt = multi_thread();
        let hub = hub_rt.block_on(async { Hub::start(0, 16) });
        let (to_main, from_session) = std::sync::mpsc::channel();
        let session_hub = hub.clone();
        let session = std::thread::spawn(move || {
            current_thread().block_on(async move {
                let hub = session_hub;
                let mut all = hub.subscribe(Filter::default()).await.unwrap();
                let pending = Filter { statuses: [Status::Pending].into(), ..Filter::default() };
                let mut filtered = hub.subscribe(pending.clone()).await.unwrap();
                assert!(all.queue.relay.is_some() && filtered.queue.relay.is_some(), "woken through a relay");
                to_main.send("subscribed").unwrap();
                assert_eq!(positions(woken(&mut all).await), [1]);
                assert_eq!(positions(woken(&mut filtered).await), [1]);
                to_main.send("got 1").unwrap();
                assert_eq!(positions(woken(&mut all).await), [2, 3], "the part of the publish that was done");
                assert_eq!(all.recv().await.map(|_| ()), None, "let go");
                assert_eq!(filtered.recv().await.map(|_| ()), None, "let go");
                assert!(all.lagged() && filtered.lagged(), "to catch up from the log, not to end");
                let mut new = hub.subscribe(Filter::default()).await.unwrap();
                let mut new_filtered = hub.subscribe(pending).await.unwrap();
                assert_eq!((new.start, new.epoch), (3, all.epoch), "the live stream goes on after the failed batch");
                drop((all, filtered));
                to_main.send("subscribed again").unwrap();
                assert_eq!(positions(woken(&mut new).await), [4]);
                assert_eq!(positions(woken(&mut new_filtered).await), [4]);
                assert_eq!(hub.stats.subscriptions.load(Ordering::Relaxed), 2, "the old ones leaving took none");
            })
        });
        assert_eq!(from_session.recv().unwrap(), "subscribed");
        hub_rt.block_on(async {
            hub.publish(vec![change(1)]).await.unwrap();
            assert_eq!(from_session.recv().unwrap(), "got 1");
            // The session waits for its next batch (its relay ran, and holds
            // no waker): the failed publish hands the relay one.
            tokio::time::sleep(Duration::from_millis(100)).await;
            hub.commands.send(Command::Fail(vec![change(2), change(3)])).await.unwrap();
            until(&hub, |s| s.restarts.load(Ordering::Acquire) == 1).await;
        });
        assert_eq!(hub.position(), 3);
        assert_eq!(from_session.recv().unwrap(), "subscribed again");
        hub_rt.block_on(async { hub.publish(vec![change(4)]).await.unwrap() });
        session.join().unwrap();
    }

    /// Clients that lag in the same publish go together (each bucket they
    /// were in scanned once); the others, in the same buckets or not, go on.
    #[test]
    fn clients_lagging_together_are_let_go_and_the_rest_go_on() {
        let rt = multi_thread();
        rt.block_on(async {
            let hub = Hub::start(0, 2);
            let pending = Filter { statuses: [Status::Pending].into(), ..Filter::default() };
            let one = Filter { ids: [1].into(), ..Filter::default() };
            let mut readers =
                vec![hub.subscribe(Filter::default()).await.unwrap(), hub.subscribe(pending.clone()).await.unwrap()];
            let mut idle = Vec::new();
            for f in [Filter::default(), Filter::default(), pending, one] {
                idle.push(hub.subscribe(f).await.unwrap());
            }
            hub.publish(vec![change(1)]).await.unwrap();
            for r in &mut readers {
                assert_eq!(woken(r).await.changes().len(), 1);
            }
            hub.publish(vec![change(2), change(3)]).await.unwrap();
            // Three idle ones lagged; the one following order 1 got nothing more.
            until(&hub, |s| s.subscriptions.load(Ordering::Relaxed) == 3).await;
            assert_eq!(hub.stats.lagged.load(Ordering::Relaxed), 3);
            for r in &mut readers {
                assert_eq!(woken(r).await.changes().len(), 2);
            }
            hub.publish(vec![change(4)]).await.unwrap();
            for r in &mut readers {
                assert_eq!(woken(r).await.changes()[0].pos, 4);
            }
            for (i, sub) in idle.iter_mut().enumerate() {
                assert_eq!(sub.recv().await.map(|b| b.changes().len()), Some(1), "{i}: what it was given");
                if i < 3 {
                    assert_eq!(sub.recv().await.map(|_| ()), None, "{i}: then let go");
                    assert!(sub.lagged());
                }
            }
            assert!(!idle[3].lagged());
        });
    }

    /// On a multi-threaded runtime a session's task may move between
    /// threads, so it is woken directly, without a relay.
    #[test]
    fn sessions_on_a_multi_threaded_runtime_have_no_relay() {
        let rt = multi_thread();
        rt.block_on(async {
            let hub = Hub::start(0, 100);
            let mut sub = hub.subscribe(Filter::default()).await.unwrap();
            assert!(sub.queue.relay.is_none());
            hub.publish(vec![change(1)]).await.unwrap();
            let batch = woken(&mut sub).await;
            assert_eq!(batch.changes()[0].pos, 1);
        });
    }
}

//! The measurements. Each returns a flat map of named figures, so runs can be
//! combined into medians and printed the same way.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::clients::{self, source_ip, Sampling, Tally};
use crate::server::Server;

pub type Figures = Map<String, Value>;

/// Connections being set up at once (the listen backlog is 4096 here).
const CONNECT_CONCURRENCY: usize = 256;

/// The one INSERT every writer uses: `$1` orders in one statement, so one
/// statement-level trigger run and one commit per statement.
pub const INSERT_SQL: &str = "INSERT INTO {table} (customer_name, product, quantity, unit_price) \
     SELECT 'Customer ' || g, 'Bench', 1 + g % 5, 9.50 FROM generate_series(1, $1::int) g";

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Transport {
    Ws,
    Sse,
}

pub struct Clients {
    handles: Vec<JoinHandle<Tally>>,
    finish: watch::Sender<Option<i64>>,
    pub ready: usize,
    pub connect_errors: usize,
    pub first_error: Option<String>,
    pub connect_secs: f64,
    /// Which latencies the clients keep (shared by all of them).
    pub sampling: Sampling,
}

/// Opens `n` clients (at most `CONNECT_CONCURRENCY` handshakes in flight, from
/// 127.0.0.2..254) and waits until each is subscribed or failed.
pub async fn open_clients(server: &Server, transport: Transport, n: usize, keep_latencies: bool) -> Clients {
    open_clients_with(server, transport, n, keep_latencies, &|_| String::new()).await
}

/// `open_clients` with a query string (`?since=N`) on each stream's URL,
/// by the client's number.
pub async fn open_clients_with(
    server: &Server,
    transport: Transport,
    n: usize,
    keep_latencies: bool,
    query: &dyn Fn(usize) -> String,
) -> Clients {
    let addr: SocketAddr = format!("{}:{}", server.host, server.port).parse().expect("numeric host");
    let (finish_tx, finish_rx) = watch::channel(None);
    let (ready_tx, mut ready_rx) = mpsc::channel(n.max(1));
    let started = Instant::now();
    let sampling = Sampling::new(keep_latencies);
    let mut clients = Clients {
        handles: Vec::with_capacity(n),
        finish: finish_tx,
        ready: 0,
        connect_errors: 0,
        first_error: None,
        connect_secs: 0.0,
        sampling: sampling.clone(),
    };
    let note = |c: &mut Clients, r: Option<anyhow::Result<i64>>| match r {
        Some(Ok(_)) => c.ready += 1,
        Some(Err(e)) => {
            c.connect_errors += 1;
            c.first_error.get_or_insert_with(|| format!("{e:#}"));
        }
        None => c.connect_errors += 1,
    };
    let mut pending = 0;
    for i in 0..n {
        while pending >= CONNECT_CONCURRENCY {
            let r = ready_rx.recv().await;
            note(&mut clients, r);
            pending -= 1;
        }
        let src = source_ip(i);
        let (ready, finish) = (ready_tx.clone(), finish_rx.clone());
        let handle = match transport {
            Transport::Ws => tokio::spawn(clients::ws_client(
                server.ws_url(&format!("/ws{}", query(i))),
                addr,
                src,
                sampling.clone(),
                ready,
                finish,
            )),
            Transport::Sse => tokio::spawn(clients::sse_client(
                format!("/api/events{}", query(i)),
                addr,
                src,
                sampling.clone(),
                ready,
                finish,
            )),
        };
        clients.handles.push(handle);
        pending += 1;
    }
    while pending > 0 {
        let r = ready_rx.recv().await;
        note(&mut clients, r);
        pending -= 1;
    }
    clients.connect_secs = started.elapsed().as_secs_f64();
    clients
}

impl Clients {
    /// Tells the clients the final head and collects what each saw.
    pub async fn finish(&mut self, head: i64) -> Vec<Tally> {
        let _ = self.finish.send(Some(head));
        let mut out = Vec::with_capacity(self.handles.len());
        for h in std::mem::take(&mut self.handles) {
            let mut t = h.await.unwrap_or_else(|e| Tally { error: Some(e.to_string()), ..Default::default() });
            t.settle(head);
            out.push(t);
        }
        out
    }
}

/// The newest position the server's clients must reach: ordercast's change
/// log head, or the reference broadcaster's last number.
pub async fn head(server: &Server, db: &tokio_postgres::Client) -> anyhow::Result<i64> {
    let sql = if server.reference { crate::reference::HEAD_SQL } else { "SELECT change_head()" };
    Ok(db.query_one(sql, &[]).await.map_err(ordercast::db::describe)?.get(0))
}

/// What a paced writer did.
pub struct Written {
    pub changes: u64,
    pub secs: f64,
    pub started_us: i64,
}

/// Writes `rate` changes per second for `duration` as a DBA would: plain
/// INSERTs on its own connection, `rows_per_stmt` orders per autocommit
/// statement. Statements are pipelined on the connection (up to 64 in flight)
/// so the schedule does not depend on each commit's round trip.
///
/// With `warm_up` (the clients' sampling and a time), the writing starts with
/// that much more, whose changes the clients count but do not sample: the
/// first second of a run (buffers growing, the allocator's first pages, TCP
/// windows opening) says little about the load it sustains.
pub async fn write_paced(
    db_url: &str,
    rate: f64,
    rows_per_stmt: usize,
    duration: Duration,
    warm_up: Option<(&Sampling, Duration)>,
) -> anyhow::Result<Written> {
    let db = ordercast::db::connect(db_url).await?;
    let stmt = db.prepare(&INSERT_SQL.replace("{table}", "orders")).await.map_err(ordercast::db::describe)?;
    let rows = rows_per_stmt.max(1) as i32;
    let interval = Duration::from_secs_f64(rows as f64 / rate.max(0.001));
    let warm = warm_up.map_or(Duration::ZERO, |(_, w)| w);
    let total = ((rate * (warm + duration).as_secs_f64()) / rows as f64).ceil().max(1.0) as u64;
    let started = Instant::now();
    let started_us = clients::now_us();
    if let Some((sampling, w)) = warm_up {
        sampling.from(started_us + w.as_micros() as i64);
    }
    let args = [&rows as &(dyn tokio_postgres::types::ToSql + Sync)];
    let mut in_flight = FuturesUnordered::new();
    let mut sent = 0u64;
    let mut done = 0u64;
    while done < total {
        let due = started + interval.mul_f64(sent as f64);
        tokio::select! {
            biased;
            Some(r) = in_flight.next() => {
                let r: Result<u64, tokio_postgres::Error> = r;
                r.map_err(ordercast::db::describe).context("benchmark INSERT failed")?;
                done += 1;
            }
            _ = tokio::time::sleep_until(due.into()), if sent < total && in_flight.len() < 64 => {
                in_flight.push(db.execute(&stmt, &args));
                sent += 1;
            }
        }
    }
    Ok(Written { changes: total * rows as u64, secs: started.elapsed().as_secs_f64(), started_us })
}

/// Nearest-rank percentiles of microsecond samples, in milliseconds.
pub fn percentiles(figures: &mut Figures, samples: &mut [u32]) {
    samples.sort_unstable();
    let at = |q: f64| -> Value {
        if samples.is_empty() {
            return Value::Null;
        }
        let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        json!(samples[i] as f64 / 1000.0)
    };
    figures.insert("p50_ms".into(), at(0.50));
    figures.insert("p90_ms".into(), at(0.90));
    figures.insert("p99_ms".into(), at(0.99));
    figures.insert("p999_ms".into(), at(0.999));
    figures.insert("max_ms".into(), samples.last().map(|m| json!(*m as f64 / 1000.0)).unwrap_or(Value::Null));
    figures.insert("latency_samples".into(), json!(samples.len()));
}

/// Deliveries checked against what the writer committed, not only against
/// the change log (a capture that lost or merged changes would leave the log
/// gap-free): every ready client must get every change written, once.
/// `unmatched` is how far the deliveries are from that, either way.
fn unmatched(figures: &mut Figures, clients: &Clients, written: &Written) {
    let want = clients.ready as u64 * written.changes;
    let got = figures["deliveries"].as_u64().unwrap_or(0);
    let off = want.abs_diff(got);
    if off > 0 {
        eprintln!("  {got} deliveries, but {} clients x {} changes written = {want}", clients.ready, written.changes);
    }
    figures.insert("unmatched".into(), json!(off));
}

fn tally_figures(figures: &mut Figures, clients: &Clients, tallies: &mut [Tally]) -> Vec<u32> {
    let received: u64 = tallies.iter().map(|t| t.received).sum();
    let lost: u64 = tallies.iter().map(|t| t.lost).sum();
    let dups: u64 = tallies.iter().map(|t| t.duplicates).sum();
    let errors = tallies.iter().filter(|t| t.error.is_some()).count() + clients.connect_errors;
    if let Some(e) = clients.first_error.clone().or_else(|| tallies.iter().find_map(|t| t.error.clone())) {
        eprintln!("  first client error: {e}");
    }
    figures.insert("clients".into(), json!(clients.ready));
    figures.insert("deliveries".into(), json!(received));
    figures.insert("lost".into(), json!(lost));
    figures.insert("duplicates".into(), json!(dups));
    figures.insert("client_errors".into(), json!(errors));
    // How many changes a client got per socket read, on average: 1 while the
    // server writes every change as it comes; more when changes wait for
    // their client's turn (each client's share of a round of socket writes).
    let receives: u64 = tallies.iter().map(|t| t.receives).sum();
    if receives > 0 {
        figures.insert("changes_per_receive".into(), json!(round2(received as f64 / receives as f64)));
    }
    let mut all = Vec::with_capacity(received as usize);
    for t in tallies.iter_mut() {
        all.append(&mut t.latencies_us);
    }
    all
}

/// Commit -> receive latency: `n` clients, `rate` single-row commits per
/// second for `duration`.
pub async fn latency(
    server: &Server,
    db_url: &str,
    transport: Transport,
    n: usize,
    rate: f64,
    duration: Duration,
    warm_up: Duration,
) -> anyhow::Result<Figures> {
    let db = ordercast::db::connect(db_url).await?;
    let mut clients = open_clients(server, transport, n, true).await;
    anyhow::ensure!(clients.ready > 0, "no client connected: {:?}", clients.first_error);
    let cpu = CpuWindow::start(server);
    let written = write_paced(db_url, rate, 1, duration, Some((&clients.sampling, warm_up))).await?;
    let head = head(server, &db).await?;
    let mut tallies = clients.finish(head).await;
    let mut f = Figures::new();
    cpu.finish(server, run_secs(&written, &tallies), &mut f);
    f.insert("offered_changes_per_s".into(), json!(rate));
    f.insert("changes".into(), json!(written.changes));
    f.insert("write_changes_per_s".into(), json!(round(written.changes as f64 / written.secs)));
    f.insert("warm_up_secs".into(), json!(warm_up.as_secs_f64()));
    let mut samples = tally_figures(&mut f, &clients, &mut tallies);
    unmatched(&mut f, &clients, &written);
    percentiles(&mut f, &mut samples);
    Ok(f)
}

/// From the first write to the last receive (at least the writing time): if
/// the server falls behind, the drain counts too.
fn run_secs(written: &Written, tallies: &[Tally]) -> f64 {
    let last = tallies.iter().map(|t| t.last_receive_us).max().unwrap_or(written.started_us);
    ((last - written.started_us) as f64 / 1e6).max(written.secs)
}

/// CPU used during a run: the server's and the load generator's (cores busy;
/// 2.0 = both of this machine's cores) and the whole machine's (per cent of
/// all cores, PostgreSQL included). On a machine they share, a latency
/// figure means little without it: past about 90 % busy, every hop waits
/// for a core.
struct CpuWindow {
    server: Option<u64>,
    own: Option<u64>,
    machine: Option<(u64, u64)>,
}

impl CpuWindow {
    fn start(server: &Server) -> CpuWindow {
        CpuWindow {
            server: server.pid.and_then(cpu_ticks),
            own: cpu_ticks(std::process::id()),
            machine: machine_ticks(),
        }
    }

    fn finish(self, server: &Server, secs: f64, f: &mut Figures) {
        let cores = |a: u64, b: u64| json!(round2((b - a) as f64 / ticks_per_sec() / secs));
        if let (Some(a), Some(b)) = (self.server, server.pid.and_then(cpu_ticks)) {
            f.insert("server_cpu_cores".into(), cores(a, b));
        }
        if let (Some(a), Some(b)) = (self.own, cpu_ticks(std::process::id())) {
            f.insert("bench_cpu_cores".into(), cores(a, b));
        }
        if let (Some((busy0, all0)), Some((busy1, all1))) = (self.machine, machine_ticks()) {
            if all1 > all0 {
                f.insert(
                    "machine_busy_pct".into(),
                    json!(round((busy1 - busy0) as f64 * 100.0 / (all1 - all0) as f64)),
                );
            }
        }
    }
}

/// Fan-out throughput: `n` WebSocket clients, `rate` changes per second
/// written in statements of up to 100 rows (one every 10 ms or slower).
/// Deliveries per second = changes received by all clients / (last receive -
/// first write): if the server falls behind, the drain time counts too.
pub async fn fanout(
    server: &Server,
    db_url: &str,
    n: usize,
    rate: f64,
    duration: Duration,
    warm_up: Duration,
) -> anyhow::Result<Figures> {
    let db = ordercast::db::connect(db_url).await?;
    let mut clients = open_clients(server, Transport::Ws, n, true).await;
    anyhow::ensure!(clients.ready > 0, "no client connected: {:?}", clients.first_error);
    let rows = ((rate / 100.0).round() as usize).clamp(1, 100);
    let cpu = CpuWindow::start(server);
    let written = write_paced(db_url, rate, rows, duration, Some((&clients.sampling, warm_up))).await?;
    let head = head(server, &db).await?;
    let mut tallies = clients.finish(head).await;
    let secs = run_secs(&written, &tallies);
    let mut f = Figures::new();
    cpu.finish(server, secs, &mut f);
    f.insert("offered_changes_per_s".into(), json!(rate));
    f.insert("rows_per_statement".into(), json!(rows));
    f.insert("changes".into(), json!(written.changes));
    f.insert("write_changes_per_s".into(), json!(round(written.changes as f64 / written.secs)));
    f.insert("offered_deliveries_per_s".into(), json!(round(rate * clients.ready as f64)));
    f.insert("warm_up_secs".into(), json!(warm_up.as_secs_f64()));
    let mut samples = tally_figures(&mut f, &clients, &mut tallies);
    unmatched(&mut f, &clients, &written);
    let received = f["deliveries"].as_u64().unwrap_or(0);
    f.insert("deliveries_per_s".into(), json!(round(received as f64 / secs)));
    percentiles(&mut f, &mut samples);
    Ok(f)
}

/// Memory per idle WebSocket connection: server RSS before and after `n`
/// connections, then one change that must reach all of them (they are held
/// and live, not just open).
pub async fn idle(server: &Server, db_url: &str, n: usize) -> anyhow::Result<Figures> {
    let db = ordercast::db::connect(db_url).await?;
    // Warm the server up (worker threads, pools, first-request allocations).
    let mut warm = open_clients(server, Transport::Ws, 1, false).await;
    let h = head(server, &db).await?;
    drop(warm.finish(h).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = server.rss_bytes();
    let mut clients = open_clients(server, Transport::Ws, n, true).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = server.rss_bytes();
    let written = write_paced(db_url, 1.0, 1, Duration::from_secs(1), None).await?;
    let head = head(server, &db).await?;
    let mut tallies = clients.finish(head).await;
    let mut f = Figures::new();
    f.insert("connect_secs".into(), json!(round2(clients.connect_secs)));
    f.insert("changes".into(), json!(written.changes));
    let mut samples = tally_figures(&mut f, &clients, &mut tallies);
    // Held: a connection the change reached, not only one that was opened.
    let held = tallies.iter().filter(|t| t.error.is_none() && t.received > 0).count();
    f.insert("held".into(), json!(held));
    memory_figures(&mut f, rss_before, rss_after, clients.ready);
    percentiles(&mut f, &mut samples);
    Ok(f)
}

/// The server's memory before and after `connections` were opened, and
/// the difference per connection.
fn memory_figures(f: &mut Figures, before: Option<u64>, after: Option<u64>, connections: usize) {
    if let (Some(a), Some(b)) = (before, after) {
        f.insert("server_rss_before_mib".into(), json!(round2(a as f64 / 1048576.0)));
        f.insert("server_rss_after_mib".into(), json!(round2(b as f64 / 1048576.0)));
        f.insert(
            "bytes_per_connection".into(),
            json!((b.saturating_sub(a) as f64 / connections.max(1) as f64).round()),
        );
    }
}

/// Idle WebSocket clients each following `ids` order ids of its own
/// (`?id=...`, none shared with another client): the server's memory per
/// connection with a filter that large, which the hub indexes id by id. The
/// clients stop once subscribed (a filtered client's positions have gaps the
/// other scenarios would count as loss); `held` counts those subscribed.
pub async fn idle_ids(server: &Server, db_url: &str, n: usize, ids: usize) -> anyhow::Result<Figures> {
    let db = ordercast::db::connect(db_url).await?;
    let filter = |first: usize| {
        let list: Vec<String> = (first..first + ids).map(|id| id.to_string()).collect();
        format!("?id={}", list.join(","))
    };
    let h = head(server, &db).await?;
    // Warm the server up, with a filter of the same size.
    let mut warm = open_clients_with(server, Transport::Ws, 1, false, &|_| filter(1)).await;
    drop(warm.finish(h).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = server.rss_bytes();
    let mut clients = open_clients_with(server, Transport::Ws, n, false, &|i| filter((i + 1) * ids + 1)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = server.rss_bytes();
    let tallies = clients.finish(h).await;
    let mut f = Figures::new();
    f.insert("ids".into(), json!(ids));
    f.insert("connect_secs".into(), json!(round2(clients.connect_secs)));
    f.insert("connect_errors".into(), json!(clients.connect_errors));
    let held = tallies.iter().filter(|t| t.error.is_none()).count();
    f.insert("held".into(), json!(held));
    memory_figures(&mut f, rss_before, rss_after, clients.ready);
    Ok(f)
}

/// A catch-up storm: `behind` changes are committed (statements of 100
/// rows), then `n` WebSocket clients resume from before them at once, as
/// clients do when a server comes back. Each must get exactly those
/// changes, in order. Measures the time from the first connection to the
/// last client caught up, and the server's peak memory (`VmHWM`) over its
/// memory before.
pub async fn resume(server: &Server, db_url: &str, n: usize, behind: usize) -> anyhow::Result<Figures> {
    let db = ordercast::db::connect(db_url).await?;
    let mut warm = open_clients(server, Transport::Ws, 1, false).await;
    let since = head(server, &db).await?;
    drop(warm.finish(since).await);
    insert_rows(&db, "orders", behind, 100).await?;
    let head = head(server, &db).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = server.rss_bytes();
    let started = Instant::now();
    let mut clients = open_clients_with(server, Transport::Ws, n, false, &|_| format!("?since={since}")).await;
    let mut tallies = clients.finish(head).await;
    let secs = started.elapsed().as_secs_f64();
    let mut f = Figures::new();
    f.insert("behind".into(), json!(head - since));
    f.insert("changes".into(), json!(head - since));
    tally_figures(&mut f, &clients, &mut tallies);
    f.insert("caught_up_secs".into(), json!(round2(secs)));
    if let (Some(before), Some(peak)) = (rss_before, server.peak_rss_bytes()) {
        f.insert("server_rss_before_mib".into(), json!(round2(before as f64 / 1048576.0)));
        f.insert("server_peak_rss_mib".into(), json!(round2(peak as f64 / 1048576.0)));
    }
    Ok(f)
}

/// What change capture adds to an INSERT: the same rows into `orders` (all
/// triggers), into `orders` with only change capture (guard, history and
/// statistics triggers disabled), and into a bare copy of the table (same
/// columns, constraints and indexes, no triggers). Statements run one after
/// another on one connection, each its own transaction; `rows` orders per
/// variant in statements of 100 (a tenth of that single-row).
pub async fn write_cost(db_url: &str, rows: usize) -> anyhow::Result<Figures> {
    let db = ordercast::db::connect(db_url).await?;
    db.batch_execute("CREATE TABLE bench_bare (LIKE orders INCLUDING ALL)").await.map_err(ordercast::db::describe)?;
    let mut f = Figures::new();
    for batch in [1usize, 100] {
        // Single-row statements cost a round trip and a commit each: a tenth
        // of the rows gives as stable a figure in a tenth of the time.
        let rows = if batch == 1 { (rows / 10).max(30) } else { rows };
        let mut per_row = |label: &str, us: f64| {
            f.insert(format!("{label}_b{batch}_us_per_row"), json!(round2(us)));
        };
        // Interleave the variants so drift in the machine's load hits each alike.
        let mut bare = Vec::new();
        let mut full = Vec::new();
        let mut capture = Vec::new();
        for _ in 0..3 {
            bare.push(insert_rows(&db, "bench_bare", rows / 3, batch).await?);
            full.push(insert_rows(&db, "orders", rows / 3, batch).await?);
            set_extra_triggers(&db, false).await?;
            capture.push(insert_rows(&db, "orders", rows / 3, batch).await?);
            set_extra_triggers(&db, true).await?;
        }
        let (b, fu, c) = (median(&mut bare), median(&mut full), median(&mut capture));
        per_row("bare", b);
        per_row("orders", fu);
        per_row("capture_only", c);
        f.insert(format!("ratio_orders_b{batch}"), json!(round2(fu / b)));
        f.insert(format!("ratio_capture_only_b{batch}"), json!(round2(c / b)));
    }
    let settings = db
        .query_one("SELECT current_setting('fsync'), current_setting('synchronous_commit')", &[])
        .await
        .map_err(ordercast::db::describe)?;
    f.insert("fsync".into(), json!(settings.get::<_, String>(0)));
    f.insert("synchronous_commit".into(), json!(settings.get::<_, String>(1)));
    Ok(f)
}

async fn set_extra_triggers(db: &tokio_postgres::Client, on: bool) -> anyhow::Result<()> {
    let verb = if on { "ENABLE" } else { "DISABLE" };
    for t in ["orders_guard_insert", "orders_history_insert", "orders_stats_insert"] {
        db.batch_execute(&format!("ALTER TABLE orders {verb} TRIGGER {t}")).await.map_err(ordercast::db::describe)?;
    }
    Ok(())
}

/// Inserts `rows` rows in statements of `batch`; microseconds per row.
async fn insert_rows(db: &tokio_postgres::Client, table: &str, rows: usize, batch: usize) -> anyhow::Result<f64> {
    let stmt = db.prepare(&INSERT_SQL.replace("{table}", table)).await.map_err(ordercast::db::describe)?;
    let statements = rows.div_ceil(batch).max(1);
    let b = batch as i32;
    let started = Instant::now();
    for _ in 0..statements {
        db.execute(&stmt, &[&b]).await.map_err(ordercast::db::describe)?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / (statements * batch) as f64)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn round(x: f64) -> f64 {
    x.round()
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The machine's busy and total clock ticks since boot, from the `cpu` line
/// of /proc/stat (busy: everything but idle and iowait).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let all: u64 = ticks.iter().sum();
    Some((all - ticks.get(3)? - ticks.get(4)?, all))
}

fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64
}

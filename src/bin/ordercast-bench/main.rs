//! `ordercast-bench`: measures ordercast's latency, fan-out, memory per
//! connection and write cost, and prints a table plus JSON.
//!
//! Each scenario run gets a fresh database and, unless `--url` is given, a
//! fresh `ordercast` server process (the release binary next to this one), so
//! runs do not inherit each other's state. Figures are medians over `--runs`.
//! See docs/performance.md for the method and the published numbers.

mod clients;
mod ingest;
mod reference;
mod scenarios;
mod server;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Map, Value};

use scenarios::{Figures, Transport};
use server::{BenchDb, Server, Target};

/// Every scenario of the full benchmark (docs/performance.md).
const FULL: &[&str] = &[
    "ws-latency:100:200",
    "ws-latency:1000:1000",
    "sse-latency:100:200",
    "fanout:1000:1000",
    "fanout:10000:100",
    "idle:10000",
    "idle:19000",
    "resume:1000:5000",
    "write-cost:30000",
];

#[derive(Debug, Parser)]
#[command(name = "ordercast-bench", about = "Benchmarks an ordercast server: latency, fan-out, memory, write cost")]
struct Args {
    /// Admin URL of the PostgreSQL server to create benchmark databases on
    /// (with --url: the database that server uses).
    #[arg(long, env = "ORDERCAST_BENCH_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,

    /// The ordercast binary to start (default: `ordercast` next to this binary).
    #[arg(long)]
    server: Option<PathBuf>,

    /// Benchmark a running server instead of starting one (http://HOST:PORT).
    #[arg(long)]
    url: Option<String>,

    /// With --url: the server's process id, for its memory figures.
    #[arg(long)]
    pid: Option<u32>,

    /// Runs per scenario; figures are the medians (loss and duplicates: the maximum).
    #[arg(long, default_value_t = 3)]
    runs: usize,

    /// Seconds of writing per latency and fan-out run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,

    /// Seconds of writing before each latency and fan-out run's --duration,
    /// at the same rate: its changes count for loss and duplicates, not for
    /// the latency percentiles.
    #[arg(long, default_value_t = 1.0)]
    warm_up: f64,

    /// ORDERCAST_WORKERS for the started server (default: one per core).
    #[arg(long)]
    workers: Option<usize>,

    /// Also write the results here as JSON (they always go to stdout last).
    #[arg(long)]
    json: Option<PathBuf>,

    /// Scenarios (default: all): ws-latency:CLIENTS:RATE, sse-latency:CLIENTS:RATE,
    /// fanout:CLIENTS:RATE, idle:CONNECTIONS, idle-ids:CONNECTIONS:IDS (each
    /// filtered by IDS order ids of its own), write-cost:ROWS, ingest:ORDERS:RATE;
    /// ref-latency:CLIENTS:RATE and ref-fanout:CLIENTS:RATE run ws-latency and
    /// fanout against the reference broadcaster (a minimal LISTEN/NOTIFY server)
    /// instead of ordercast.
    scenarios: Vec<String>,
}

fn main() {
    // The reference broadcaster is this binary started again (see reference.rs).
    if std::env::args().nth(1).as_deref() == Some(reference::FLAG) {
        reference::main();
    }
    let runtime = tokio::runtime::Runtime::new().expect("a Tokio runtime");
    if let Err(e) = runtime.block_on(run(Args::parse())) {
        eprintln!("ordercast-bench: {e:#}");
        std::process::exit(1);
    }
}

/// What a latency or fan-out scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Subject {
    Ordercast,
    Reference,
}

#[derive(Debug, Clone)]
enum Scenario {
    Latency(Subject, Transport, usize, f64),
    Fanout(Subject, usize, f64),
    Idle(usize),
    /// Idle clients each filtered by this many order ids of their own.
    IdleIds(usize, usize),
    /// Clients resuming at once from before this many changes.
    Resume(usize, usize),
    WriteCost(usize),
    /// Orders produced up front, then events per second end to end.
    Ingest(usize, f64),
}

fn parse_scenario(spec: &str) -> anyhow::Result<Scenario> {
    let parts: Vec<&str> = spec.split(':').collect();
    let num = |i: usize| -> anyhow::Result<f64> {
        parts
            .get(i)
            .with_context(|| format!("{spec}: missing parameter {i}"))?
            .parse()
            .with_context(|| spec.to_string())
    };
    Ok(match parts[0] {
        "ws-latency" => Scenario::Latency(Subject::Ordercast, Transport::Ws, num(1)? as usize, num(2)?),
        "sse-latency" => Scenario::Latency(Subject::Ordercast, Transport::Sse, num(1)? as usize, num(2)?),
        "ref-latency" => Scenario::Latency(Subject::Reference, Transport::Ws, num(1)? as usize, num(2)?),
        "fanout" => Scenario::Fanout(Subject::Ordercast, num(1)? as usize, num(2)?),
        "ref-fanout" => Scenario::Fanout(Subject::Reference, num(1)? as usize, num(2)?),
        "idle" => Scenario::Idle(num(1)? as usize),
        "idle-ids" => Scenario::IdleIds(num(1)? as usize, num(2)? as usize),
        "resume" => Scenario::Resume(num(1)? as usize, num(2)? as usize),
        "write-cost" => Scenario::WriteCost(num(1)? as usize),
        "ingest" => Scenario::Ingest(num(1)? as usize, num(2)?),
        other => bail!("unknown scenario {other:?}"),
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let admin = args
        .database_url
        .clone()
        .or_else(|| std::env::var("ORDERCAST_TEST_DATABASE_URL").ok())
        .context("give --database-url (or ORDERCAST_BENCH_DATABASE_URL / ORDERCAST_TEST_DATABASE_URL)")?;
    let specs: Vec<String> =
        if args.scenarios.is_empty() { FULL.iter().map(|s| s.to_string()).collect() } else { args.scenarios.clone() };
    let scenarios = specs.iter().map(|s| parse_scenario(s)).collect::<anyhow::Result<Vec<_>>>()?;
    raise_fd_limit();
    let target = match &args.url {
        Some(url) => Target::Url { url: url.clone(), pid: args.pid },
        None => {
            let binary = match &args.server {
                Some(b) => b.clone(),
                None => std::env::current_exe()?.with_file_name("ordercast"),
            };
            let mut extra_env = Vec::new();
            if let Some(w) = args.workers {
                extra_env.push(("ORDERCAST_WORKERS".to_string(), w.to_string()));
            }
            Target::Spawn { binary, extra_env }
        }
    };
    let duration = Duration::from_secs_f64(args.duration);
    let warm_up = Duration::try_from_secs_f64(args.warm_up).context("--warm-up must be zero or more seconds")?;
    let machine = machine(&admin).await;
    eprintln!("machine: {machine}");

    let mut results = Vec::new();
    for (spec, scenario) in specs.iter().zip(&scenarios) {
        let mut runs = Vec::new();
        for i in 0..args.runs.max(1) {
            eprintln!("{spec}: run {}/{} ...", i + 1, args.runs.max(1));
            let figures = run_once(&target, &admin, scenario, duration, warm_up).await.with_context(|| spec.clone())?;
            eprintln!("  {}", Value::Object(figures.clone()));
            runs.push(figures);
        }
        results.push(json!({"scenario": spec, "median": combine(&runs), "runs": runs}));
    }

    let report = json!({
        "machine": machine,
        "runs_per_scenario": args.runs.max(1),
        "write_seconds": args.duration,
        "warm_up_seconds": args.warm_up,
        "results": results,
    });
    print_table(&report);
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json {
        std::fs::write(path, &text).with_context(|| format!("write {}", path.display()))?;
    }
    println!("{text}");
    Ok(())
}

/// One run: a fresh database and server, the measurement, then cleanup.
async fn run_once(
    target: &Target,
    admin: &str,
    scenario: &Scenario,
    duration: Duration,
    warm_up: Duration,
) -> anyhow::Result<Figures> {
    let reference =
        matches!(scenario, Scenario::Latency(Subject::Reference, ..) | Scenario::Fanout(Subject::Reference, ..));
    if reference && matches!(target, Target::Url { .. }) {
        // It would install its trigger on that server's database.
        bail!("the ref- scenarios start their own server on a fresh database (not with --url)");
    }
    let (db, db_url) = match target {
        Target::Url { .. } => (None, admin.to_string()),
        Target::Spawn { .. } | Target::Reference => {
            let db = BenchDb::create(admin).await?;
            let url = db.url.clone();
            (Some(db), url)
        }
    };
    let result = async {
        // The ingest scenario brings its broker, and its backlog is produced
        // before the server starts (group join time is not throughput).
        let broker = match scenario {
            Scenario::Ingest(orders, _) => {
                let Target::Spawn { binary, extra_env } = target else {
                    bail!("the ingest scenario starts its own server (it cannot use --url)");
                };
                let broker = ingest::Broker::start()?;
                broker.produce_created("bench", *orders).await?;
                let mut env = extra_env.clone();
                env.extend(broker.server_env());
                Some((broker, Target::Spawn { binary: binary.clone(), extra_env: env }))
            }
            _ => None,
        };
        let target = if reference { &Target::Reference } else { broker.as_ref().map_or(target, |(_, t)| t) };
        let server = Server::start(target, &db_url)?;
        let r = match scenario {
            Scenario::Latency(_, t, n, rate) => {
                scenarios::latency(&server, &db_url, *t, *n, *rate, duration, warm_up).await
            }
            Scenario::Fanout(_, n, rate) => scenarios::fanout(&server, &db_url, *n, *rate, duration, warm_up).await,
            Scenario::Idle(n) => scenarios::idle(&server, &db_url, *n).await,
            Scenario::IdleIds(n, ids) => scenarios::idle_ids(&server, &db_url, *n, *ids).await,
            Scenario::Resume(n, behind) => scenarios::resume(&server, &db_url, *n, *behind).await,
            Scenario::WriteCost(rows) => scenarios::write_cost(&db_url, *rows).await,
            Scenario::Ingest(orders, rate) => {
                // unwrap: set above for this scenario
                let (broker, _) = broker.as_ref().unwrap();
                ingest::ingest(&server, &db_url, broker, *orders, *rate, duration).await
            }
        };
        tokio::task::spawn_blocking(move || server.stop()).await?;
        r
    }
    .await;
    if let Some(db) = db {
        db.drop_now().await;
    }
    result
}

/// Medians of each figure over the runs; loss, duplicates and errors take the
/// worst run instead (they must be zero in every run).
fn combine(runs: &[Figures]) -> Value {
    let mut out = Map::new();
    let Some(first) = runs.first() else { return Value::Object(out) };
    for (key, v) in first {
        let nums: Vec<f64> = runs.iter().filter_map(|r| r.get(key).and_then(Value::as_f64)).collect();
        if nums.len() != runs.len() || !v.is_number() {
            out.insert(key.clone(), v.clone());
            continue;
        }
        let worst = matches!(key.as_str(), "lost" | "duplicates" | "client_errors" | "unmatched");
        let mut sorted = nums.clone();
        sorted.sort_by(f64::total_cmp);
        let x = if worst { sorted[sorted.len() - 1] } else { sorted[sorted.len() / 2] };
        out.insert(key.clone(), json!(x));
    }
    Value::Object(out)
}

fn print_table(report: &Value) {
    let results = report["results"].as_array().cloned().unwrap_or_default();
    let get = |m: &Value, k: &str| -> String {
        match &m[k] {
            Value::Null => "-".into(),
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or_default();
                if x.fract() == 0.0 {
                    format!("{x:.0}")
                } else {
                    format!("{x:.3}")
                }
            }
            v => v.to_string(),
        }
    };
    println!(
        "\nmedians of {} run(s) each ({} s of writes per latency/fan-out run, after {} s of warm-up)\n",
        report["runs_per_scenario"], report["write_seconds"], report["warm_up_seconds"]
    );
    println!(
        "{:<22} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>13} {:>6} {:>5} {:>5} {:>7} {:>7} {:>7} {:>9}",
        "latency / fan-out",
        "clients",
        "wrote/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "deliveries/s",
        "lost",
        "dup",
        "errs",
        "busy %",
        "server",
        "bench",
        "chg/recv"
    );
    for (s, m) in medians(&results, |s| s.contains("latency") || s.contains("fanout")) {
        println!(
            "{:<22} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>13} {:>6} {:>5} {:>5} {:>7} {:>7} {:>7} {:>9}",
            s,
            get(m, "clients"),
            get(m, "write_changes_per_s"),
            get(m, "p50_ms"),
            get(m, "p90_ms"),
            get(m, "p99_ms"),
            get(m, "p999_ms"),
            get(m, "max_ms"),
            get(m, "deliveries_per_s"),
            get(m, "lost"),
            get(m, "duplicates"),
            get(m, "client_errors"),
            get(m, "machine_busy_pct"),
            get(m, "server_cpu_cores"),
            get(m, "bench_cpu_cores"),
            get(m, "changes_per_receive")
        );
    }
    println!(
        "\n{:<22} {:>7} {:>12} {:>12} {:>10} {:>14} {:>6}",
        "idle connections", "held", "RSS before", "RSS after", "B/conn", "all reached ms", "lost"
    );
    for (s, m) in medians(&results, |s| s.starts_with("idle")) {
        println!(
            "{:<22} {:>7} {:>9} MiB {:>9} MiB {:>10} {:>14} {:>6}",
            s,
            get(m, "held"),
            get(m, "server_rss_before_mib"),
            get(m, "server_rss_after_mib"),
            get(m, "bytes_per_connection"),
            get(m, "max_ms"),
            get(m, "lost")
        );
    }
    println!(
        "\n{:<22} {:>7} {:>8} {:>13} {:>12} {:>12} {:>6} {:>5}",
        "resume (catch-up)", "clients", "behind", "caught up s", "RSS before", "RSS peak", "lost", "dup"
    );
    for (s, m) in medians(&results, |s| s.starts_with("resume")) {
        println!(
            "{:<22} {:>7} {:>8} {:>13} {:>8} MiB {:>8} MiB {:>6} {:>5}",
            s,
            get(m, "clients"),
            get(m, "behind"),
            get(m, "caught_up_secs"),
            get(m, "server_rss_before_mib"),
            get(m, "server_peak_rss_mib"),
            get(m, "lost"),
            get(m, "duplicates")
        );
    }
    println!(
        "\n{:<22} {:>8} {:>10} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "Kafka ingest", "orders", "orders/s", "dead", "e2e ev/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "lost"
    );
    for (s, m) in medians(&results, |s| s.starts_with("ingest")) {
        println!(
            "{:<22} {:>8} {:>10} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6}",
            s,
            get(m, "orders"),
            get(m, "ingest_orders_per_s"),
            get(m, "dead_letters"),
            get(m, "e2e_rate_per_s"),
            get(m, "p50_ms"),
            get(m, "p90_ms"),
            get(m, "p99_ms"),
            get(m, "max_ms"),
            get(m, "lost")
        );
    }
    println!(
        "\n{:<22} {:>6} {:>10} {:>10} {:>13} {:>8} {:>13}",
        "write cost (us/row)", "batch", "bare", "orders", "capture only", "ratio", "ratio capture"
    );
    for (s, m) in medians(&results, |s| s.starts_with("write-cost")) {
        for b in ["b1", "b100"] {
            println!(
                "{:<22} {:>6} {:>10} {:>10} {:>13} {:>8} {:>13}",
                s,
                &b[1..],
                get(m, &format!("bare_{b}_us_per_row")),
                get(m, &format!("orders_{b}_us_per_row")),
                get(m, &format!("capture_only_{b}_us_per_row")),
                get(m, &format!("ratio_orders_{b}")),
                get(m, &format!("ratio_capture_only_{b}"))
            );
        }
        println!("{:<22} fsync={} synchronous_commit={}", "", m["fsync"], m["synchronous_commit"]);
    }
    println!();
}

/// The scenarios of the report whose name `pick` accepts, with their medians.
fn medians(results: &[Value], pick: impl Fn(&str) -> bool) -> impl Iterator<Item = (&str, &Value)> {
    results.iter().filter_map(move |r| {
        let s = r["scenario"].as_str().unwrap_or_default();
        pick(s).then_some((s, &r["median"]))
    })
}

/// What the numbers were measured on.
async fn machine(admin: &str) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = mem
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| (kib / 1048576.0 * 10.0).round() / 10.0);
    let pg = match ordercast::db::connect(admin).await {
        Ok(db) => db
            .query_one("SELECT version(), current_setting('fsync'), current_setting('synchronous_commit')", &[])
            .await
            .ok()
            .map(|r| json!({"version": r.get::<_, String>(0), "fsync": r.get::<_, String>(1), "synchronous_commit": r.get::<_, String>(2)})),
        Err(_) => None,
    };
    json!({"cpu": model, "cores": cores, "memory_gib": mem_gib, "kernel": kernel.trim(), "postgresql": pg})
}

/// 19,000 client sockets need the soft open-files limit at the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

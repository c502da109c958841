//! Faults survived: PostgreSQL restarted mid-stream, the server killed
//! (SIGKILL) or stopped (SIGTERM). Each test is bounded in time and talks to
//! 127.0.0.1 only. (The LISTEN backend killed repeatedly: realtime.rs.)

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ordercast::db::embedded::EmbeddedPostgres;
use serde_json::Value;

use crate::helpers::{create_database, free_port, spawn_app_on, Server, WsClient, WsEvent};

const WAIT: Duration = Duration::from_secs(20);

/// A new directory under the temporary one that the postgres user can reach.
fn embedded_dir(name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("ordercast-{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// `EmbeddedPostgres::start` in `dir`, off the runtime's threads.
async fn start_embedded(dir: &std::path::Path) -> anyhow::Result<EmbeddedPostgres> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir, "-c fsync=off")).await.unwrap()
}

async fn insert(db: &tokio_postgres::Client, name: &str) {
    db.execute("INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ($1, 'Axle', 1, 1)", &[&name])
        .await
        .unwrap();
}

/// A real server on a fresh database, with a WebSocket client that has
/// received one change (at position `last`).
struct Running {
    db_url: String,
    port: u16,
    server: Server,
    db: tokio_postgres::Client,
    ws: WsClient,
    last: i64,
}

async fn running_with_a_client() -> Running {
    let (db_url, _) = create_database().await;
    let port = free_port();
    let server = Server::start(&db_url, port).await;
    let db = ordercast::db::connect(&db_url).await.unwrap();
    let mut ws = WsClient::connect(&format!("ws://127.0.0.1:{port}/ws")).await;
    ws.ready().await;
    insert(&db, "before").await;
    let last = ws.changes(1, WAIT).await[0]["seq"].as_i64().unwrap();
    Running { db_url, port, server, db, ws, last }
}

fn names(changes: &[Value]) -> Vec<String> {
    changes.iter().map(|c| c["order"]["customer_name"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_then_restart_clients_resume_without_loss() {
    // The first client stays connected through the kill, as a browser would.
    let Running { db_url, port, mut server, db, ws: _first_client, last } = running_with_a_client().await;
    server.signal(nix::sys::signal::Signal::SIGKILL);
    server.wait_exit().await;
    for i in 0..3 {
        insert(&db, &format!("during {i}")).await;
    }
    let _server = Server::start(&db_url, port).await;
    let mut ws = WsClient::connect(&format!("ws://127.0.0.1:{port}/ws?since={last}")).await;
    ws.ready().await;
    assert_eq!(names(&ws.changes(3, WAIT).await), ["during 0", "during 1", "during 2"]);
    ws.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sessions_with_their_resume_position_and_exits_cleanly() {
    let Running { port, mut server, mut ws, last, .. } = running_with_a_client().await;
    server.signal(nix::sys::signal::Signal::SIGTERM);
    match ws.next_event(WAIT).await {
        WsEvent::Closed(Some((1001, reason))) => assert!(reason.contains(&format!("since={last}")), "{reason}"),
        other => panic!("expected close 1001, got {other:?}"),
    }
    assert!(server.wait_exit().await.success());
    // It stopped accepting.
    assert!(reqwest::get(format!("http://127.0.0.1:{port}/api/health")).await.is_err());
}

/// What a connection's backend does about a dead client: keepalive idle,
/// interval and count, and the user timeout.
async fn dead_client_settings(client: &tokio_postgres::Client) -> Vec<String> {
    let mut got = Vec::new();
    for name in ["tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout"] {
        got.push(client.query_one(&format!("SHOW {name}"), &[]).await.unwrap().get::<_, String>(0));
    }
    got
}

/// Every connection tells its backend to notice a dead client within
/// seconds. PostgreSQL's defaults leave it to the kernel: a dead host's
/// session lingers about two hours with its locks, so no standby relay or
/// processor takes over. Checked on the REST pool, a plain connection and
/// the relay's and processor's dedicated connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_asks_its_backend_to_notice_a_dead_client_within_seconds() {
    let app = crate::helpers::spawn_app().await;
    let want = ["10", "5", "3", "30000"];
    let pooled = app.state.pool.get().await.unwrap();
    assert_eq!(dead_client_settings(&pooled).await, want, "the pool");
    let plain = ordercast::db::connect(&app.db_url).await.unwrap();
    assert_eq!(dead_client_settings(&plain).await, want, "a plain connection");
    let dedicated = ordercast::workflow::Dedicated::open(&app.db_url, "test").await.unwrap();
    assert_eq!(dead_client_settings(&dedicated.client).await, want, "a dedicated connection");
}

/// The migration lock, as another replica migrating holds it.
const LOCK_MIGRATIONS: &str = "SELECT pg_advisory_lock(x'6f72646300000001'::bigint)";
const UNLOCK_MIGRATIONS: &str = "SELECT pg_advisory_unlock(x'6f72646300000001'::bigint)";

/// Until a server starting waits for the migration lock.
async fn until_a_migration_waits(db: &tokio_postgres::Client) {
    // The migrations' lock (a bigint key: objsubid 1) in this database:
    // other tests' commits wait for the sequencer's advisory lock too.
    let waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND classid = 1869767779 AND objid = 1 AND objsubid = 1";
    crate::helpers::until_count(db, waiting, WAIT, |n| n == 1).await;
}

/// No session but `db`'s is open in its database: a server that did not
/// start left none behind.
async fn assert_no_session_but(db: &tokio_postgres::Client) {
    // Client sessions only (an autovacuum worker may visit the database),
    // waited for while closing ones go (a loaded machine takes a while).
    let others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                  AND pid <> pg_backend_pid() AND backend_type = 'client backend'";
    crate::helpers::until_count(db, others, WAIT, |n| n == 0).await;
}

/// A server whose port is taken does not start: it fails before it has
/// started anything. Before, it bound last, after the listener (and any
/// Kafka ingest or processor) had started, and left them running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_fails_the_start_before_anything_runs() {
    let (db_url, _) = create_database().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut settings = ordercast::config::Settings::for_database(&db_url);
    settings.bind = taken.local_addr().unwrap();
    let e = ordercast::startup::Application::build(settings, &db_url).await.err().expect("the port is taken");
    assert!(format!("{e:#}").contains("Failed to bind"), "{e:#}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let db = ordercast::db::connect(&db_url).await.unwrap();
    assert_no_session_but(&db).await;
}

/// A setting that cannot work stops the start before the migrations run: a
/// mistyped one on a new version must not migrate a database the old
/// instances still use. Before, the workflow's settings and the librdkafka
/// properties were checked only after the migrations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_that_cannot_work_fails_the_start_before_the_migrations() {
    let (db_url, _) = create_database().await;
    let mut rate = ordercast::config::Settings::for_database(&db_url);
    rate.workflow.payment_failure_rate = 2.0;
    let mut property = ordercast::config::Settings::for_database(&db_url);
    property.kafka.brokers = Some("127.0.0.1:9".into());
    property.kafka.properties = Some("fetch.wait.max.msec=10".into());
    for (settings, said) in [(rate, "ORDERCAST_PAYMENT_FAILURE_RATE"), (property, "fetch.wait.max.msec")] {
        let e = ordercast::startup::Application::build(settings, &db_url).await.err().expect("refused");
        assert!(format!("{e:#}").contains(said), "{e:#}");
    }
    let db = ordercast::db::connect(&db_url).await.unwrap();
    let migrated: bool =
        db.query_one("SELECT to_regclass('refinery_schema_history') IS NOT NULL", &[]).await.unwrap().get(0);
    assert!(!migrated, "no migration ran");
}

/// The database's `lock_timeout` and `statement_timeout` do not apply to the
/// migrations: a replica starting while another migrates waits for it
/// (before, it failed at once on the lock). And migrations a newer version
/// ran do not stop this one from starting, as a rolling upgrade needs
/// (before: "migration V999__future is missing from the filesystem").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_wait_past_the_databases_timeouts_and_run_on_a_newer_schema() {
    let (db_url, name) = create_database().await;
    let admin = ordercast::db::connect(&crate::helpers::admin_url()).await.unwrap();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET lock_timeout = '200ms'; ALTER DATABASE {name} SET statement_timeout = '200ms'"
        ))
        .await
        .unwrap();
    let other = ordercast::db::connect(&db_url).await.unwrap();
    other.execute(LOCK_MIGRATIONS, &[]).await.unwrap();
    let url = db_url.clone();
    let migrating = tokio::spawn(async move { ordercast::db::migrate(&url).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    other.execute(UNLOCK_MIGRATIONS, &[]).await.unwrap();
    migrating.await.unwrap().expect("migrated once the other replica was done");
    other
        .batch_execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
             VALUES (999, 'future', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), '0')",
        )
        .await
        .unwrap();
    ordercast::db::migrate(&db_url).await.expect("runs on a newer version's schema");
    // One of ours not applied, below a newer one: refused, not skipped.
    other.batch_execute("DELETE FROM refinery_schema_history WHERE version = 25").await.unwrap();
    let e = ordercast::db::migrate(&db_url).await.expect_err("a migration of ours was skipped");
    assert!(format!("{e:#}").contains("V25__outbox_rewind_due was not applied"), "{e:#}");
}

/// While its migrations wait (for another replica's, say), a starting
/// server has its port but takes no connection: a client or a load
/// balancer's check is refused at once, not left waiting in the backlog for
/// as long as the migrations take. Before, the port listened from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_migrations_wait_takes_no_connection_yet() {
    let (db_url, _) = create_database().await;
    let other = ordercast::db::connect(&db_url).await.unwrap();
    other.execute(LOCK_MIGRATIONS, &[]).await.unwrap();
    let port = free_port();
    let mut settings = ordercast::config::Settings::for_database(&db_url);
    settings.bind = format!("127.0.0.1:{port}").parse().unwrap();
    let url = db_url.clone();
    let build = tokio::spawn(async move { ordercast::startup::Application::build(settings, &url).await });
    until_a_migration_waits(&other).await;
    let e = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect_err("a connection was taken");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    other.execute(UNLOCK_MIGRATIONS, &[]).await.unwrap();
    let app = build.await.unwrap().expect("built once the migrations ran");
    let handle = app.handle();
    let server = tokio::spawn(app.run_until_stopped());
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("listening once built");
    handle.stop().await;
    server.await.unwrap().unwrap();
}

/// Two servers started together on one port: both bind it (a port is
/// shared until one listens), and the one that listens second fails before
/// it has started anything, with an error naming the address. Before, it
/// failed only after its listener (and any Kafka ingest or processor) had
/// started, with a bare "Address in use".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_servers_started_together_on_one_port_the_second_fails_before_anything_runs() {
    let (db_url, _) = create_database().await;
    // The first server: bound, not yet listening.
    let first = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    first.set_reuse_address(true).unwrap();
    first.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    let addr = first.local_addr().unwrap().as_socket().unwrap();
    // The second binds too, and waits for the first's migrations.
    let other = ordercast::db::connect(&db_url).await.unwrap();
    other.execute(LOCK_MIGRATIONS, &[]).await.unwrap();
    let mut settings = ordercast::config::Settings::for_database(&db_url);
    settings.bind = addr;
    let url = db_url.clone();
    let build = tokio::spawn(async move { ordercast::startup::Application::build(settings, &url).await });
    until_a_migration_waits(&other).await;
    // The first listens, then its migrations end.
    first.listen(16).unwrap();
    other.execute(UNLOCK_MIGRATIONS, &[]).await.unwrap();
    let e = build.await.unwrap().err().expect("the port is the first's");
    assert!(format!("{e:#}").contains(&format!("Failed to bind {addr}")), "{e:#}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_no_session_but(&other).await;
}

/// The pids of the initdb processes working in `dir`.
fn initdb_in(dir: &std::path::Path) -> Vec<i32> {
    let dir = dir.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.split('\0').next().is_some_and(|prog| prog.ends_with("/initdb")) && cmdline.contains(&dir)
        })
        .collect()
}

/// An initdb cut short (killed here once it has written `PG_VERSION`, as a
/// power loss would) leaves no data directory that looks made: the next
/// start makes the cluster again and runs. Before, the directory had
/// `PG_VERSION`, so every later start took it as made and failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initdb_cut_short_is_done_again_at_the_next_start() {
    let dir = embedded_dir("initdb-cut");
    let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = {
        let (dir, started) = (dir.clone(), started.clone());
        async move {
            let r = start_embedded(&dir).await;
            started.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        }
    };
    let killer = tokio::task::spawn_blocking({
        let (dir, started) = (dir.clone(), started.clone());
        move || {
            // Each initdb try (the C.UTF-8 one, then the environment's
            // locale) is killed once it has written PG_VERSION, until the
            // start gives up.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut killed = std::collections::HashSet::new();
            while !started.load(std::sync::atomic::Ordering::SeqCst) && std::time::Instant::now() < deadline {
                let written = ["pg", "pg.initdb-partial"].iter().any(|d| dir.join(d).join("PG_VERSION").exists());
                for pid in initdb_in(&dir) {
                    if written && killed.insert(pid) {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            killed.len()
        }
    });
    let first = start.await;
    let killed = killer.await.unwrap();
    assert!(killed >= 1, "no initdb was killed");
    assert!(first.is_err(), "the start whose initdb was killed failed");
    let pg = start_embedded(&dir).await.expect("the next start makes the cluster again");
    let db = ordercast::db::connect(&pg.url("postgres")).await.expect("and its server runs");
    db.query_one("SELECT 1", &[]).await.unwrap();
    drop(db);
    drop(pg);
    std::fs::remove_dir_all(&dir).ok();
}

/// A second ordercast started on the same data directory (a `migrate` in
/// another terminal, say) is refused, and leaves the first one's server
/// running. Before, it stopped that server to start its own on another port,
/// and the first instance lost its database. The directory's path has a
/// space and is too deep for a Unix socket (over 107 bytes), which failed
/// the start before too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_embedded_start_on_the_same_directory_is_refused_and_the_first_keeps_its_server() {
    let dir = std::env::temp_dir()
        .join(format!("ordercast lock {}", uuid::Uuid::new_v4().simple()))
        .join("a-directory-deep-enough-that-a-unix-socket-path-in-it-would-be-too-long-for-postgresql");
    std::fs::create_dir_all(&dir).unwrap();
    let start =
        |dir: std::path::PathBuf| tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir, "-c fsync=off"));
    let first = start(dir.clone()).await.unwrap().expect("the first start");
    let second = start(dir.clone()).await.unwrap();
    let e = format!("{:#}", second.err().expect("the second start is refused"));
    assert!(e.contains("in use by another ordercast") && e.contains(&std::process::id().to_string()), "{e}");
    let db = ordercast::db::connect(&first.url("postgres")).await.expect("the first server still runs");
    db.query_one("SELECT 1", &[]).await.unwrap();
    drop(db);
    drop(first);
    // Once the first is gone, the directory can be used again.
    let again = start(dir.clone()).await.unwrap().expect("a start after the first stopped");
    drop(again);
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

/// The embedded PostgreSQL asks every connection for the superuser's
/// password, kept in `<dir>/pgpass` for its owner alone; an instance made
/// with `trust` before gets one at its next start. Before, any user of the
/// machine could connect to 127.0.0.1 as the superuser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_postgresql_asks_for_a_password_kept_in_the_data_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = embedded_dir("auth");
    let refused_without_password = |pg: &EmbeddedPostgres| {
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port());
        async move {
            let e = ordercast::db::connect(&url).await.expect_err("a connection without the password is refused");
            assert!(format!("{e:#}").contains("password"), "{e:#}");
        }
    };
    let pg = start_embedded(&dir).await.unwrap();
    refused_without_password(&pg).await;
    let db = ordercast::db::connect(&pg.url("postgres")).await.expect("with the password");
    db.query_one("SELECT 1", &[]).await.unwrap();
    drop(db);
    let pgpass = dir.join("pgpass");
    assert_eq!(std::fs::metadata(&pgpass).unwrap().permissions().mode() & 0o777, 0o600);
    let kept = std::fs::read_to_string(&pgpass).unwrap();
    assert!(pg.psql_command("x").starts_with(&format!("PGPASSFILE={} psql ", pgpass.display())));
    drop(pg);

    // The same password at the next start.
    let pg = start_embedded(&dir).await.unwrap();
    refused_without_password(&pg).await;
    assert_eq!(std::fs::read_to_string(&pgpass).unwrap(), kept);
    ordercast::db::connect(&pg.url("postgres")).await.expect("with the password");
    drop(pg);

    // An instance as ordercast made it before: trust, no password file.
    let hba = ["pg", "pg_hba.conf"].iter().fold(dir.clone(), |p, c| p.join(c));
    std::fs::write(&hba, "host all all 127.0.0.1/32 trust\n").unwrap();
    std::fs::remove_file(&pgpass).unwrap();
    let pg = start_embedded(&dir).await.unwrap();
    refused_without_password(&pg).await;
    assert_ne!(std::fs::read_to_string(&pgpass).unwrap(), kept, "a new password");
    ordercast::db::connect(&pg.url("postgres")).await.expect("with the new password");
    drop(pg);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `postmaster.pid` left by a server that is gone (a host restarted), whose
/// pid is now another process's of the same user: that process is left
/// alone and the server starts. Before, `pg_ctl stop` signalled it (here a
/// `sleep`, killed), and PostgreSQL refused to start while it lived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pid_file_naming_another_process_is_removed_and_that_process_left_alone() {
    use std::os::unix::process::CommandExt;
    let dir = embedded_dir("stale");
    drop(start_embedded(&dir).await.unwrap());
    // A process of the user PostgreSQL runs as.
    let mut sleep = std::process::Command::new("sleep");
    sleep.arg("120");
    if nix::unistd::geteuid().is_root() {
        let pg = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        sleep.uid(pg.uid.as_raw()).gid(pg.gid.as_raw());
    }
    let mut sleep = sleep.spawn().unwrap();
    let data = dir.join("pg");
    std::fs::write(data.join("postmaster.pid"), format!("{}\n{}\n", sleep.id(), data.display())).unwrap();
    let pg = start_embedded(&dir).await.expect("the server starts");
    ordercast::db::connect(&pg.url("postgres")).await.expect("and takes connections");
    assert!(sleep.try_wait().unwrap().is_none(), "the process the stale file named was signalled");
    drop(pg);
    let _ = sleep.kill();
    let _ = sleep.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stop signal at any time stops the embedded PostgreSQL with ordercast:
/// SIGHUP (the terminal closed), and SIGTERM as soon as that PostgreSQL is
/// up (the migrations and the start still running on a first start). It
/// runs in a session of its own: before, SIGHUP (never handled) and a
/// signal before the server listened killed ordercast and left it running.
#[test]
fn a_stop_signal_at_any_time_stops_the_embedded_postgresql_too() {
    use std::process::{Command, Stdio};
    /// Stops a server left running (a failed run), with its directory.
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let data = self.0.join("pg");
            if data.join("postmaster.pid").exists() {
                let pg_ctl = ordercast::db::embedded::find_bin_dir().unwrap().join("pg_ctl");
                let mut stop = Command::new("runuser");
                stop.args(["-u", "postgres", "--"]).arg(pg_ctl).arg("-D").arg(&data).args(["-m", "immediate", "stop"]);
                let _ = stop.stdout(Stdio::null()).stderr(Stdio::null()).status();
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    for signal in [nix::sys::signal::Signal::SIGHUP, nix::sys::signal::Signal::SIGTERM] {
        let dir = embedded_dir("signal");
        let _cleanup = Cleanup(dir.clone());
        let (child, _) = ordercast_on(&dir, &[], "embedded PostgreSQL is up");
        assert!(stopped_by(child, &dir, signal).success(), "{signal}");
    }
    // A signal while the embedded PostgreSQL is still starting (a long
    // replay of its log after a crash; here a standby that stays starting).
    let dir = embedded_dir("signal-starting");
    let _cleanup = Cleanup(dir.clone());
    let data = tokio::runtime::Runtime::new().unwrap().block_on(a_cluster_that_stays_starting(&dir));
    let (child, lines) = ordercast_on(&dir, &[], "is still starting");
    let pid = postmaster_state(&data).expect("a postmaster.pid").0;
    assert!(stopped_by(child, &dir, nix::sys::signal::Signal::SIGTERM).success());
    assert!(gone(pid), "the PostgreSQL that was starting still runs");
    let said: Vec<String> = lines.iter().collect();
    assert!(said.iter().any(|l| l.contains("stopped before the embedded PostgreSQL was up")), "{said:?}");
    // `ordercast migrate` stopped so fails, so that `migrate && deploy`
    // does not go on.
    let (child, _) = ordercast_on(&dir, &["migrate"], "is still starting");
    let status = stopped_by(child, &dir, nix::sys::signal::Signal::SIGTERM);
    assert!(!status.success(), "a migrate stopped before it ran exited with {status}");
}

/// `ordercast` on `dir`'s embedded PostgreSQL, once its log has said `line`;
/// the rest of its log follows on the receiver.
fn ordercast_on(
    dir: &std::path::Path,
    args: &[&str],
    line: &str,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_ordercast"))
        .args(args)
        .args(["--bind", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(dir)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ordercast");
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let said = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        if said.unwrap_or_else(|_| panic!("ordercast did not log {line:?}")).contains(line) {
            break;
        }
    }
    (child, rx)
}

/// Sends `signal` to `child` and checks that it exits, leaving no
/// PostgreSQL running on `dir`; how it exited.
fn stopped_by(
    mut child: std::process::Child,
    dir: &std::path::Path,
    signal: nix::sys::signal::Signal,
) -> std::process::ExitStatus {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "ordercast did not stop on {signal}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !dir.join("pg").join("postmaster.pid").exists(),
        "{signal}: ordercast exited ({status}) and left its PostgreSQL running"
    );
    status
}

/// Makes the cluster in `dir` (started once, stopped) one that stays
/// starting for a minute or more, as a server replaying a long log after a
/// crash does: a recovery from an archive whose every fetch takes 20 s, with
/// no connections taken before it is done.
async fn a_cluster_that_stays_starting(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    drop(start_embedded(dir).await.unwrap());
    let data = dir.join("pg");
    std::fs::write(data.join("recovery.signal"), "").unwrap();
    let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.auto.conf")).unwrap();
    writeln!(conf, "hot_standby = off\nrestore_command = 'sleep 20; false'").unwrap();
    data
}

/// The pid and state (the eighth line) in `data`'s postmaster.pid.
fn postmaster_state(data: &std::path::Path) -> Option<(i32, String)> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    Some((lines.first()?.trim().parse().ok()?, lines.get(7)?.trim().to_string()))
}

/// Whether process `pid` is gone (reaped, or never a postgres).
fn gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map_or(true, |c| c.trim() != "postgres")
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// A start is waited for while PostgreSQL is starting, however long (a
/// replay of its log after a crash), and given up when asked, with that
/// PostgreSQL stopped. Before, `pg_ctl -w -t 60` gave up after 60 s and left
/// the server running, and nothing could cut the wait short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_stays_starting_is_given_up_when_asked_and_its_server_stopped() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = embedded_dir("starting");
    let data = a_cluster_that_stays_starting(&dir).await;
    let cancel = std::sync::Arc::new(AtomicBool::new(false));
    let start = {
        let (dir, cancel) = (dir.clone(), cancel.clone());
        tokio::task::spawn_blocking(move || EmbeddedPostgres::start_cancellable(&dir, "-c fsync=off", cancel))
    };
    let deadline = Instant::now() + WAIT;
    let pid = loop {
        match postmaster_state(&data) {
            // "standby" once it replays its log.
            Some((pid, state)) if state != "ready" => break pid,
            _ => {
                assert!(!start.is_finished(), "the start ended: {:?}", start.await.unwrap().err());
                assert!(Instant::now() < deadline, "PostgreSQL never said it was starting");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Still waited for a while later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!start.is_finished(), "the start gave up by itself");
    cancel.store(true, Ordering::Release);
    let e = tokio::time::timeout(WAIT, start).await.expect("the start gives up").unwrap().err().expect("an error");
    assert!(e.is::<ordercast::db::embedded::Cancelled>(), "{e:#}");
    assert!(gone(pid), "the PostgreSQL that was starting still runs");
    assert!(!data.join("postmaster.pid").exists());

    // A cluster made a standby takes no writes: said, not waited for.
    std::fs::rename(data.join("recovery.signal"), data.join("standby.signal")).unwrap();
    std::fs::write(data.join("postgresql.auto.conf"), "").unwrap();
    let e = tokio::time::timeout(WAIT, start_embedded(&dir)).await.expect("not waited for");
    let e = format!("{:#}", e.err().expect("a standby is refused"));
    assert!(e.contains("is a standby"), "{e}");
    std::fs::remove_file(data.join("standby.signal")).unwrap();
    assert!(!data.join("postmaster.pid").exists(), "the standby was left running");

    // A log that is a link (put there by whoever acts as the postgres user)
    // is not followed: the file it names is neither written nor given away.
    {
        use std::os::unix::fs::MetadataExt;
        let victim = dir.join("victim");
        std::fs::write(&victim, "kept\n").unwrap();
        let log = data.join("postgres.log");
        std::fs::rename(&log, dir.join("postgres.log.kept")).unwrap();
        std::os::unix::fs::symlink(&victim, &log).unwrap();
        let e = start_embedded(&dir).await.err().expect("a start whose log is a link fails");
        assert!(format!("{e:#}").contains("postgres.log"), "{e:#}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "kept\n");
        assert_eq!(std::fs::metadata(&victim).unwrap().uid(), nix::unistd::geteuid().as_raw());
        std::fs::remove_file(&log).unwrap();
    }

    // A server that exits at its start is reported with its reason, at once.
    let e = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir, "-c no_such_setting=1")).await.unwrap()
    };
    let e = format!("{:#}", e.err().expect("a setting PostgreSQL refuses fails the start"));
    assert!(e.contains("exited") && e.contains("no_such_setting"), "{e}");
    // And the cluster starts as usual once it is a primary.
    let pg = start_embedded(&dir).await.expect("the start");
    ordercast::db::connect(&pg.url("postgres")).await.expect("takes connections");
    drop(pg);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_stream_is_survived_without_loss() {
    // A private PostgreSQL, so restarting it disturbs no other test.
    let dir = std::env::temp_dir().join(format!("ordercast-fault-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    nix::unistd::chown(&dir, None, None).ok();
    let dir2 = dir.clone();
    let pg =
        tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir2, "-c fsync=off")).await.unwrap().unwrap();
    pg.ensure_database("faults").await.unwrap();
    let db_url = pg.url("faults");
    let pg = std::sync::Arc::new(std::sync::Mutex::new(pg));
    let app = spawn_app_on(&db_url, |s| s.db_timeout_secs = 1).await;
    let mut ws = app.ws("").await;
    ws.ready().await;

    // A writer that keeps going through the outage (reconnecting as needed).
    let writer = {
        let db_url = db_url.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(12);
            let mut i = 0;
            let mut db = None;
            while Instant::now() < deadline {
                if db.is_none() {
                    db = ordercast::db::connect(&db_url).await.ok();
                }
                if let Some(c) = &db {
                    let r = c
                        .execute(
                            "INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ($1, 'Axle', 1, 1)",
                            &[&format!("w{i}")],
                        )
                        .await;
                    match r {
                        Ok(_) => i += 1,
                        Err(_) => db = None,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.lock().unwrap().stop()).await.unwrap().unwrap();
    }
    // While the database is down, REST answers 503 promptly instead of hanging.
    let started = Instant::now();
    let r = app
        .post_order(&serde_json::json!({"customer_name": "x", "product": "y", "quantity": 1, "unit_price": 1}))
        .await;
    assert_eq!(r.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    let (status, _) = app.get_json("/api/health").await;
    assert_eq!(status, 503);
    // The liveness check says the server answers: restarting it would not
    // bring the database back.
    assert_eq!(app.get_json("/api/health/live").await, (200, serde_json::json!({"status": "ok"})));
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.lock().unwrap().restart()).await.unwrap().unwrap();
    }
    writer.await.unwrap();

    // The truth is what committed: every committed row arrives exactly once, in position order.
    let db = ordercast::db::connect(&db_url).await.unwrap();
    let committed: Vec<String> =
        db.query("SELECT customer_name FROM orders ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert!(committed.len() > 20, "the writer made progress: {}", committed.len());
    let got = ws.changes(committed.len(), Duration::from_secs(30)).await;
    let seqs: Vec<i64> = got.iter().map(|c| c["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let got: HashSet<String> = names(&got).into_iter().collect();
    assert_eq!(got, committed.into_iter().collect::<HashSet<_>>());
    ws.expect_silence(Duration::from_millis(500)).await;
    crate::helpers::eventually(Duration::from_secs(10), || async {
        (app.get_json("/api/health").await.0 == 200).then_some(())
    })
    .await;
    drop(app);
    let _ = tokio::task::spawn_blocking(move || {
        let _ = pg.lock().unwrap().stop();
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

/// A graceful stop with no stream open and no Kafka ingest or processor:
/// nothing subscribes to the shutdown signal, and the server must still know
/// it is stopping (health answers 503 `shutting_down` to a load balancer's
/// kept-alive connection, new streams are refused with their retry). Before,
/// the flag was sent to no receiver and so never set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_with_no_stream_open_still_says_shutting_down() {
    let mut app = crate::helpers::spawn_app().await;
    assert!(!*app.state.shutdown.borrow());
    app.handle.stop().await;
    assert!(*app.state.shutdown.borrow(), "the server does not know it is stopping");
    app.stop().await;
}

/// Sends a request on a new connection and returns its status line and
/// headers, and its body.
async fn raw_request(port: u16, request: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // The head, and as much of the body as comes within a second (an event
    // stream does not end by itself).
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = tcp.read(&mut chunk).await {
            answer.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_asked_for_while_the_server_shuts_down_get_503_shutting_down_or_a_retry() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (db_url, _) = create_database().await;
    let port = free_port();
    let mut server = Server::start(&db_url, port).await;
    // A WebSocket client that will not answer the server's close: its
    // session lingers (up to a second), and the server accepts connections
    // until its sessions have ended.
    let mut holder = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    holder
        .write_all(
            format!(
                "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    // Until the close frame, 1001 (0x03e9), arrives.
    while !got.windows(4).any(|w| w[0] == 0x88 && w[2..] == [0x03, 0xe9]) {
        let n = tokio::time::timeout(WAIT, holder.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "the holder's connection ended: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
        if got.windows(7).any(|w| w == b"\"ready\"") {
            server.signal(nix::sys::signal::Signal::SIGTERM);
            got.clear();
        }
    }
    // The shutdown has begun (the holder has its 1001 close). Streams asked
    // for now are refused, saying why, rather than opened to be closed.
    // (Asked for at once: the server takes connections only while the
    // holder's session lingers.)
    let host = format!("Host: 127.0.0.1:{port}\r\n");
    let events = format!("GET /api/events HTTP/1.1\r\n{host}Connection: close\r\n\r\n");
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\n{host}Connection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let health = format!("GET /api/health HTTP/1.1\r\n{host}Connection: close\r\n\r\n");
    // EventSource asks with `Accept: text/event-stream` (and gives up for
    // good on any status but 200).
    let event_source = format!(
        "GET /api/events HTTP/1.1\r\n{host}Accept: text/event-stream\r\nLast-Event-ID: 0\r\nConnection: close\r\n\r\n"
    );
    let ((head, body), ws, health, (es_head, es_body)) = tokio::join!(
        raw_request(port, &events),
        raw_request(port, &upgrade),
        raw_request(port, &health),
        raw_request(port, &event_source)
    );
    assert!(health.0.starts_with("HTTP/1.1 503") && health.1.contains(r#""status":"shutting_down""#), "{health:?}");
    for (head, body) in [(head, body), ws] {
        assert!(head.starts_with("HTTP/1.1 503"), "{head}\n\n{body}");
        assert!(head.to_ascii_lowercase().contains("\r\nretry-after: "), "{head}");
        assert!(body.contains(r#""code":"shutting_down""#), "{head}\n\n{body}");
    }
    // It gets a stream that tells it to try again, and why.
    assert!(es_head.starts_with("HTTP/1.1 200"), "{es_head}\n\n{es_body}");
    assert!(es_head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{es_head}");
    assert!(es_body.starts_with("retry: 1000\n\nevent: error\ndata: {"), "{es_body}");
    assert!(es_body.contains(r#""code":"shutting_down""#) && !es_body.contains("event: ready"), "{es_body}");
    drop(holder);
    assert!(server.wait_exit().await.success());
}

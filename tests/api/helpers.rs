//! Test harness in the zero-to-production style: every test gets a fresh
//! database (dropped afterwards) and the real application on port 0, driven
//! over real HTTP, WebSocket and SSE.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use ordercast::config::Settings;
use ordercast::startup::{AppHandle, Application};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A row of `/proc/net/tcp` (IPv4 sockets), the fields the tests read.
#[allow(dead_code)] // `state` and `inode`: read by the ingest tests only
pub struct TcpSocket {
    pub local_port: u16,
    pub remote_port: u16,
    /// The state as the kernel numbers it (`0x0A`: listening).
    pub state: u8,
    pub tx_queue: usize,
    pub rx_queue: usize,
    pub inode: u64,
}

/// Every IPv4 TCP socket of this machine's network namespace.
pub fn tcp_sockets() -> Vec<TcpSocket> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let hex = |s: &str| usize::from_str_radix(s, 16).expect("a hexadecimal field of /proc/net/tcp");
    let port = |addr: &str| hex(addr.rsplit(':').next().unwrap()) as u16;
    table
        .lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (tx, rx) = f[4].split_once(':').unwrap();
            TcpSocket {
                local_port: port(f[1]),
                remote_port: port(f[2]),
                state: hex(f[3]) as u8,
                tx_queue: hex(tx),
                rx_queue: hex(rx),
                inode: f[9].parse().expect("an inode"),
            }
        })
        .collect()
}

/// The admin URL of the PostgreSQL server tests create their databases on.
/// `scripts/test` starts a private server and sets it.
pub fn admin_url() -> String {
    std::env::var("ORDERCAST_TEST_DATABASE_URL").expect(
        "ORDERCAST_TEST_DATABASE_URL is not set: run the tests with scripts/test (it starts a private PostgreSQL)",
    )
}

pub fn database_url(admin: &str, name: &str) -> String {
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
    format!("{base}/{name}")
}

pub struct TestApp {
    pub address: String,
    pub port: u16,
    pub db_url: String,
    pub db_name: String,
    pub http: reqwest::Client,
    pub handle: AppHandle,
    pub state: std::sync::Arc<ordercast::startup::AppState>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    owns_db: bool,
}

pub async fn create_database() -> (String, String) {
    create_database_with("").await
}

/// A fresh database created with `options` (`ENCODING 'LATIN1' ...`).
pub async fn create_database_with(options: &str) -> (String, String) {
    let name = format!("oc_test_{}", uuid::Uuid::new_v4().simple());
    let admin = ordercast::db::connect(&admin_url()).await.expect("connect to the test server");
    admin.batch_execute(&format!("CREATE DATABASE {name} {options}")).await.expect("create test database");
    (database_url(&admin_url(), &name), name)
}

/// An app on a fresh database created with `options`.
pub async fn spawn_app_in(options: &str) -> TestApp {
    let (db_url, db_name) = create_database_with(options).await;
    let mut app = spawn_app_on(&db_url, |_| {}).await;
    app.db_name = db_name;
    app.owns_db = true;
    app
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let (db_url, db_name) = create_database().await;
    let mut app = spawn_app_on(&db_url, configure).await;
    app.db_name = db_name;
    app.owns_db = true;
    app
}

/// A second (or restarted) instance on an existing database.
pub async fn spawn_app_on(db_url: &str, configure: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = Settings::for_database(db_url);
    settings.workers = 2;
    settings.maintenance_secs = 3600;
    configure(&mut settings);
    let app = Application::build(settings, db_url).await.expect("build the application");
    let port = app.port();
    let handle = app.handle();
    let state = app.state();
    let server = tokio::spawn(app.run_until_stopped());
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        db_url: db_url.to_string(),
        db_name: String::new(),
        http: reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap(),
        handle,
        state,
        server: Some(server),
        owns_db: false,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn post_order(&self, body: &Value) -> reqwest::Response {
        self.http.post(self.url("/api/orders")).json(body).send().await.expect("POST /api/orders")
    }

    /// Creates an order through the API and returns it.
    pub async fn create_order(&self, customer: &str) -> Value {
        let r = self
            .post_order(&json!({"customer_name": customer, "product": "Widget", "quantity": 2, "unit_price": 9.5}))
            .await;
        assert_eq!(r.status(), 201);
        r.json().await.unwrap()
    }

    pub async fn patch(&self, id: i64, body: &Value) -> reqwest::Response {
        self.http.patch(self.url(&format!("/api/orders/{id}"))).json(body).send().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the hub has fanned out everything committed so far, so a
    /// client that connects now starts after those changes.
    pub async fn settled(&self) {
        let db = self.sql().await;
        let head: i64 = db.query_one("SELECT change_head()", &[]).await.unwrap().get(0);
        let hub = self.state.hub.clone();
        eventually(Duration::from_secs(10), || {
            let hub = hub.clone();
            async move { (hub.position() >= head).then_some(()) }
        })
        .await;
    }

    /// A DBA's plain SQL connection.
    pub async fn sql(&self) -> tokio_postgres::Client {
        ordercast::db::connect(&self.db_url).await.expect("connect as a DBA")
    }

    pub async fn ws(&self, query: &str) -> WsClient {
        WsClient::connect(&format!("ws://127.0.0.1:{}/ws{}", self.port, query)).await
    }

    pub async fn sse(&self, path_and_query: &str, last_event_id: Option<&str>) -> SseClient {
        SseClient::connect(&self.http, &self.url(path_and_query), last_event_id).await
    }

    /// Graceful stop (as on SIGTERM).
    pub async fn stop(&mut self) {
        self.handle.stop().await;
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
        if !self.owns_db {
            return;
        }
        let name = self.db_name.clone();
        // Drop the database from a thread with its own runtime: Drop cannot await.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(admin) = ordercast::db::connect(&admin_url()).await {
                    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                }
            });
        })
        .join();
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct WsClient {
    pub ws: WsStream,
}

/// What the next frame was.
#[derive(Debug)]
pub enum WsEvent {
    Json(Value),
    Closed(Option<(u16, String)>),
}

impl WsClient {
    pub async fn connect(url: &str) -> WsClient {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
        WsClient { ws }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string())).await.unwrap();
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::Text(s.to_string())).await.unwrap();
    }

    /// The next JSON message or close, skipping pings; panics after `wait`.
    pub async fn next_event(&mut self, wait: Duration) -> WsEvent {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out waiting for a WebSocket message");
            match msg {
                Some(Ok(Message::Text(t))) => return WsEvent::Json(serde_json::from_str(&t).expect("JSON message")),
                Some(Ok(Message::Close(frame))) => {
                    return WsEvent::Closed(frame.map(|f| (u16::from(f.code), f.reason.to_string())))
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return WsEvent::Closed(None),
            }
        }
    }

    pub async fn next_json(&mut self, wait: Duration) -> Value {
        match self.next_event(wait).await {
            WsEvent::Json(v) => v,
            WsEvent::Closed(c) => panic!("WebSocket closed: {c:?}"),
        }
    }

    /// Waits for the `ready` message (skipping snapshots) and returns it.
    pub async fn ready(&mut self) -> Value {
        loop {
            let v = self.next_json(Duration::from_secs(10)).await;
            if v["type"] == "ready" {
                return v;
            }
            // Changes of a previous subscription may still be in flight, and
            // the heartbeat may tell a filtered stream its position.
            assert!(
                v["type"] == "snapshot" || v["type"] == "change" || v["type"] == "position",
                "unexpected message before ready: {v}"
            );
        }
    }

    /// Collects `n` change messages.
    pub async fn changes(&mut self, n: usize, wait: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.next_json(left).await;
            if v["type"] == "change" {
                out.push(v);
            }
        }
        out
    }

    /// Asserts nothing but pings and `position` messages (the heartbeat's,
    /// for a filtered stream) arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        let r = tokio::time::timeout(wait, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) if t.starts_with(r#"{"type":"position","#) => continue,
                    Some(Ok(Message::Text(t))) => return Some(t.to_string()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    _ => return None,
                }
            }
        })
        .await;
        if let Ok(Some(t)) = r {
            panic!("expected no message, got {t}");
        }
    }
}

#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

pub struct SseClient {
    stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl SseClient {
    pub async fn connect(http: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> SseClient {
        let mut req = http.get(url).timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req.send().await.expect("SSE request");
        assert_eq!(resp.status(), 200, "SSE status");
        SseClient { stream: Box::pin(resp.bytes_stream()), buf: String::new() }
    }

    /// The next event (comments, retry lines and heartbeats skipped).
    pub async fn next_event(&mut self, wait: Duration) -> SseEvent {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = self.next_any_event(left).await;
            if ev.event != "heartbeat" {
                return ev;
            }
        }
    }

    /// The next event, heartbeats too (comments and retry lines skipped).
    pub async fn next_any_event(&mut self, wait: Duration) -> SseEvent {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent { event: "message".into(), id: None, data: Value::Null };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        ev.event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        ev.id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if data.is_empty() {
                    continue; // comment or retry
                }
                ev.data = serde_json::from_str(&data).expect("SSE data is JSON");
                return ev;
            }
            let chunk = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .expect("timed out waiting for an SSE event")
                .expect("SSE stream ended")
                .expect("SSE stream error");
            self.buf.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    pub async fn changes(&mut self, n: usize, wait: Duration) -> Vec<SseEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = self.next_event(left).await;
            if ev.event == "change" {
                out.push(ev);
            }
        }
        out
    }
}

/// Polls `f` until it returns Some, for at most `wait`.
pub async fn eventually<T, F, Fut>(wait: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not met in {wait:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the count `sql` returns satisfies `done`, for at most `wait`.
pub async fn until_count(db: &tokio_postgres::Client, sql: &str, wait: Duration, done: impl Fn(i64) -> bool) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let n: i64 = db.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")).get(0);
        if done(n) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sql}: {n} after {wait:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestApp {
    /// A WebSocket handshake the server answers with an error instead of
    /// 101: its status and JSON body (read to the end; the server closes).
    pub async fn ws_refused(&self, target: &str) -> (u16, Value) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            self.port
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&answer);
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{text}"));
        let body = text.find('{').map(|i| serde_json::from_str(text[i..].trim()).unwrap()).unwrap_or(Value::Null);
        (status, body)
    }
}

/// Commits `n` orders, `name 1` to `name n`, in one transaction (as a DBA
/// would, in one statement).
pub async fn dba_insert_many(db: &tokio_postgres::Client, name: &str, n: i64) {
    db.execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT $1::text || ' ' || g, 'Bolt', 1, 2 FROM generate_series(1, $2::bigint) g",
        &[&name, &n],
    )
    .await
    .unwrap();
}

/// SQL that makes the database forget every commit after `start`, as a
/// failover or a crash can; with `renumber`, the next commits take their
/// positions again.
pub fn forget_after(start: i64, renumber: bool) -> String {
    let setval = if renumber { format!("SELECT setval('change_position', {start});") } else { String::new() };
    format!(
        "DELETE FROM change_log WHERE txid IN (SELECT txid FROM change_tx WHERE end_pos > {start}); \
         DELETE FROM change_tx WHERE end_pos > {start}; {setval}"
    )
}

/// How long a server child process may take to start or stop.
const SERVER_WAIT: Duration = Duration::from_secs(20);

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The real `ordercast` binary as a child process.
pub struct Server {
    child: Child,
}

impl Server {
    pub async fn start(db_url: &str, port: u16) -> Server {
        let child = Command::new(env!("CARGO_BIN_EXE_ordercast"))
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", db_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start ordercast");
        let server = Server { child };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + SERVER_WAIT;
        loop {
            let ok =
                http.get(format!("http://127.0.0.1:{port}/api/health")).send().await.is_ok_and(|r| r.status() == 200);
            if ok {
                return server;
            }
            assert!(Instant::now() < deadline, "ordercast did not become healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the server's process holds in memory now (`VmRSS`), in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + SERVER_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "ordercast did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

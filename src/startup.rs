//! One start-up path for production and tests: `Application::build` migrates,
//! starts the hub, the LISTEN connection and maintenance, and binds the HTTP
//! server (port 0 works); `run_until_stopped` serves until stopped.

use std::net::TcpListener;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use std::rc::Rc;

use actix_codec::Framed;
use actix_http::body::{BodySize, BoxBody, EitherBody, MessageBody};
use actix_http::error::DispatchError;
use actix_http::h1::{self, Message};
use actix_http::{ConnectionType, HttpService, KeepAlive, Request, Response};
use actix_server::{Server, ServerHandle};
use actix_service::{
    fn_factory, fn_service, map_config, IntoServiceFactory, Service, ServiceFactory, ServiceFactoryExt,
};
use actix_web::dev::{AppConfig, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::Logger;
use actix_web::rt::net::TcpStream;
use actix_web::{web, App};
use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::changes::listener::{self, ListenerState};
use crate::config::Settings;
use crate::error::problem_response;
use crate::hub::Hub;
use crate::routes;

/// Open streaming sessions by transport.
#[derive(Debug, Default)]
pub struct SessionCounters {
    pub ws: AtomicI64,
    pub sse: AtomicI64,
}

/// Shared by every request handler and session.
pub struct AppState {
    /// The REST API's connections.
    pub pool: Pool,
    /// The streams' connections (`ORDERCAST_STREAM_POOL_SIZE`).
    pub stream_pool: Pool,
    pub hub: Hub,
    pub listener: Arc<ListenerState>,
    /// The snapshot memory (`ORDERCAST_SNAPSHOT_MEMORY_MIB`), in KiB, that
    /// streams take a share of while they hold snapshot rows not yet sent.
    pub snapshots: Arc<tokio::sync::Semaphore>,
    /// The last database check of `/api/health` and when it was made.
    pub health_check: Arc<tokio::sync::Mutex<Option<crate::routes::health::Check>>>,
    /// Statistics folding and retention (`changes::maintenance`).
    pub maintenance: Arc<crate::changes::maintenance::MaintenanceState>,
    pub settings: Settings,
    /// Flips to true when the server begins a graceful stop: sessions close
    /// with their resume position.
    pub shutdown: watch::Sender<bool>,
    /// Ticks every `routes::ws::HEARTBEAT_INTERVAL`: one timer for all
    /// WebSocket sessions instead of one each.
    pub heartbeat: watch::Receiver<u64>,
    pub sessions: SessionCounters,
    pub http_metrics: crate::metrics::HttpMetrics,
    /// `None`: authentication is off (no keys, no JWT secret).
    pub auth: Option<crate::auth::Auth>,
    pub connections: Arc<crate::limits::Connections>,
    pub write_limiter: crate::limits::RateLimiter,
    /// The Kafka ingest's counters and health (disabled without KAFKA_BROKERS).
    pub ingest: Arc<crate::ingest::IngestState>,
    /// The outbox relay's and the processor's state, for `/api/health`.
    pub workflow: Arc<crate::workflow::WorkflowState>,
}

impl AppState {
    /// The Kafka ingest's part of `/api/health`.
    pub fn ingest_health(&self) -> serde_json::Value {
        self.ingest.health()
    }

    /// The Kafka ingest's part of `/metrics`.
    pub fn ingest_metrics(&self, out: &mut String) {
        let h = self.ingest_health();
        crate::metrics::sample(
            out,
            "ordercast_kafka_ingest_enabled",
            "gauge",
            "1 when the Kafka ingest runs.",
            h["enabled"].as_bool().unwrap_or(false) as u8,
        );
        crate::metrics::sample(
            out,
            "ordercast_kafka_ingest_healthy",
            "gauge",
            "0 while the Kafka ingest cannot write to PostgreSQL, reach a broker, read an assigned partition's stored \
             position or publish dead letters, or one of its tasks stopped.",
            h["healthy"].as_bool().unwrap_or(true) as u8,
        );
        for (key, help) in [
            ("consumed", "Kafka messages received."),
            ("written", "Orders created or updated from Kafka."),
            ("duplicates", "Kafka events skipped because their event_id was already applied."),
            ("redelivered", "Kafka messages skipped because their offset was already applied."),
            (
                "log_resets",
                "Kafka partitions whose stored position was beyond the end of their log (a recreated topic): reset.",
            ),
            ("dead_lettered", "Kafka messages recorded as dead letters."),
            ("dlq_published", "Dead letters published to the dead-letter topic."),
            ("batches", "Kafka batches written to PostgreSQL."),
            ("retries", "Kafka batches written again after a write failed (the database or a broker failing, a timeout, a data error the slower paths could not get past)."),
        ] {
            let name = format!("ordercast_kafka_{key}_total");
            crate::metrics::sample(out, &name, "counter", help, h[key].as_u64().unwrap_or(0));
        }
        for (key, help) in [
            ("dlq_pending", "Dead letters recorded and not yet published to the dead-letter topic."),
            ("lag_total", "Messages behind the ends of all assigned partitions."),
        ] {
            if let Some(n) = h[key].as_i64() {
                crate::metrics::sample(out, &format!("ordercast_kafka_{key}"), "gauge", help, n);
            }
        }
        if let Some(lag) = h["lag"].as_object() {
            out.push_str("# HELP ordercast_kafka_lag Messages behind the end of each assigned partition.\n");
            out.push_str("# TYPE ordercast_kafka_lag gauge\n");
            for (partition, n) in lag {
                if let Some(n) = n.as_i64() {
                    out.push_str(&format!("ordercast_kafka_lag{{partition=\"{partition}\"}} {n}\n"));
                }
            }
        }
    }
}

pub struct Application {
    port: u16,
    server: Server,
    state: Arc<AppState>,
    tasks: Vec<JoinHandle<()>>,
    /// Stopped by the shutdown signal rather than aborted, so the last batch
    /// commits and the consumer leaves its group cleanly.
    ingest_tasks: Vec<JoinHandle<()>>,
    /// The outbox relay and the processor, stopped the same way: the relay
    /// stores its position, the processor lets its orders finish.
    workflow_tasks: Vec<JoinHandle<()>>,
}

/// Stops a running application gracefully.
#[derive(Clone)]
pub struct AppHandle {
    server: ServerHandle,
    state: Arc<AppState>,
}

impl AppHandle {
    /// Sessions get a close frame carrying their resume position, then the
    /// HTTP server stops.
    pub async fn stop(&self) {
        self.state.shutdown.send_replace(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline
            && (self.state.sessions.ws.load(std::sync::atomic::Ordering::Relaxed) > 0
                || self.state.sessions.sse.load(std::sync::atomic::Ordering::Relaxed) > 0)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.server.stop(true).await;
    }
}

/// A CORS refusal (a preflight from an origin, or asking for a method or
/// header, that is not allowed) as a problem like every other error: actix-cors
/// answers plain text. An origin not on the list is 403 `origin_not_allowed`,
/// as for the requests themselves; the rest 400 `cors_refused`.
fn cors_problem<B>(res: ServiceResponse<B>) -> ServiceResponse<EitherBody<B>> {
    let refusal = res.response().error().and_then(|e| e.as_error::<actix_cors::CorsError>()).map(|e| {
        let (status, code) = match e {
            actix_cors::CorsError::OriginNotAllowed => (StatusCode::FORBIDDEN, "origin_not_allowed"),
            _ => (StatusCode::BAD_REQUEST, "cors_refused"),
        };
        problem_response(status, code, &format!("CORS: {e}"))
    });
    match refusal {
        Some(mut problem) => {
            // What actix-cors said varies with (`Vary: Origin, ...`) still does.
            for v in res.headers().get_all(actix_web::http::header::VARY) {
                problem.headers_mut().append(actix_web::http::header::VARY, v.clone());
            }
            res.into_response(problem).map_into_right_body()
        }
        None => res.map_into_left_body(),
    }
}

/// The application: middleware and routes. Built per worker, twice (the
/// request service and the WebSocket upgrade service).
fn app(
    data: web::Data<AppState>,
    origins: &[String],
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    // CORS only for the configured origins; never a wildcard.
    let cors = origins.iter().fold(
        actix_cors::Cors::default()
            .allowed_methods(["GET", "POST", "PATCH", "PUT", "DELETE"])
            .allowed_headers(["authorization", "content-type", "if-match", "last-event-id"])
            .expose_headers(["etag", "location", "retry-after"])
            .supports_credentials()
            .max_age(3600),
        |cors, o| cors.allowed_origin(o.trim_end_matches('/')),
    );
    App::new()
        .wrap(actix_web::middleware::from_fn(crate::auth::guard))
        .wrap(cors)
        // Inside the access log, so it logs what the client gets.
        .wrap_fn(|req, srv| {
            use actix_web::dev::Service;
            let fut = srv.call(req);
            async move { Ok(cors_problem(fut.await?)) }
        })
        .wrap(
            // The path without the query string, which may hold a token, and
            // cut short like a made-up method (`metrics::path_for_log`).
            Logger::new("%a \"%{method}xi %{path}xi\" %s %b %Dms")
                .custom_request_replace("method", |req| crate::metrics::method_for_log(req.method()).into_owned())
                .custom_request_replace("path", |req| crate::metrics::path_for_log(req.path()).into_owned()),
        )
        .wrap_fn({
            let data = data.clone();
            move |req, srv| {
                use actix_web::dev::Service;
                let data = data.clone();
                let fut = srv.call(req);
                async move {
                    let res = fut.await?;
                    let route = match res.request().match_name() {
                        Some(routes::fallback::NAME) => "unmatched".into(),
                        _ => res.request().match_pattern().unwrap_or_else(|| "unmatched".into()),
                    };
                    data.http_metrics.record(res.request().method(), &route, res.status().as_u16());
                    Ok(res)
                }
            }
        })
        .app_data(data.clone())
        .app_data(web::QueryConfig::default().error_handler(|err, _| {
            let msg = err.to_string();
            actix_web::error::InternalError::from_response(
                err,
                problem_response(StatusCode::BAD_REQUEST, "invalid_query", &msg),
            )
            .into()
        }))
        .configure(routes::health::configure)
        .configure(routes::orders::configure)
        .configure(routes::stats::configure)
        .configure(routes::session::configure)
        .configure(routes::changes::configure)
        .configure(routes::dlq::configure)
        .configure(routes::sse::configure)
        .configure(routes::ws::configure)
        .configure(routes::openapi::configure)
        .configure(routes::metrics::configure)
        .configure(routes::web::configure)
        // Last: the 405 (with `Allow`) or 404 for what no route above takes.
        .configure(routes::fallback::configure)
        // A request target the catch-all cannot match (not starting with `/`).
        .default_service(web::to(|req: actix_web::HttpRequest| async move { routes::fallback::not_found(&req) }))
}

/// A request that asked to upgrade (`Connection: upgrade`, `Upgrade:
/// websocket`): the application answers it like any request. A 101 from
/// `GET /ws` carries the session to run: its head is written, and the raw
/// connection goes to the WebSocket session, without the HTTP dispatcher and
/// its buffers. Any other answer (an error, or a route that does not
/// upgrade) is written whole and the connection closed.
async fn upgrade<S, B>(
    app: Rc<S>,
    req: Request,
    mut framed: Framed<TcpStream, h1::Codec>,
) -> Result<(), actix_web::Error>
where
    S: Service<Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    use futures_util::SinkExt;
    let mut response: Response<BoxBody> = match app.call(req).await {
        Ok(res) => Response::from(res).map_into_boxed_body(),
        Err(e) => Response::from(e),
    };
    let handoff = response.extensions_mut().remove::<routes::ws::Handoff>();
    let (mut head, body) = response.into_parts();
    match handoff {
        Some(handoff) if head.status() == StatusCode::SWITCHING_PROTOCOLS => {
            framed.send(Message::Item((head, BodySize::None))).await?;
            let parts = framed.into_parts();
            // The session's own 4008 and heartbeat deadlines apply instead.
            set_unacknowledged_limit(&parts.io, 0);
            routes::ws::start(parts.io, parts.read_buf, handoff);
            Ok(())
        }
        _ => {
            // Streamed, not collected: the answer may be an endless event
            // stream (an upgrade request to `/api/events`).
            let mut body = std::pin::pin!(body);
            head.head_mut().set_connection_type(ConnectionType::Close);
            framed.send(Message::Item((head, body.size()))).await?;
            while let Some(chunk) = std::future::poll_fn(|cx| body.as_mut().poll_next(cx)).await {
                match chunk {
                    Ok(bytes) => framed.send(Message::Chunk(Some(bytes))).await?,
                    // The head is out: all that is left is to end the connection.
                    Err(_) => return Ok(framed.close().await?),
                }
            }
            framed.send(Message::Chunk(None)).await?;
            Ok(framed.close().await?)
        }
    }
}

/// How long (milliseconds) what the server sends on a connection may stay
/// unacknowledged, or unsent because the client's window stays closed,
/// before the kernel drops the connection (`TCP_USER_TIMEOUT`): twice the
/// slow-client limit. A WebSocket session closes a client that reads nothing
/// for the slow-client limit itself (4008); an SSE stream or a large REST
/// answer has no such deadline of its own, as the HTTP layer stops asking
/// for more while its buffer is full, so a client that stopped reading
/// would otherwise hold its connection, its slot and its queued changes for
/// as long as its TCP connection lived. Also frees a peer gone from the
/// network sooner than the kernel's default (about 15 minutes of retries).
///
/// A WebSocket connection leaves it at the handshake (see `upgrade`): its
/// session closes a stalled client itself, with 4008, which the kernel's
/// clock (started as soon as the client's window closes, before the
/// session's buffers fill) could beat. Linux only (5.11 or later for a
/// closed window); elsewhere, and should the option be refused, a
/// connection goes on without it.
fn unacknowledged_limit(settings: &Settings) -> u32 {
    settings.slow_client_secs.max(1).saturating_mul(2000).min(u32::MAX as u64) as u32
}

fn set_unacknowledged_limit(io: &TcpStream, millis: u32) {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::socket::setsockopt(io, nix::sys::socket::sockopt::TcpUserTimeout, &millis) {
        log::debug!("TCP_USER_TIMEOUT not set on a connection: {e}");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (io, millis);
}

/// Customer names compare case-insensitively: in SQL with `lower()`, which
/// follows the database's character type (or its ICU or builtin collation),
/// and in the server with `domain::fold_case`, which folds all of Unicode one
/// character to one, as glibc's locales do. A database that folds otherwise
/// would let a token confined to such a customer find its orders in the
/// streams and not through REST, or the reverse: said once at start, naming
/// the names that differ. Asked of `lower()` itself, as the settings that
/// decide it differ between PostgreSQL versions.
async fn warn_on_case_folding(client: &tokio_postgres::Client) {
    match case_folding_differences(client).await {
        Ok(None) => {}
        Ok(Some(Folding::AsciiOnly)) => log::warn!(
            "the database's lower() folds only ASCII letters (its character type is C or POSIX), so customer names with other letters compare differently in SQL and in the server (a \
             token confined to such a customer may miss its orders through REST). Create the database with the \
             UTF8 encoding and a UTF-8 locale (e.g. LC_CTYPE 'C.UTF-8')"
        ),
        Ok(Some(Folding::Differs(names))) => log::warn!(
            "the database's lower() folds some names otherwise than ordercast does (an ICU collation folds a \
             word-final Σ to ς and İ to two characters, a Turkish or Azeri locale I to ı): {}. Customer names with \
             such letters compare differently in SQL and in the server (a token confined to such a customer may \
             miss its orders through REST). A database with the character type C.UTF-8 (LC_CTYPE 'C.UTF-8', or \
             another glibc UTF-8 locale but Turkish and Azeri) folds as ordercast does",
            names
                .iter()
                .map(|(name, sql, ours)| format!("{name} is {sql} there, {ours} here"))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        Err(e) => log::warn!("could not check how the database folds letters: {}", crate::db::describe(e)),
    }
}

/// How the database's `lower()` differs from `domain::fold_case`.
#[derive(Debug, PartialEq, Eq)]
pub enum Folding {
    /// Only ASCII letters are folded.
    AsciiOnly,
    /// (name, the database's lower(), ordercast's) where they differ.
    Differs(Vec<(String, String, String)>),
}

/// Names whose folding tells the usual ways apart.
const FOLDING_PROBES: [&str; 3] = ["ΟΔΥΣΣΕΥΣ", "İSTANBUL", "IRMAK"];

/// None when the database folds customer names as ordercast does.
pub async fn case_folding_differences(
    client: &tokio_postgres::Client,
) -> Result<Option<Folding>, tokio_postgres::Error> {
    // `É` exists in every encoding PostgreSQL serves that has letters beyond
    // ASCII (UTF-8, Latin-1, the Windows code pages).
    let row = client.query_one("SELECT lower('É') = 'é', current_setting('server_encoding') = 'UTF8'", &[]).await?;
    if !row.get::<_, bool>(0) {
        return Ok(Some(Folding::AsciiOnly));
    }
    if !row.get::<_, bool>(1) {
        // The probes' letters may not exist in the encoding.
        return Ok(None);
    }
    let probes: Vec<String> = FOLDING_PROBES.iter().map(|p| p.to_string()).collect();
    let rows = client.query("SELECT p, lower(p) FROM unnest($1::text[]) p", &[&probes]).await?;
    let differs: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .filter_map(|(name, sql)| {
            let ours = crate::domain::fold_case(&name);
            (sql != ours).then_some((name, sql, ours))
        })
        .collect();
    Ok((!differs.is_empty()).then_some(Folding::Differs(differs)))
}

/// The listening socket's backlog (as std's `TcpListener::bind`).
const LISTEN_BACKLOG: i32 = 1024;

/// The server's address, bound but not yet listening: a port in use stops
/// the start before anything else, and no connection is taken (and left
/// waiting) before the server can answer it.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

impl Application {
    pub async fn build(settings: Settings, database_url: &str) -> anyhow::Result<Application> {
        let auth = crate::auth::Auth::from_config(
            settings.api_keys.as_ref().map(|s| s.0.as_str()),
            settings.jwt_secret.as_ref().map(|s| s.0.as_str()),
        )?
        .map(|a| {
            a.throttling(settings.auth_failure_rate, settings.auth_failure_burst)
                .expecting(settings.jwt_audience.as_deref(), settings.jwt_issuer.as_deref())
        });
        // Secure by default: never expose an open server by accident.
        if auth.is_none() && !settings.bind.ip().is_loopback() && !settings.insecure {
            anyhow::bail!(
                "refusing to listen on {} without authentication: set ORDERCAST_API_KEYS or ORDERCAST_JWT_SECRET, \
                 or pass --insecure to allow anyone on the network to read and change orders",
                settings.bind
            );
        }
        if auth.is_none() {
            log::warn!("authentication is off (no API keys, no JWT secret): every caller may read and write");
        }
        if settings.jwt_secret.is_some() && settings.jwt_audience.as_deref().is_none_or(|a| a.trim().is_empty()) {
            log::warn!(
                "JWTs are accepted whatever their audience (aud): set ORDERCAST_JWT_AUDIENCE if the JWT secret \
                 also signs tokens for other services"
            );
        }
        // Settings that cannot work stop the start before anything runs: a
        // mistyped one on a new version must not migrate a database the old
        // instances still use.
        crate::workflow::check_config(&settings)?;
        crate::ingest::check_config(&settings.kafka)?;
        // Before anything starts: a port in use stops the start here, with
        // no migration run, no Kafka group joined and no order claimed.
        let socket = bind(settings.bind).with_context(|| format!("Failed to bind {}", settings.bind))?;
        let port = socket.local_addr()?.as_socket().map_or(0, |a| a.port());
        crate::db::migrate(database_url).await?;
        let pool = crate::db::pool(database_url, settings.db_pool_size, settings.db_timeout())?;
        let stream_pool = crate::db::pool(database_url, settings.stream_pool_size, settings.db_timeout())?;
        let head = {
            let mut client = pool.get().await.context("Failed to connect to the database")?;
            warn_on_case_folding(&client).await;
            prune_foreign_transactions(&client).await?;
            if let Err(e) = catch_up_position_sequence(&mut client).await {
                // A writer holding the sequencer's lock (a transaction left
                // open after SET CONSTRAINTS ALL IMMEDIATE) holds every
                // commit anyway; the check is for a log just carried over.
                log::warn!("the change log's position sequence was not checked against its head: {e:#}");
            }
            crate::changes::log_bounds(&client).await.map_err(crate::db::describe)?.0
        };
        // Each pool starts with a connection made (kept for reuse): the first
        // stream does not wait for one to be set up, and resumes keep working
        // while the database takes no new connections (it is shutting down,
        // or at max_connections) as REST does.
        drop(stream_pool.get().await.context("Failed to connect to the database")?);
        // Listening before anything starts: two servers started together on
        // one port both bind it (SO_REUSEADDR lets bound sockets share a port
        // until one listens), and the second fails here, with no listener,
        // Kafka group or processor started. Connections are taken from here
        // on, not while the migrations ran.
        socket
            .listen(LISTEN_BACKLOG)
            .and_then(|()| socket.set_nonblocking(true))
            .with_context(|| format!("Failed to bind {}", settings.bind))?;
        let hub = Hub::start(head, settings.client_buffer);
        let listener_state = Arc::new(ListenerState::default());
        let maintenance = Arc::new(crate::changes::maintenance::MaintenanceState::default());
        let mut tasks = vec![
            tokio::spawn(listener::run(database_url.to_string(), hub.clone(), listener_state.clone())),
            tokio::spawn(crate::changes::maintenance::run(pool.clone(), settings.clone(), maintenance.clone())),
        ];
        let (shutdown, _) = watch::channel(false);
        let (beat, heartbeat) = watch::channel(0u64);
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(routes::ws::HEARTBEAT_INTERVAL);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                beat.send_modify(|n| *n += 1);
            }
        }));
        let ingest = match crate::ingest::start(&settings.kafka, database_url, shutdown.subscribe()) {
            Ok(i) => i,
            Err(e) => {
                tasks.iter().for_each(JoinHandle::abort);
                return Err(e);
            }
        };
        let workflow = match crate::workflow::start(&settings, database_url, shutdown.subscribe()) {
            Ok(w) => w,
            Err(e) => {
                tasks.iter().chain(&ingest.tasks).for_each(JoinHandle::abort);
                return Err(e);
            }
        };
        let state = Arc::new(AppState {
            pool,
            stream_pool,
            hub,
            listener: listener_state,
            snapshots: Arc::new(tokio::sync::Semaphore::new(settings.snapshot_memory_mib as usize * 1024)),
            health_check: Default::default(),
            maintenance,
            settings: settings.clone(),
            shutdown,
            heartbeat,
            sessions: SessionCounters::default(),
            http_metrics: Default::default(),
            auth,
            connections: crate::limits::Connections::new(settings.max_connections, settings.max_connections_per_ip),
            write_limiter: crate::limits::RateLimiter::new(settings.write_rate, settings.write_burst),
            ingest: ingest.state,
            workflow: workflow.state,
        });

        let data = web::Data::from(state.clone());
        let origins = settings.allowed_origins.clone();
        let unacknowledged = unacknowledged_limit(&settings);
        // Per worker: an HTTP/1 service for requests, and for WebSocket
        // handshakes an upgrade service that runs the same application and
        // then takes the connection over from the HTTP dispatcher.
        let factory = move || {
            let upgrade = {
                let (data, origins) = (data.clone(), origins.clone());
                fn_factory(move || {
                    let app = app(data.clone(), &origins).into_factory().new_service(AppConfig::default());
                    async move {
                        let app = Rc::new(app.await?);
                        Ok::<_, ()>(fn_service(move |(req, framed)| upgrade(app.clone(), req, framed)))
                    }
                })
            };
            let http = HttpService::build()
                .keep_alive(KeepAlive::Timeout(Duration::from_secs(5)))
                .client_request_timeout(Duration::from_secs(5))
                .client_disconnect_timeout(Duration::from_secs(1))
                .upgrade(upgrade)
                .h1(map_config(app(data.clone(), &origins), |_| AppConfig::default()));
            fn_service(move |io: TcpStream| async move {
                // Pushes are small frames that must leave at once: without
                // this, Nagle's algorithm holds a frame until the client ACKs
                // the previous one, and delayed ACKs make that up to 40 ms.
                io.set_nodelay(true).map_err(DispatchError::Io)?;
                set_unacknowledged_limit(&io, unacknowledged);
                let peer = io.peer_addr().ok();
                Ok((io, peer))
            })
            .and_then(http)
        };
        let workers = settings.http_workers();
        log::info!("{workers} HTTP worker thread(s)");
        let server = match Server::build().listen("ordercast", TcpListener::from(socket), factory) {
            Ok(server) => server.workers(workers).disable_signals().shutdown_timeout(5).run(),
            Err(e) => {
                tasks.iter().chain(&ingest.tasks).chain(&workflow.tasks).for_each(JoinHandle::abort);
                return Err(e.into());
            }
        };
        Ok(Application { port, server, state, tasks, ingest_tasks: ingest.tasks, workflow_tasks: workflow.tasks })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    pub fn handle(&self) -> AppHandle {
        AppHandle { server: self.server.handle(), state: self.state.clone() }
    }

    /// Serves until stopped through an `AppHandle`; then stops the background tasks.
    pub async fn run_until_stopped(mut self) -> std::io::Result<()> {
        let result = self.server.await;
        self.state.shutdown.send_replace(true);
        let ingest_stopped = futures_util::future::join_all(self.ingest_tasks.iter_mut());
        if tokio::time::timeout(Duration::from_secs(10), ingest_stopped).await.is_err() {
            log::warn!("the Kafka ingest did not stop within 10 s");
        }
        let workflow_stopped = futures_util::future::join_all(self.workflow_tasks.iter_mut());
        if tokio::time::timeout(Duration::from_secs(10), workflow_stopped).await.is_err() {
            log::warn!("the outbox relay or the processor did not stop within 10 s");
        }
        for t in self.tasks.iter().chain(&self.ingest_tasks).chain(&self.workflow_tasks) {
            t.abort();
        }
        result
    }
}

/// Moves the position sequence past the change log's head when it is behind
/// it: a log carried into another cluster by logical replication (which
/// does not carry sequences), or by a restore of its tables alone, comes
/// with a sequence that starts over at 1. The next commits were numbered at
/// or below the head, where the listener and every client resuming from the
/// head never look: they reached nobody, and nobody was told. Under the
/// sequencer's lock, as a commit numbers its changes.
async fn catch_up_position_sequence(client: &mut deadpool_postgres::Client) -> anyhow::Result<()> {
    let d = crate::db::describe;
    let tx = client.transaction().await.map_err(d)?;
    // The head is read after the lock is held (a statement of its own: its
    // snapshot then sees every commit numbered before).
    crate::changes::lock_sequencer(&tx, "10s").await.map_err(d)?;
    let head: i64 = tx.query_one("SELECT change_head()", &[]).await.map_err(d)?.get(0);
    let moved = crate::changes::move_sequence_to(&tx, head).await.map_err(d)?;
    tx.commit().await.map_err(d)?;
    if moved {
        log::warn!(
            "the change log's position sequence was behind its head {head} (the log carried from another \
             cluster by logical replication?): moved past it, so the next commits are numbered after it"
        );
    }
    Ok(())
}

/// A change log carried into another cluster (a logical dump restored, a
/// move by logical replication) keeps the old cluster's transaction ids,
/// which the new cluster's transactions reach in time: a transaction whose
/// id matches a kept entry would add its changes to that entry, at old
/// positions, under the readers' feet. Every entry with an id this cluster
/// has not handed out yet is such a one (no transaction of this cluster
/// committed with an id above the one handed out now), so the log is pruned
/// through them: clients resuming before are told to resync, as after
/// retention.
async fn prune_foreign_transactions(client: &deadpool_postgres::Client) -> anyhow::Result<()> {
    let d = crate::db::describe;
    let foreign: Option<i64> = client
        .query_one("SELECT max(end_pos) FROM change_tx WHERE txid >= pg_current_xact_id()", &[])
        .await
        .map_err(d)?
        .get(0);
    if let Some(through) = foreign {
        log::warn!(
            "the change log holds transactions of another PostgreSQL cluster (restored from a logical dump?): \
             pruning it through position {through}; clients resuming before it are told to resync"
        );
        client.query_one("SELECT change_prune($1)", &[&through]).await.map_err(d)?;
    }
    Ok(())
}

//! One start-up path for production and tests: `Application::build` migrates,
//! starts the hub, the LISTEN connection and maintenance, and binds the HTTP
//! server (port 0 works); `run_until_stopped` serves until stopped.

use std::net::TcpListener;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::http::StatusCode;
use actix_web::middleware::Logger;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::changes::listener::{self, ListenerState};
use crate::config::Settings;
use crate::error::problem_response;
use crate::hub::Hub;
use crate::routes;

/// The authenticated caller, when there is one; named in history as `api:<name>`.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// Open streaming sessions by transport.
#[derive(Debug, Default)]
pub struct SessionCounters {
    pub ws: AtomicI64,
    pub sse: AtomicI64,
}

/// Shared by every request handler and session.
pub struct AppState {
    pub pool: Pool,
    pub hub: Hub,
    pub listener: Arc<ListenerState>,
    pub settings: Settings,
    /// Flips to true when the server begins a graceful stop: sessions close
    /// with their resume position.
    pub shutdown: watch::Sender<bool>,
    pub sessions: SessionCounters,
    pub http_metrics: crate::metrics::HttpMetrics,
}

impl AppState {
    /// The Kafka ingest's part of `/api/health`.
    pub fn ingest_health(&self) -> serde_json::Value {
        serde_json::json!({"enabled": false, "healthy": true, "state": "disabled"})
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
    }
}

pub struct Application {
    port: u16,
    server: Server,
    state: Arc<AppState>,
    tasks: Vec<JoinHandle<()>>,
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
        let _ = self.state.shutdown.send(true);
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

impl Application {
    pub async fn build(settings: Settings, database_url: &str) -> anyhow::Result<Application> {
        crate::db::migrate(database_url).await?;
        let pool = crate::db::pool(database_url, settings.db_pool_size, settings.db_timeout())?;
        let head = {
            let client = pool.get().await.context("Failed to connect to the database")?;
            crate::changes::log_bounds(&client).await.map_err(crate::db::describe)?.0
        };
        let hub = Hub::start(head, settings.client_buffer);
        let listener_state = Arc::new(ListenerState::default());
        let tasks = vec![
            tokio::spawn(listener::run(database_url.to_string(), hub.clone(), listener_state.clone())),
            tokio::spawn(crate::changes::maintenance::run(pool.clone(), settings.clone())),
        ];
        let (shutdown, _) = watch::channel(false);
        let state = Arc::new(AppState {
            pool,
            hub,
            listener: listener_state,
            settings: settings.clone(),
            shutdown,
            sessions: SessionCounters::default(),
            http_metrics: Default::default(),
        });

        let tcp = TcpListener::bind(settings.bind).with_context(|| format!("Failed to bind {}", settings.bind))?;
        let port = tcp.local_addr()?.port();
        let data = web::Data::from(state.clone());
        let mut server = HttpServer::new(move || {
            App::new()
                .wrap(
                    // %U: the path without the query string, which may hold a token.
                    Logger::new("%a \"%{method}xi %U\" %s %b %Dms")
                        .custom_request_replace("method", |req| req.method().to_string()),
                )
                .wrap_fn({
                    let data = data.clone();
                    move |req, srv| {
                        use actix_web::dev::Service;
                        let data = data.clone();
                        let fut = srv.call(req);
                        async move {
                            let res = fut.await?;
                            let route = res.request().match_pattern().unwrap_or_else(|| "unmatched".into());
                            data.http_metrics.record(res.request().method().as_str(), &route, res.status().as_u16());
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
                .configure(routes::sse::configure)
                .configure(routes::ws::configure)
                .configure(routes::openapi::configure)
                .configure(routes::metrics::configure)
                .configure(routes::web::configure)
                .default_service(web::to(|req: actix_web::HttpRequest| async move {
                    problem_response(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        &format!("no route for {} {}", req.method(), req.path()),
                    )
                }))
        })
        .listen(tcp)?
        .disable_signals()
        .shutdown_timeout(5);
        if settings.workers > 0 {
            server = server.workers(settings.workers);
        }
        let server = server.run();
        Ok(Application { port, server, state, tasks })
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
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        for t in &self.tasks {
            t.abort();
        }
        result
    }
}

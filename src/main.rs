use anyhow::Context;
use clap::Parser;
use ordercast::config::{Cli, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ordercast::db::embedded::{Cancelled, EmbeddedPostgres};
use ordercast::startup::Application;

#[tokio::main]
async fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,actix_server=warn")).init();
    if let Err(e) = run(Cli::parse()).await {
        log::error!("{e:#}");
        eprintln!("ordercast: {e:#}");
        std::process::exit(1);
    }
}

/// How many stop signals (SIGINT, SIGTERM, SIGHUP) have come: the first asks
/// for a graceful stop, a second cuts it short. Listened for from the start,
/// so a signal during the embedded PostgreSQL's start or the migrations
/// stops that PostgreSQL too (it runs in a session of its own: killed with
/// ordercast, it stayed). SIGHUP (a closed terminal) is a stop signal too.
type Signals = tokio::sync::watch::Receiver<u32>;

fn signals() -> anyhow::Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::watch::channel(0);
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    // Started under `nohup` (SIGHUP ignored), a closed terminal is no stop:
    // listening would undo what was asked for.
    let mut hup = if hangup_ignored() { None } else { Some(signal(SignalKind::hangup())?) };
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
                Some(_) = async { hup.as_mut()?.recv().await } => "SIGHUP",
            };
            let n = *tx.borrow() + 1;
            if n == 1 {
                log::info!("{name}: shutting down");
            } else {
                log::warn!("{name} again: stopping now, without waiting for connections and work to finish");
            }
            tx.send_replace(n);
        }
    });
    Ok(rx)
}

/// Whether this process was started with SIGHUP ignored (`nohup`).
fn hangup_ignored() -> bool {
    use nix::libc;
    // SAFETY: `sigaction` is a plain C struct (all zeroes is a valid
    // value), and a null new action only reads the current one into it.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Resolves once `n` stop signals have come.
async fn signalled(signals: &Signals, n: u32) {
    let mut rx = signals.clone();
    // The sender lives in its task for the process's life.
    let _ = rx.wait_for(|got| *got >= n).await;
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut settings = cli.settings;
    let command = match cli.command.unwrap_or(Command::Serve) {
        // The simulator talks to Kafka only: no database to start.
        Command::Produce(args) => return ordercast::workflow::simulator::produce(&settings.kafka, &args).await,
        command => command,
    };
    let signals = signals()?;
    // Without DATABASE_URL, run a private PostgreSQL for as long as we run.
    // An empty DATABASE_URL (`DATABASE_URL=` in a .env file) is unset, as
    // scripts/run takes it.
    let (url, embedded) = match settings.database_url.as_deref().filter(|u| !u.trim().is_empty()) {
        Some(url) => (url.to_string(), None),
        None => {
            let dir = settings.data_dir.clone();
            // A stop signal gives the start up (initdb, or a long replay of
            // the log after a crash), and stops what it started.
            let cancel = Arc::new(AtomicBool::new(false));
            let mut start = tokio::task::spawn_blocking({
                let cancel = cancel.clone();
                move || EmbeddedPostgres::start_cancellable(&dir, "", cancel)
            });
            let started = tokio::select! {
                r = &mut start => r?,
                _ = signalled(&signals, 1) => {
                    cancel.store(true, Ordering::Release);
                    start.await?
                }
            };
            let pg = match started {
                // `ordercast migrate` fails, as when stopped later, so that
                // `migrate && deploy` does not go on.
                Err(e) if e.is::<Cancelled>() && matches!(command, Command::Migrate) => {
                    return Err(e.context("stopped before the migrations were done"));
                }
                Err(e) if e.is::<Cancelled>() => {
                    log::info!("stopped before the embedded PostgreSQL was up (what had started is stopped)");
                    return Ok(());
                }
                r => r.context("Failed to start the embedded PostgreSQL")?,
            };
            let url = pg.url("ordercast");
            log::info!("embedded PostgreSQL is up: {}", pg.psql_command("ordercast"));
            (url, Some(pg))
        }
    };

    let work = async {
        if let Some(pg) = &embedded {
            pg.ensure_database("ordercast").await?;
        }
        match command {
            Command::Migrate => tokio::select! {
                r = ordercast::db::migrate(&url) => r,
                _ = signalled(&signals, 1) => Err(anyhow::anyhow!("stopped before the migrations were done")),
            },
            Command::Serve => serve(settings, &url, &signals).await,
            Command::Process => process(settings, &url, &signals).await,
            Command::Demo(args) => match ordercast::workflow::demo::Demo::start(&args, &mut settings) {
                Ok(demo) => {
                    let result = serve(settings, &url, &signals).await;
                    demo.stop().await;
                    result
                }
                Err(e) => Err(e),
            },
            Command::Produce(_) => unreachable!("handled before the database starts"),
        }
    };
    // A signal that came before (during the embedded start) stops the work
    // as it begins: every command waits for the first signal beside its
    // work (`ordercast migrate` then fails, so `migrate && deploy` does not
    // go on). A second signal cuts the graceful stop short.
    let result = tokio::select! {
        r = work => r,
        _ = signalled(&signals, 2) => Err(anyhow::anyhow!("a second stop signal cut the graceful stop short")),
    };
    if let Some(mut pg) = embedded {
        // The work's own error, if any, is the one to report.
        if let Err(e) = tokio::task::spawn_blocking(move || pg.stop()).await? {
            match result {
                Ok(()) => return Err(e),
                Err(_) => log::error!("{e:#}"),
            }
        }
    }
    result
}

async fn serve(settings: ordercast::config::Settings, url: &str, signals: &Signals) -> anyhow::Result<()> {
    let app = tokio::select! {
        app = Application::build(settings.clone(), url) => app?,
        _ = signalled(signals, 1) => return Ok(()),
    };
    let handle = app.handle();
    log::info!("ordercast listening on http://{}:{} (dashboard at /)", settings.bind.ip(), app.port());
    let mut server = tokio::spawn(app.run_until_stopped());
    tokio::select! {
        r = &mut server => {
            r??;
            anyhow::bail!("the HTTP server stopped by itself");
        }
        _ = signalled(signals, 1) => {}
    }
    handle.stop().await;
    server.await??;
    Ok(())
}

/// `ordercast process`: the processor alone, until a stop signal.
async fn process(settings: ordercast::config::Settings, url: &str, signals: &Signals) -> anyhow::Result<()> {
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut processor = tokio::spawn({
        let url = url.to_string();
        async move { ordercast::workflow::processor::run_standalone(&settings, &url, shutdown).await }
    });
    tokio::select! {
        r = &mut processor => return r?,
        _ = signalled(signals, 1) => {}
    }
    let _ = stop.send(true);
    processor.await?
}

use anyhow::Context;
use clap::Parser;
use ordercast::config::{Cli, Command};
use ordercast::db::embedded::EmbeddedPostgres;
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut settings = cli.settings;
    let command = match cli.command.unwrap_or(Command::Serve) {
        // The simulator talks to Kafka only: no database to start.
        Command::Produce(args) => return ordercast::workflow::simulator::produce(&settings.kafka, &args).await,
        command => command,
    };
    // Without DATABASE_URL, run a private PostgreSQL for as long as we run.
    let (url, embedded) = match &settings.database_url {
        Some(url) => (url.clone(), None),
        None => {
            let dir = settings.data_dir.clone();
            let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir, ""))
                .await?
                .context("Failed to start the embedded PostgreSQL")?;
            pg.ensure_database("ordercast").await?;
            let url = pg.url("ordercast");
            log::info!("embedded PostgreSQL is up: {}", pg.psql_command("ordercast"));
            (url, Some(pg))
        }
    };

    let result = match command {
        Command::Migrate => ordercast::db::migrate(&url).await,
        Command::Serve => serve(settings, &url).await,
        Command::Process => process(settings, &url).await,
        Command::Demo(args) => match ordercast::workflow::demo::Demo::start(&args, &mut settings) {
            Ok(demo) => {
                let result = serve(settings, &url).await;
                demo.stop().await;
                result
            }
            Err(e) => Err(e),
        },
        Command::Produce(_) => unreachable!("handled before the database starts"),
    };
    if let Some(mut pg) = embedded {
        tokio::task::spawn_blocking(move || pg.stop()).await??;
    }
    result
}

async fn serve(settings: ordercast::config::Settings, url: &str) -> anyhow::Result<()> {
    let app = Application::build(settings.clone(), url).await?;
    let handle = app.handle();
    log::info!("ordercast listening on http://{}:{} (dashboard at /)", settings.bind.ip(), app.port());
    let mut server = tokio::spawn(app.run_until_stopped());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = &mut server => {
            r??;
            anyhow::bail!("the HTTP server stopped by itself");
        }
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT: shutting down"),
        _ = term.recv() => log::info!("SIGTERM: shutting down"),
    }
    handle.stop().await;
    server.await??;
    Ok(())
}

/// `ordercast process`: the processor alone, until SIGTERM or SIGINT.
async fn process(settings: ordercast::config::Settings, url: &str) -> anyhow::Result<()> {
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut processor = tokio::spawn({
        let url = url.to_string();
        async move { ordercast::workflow::processor::run_standalone(&settings, &url, shutdown).await }
    });
    tokio::select! {
        r = &mut processor => return r?,
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT: shutting down"),
        _ = term.recv() => log::info!("SIGTERM: shutting down"),
    }
    let _ = stop.send(true);
    processor.await?
}

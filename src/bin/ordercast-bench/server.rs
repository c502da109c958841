//! The server under test: a fresh database, the `ordercast` binary started as
//! a child process on it (or an already running server given by URL), and its
//! resident memory read from `/proc/<pid>/status`.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

/// A database created for one benchmark run; dropped by `drop_now`.
pub struct BenchDb {
    pub admin_url: String,
    pub name: String,
    pub url: String,
}

impl BenchDb {
    pub async fn create(admin_url: &str) -> anyhow::Result<BenchDb> {
        let name = format!("oc_bench_{}", uuid::Uuid::new_v4().simple());
        let admin = ordercast::db::connect(admin_url).await.context("Failed to connect to the admin database")?;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.map_err(ordercast::db::describe)?;
        let base = admin_url.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin_url);
        let url = format!("{base}/{name}");
        ordercast::db::migrate(&url).await.context("Failed to migrate the benchmark database")?;
        Ok(BenchDb { admin_url: admin_url.to_string(), name, url })
    }

    pub async fn drop_now(self) {
        if let Ok(admin) = ordercast::db::connect(&self.admin_url).await {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await;
        }
    }
}

/// A server to benchmark: either our child process or an external URL.
pub struct Server {
    pub port: u16,
    pub host: String,
    /// Known only for a server we started (or one given with `--pid`).
    pub pid: Option<u32>,
    /// The reference broadcaster (`reference.rs`), not ordercast.
    pub reference: bool,
    child: Option<Child>,
}

/// How to reach or start the server.
#[derive(Clone, Debug)]
pub enum Target {
    Spawn {
        binary: PathBuf,
        extra_env: Vec<(String, String)>,
    },
    Url {
        url: String,
        pid: Option<u32>,
    },
    /// The reference broadcaster: this binary with `reference::FLAG`.
    Reference,
}

impl Server {
    pub fn start(target: &Target, database_url: &str) -> anyhow::Result<Server> {
        match target {
            Target::Url { url, pid } => {
                let rest = url.trim_start_matches("http://").trim_end_matches('/');
                let (host, port) = rest.rsplit_once(':').context("--url must be http://HOST:PORT")?;
                Ok(Server {
                    port: port.parse().context("bad port in --url")?,
                    host: host.to_string(),
                    pid: *pid,
                    reference: false,
                    child: None,
                })
            }
            Target::Spawn { binary, extra_env } => Self::spawn(binary, &[], extra_env, database_url),
            Target::Reference => {
                // Tokio's default runtime, one thread per core, whatever this
                // process's own setting (docs/performance.md).
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let env = [("TOKIO_WORKER_THREADS".to_string(), cores.to_string())];
                let mut server = Self::spawn(&std::env::current_exe()?, &[crate::reference::FLAG], &env, database_url)?;
                server.reference = true;
                Ok(server)
            }
        }
    }

    fn spawn(
        binary: &PathBuf,
        args: &[&str],
        extra_env: &[(String, String)],
        database_url: &str,
    ) -> anyhow::Result<Server> {
        if !binary.exists() {
            bail!("{} does not exist: build it with `cargo build --release --bins`", binary.display());
        }
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .env("DATABASE_URL", database_url)
            .env("ORDERCAST_BIND", "127.0.0.1:0")
            .env("RUST_LOG", "warn,ordercast=info")
            // The benchmark opens up to 19,000 connections from 253 addresses.
            .env("ORDERCAST_MAX_CONNECTIONS", "19990")
            .env("ORDERCAST_MAX_CONNECTIONS_PER_IP", "20000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        // A benchmark killed (SIGKILL, a closed terminal) takes its server
        // with it, or the server would hold its port, its connections and
        // two cores' worth of load over the next run. The signal follows the
        // thread that spawned the child: a runtime worker or the main
        // thread, which live as long as the benchmark.
        let parent = nix::unistd::getpid();
        // SAFETY: between fork and exec only async-signal-safe calls are
        // made (prctl, getppid, kill).
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                // The benchmark died before the signal was set.
                if nix::unistd::getppid() != parent {
                    nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL)?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("Failed to start {}", binary.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (port_tx, port_rx) = mpsc::channel();
        // Drain the server's log for its whole life (a full pipe would block
        // it); pass warnings and errors on, so a failing run says why.
        std::thread::spawn(move || {
            let mut port_tx = Some(port_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let port = rest.split_whitespace().next().and_then(|a| a.rsplit_once(':')).map(|(_, p)| p);
                    if let (Some(tx), Some(Ok(p))) = (port_tx.take(), port.map(str::parse::<u16>)) {
                        let _ = tx.send(p);
                    }
                } else if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("  [server] {line}");
                }
            }
        });
        let pid = child.id();
        match port_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(port) => {
                Ok(Server { port, host: "127.0.0.1".into(), pid: Some(pid), reference: false, child: Some(child) })
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the server did not report its port within 60 s")
            }
        }
    }

    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}:{}{}", self.host, self.port, path_and_query)
    }

    /// Resident set size in bytes, from /proc (None for an external server).
    pub fn rss_bytes(&self) -> Option<u64> {
        self.status_kib("VmRSS:").map(|kib| kib * 1024)
    }

    /// The largest resident set size the server has had, in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        self.status_kib("VmHWM:").map(|kib| kib * 1024)
    }

    fn status_kib(&self, key: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            for _ in 0..100 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

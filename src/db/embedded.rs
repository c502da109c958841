//! A private PostgreSQL instance run from the installed binaries, so
//! `ordercast` works with no external services: initdb on first use, a free
//! local port, and a clean stop on exit. As root, PostgreSQL (which refuses to
//! run as root) is run as the `postgres` user.
//!
//! Its superuser `postgres` signs in with a password (SCRAM) kept in
//! `<dir>/pgpass` (libpq's password-file form, readable by its owner only):
//! with `trust`, any user of the machine could connect to 127.0.0.1 as the
//! superuser, past ordercast's API keys, and run commands as the server's
//! account (`COPY ... TO PROGRAM`). An instance made before had `trust`: it is
//! given a password at its next start.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A start given up because ordercast was asked to stop meanwhile; what it
/// had started is stopped.
#[derive(Debug, thiserror::Error)]
#[error("stopped before the embedded PostgreSQL was up")]
pub struct Cancelled;

/// How long a stop waits for PostgreSQL to finish a fast shutdown before it
/// shuts down at once (immediate: crash recovery at the next start), and
/// then for that.
const FAST_STOP: Duration = Duration::from_secs(60);
const IMMEDIATE_STOP: Duration = Duration::from_secs(10);

/// A running private PostgreSQL. Stopped on `stop()` or when dropped.
pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    /// The superuser's password, and the file that keeps it.
    password: String,
    password_file: PathBuf,
    run_as: Option<(u32, u32)>,
    extra_options: String,
    /// The server process (`postgres`, run by this process): None once
    /// stopped.
    server: Option<Child>,
    /// Set when ordercast is asked to stop: a start still under way gives up.
    cancel: Arc<AtomicBool>,
    /// `<dir>/lock`, held (an exclusive lock) for the instance's life: a
    /// second ordercast on the same directory is refused instead of
    /// stopping this one's server to start its own.
    _lock: std::fs::File,
}

/// Where the PostgreSQL server binaries are: `ORDERCAST_PG_BIN`, else the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("ORDERCAST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "PostgreSQL is not installed: run `apt-get install -y postgresql` (or set DATABASE_URL to use an existing server)"
        ),
    }
}

/// The first directory above `dir` that users other than its owner and
/// group cannot pass through (no execute bit for others), if any: the
/// postgres user cannot reach `dir` then.
fn blocked_ancestor(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    for d in dir.ancestors().skip(1) {
        if d.exists() && std::fs::metadata(d)?.permissions().mode() & 0o001 == 0 {
            return Ok(Some(d.to_path_buf()));
        }
    }
    Ok(None)
}

/// Where the data of `data_dir` goes when the postgres user cannot reach it:
/// a directory under /var/lib/ordercast named by a stable hash (FNV-1a) of
/// the path, so the same checkout finds its database again.
fn reachable_home(data_dir: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let hash = data_dir
        .as_os_str()
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3));
    PathBuf::from(format!("/var/lib/ordercast/embedded-{hash:016x}/pg"))
}

/// Creates `home`'s parents below /var/lib as directories root owns that
/// others may pass through (0755, whatever the umask), and refuses one that
/// is a link or not root's alone.
fn make_reachable_parent(home: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let mut parents: Vec<&Path> = home.ancestors().skip(1).take_while(|p| *p != Path::new("/var/lib")).collect();
    parents.reverse();
    for dir in parents {
        if let Err(e) = std::fs::DirBuilder::new().mode(0o755).create(dir) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e).with_context(|| format!("Failed to create {}", dir.display()));
            }
        }
        let meta = std::fs::symlink_metadata(dir)?;
        if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            bail!("{} is not a directory that root alone may write: choose a --data-dir", dir.display());
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Takes `<dir>/lock` for this process, and writes its pid there; refused
/// while another process holds it.
fn lock_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("Failed to open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "{} is in use by another ordercast (pid {}): stop it, give this one the URL that ordercast logged \
                 with the password in {} (postgres://postgres:PASSWORD@127.0.0.1:PORT/ordercast) as \
                 DATABASE_URL, or choose another --data-dir",
                dir.display(),
                holder.trim(),
                dir.join("pgpass").display()
            );
        }
        // A file system without locks (NFS mounted `nolock`, some FUSE or
        // CIFS mounts): go on without, as before there was a lock.
        Err(std::fs::TryLockError::Error(e))
            if e.kind() == std::io::ErrorKind::Unsupported || e.raw_os_error() == Some(nix::libc::ENOLCK) =>
        {
            log::warn!(
                "{} cannot be locked ({e}): nothing stops a second ordercast from using this data directory",
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("Failed to lock {}", path.display()));
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

/// The client authentication the instance is given: a password (SCRAM) for
/// every connection, over TCP on loopback (it has no Unix socket).
const HBA: &str = "\
# Written by ordercast at each start: the superuser's password is in the
# pgpass file of ordercast's data directory.
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
";

/// The password in `path` (a line `host:port:db:user:password`), or a new
/// one written there (readable by its owner only); the flag says it is new.
fn password(path: &Path) -> anyhow::Result<(String, bool)> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let password = text.lines().next().and_then(|l| l.rsplit(':').next()).unwrap_or_default();
            if !password.is_empty() && password.bytes().all(|b| b.is_ascii_hexdigit()) {
                // libpq ignores a password file others may read.
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                return Ok((password.to_string(), false));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("Failed to read {}", path.display())),
    }
    let password: String = rand::random::<[u8; 24]>().iter().map(|b| format!("{b:02x}")).collect();
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("Failed to create {}", path.display()))?;
    writeln!(file, "127.0.0.1:*:*:postgres:{password}")?;
    file.sync_all()?;
    Ok((password, true))
}

/// The last lines of PostgreSQL's log (why it exited), on one line.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[text.len().saturating_sub(2048)..]).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" / ")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EmbeddedPostgres {
    /// Starts (creating on first use) an instance with its data in `dir`.
    /// `extra_options` are passed to the server as arguments split at
    /// whitespace (`-c name=value ...`; no quoting).
    pub fn start(dir: &Path, extra_options: &str) -> anyhow::Result<EmbeddedPostgres> {
        EmbeddedPostgres::start_cancellable(dir, extra_options, Arc::new(AtomicBool::new(false)))
    }

    /// [`start`](Self::start), given up with [`Cancelled`] (what it started
    /// stopped) once `cancel` is set: a stop signal during initdb, or while
    /// PostgreSQL replays its log after a crash, which may take long.
    pub fn start_cancellable(
        dir: &Path,
        extra_options: &str,
        cancel: Arc<AtomicBool>,
    ) -> anyhow::Result<EmbeddedPostgres> {
        let bin_dir = find_bin_dir()?;
        std::fs::create_dir_all(dir).with_context(|| format!("Failed to create {}", dir.display()))?;
        let lock = lock_dir(dir)?;
        let mut data_dir = std::fs::canonicalize(dir)?.join("pg");
        let run_as = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .context("running as root, but there is no `postgres` user to run PostgreSQL as (apt-get install -y postgresql creates it)")?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        } else {
            None
        };
        // Root's directory (a checkout under /root, which is 0700) may be out
        // of the postgres user's reach: the data then goes to a directory of
        // its own under /var/lib/ordercast (root's: no other user can put a
        // directory or a link there first), the same one every time for `dir`.
        if run_as.is_some() && !data_dir.join("PG_VERSION").exists() {
            if let Some(blocked) = blocked_ancestor(&data_dir)? {
                let home = reachable_home(&data_dir);
                make_reachable_parent(&home)?;
                log::warn!(
                    "{} is not reachable by the postgres user: the embedded PostgreSQL keeps its data in {} instead \
                     (choose another place with --data-dir)",
                    blocked.display(),
                    home.display()
                );
                data_dir = home;
            }
        }
        let password_file = std::fs::canonicalize(dir)?.join("pgpass");
        let (password, new_password) = password(&password_file)?;
        let mut pg = EmbeddedPostgres {
            bin_dir,
            data_dir,
            port: 0,
            password,
            password_file,
            run_as,
            extra_options: extra_options.to_string(),
            server: None,
            cancel,
            _lock: lock,
        };
        pg.init()?;
        pg.stop_stale()?;
        pg.require_password(new_password)?;
        // The free port found may be taken by someone else before the server
        // binds it: another one is tried then.
        for tries_left in (0..3).rev() {
            pg.port = free_port()?;
            match pg.launch() {
                Err(e) if tries_left > 0 && format!("{e:#}").contains("Address already in use") => {
                    log::warn!("port {} was taken before PostgreSQL could bind it: trying another", pg.port)
                }
                r => return r.map(|()| pg),
            }
        }
        unreachable!("the last try returns")
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        // A group of its own: a Ctrl-C at the terminal (or its hangup)
        // reaches ordercast alone, which stops what it started. initdb
        // caught it and left an empty directory, which then looked like a
        // locale failure.
        cmd.env_remove("PGDATA").stdin(Stdio::null()).process_group(0);
        cmd
    }

    /// Runs `cmd` to its end, or until ordercast is asked to stop: its
    /// process group is then ended (SIGTERM) and the start given up.
    fn run(&self, mut cmd: Command, what: &str) -> anyhow::Result<()> {
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("Failed to run {what}"))?;
        let group = nix::unistd::Pid::from_raw(child.id() as i32);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output()));
        let out = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(out) => break out.with_context(|| format!("Failed to run {what}"))?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if self.cancel.load(Ordering::Acquire) => {
                    // Its own process group (`command`): its children too.
                    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
                    let _ = rx.recv();
                    return Err(Cancelled.into());
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!("{what}: its waiting thread ended"),
            }
        };
        if !out.status.success() {
            bail!(
                "{what} failed: {}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(())
    }

    /// Creates the cluster on first use. initdb writes into a directory of
    /// its own beside the data directory, which takes the data directory's
    /// name only once initdb has finished and synced it: an initdb cut short
    /// (killed, a power loss) leaves that directory, made again at the next
    /// start, and never a data directory that looks made (`PG_VERSION` is
    /// among the first files initdb writes). Before, every later start then
    /// failed until someone deleted it.
    fn init(&self) -> anyhow::Result<()> {
        if self.data_dir.join("PG_VERSION").exists() {
            return Ok(());
        }
        let partial = self.data_dir.with_extension("initdb-partial");
        let fresh = || -> anyhow::Result<()> {
            if partial.exists() {
                std::fs::remove_dir_all(&partial)
                    .with_context(|| format!("Failed to remove {} (an initdb cut short)", partial.display()))?;
            }
            std::fs::create_dir_all(&partial)?;
            if let Some((uid, gid)) = self.run_as {
                nix::unistd::chown(&partial, Some(uid.into()), Some(gid.into()))?;
            }
            Ok(())
        };
        fresh()?;
        // The postgres user must be able to reach the data directory.
        if self.run_as.is_some() {
            if let Some(d) = blocked_ancestor(&partial)? {
                bail!(
                    "{} is not reachable by the postgres user; choose another --data-dir (e.g. /var/tmp/ordercast)",
                    d.display()
                );
            }
        }
        log::info!("initialising a private PostgreSQL in {}", self.data_dir.display());
        // A UTF-8 character type whatever the environment's locale: with `C`,
        // PostgreSQL's lower() folds only ASCII, and customer names would
        // compare otherwise in SQL than in the server (`fold_case`).
        let initdb = |locale: Option<&str>| {
            let mut cmd = self.command("initdb");
            cmd.arg("-D").arg(&partial).args(["-U", "postgres", "-A", "trust", "-E", "UTF8"]);
            cmd.args(locale.map(|l| format!("--locale={l}")));
            self.run(cmd, "initdb")
        };
        initdb(Some("C.UTF-8")).or_else(|e| {
            if e.is::<Cancelled>() {
                return Err(e);
            }
            log::warn!("initdb with the C.UTF-8 locale failed ({e:#}): using the environment's locale");
            fresh()?;
            initdb(None)
        })?;
        if self.data_dir.exists() {
            // An empty directory (made by hand, or by an earlier version).
            std::fs::remove_dir(&self.data_dir).with_context(|| {
                format!("{} exists without a PostgreSQL cluster in it: remove it", self.data_dir.display())
            })?;
        }
        std::fs::rename(&partial, &self.data_dir)
            .with_context(|| format!("Failed to move the new cluster to {}", self.data_dir.display()))?;
        // The rename, durable too.
        if let Some(parent) = self.data_dir.parent() {
            std::fs::File::open(parent).and_then(|d| d.sync_all()).ok();
        }
        Ok(())
    }

    /// The server's arguments: its port, TCP on 127.0.0.1 only, and no Unix
    /// socket (a socket's path must fit in 107 bytes, which a data directory
    /// deep in a checkout does not), then `extra_options`.
    fn server_args(&self) -> Vec<String> {
        let mut args = vec![
            "-p".to_string(),
            self.port.to_string(),
            "-c".to_string(),
            "unix_socket_directories=".to_string(),
            "-c".to_string(),
            "listen_addresses=127.0.0.1".to_string(),
            // Its messages in English, whatever the cluster's locale: a port
            // taken before the bind is told by its message.
            "-c".to_string(),
            "lc_messages=C".to_string(),
        ];
        args.extend(self.extra_options.split_whitespace().map(str::to_string));
        args
    }

    /// Stops a server a previous run killed with SIGKILL may have left
    /// running (this process holds the directory's lock: no live ordercast
    /// owns it).
    ///
    /// `postmaster.pid` may name another process: after a host restart its
    /// pid may be anyone's, which `pg_ctl stop` would signal (it does not
    /// check) and because of which PostgreSQL would refuse to start. A
    /// PostgreSQL server runs in its data directory: the process is that
    /// server when its working directory is this one. A file naming a
    /// process that is not a PostgreSQL server (or none) is removed; one
    /// naming another PostgreSQL server stops the start (deleting the lock
    /// file of a server that may be running on this directory could let
    /// two run on it).
    fn stop_stale(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let pid_file = self.data_dir.join("postmaster.pid");
        let Ok(text) = std::fs::read_to_string(&pid_file) else { return Ok(()) };
        let pid = text.lines().next().and_then(|l| l.trim().parse::<u32>().ok());
        let proc = |what: &str| pid.map(|pid| PathBuf::from(format!("/proc/{pid}/{what}")));
        let postgres =
            proc("comm").and_then(|p| std::fs::read_to_string(p).ok()).is_some_and(|c| c.trim() == "postgres");
        let here = |dir: &Path| std::fs::metadata(dir).map(|m| (m.dev(), m.ino())).ok();
        let ours = postgres && proc("cwd").and_then(|cwd| here(&cwd)).is_some_and(|d| Some(d) == here(&self.data_dir));
        if ours {
            log::warn!(
                "stopping a PostgreSQL (pid {}) left running on {}",
                pid.unwrap_or_default(),
                self.data_dir.display()
            );
            let stop = |mode: &str| {
                let mut stop = self.command("pg_ctl");
                stop.arg("-D").arg(&self.data_dir).args(["-m", mode, "-w", "-t", "60", "stop"]);
                self.run(stop, "pg_ctl stop")
            };
            if let Err(e) = stop("fast") {
                if e.is::<Cancelled>() {
                    return Err(e);
                }
                log::warn!("{e:#}: stopping it at once");
                stop("immediate").with_context(|| {
                    format!(
                        "the PostgreSQL (pid {}) left running on {} cannot be stopped: stop it by hand",
                        pid.unwrap_or_default(),
                        self.data_dir.display()
                    )
                })?;
            }
        } else if postgres {
            bail!(
                "{} names a running PostgreSQL server (pid {}) that ordercast cannot tell apart from this \
                 directory's: stop it, or remove the file if it serves another directory",
                pid_file.display(),
                pid.unwrap_or_default()
            );
        } else {
            log::warn!("removing {}, left by a PostgreSQL that is gone", pid_file.display());
            std::fs::remove_file(&pid_file).with_context(|| format!("Failed to remove {}", pid_file.display()))?;
        }
        Ok(())
    }

    /// Gives the superuser the password (when it is new, or the instance
    /// does not ask for one yet: made with `trust` before) and writes `HBA`.
    /// The server is stopped: the password is set in single-user mode.
    fn require_password(&self, new_password: bool) -> anyhow::Result<()> {
        let hba = self.data_dir.join("pg_hba.conf");
        let current = std::fs::read_to_string(&hba).with_context(|| format!("Failed to read {}", hba.display()))?;
        if !new_password && current == HBA {
            return Ok(());
        }
        let mut cmd = self.command("postgres");
        cmd.arg("--single").arg("-D").arg(&self.data_dir).args(["-c", "exit_on_error=on", "postgres"]);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("Failed to run postgres --single")?;
        {
            use std::io::Write;
            // unwrap: piped above
            let mut stdin = child.stdin.take().unwrap();
            // The password is hex: nothing in it needs quoting.
            writeln!(stdin, "SET password_encryption = 'scram-sha-256'")?;
            writeln!(stdin, "ALTER ROLE postgres PASSWORD '{}'", self.password)?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            // Its log repeats the statement, password and all.
            bail!(
                "setting the superuser's password (postgres --single) failed: {}",
                String::from_utf8_lossy(&out.stderr).trim().replace(&self.password, "***")
            );
        }
        // Written in place: the file keeps its owner (the postgres user).
        std::fs::write(&hba, HBA).with_context(|| format!("Failed to write {}", hba.display()))?;
        log::info!(
            "the embedded PostgreSQL's superuser signs in with the password in {}",
            self.password_file.display()
        );
        Ok(())
    }

    /// Runs the server and waits until it takes connections, with no time
    /// limit while it is alive: after a crash it first replays its log, which
    /// may take minutes, and a start given up then (pg_ctl's 60 s) left it
    /// running, and at the next start stopped and replayed from the same
    /// point, never done. A stop signal ends the wait ([`Cancelled`]) and the
    /// server with it.
    fn launch(&mut self) -> anyhow::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        if self.data_dir.join("standby.signal").exists() {
            bail!(
                "the embedded PostgreSQL in {} is a standby (a standby.signal file is there), which takes no writes",
                self.data_dir.display()
            );
        }
        let log_path = self.data_dir.join("postgres.log");
        let log_c = std::ffi::CString::new(log_path.as_os_str().as_bytes())?;
        let mut cmd = Command::new(self.bin_dir.join("postgres"));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.arg("-D").arg(&self.data_dir).args(self.server_args());
        cmd.env_remove("PGDATA").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // A session of its own, as pg_ctl gives it: a Ctrl-C or a hangup at
        // the terminal reaches ordercast alone, which stops it. Its log is
        // opened by its own process, as the user it runs as (and not through
        // a link): ordercast as root, opening a file in a directory the
        // postgres user owns, would open (and hand over) whatever file a
        // link put there names.
        // SAFETY: setsid, open, dup2 and close are async-signal-safe, and
        // the path was made before the fork: nothing is allocated.
        unsafe {
            cmd.pre_exec(move || {
                use nix::fcntl::{open, OFlag};
                nix::unistd::setsid()?;
                let flags = OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT | OFlag::O_NOFOLLOW;
                let fd = open(log_c.as_c_str(), flags, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
                nix::unistd::dup2(fd, 1)?;
                nix::unistd::dup2(fd, 2)?;
                if fd > 2 {
                    nix::unistd::close(fd)?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("Failed to run postgres (its log {})", log_path.display()))?;
        let pid = child.id();
        self.server = Some(child);
        let pid_file = self.data_dir.join("postmaster.pid");
        let mut told = Instant::now();
        loop {
            // unwrap: set above, and taken only by `stop`.
            if let Some(status) = self.server.as_mut().unwrap().try_wait()? {
                self.server = None;
                bail!(
                    "PostgreSQL exited ({status}) before it took connections: {} (see {})",
                    log_tail(&log_path),
                    log_path.display()
                );
            }
            if self.cancel.load(Ordering::Acquire) {
                self.stop()?;
                return Err(Cancelled.into());
            }
            // postmaster.pid's eighth line is the server's state, `ready`
            // once it takes connections (what pg_ctl -w waits for).
            let state = std::fs::read_to_string(&pid_file).ok().and_then(|text| {
                let lines: Vec<&str> = text.lines().collect();
                let ours = lines.first()?.trim().parse::<u32>().ok()? == pid;
                ours.then(|| lines.get(7).map(|l| l.trim().to_string())).flatten()
            });
            // ("standby": replaying its log, taking no connections yet, as a
            // server recovering from a crash says too.)
            if state.as_deref() == Some("ready") {
                return Ok(());
            }
            if told.elapsed() >= Duration::from_secs(10) {
                log::info!(
                    "the embedded PostgreSQL is still starting (after a crash it first replays its log): see {}",
                    log_path.display()
                );
                told = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (fast shutdown: open sessions are disconnected; at
    /// once if that takes over a minute). Done once: a stop that failed is
    /// not tried again when the instance is dropped.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        use nix::sys::signal::{kill, Signal};
        let Some(mut server) = self.server.take() else { return Ok(()) };
        let pid = nix::unistd::Pid::from_raw(server.id() as i32);
        for (signal, within) in [(Signal::SIGINT, FAST_STOP), (Signal::SIGQUIT, IMMEDIATE_STOP)] {
            if server.try_wait()?.is_some() {
                return Ok(());
            }
            if signal == Signal::SIGQUIT {
                log::warn!("the embedded PostgreSQL did not stop within {FAST_STOP:?}: stopping it at once");
            }
            let _ = kill(pid, signal);
            let deadline = Instant::now() + within;
            while Instant::now() < deadline {
                if server.try_wait()?.is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        bail!("the embedded PostgreSQL (pid {pid}) did not stop: stop it by hand")
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.launch()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of a database on this server, with the superuser's password.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres:{}@127.0.0.1:{}/{}", self.password, self.port, database)
    }

    /// What a person runs to reach `database` with psql: the URL without
    /// the password, which psql reads from the password file.
    pub fn psql_command(&self, database: &str) -> String {
        format!(
            "PGPASSFILE={} psql postgres://postgres@127.0.0.1:{}/{}",
            self.password_file.display(),
            self.port,
            database
        )
    }

    /// Creates `database` unless it exists.
    pub async fn ensure_database(&self, database: &str) -> anyhow::Result<()> {
        let client = super::connect(&self.url("postgres")).await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
            .await
            .map_err(super::describe)?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!("CREATE DATABASE \"{}\"", database.replace('"', "\"\"")))
                .await
                .map_err(super::describe)?;
        }
        Ok(())
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("failed to stop the private PostgreSQL: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_out_of_reach_is_found_and_given_a_stable_home_elsewhere() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("oc-reach-{}", std::process::id()));
        let closed = base.join("closed");
        std::fs::create_dir_all(closed.join("inner")).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let data = closed.join("inner").join("pg");
        assert_eq!(blocked_ancestor(&data).unwrap(), Some(closed.clone()));
        assert_eq!(blocked_ancestor(&base.join("pg")).unwrap(), None);
        let home = reachable_home(&data);
        assert_eq!(home, reachable_home(&data));
        assert_ne!(home, reachable_home(&base.join("pg")));
        assert!(home.starts_with("/var/lib/ordercast/") && home.ends_with("pg"), "{}", home.display());
        std::fs::remove_dir_all(&base).unwrap();
    }
}

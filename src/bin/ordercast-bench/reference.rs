//! The reference broadcaster: the minimal LISTEN/NOTIFY design, run by the
//! `ref-latency` and `ref-fanout` scenarios in ordercast's place, so a figure
//! of ordercast's can be read against what the same machine gives a server
//! that does almost nothing.
//!
//! A deferred trigger on `orders` sends each committed row as the NOTIFY
//! payload, already in the shape of ordercast's `change` message (same row
//! image, same envelope, the commit time last), numbered by a sequence taken
//! at commit. The server LISTENs on one connection, frames each payload once
//! and hands the shared frame to every client through a broadcast channel;
//! each client's task writes whatever has queued for it with one write, on
//! Tokio's default runtime. It reads no change log, keeps no history, parses
//! no JSON and filters nothing; it has no catch-up after a reconnect, no
//! ordering across concurrent writers, and a client that falls behind is
//! dropped. What it shows is what the published design, done simply in Rust,
//! gives on the same machine in the same phase of its speed: the baseline
//! ordercast's design has to beat while doing all of that. The database does
//! the same work as under ordercast (its triggers stay on), plus this trigger.
//!
//! Started as `ordercast-bench --reference-server` with `DATABASE_URL` and
//! `ORDERCAST_BIND`; it reports `listening on http://ADDR` on stderr, as
//! `ordercast` does.

use anyhow::{bail, Context};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_postgres::AsyncMessage;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use ordercast::changes::wire;

use crate::clients::{parse_msg, Msg};

/// The first argument that makes `ordercast-bench` this server.
pub const FLAG: &str = "--reference-server";

/// Frames a client may fall behind by before it is dropped (the bench counts
/// that as a client error).
const BACKLOG: usize = 16 * 1024;

/// The trigger, installed at start on the benchmark's fresh database. The
/// payload is ordercast's change envelope: `{"type":"change","seq":N,
/// "op":"insert","order":{...},"old":null,"actor":"...","at":"..."}`.
///
/// `at` is taken once per transaction, by its first row's trigger at commit,
/// as ordercast's sequencer takes one commit time per transaction (the
/// sequencer runs after these triggers, so the reference's is the earlier).
/// The numbering holds for one writer committing one transaction at a time,
/// which is what the benchmark's writer does: with concurrent writers,
/// `nextval` order is not commit order, and a rolled-back transaction's
/// numbers would count as lost.
const INSTALL_SQL: &str = r#"
CREATE SEQUENCE IF NOT EXISTS bench_reference_seq;
CREATE OR REPLACE FUNCTION bench_reference_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    at text := current_setting('bench_reference.at', true);
BEGIN
    IF at IS NULL OR at = '' THEN
        at := to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
        PERFORM set_config('bench_reference.at', at, true);
    END IF;
    PERFORM pg_notify('bench_reference',
        '{"type":"change","seq":' || nextval('bench_reference_seq')
        || ',"op":"' || lower(TG_OP) || '","order":' || to_json(NEW)
        || ',"old":null,"actor":' || to_json(ordercast_actor())
        || ',"at":"' || at || '"}');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS bench_reference ON orders;
CREATE CONSTRAINT TRIGGER bench_reference AFTER INSERT OR UPDATE ON orders
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bench_reference_notify();
"#;

/// The newest position the reference server has sent, read by the bench
/// after its writes (the `head` its clients must reach).
pub const HEAD_SQL: &str = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM bench_reference_seq";

/// Runs the reference server until it is killed.
pub fn main() -> ! {
    // `#[tokio::main]`'s runtime, one worker thread per core: what a plain
    // implementation gets. One thread gave it a far worse tail here (the
    // listener waits behind each round of client writes).
    let result = tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
            let bind = std::env::var("ORDERCAST_BIND").unwrap_or_else(|_| "127.0.0.1:0".into());
            serve(&url, &bind).await
        })
    });
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("ERROR reference server: {e:#}");
            std::process::exit(1)
        }
    }
}

async fn serve(url: &str, bind: &str) -> anyhow::Result<()> {
    let (db, mut connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.context("connect the listener")?;
    // The connection is driven by this stream only (a spawned or awaited
    // `Connection` would swallow the notifications).
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let setup = async {
        db.batch_execute(INSTALL_SQL).await?;
        db.batch_execute("LISTEN bench_reference").await?;
        db.query_one(HEAD_SQL, &[]).await
    };
    // The setup's answers arrive through the same connection: poll it too.
    tokio::pin!(setup);
    let head: i64 = loop {
        tokio::select! {
            r = &mut setup => break r.map_err(ordercast::db::describe).context("install the trigger")?.get(0),
            m = messages.next() => match m {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(ordercast::db::describe(e)).context("listener"),
                None => bail!("the listener's connection closed during setup"),
            },
        }
    };
    // The newest seq sent: a new client starts after it.
    let mut last = head;
    let (tx, _) = broadcast::channel::<Bytes>(BACKLOG);
    let listener = TcpListener::bind(bind).await.with_context(|| format!("bind {bind}"))?;
    eprintln!("reference server listening on http://{}", listener.local_addr()?);
    loop {
        tokio::select! {
            m = messages.next() => match m {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let payload = n.payload();
                    // Read as the bench's clients read it.
                    if let Msg::Change { seq, .. } = parse_msg(payload) {
                        last = last.max(seq);
                    }
                    // No receivers (no client yet) is not an error.
                    let _ = tx.send(wire::frame(wire::OP_TEXT, payload.as_bytes()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(ordercast::db::describe(e)).context("listener"),
                None => bail!("the listener's connection closed"),
            },
            a = listener.accept() => {
                let tcp = match a {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of file descriptors, say: do not spin.
                        eprintln!("WARN reference server: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // Subscribed and told its start in one step of the task
                // that also sends: no notification falls between the two.
                let rx = tx.subscribe();
                let start = last;
                tokio::spawn(async move {
                    let _ = client(tcp, rx, start).await;
                });
            }
        }
    }
}

/// One client: the WebSocket handshake, `ready` with its start, then every
/// frame queued for it, as many as have queued per write.
async fn client(mut tcp: TcpStream, mut rx: broadcast::Receiver<Bytes>, start: i64) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    // A client that never finishes its request lets its receiver go.
    let key = tokio::time::timeout(std::time::Duration::from_secs(30), read_upgrade(&mut tcp))
        .await
        .context("no upgrade request within 30 s")??;
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    )
    .into_bytes();
    out.extend_from_slice(&wire::frame(wire::OP_TEXT, format!(r#"{{"type":"ready","seq":{start}}}"#).as_bytes()));
    tcp.write_all(&out).await?;
    let (mut read, mut write) = tcp.split();
    let mut scratch = [0u8; 512];
    loop {
        tokio::select! {
            r = rx.recv() => {
                out.clear();
                out.extend_from_slice(&r?);
                loop {
                    match rx.try_recv() {
                        Ok(f) => out.extend_from_slice(&f),
                        Err(broadcast::error::TryRecvError::Empty) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                write.write_all(&out).await?;
            }
            // The client sends only its closing frame: ignored, then the end.
            n = read.read(&mut scratch) => if n? == 0 { return Ok(()) },
        }
    }
}

/// Reads the upgrade request's head and returns its `Sec-WebSocket-Key`.
async fn read_upgrade(tcp: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::with_capacity(1024);
    // The client sends nothing after its request until it has the answer,
    // so a read never takes more than the head.
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            bail!("upgrade request too long");
        }
        if tcp.read_buf(&mut head).await? == 0 {
            bail!("closed during the upgrade");
        }
    }
    let head = std::str::from_utf8(&head)?;
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-key"))
        .map(|(_, v)| v.trim().to_string())
        .context("no Sec-WebSocket-Key")
}

//! Load-generating clients: WebSocket (a minimal RFC 6455 client written here)
//! and SSE (plain HTTP/1.1 over TCP, chunked decoding by hand), so that no
//! client library sits in the way: the load generator shares the machine with
//! the server it measures, and every cycle it spends is one the server lacks.
//!
//! Every client counts what it receives against the change log's positions:
//! after `ready` (position P) it must see exactly P+1, P+2, ... up to the head
//! the writer reached. A position seen twice is a duplicate, one skipped is
//! lost. The commit -> receive latency of each change is the receive time
//! minus the change's `at` (the sequencer's clock_timestamp() at commit, same
//! machine clock). The receive time is taken once per read from the socket:
//! the messages of one read arrived together.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// What one client saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub received: u64,
    pub duplicates: u64,
    pub lost: u64,
    /// Commit -> receive, microseconds, one per change received.
    pub latencies_us: Vec<u32>,
    /// When the client received its last change (microseconds since the epoch).
    pub last_receive_us: i64,
    /// Socket reads that brought at least one new change: how many times the
    /// server's writes reached this client (`received / receives` changes
    /// arrived together on average).
    pub receives: u64,
    /// The last position the client reached (None: it never was ready).
    pub reached: Option<i64>,
    pub error: Option<String>,
}

impl Tally {
    /// Counts as lost every change up to `head` the client did not reach:
    /// also for one that stopped before the head was known (its connection
    /// closed by the server, say), whose missing changes would otherwise
    /// count nowhere.
    pub fn settle(&mut self, head: i64) {
        if let Some(last) = self.reached {
            self.lost += (head - last).max(0) as u64;
        }
    }
}

/// Where the clients stop: the writer publishes the final head here.
pub type Finish = watch::Receiver<Option<i64>>;

/// Which commit -> receive latencies the clients keep: none, or those of the
/// changes committed at or after a time the scenario sets once, shared by
/// all its clients (until then, every change's). A latency run starts with a
/// warm-up whose changes are counted (loss, duplicates) but not sampled.
#[derive(Clone, Debug)]
pub struct Sampling(Option<Arc<AtomicI64>>);

impl Sampling {
    pub fn new(keep: bool) -> Sampling {
        Sampling(keep.then(|| Arc::new(AtomicI64::new(i64::MIN))))
    }

    /// Keep only the changes committed at or after `at_us` (microseconds
    /// since the epoch) from now on.
    pub fn from(&self, at_us: i64) {
        if let Some(from) = &self.0 {
            from.store(at_us, Ordering::Relaxed);
        }
    }

    fn keeps(&self, at_us: i64) -> bool {
        self.0.as_ref().is_some_and(|from| at_us >= from.load(Ordering::Relaxed))
    }
}

pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or_default()
}

/// Source address for the i-th client: 127.0.0.2 ..= 127.0.0.254, so that
/// 19,000 connections do not exhaust one address's ephemeral ports.
pub fn source_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 253) as u8))
}

async fn tcp_connect(addr: SocketAddr, src: IpAddr) -> anyhow::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0)).context("bind the client socket")?;
    let tcp = sock.connect(addr).await.context("TCP connect")?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// The parts of a server message the benchmark needs, found without a full
/// JSON parse (the load generator shares the CPU with the server).
#[derive(Debug, PartialEq)]
pub enum Msg {
    Change { seq: i64, at_us: i64 },
    Ready { seq: i64 },
    Other,
}

pub fn parse_msg(text: &str) -> Msg {
    parse_msg_bytes(text.as_bytes())
}

/// Parses a server message without allocating. A change is always
/// `{"type":"change","seq":N,...,"at":"<RFC 3339>"}` (`Change::from_row`
/// assembles it in that order, `at` last); `ready` is serde_json output, so its
/// keys may come in any order.
pub fn parse_msg_bytes(m: &[u8]) -> Msg {
    const CHANGE: &[u8] = br#"{"type":"change","seq":"#;
    if let Some(rest) = m.strip_prefix(CHANGE) {
        let seq = leading_number(rest);
        let at = m.strip_suffix(b"\"}").and_then(|body| {
            // The timestamp is the last JSON string: it opens at the last
            // quote (a JSON string ends at the first unescaped quote, and a
            // timestamp holds none).
            let at_open = |open: usize| body[..open].ends_with(br#","at":"#).then(|| rfc3339_us(&body[open + 1..]))?;
            // The server's are 27 bytes (six fraction digits): try that
            // first, without a scan (a parsed timestamp has no quote in it,
            // so that quote was the last).
            body.len()
                .checked_sub(28)
                .filter(|&i| body[i] == b'"')
                .and_then(at_open)
                .or_else(|| at_open(body.iter().rposition(|&c| c == b'"')?))
        });
        match (seq, at) {
            (Some(seq), Some(at_us)) => Msg::Change { seq, at_us },
            _ => Msg::Other,
        }
    } else if find(m, br#""type":"ready""#).is_some() {
        number_after(m, br#""seq":"#).map(|seq| Msg::Ready { seq }).unwrap_or(Msg::Other)
    } else {
        Msg::Other
    }
}

fn leading_number(b: &[u8]) -> Option<i64> {
    let digits = b.iter().position(|c| !c.is_ascii_digit()).unwrap_or(b.len());
    if digits == 0 {
        return None;
    }
    b[..digits].iter().try_fold(0i64, |n, &c| n.checked_mul(10)?.checked_add((c - b'0') as i64))
}

fn number_after(m: &[u8], key: &[u8]) -> Option<i64> {
    leading_number(&m[find(m, key)? + key.len()..])
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.f...]Z` (what the server sends, always with six
/// fraction digits) to microseconds since the epoch; fraction digits past the
/// sixth are truncated, as `chrono`'s `timestamp_micros` does.
fn rfc3339_us(s: &[u8]) -> Option<i64> {
    if s.len() < 20
        || s[4] != b'-'
        || s[7] != b'-'
        || s[10] != b'T'
        || s[13] != b':'
        || s[16] != b':'
        || s[s.len() - 1] != b'Z'
    {
        return None;
    }
    let digit = |c: u8| -> Option<i64> { c.is_ascii_digit().then_some((c - b'0') as i64) };
    let num = |from: usize, to: usize| s[from..to].iter().try_fold(0i64, |n, &c| Some(n * 10 + digit(c)?));
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let frac = &s[19..s.len() - 1];
    let micros = match frac.split_first() {
        None => 0,
        Some((b'.', digits)) if (1..=9).contains(&digits.len()) => {
            let mut us = 0;
            for i in 0..6 {
                us = us * 10 + digits.get(i).map_or(Some(0), |&c| digit(c))?;
            }
            for &c in digits.iter().skip(6) {
                digit(c)?;
            }
            us
        }
        Some(_) => return None,
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some(secs * 1_000_000 + micros)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// days_from_civil: years start in March, so the leap day is the last one).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let mp = (month + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + day - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// Position bookkeeping shared by both transports.
struct Counter {
    last: i64,
    tally: Tally,
    sampling: Sampling,
}

impl Counter {
    fn new(start: i64, sampling: Sampling) -> Counter {
        Counter { last: start, tally: Tally::default(), sampling }
    }

    /// A change received at `now` (microseconds since the epoch).
    fn change(&mut self, seq: i64, at_us: i64, now: i64) {
        if seq <= self.last {
            self.tally.duplicates += 1;
            return;
        }
        self.tally.lost += (seq - self.last - 1) as u64;
        self.last = seq;
        // Every change of one read carries that read's time (never 0, the
        // tally's starting value).
        if now != self.tally.last_receive_us {
            self.tally.receives += 1;
        }
        self.tally.received += 1;
        self.tally.last_receive_us = now;
        if self.sampling.keeps(at_us) {
            self.tally.latencies_us.push((now - at_us).clamp(0, u32::MAX as i64) as u32);
        }
    }

    /// What the client saw; `Tally::settle` counts what it did not reach.
    fn finish(mut self) -> Tally {
        self.tally.reached = Some(self.last);
        self.tally
    }
}

/// How long clients keep reading after the writer is done.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until `finish` carries a head (then at most `DRAIN_TIMEOUT`).
async fn drained(finish: &mut Finish) -> i64 {
    loop {
        if let Some(h) = *finish.borrow_and_update() {
            return h;
        }
        if finish.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

// WebSocket frame opcodes (RFC 6455 section 5.2).
const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The read buffer's initial size.
const READ_BUF: usize = 64 * 1024;
/// Read only with at least this much room (else the partial frame left at
/// the end moves to the front first), so reads stay large and moves rare.
const MIN_READ_ROOM: usize = 16 * 1024;
/// Larger frames or messages are an error (the server's are a few hundred bytes).
const MAX_MESSAGE: usize = 64 << 20;
/// Headers of the upgrade response beyond this are an error.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// One frame's header parsed from the start of a buffer.
#[derive(Debug, PartialEq)]
enum Header {
    /// The frame is not complete: at least this many bytes are needed.
    Incomplete(usize),
    /// Complete: the payload is `buf[start..end]`.
    Frame { fin: bool, op: u8, start: usize, end: usize },
}

/// Parses and checks a server frame's header: no reserved bits (no extension
/// was negotiated), not masked, a known opcode, control frames unfragmented
/// and at most 125 bytes.
fn header(b: &[u8]) -> anyhow::Result<Header> {
    if b.len() < 2 {
        return Ok(Header::Incomplete(2));
    }
    let (fin, op) = (b[0] & 0x80 != 0, b[0] & 0x0F);
    ensure!(b[0] & 0x70 == 0, "protocol violation: reserved bits set in a frame");
    ensure!(b[1] & 0x80 == 0, "protocol violation: masked frame from the server");
    ensure!(
        matches!(op, OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG),
        "protocol violation: unknown opcode {op:#x}"
    );
    let (len, start) = match b[1] & 0x7F {
        126 if b.len() < 4 => return Ok(Header::Incomplete(4)),
        126 => (u16::from_be_bytes([b[2], b[3]]) as u64, 4),
        127 if b.len() < 10 => return Ok(Header::Incomplete(10)),
        127 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")), 10),
        n => (n as u64, 2),
    };
    ensure!(len <= MAX_MESSAGE as u64, "a frame of {len} bytes");
    ensure!(op < OP_CLOSE || (fin && len <= 125), "protocol violation: fragmented or long control frame");
    let end = start + len as usize;
    Ok(if b.len() < end { Header::Incomplete(end) } else { Header::Frame { fin, op, start, end } })
}

/// Appends a masked client frame (clients must mask, RFC 6455 section 5.3).
fn masked_frame(out: &mut Vec<u8>, op: u8, payload: &[u8]) {
    let key: [u8; 4] = rand::random();
    out.push(0x80 | op);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
}

/// What `Frames::process` stopped at.
#[derive(Debug, PartialEq)]
enum Step {
    /// Every complete frame is handled; the next needs this many bytes in all.
    More(usize),
    /// The message handler asked to stop; the frames after it stay buffered.
    Stopped,
}

/// The receive side of a WebSocket connection: one reusable read buffer in
/// which every complete frame is handled in place.
struct Frames {
    buf: Vec<u8>,
    /// Where the unhandled bytes start.
    pos: usize,
    /// The opcode of the fragmented message being assembled (0: none) and
    /// its text so far.
    frag_op: u8,
    frag: Vec<u8>,
    /// Frames to send (pongs), written after each batch.
    out: Vec<u8>,
}

impl Frames {
    fn new(buf: Vec<u8>, pos: usize) -> Frames {
        Frames { buf, pos, frag_op: 0, frag: Vec::new(), out: Vec::new() }
    }

    /// Handles every complete frame in the buffer: each complete text message
    /// goes to `on_text` (which returns false to stop), a ping queues a pong
    /// in `out`, a close or a protocol violation is an error.
    fn process(&mut self, mut on_text: impl FnMut(&[u8]) -> bool) -> anyhow::Result<Step> {
        loop {
            let (fin, op, start, end) = match header(&self.buf[self.pos..])? {
                Header::Incomplete(need) => {
                    if self.pos == self.buf.len() {
                        self.buf.clear();
                        self.pos = 0;
                    }
                    return Ok(Step::More(need));
                }
                Header::Frame { fin, op, start, end } => (fin, op, start, end),
            };
            let payload = &self.buf[self.pos + start..self.pos + end];
            self.pos += end;
            match op {
                OP_TEXT | OP_BINARY => {
                    ensure!(self.frag_op == 0, "protocol violation: a new message inside a fragmented one");
                    if !fin {
                        self.frag_op = op;
                        self.frag.clear();
                        if op == OP_TEXT {
                            self.frag.extend_from_slice(payload);
                        }
                    } else if op == OP_TEXT {
                        ensure!(std::str::from_utf8(payload).is_ok(), "a text message that is not UTF-8");
                        if !on_text(payload) {
                            return Ok(Step::Stopped);
                        }
                    }
                }
                OP_CONT => {
                    ensure!(self.frag_op != 0, "protocol violation: a continuation frame without a message");
                    if self.frag_op == OP_TEXT {
                        ensure!(self.frag.len() + payload.len() <= MAX_MESSAGE, "a message over {MAX_MESSAGE} bytes");
                        self.frag.extend_from_slice(payload);
                    }
                    if fin && std::mem::take(&mut self.frag_op) == OP_TEXT {
                        ensure!(std::str::from_utf8(&self.frag).is_ok(), "a text message that is not UTF-8");
                        if !on_text(&self.frag) {
                            return Ok(Step::Stopped);
                        }
                    }
                }
                OP_PING => masked_frame(&mut self.out, OP_PONG, payload),
                OP_PONG => {}
                _ => match payload {
                    [] => bail!("closed by the server: no code"),
                    [a, b, reason @ ..] => {
                        let code = u16::from_be_bytes([*a, *b]);
                        bail!("closed by the server: code {code} {}", String::from_utf8_lossy(reason))
                    }
                    [_] => bail!("protocol violation: a one-byte close frame"),
                },
            }
        }
    }

    /// Makes room to read: at least `MIN_READ_ROOM`, and all of the next
    /// frame (`need` bytes from `pos`).
    fn make_room(&mut self, need: usize) {
        let spare = self.buf.capacity() - self.buf.len();
        if self.pos > 0 && (spare < MIN_READ_ROOM || self.pos + need > self.buf.capacity()) {
            self.buf.copy_within(self.pos.., 0);
            self.buf.truncate(self.buf.len() - self.pos);
            self.pos = 0;
        }
        let want = (self.pos + need).max(self.buf.len() + MIN_READ_ROOM);
        if want > self.buf.capacity() {
            self.buf.reserve(want - self.buf.len());
        }
    }
}

/// A WebSocket client connection.
struct WsConn {
    tcp: TcpStream,
    frames: Frames,
    /// Bytes the next frame needs in all (from `Frames::process`).
    need: usize,
}

impl WsConn {
    /// TCP connect from `src`, then the HTTP/1.1 upgrade (RFC 6455 section 4).
    async fn connect(url: &str, addr: SocketAddr, src: IpAddr) -> anyhow::Result<WsConn> {
        let rest = url.strip_prefix("ws://").with_context(|| format!("not a ws:// URL: {url}"))?;
        let (host, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        let mut tcp = tcp_connect(addr, src).await?;
        let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.context("send the upgrade request")?;
        let mut buf = Vec::with_capacity(READ_BUF);
        let mut searched = 0;
        let end = loop {
            if let Some(i) = find(&buf[searched..], b"\r\n\r\n") {
                break searched + i;
            }
            ensure!(buf.len() <= MAX_RESPONSE_HEAD, "the upgrade response's headers are too long");
            searched = buf.len().saturating_sub(3);
            if tcp.read_buf(&mut buf).await? == 0 {
                bail!("closed during the upgrade");
            }
        };
        check_upgrade(&buf[..end], &key)?;
        // Whatever follows the headers is the first frames.
        Ok(WsConn { tcp, frames: Frames::new(buf, end + 4), need: 2 })
    }

    /// Handles the buffered frames (see `Frames::process`) and sends the
    /// pongs they asked for.
    async fn process(&mut self, on_text: impl FnMut(&[u8]) -> bool) -> anyhow::Result<Step> {
        let step = self.frames.process(on_text)?;
        if let Step::More(need) = step {
            self.need = need;
        }
        if !self.frames.out.is_empty() {
            self.tcp.write_all(&self.frames.out).await.context("send a pong")?;
            self.frames.out.clear();
        }
        Ok(step)
    }

    /// Reads more bytes into the buffer; 0 when the server closed the connection.
    async fn read(&mut self) -> std::io::Result<usize> {
        self.frames.make_room(self.need);
        self.tcp.read_buf(&mut self.frames.buf).await
    }

    /// Sends a close frame (1000, normal closure) and gives up the connection.
    async fn close(mut self) {
        let mut frame = Vec::with_capacity(8);
        masked_frame(&mut frame, OP_CLOSE, &1000u16.to_be_bytes());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tcp.write_all(&frame)).await;
    }
}

/// Checks the server's answer to the upgrade request.
fn check_upgrade(head: &[u8], key: &str) -> anyhow::Result<()> {
    let head = std::str::from_utf8(head).context("an upgrade response that is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    ensure!(status.starts_with("HTTP/1.1 101 ") || status == "HTTP/1.1 101", "the server answered {status}");
    let (mut upgrade, mut connection, mut accept) = (false, false, None);
    for line in lines {
        let (name, value) = line.split_once(':').with_context(|| format!("bad header line {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection = value.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            bail!("the server chose an extension the client did not offer: {value}");
        }
    }
    ensure!(upgrade, "no `Upgrade: websocket` in the upgrade response");
    ensure!(connection, "no `Connection: Upgrade` in the upgrade response");
    let expected = derive_accept_key(key.as_bytes());
    ensure!(accept == Some(expected.as_str()), "Sec-WebSocket-Accept is {accept:?}, expected {expected:?}");
    Ok(())
}

/// One WebSocket client: connects from `src`, reports its `ready` position on
/// `ready`, counts changes until it has the final head (or times out).
pub async fn ws_client(
    url: String,
    addr: SocketAddr,
    src: IpAddr,
    sampling: Sampling,
    ready: tokio::sync::mpsc::Sender<anyhow::Result<i64>>,
    mut finish: Finish,
) -> Tally {
    let connected = async {
        let mut ws = WsConn::connect(&url, addr, src).await.context("WebSocket handshake")?;
        let mut start = None;
        loop {
            // The frames after `ready` stay buffered for the loop below.
            ws.process(|m| match parse_msg_bytes(m) {
                Msg::Ready { seq } => {
                    start = Some(seq);
                    false
                }
                _ => true,
            })
            .await
            .context("before ready")?;
            if let Some(start) = start {
                return anyhow::Ok((ws, start));
            }
            if ws.read().await.context("before ready")? == 0 {
                bail!("closed before ready");
            }
        }
    };
    let (mut ws, start) = match tokio::time::timeout(Duration::from_secs(60), connected).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let msg = format!("{e:#}");
            let _ = ready.send(Err(e)).await;
            return Tally { error: Some(msg), ..Default::default() };
        }
        Err(_) => {
            let _ = ready.send(Err(anyhow::anyhow!("connect timed out"))).await;
            return Tally { error: Some("connect timed out".into()), ..Default::default() };
        }
    };
    // Frames buffered behind `ready` arrived about now.
    let mut read_us = now_us();
    let _ = ready.send(Ok(start)).await;
    drop(ready);
    let mut counter = Counter::new(start, sampling);
    let mut head: Option<i64> = None;
    let mut deadline = tokio::time::Instant::now();
    // Armed (reset) when the head is known, polled only then.
    let drain_timer = tokio::time::sleep(DRAIN_TIMEOUT);
    tokio::pin!(drain_timer);
    let error = loop {
        let handled = ws
            .process(|m| {
                if let Msg::Change { seq, at_us } = parse_msg_bytes(m) {
                    counter.change(seq, at_us, read_us);
                }
                true
            })
            .await;
        if let Err(e) = handled {
            break Some(format!("{e:#}"));
        }
        // The watch is polled below only when the socket has nothing to read:
        // while it always has, this atomic check still notices the head.
        if head.is_none() && finish.has_changed().unwrap_or(false) {
            if let Some(h) = *finish.borrow_and_update() {
                head = Some(h);
                deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
                drain_timer.as_mut().reset(deadline);
            }
        }
        if let Some(h) = head {
            if counter.last >= h {
                break None;
            }
            if tokio::time::Instant::now() >= deadline {
                break Some("timed out waiting for the last change".to_string());
            }
        }
        tokio::select! {
            biased;
            r = ws.read() => match r {
                Ok(0) => break Some("connection closed".to_string()),
                Ok(_) => read_us = now_us(),
                Err(e) => break Some(e.to_string()),
            },
            h = drained(&mut finish), if head.is_none() => {
                head = Some(h);
                deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
                drain_timer.as_mut().reset(deadline);
            }
            _ = &mut drain_timer, if head.is_some() => {
                break Some("timed out waiting for the last change".to_string());
            }
        }
    };
    counter.tally.error = error;
    ws.close().await;
    counter.finish()
}

/// One SSE client on `GET path`, same bookkeeping as `ws_client`.
pub async fn sse_client(
    path: String,
    addr: SocketAddr,
    src: IpAddr,
    sampling: Sampling,
    ready: tokio::sync::mpsc::Sender<anyhow::Result<i64>>,
    mut finish: Finish,
) -> Tally {
    let mut reader = match SseReader::connect(addr, src, &path).await {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("{e:#}");
            let _ = ready.send(Err(e)).await;
            return Tally { error: Some(msg), ..Default::default() };
        }
    };
    let start = loop {
        match tokio::time::timeout(Duration::from_secs(60), reader.next_event()).await {
            Ok(Ok((event, id, _))) if event == "ready" => break id.unwrap_or_default(),
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                let _ = ready.send(Err(e)).await;
                return Tally { error: Some(msg), ..Default::default() };
            }
            Err(_) => {
                let _ = ready.send(Err(anyhow::anyhow!("no ready event"))).await;
                return Tally { error: Some("no ready event".into()), ..Default::default() };
            }
        }
    };
    let _ = ready.send(Ok(start)).await;
    drop(ready);
    let mut counter = Counter::new(start, sampling);
    let mut head: Option<i64> = None;
    let mut deadline = None;
    loop {
        if head.is_some_and(|h| counter.last >= h) {
            break;
        }
        tokio::select! {
            ev = reader.next_event() => match ev {
                Ok((event, _, data)) if event == "change" => {
                    if let Msg::Change { seq, at_us } = parse_msg(&data) {
                        counter.change(seq, at_us, reader.read_us);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    counter.tally.error = Some(format!("{e:#}"));
                    break;
                }
            },
            h = drained(&mut finish), if head.is_none() => {
                head = Some(h);
                deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                counter.tally.error = Some("timed out waiting for the last change".into());
                break;
            }
        }
    }
    counter.finish()
}

/// A minimal `text/event-stream` reader over HTTP/1.1 chunked encoding.
struct SseReader {
    tcp: TcpStream,
    raw: Vec<u8>,
    body: Vec<u8>,
    /// Bytes still to copy of the current chunk (plus its CRLF).
    chunk_left: usize,
    /// When the last read returned (microseconds since the epoch): the
    /// receive time of the events it completed.
    read_us: i64,
}

impl SseReader {
    async fn connect(addr: SocketAddr, src: IpAddr, path: &str) -> anyhow::Result<SseReader> {
        let mut tcp = tcp_connect(addr, src).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        tcp.write_all(req.as_bytes()).await?;
        let mut raw = Vec::with_capacity(8192);
        let end = loop {
            if let Some(i) = find(&raw, b"\r\n\r\n") {
                break i;
            }
            if tcp.read_buf(&mut raw).await? == 0 {
                bail!("closed before the response headers");
            }
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_string();
        if !head.starts_with("HTTP/1.1 200") {
            bail!("SSE request failed: {}", head.lines().next().unwrap_or_default());
        }
        if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            bail!("expected a chunked SSE response");
        }
        raw.drain(..end + 4);
        Ok(SseReader { tcp, raw, body: Vec::new(), chunk_left: 0, read_us: now_us() })
    }

    /// Moves decoded chunk data from `raw` to `body`.
    fn decode(&mut self) -> anyhow::Result<()> {
        loop {
            if self.chunk_left > 0 {
                let n = self.chunk_left.min(self.raw.len());
                if n == 0 {
                    return Ok(());
                }
                // The last two bytes of a chunk are its CRLF, not data.
                let data = n.min(self.chunk_left.saturating_sub(2));
                self.body.extend_from_slice(&self.raw[..data]);
                self.raw.drain(..n);
                self.chunk_left -= n;
                continue;
            }
            let Some(eol) = find(&self.raw, b"\r\n") else { return Ok(()) };
            let size =
                usize::from_str_radix(std::str::from_utf8(&self.raw[..eol])?.trim(), 16).context("bad chunk size")?;
            if size == 0 {
                bail!("the SSE stream ended");
            }
            self.raw.drain(..eol + 2);
            self.chunk_left = size + 2;
        }
    }

    /// The next event: (name, id, data).
    async fn next_event(&mut self) -> anyhow::Result<(String, Option<i64>, String)> {
        loop {
            if let Some(end) = find(&self.body, b"\n\n") {
                let block = String::from_utf8_lossy(&self.body[..end]).to_string();
                self.body.drain(..end + 2);
                let (mut event, mut id, mut data) = (String::from("message"), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = v.parse().ok();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Ok((event, id, data));
            }
            if self.tcp.read_buf(&mut self.raw).await? == 0 {
                bail!("the SSE connection closed");
            }
            self.read_us = now_us();
            self.decode()?;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    #[test]
    fn change_and_ready_messages_parse_without_full_json() {
        let m = r#"{"type":"change","seq":42,"op":"insert","order":{"id":1,"at":"x"},"old":null,"actor":"sql:postgres","at":"2024-05-01T10:00:00.000001Z"}"#;
        assert_eq!(parse_msg(m), Msg::Change { seq: 42, at_us: 1_714_557_600_000_001 });
        assert_eq!(parse_msg_bytes(m.as_bytes()), Msg::Change { seq: 42, at_us: 1_714_557_600_000_001 });
        // An actor that looks like the end of the message changes nothing.
        let m = r#"{"type":"change","seq":9,"op":"update","order":{},"old":{},"actor":"x\",\"at\":\"1999-01-01T00:00:00Z","at":"2024-05-01T10:00:00.5Z"}"#;
        assert_eq!(parse_msg(m), Msg::Change { seq: 9, at_us: 1_714_557_600_500_000 });
        assert_eq!(parse_msg(r#"{"filter":{"id":[]},"seq":7,"snapshot":false,"type":"ready"}"#), Msg::Ready { seq: 7 });
        assert_eq!(parse_msg(r#"{"type":"ready","seq":8}"#), Msg::Ready { seq: 8 });
        assert_eq!(parse_msg(r#"{"type":"pong"}"#), Msg::Other);
        // Malformed changes are not counted.
        assert_eq!(parse_msg(r#"{"type":"change","seq":x,"at":"2024-05-01T10:00:00Z"}"#), Msg::Other);
        assert_eq!(parse_msg(r#"{"type":"change","seq":1,"at":""}"#), Msg::Other);
        assert_eq!(parse_msg(r#"{"type":"change","seq":1,"at":"2024-05-01T10:00:00Z","x":1}"#), Msg::Other);
        assert_eq!(
            parse_msg(r#"{"type":"change","seq":99999999999999999999,"at":"2024-05-01T10:00:00Z"}"#),
            Msg::Other
        );
    }

    #[test]
    fn changes_of_one_read_count_as_one_receive() {
        let mut c = Counter::new(10, Sampling::new(false));
        // Three changes in one read, one in the next, two in a third.
        for (seq, now) in [(11, 1_000), (12, 1_000), (13, 1_000), (14, 1_500), (15, 2_000), (16, 2_000)] {
            c.change(seq, 0, now);
        }
        // A duplicate is not a receive, whenever it comes.
        c.change(16, 0, 2_500);
        let mut t = c.finish();
        t.settle(16);
        assert_eq!((t.received, t.receives, t.duplicates, t.lost), (6, 3, 1, 0));
    }

    #[test]
    fn changes_of_the_warm_up_are_counted_but_not_sampled() {
        let sampling = Sampling::new(true);
        let mut c = Counter::new(10, sampling.clone());
        c.change(11, 100, 1_000); // before the scenario sets a start: kept
        sampling.from(5_000);
        c.change(12, 4_999, 6_000);
        c.change(12, 5_000, 6_000); // a duplicate is never a sample
        c.change(13, 5_000, 6_500);
        c.change(15, 7_000, 7_200); // 14 lost
        let t = c.finish();
        assert_eq!((t.received, t.duplicates, t.lost), (4, 1, 1));
        assert_eq!(t.latencies_us, [900, 1_500, 200]);
        let mut none = Counter::new(10, Sampling::new(false));
        none.change(11, 0, 1_000);
        assert!(none.finish().latencies_us.is_empty());
    }

    #[test]
    fn a_client_that_stopped_early_counts_what_it_did_not_reach_as_lost() {
        let mut c = Counter::new(10, Sampling::new(false));
        c.change(11, 0, 1_000);
        c.change(13, 0, 1_000); // 12 skipped
        let mut t = c.finish();
        t.settle(20);
        assert_eq!((t.received, t.lost), (2, 1 + 7));
        // One never ready has no position: its failure is a client error.
        let mut never = Tally::default();
        never.settle(20);
        assert_eq!(never.lost, 0);
    }

    #[test]
    fn timestamps_parse_as_chrono_does() {
        for s in [
            "2024-05-01T10:00:00.000001Z",
            "2024-02-29T23:59:59.999999Z",
            "2024-03-01T00:00:00.000000Z",
            "2023-12-31T23:59:59.123456Z",
            "2000-02-29T12:00:00.000000Z",
            "2100-02-28T01:02:03.040506Z",
            "1970-01-01T00:00:00.000000Z",
            "1969-12-31T23:59:59.500000Z",
            "1900-03-01T00:00:00.000000Z",
            "0001-01-01T00:00:00.000000Z",
            "9999-12-31T23:59:59.999999Z",
            "2038-01-19T03:14:08Z",
            "2024-05-01T10:00:00.5Z",
            "2024-05-01T10:00:00.12Z",
            "2024-05-01T10:00:00.123456789Z",
        ] {
            let want = chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros();
            assert_eq!(rfc3339_us(s.as_bytes()), Some(want), "{s}");
        }
        for s in [
            "2023-02-29T00:00:00.000000Z",
            "2100-02-29T00:00:00.000000Z",
            "2024-13-01T00:00:00.000000Z",
            "2024-04-31T00:00:00.000000Z",
            "2024-05-01T24:00:00.000000Z",
            "2024-05-01T10:00:00.Z",
            "2024-05-01T10:00:00.0000000000Z",
            "2024-05-01T10:00:00.00000xZ",
            "2024-05-01 10:00:00.000000",
            "",
        ] {
            assert_eq!(rfc3339_us(s.as_bytes()), None, "{s}");
        }
    }

    /// An unmasked server frame.
    fn frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | op];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=0xFFFF => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Undoes `masked_frame` for a short frame: (first byte, payload).
    fn unmask(f: &[u8]) -> (u8, Vec<u8>) {
        assert_eq!(f[1] & 0x80, 0x80, "client frames are masked");
        let n = (f[1] & 0x7F) as usize;
        assert!(n <= 125);
        let key = &f[2..6];
        (f[0], f[6..6 + n].iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k).collect())
    }

    fn change(seq: i64, actor_len: usize) -> Vec<u8> {
        format!(
            r#"{{"type":"change","seq":{seq},"op":"insert","order":{{}},"old":null,"actor":"{}","at":"2024-05-01T10:00:00.000001Z"}}"#,
            "a".repeat(actor_len)
        )
        .into_bytes()
    }

    /// Feeds `bytes` to a `Frames` in pieces of `step` bytes, as reads would:
    /// the text messages, the pongs, and the error if any.
    fn feed(bytes: &[u8], step: usize) -> (Vec<Vec<u8>>, Vec<u8>, Option<String>) {
        let mut frames = Frames::new(Vec::with_capacity(READ_BUF), 0);
        let mut texts = Vec::new();
        let mut need = 2;
        for piece in bytes.chunks(step) {
            frames.make_room(need);
            frames.buf.extend_from_slice(piece);
            match frames.process(|m| {
                texts.push(m.to_vec());
                true
            }) {
                Ok(Step::More(n)) => need = n,
                Ok(Step::Stopped) => unreachable!(),
                Err(e) => return (texts, frames.out, Some(format!("{e:#}"))),
            }
        }
        assert_eq!(frames.pos, frames.buf.len(), "everything handled");
        (texts, frames.out, None)
    }

    #[test]
    fn frames_of_every_length_fragmented_or_not_come_out_whole() {
        let (short, mid, long) = (change(1, 10), change(2, 1000), change(3, 70_000));
        assert!(short.len() <= 125 && mid.len() > 125 && mid.len() <= 0xFFFF && long.len() > 0xFFFF);
        let mut bytes = Vec::new();
        bytes.extend(frame(true, OP_TEXT, &short));
        bytes.extend(frame(true, OP_TEXT, &mid));
        bytes.extend(frame(true, OP_BINARY, b"ignored"));
        // A fragmented message with a ping and a pong between its parts.
        bytes.extend(frame(false, OP_TEXT, &long[..100]));
        bytes.extend(frame(true, OP_PING, b"hb"));
        bytes.extend(frame(false, OP_CONT, &long[100..60_000]));
        bytes.extend(frame(true, OP_PONG, b""));
        bytes.extend(frame(true, OP_CONT, &long[60_000..]));
        bytes.extend(frame(false, OP_BINARY, b"ignored "));
        bytes.extend(frame(true, OP_CONT, b"too"));
        bytes.extend(frame(true, OP_TEXT, &short));
        for step in [1, 7, 1000, 16 * 1024, bytes.len()] {
            let (texts, out, err) = feed(&bytes, step);
            assert_eq!(err, None);
            assert_eq!(texts, vec![short.clone(), mid.clone(), long.clone(), short.clone()], "step {step}");
            assert_eq!(out.len(), 8);
            assert_eq!(unmask(&out), (0x80 | OP_PONG, b"hb".to_vec()));
        }
    }

    #[test]
    fn protocol_violations_and_close_frames_are_errors() {
        let ok = frame(true, OP_TEXT, &change(1, 1));
        let cases: [(Vec<u8>, &str); 9] = [
            (vec![0xC1, 0x00], "reserved bits"),
            (vec![0x81, 0x81, 1, 2, 3, 4, b'x'], "masked frame"),
            (frame(true, 0x3, b""), "unknown opcode 0x3"),
            (frame(false, OP_PING, b""), "control frame"),
            (frame(true, OP_CONT, b"x"), "continuation frame without"),
            ([frame(false, OP_TEXT, b"a"), frame(true, OP_TEXT, b"b")].concat(), "inside a fragmented"),
            (frame(true, OP_TEXT, b"\xff"), "not UTF-8"),
            (frame(true, OP_CLOSE, b"\x0f\xa8slow consumer"), "closed by the server: code 4008 slow consumer"),
            (frame(true, OP_CLOSE, b""), "closed by the server: no code"),
        ];
        for (bad, want) in cases {
            let (texts, _, err) = feed(&[ok.clone(), bad].concat(), 3);
            assert_eq!(texts.len(), 1, "{want}: the message before is handled");
            let err = err.unwrap_or_default();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    /// Reads from `s` until `buf` holds at least `n` bytes.
    async fn read_at_least(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) {
        while buf.len() < n {
            assert!(s.read_buf(buf).await.unwrap() > 0, "closed early");
        }
    }

    type Started = (
        SocketAddr,
        TcpStream,
        String,
        tokio::task::JoinHandle<Tally>,
        mpsc::Receiver<anyhow::Result<i64>>,
        watch::Sender<Option<i64>>,
    );

    /// Starts `ws_client` on `path` against a listener of the test's own and
    /// returns the accepted socket with the handshake request read from it.
    async fn handshake_request(path: &str, keep_latencies: bool) -> Started {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (finish_tx, finish_rx) = watch::channel(None);
        let (ready_tx, ready_rx) = mpsc::channel(1);
        let url = format!("ws://{addr}{path}");
        let client =
            tokio::spawn(ws_client(url, addr, source_ip(0), Sampling::new(keep_latencies), ready_tx, finish_rx));
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        while find(&req, b"\r\n\r\n").is_none() {
            s.read_buf(&mut req).await.unwrap();
        }
        (addr, s, String::from_utf8(req).unwrap(), client, ready_rx, finish_tx)
    }

    #[tokio::test]
    async fn the_ws_client_handshakes_counts_answers_pings_and_closes() {
        let (addr, mut s, req, client, mut ready_rx, finish_tx) = handshake_request("/ws?status=new", true).await;
        assert!(req.starts_with("GET /ws?status=new HTTP/1.1\r\n"), "{req}");
        for h in [format!("Host: {addr}"), "Upgrade: websocket".into(), "Sec-WebSocket-Version: 13".into()] {
            assert!(req.contains(&format!("\r\n{h}\r\n")), "{h} in {req}");
        }
        let key = req.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ")).unwrap();
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(key).unwrap().len(), 16);
        // The headers, `ready` and the first change arrive in one segment.
        let mut out = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes();
        out.extend(frame(true, OP_TEXT, br#"{"filter":{},"seq":5,"snapshot":false,"type":"ready"}"#));
        out.extend(frame(true, OP_TEXT, &change(6, 5)));
        s.write_all(&out).await.unwrap();
        assert_eq!(ready_rx.recv().await.unwrap().unwrap(), 5);
        let c7 = change(7, 300);
        let mut out = frame(false, OP_TEXT, &c7[..10]);
        out.extend(frame(true, OP_PING, b"heartbeat"));
        out.extend(frame(true, OP_CONT, &c7[10..]));
        out.extend(frame(true, OP_TEXT, &change(7, 0)));
        s.write_all(&out).await.unwrap();
        let mut got = Vec::new();
        read_at_least(&mut s, &mut got, 15).await;
        assert_eq!(unmask(&got[..15]), (0x80 | OP_PONG, b"heartbeat".to_vec()));
        // The head is known before the last change arrives.
        finish_tx.send(Some(8)).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(&frame(true, OP_TEXT, &change(8, 0))).await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(unmask(&got), (0x80 | OP_CLOSE, vec![0x03, 0xE8]));
        let tally = client.await.unwrap();
        assert_eq!((tally.received, tally.duplicates, tally.lost, tally.error), (3, 1, 0, None));
        assert_eq!(tally.latencies_us.len(), 3);
    }

    #[tokio::test]
    async fn a_bad_accept_key_fails_the_handshake() {
        let (_, mut s, _, client, mut ready_rx, _finish_tx) = handshake_request("/ws", false).await;
        let accept = derive_accept_key(b"not the key");
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        s.write_all(resp.as_bytes()).await.unwrap();
        let err = ready_rx.recv().await.unwrap().unwrap_err();
        assert!(format!("{err:#}").contains("Sec-WebSocket-Accept"), "{err:#}");
        assert!(client.await.unwrap().error.unwrap().starts_with("WebSocket handshake: "));
    }
}

//! Load-generating clients: WebSocket (tokio-tungstenite) and SSE (plain HTTP/1.1
//! over TCP, chunked decoding by hand so no HTTP client library sits in the way).
//!
//! Every client counts what it receives against the change log's positions:
//! after `ready` (position P) it must see exactly P+1, P+2, ... up to the head
//! the writer reached. A position seen twice is a duplicate, one skipped is
//! lost. The commit -> receive latency of each change is the receive time
//! minus the change's `at` (the sequencer's clock_timestamp() at commit, same
//! machine clock).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

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
    pub error: Option<String>,
}

/// Where the clients stop: the writer publishes the final head here.
pub type Finish = watch::Receiver<Option<i64>>;

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

fn number_after(text: &str, key: &str) -> Option<i64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Parses `YYYY-MM-DDTHH:MM:SS.ffffffZ` (what the server sends) to micros.
fn rfc3339_us(s: &str) -> Option<i64> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    Some(t.timestamp_micros())
}

pub fn parse_msg(text: &str) -> Msg {
    if text.starts_with(r#"{"type":"change""#) {
        let seq = number_after(text, r#""seq":"#);
        let at = text.rfind(r#""at":""#).and_then(|i| {
            let rest = &text[i + 6..];
            rest.find('"').and_then(|e| rfc3339_us(&rest[..e]))
        });
        match (seq, at) {
            (Some(seq), Some(at_us)) => Msg::Change { seq, at_us },
            _ => Msg::Other,
        }
    } else if text.contains(r#""type":"ready""#) {
        number_after(text, r#""seq":"#).map(|seq| Msg::Ready { seq }).unwrap_or(Msg::Other)
    } else {
        Msg::Other
    }
}

/// Position bookkeeping shared by both transports.
struct Counter {
    last: i64,
    tally: Tally,
    keep_latencies: bool,
}

impl Counter {
    fn new(start: i64, keep_latencies: bool) -> Counter {
        Counter { last: start, tally: Tally::default(), keep_latencies }
    }

    fn change(&mut self, seq: i64, at_us: i64) {
        let now = now_us();
        if seq <= self.last {
            self.tally.duplicates += 1;
            return;
        }
        self.tally.lost += (seq - self.last - 1) as u64;
        self.last = seq;
        self.tally.received += 1;
        self.tally.last_receive_us = now;
        if self.keep_latencies {
            self.tally.latencies_us.push((now - at_us).clamp(0, u32::MAX as i64) as u32);
        }
    }

    fn finish(mut self, head: Option<i64>) -> Tally {
        if let Some(h) = head {
            if h > self.last {
                self.tally.lost += (h - self.last) as u64;
            }
        }
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

/// One WebSocket client: connects from `src`, reports its `ready` position on
/// `ready`, counts changes until it has the final head (or times out).
pub async fn ws_client(
    url: String,
    addr: SocketAddr,
    src: IpAddr,
    keep_latencies: bool,
    ready: tokio::sync::mpsc::Sender<anyhow::Result<i64>>,
    mut finish: Finish,
) -> Tally {
    let connected = async {
        let tcp = tcp_connect(addr, src).await?;
        let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp).await.context("WebSocket handshake")?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    if let Msg::Ready { seq } = parse_msg(&t) {
                        return Ok((ws, seq));
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("before ready: {e}"),
                None => bail!("closed before ready"),
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
    let _ = ready.send(Ok(start)).await;
    drop(ready);
    let mut counter = Counter::new(start, keep_latencies);
    let mut head: Option<i64> = None;
    let mut deadline = None;
    loop {
        if head.is_some_and(|h| counter.last >= h) {
            break;
        }
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Msg::Change { seq, at_us } = parse_msg(&t) {
                        counter.change(seq, at_us);
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    counter.tally.error = Some(format!("closed by the server: {c:?}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    counter.tally.error = Some(e.to_string());
                    break;
                }
                None => {
                    counter.tally.error = Some("connection closed".into());
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
    let _ = ws.close(None).await;
    counter.finish(head)
}

/// One SSE client on `GET path`, same bookkeeping as `ws_client`.
pub async fn sse_client(
    path: String,
    addr: SocketAddr,
    src: IpAddr,
    keep_latencies: bool,
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
    let mut counter = Counter::new(start, keep_latencies);
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
                        counter.change(seq, at_us);
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
    counter.finish(head)
}

/// A minimal `text/event-stream` reader over HTTP/1.1 chunked encoding.
struct SseReader {
    tcp: TcpStream,
    raw: Vec<u8>,
    body: Vec<u8>,
    /// Bytes still to copy of the current chunk (plus its CRLF).
    chunk_left: usize,
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
        Ok(SseReader { tcp, raw, body: Vec::new(), chunk_left: 0 })
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

    #[test]
    fn change_and_ready_messages_parse_without_full_json() {
        let m = r#"{"type":"change","seq":42,"op":"insert","order":{"id":1,"at":"x"},"old":null,"actor":"sql:postgres","at":"2024-05-01T10:00:00.000001Z"}"#;
        assert_eq!(parse_msg(m), Msg::Change { seq: 42, at_us: 1_714_557_600_000_001 });
        assert_eq!(parse_msg(r#"{"filter":{"id":[]},"seq":7,"snapshot":false,"type":"ready"}"#), Msg::Ready { seq: 7 });
        assert_eq!(parse_msg(r#"{"type":"pong"}"#), Msg::Other);
    }
}

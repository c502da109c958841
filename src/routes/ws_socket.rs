//! A WebSocket connection after the handshake, driven directly on its TCP
//! socket.
//!
//! The HTTP server hands an upgraded connection over (see
//! `startup::upgrade`), so a WebSocket holds no HTTP dispatcher, no
//! per-connection read or write buffer while idle and no channels between
//! tasks: one task per connection owns the socket.
//!
//! - Reading: client frames are parsed (and unmasked) by actix-http's frame
//!   parser from a buffer that exists only while bytes are waiting; an idle
//!   connection holds no read buffer at all.
//! - Writing: outgoing frames are the complete, shared frames built once per
//!   change (`changes::wire`): queued as `Bytes` (a reference count, no copy)
//!   and written with one vectored write for everything queued, straight from
//!   the shared buffers into the socket.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::time::Duration;

use actix_http::ws::{OpCode, Parser};
use actix_ws::{CloseCode, CloseReason, ProtocolError};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Bytes read per system call while a client is sending.
const READ_CHUNK: usize = 4096;
/// Bytes read (and parsed) per `read_messages` call at most.
const READ_BUDGET: usize = 64 * 1024;
/// The longest header of a client's frame: 2 bytes, an 8-byte length and a
/// 4-byte mask.
const MAX_FRAME_HEADER: usize = 14;
/// Frames gathered into one vectored write.
const MAX_IOVECS: usize = 64;

/// A complete message from the client.
#[derive(Debug)]
pub enum Incoming {
    Text(String),
    Binary,
    Ping(Bytes),
    Pong,
    Close(Option<CloseReason>),
}

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed the TCP connection (or it failed).
    Gone,
    /// The client broke the protocol: close with this code and reason.
    Protocol(CloseReason),
}

pub struct Socket {
    io: TcpStream,
    /// Bytes received and not yet parsed; no allocation while empty.
    rbuf: BytesMut,
    /// A fragmented message being assembled: its opcode and payload so far.
    fragments: Option<(OpCode, BytesMut)>,
    max_message: usize,
    /// Frames waiting for the socket, oldest first, each whole (a shared
    /// batch is many frames in one buffer); the first may be partly written.
    out: VecDeque<Bytes>,
    /// Bytes of the first queued buffer already written (0 while `out` is empty).
    front_written: usize,
    out_bytes: usize,
}

impl Socket {
    /// `early`: bytes the client sent right behind its handshake.
    pub fn new(io: TcpStream, early: BytesMut, max_message: usize) -> Socket {
        Socket { io, rbuf: early, fragments: None, max_message, out: VecDeque::new(), front_written: 0, out_bytes: 0 }
    }

    /// Takes a connection over from the task that served its handshake.
    /// The socket is registered with the reactor afresh: the old
    /// registration still holds that task's waker, which would keep the
    /// finished task's memory alive for as long as the connection is open.
    pub fn take_over(io: TcpStream, early: BytesMut, max_message: usize) -> io::Result<Socket> {
        let io = TcpStream::from_std(io.into_std()?)?;
        // A fresh buffer, not a view into the handshake's 8 KiB one.
        let early = if early.is_empty() { BytesMut::new() } else { BytesMut::from(&early[..]) };
        Ok(Socket::new(io, early, max_message))
    }

    /// Bytes queued and not yet accepted by the socket.
    pub fn pending(&self) -> usize {
        self.out_bytes
    }

    /// Waits until the client has sent something (or gone).
    pub async fn readable(&self) -> io::Result<()> {
        self.io.readable().await
    }

    /// Parses what arrived with the handshake (a client may send its first
    /// frames right behind it).
    pub fn early_messages(&mut self, into: &mut Vec<Incoming>) -> Result<(), ReadError> {
        self.parse(into)?;
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
        Ok(())
    }

    /// Bytes the kernel holds for the client, sent and not yet acknowledged
    /// or not yet sent (`TIOCOUTQ`); None where it cannot say. They go down
    /// as the client reads, long before the socket is writable again (which
    /// waits for a good part of its buffer to be free).
    pub fn unacknowledged(&self) -> Option<usize> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let mut n: nix::libc::c_int = 0;
            // SAFETY: TIOCOUTQ writes one int through the pointer, which
            // lives across the call.
            let r = unsafe { nix::libc::ioctl(self.io.as_raw_fd(), nix::libc::TIOCOUTQ, &mut n) };
            (r == 0).then_some(n.max(0) as usize)
        }
        #[cfg(not(target_os = "linux"))]
        None
    }

    /// Waits until the socket accepts more output.
    pub async fn writable(&self) -> io::Result<()> {
        self.io.writable().await
    }

    /// Reads what the socket holds (without waiting) and parses complete
    /// messages into `into`. Stops after `READ_BUDGET` bytes or 64 messages
    /// and returns true if the socket may hold more: the caller should yield
    /// before reading again. Reading never waits, so it consumes no task
    /// budget of its own: without the bound, a client sending faster than
    /// the server parses (say, endless empty continuation frames, which
    /// complete no message) would hold the worker thread and stall every
    /// other connection on it.
    pub fn read_messages(&mut self, into: &mut Vec<Incoming>) -> Result<bool, ReadError> {
        let mut read = 0;
        let more = loop {
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            match self.io.try_read_buf(&mut self.rbuf) {
                Ok(0) => return Err(ReadError::Gone),
                Ok(n) => {
                    self.parse(into)?;
                    read += n;
                    // Bound what one client's burst can make us do at once.
                    if into.len() >= 64 || read >= READ_BUDGET {
                        break true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.parse(into)?;
                    break false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(ReadError::Gone),
            }
        };
        if self.rbuf.is_empty() {
            // Idle again: give the buffer back.
            self.rbuf = BytesMut::new();
        }
        Ok(more)
    }

    fn parse(&mut self, into: &mut Vec<Incoming>) -> Result<(), ReadError> {
        let protocol = |code: CloseCode, description: String| {
            ReadError::Protocol(CloseReason { code, description: Some(description) })
        };
        while let Some((fin, op, payload)) = Parser::parse(&mut self.rbuf, true, self.max_message).map_err(|e| {
            let code = match e {
                ProtocolError::Overflow => CloseCode::Size,
                _ => CloseCode::Protocol,
            };
            protocol(code, e.to_string())
        })? {
            let payload = payload.unwrap_or_default();
            if !fin && matches!(op, OpCode::Ping | OpCode::Pong | OpCode::Close) {
                return Err(protocol(CloseCode::Protocol, "a fragmented control frame".into()));
            }
            let message = match op {
                OpCode::Text | OpCode::Binary if self.fragments.is_some() => {
                    return Err(protocol(CloseCode::Protocol, "a new message inside a fragmented one".into()))
                }
                OpCode::Text | OpCode::Binary if !fin => {
                    self.fragments = Some((op, payload));
                    continue;
                }
                OpCode::Continue => {
                    let Some((_, buf)) = self.fragments.as_mut() else {
                        return Err(protocol(CloseCode::Protocol, "a continuation frame without a message".into()));
                    };
                    if buf.len() + payload.len() > self.max_message {
                        return Err(protocol(CloseCode::Size, "message too large".into()));
                    }
                    buf.extend_from_slice(&payload);
                    if !fin {
                        continue;
                    }
                    // unwrap: checked above
                    let (op, whole) = self.fragments.take().unwrap();
                    data_message(op, whole)?
                }
                OpCode::Text | OpCode::Binary => data_message(op, payload)?,
                OpCode::Ping => Incoming::Ping(payload.freeze()),
                OpCode::Pong => Incoming::Pong,
                OpCode::Close => Incoming::Close(close_reason(&payload)?),
                OpCode::Bad => return Err(protocol(CloseCode::Protocol, "bad opcode".into())),
            };
            into.push(message);
        }
        // What is left is the start of one frame, already longer than a
        // whole message may be: refused now. The parser waits for a frame
        // to be complete before it checks its length, which its header may
        // declare as anything up to 2^63 bytes; the bytes were kept until
        // then, without bound.
        if self.rbuf.len() > self.max_message + MAX_FRAME_HEADER {
            return Err(protocol(CloseCode::Size, "message too large".into()));
        }
        Ok(())
    }

    /// Writes a frame now if nothing is queued before it and the socket
    /// takes it whole; queues (the rest of) it otherwise.
    pub fn send(&mut self, frame: Bytes) -> io::Result<()> {
        if self.out.is_empty() {
            match self.io.try_write(&frame) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => {
                    self.queue(frame);
                    self.front_written = n;
                    self.out_bytes -= n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        self.queue(frame);
        Ok(())
    }

    /// Drops the queued frames the client has not received a byte of; a
    /// frame partly written is kept (its rest must follow, or the stream is
    /// broken). For a close that should not wait behind what a slow client
    /// could not read anyway.
    pub fn discard_unsent(&mut self) {
        let Some(front) = self.out.front_mut() else { return };
        if self.front_written == 0 {
            self.out.clear();
            self.out_bytes = 0;
            return;
        }
        let end = frame_end(front, self.front_written);
        front.truncate(end);
        self.out.truncate(1);
        self.out_bytes = end - self.front_written;
        if self.out_bytes == 0 {
            self.out.clear();
            self.front_written = 0;
        }
    }

    /// Gives back the queue's memory if nothing is waiting (an idle
    /// connection then holds no buffer at all).
    pub fn release_idle_buffers(&mut self) {
        if self.out.is_empty() {
            self.out = VecDeque::new();
        }
    }

    /// Queues a complete frame (shared, not copied).
    pub fn queue(&mut self, frame: Bytes) {
        if !frame.is_empty() {
            self.out_bytes += frame.len();
            self.out.push_back(frame);
        }
    }

    /// Writes as much of the queue as the socket takes without waiting, in
    /// vectored writes. Returns whether anything was written.
    pub fn flush(&mut self) -> io::Result<bool> {
        let mut progressed = false;
        while !self.out.is_empty() {
            let skip = self.front_written;
            let slices: Vec<IoSlice<'_>> = self
                .out
                .iter()
                .take(MAX_IOVECS)
                .enumerate()
                .map(|(i, b)| IoSlice::new(if i == 0 { &b[skip..] } else { b }))
                .collect();
            match self.io.try_write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut n) => {
                    progressed = true;
                    self.out_bytes -= n;
                    while n > 0 {
                        // unwrap: n never exceeds what is queued
                        let left = self.out.front().unwrap().len() - self.front_written;
                        if n >= left {
                            n -= left;
                            self.out.pop_front();
                            self.front_written = 0;
                        } else {
                            self.front_written += n;
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(progressed)
    }

    /// Ends the connection: sends `close` after what is queued (waiting at
    /// most `linger` for a client that does not read), half-closes, and
    /// reads until the client closes too (or `linger` passes), so that the
    /// close frame is not lost to a reset caused by unread client bytes.
    pub async fn shut_down(mut self, close: Bytes, linger: Duration) {
        self.queue(close);
        let deadline = tokio::time::Instant::now() + linger;
        let sent = tokio::time::timeout_at(deadline, async {
            while self.pending() > 0 {
                self.flush()?;
                if self.pending() > 0 {
                    self.io.writable().await?;
                }
            }
            io::Result::Ok(())
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        let _ = self.io.shutdown().await;
        let _ = tokio::time::timeout_at(deadline, async {
            let mut sink = [0u8; 512];
            loop {
                if self.io.readable().await.is_err() {
                    return;
                }
                match self.io.try_read(&mut sink) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        })
        .await;
    }
}

/// Where the server frame that contains byte `offset` (> 0) of `frames`
/// ends; `offset` itself when a frame starts there. Server frames are
/// unmasked: a 2-byte header, then a 16- or 64-bit length if announced.
fn frame_end(frames: &[u8], offset: usize) -> usize {
    let mut pos = 0;
    while pos < offset {
        let Some(&[_, len7]) = frames.get(pos..pos + 2) else { return frames.len() };
        let (header, len) = match len7 & 0x7f {
            126 => (4, frames.get(pos + 2..pos + 4).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)),
            127 => {
                (10, frames.get(pos + 2..pos + 10).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")) as usize))
            }
            n => (2, Some(n as usize)),
        };
        let Some(len) = len else { return frames.len() };
        pos = pos.saturating_add(header + len);
    }
    pos.min(frames.len())
}

fn data_message(op: OpCode, payload: BytesMut) -> Result<Incoming, ReadError> {
    if op == OpCode::Binary {
        return Ok(Incoming::Binary);
    }
    String::from_utf8(payload.to_vec()).map(Incoming::Text).map_err(|_| {
        ReadError::Protocol(CloseReason {
            code: CloseCode::Invalid,
            description: Some("text message is not valid UTF-8".into()),
        })
    })
}

/// Whether a peer may send this close code (RFC 6455 section 7.4): the
/// defined ones (1004-1006 and 1015 are never sent), and those for
/// libraries, frameworks and applications (3000-4999).
fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A close frame's payload: nothing, or a code and a UTF-8 reason.
fn close_reason(payload: &[u8]) -> Result<Option<CloseReason>, ReadError> {
    match payload {
        [] => Ok(None),
        [a, b, _reason @ ..] if !sendable_close_code(u16::from_be_bytes([*a, *b])) => {
            Err(ReadError::Protocol(CloseReason {
                code: CloseCode::Protocol,
                description: Some(format!("close code {} is not one to send", u16::from_be_bytes([*a, *b]))),
            }))
        }
        [a, b, reason @ ..] => match std::str::from_utf8(reason) {
            Ok(reason) => Ok(Some(CloseReason {
                code: CloseCode::from(u16::from_be_bytes([*a, *b])),
                description: (!reason.is_empty()).then(|| reason.to_string()),
            })),
            // RFC 6455 section 8.1: invalid UTF-8 fails the connection with 1007.
            Err(_) => Err(ReadError::Protocol(CloseReason {
                code: CloseCode::Invalid,
                description: Some("close reason is not valid UTF-8".into()),
            })),
        },
        [_] => Err(ReadError::Protocol(CloseReason {
            code: CloseCode::Protocol,
            description: Some("close frame with a one-byte payload".into()),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut f = vec![first];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    async fn pair() -> (Socket, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Socket::new(server, BytesMut::new(), 1000), client)
    }

    async fn read_all(socket: &mut Socket) -> Result<Vec<Incoming>, ReadError> {
        let mut got = Vec::new();
        for _ in 0..50 {
            socket.readable().await.unwrap();
            socket.read_messages(&mut got)?;
            if !got.is_empty() {
                break;
            }
        }
        Ok(got)
    }

    /// A frame whose header declares more than a message may hold is
    /// refused with 1009 once more than that has come, not kept until it
    /// is complete. Before, its bytes were buffered for as long as they
    /// came (up to 2^63).
    #[tokio::test]
    async fn a_frame_declared_too_large_is_refused_before_it_is_buffered_whole() {
        let (mut socket, mut client) = pair().await;
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        header.extend_from_slice(&[0x12, 0x34, 0x56, 0x78]);
        client.write_all(&header).await.unwrap();
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..16 {
                if client.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            client
        });
        let refused = async {
            loop {
                if let Err(e) = read_all(&mut socket).await {
                    break e;
                }
            }
        };
        let e = tokio::time::timeout(Duration::from_secs(10), refused).await.expect("refused while the frame comes");
        assert!(matches!(&e, ReadError::Protocol(r) if r.code == CloseCode::Size), "{e:?}");
        assert!(socket.rbuf.len() <= 2 * (1000 + MAX_FRAME_HEADER + READ_CHUNK), "{} bytes kept", socket.rbuf.len());
        drop(socket);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn fragmented_text_is_assembled_and_control_frames_pass_between() {
        let (mut socket, mut client) = pair().await;
        let mut bytes = client_frame(0x01, b"hel"); // text, not final
        bytes.extend(client_frame(0x89, b"p")); // ping in between
        bytes.extend(client_frame(0x80, b"lo")); // final continuation
        client.write_all(&bytes).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(read_all(&mut socket).await.unwrap());
        }
        assert!(matches!(&got[0], Incoming::Ping(p) if &p[..] == b"p"));
        assert!(matches!(&got[1], Incoming::Text(t) if t == "hello"));
        assert!(socket.rbuf.capacity() == 0, "an idle socket holds no read buffer");
    }

    #[tokio::test]
    async fn protocol_violations_name_their_close_code() {
        for (bytes, code) in [
            (client_frame(0x80, b"x"), CloseCode::Protocol), // continuation without a message
            (client_frame(0x81, &[0xff, 0xfe]), CloseCode::Invalid), // not UTF-8
            (client_frame(0x81, &[b'a'; 1001]), CloseCode::Size), // over the limit
            ([0x81u8, 0x01, b'x'].to_vec(), CloseCode::Protocol), // unmasked client frame
            (client_frame(0x09, b"p"), CloseCode::Protocol), // fragmented ping
            (client_frame(0x0a, b""), CloseCode::Protocol),  // fragmented pong
            (client_frame(0x08, &[0x03, 0xe8]), CloseCode::Protocol), // fragmented close
            (client_frame(0x88, &[0x03, 0xe7]), CloseCode::Protocol), // close code 999
            (client_frame(0x88, &[0x03, 0xed]), CloseCode::Protocol), // close code 1005
            (client_frame(0x88, &[0x03, 0xf7]), CloseCode::Protocol), // close code 1015
            (client_frame(0x88, &[0x0b, 0xb7]), CloseCode::Protocol), // close code 2999
            (client_frame(0x88, &[0x13, 0x88]), CloseCode::Protocol), // close code 5000
            (client_frame(0x88, &[0x03, 0xe8, 0xff]), CloseCode::Invalid), // reason not UTF-8
        ] {
            let (mut socket, mut client) = pair().await;
            client.write_all(&bytes).await.unwrap();
            match read_all(&mut socket).await {
                Err(ReadError::Protocol(r)) => assert_eq!(r.code, code, "{bytes:?}"),
                other => panic!("{bytes:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn one_read_stops_after_its_budget_of_bytes() {
        // A receive buffer that holds everything the client sends below.
        let listener = tokio::net::TcpSocket::new_v4().unwrap();
        listener.set_recv_buffer_size(512 * 1024).unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listener.listen(1).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut socket = Socket::new(server, BytesMut::new(), 1000);
        // A message that never ends: more empty continuations than one read
        // may take, all waiting in the socket before it is read.
        let mut bytes = client_frame(0x01, b"{");
        for _ in 0..(3 * READ_BUDGET / 2 / 6) {
            bytes.extend(client_frame(0x00, b""));
        }
        tokio::time::timeout(Duration::from_secs(10), client.write_all(&bytes)).await.unwrap().unwrap();
        socket.readable().await.unwrap();
        let mut got = Vec::new();
        assert!(socket.read_messages(&mut got).unwrap(), "the read stops with bytes left");
        assert!(got.is_empty());
        assert!(!socket.read_messages(&mut got).unwrap(), "the rest is read by the next call");
    }

    #[test]
    fn frame_end_finds_the_end_of_the_frame_begun() {
        use crate::changes::wire::{frame, OP_TEXT};
        let frames: Vec<u8> =
            [frame(OP_TEXT, b"ab"), frame(OP_TEXT, &[b'x'; 300]), frame(OP_TEXT, &[b'y'; 70_000]), frame(OP_TEXT, b"")]
                .concat();
        let (a, b, c) = (4, 4 + 4 + 300, 4 + 4 + 300 + 10 + 70_000);
        assert_eq!(frame_end(&frames, 1), a);
        assert_eq!(frame_end(&frames, a), a, "a frame not begun is not kept");
        assert_eq!(frame_end(&frames, a + 1), b);
        assert_eq!(frame_end(&frames, b - 1), b);
        assert_eq!(frame_end(&frames, b + 3), c);
        assert_eq!(frame_end(&frames, c + 1), frames.len());
    }

    #[tokio::test]
    async fn a_discard_keeps_only_the_rest_of_a_frame_begun() {
        use crate::changes::wire::{frame, OP_TEXT};
        let (mut socket, client) = pair().await;
        let batch: Bytes = [frame(OP_TEXT, &[b'a'; 100]), frame(OP_TEXT, &[b'b'; 100])].concat().into();
        socket.queue(batch.clone());
        socket.queue(batch.clone());
        socket.front_written = 50;
        socket.out_bytes -= 50;
        socket.discard_unsent();
        assert_eq!(socket.pending(), 102 - 50);
        socket.front_written = 0;
        socket.discard_unsent();
        assert_eq!(socket.pending(), 0);
        drop(client);
    }

    #[test]
    fn close_codes_a_peer_may_send() {
        for code in [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4000, 4999] {
            assert!(sendable_close_code(code), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535] {
            assert!(!sendable_close_code(code), "{code}");
        }
    }

    #[tokio::test]
    async fn queued_frames_go_out_in_order_and_shared() {
        let (mut socket, mut client) = pair().await;
        let a = crate::changes::wire::frame(crate::changes::wire::OP_TEXT, b"first");
        let b = crate::changes::wire::frame(crate::changes::wire::OP_TEXT, b"second");
        socket.queue(a.clone());
        socket.queue(b.clone());
        assert_eq!(socket.pending(), a.len() + b.len());
        assert!(socket.flush().unwrap());
        assert_eq!(socket.pending(), 0);
        let mut got = vec![0u8; a.len() + b.len()];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut got).await.unwrap();
        assert_eq!(&got[..a.len()], &a[..]);
        assert_eq!(&got[a.len()..], &b[..]);
    }
}

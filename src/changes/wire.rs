//! The bytes a change travels as, built once per change (or per batch) and
//! shared by every client that receives it.
//!
//! Server-to-client WebSocket frames are not masked (RFC 6455 §5.1), so a
//! complete frame — header and payload — is the same for every client: the
//! WebSocket sessions write these shared `Bytes` straight to the connection
//! instead of re-framing (and copying into a per-client buffer) per message.

use bytes::{BufMut, Bytes, BytesMut};

/// WebSocket opcodes the server sends.
pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Length of the header of an unmasked frame with `len` payload bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Appends one final (FIN), unmasked frame.
pub fn put_frame(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    out.reserve(header_len(payload.len()) + payload.len());
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.put_u8(n as u8),
        n @ 126..=65535 => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
}

/// One frame as shared bytes.
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_frame(&mut out, opcode, payload);
    out.freeze()
}

/// A close frame: the code, then the reason cut to fit a control frame (125
/// bytes of payload) at a character boundary.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let reason = crate::prefix_within(reason, 123);
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    frame(OP_CLOSE, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_headers_follow_rfc_6455_length_rules() {
        assert_eq!(&frame(OP_TEXT, b"hi")[..], &[0x81, 2, b'h', b'i']);
        let f = frame(OP_TEXT, &[b'x'; 300]);
        assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
        assert_eq!(f.len(), 304);
        let f = frame(OP_TEXT, &vec![b'x'; 70_000]);
        assert_eq!(&f[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(f[2..10].try_into().unwrap()), 70_000);
        let c = close_frame(4008, &"é".repeat(100));
        assert_eq!(c[0], 0x88);
        assert!(c[1] as usize <= 125);
        assert_eq!(&c[2..4], &4008u16.to_be_bytes());
        assert!(std::str::from_utf8(&c[4..]).is_ok());
    }
}

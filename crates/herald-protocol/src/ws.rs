//! A lean RFC 6455 WebSocket frame codec for both roles, with no IO, plus the upgrade handshake
//! helpers ([`accept_key`], [`client_key`]).
//!
//! The [`Decoder`] turns bytes read from a socket into complete [`Message`]s: it reassembles
//! fragmented messages, lets control frames interleave, checks every rule of RFC 6455 section 5
//! that matters to a server (masking, reserved bits, opcodes, control frame limits, UTF-8 of text
//! messages) and enforces a size limit before buffering anything. An idle decoder holds no heap
//! allocation, so an idle connection costs only a few bytes here.
//!
//! The encoders write one complete, unfragmented frame (FIN set) in a single allocation.
//!
//! ```
//! use herald_protocol::ws::{encode_frame, Decoder, Message, Opcode, Role};
//!
//! // A client sends a (masked) text frame; the server decodes it.
//! let frame = encode_frame(Role::Client, Opcode::Text, b"{\"op\":\"pong\"}");
//! let mut decoder = Decoder::new(Role::Server, 64 * 1024);
//! let mut out = Vec::new();
//! decoder.feed(&frame, &mut out).unwrap();
//! assert_eq!(out, [Message::Text(bytes::Bytes::from_static(b"{\"op\":\"pong\"}"))]);
//! assert!(decoder.is_idle());
//! ```

use base64::Engine as _;
use bytes::{Buf as _, Bytes, BytesMut};
use sha1::{Digest as _, Sha1};

/// The GUID of RFC 6455 section 1.3, appended to the client's key in the handshake.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Longest payload of a control frame (ping, pong, close).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Longest frame header: 2 bytes, 8 bytes of extended length, 4 bytes of mask.
const MAX_HEADER_LEN: usize = 14;

/// Which end of the connection this codec serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The server: expects masked frames, writes unmasked frames.
    Server,
    /// The client: expects unmasked frames, writes frames masked with a random key.
    Client,
}

/// A frame opcode (RFC 6455 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// A continuation of a fragmented message.
    Continuation = 0,
    /// A text (UTF-8) message, or its first fragment.
    Text = 1,
    /// A binary message, or its first fragment.
    Binary = 2,
    /// A close frame.
    Close = 8,
    /// A ping frame.
    Ping = 9,
    /// A pong frame.
    Pong = 10,
}

impl Opcode {
    /// The opcode of a 4-bit value, or `None` for a reserved value.
    pub fn from_u8(value: u8) -> Option<Opcode> {
        match value {
            0 => Some(Opcode::Continuation),
            1 => Some(Opcode::Text),
            2 => Some(Opcode::Binary),
            8 => Some(Opcode::Close),
            9 => Some(Opcode::Ping),
            10 => Some(Opcode::Pong),
            _ => None,
        }
    }

    /// True for close, ping and pong.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// The payload of a close frame that carries a status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The status code (for Herald's own closes, a [`crate::CloseCode`]).
    pub code: u16,
    /// The reason, at most 123 bytes of UTF-8.
    pub reason: String,
}

/// One complete WebSocket message, as decoded or to be encoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A text message; the bytes are valid UTF-8 (checked by the decoder).
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping, to be answered with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close frame, with its status code and reason when it has one.
    Close(Option<CloseFrame>),
}

impl Message {
    /// The opcode this message is sent with.
    pub fn opcode(&self) -> Opcode {
        match self {
            Message::Text(_) => Opcode::Text,
            Message::Binary(_) => Opcode::Binary,
            Message::Ping(_) => Opcode::Ping,
            Message::Pong(_) => Opcode::Pong,
            Message::Close(_) => Opcode::Close,
        }
    }
}

/// Why the bytes read from a peer cannot be decoded; the connection must be closed.
#[derive(thiserror::Error, Debug)]
pub enum WsError {
    /// A message (or a single frame's header announcing it) exceeds the configured limit;
    /// Herald closes with 4009.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooBig {
        /// The announced size (accumulated size for fragmented messages).
        size: u64,
        /// The configured limit.
        limit: usize,
    },
    /// The peer broke RFC 6455; the text names the rule.
    #[error("websocket protocol error: {0}")]
    Protocol(&'static str),
}

/// A parsed, validated frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    header_len: usize,
    payload_len: usize,
}

impl Header {
    fn total_len(&self) -> usize {
        self.header_len.saturating_add(self.payload_len)
    }
}

/// A fragmented data message being reassembled.
#[derive(Debug)]
struct Fragmented {
    text: bool,
    data: BytesMut,
}

/// A frame payload, still masked: borrowed from the caller's input or owned (buffered).
enum Payload<'a> {
    Slice(&'a [u8]),
    Owned(BytesMut),
}

impl Payload<'_> {
    /// The unmasked payload, copying only when it was borrowed.
    fn into_unmasked(self, mask: Option<[u8; 4]>) -> Bytes {
        match (self, mask) {
            (Payload::Slice(s), None) => Bytes::copy_from_slice(s),
            (Payload::Slice(s), Some(mask)) => {
                let mut b = BytesMut::from(s);
                apply_mask(&mut b, mask);
                b.freeze()
            }
            (Payload::Owned(mut b), mask) => {
                if let Some(mask) = mask {
                    apply_mask(&mut b, mask);
                }
                b.freeze()
            }
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Slice(s) => s,
            Payload::Owned(b) => b,
        }
    }

    /// Appends the unmasked payload to `dst`.
    fn append_unmasked(self, dst: &mut BytesMut, mask: Option<[u8; 4]>) {
        let start = dst.len();
        dst.extend_from_slice(self.as_slice());
        if let Some(mask) = mask {
            apply_mask(&mut dst[start..], mask);
        }
    }
}

/// Incremental decoder of one direction of a WebSocket connection.
///
/// Bytes are parsed straight from the slice given to [`Decoder::feed`]; only an incomplete
/// trailing frame is copied into an internal buffer, whose allocation is released as soon as the
/// frame completes. After an error the connection must be closed: the decoder's state is then
/// unspecified (but feeding it more never panics).
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    max_message_bytes: usize,
    /// The incomplete frame (at most one) carried over between calls to `feed`.
    partial: BytesMut,
    /// The open fragmented message, if any.
    fragmented: Option<Fragmented>,
}

impl Decoder {
    /// A decoder for the given role, refusing messages longer than `max_message_bytes`.
    pub fn new(role: Role, max_message_bytes: usize) -> Self {
        Decoder { role, max_message_bytes, partial: BytesMut::new(), fragmented: None }
    }

    /// Feeds bytes read from the socket; appends every complete message (fragments reassembled,
    /// control frames may interleave) to `out`.
    ///
    /// On error, the messages completed before the offending frame are already in `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<Message>) -> Result<(), WsError> {
        // First complete the frame carried over from earlier calls, taking from `input` only
        // what that frame needs.
        while !self.partial.is_empty() {
            match self.parse_header(&self.partial)? {
                Some(header) => {
                    let total = header.total_len();
                    if self.partial.len() < total {
                        let take = (total - self.partial.len()).min(input.len());
                        self.partial.extend_from_slice(&input[..take]);
                        input = &input[take..];
                        if self.partial.len() < total {
                            return Ok(());
                        }
                    }
                    // Taking the buffer leaves an empty one without allocation behind.
                    let mut frame = std::mem::take(&mut self.partial);
                    frame.advance(header.header_len);
                    self.process(header, Payload::Owned(frame), out)?;
                }
                None => {
                    let need = header_need(&self.partial).saturating_sub(self.partial.len());
                    let take = need.min(input.len());
                    if take == 0 {
                        return Ok(());
                    }
                    self.partial.extend_from_slice(&input[..take]);
                    input = &input[take..];
                }
            }
        }
        // Nothing buffered: parse straight from the input.
        while !input.is_empty() {
            match self.parse_header(input)? {
                Some(header) if input.len() >= header.total_len() => {
                    let (frame, rest) = input.split_at(header.total_len());
                    self.process(header, Payload::Slice(&frame[header.header_len..]), out)?;
                    input = rest;
                }
                Some(header) => {
                    // Reserve what the frame needs (bounded by the limit, which `parse_header`
                    // checked), but no more than 64 KiB ahead of the bytes actually received, so
                    // announcing a large frame costs the peer as much as it costs us.
                    self.partial.reserve(header.total_len().min(input.len().max(64 * 1024)));
                    self.partial.extend_from_slice(input);
                    return Ok(());
                }
                None => {
                    self.partial.reserve(MAX_HEADER_LEN);
                    self.partial.extend_from_slice(input);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// True when no partial frame or fragmented message is buffered.
    pub fn is_idle(&self) -> bool {
        self.partial.is_empty() && self.fragmented.is_none()
    }

    /// Parses and checks the header at the start of `data`; `Ok(None)` when incomplete.
    fn parse_header(&self, data: &[u8]) -> Result<Option<Header>, WsError> {
        let (b0, b1) = match data {
            [b0, b1, ..] => (*b0, *b1),
            _ => return Ok(None),
        };
        if b0 & 0x70 != 0 {
            return Err(WsError::Protocol("reserved bits set"));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = Opcode::from_u8(b0 & 0x0f).ok_or(WsError::Protocol("unknown opcode"))?;
        let masked = b1 & 0x80 != 0;
        match (self.role, masked) {
            (Role::Server, false) => return Err(WsError::Protocol("unmasked frame from client")),
            (Role::Client, true) => return Err(WsError::Protocol("masked frame from server")),
            _ => {}
        }
        let len7 = b1 & 0x7f;
        if opcode.is_control() {
            if !fin {
                return Err(WsError::Protocol("fragmented control frame"));
            }
            if len7 > 125 {
                return Err(WsError::Protocol("control frame longer than 125 bytes"));
            }
        } else {
            match (opcode, &self.fragmented) {
                (Opcode::Continuation, None) => {
                    return Err(WsError::Protocol("continuation frame without a started message"))
                }
                (Opcode::Text | Opcode::Binary, Some(_)) => {
                    return Err(WsError::Protocol("new data frame inside a fragmented message"))
                }
                _ => {}
            }
        }
        let header_len = header_need(data);
        if data.len() < header_len {
            return Ok(None);
        }
        let len: u64 = match len7 {
            126 => u64::from(u16::from_be_bytes([data[2], data[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[2..10]);
                let len = u64::from_be_bytes(b);
                if len >> 63 != 0 {
                    return Err(WsError::Protocol("64-bit length with the high bit set"));
                }
                len
            }
            n => u64::from(n),
        };
        if !opcode.is_control() {
            let before = self.fragmented.as_ref().map_or(0, |f| f.data.len()) as u64;
            let size = before.saturating_add(len);
            if size > self.max_message_bytes as u64 {
                return Err(WsError::MessageTooBig { size, limit: self.max_message_bytes });
            }
        }
        // Fits: control frames are at most 125 bytes, data frames at most the limit (a usize).
        let payload_len = usize::try_from(len).map_err(|_| WsError::Protocol("frame too long"))?;
        let mask = masked.then(|| {
            let m = &data[header_len - 4..header_len];
            [m[0], m[1], m[2], m[3]]
        });
        Ok(Some(Header { fin, opcode, mask, header_len, payload_len }))
    }

    /// Handles one complete frame whose header passed `parse_header`.
    fn process(
        &mut self,
        header: Header,
        payload: Payload<'_>,
        out: &mut Vec<Message>,
    ) -> Result<(), WsError> {
        match header.opcode {
            Opcode::Ping => out.push(Message::Ping(payload.into_unmasked(header.mask))),
            Opcode::Pong => out.push(Message::Pong(payload.into_unmasked(header.mask))),
            Opcode::Close => {
                let close = parse_close(&payload.into_unmasked(header.mask))?;
                out.push(Message::Close(close));
            }
            Opcode::Text | Opcode::Binary => {
                let text = header.opcode == Opcode::Text;
                if header.fin {
                    out.push(data_message(text, payload.into_unmasked(header.mask))?);
                } else {
                    let mut data = BytesMut::new();
                    payload.append_unmasked(&mut data, header.mask);
                    self.fragmented = Some(Fragmented { text, data });
                }
            }
            Opcode::Continuation => {
                let Some(open) = self.fragmented.as_mut() else {
                    return Err(WsError::Protocol("continuation frame without a started message"));
                };
                payload.append_unmasked(&mut open.data, header.mask);
                if header.fin {
                    if let Some(done) = self.fragmented.take() {
                        out.push(data_message(done.text, done.data.freeze())?);
                    }
                }
            }
        }
        Ok(())
    }
}

/// How many header bytes `data` needs, judging from what it has (2 when it has fewer).
fn header_need(data: &[u8]) -> usize {
    let Some(&b1) = data.get(1) else {
        return 2;
    };
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// A complete text or binary message; text must be UTF-8.
fn data_message(text: bool, data: Bytes) -> Result<Message, WsError> {
    if !text {
        return Ok(Message::Binary(data));
    }
    if std::str::from_utf8(&data).is_err() {
        return Err(WsError::Protocol("invalid UTF-8 in text message"));
    }
    Ok(Message::Text(data))
}

/// True for close codes a peer may send (RFC 6455 section 7.4, IANA registry).
fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Decodes a close frame's (unmasked) payload.
fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsError::Protocol("close frame with a 1-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(WsError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason)
                .map_err(|_| WsError::Protocol("invalid UTF-8 in close reason"))?;
            Ok(Some(CloseFrame { code, reason: reason.to_owned() }))
        }
    }
}

/// XORs `buf` with the 4-byte `mask`, starting at mask byte 0; eight bytes at a time.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let m64 = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ m64).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, hence of 4: the mask restarts at byte 0.
    for (b, m) in chunks.into_remainder().iter_mut().zip(mask.iter().cycle()) {
        *b ^= m;
    }
}

/// The header length of a frame with `payload_len` bytes written by `role`.
fn header_len(role: Role, payload_len: usize) -> usize {
    let ext = match payload_len {
        0..=125 => 0,
        126..=0xffff => 2,
        _ => 8,
    };
    let mask = if role == Role::Client { 4 } else { 0 };
    2 + ext + mask
}

/// Appends one complete frame (FIN set) to `out`, masked with a random key when `role` is
/// [`Role::Client`].
///
/// The caller keeps control frames within [`MAX_CONTROL_PAYLOAD`] bytes.
pub fn encode_frame_into(role: Role, opcode: Opcode, payload: &[u8], out: &mut BytesMut) {
    encode_fragment_into(role, opcode, payload, true, out);
}

/// Whether a fragmented data message is still open after the whole frames in `frames` (an
/// encoder's output, masked or not), given whether one was open before them: a data frame
/// without FIN opens (or continues) one, a data frame with FIN ends it, a control frame leaves
/// the state as it was. A trailing incomplete frame is not looked at.
///
/// A writer uses it to know whether only a control frame may follow what it has written.
pub fn message_open_after(frames: &[u8], mut open: bool) -> bool {
    let mut rest = frames;
    while rest.len() >= 2 {
        let (b0, b1) = (rest[0], rest[1]);
        let (len, mut at) = match b1 & 0x7f {
            126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as u64, 4),
            127 if rest.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&rest[2..10]);
                (u64::from_be_bytes(n), 10)
            }
            126 | 127 => break,
            n => (n as u64, 2),
        };
        if b1 & 0x80 != 0 {
            at += 4;
        }
        let Some(end) = usize::try_from(len).ok().and_then(|l| l.checked_add(at)) else { break };
        if end > rest.len() {
            break;
        }
        if b0 & 0x08 == 0 {
            // A data frame (continuation, text, binary).
            open = b0 & 0x80 == 0;
        }
        rest = &rest[end..];
    }
    open
}

/// One frame of a fragmented message: `opcode` is the message's ([`Opcode::Text`] or
/// [`Opcode::Binary`]) on its first fragment and [`Opcode::Continuation`] on the others; `fin`
/// is set on the last. Control frames may go between fragments, data frames may not.
pub fn encode_fragment(role: Role, opcode: Opcode, payload: &[u8], fin: bool) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(role, payload.len()) + payload.len());
    encode_fragment_into(role, opcode, payload, fin, &mut out);
    out.freeze()
}

fn encode_fragment_into(role: Role, opcode: Opcode, payload: &[u8], fin: bool, out: &mut BytesMut) {
    out.reserve(header_len(role, payload.len()) + payload.len());
    let mask_bit = if role == Role::Client { 0x80 } else { 0 };
    let fin_bit = if fin { 0x80 } else { 0 };
    out.extend_from_slice(&[fin_bit | opcode as u8]);
    match payload.len() {
        n @ 0..=125 => out.extend_from_slice(&[mask_bit | n as u8]),
        n @ 126..=0xffff => {
            out.extend_from_slice(&[mask_bit | 126]);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.extend_from_slice(&[mask_bit | 127]);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match role {
        Role::Server => out.extend_from_slice(payload),
        Role::Client => {
            let mask: [u8; 4] = rand::random();
            out.extend_from_slice(&mask);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], mask);
        }
    }
}

/// One complete frame (FIN set), in one allocation.
pub fn encode_frame(role: Role, opcode: Opcode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(role, payload.len()) + payload.len());
    encode_frame_into(role, opcode, payload, &mut out);
    out.freeze()
}

/// A close frame with `code` and `reason`, the reason truncated (at a char boundary) so the
/// payload fits in 125 bytes.
pub fn encode_close(role: Role, code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    encode_frame(role, Opcode::Close, &payload[..2 + end])
}

/// One frame carrying `message` (control payloads longer than 125 bytes are truncated, close
/// reasons as in [`encode_close`]).
pub fn encode_message(role: Role, message: &Message) -> Bytes {
    match message {
        Message::Text(b) | Message::Binary(b) => encode_frame(role, message.opcode(), b),
        Message::Ping(b) | Message::Pong(b) => {
            let n = b.len().min(MAX_CONTROL_PAYLOAD);
            encode_frame(role, message.opcode(), &b[..n])
        }
        Message::Close(None) => encode_frame(role, Opcode::Close, &[]),
        Message::Close(Some(close)) => encode_close(role, close.code, &close.reason),
    }
}

/// The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key`: base64(sha1(key + GUID)).
pub fn accept_key(sec_websocket_key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(sec_websocket_key.as_bytes());
    sha.update(WS_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64.
pub fn client_key() -> String {
    let key: [u8; 16] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: usize = 1 << 20;

    #[test]
    fn message_open_after_follows_fin_of_data_frames_only() {
        let first = encode_fragment(Role::Server, Opcode::Text, b"a", false);
        let middle = encode_fragment(Role::Server, Opcode::Continuation, &[b'b'; 300], false);
        let last = encode_fragment(Role::Server, Opcode::Continuation, &[b'c'; 70_000], true);
        let ping = encode_frame(Role::Server, Opcode::Ping, b"p");
        let whole = encode_frame(Role::Client, Opcode::Text, b"masked");
        assert!(message_open_after(&first, false));
        assert!(message_open_after(&middle, true));
        assert!(message_open_after(&ping, true), "a control frame changes nothing");
        assert!(!message_open_after(&ping, false));
        assert!(!message_open_after(&last, true));
        assert!(!message_open_after(&whole, false));
        let mut several = Vec::new();
        for f in [&first, &ping, &middle] {
            several.extend_from_slice(f);
        }
        assert!(message_open_after(&several, false));
        several.extend_from_slice(&last);
        assert!(!message_open_after(&several, false));
        assert!(message_open_after(&several[..several.len() - 1], false), "the tail is cut");
    }

    /// A frame with explicit header bits, masked with a fixed key when `mask` is set.
    fn raw_frame(b0: u8, mask: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![b0];
        let m = if mask { 0x80 } else { 0 };
        match payload.len() {
            n @ 0..=125 => out.push(m | n as u8),
            n @ 126..=0xffff => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if mask {
            let key = [0x37, 0xfa, 0x21, 0x3d];
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], key);
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    fn decode(role: Role, limit: usize, input: &[u8]) -> Result<Vec<Message>, WsError> {
        let mut d = Decoder::new(role, limit);
        let mut out = Vec::new();
        d.feed(input, &mut out)?;
        assert!(d.is_idle(), "decoder not idle after complete input");
        assert_eq!(d.partial.capacity(), 0);
        Ok(out)
    }

    fn decode_bytewise(role: Role, limit: usize, input: &[u8]) -> Result<Vec<Message>, WsError> {
        let mut d = Decoder::new(role, limit);
        let mut out = Vec::new();
        for b in input {
            d.feed(std::slice::from_ref(b), &mut out)?;
        }
        assert!(d.is_idle());
        assert_eq!(d.partial.capacity(), 0);
        Ok(out)
    }

    fn text(s: &str) -> Message {
        Message::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn fragments_reassemble_around_control_frames() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode_fragment(Role::Server, Opcode::Text, b"Hel", false));
        wire.extend_from_slice(&encode_frame(Role::Server, Opcode::Ping, b"p"));
        wire.extend_from_slice(&encode_fragment(Role::Server, Opcode::Continuation, b"l", false));
        wire.extend_from_slice(&encode_fragment(Role::Server, Opcode::Continuation, b"o", true));
        assert_eq!(&wire[..5], &[0x01, 0x03, b'H', b'e', b'l']);
        assert_eq!(
            decode(Role::Client, LIMIT, &wire).unwrap(),
            [Message::Ping(Bytes::from_static(b"p")), text("Hello")]
        );
    }

    #[test]
    fn rfc_examples() {
        // RFC 6455 section 5.7.
        let unmasked_hello = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        assert_eq!(decode(Role::Client, LIMIT, &unmasked_hello).unwrap(), [text("Hello")]);
        let masked_hello = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        assert_eq!(decode(Role::Server, LIMIT, &masked_hello).unwrap(), [text("Hello")]);
        let fragmented = [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
        assert_eq!(decode(Role::Client, LIMIT, &fragmented).unwrap(), [text("Hello")]);
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        assert_eq!(
            decode(Role::Client, LIMIT, &ping).unwrap(),
            [Message::Ping(Bytes::from_static(b"Hello"))]
        );
        assert_eq!(encode_frame(Role::Server, Opcode::Text, b"Hello")[..], unmasked_hello);
        // RFC 6455 section 1.3.
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn lengths_7_16_64_bit() {
        for len in [0usize, 1, 125, 126, 127, 1000, 0xffff, 0x10000, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for (enc, dec) in [(Role::Client, Role::Server), (Role::Server, Role::Client)] {
                let frame = encode_frame(enc, Opcode::Binary, &payload);
                assert_eq!(frame.len(), header_len(enc, len) + len);
                let want = [Message::Binary(Bytes::from(payload.clone()))];
                assert_eq!(decode(dec, LIMIT, &frame).unwrap(), want, "len {len}");
                assert_eq!(decode_bytewise(dec, LIMIT, &frame).unwrap(), want, "len {len}");
            }
        }
        // The header sizes themselves.
        assert_eq!(encode_frame(Role::Server, Opcode::Binary, &[0; 125])[1], 125);
        assert_eq!(encode_frame(Role::Server, Opcode::Binary, &[0; 126])[1], 126);
        assert_eq!(encode_frame(Role::Server, Opcode::Binary, &[0; 0x10000])[1], 127);
        assert_eq!(encode_frame(Role::Client, Opcode::Binary, &[0; 3])[1], 0x80 | 3);
    }

    #[test]
    fn mask_matches_bytewise_model() {
        let key = [1, 2, 3, 0xff];
        for len in 0..40 {
            let mut buf: Vec<u8> = (0..len as u8).collect();
            apply_mask(&mut buf, key);
            let model: Vec<u8> = (0..len as u8).map(|i| i ^ key[i as usize % 4]).collect();
            assert_eq!(buf, model);
        }
    }

    #[test]
    fn client_frames_are_masked_with_fresh_keys() {
        let a = encode_frame(Role::Client, Opcode::Text, b"same payload");
        let b = encode_frame(Role::Client, Opcode::Text, b"same payload");
        assert_eq!(a[1] & 0x80, 0x80);
        assert_eq!(a.len(), 2 + 4 + 12);
        assert_ne!(a, b, "two random masks should differ");
    }

    #[test]
    fn fragmentation_with_interleaved_control_frames() {
        let mut input = raw_frame(0x01, true, b"{\"op\":");
        input.extend(raw_frame(0x89, true, b"p"));
        input.extend(raw_frame(0x00, true, b"\"pong\""));
        input.extend(raw_frame(0x8a, true, b""));
        input.extend(raw_frame(0x80, true, b"}"));
        input.extend(raw_frame(0x82, true, b"\x00\xff"));
        let want = [
            Message::Ping(Bytes::from_static(b"p")),
            Message::Pong(Bytes::new()),
            text("{\"op\":\"pong\"}"),
            Message::Binary(Bytes::from_static(b"\x00\xff")),
        ];
        assert_eq!(decode(Role::Server, LIMIT, &input).unwrap(), want);
        assert_eq!(decode_bytewise(Role::Server, LIMIT, &input).unwrap(), want);
        // UTF-8 split across fragments is fine.
        let mut split = raw_frame(0x01, true, &"é".as_bytes()[..1]);
        split.extend(raw_frame(0x80, true, &"é".as_bytes()[1..]));
        assert_eq!(decode(Role::Server, LIMIT, &split).unwrap(), [text("é")]);
    }

    #[test]
    fn close_frames() {
        let close = encode_close(Role::Client, 4002, "protocol error");
        assert_eq!(
            decode(Role::Server, LIMIT, &close).unwrap(),
            [Message::Close(Some(CloseFrame { code: 4002, reason: "protocol error".into() }))]
        );
        assert_eq!(
            decode(Role::Server, LIMIT, &raw_frame(0x88, true, b"")).unwrap(),
            [Message::Close(None)]
        );
        // Reason truncated at a char boundary to fit 125 bytes.
        let long = "é".repeat(100);
        let frame = encode_close(Role::Server, 1000, &long);
        assert_eq!(frame[1] as usize, 2 + 122);
        match &decode(Role::Client, LIMIT, &frame).unwrap()[..] {
            [Message::Close(Some(c))] => assert_eq!(c.reason, "é".repeat(61)),
            other => panic!("{other:?}"),
        }
        let ascii = "x".repeat(200);
        assert_eq!(encode_close(Role::Server, 1000, &ascii)[1], 125);
    }

    macro_rules! protocol_errors {
        ($($name:literal: $role:expr, $input:expr;)*) => {{
            $(
                match decode(
                    $role, 1000, &$input) {
                    Err(WsError::Protocol(_)) => {}
                    other => panic!("{}: expected a protocol error, got {other:?}", $name),
                }
                match decode_bytewise($role, 1000, &$input) {
                    Err(WsError::Protocol(_)) => {}
                    other => panic!("{} (bytewise): expected a protocol error, got {other:?}", $name),
                }
            )*
        }};
    }

    #[test]
    fn every_protocol_error() {
        let cat = |parts: &[Vec<u8>]| parts.concat();
        protocol_errors! {
            "unmasked from client": Role::Server, raw_frame(0x81, false, b"hi");
            "masked from server": Role::Client, raw_frame(0x81, true, b"hi");
            "rsv1": Role::Server, raw_frame(0xc1, true, b"hi");
            "rsv2": Role::Server, raw_frame(0xa1, true, b"hi");
            "rsv3": Role::Server, raw_frame(0x91, true, b"hi");
            "opcode 3": Role::Server, raw_frame(0x83, true, b"");
            "opcode 7": Role::Server, raw_frame(0x87, true, b"");
            "opcode 11": Role::Server, raw_frame(0x8b, true, b"");
            "opcode 15": Role::Server, raw_frame(0x8f, true, b"");
            "ping over 125": Role::Server, raw_frame(0x89, true, &[0; 126]);
            "close over 125": Role::Client, raw_frame(0x88, false, &[0; 126]);
            "fragmented ping": Role::Server, raw_frame(0x09, true, b"x");
            "fragmented close": Role::Server, raw_frame(0x08, true, b"");
            "lone continuation": Role::Server, raw_frame(0x80, true, b"x");
            "lone continuation, not fin": Role::Server, raw_frame(0x00, true, b"x");
            "text inside fragmented": Role::Server,
                cat(&[raw_frame(0x01, true, b"a"), raw_frame(0x81, true, b"b")]);
            "binary inside fragmented": Role::Server,
                cat(&[raw_frame(0x02, true, b"a"), raw_frame(0x02, true, b"b")]);
            "invalid utf-8": Role::Server, raw_frame(0x81, true, b"\xff\xfe");
            "truncated utf-8": Role::Server, raw_frame(0x81, true, &"é".as_bytes()[..1]);
            "invalid utf-8 fragmented": Role::Server,
                cat(&[raw_frame(0x01, true, b"ok"), raw_frame(0x80, true, b"\xc0\xaf")]);
            "close 1 byte": Role::Server, raw_frame(0x88, true, b"\x03");
            "close bad utf-8 reason": Role::Server, raw_frame(0x88, true, b"\x03\xe8\xff");
            "close code 1005": Role::Server, raw_frame(0x88, true, b"\x03\xed");
            "close code 999": Role::Server, raw_frame(0x88, true, b"\x03\xe7");
            "64-bit msb": Role::Client, [0x82u8, 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
        }
    }

    #[test]
    fn too_big_by_header_and_by_accumulation() {
        // By header, before any payload arrives.
        let mut d = Decoder::new(Role::Server, 100);
        let mut out = Vec::new();
        let frame = raw_frame(0x82, true, &[0; 101]);
        match d.feed(&frame[..8], &mut out) {
            Err(WsError::MessageTooBig { size: 101, limit: 100 }) => {}
            other => panic!("{other:?}"),
        }
        // 64-bit length, huge.
        let huge = [0x82, 0x80 | 127, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4];
        match Decoder::new(Role::Server, 100).feed(&huge, &mut out) {
            Err(WsError::MessageTooBig { size, limit: 100 }) => assert_eq!(size, i64::MAX as u64),
            other => panic!("{other:?}"),
        }
        // Exactly the limit is fine.
        assert!(decode(Role::Server, 100, &raw_frame(0x82, true, &[0; 100])).is_ok());
        // By accumulation of fragments.
        let input = [
            raw_frame(0x01, true, &[b'a'; 60]),
            raw_frame(0x89, true, b""),
            raw_frame(0x80, true, &[b'a'; 41]),
        ]
        .concat();
        let mut d = Decoder::new(Role::Server, 100);
        let mut out = Vec::new();
        match d.feed(&input, &mut out) {
            Err(WsError::MessageTooBig { size: 101, limit: 100 }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(out, [Message::Ping(Bytes::new())]);
        // Control frames do not count against a smaller limit.
        assert!(decode(Role::Server, 10, &raw_frame(0x89, true, &[0; 125])).is_ok());
    }

    #[test]
    fn partial_input_is_buffered_then_released() {
        let frame = encode_frame(Role::Client, Opcode::Text, &[b'x'; 300]);
        let mut d = Decoder::new(Role::Server, LIMIT);
        let mut out = Vec::new();
        assert!(d.is_idle());
        assert_eq!(d.partial.capacity(), 0);
        d.feed(&frame[..1], &mut out).unwrap();
        assert!(!d.is_idle());
        d.feed(&frame[1..150], &mut out).unwrap();
        assert!(out.is_empty() && !d.is_idle());
        // The rest of the frame plus a whole second frame plus half a third.
        let mut rest = frame[150..].to_vec();
        rest.extend_from_slice(&encode_frame(Role::Client, Opcode::Ping, b"p"));
        let third = encode_frame(Role::Client, Opcode::Binary, b"abc");
        rest.extend_from_slice(&third[..3]);
        d.feed(&rest, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert!(!d.is_idle());
        d.feed(&third[3..], &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(d.is_idle());
        assert_eq!(d.partial.capacity(), 0);
        // A fragmented message keeps the decoder busy until its last fragment.
        d.feed(&raw_frame(0x01, true, b"a"), &mut out).unwrap();
        assert!(!d.is_idle());
        d.feed(&raw_frame(0x80, true, b"b"), &mut out).unwrap();
        assert!(d.is_idle());
        assert_eq!(out[3], text("ab"));
    }

    #[test]
    fn encode_message_round_trips() {
        let messages = [
            text("hello"),
            Message::Binary(Bytes::from_static(b"\x00\x01")),
            Message::Ping(Bytes::from_static(b"p")),
            Message::Pong(Bytes::new()),
            Message::Close(None),
            Message::Close(Some(CloseFrame { code: 4008, reason: "slow consumer".into() })),
        ];
        for m in messages {
            let frame = encode_message(Role::Client, &m);
            assert_eq!(decode(Role::Server, LIMIT, &frame).unwrap(), [m]);
        }
    }

    #[test]
    fn client_key_is_16_bytes_base64() {
        let k = client_key();
        assert_eq!(k.len(), 24);
        assert_ne!(k, client_key());
        let raw = base64::engine::general_purpose::STANDARD.decode(&k).unwrap();
        assert_eq!(raw.len(), 16);
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            ".{0,300}".prop_map(|s| Message::Text(Bytes::from(s))),
            proptest::collection::vec(any::<u8>(), 0..70_000)
                .prop_map(|v| Message::Binary(Bytes::from(v))),
            proptest::collection::vec(any::<u8>(), 0..=125)
                .prop_map(|v| Message::Ping(Bytes::from(v))),
            proptest::collection::vec(any::<u8>(), 0..=125)
                .prop_map(|v| Message::Pong(Bytes::from(v))),
            Just(Message::Close(None)),
            (3000u16..5000, "[a-z ]{0,40}")
                .prop_map(|(code, reason)| Message::Close(Some(CloseFrame { code, reason }))),
        ]
    }

    /// Feeds `input` cut at the given points (taken modulo the length).
    fn feed_chunked(
        role: Role,
        input: &[u8],
        cuts: &[usize],
    ) -> Result<(Vec<Message>, Decoder), WsError> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.push(0);
        points.push(input.len());
        points.sort_unstable();
        let mut d = Decoder::new(role, LIMIT);
        let mut out = Vec::new();
        for w in points.windows(2) {
            d.feed(&input[w[0]..w[1]], &mut out)?;
        }
        Ok((out, d))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trip_both_roles(
            messages in proptest::collection::vec(arb_message(), 1..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            for (enc, dec) in [(Role::Client, Role::Server), (Role::Server, Role::Client)] {
                let mut input = BytesMut::new();
                for m in &messages {
                    input.extend_from_slice(&encode_message(enc, m));
                }
                let (out, d) = feed_chunked(dec, &input, &cuts).unwrap();
                prop_assert_eq!(&out, &messages);
                prop_assert!(d.is_idle());
                prop_assert_eq!(d.partial.capacity(), 0);
            }
        }

        #[test]
        fn fragmented_round_trip(
            payload in proptest::collection::vec(any::<u8>(), 0..2000),
            splits in proptest::collection::vec(any::<usize>(), 0..5),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut points: Vec<usize> =
                splits.iter().map(|c| c % (payload.len() + 1)).collect();
            points.push(0);
            points.push(payload.len());
            points.sort_unstable();
            let mut input = Vec::new();
            let n = points.len() - 1;
            for (i, w) in points.windows(2).enumerate() {
                let fin = if i + 1 == n { 0x80 } else { 0 };
                let op = if i == 0 { 0x02 } else { 0x00 };
                input.extend(raw_frame(fin | op, true, &payload[w[0]..w[1]]));
                input.extend(raw_frame(0x89, true, b"x"));
            }
            let (out, d) = feed_chunked(Role::Server, &input, &cuts).unwrap();
            prop_assert!(d.is_idle());
            let data: Vec<Message> =
                out.into_iter().filter(|m| !matches!(m, Message::Ping(_))).collect();
            prop_assert_eq!(data, vec![Message::Binary(Bytes::from(payload))]);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_reencode(
            input in proptest::collection::vec(any::<u8>(), 0..600),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
            server in any::<bool>(),
        ) {
            // As the fuzz target `ws_decoder`: whatever decodes re-encodes to the same.
            let (role, peer) =
                if server { (Role::Server, Role::Client) } else { (Role::Client, Role::Server) };
            if let Ok((messages, _)) = feed_chunked(role, &input, &cuts) {
                let again: Vec<u8> =
                    messages.iter().flat_map(|m| encode_message(peer, m)).collect();
                let (decoded, d) = feed_chunked(role, &again, &[]).unwrap();
                prop_assert!(d.is_idle());
                prop_assert_eq!(decoded, messages);
            }
        }
    }
}

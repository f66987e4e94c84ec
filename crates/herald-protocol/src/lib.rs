//! Herald's wire types and codecs, with no IO.
//!
//! This crate is shared by the server, the Rust client and the bench tool. It holds:
//!
//! - [`channel`]: validated channel names, namespaces and user-limited channels;
//! - [`code`]: reply error codes and WebSocket close codes;
//! - [`command`]: the commands a client sends (`connect` ... `pong`);
//! - [`push`]: what the server sends (replies and pushes), encoded once into [`bytes::Bytes`];
//! - [`json`]: the `herald.json` codec (several messages per frame, separated by `\n`);
//! - [`format`]: the wire formats ([`WireFormat`]) and their [`Codec`]s, one per subprotocol;
//! - [`pb`]: the `herald.proto` messages, generated from `proto/herald.proto`;
//! - [`proto`]: the `herald.proto` codec (varint-delimited Protocol Buffers messages);
//! - [`ws`]: a lean RFC 6455 frame codec (both roles) and the upgrade handshake helpers.
//!
//! The contract these types implement is `PROTOCOL.md`; Herald's extensions are in
//! `docs/protocol.md`.

pub mod channel;
pub mod code;
pub mod command;
pub mod format;
pub mod json;
pub mod pb;
pub mod proto;
pub mod push;
pub mod sse;
pub mod ws;

pub use channel::{ChannelName, ChannelNameError};
pub use code::{CloseCode, ErrorCode};
pub use command::{Command, CommandKind, StreamPosition};
pub use format::{Codec, WireFormat};

//! Herald's wire types and codecs, with no IO.
//!
//! This crate is shared by the server, the Rust client and the bench tool. It holds:
//!
//! - [`channel`]: validated channel names, namespaces and user-limited channels;
//! - [`code`]: reply error codes and WebSocket close codes;
//! - [`command`]: the commands a client sends (`connect` ... `pong`);
//! - [`push`]: what the server sends (replies and pushes), encoded once into [`bytes::Bytes`];
//! - [`json`]: the `herald.json` codec (several messages per frame, separated by `\n`);
//! - [`pb`]: the `herald.proto` messages, generated from `proto/herald.proto` (not served yet);
//! - [`ws`]: a lean RFC 6455 frame codec (both roles) and the upgrade handshake helpers.
//!
//! The contract these types implement is `PROTOCOL.md`; Herald's extensions are in
//! `docs/protocol.md`.

pub mod channel;
pub mod code;
pub mod command;
pub mod json;
pub mod pb;
pub mod push;
pub mod sse;
pub mod ws;

pub use channel::{ChannelName, ChannelNameError};
pub use code::{CloseCode, ErrorCode};
pub use command::{Command, CommandKind, StreamPosition};

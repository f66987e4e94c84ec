//! Commands a client sends to the server (PROTOCOL.md section 2, "Client to server").
//!
//! Commands are decoded from wire text by [`crate::json`]; this module only holds the validated
//! forms, so everything downstream can trust channel names, ids and positions.

use bytes::Bytes;

use crate::channel::ChannelName;

/// A position in a channel's stream: the offset of a publication within an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct StreamPosition {
    /// Offset of the publication (strictly increasing within the epoch).
    pub offset: u64,
    /// The epoch the offset belongs to; offsets of another epoch are meaningless.
    pub epoch: String,
}

/// One decoded client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The reply id (u32 > 0); `None` only for commands that expect no reply (`pong`).
    pub id: Option<u32>,
    /// What the client asks for.
    pub kind: CommandKind,
}

/// The operation of a [`Command`] with its validated fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandKind {
    /// `connect`: authenticate the connection (must be the first command if sent).
    Connect {
        /// A JWT, when the client has one.
        token: Option<String>,
    },
    /// `subscribe`: receive the channel's publications, optionally recovering from `since`.
    Subscribe {
        /// The channel.
        channel: ChannelName,
        /// Where the client's previous stream ended, to recover what it missed.
        since: Option<StreamPosition>,
    },
    /// `unsubscribe`: stop receiving the channel.
    Unsubscribe {
        /// The channel.
        channel: ChannelName,
    },
    /// `publish`: publish into a channel (where the namespace allows client publish).
    Publish {
        /// The channel.
        channel: ChannelName,
        /// The publication's `data`, as the raw JSON text the client sent.
        data: Bytes,
    },
    /// `history`: read the channel's retained publications.
    History {
        /// The channel.
        channel: ChannelName,
        /// Page forward from this position.
        since: Option<StreamPosition>,
        /// At most this many publications.
        limit: Option<u64>,
    },
    /// `refresh`: replace the connection's token, before it expires, with a new token for the
    /// same user (PROTOCOL.md 1.1); a connection whose token expires without one is closed
    /// with 4012.
    Refresh {
        /// The new JWT.
        token: String,
    },
    /// `pong`: the answer to a `ping` push.
    Pong,
}

impl CommandKind {
    /// The `op` string of this command.
    pub fn op(&self) -> &'static str {
        match self {
            CommandKind::Connect { .. } => "connect",
            CommandKind::Subscribe { .. } => "subscribe",
            CommandKind::Unsubscribe { .. } => "unsubscribe",
            CommandKind::Publish { .. } => "publish",
            CommandKind::History { .. } => "history",
            CommandKind::Refresh { .. } => "refresh",
            CommandKind::Pong => "pong",
        }
    }
}

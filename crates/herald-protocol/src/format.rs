//! Wire formats: which subprotocol a WebSocket connection speaks, and the codec of each.
//!
//! A [`WireFormat`] names one format (`herald.json`, `herald.proto`); its [`Codec`] decodes the
//! commands of one inbound WebSocket message and encodes everything the server sends, each
//! result the complete payload of one WebSocket message (several messages per payload where the
//! format frames them: `\n` in JSON, a varint length before each in protobuf). The hub, the
//! session and the transports hold a `WireFormat` and call its codec, so adding a format means
//! one codec module and one variant here.
//!
//! ```
//! use herald_protocol::format::{Negotiated, WireFormat};
//!
//! assert_eq!(WireFormat::negotiate(["herald.proto, herald.json"]), Negotiated::Chosen(WireFormat::Proto));
//! assert_eq!(WireFormat::negotiate(["x.y", "herald.json"]), Negotiated::Chosen(WireFormat::Json));
//! assert_eq!(WireFormat::negotiate(Vec::<&str>::new()), Negotiated::Default(WireFormat::Json));
//! assert!(matches!(WireFormat::negotiate(["mqtt"]), Negotiated::Refused(_)));
//! ```

use crate::code::{CloseCode, ErrorCode};
use crate::command::{Command, StreamPosition};
use crate::json::DecodeError;
use crate::push::{PublicationRef, ReplyOk};
use crate::ws::Opcode;

/// A wire format a WebSocket connection speaks, chosen by subprotocol at the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WireFormat {
    /// `herald.json`: text frames, JSON messages separated by `\n`.
    #[default]
    Json = 0,
    /// `herald.proto`: binary frames, Protocol Buffers messages (`proto/herald.proto`), each
    /// preceded by its length as a varint.
    Proto = 1,
}

/// The outcome of subprotocol negotiation (RFC 6455 section 4.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiated {
    /// The client offered no subprotocol: this format, and no `Sec-WebSocket-Protocol` in the
    /// answer.
    Default(WireFormat),
    /// The first offered subprotocol the server speaks: named in the answer.
    Chosen(WireFormat),
    /// Every offered subprotocol is unknown: the upgrade is refused (the offers, as sent).
    Refused(Vec<String>),
}

impl WireFormat {
    /// Every format, in [`WireFormat::index`] order.
    pub const ALL: [WireFormat; 2] = [WireFormat::Json, WireFormat::Proto];

    /// How many formats exist (the length of per-format caches).
    pub const COUNT: usize = Self::ALL.len();

    /// This format's position in [`WireFormat::ALL`], for per-format arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The WebSocket subprotocol naming this format.
    pub const fn subprotocol(self) -> &'static str {
        match self {
            WireFormat::Json => "herald.json",
            WireFormat::Proto => "herald.proto",
        }
    }

    /// The format a subprotocol names (exact match: subprotocol names are case-sensitive).
    pub fn from_subprotocol(name: &str) -> Option<WireFormat> {
        Self::ALL.into_iter().find(|f| f.subprotocol() == name)
    }

    /// The WebSocket opcode of this format's data frames (both directions).
    pub const fn opcode(self) -> Opcode {
        match self {
            WireFormat::Json => Opcode::Text,
            WireFormat::Proto => Opcode::Binary,
        }
    }

    /// The codec of this format.
    pub fn codec(self) -> &'static dyn Codec {
        match self {
            WireFormat::Json => &crate::json::JsonCodec,
            WireFormat::Proto => &crate::proto::ProtoCodec,
        }
    }

    /// Picks the format from the values of the request's `Sec-WebSocket-Protocol` headers
    /// (each a comma-separated list, in the client's order of preference): the first offered
    /// subprotocol the server speaks.
    pub fn negotiate<'a>(header_values: impl IntoIterator<Item = &'a str>) -> Negotiated {
        let offers: Vec<&str> = header_values
            .into_iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if offers.is_empty() {
            return Negotiated::Default(WireFormat::Json);
        }
        match offers.iter().find_map(|o| WireFormat::from_subprotocol(o)) {
            Some(format) => Negotiated::Chosen(format),
            None => Negotiated::Refused(offers.into_iter().map(str::to_owned).collect()),
        }
    }
}

impl std::fmt::Display for WireFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.subprotocol())
    }
}

impl std::str::FromStr for WireFormat {
    type Err = String;

    /// `json`, `proto`, or a subprotocol name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(WireFormat::Json),
            "proto" | "protobuf" => Ok(WireFormat::Proto),
            other => WireFormat::from_subprotocol(other)
                .ok_or_else(|| format!("unknown wire format {other:?} (json or proto)")),
        }
    }
}

/// The commands of one inbound message, in order: each decoded command, or why it could not be.
/// After a [`DecodeError::Fatal`] nothing more follows.
pub type Commands<'a> = Box<dyn Iterator<Item = Result<Command, DecodeError>> + Send + 'a>;

/// One wire format's server side: commands in, replies and pushes out. Every `encode_*` returns
/// the complete payload of one WebSocket message in the format's framing.
pub trait Codec: Send + Sync + 'static {
    /// The format this codec speaks.
    fn format(&self) -> WireFormat;

    /// Decodes the commands of one inbound WebSocket message.
    fn decode_commands<'a>(&self, message: &'a [u8]) -> Commands<'a>;

    /// A `pub` push; `epoch` is named on the first publication of an epoch the connection has
    /// not seen. `data` is the publication's bytes.
    fn encode_pub(
        &self,
        channel: &str,
        offset: Option<u64>,
        epoch: Option<&str>,
        data: &[u8],
    ) -> Vec<u8>;

    /// A successful reply to command `id`.
    fn encode_reply_ok(&self, id: u32, ok: &ReplyOk<'_>) -> Vec<u8>;

    /// An error reply to command `id`.
    fn encode_reply_error(&self, id: u32, code: ErrorCode, message: &str) -> Vec<u8>;

    /// A `ping` push.
    fn encode_ping(&self) -> Vec<u8>;

    /// The `disconnect` push before a close frame with `code`.
    fn encode_disconnect(&self, code: CloseCode) -> Vec<u8>;

    /// An `unsub` push: the server ended the subscription to `channel`.
    fn encode_unsub(&self, channel: &str, code: u16, reason: &str) -> Vec<u8>;

    /// The first part of a `subscribe` reply sent in parts (a recovery larger than one page;
    /// the parts are the fragments of one WebSocket message): opens reply `id` with the first
    /// publications.
    fn subscribe_head(&self, id: u32, publications: &[PublicationRef<'_>]) -> Vec<u8>;

    /// A middle part: more publications; `first` when no part before carried any.
    fn subscribe_more(&self, id: u32, publications: &[PublicationRef<'_>], first: bool) -> Vec<u8>;

    /// The last part: the channel's position and `recovered`.
    fn subscribe_tail(
        &self,
        id: u32,
        position: Option<&StreamPosition>,
        recovered: bool,
    ) -> Vec<u8>;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_rfc_6455() {
        use Negotiated::*;
        assert_eq!(WireFormat::negotiate(["herald.json"]), Chosen(WireFormat::Json));
        // The client's order of preference, over one or several header lines.
        assert_eq!(
            WireFormat::negotiate(["a", "herald.proto,herald.json"]),
            Chosen(WireFormat::Proto)
        );
        assert_eq!(WireFormat::negotiate([" , "]), Default(WireFormat::Json));
        // Names are case-sensitive.
        assert_eq!(WireFormat::negotiate(["Herald.JSON"]), Refused(vec!["Herald.JSON".into()]));
        for f in WireFormat::ALL {
            assert_eq!(WireFormat::ALL[f.index()], f);
            assert_eq!(f.codec().format(), f);
            assert_eq!(f.subprotocol().parse::<WireFormat>().unwrap(), f);
        }
    }
}

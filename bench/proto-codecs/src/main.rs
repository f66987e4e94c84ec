//! Encode and decode cost of one `ServerMessage { pub: Pub }` of `proto/herald.proto`, carrying
//! a typical market tick (symbol, bid, ask, last, volume, timestamp) as its `data`, with prost
//! and with quick-protobuf. The message types are written by hand here in each crate's form
//! (the fields and tags of the schema); medians of several rounds, nanoseconds per message.
//!
//! Run: `cargo run --release` in this directory.

use std::borrow::Cow;
use std::hint::black_box;
use std::time::Instant;

use quick_protobuf::{BytesReader, MessageRead, MessageWrite, Writer};

/// The tick as its JSON text (what a JSON subscriber gets as `data`).
const TICK: &[u8] = br#"{"symbol":"BTC-USD","bid":64123.5,"ask":64124.0,"last":64123.75,"volume":1.25,"ts":1796680800123}"#;

mod with_prost {
    /// `ServerMessage` with only the `pub` arm (tag 2).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ServerMessage {
        #[prost(message, optional, tag = "2")]
        pub publication: Option<Pub>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Pub {
        #[prost(string, tag = "1")]
        pub channel: String,
        #[prost(uint64, optional, tag = "2")]
        pub offset: Option<u64>,
        #[prost(string, optional, tag = "3")]
        pub epoch: Option<String>,
        #[prost(bytes = "bytes", tag = "4")]
        pub data: bytes::Bytes,
    }
}

mod commands_prost {
    /// `Command` with only the `publish` arm (tag 5).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Command {
        #[prost(uint32, tag = "1")]
        pub id: u32,
        #[prost(message, optional, tag = "5")]
        pub publish: Option<Publish>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Publish {
        #[prost(string, tag = "1")]
        pub channel: String,
        #[prost(bytes = "bytes", tag = "2")]
        pub data: bytes::Bytes,
    }
}

mod commands_quick {
    use super::*;

    #[derive(Debug, Default, PartialEq)]
    pub struct Publish<'a> {
        pub channel: Cow<'a, str>,
        pub data: Cow<'a, [u8]>,
    }

    impl<'a> MessageRead<'a> for Publish<'a> {
        fn from_reader(r: &mut BytesReader, bytes: &'a [u8]) -> quick_protobuf::Result<Self> {
            let mut msg = Publish::default();
            while !r.is_eof() {
                match r.next_tag(bytes) {
                    Ok(10) => msg.channel = r.read_string(bytes).map(Cow::Borrowed)?,
                    Ok(18) => msg.data = r.read_bytes(bytes).map(Cow::Borrowed)?,
                    Ok(t) => r.read_unknown(bytes, t)?,
                    Err(e) => return Err(e),
                }
            }
            Ok(msg)
        }
    }

    #[derive(Debug, Default, PartialEq)]
    pub struct Command<'a> {
        pub id: u32,
        pub publish: Option<Publish<'a>>,
    }

    impl<'a> MessageRead<'a> for Command<'a> {
        fn from_reader(r: &mut BytesReader, bytes: &'a [u8]) -> quick_protobuf::Result<Self> {
            let mut msg = Command::default();
            while !r.is_eof() {
                match r.next_tag(bytes) {
                    Ok(8) => msg.id = r.read_uint32(bytes)?,
                    Ok(42) => msg.publish = Some(r.read_message::<Publish>(bytes)?),
                    Ok(t) => r.read_unknown(bytes, t)?,
                    Err(e) => return Err(e),
                }
            }
            Ok(msg)
        }
    }
}

mod with_quick {
    use super::*;

    #[derive(Debug, Default, PartialEq)]
    pub struct Pub<'a> {
        pub channel: Cow<'a, str>,
        pub offset: Option<u64>,
        pub epoch: Option<Cow<'a, str>>,
        pub data: Cow<'a, [u8]>,
    }

    impl<'a> MessageRead<'a> for Pub<'a> {
        fn from_reader(r: &mut BytesReader, bytes: &'a [u8]) -> quick_protobuf::Result<Self> {
            let mut msg = Pub::default();
            while !r.is_eof() {
                match r.next_tag(bytes) {
                    Ok(10) => msg.channel = r.read_string(bytes).map(Cow::Borrowed)?,
                    Ok(16) => msg.offset = Some(r.read_uint64(bytes)?),
                    Ok(26) => msg.epoch = Some(r.read_string(bytes).map(Cow::Borrowed)?),
                    Ok(34) => msg.data = r.read_bytes(bytes).map(Cow::Borrowed)?,
                    Ok(t) => r.read_unknown(bytes, t)?,
                    Err(e) => return Err(e),
                }
            }
            Ok(msg)
        }
    }

    impl MessageWrite for Pub<'_> {
        fn get_size(&self) -> usize {
            use quick_protobuf::sizeofs::{sizeof_len, sizeof_varint};
            1 + sizeof_len(self.channel.len())
                + self.offset.map_or(0, |o| 1 + sizeof_varint(o))
                + self.epoch.as_ref().map_or(0, |e| 1 + sizeof_len(e.len()))
                + 1
                + sizeof_len(self.data.len())
        }

        fn write_message<W: quick_protobuf::WriterBackend>(
            &self,
            w: &mut Writer<W>,
        ) -> quick_protobuf::Result<()> {
            w.write_with_tag(10, |w| w.write_string(&self.channel))?;
            if let Some(o) = self.offset {
                w.write_with_tag(16, |w| w.write_uint64(o))?;
            }
            if let Some(e) = &self.epoch {
                w.write_with_tag(26, |w| w.write_string(e))?;
            }
            w.write_with_tag(34, |w| w.write_bytes(&self.data))?;
            Ok(())
        }
    }

    /// `ServerMessage` with only the `pub` arm (tag 2).
    #[derive(Debug, Default, PartialEq)]
    pub struct ServerMessage<'a> {
        pub publication: Option<Pub<'a>>,
    }

    impl<'a> MessageRead<'a> for ServerMessage<'a> {
        fn from_reader(r: &mut BytesReader, bytes: &'a [u8]) -> quick_protobuf::Result<Self> {
            let mut msg = ServerMessage::default();
            while !r.is_eof() {
                match r.next_tag(bytes) {
                    Ok(18) => msg.publication = Some(r.read_message::<Pub>(bytes)?),
                    Ok(t) => r.read_unknown(bytes, t)?,
                    Err(e) => return Err(e),
                }
            }
            Ok(msg)
        }
    }

    impl MessageWrite for ServerMessage<'_> {
        fn get_size(&self) -> usize {
            use quick_protobuf::sizeofs::sizeof_len;
            self.publication.as_ref().map_or(0, |p| 1 + sizeof_len(p.get_size()))
        }

        fn write_message<W: quick_protobuf::WriterBackend>(
            &self,
            w: &mut Writer<W>,
        ) -> quick_protobuf::Result<()> {
            if let Some(p) = &self.publication {
                w.write_with_tag(18, |w| w.write_message(p))?;
            }
            Ok(())
        }
    }
}

/// Nanoseconds per call of `f`, median of `rounds` rounds of `n` calls.
fn measure(rounds: usize, n: u32, mut f: impl FnMut()) -> f64 {
    let mut per = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..n {
            f();
        }
        per.push(start.elapsed().as_nanos() as f64 / f64::from(n));
    }
    per.sort_by(f64::total_cmp);
    per[rounds / 2]
}

fn main() {
    use prost::Message as _;
    const N: u32 = 1_000_000;
    const ROUNDS: usize = 7;
    let channel = "market:BTC-USD";
    let data = bytes::Bytes::from_static(TICK);

    let prost_msg = with_prost::ServerMessage {
        publication: Some(with_prost::Pub {
            channel: channel.to_string(),
            offset: Some(123_456),
            epoch: None,
            data: data.clone(),
        }),
    };
    // Encoded once per publication, delimited (length-prefixed) as on the wire.
    let prost_encode = measure(ROUNDS, N, || {
        let mut buf = Vec::with_capacity(prost_msg.encoded_len() + 2);
        black_box(&prost_msg).encode_length_delimited(&mut buf).expect("room");
        black_box(buf);
    });
    let mut prost_wire = Vec::new();
    prost_msg.encode_length_delimited(&mut prost_wire).expect("room");
    let prost_wire = bytes::Bytes::from(prost_wire);
    let prost_decode = measure(ROUNDS, N, || {
        let m = with_prost::ServerMessage::decode_length_delimited(black_box(prost_wire.clone()))
            .expect("decodes");
        black_box(m);
    });

    let quick_msg = with_quick::ServerMessage {
        publication: Some(with_quick::Pub {
            channel: Cow::Borrowed(channel),
            offset: Some(123_456),
            epoch: None,
            data: Cow::Borrowed(TICK),
        }),
    };
    let quick_encode = measure(ROUNDS, N, || {
        let msg = black_box(&quick_msg);
        let mut buf = Vec::with_capacity(msg.get_size() + 2);
        let mut w = Writer::new(&mut buf);
        w.write_message(msg).expect("room");
        black_box(buf);
    });
    let mut quick_wire = Vec::new();
    Writer::new(&mut quick_wire).write_message(&quick_msg).expect("room");
    assert_eq!(quick_wire, prost_wire.to_vec(), "both crates write the same bytes");
    let quick_decode = measure(ROUNDS, N, || {
        let bytes = black_box(&quick_wire[..]);
        let mut r = BytesReader::from_bytes(bytes);
        let m: with_quick::ServerMessage = r.read_message(bytes).expect("decodes");
        black_box(m);
    });

    // A client's `publish` of the same tick, decoded by the server.
    let command = commands_prost::Command {
        id: 7,
        publish: Some(commands_prost::Publish { channel: channel.to_string(), data: data.clone() }),
    };
    let mut command_wire = Vec::new();
    command.encode_length_delimited(&mut command_wire).expect("room");
    let command_wire = bytes::Bytes::from(command_wire);
    let prost_command = measure(ROUNDS, N, || {
        let m = commands_prost::Command::decode_length_delimited(black_box(command_wire.clone()))
            .expect("decodes");
        black_box(m);
    });
    let quick_command = measure(ROUNDS, N, || {
        let bytes = black_box(&command_wire[..]);
        let mut r = BytesReader::from_bytes(bytes);
        let m: commands_quick::Command = r.read_message(bytes).expect("decodes");
        assert_eq!(m.id, 7);
        black_box(m);
    });

    println!("message: ServerMessage{{pub}} of a {}-byte JSON tick, {} bytes delimited", TICK.len(), prost_wire.len());
    println!("command: Command{{publish}} of the same tick, {} bytes delimited", command_wire.len());
    println!("prost          push encode {prost_encode:6.1} ns  decode {prost_decode:6.1} ns  command decode {prost_command:6.1} ns");
    println!("quick-protobuf push encode {quick_encode:6.1} ns  decode {quick_decode:6.1} ns  command decode {quick_command:6.1} ns");
}

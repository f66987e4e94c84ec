//! `herald-bench codecs`: what one publication of a typical market tick costs in each wire
//! format: the bytes of its WebSocket frame, the server's encoding (Herald's own codec, frame
//! header included: done once per publication and format), and a client's decoding into a
//! typed tick (serde for JSON; the generated `herald.proto` messages, then the tick's own
//! message or JSON, for protobuf). Medians of several rounds, nanoseconds per publication,
//! on the thread it runs on (pin it with `taskset`).

use std::hint::black_box;
use std::time::Instant;

use herald_protocol::{ws, WireFormat};
use prost::Message as _;
use serde::{Deserialize, Serialize};

/// A market tick as an application defines it: its JSON form, and its protobuf form (the
/// application's schema, not Herald's).
#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
struct Tick {
    #[prost(string, tag = "1")]
    symbol: String,
    #[prost(double, tag = "2")]
    bid: f64,
    #[prost(double, tag = "3")]
    ask: f64,
    #[prost(double, tag = "4")]
    last: f64,
    #[prost(double, tag = "5")]
    volume: f64,
    #[prost(uint64, tag = "6")]
    ts: u64,
}

/// A JSON `pub` push as a typed client reads it.
#[derive(Deserialize)]
struct JsonPush<T> {
    #[serde(rename = "pub")]
    publication: JsonPub<T>,
}

#[derive(Deserialize)]
struct JsonPub<T> {
    #[allow(dead_code)]
    channel: String,
    #[allow(dead_code)]
    offset: Option<u64>,
    #[serde(default = "Option::default")]
    data: Option<T>,
    #[serde(default)]
    b64data: Option<String>,
}

/// One row of the table.
#[derive(Debug, Serialize)]
pub(crate) struct Row {
    format: &'static str,
    data: &'static str,
    data_bytes: usize,
    frame_bytes: usize,
    encode_ns: f64,
    decode_ns: f64,
}

fn tick() -> Tick {
    Tick {
        symbol: "BTC-USD".into(),
        bid: 64123.5,
        ask: 64124.0,
        last: 64123.75,
        volume: 1.25,
        ts: 1_796_680_800_123,
    }
}

/// Median nanoseconds per call of `f` over `rounds` rounds of `n` calls.
fn median_ns(rounds: usize, n: usize, mut f: impl FnMut()) -> f64 {
    let mut per = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..n {
            f();
        }
        per.push(start.elapsed().as_nanos() as f64 / n as f64);
    }
    per.sort_by(f64::total_cmp);
    per[rounds / 2]
}

/// The server's frame of a `pub` push of `data` in `format`.
fn frame(format: WireFormat, data: &[u8]) -> bytes::Bytes {
    let payload = format.codec().encode_pub("market:BTC-USD", Some(1_234_567), None, data);
    ws::encode_frame(ws::Role::Server, format.opcode(), &payload)
}

/// A client's decoding of a frame's payload into the tick.
fn decode(format: WireFormat, binary_data: bool, payload: &[u8]) -> Option<Tick> {
    match format {
        WireFormat::Json => {
            let push: JsonPush<Tick> = serde_json::from_slice(payload).ok()?;
            match (push.publication.data, push.publication.b64data) {
                (Some(tick), _) => Some(tick),
                (None, Some(b64)) => {
                    use base64::Engine as _;
                    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
                    Tick::decode(&bytes[..]).ok()
                }
                _ => None,
            }
        }
        WireFormat::Proto => {
            let message =
                herald_protocol::pb::ServerMessage::decode_length_delimited(payload).ok()?;
            let Some(herald_protocol::pb::server_message::Kind::Pub(p)) = message.kind else {
                return None;
            };
            if binary_data {
                Tick::decode(p.data).ok()
            } else {
                serde_json::from_slice(&p.data).ok()
            }
        }
    }
}

/// Measures every combination; `n` calls per round.
pub(crate) fn run(rounds: usize, n: usize) -> anyhow::Result<Vec<Row>> {
    let tick = tick();
    let json_data = serde_json::to_vec(&tick)?;
    let proto_data = tick.encode_to_vec();
    let cases: [(WireFormat, &'static str, &[u8], bool); 4] = [
        (WireFormat::Json, "JSON tick", &json_data, false),
        (WireFormat::Proto, "JSON tick", &json_data, false),
        (WireFormat::Proto, "protobuf tick", &proto_data, true),
        (WireFormat::Json, "protobuf tick (b64data)", &proto_data, true),
    ];
    let mut rows = Vec::new();
    for (format, what, data, binary) in cases {
        let framed = frame(format, data);
        // The payload after the server frame's 2-byte header (every frame here is < 126 bytes).
        let header = if framed.len() - 2 < 126 { 2 } else { 4 };
        let payload = framed[header..].to_vec();
        anyhow::ensure!(
            decode(format, binary, &payload).as_ref() == Some(&tick),
            "{format} / {what}: the client does not get the tick back"
        );
        let encode_ns = median_ns(rounds, n, || {
            black_box(frame(format, black_box(data)));
        });
        let decode_ns = median_ns(rounds, n, || {
            black_box(decode(format, binary, black_box(&payload)));
        });
        rows.push(Row {
            format: format.subprotocol(),
            data: what,
            data_bytes: data.len(),
            frame_bytes: framed.len(),
            encode_ns,
            decode_ns,
        });
    }
    Ok(rows)
}

/// The rows as a markdown table.
pub(crate) fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| format | data | data bytes | frame bytes | server encode ns | client decode ns |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.0} |\n",
            r.format, r.data, r.data_bytes, r.frame_bytes, r.encode_ns, r.decode_ns
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn every_case_gives_the_tick_back_and_protobuf_frames_are_smaller() {
        let rows = super::run(1, 10).unwrap();
        assert_eq!(rows.len(), 4);
        let json = rows[0].frame_bytes;
        let proto_binary = rows[2].frame_bytes;
        assert!(proto_binary < json, "{rows:?}");
    }
}

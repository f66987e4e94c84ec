//! Feeds arbitrary bytes, cut into arbitrary chunks, to a WebSocket decoder of either role; when
//! decoding succeeds, re-encodes every message and checks that it decodes to the same.
#![no_main]

use herald_protocol::ws::{encode_message, Decoder, Role};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    // Bit 0 picks the role; the other bits the chunk size (1..=128 bytes).
    let (decoder_role, peer_role) =
        if control & 1 == 0 { (Role::Server, Role::Client) } else { (Role::Client, Role::Server) };
    let chunk = usize::from(control >> 1) + 1;

    let mut decoder = Decoder::new(decoder_role, LIMIT);
    let mut messages = Vec::new();
    for piece in input.chunks(chunk) {
        if decoder.feed(piece, &mut messages).is_err() {
            return;
        }
    }

    let mut again = Vec::new();
    for m in &messages {
        again.extend_from_slice(&encode_message(peer_role, m));
    }
    let mut decoder = Decoder::new(decoder_role, LIMIT);
    let mut decoded = Vec::new();
    decoder.feed(&again, &mut decoded).expect("re-encoded messages must decode");
    assert!(decoder.is_idle());
    assert_eq!(decoded, messages);
});

//! Decodes arbitrary bytes as `herald.json` commands; every command that decodes must encode and
//! decode again to exactly what the encoder promises: the same command, except that line breaks
//! in `data` (only possible as JSON whitespace between its tokens) are written as spaces, so a
//! frame's lines stay lines. The same bytes go to the client's decoder of the server's frames
//! ([`decode_server_messages`]), which must not panic.
#![no_main]

use bytes::Bytes;
use herald_protocol::command::CommandKind;
use herald_protocol::json::{
    decode_command, decode_commands, decode_server_messages, encode_command,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The whole input as one line: must not panic.
    let _ = decode_command(data);
    // As a frame: lines never hold '\n'; each decoded command round-trips as promised.
    for command in decode_commands(data).flatten() {
        let line = encode_command(&command);
        let mut expected = command.clone();
        if let CommandKind::Publish { data, .. } = &mut expected.kind {
            let spaced: Vec<u8> =
                data.iter().map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }).collect();
            *data = Bytes::from(spaced);
        }
        assert_eq!(decode_command(&line), Ok(expected));
    }
    // Client side: the server's frame.
    decode_server_messages(data).for_each(drop);
});

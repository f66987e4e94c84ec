//! Decodes arbitrary bytes as `herald.json` commands; every command that decodes must encode and
//! decode again to the same.
#![no_main]

use herald_protocol::json::{decode_command, decode_commands, encode_command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The whole input as one line: must not panic.
    let _ = decode_command(data);
    // As a frame: lines never hold '\n', so each decoded command must round-trip exactly.
    for command in decode_commands(data).flatten() {
        let line = encode_command(&command);
        assert_eq!(decode_command(&line).as_ref(), Ok(&command));
    }
});

//! Decodes arbitrary bytes as a `herald.proto` frame, both ways: as the server reads a client's
//! frame (`Command`s) and as a client reads the server's (`ServerMessage`s). Neither may panic.
//! Every command that decodes must encode and decode again to exactly the same command, alone
//! and with the frame's other commands in one frame; the codec the server uses
//! ([`WireFormat::Proto`]) gives what [`decode_commands`] gives.
#![no_main]

use herald_protocol::format::WireFormat;
use herald_protocol::proto::{decode_commands, decode_server_messages, encode_command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Server side: a client's frame.
    let decoded: Vec<_> = decode_commands(data).collect();
    let via_codec: Vec<_> = WireFormat::Proto.codec().decode_commands(data).collect();
    assert_eq!(decoded, via_codec);

    let commands: Vec<_> = decoded.into_iter().flatten().collect();
    let mut frame = Vec::new();
    for command in &commands {
        let encoded = encode_command(command);
        let again: Vec<_> = decode_commands(&encoded).collect();
        assert_eq!(again, vec![Ok(command.clone())], "{encoded:02x?}");
        frame.extend_from_slice(&encoded);
    }
    let again: Vec<_> = decode_commands(&frame).collect();
    assert_eq!(again, commands.into_iter().map(Ok).collect::<Vec<_>>());

    // Client side: the server's frame.
    let _ = decode_server_messages(data);
});

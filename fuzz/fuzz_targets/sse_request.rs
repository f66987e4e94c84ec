//! The SSE request's decoders of outside input in herald-protocol: the `Last-Event-ID` a browser
//! sends back ([`parse_event_id`], either form) and channel names ([`ChannelName::parse`]).
//!
//! Input: the first byte is the stream's channel count; the rest, as text, is the id, and the id
//! and each of its `;`-separated pieces are parsed as channel names. Checks: nothing panics; the
//! compact form has at most one entry per channel; what an id parses to, written again in the
//! same form, parses to the same (compact: entry by entry; named: channel -> position); a name
//! that parses is exactly its text and parses again to itself, and the parser accepts exactly
//! the names of the model (1..=255 bytes of `A-Z a-z 0-9 _ - . : @ / = # ,`).
//!
//! The query of `GET /sse` (`channel=`, `token=`, `last_event_id=`, percent-decoding) is parsed
//! by private functions of herald-server; the `api_router` target fuzzes it through the router.
#![no_main]

use std::collections::HashMap;

use herald_protocol::sse::{parse_event_id, push_entry, EventId, IdEntry};
use herald_protocol::ChannelName;
use libfuzzer_sys::fuzz_target;

/// Writes parsed compact entries back as an id (an unknown entry as a malformed one).
fn write_indexed(entries: &[IdEntry]) -> String {
    let mut id = String::from("~");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            id.push(';');
        }
        match entry {
            IdEntry::Unknown => id.push('?'),
            IdEntry::NoHistory => {}
            IdEntry::At { tag, offset } => push_entry(&mut id, tag, *offset),
        }
    }
    id
}

/// Writes a parsed named id back (`channel~epoch~offset` or `channel`, joined by `;`).
fn write_named(map: &HashMap<String, Option<herald_protocol::StreamPosition>>) -> String {
    let entries: Vec<String> = map
        .iter()
        .map(|(channel, position)| match position {
            Some(p) => format!("{channel}~{}~{}", p.epoch, p.offset),
            None => channel.clone(),
        })
        .collect();
    entries.join(";")
}

fn check_channel_name(text: &str) {
    let model = !text.is_empty()
        && text.len() <= 255
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:@/=#,".contains(&b));
    match ChannelName::parse(text) {
        Ok(name) => {
            assert!(model, "{text:?} accepted");
            assert_eq!(name.as_str(), text);
            assert_eq!(ChannelName::parse(name.as_str()), Ok(name.clone()));
            assert_eq!(name.namespace(), text.split_once(':').map(|(ns, _)| ns));
        }
        Err(_) => assert!(!model, "{text:?} refused"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else { return };
    let channels = usize::from(count);
    let id = String::from_utf8_lossy(rest);

    match parse_event_id(&id, channels) {
        EventId::Indexed(entries) => {
            assert!(entries.len() <= channels, "{} entries for {channels} channels", entries.len());
            let again = write_indexed(&entries);
            assert_eq!(parse_event_id(&again, channels), EventId::Indexed(entries), "{again:?}");
        }
        EventId::Named(map) => {
            for channel in map.keys() {
                assert!(ChannelName::parse(channel).is_ok(), "{channel:?}");
            }
            let again = write_named(&map);
            assert_eq!(parse_event_id(&again, channels), EventId::Named(map), "{again:?}");
        }
    }

    check_channel_name(&id);
    for piece in id.split(';') {
        check_channel_name(piece);
    }
});

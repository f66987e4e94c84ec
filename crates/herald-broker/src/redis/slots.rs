//! Redis Cluster's key space: the hash slot of a key and the map of which master serves which
//! slots (read with `CLUSTER SLOTS`).

use std::sync::Arc;

use ::redis::Value;

/// How many hash slots a Redis Cluster has.
pub(super) const SLOTS: u16 = 16384;

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag (what lies between the first `{` and
/// the next `}`, when that is not empty), else of the whole key, modulo [`SLOTS`]. A Herald
/// channel's keys and pub/sub channel all carry `{channel}`, so they share one slot.
pub(super) fn slot(key: &[u8]) -> u16 {
    let tag = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tag.unwrap_or(key)) % SLOTS
}

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), as Redis Cluster uses it.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// Which master (`host:port`) serves which slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct SlotMap {
    /// Disjoint ranges `(first, last, master)`, sorted by `first`.
    ranges: Vec<(u16, u16, Arc<str>)>,
}

impl SlotMap {
    /// The map a `CLUSTER SLOTS` reply describes; `asked` is the `host` of the node that
    /// answered (a node announces an empty address for itself when it knows no other). `None`
    /// when the reply is not a slot table.
    pub(super) fn from_reply(reply: &Value, asked: &str) -> Option<SlotMap> {
        let Value::Array(entries) = reply else { return None };
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(fields) = entry else { return None };
            let first = u16::try_from(int(fields.first()?)?).ok()?;
            let last = u16::try_from(int(fields.get(1)?)?).ok()?;
            let Value::Array(master) = fields.get(2)? else { return None };
            let host = text(master.first()?)?;
            let host = if host.is_empty() || host == "?" { asked.to_string() } else { host };
            let port = int(master.get(1)?)?;
            if first > last || last >= SLOTS || !(1..=65535).contains(&port) {
                return None;
            }
            ranges.push((first, last, Arc::from(format!("{host}:{port}"))));
        }
        ranges.sort_by_key(|r| r.0);
        if ranges.windows(2).any(|w| w[0].1 >= w[1].0) {
            return None;
        }
        Some(SlotMap { ranges })
    }

    /// The master serving `slot`, if any does.
    pub(super) fn owner(&self, slot: u16) -> Option<&Arc<str>> {
        let i = self.ranges.partition_point(|r| r.0 <= slot);
        let (first, last, master) = self.ranges.get(i.checked_sub(1)?)?;
        (*first <= slot && slot <= *last).then_some(master)
    }

    /// Every master, once each, sorted.
    pub(super) fn masters(&self) -> Vec<Arc<str>> {
        let mut masters: Vec<Arc<str>> = self.ranges.iter().map(|r| r.2.clone()).collect();
        masters.sort();
        masters.dedup();
        masters
    }

    /// Whether every slot is served.
    pub(super) fn is_complete(&self) -> bool {
        let mut next = 0u32;
        for (first, last, _) in &self.ranges {
            if u32::from(*first) != next {
                return false;
            }
            next = u32::from(*last) + 1;
        }
        next == u32::from(SLOTS)
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // The reference values of the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot(b"foo{{bar}}zap"), crc16(b"{bar") % SLOTS);
        assert_eq!(slot(b"foo{bar}{zap}"), crc16(b"bar") % SLOTS);
        assert_eq!(slot(b"herald:{news}:s"), slot(b"herald:{news}"));
    }

    fn range(first: i64, last: i64, host: &str, port: i64) -> Value {
        let node = Value::Array(vec![Value::BulkString(host.into()), Value::Int(port), Value::Nil]);
        Value::Array(vec![Value::Int(first), Value::Int(last), node])
    }

    #[test]
    fn a_slot_table_maps_every_slot_to_its_master() {
        let reply = Value::Array(vec![
            range(5461, 10922, "127.0.0.1", 7001),
            range(0, 5460, "", 7000),
            range(10923, 16383, "127.0.0.1", 7002),
        ]);
        let map = SlotMap::from_reply(&reply, "127.0.0.9").unwrap();
        assert!(map.is_complete());
        assert_eq!(map.owner(0).map(|m| &**m), Some("127.0.0.9:7000"));
        assert_eq!(map.owner(5461).map(|m| &**m), Some("127.0.0.1:7001"));
        assert_eq!(map.owner(16383).map(|m| &**m), Some("127.0.0.1:7002"));
        assert_eq!(map.masters().len(), 3);
        let partial = SlotMap::from_reply(&Value::Array(vec![range(0, 10, "h", 1)]), "x").unwrap();
        assert!(!partial.is_complete());
        assert_eq!(partial.owner(11), None);
        let overlapping = Value::Array(vec![range(0, 10, "h", 1), range(10, 20, "h", 2)]);
        assert_eq!(SlotMap::from_reply(&overlapping, "x"), None);
        assert_eq!(SlotMap::from_reply(&Value::Int(1), "x"), None);
        assert_eq!(SlotMap::from_reply(&Value::Array(vec![range(0, 16384, "h", 1)]), "x"), None);
    }
}

//! Channel names: validation, namespace and user-limited suffix.
//!
//! A channel name is 1..=255 bytes of `A-Z a-z 0-9 _ - . : @ / = # ,`. The text before the
//! first `:` is the namespace; `ns:name#u1,u2` may only be subscribed by users `u1` and `u2`.
//!
//! ```
//! use herald_protocol::ChannelName;
//! let c = ChannelName::parse("chat:room#alice,bob").unwrap();
//! assert_eq!(c.namespace(), Some("chat"));
//! assert!(c.is_user_allowed("bob"));
//! assert!(!c.is_user_allowed("eve"));
//! ```

use std::fmt;
use std::sync::Arc;

/// Longest valid channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Why a string is not a valid channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    /// The name is empty.
    #[error("channel name is empty")]
    Empty,
    /// The name is longer than [`MAX_CHANNEL_LEN`] bytes.
    #[error("channel name is {0} bytes long, the limit is 255")]
    TooLong(usize),
    /// The name holds a character outside the allowed set.
    #[error("channel name holds {0:?}, allowed are A-Z a-z 0-9 _ - . : @ / = # ,")]
    BadChar(char),
}

/// True for every byte allowed in a channel name.
#[inline]
pub fn is_channel_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/' | b'=' | b'#' | b',')
}

/// A validated channel name; cheap to clone (shared string).
///
/// Every byte is ASCII and needs no JSON escaping, so encoders may copy it into JSON verbatim.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    /// Validates `name` as PROTOCOL.md section 1 says.
    pub fn parse(name: &str) -> Result<Self, ChannelNameError> {
        Self::validate(name)?;
        Ok(ChannelName(Arc::from(name)))
    }

    /// Checks `name` without allocating.
    pub fn validate(name: &str) -> Result<(), ChannelNameError> {
        if name.is_empty() {
            return Err(ChannelNameError::Empty);
        }
        if name.len() > MAX_CHANNEL_LEN {
            return Err(ChannelNameError::TooLong(name.len()));
        }
        if let Some(bad) = name.bytes().position(|b| !is_channel_byte(b)) {
            // `bad` is at a char boundary: every byte before it is ASCII.
            let c = name[bad..].chars().next().unwrap_or('\u{fffd}');
            return Err(ChannelNameError::BadChar(c));
        }
        Ok(())
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The namespace: the text before the first `:`, or `None` for the default namespace.
    pub fn namespace(&self) -> Option<&str> {
        self.0.split_once(':').map(|(ns, _)| ns)
    }

    /// True when the name has a user list (`...#u1,u2`).
    pub fn is_user_limited(&self) -> bool {
        self.0.contains('#')
    }

    /// The users allowed to subscribe (comma-separated after the last `#`), if user-limited.
    pub fn allowed_users(&self) -> Option<impl Iterator<Item = &str>> {
        self.0.rsplit_once('#').map(|(_, users)| users.split(',').filter(|u| !u.is_empty()))
    }

    /// True when `user` may subscribe: always for a channel without user list, else only the
    /// listed users.
    pub fn is_user_allowed(&self, user: &str) -> bool {
        match self.allowed_users() {
            None => true,
            Some(mut users) => !user.is_empty() && users.any(|u| u == user),
        }
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ChannelName {
    type Err = ChannelNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChannelName::parse(s)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_rejects() {
        for ok in ["a", "news", "market:AAPL", "a_b-c.d:e@f/g=h#i,j", &"x".repeat(255)] {
            assert!(ChannelName::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(ChannelName::parse(""), Err(ChannelNameError::Empty));
        assert_eq!(ChannelName::parse(&"x".repeat(256)), Err(ChannelNameError::TooLong(256)));
        assert_eq!(ChannelName::parse("a b"), Err(ChannelNameError::BadChar(' ')));
        assert_eq!(ChannelName::parse("é"), Err(ChannelNameError::BadChar('é')));
        assert_eq!(ChannelName::parse("a\"b"), Err(ChannelNameError::BadChar('"')));
    }

    #[test]
    fn namespaces_and_users() {
        let c = ChannelName::parse("ns:a:b#u1,u2").unwrap();
        assert_eq!(c.namespace(), Some("ns"));
        assert!(c.is_user_limited());
        assert!(c.is_user_allowed("u1") && c.is_user_allowed("u2"));
        assert!(!c.is_user_allowed("u3") && !c.is_user_allowed(""));
        let d = ChannelName::parse("plain").unwrap();
        assert_eq!(d.namespace(), None);
        assert!(d.is_user_allowed(""));
        let e = ChannelName::parse(":x").unwrap();
        assert_eq!(e.namespace(), Some(""));
        let f = ChannelName::parse("a#").unwrap();
        assert!(f.is_user_limited() && !f.is_user_allowed("anyone"));
    }

    proptest! {
        #[test]
        fn valid_names_roundtrip(name in "[A-Za-z0-9_.:@/=#,-]{1,255}") {
            let c = ChannelName::parse(&name).unwrap();
            prop_assert_eq!(c.as_str(), name.as_str());
        }

        #[test]
        fn validation_matches_model(name in ".{0,300}") {
            let model = !name.is_empty()
                && name.len() <= 255
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.:@/=#,".contains(c));
            prop_assert_eq!(ChannelName::parse(&name).is_ok(), model);
        }

        #[test]
        fn namespace_is_prefix_before_first_colon(a in "[a-z]{0,10}", b in "[a-z:]{0,10}") {
            let name = format!("{a}:{b}");
            let c = ChannelName::parse(&name).unwrap();
            prop_assert_eq!(c.namespace(), Some(a.as_str()));
        }
    }
}

//! Reply error codes and WebSocket close codes (PROTOCOL.md section 2).

use std::fmt;

/// The `code` of an error reply (and of HTTP API errors, where it is also the status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// 400: malformed or incomplete command.
    BadRequest = 400,
    /// 401: the connection is not authenticated and must be.
    Unauthenticated = 401,
    /// 403: the connection may not do this.
    PermissionDenied = 403,
    /// 404: the channel's namespace is not configured.
    UnknownNamespace = 404,
    /// 409: the connection is already subscribed to the channel.
    AlreadySubscribed = 409,
    /// 413: the message or publication is too large.
    TooLarge = 413,
    /// 429: a limit was reached.
    LimitReached = 429,
    /// 500: the server failed.
    Internal = 500,
    /// 503: the server cannot serve this now (overloaded, broker down).
    Unavailable = 503,
}

impl ErrorCode {
    /// Every code, for metrics.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthenticated,
        ErrorCode::PermissionDenied,
        ErrorCode::UnknownNamespace,
        ErrorCode::AlreadySubscribed,
        ErrorCode::TooLarge,
        ErrorCode::LimitReached,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
    ];

    /// The numeric code.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// Position in [`ErrorCode::ALL`], for counters.
    pub fn index(self) -> usize {
        ErrorCode::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

/// A WebSocket close code of Herald's, sent in a `disconnect` push and in the close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// 4000: server shutdown or restart; reconnect.
    Shutdown = 4000,
    /// 4001: invalid or expired token; do not reconnect.
    InvalidToken = 4001,
    /// 4002: protocol error or bad message; do not reconnect.
    ProtocolError = 4002,
    /// 4003: forbidden; do not reconnect.
    Forbidden = 4003,
    /// 4008: slow consumer: the outbound queue overflowed; reconnect and recover.
    SlowConsumer = 4008,
    /// 4009: message too big; do not reconnect.
    MessageTooBig = 4009,
    /// 4011: no pong within two ping intervals; reconnect.
    NoPong = 4011,
    /// 4012: the connection's token expired and was not refreshed; reconnect with a new token.
    TokenExpired = 4012,
    /// 4029: connection or rate limit; reconnect later.
    LimitReached = 4029,
    /// 4500: internal error; reconnect.
    Internal = 4500,
}

impl CloseCode {
    /// Every code, for metrics.
    pub const ALL: [CloseCode; 10] = [
        CloseCode::Shutdown,
        CloseCode::InvalidToken,
        CloseCode::ProtocolError,
        CloseCode::Forbidden,
        CloseCode::SlowConsumer,
        CloseCode::MessageTooBig,
        CloseCode::NoPong,
        CloseCode::TokenExpired,
        CloseCode::LimitReached,
        CloseCode::Internal,
    ];

    /// The numeric code.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// Whether the client should reconnect after this close.
    pub fn reconnect(self) -> bool {
        matches!(
            self,
            CloseCode::Shutdown
                | CloseCode::SlowConsumer
                | CloseCode::NoPong
                | CloseCode::TokenExpired
                | CloseCode::LimitReached
                | CloseCode::Internal
        )
    }

    /// A short human-readable reason, sent beside the code.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Shutdown => "server shutdown",
            CloseCode::InvalidToken => "invalid token",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::Forbidden => "forbidden",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::MessageTooBig => "message too big",
            CloseCode::NoPong => "no pong",
            CloseCode::TokenExpired => "token expired",
            CloseCode::LimitReached => "limit reached",
            CloseCode::Internal => "internal error",
        }
    }

    /// Looks up a numeric close code.
    pub fn from_u16(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.as_u16() == code)
    }

    /// Position in [`CloseCode::ALL`], for counters.
    pub fn index(self) -> usize {
        CloseCode::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_flags_follow_the_contract() {
        let reconnect: Vec<u16> =
            CloseCode::ALL.iter().filter(|c| c.reconnect()).map(|c| c.as_u16()).collect();
        assert_eq!(reconnect, [4000, 4008, 4011, 4012, 4029, 4500]);
        for c in CloseCode::ALL {
            assert_eq!(CloseCode::from_u16(c.as_u16()), Some(c));
        }
        assert_eq!(CloseCode::from_u16(1000), None);
    }
}

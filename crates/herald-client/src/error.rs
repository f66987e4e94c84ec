//! [`ClientError`]: every way a client call can fail, for callers to branch on.

/// Why a [`crate::Client`] or [`crate::HttpApi`] call failed.
#[derive(thiserror::Error, Debug)]
pub enum ClientError {
    /// The socket failed (connect, read or write).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The URL is unusable, or the server refused or botched the HTTP upgrade.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The server answered the request with an error (a reply `error`, or an HTTP API error
    /// status with its JSON `error`).
    #[error("server error {code}: {message}")]
    Reply {
        /// The error code (400 ... 503), or the HTTP status.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// The connection ended before the reply arrived (or before the request could be sent).
    #[error("connection closed")]
    Closed,
    /// No answer within the configured time.
    #[error("timed out")]
    Timeout,
    /// The server sent something this client cannot make sense of.
    #[error("protocol error: {0}")]
    Protocol(String),
}

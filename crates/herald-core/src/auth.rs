//! Connection tokens as the engine sees them: the [`TokenVerifier`] a node is given, what it
//! returns ([`VerifiedToken`]: the user and when the token stops being valid) and why it refuses
//! a token ([`TokenError`]).
//!
//! The node and every transport share these types; they live apart from [`crate::node`] and
//! [`crate::session`] so that neither has to import the other for them.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use herald_core::{TokenError, TokenVerifier, VerifiedToken};
//!
//! /// Accepts the token "alice" for one minute.
//! struct Fixed;
//! impl TokenVerifier for Fixed {
//!     fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
//!         match token {
//!             "alice" => Ok(VerifiedToken {
//!                 user: "alice".into(),
//!                 expires_at: Some(SystemTime::now() + Duration::from_secs(60)),
//!             }),
//!             _ => Err(TokenError::Invalid("unknown token".into())),
//!         }
//!     }
//! }
//! assert_eq!(Fixed.verify("alice").unwrap().user, "alice");
//! ```

use std::time::SystemTime;

/// Why a connection token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is malformed, its signature does not verify, or a claim is unusable (`iat` in
    /// the future beyond the leeway, `sub` missing).
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token's `exp` has passed (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// The token's `nbf` is still in the future (beyond the leeway).
    #[error("token not valid yet (nbf is in the future)")]
    NotYetValid,
    /// No secret is configured, so no token can be verified.
    #[error("token authentication is not configured")]
    NotConfigured,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The user id (`sub`).
    pub user: String,
    /// The instant from which the token no longer verifies: its `exp` plus the verifier's
    /// leeway. A live connection authenticated by it is closed with 4012 then, unless it
    /// `refresh`es its token first. `None` when the token has no `exp` (it never expires).
    pub expires_at: Option<SystemTime>,
}

/// Checks connection tokens.
pub trait TokenVerifier: Send + Sync + 'static {
    /// The user the token authenticates and until when, or why it is refused.
    fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError>;
}

//! Authentication: HS256 connection tokens (JWT) and the HTTP API key.
//!
//! Tokens are compact JWTs signed with HMAC-SHA256 (`alg: HS256`); `sub` is the user id and
//! `exp`, when present, is honoured. The API key is compared in constant time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use herald_core::{TokenError, TokenVerifier};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Verifies HS256 tokens with one shared secret.
pub struct HmacVerifier {
    secret: Vec<u8>,
}

impl std::fmt::Debug for HmacVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacVerifier")
    }
}

impl HmacVerifier {
    /// A verifier for tokens signed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        HmacVerifier { secret: secret.to_vec() }
    }
}

#[derive(serde::Deserialize)]
struct Header<'a> {
    alg: &'a str,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
}

fn invalid(why: &str) -> TokenError {
    TokenError::Invalid(why.to_string())
}

impl TokenVerifier for HmacVerifier {
    fn verify(&self, token: &str) -> Result<String, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("not a compact JWT"));
        };
        let header = URL_SAFE_NO_PAD.decode(h).map_err(|_| invalid("header is not base64url"))?;
        let header: Header<'_> =
            serde_json::from_slice(&header).map_err(|_| invalid("header is not JSON"))?;
        if header.alg != "HS256" {
            return Err(invalid("alg must be HS256"));
        }
        let signature =
            URL_SAFE_NO_PAD.decode(s).map_err(|_| invalid("signature is not base64url"))?;
        let mut mac =
            HmacSha256::new_from_slice(&self.secret).map_err(|_| invalid("bad secret"))?;
        mac.update(&token.as_bytes()[..h.len() + 1 + p.len()]);
        mac.verify_slice(&signature).map_err(|_| invalid("signature does not verify"))?;
        let claims = URL_SAFE_NO_PAD.decode(p).map_err(|_| invalid("claims are not base64url"))?;
        let claims: Claims =
            serde_json::from_slice(&claims).map_err(|_| invalid("claims are not JSON"))?;
        if let Some(exp) = claims.exp {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            if now >= exp {
                return Err(TokenError::Expired);
            }
        }
        match claims.sub {
            Some(sub) if !sub.is_empty() => Ok(sub),
            _ => Err(invalid("sub is missing")),
        }
    }
}

/// Signs `claims` (a JSON object) as an HS256 token; for tests, tools and backends in Rust.
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

/// True when the `Authorization` header value is `Bearer <expected>`; constant time in the key.
pub fn is_api_key_valid(expected: &str, authorization: Option<&[u8]>) -> bool {
    let Some(value) = authorization else { return false };
    // The scheme is case-insensitive (RFC 7235); the key is not.
    if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let given = value[7..].trim_ascii();
    given.ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef";

    #[test]
    fn valid_token_gives_sub() {
        let t = sign_hs256(SECRET, &json!({"sub": "alice", "exp": 4_000_000_000u64}));
        assert_eq!(HmacVerifier::new(SECRET).verify(&t), Ok("alice".into()));
    }

    #[test]
    fn refuses_bad_tokens() {
        let v = HmacVerifier::new(SECRET);
        let other = sign_hs256(b"another secret!!", &json!({"sub": "a"}));
        assert!(matches!(v.verify(&other), Err(TokenError::Invalid(_))));
        let expired = sign_hs256(SECRET, &json!({"sub": "a", "exp": 1}));
        assert_eq!(v.verify(&expired), Err(TokenError::Expired));
        let nosub = sign_hs256(SECRET, &json!({"exp": 4_000_000_000u64}));
        assert!(v.verify(&nosub).is_err());
        for junk in ["", "a.b", "a.b.c.d", "..", "x.y.z"] {
            assert!(v.verify(junk).is_err(), "{junk}");
        }
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"sub":"a"}"#)
        );
        assert!(v.verify(&none_alg).is_err());
    }

    #[test]
    fn api_key() {
        assert!(is_api_key_valid("k", Some(b"Bearer k")));
        assert!(is_api_key_valid("k", Some(b"bearer k")));
        assert!(!is_api_key_valid("k", Some(b"Basic k")));
        assert!(!is_api_key_valid("k", Some(b"Bearer kk")));
        assert!(!is_api_key_valid("k", Some(b"k")));
        assert!(!is_api_key_valid("k", None));
    }
}

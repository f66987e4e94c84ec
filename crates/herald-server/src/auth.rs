//! Authentication: HMAC connection tokens (JWT) and the HTTP API key.
//!
//! Tokens are compact JWTs signed with HMAC (`alg` HS256, HS384 or HS512) with the configured
//! secret; `sub` is the user id. The time claims are honoured with a leeway for clock skew
//! (`auth.leeway_secs`, default 5 s): a token is refused once `now >= exp + leeway`, while
//! `now < nbf - leeway`, and when `iat > now + leeway`. The verifier returns the user and the
//! instant the token stops verifying (`exp + leeway`), at which a live connection is closed with
//! 4012 unless it `refresh`es its token. The API key is compared in constant time.
//!
//! ```
//! use std::time::Duration;
//! use herald_core::TokenVerifier;
//! use herald_server::auth::{sign_hs256, HmacVerifier};
//!
//! let secret = b"0123456789abcdef0123456789abcdef";
//! let token = sign_hs256(secret, &serde_json::json!({"sub": "alice"}));
//! let verifier = HmacVerifier::new(secret, Duration::from_secs(5));
//! let verified = verifier.verify(&token).unwrap();
//! assert_eq!((verified.user.as_str(), verified.expires_at), ("alice", None));
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use herald_core::{TokenError, TokenVerifier, VerifiedToken};
use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha384, Sha512};
use subtle::ConstantTimeEq;

/// Verifies HMAC-signed tokens (HS256, HS384, HS512) with one shared secret.
pub struct HmacVerifier {
    /// The current secret, then the previous one still honoured during a rotation.
    secrets: Vec<Vec<u8>>,
    leeway: Duration,
    /// `aud` must name this, when set.
    audience: Option<String>,
    /// `iss` must be this, when set.
    issuer: Option<String>,
}

impl std::fmt::Debug for HmacVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmacVerifier").field("leeway", &self.leeway).finish_non_exhaustive()
    }
}

/// The claims Herald reads; times are seconds since the Unix epoch (JSON numbers).
#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iat: Option<f64>,
    /// One audience or several (RFC 7519 4.1.3).
    #[serde(default)]
    aud: Option<Audience>,
    iss: Option<String>,
}

/// `aud`: a string or an array of strings.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn names(&self, audience: &str) -> bool {
        match self {
            Audience::One(a) => a == audience,
            Audience::Many(all) => all.iter().any(|a| a == audience),
        }
    }
}

fn invalid(why: impl Into<String>) -> TokenError {
    TokenError::Invalid(why.into())
}

/// Checks a signature over an input with a secret, for one HMAC algorithm.
type MacCheck = fn(&[u8], &[u8], &[u8]) -> Result<(), TokenError>;

fn verify_mac<M: Mac + hmac::digest::KeyInit>(
    secret: &[u8],
    input: &[u8],
    signature: &[u8],
) -> Result<(), TokenError> {
    let mut mac = <M as Mac>::new_from_slice(secret).map_err(|_| invalid("bad secret"))?;
    mac.update(input);
    mac.verify_slice(signature).map_err(|_| invalid("signature does not verify"))
}

/// `bytes` as a JSON object, as RFC 7515 (5.2) and RFC 7519 (7.2) require of a token's header
/// and claims: UTF-8 throughout (ignored members included) and an object, not an array; of a
/// duplicated member, the last counts.
fn json_object(bytes: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_slice(bytes).ok()? {
        serde_json::Value::Object(object) => Some(object),
        _ => None,
    }
}

/// Seconds since the Unix epoch as an instant; `None` beyond what `SystemTime` holds.
fn instant(secs: f64) -> Option<SystemTime> {
    if secs >= 0.0 {
        UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(secs).ok()?)
    } else {
        UNIX_EPOCH.checked_sub(Duration::try_from_secs_f64(-secs).ok()?)
    }
}

impl HmacVerifier {
    /// A verifier for tokens signed with `secret`, allowing `leeway` of clock skew on `exp`,
    /// `nbf` and `iat`.
    pub fn new(secret: &[u8], leeway: Duration) -> Self {
        HmacVerifier { secrets: vec![secret.to_vec()], leeway, audience: None, issuer: None }
    }

    /// Requires `aud` to name `audience` (`auth.audience`).
    pub fn with_audience(mut self, audience: &str) -> Self {
        self.audience = Some(audience.to_string());
        self
    }

    /// Requires `iss` to be `issuer` (`auth.issuer`).
    pub fn with_issuer(mut self, issuer: &str) -> Self {
        self.issuer = Some(issuer.to_string());
        self
    }

    /// Also accepts tokens signed with `previous` (`auth.previous_hmac_secret`), so the secret
    /// can be rotated without refusing the tokens already handed out.
    pub fn with_previous(mut self, previous: &[u8]) -> Self {
        self.secrets.push(previous.to_vec());
        self
    }

    /// Verifies `token` as of `now` (seconds since the Unix epoch); [`TokenVerifier::verify`]
    /// is this with the current time.
    pub fn verify_at(&self, token: &str, now: f64) -> Result<VerifiedToken, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("not a compact JWT"));
        };
        let header = URL_SAFE_NO_PAD.decode(h).map_err(|_| invalid("header is not base64url"))?;
        let header = json_object(&header).ok_or_else(|| invalid("header is not a JSON object"))?;
        let signature =
            URL_SAFE_NO_PAD.decode(s).map_err(|_| invalid("signature is not base64url"))?;
        let input = &token.as_bytes()[..h.len() + 1 + p.len()];
        let check: MacCheck = match header.get("alg").and_then(serde_json::Value::as_str) {
            Some("HS256") => verify_mac::<Hmac<Sha256>>,
            Some("HS384") => verify_mac::<Hmac<Sha384>>,
            Some("HS512") => verify_mac::<Hmac<Sha512>>,
            _ => return Err(invalid("alg must be HS256, HS384 or HS512")),
        };
        // Any secret that verifies will do (the current one, or the previous one).
        let mut outcome = Err(invalid("signature does not verify"));
        for secret in &self.secrets {
            if check(secret, input, &signature).is_ok() {
                outcome = Ok(());
            }
        }
        outcome?;
        let claims = URL_SAFE_NO_PAD.decode(p).map_err(|_| invalid("claims are not base64url"))?;
        let claims = json_object(&claims).ok_or_else(|| invalid("claims are not a JSON object"))?;
        let claims: Claims = serde_json::from_value(serde_json::Value::Object(claims))
            .map_err(|e| invalid(format!("claims are not usable: {e}")))?;
        let leeway = self.leeway.as_secs_f64();
        if claims.exp.is_some_and(|exp| now >= exp + leeway) {
            return Err(TokenError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| now < nbf - leeway) {
            return Err(TokenError::NotYetValid);
        }
        if claims.iat.is_some_and(|iat| iat > now + leeway) {
            return Err(invalid("iat is in the future"));
        }
        if let Some(audience) = &self.audience {
            if !claims.aud.as_ref().is_some_and(|aud| aud.names(audience)) {
                return Err(invalid(format!("aud does not name {audience:?}")));
            }
        }
        if let Some(issuer) = &self.issuer {
            if claims.iss.as_deref() != Some(issuer.as_str()) {
                return Err(invalid(format!("iss is not {issuer:?}")));
            }
        }
        let user = match claims.sub {
            Some(sub) if !sub.is_empty() => sub,
            _ => return Err(invalid("sub is missing")),
        };
        // An `exp` beyond what the clock can hold never comes: no expiry.
        let expires_at = claims.exp.and_then(|exp| instant(exp + leeway));
        Ok(VerifiedToken { user, expires_at })
    }
}

impl TokenVerifier for HmacVerifier {
    fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.verify_at(token, now)
    }
}

/// Signs `claims` (a JSON object) as an HS256 token; for tests, tools and backends in Rust.
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    sign(Algorithm::Hs256, secret, claims)
}

/// An HMAC signing algorithm of connection tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// HMAC-SHA256.
    Hs256,
    /// HMAC-SHA384.
    Hs384,
    /// HMAC-SHA512.
    Hs512,
}

fn mac_bytes<M: Mac + hmac::digest::KeyInit>(secret: &[u8], input: &[u8]) -> Vec<u8> {
    let mut mac = <M as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(input);
    mac.finalize().into_bytes().to_vec()
}

/// Signs `claims` (a JSON object) as a token with `alg`; for tests, tools and backends in Rust.
pub fn sign(alg: Algorithm, secret: &[u8], claims: &serde_json::Value) -> String {
    let name = match alg {
        Algorithm::Hs256 => "HS256",
        Algorithm::Hs384 => "HS384",
        Algorithm::Hs512 => "HS512",
    };
    let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{name}","typ":"JWT"}}"#));
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let signature = match alg {
        Algorithm::Hs256 => mac_bytes::<Hmac<Sha256>>(secret, signing_input.as_bytes()),
        Algorithm::Hs384 => mac_bytes::<Hmac<Sha384>>(secret, signing_input.as_bytes()),
        Algorithm::Hs512 => mac_bytes::<Hmac<Sha512>>(secret, signing_input.as_bytes()),
    };
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// True when the `Authorization` header value is `Bearer <k>` for one of `keys` (several during
/// a rotation). Every key is compared, each in constant time, whichever matches: the time
/// taken says nothing about which key, or how much of one, was right.
pub fn is_any_api_key_valid<K: AsRef<str>>(keys: &[K], authorization: Option<&[u8]>) -> bool {
    let Some(value) = authorization else { return false };
    // The scheme is case-insensitive (RFC 7235); the key is not.
    if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let given = value[7..].trim_ascii();
    let mut valid = subtle::Choice::from(0);
    for key in keys {
        valid |= given.ct_eq(key.as_ref().as_bytes());
    }
    valid.into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef";
    const NOW: f64 = 1_800_000_000.0;

    fn verifier(leeway: u64) -> HmacVerifier {
        HmacVerifier::new(SECRET, Duration::from_secs(leeway))
    }

    fn at(secs: f64) -> Option<SystemTime> {
        instant(secs)
    }

    #[test]
    fn valid_token_gives_sub_and_expiry_with_leeway() {
        let t = sign_hs256(SECRET, &json!({"sub": "alice", "exp": 4_000_000_000u64}));
        let v = verifier(5).verify(&t).unwrap();
        assert_eq!(v.user, "alice");
        assert_eq!(v.expires_at, at(4_000_000_005.0));
        let v = verifier(0).verify_at(&t, NOW).unwrap();
        assert_eq!(v.expires_at, at(4_000_000_000.0));
        let no_exp = sign_hs256(SECRET, &json!({"sub": "alice"}));
        assert_eq!(verifier(5).verify(&no_exp).unwrap().expires_at, None);
    }

    #[test]
    fn every_hmac_algorithm_verifies() {
        for alg in [Algorithm::Hs256, Algorithm::Hs384, Algorithm::Hs512] {
            let t = sign(alg, SECRET, &json!({"sub": "a"}));
            assert_eq!(verifier(0).verify_at(&t, NOW).unwrap().user, "a", "{alg:?}");
            let other = sign(alg, b"another secret!!", &json!({"sub": "a"}));
            assert!(matches!(verifier(0).verify_at(&other, NOW), Err(TokenError::Invalid(_))));
        }
    }

    #[test]
    fn time_claims_honour_the_leeway() {
        let v5 = verifier(5);
        let v0 = verifier(0);
        let token = |claims: serde_json::Value| sign_hs256(SECRET, &claims);
        // exp: refused from exp + leeway on.
        let exp = token(json!({"sub": "a", "exp": NOW - 3.0}));
        assert_eq!(v0.verify_at(&exp, NOW), Err(TokenError::Expired));
        assert!(v5.verify_at(&exp, NOW).is_ok());
        assert_eq!(v5.verify_at(&exp, NOW + 2.0), Err(TokenError::Expired));
        // nbf: refused while now < nbf - leeway.
        let nbf = token(json!({"sub": "a", "nbf": NOW + 3.0}));
        assert_eq!(v0.verify_at(&nbf, NOW), Err(TokenError::NotYetValid));
        assert!(v5.verify_at(&nbf, NOW).is_ok());
        assert!(v0.verify_at(&nbf, NOW + 3.0).is_ok());
        // iat: refused when issued beyond the leeway in the future.
        let iat = token(json!({"sub": "a", "iat": NOW + 3.0}));
        assert!(
            matches!(v0.verify_at(&iat, NOW), Err(TokenError::Invalid(m)) if m.contains("iat"))
        );
        assert!(v5.verify_at(&iat, NOW).is_ok());
        assert!(v0.verify_at(&token(json!({"sub": "a", "iat": NOW - 100.0})), NOW).is_ok());
        // Fractional and extreme times never panic.
        let frac = token(json!({"sub": "a", "exp": NOW + 0.5}));
        assert_eq!(v0.verify_at(&frac, NOW).unwrap().expires_at, at(NOW + 0.5));
        let far = token(json!({"sub": "a", "exp": 1e300, "nbf": -1e300, "iat": -1e300}));
        assert_eq!(v0.verify_at(&far, NOW).unwrap().expires_at, None);
        assert_eq!(
            v0.verify_at(&token(json!({"sub": "a", "exp": -1e300})), NOW),
            Err(TokenError::Expired)
        );
        let bad = token(json!({"sub": "a", "exp": "soon"}));
        assert!(matches!(v0.verify_at(&bad, NOW), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let v = verifier(0).with_audience("herald").with_issuer("https://id.example");
        let ok = |claims| v.verify(&sign_hs256(SECRET, &claims)).is_ok();
        assert!(ok(json!({"sub": "a", "aud": "herald", "iss": "https://id.example"})));
        assert!(ok(json!({"sub": "a", "aud": ["x", "herald"], "iss": "https://id.example"})));
        assert!(!ok(json!({"sub": "a", "aud": "other", "iss": "https://id.example"})));
        assert!(!ok(json!({"sub": "a", "aud": ["x"], "iss": "https://id.example"})));
        assert!(!ok(json!({"sub": "a", "iss": "https://id.example"})), "aud missing");
        assert!(!ok(json!({"sub": "a", "aud": "herald", "iss": "https://evil.example"})));
        assert!(!ok(json!({"sub": "a", "aud": "herald"})), "iss missing");
        assert!(
            !ok(json!({"sub": "a", "aud": 7, "iss": "https://id.example"})),
            "aud not a string"
        );
        // Without configuration, neither is looked at.
        let plain = verifier(0);
        assert!(plain.verify(&sign_hs256(SECRET, &json!({"sub": "a", "aud": "any"}))).is_ok());
    }

    #[test]
    fn refuses_bad_tokens() {
        let v = verifier(0);
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

    /// A compact token of `header` and `claims` (raw bytes), signed with `SECRET` (HS256).
    fn raw_token(header: &[u8], claims: &[u8]) -> String {
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let signature = mac_bytes::<Hmac<Sha256>>(SECRET, input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    #[test]
    fn header_and_claims_must_be_json_objects() {
        let v = verifier(0);
        let header = br#"{"alg":"HS256","typ":"JWT"}"#;
        let claims = br#"{"sub":"alice","exp":1800000003,"nbf":1e3}"#;
        assert_eq!(v.verify_at(&raw_token(header, claims), NOW).unwrap().user, "alice");
        // Found by the `token` fuzz target: a member the verifier ignores held bytes that are
        // not UTF-8, and the token was accepted.
        let mut not_utf8 = br#"{"alg":"HS256","typ":"JWT"#.to_vec();
        not_utf8.extend([0xff; 80]);
        not_utf8.extend(br#""}"#);
        assert!(
            matches!(v.verify_at(&raw_token(&not_utf8, claims), NOW), Err(TokenError::Invalid(m)) if m.contains("header"))
        );
        let claims_not_utf8 = b"{\"sub\":\"alice\",\"x\":\"\xff\"}";
        assert!(v.verify_at(&raw_token(header, claims_not_utf8), NOW).is_err());
        // Arrays read as structs field by field: `["HS256"]` named the algorithm, `["alice"]`
        // the user.
        assert!(v.verify_at(&raw_token(br#"["HS256"]"#, claims), NOW).is_err());
        assert!(v.verify_at(&raw_token(header, br#"["alice",null,null,null]"#), NOW).is_err());
        // Escapes are JSON like any other text.
        let escaped = br#"{"alg":"HS\u0032\u0035\u0036"}"#;
        assert_eq!(v.verify_at(&raw_token(escaped, claims), NOW).unwrap().user, "alice");
    }

    #[test]
    fn api_key() {
        assert!(is_any_api_key_valid(&["k"], Some(b"Bearer k")));
        assert!(is_any_api_key_valid(&["k"], Some(b"bearer k")));
        assert!(!is_any_api_key_valid(&["k"], Some(b"Basic k")));
        assert!(!is_any_api_key_valid(&["k"], Some(b"Bearer kk")));
        let keys = ["new-key", "old-key"];
        assert!(is_any_api_key_valid(&keys, Some(b"Bearer old-key")));
        assert!(is_any_api_key_valid(&keys, Some(b"Bearer new-key")));
        assert!(!is_any_api_key_valid(&keys, Some(b"Bearer other")));
        assert!(!is_any_api_key_valid::<&str>(&[], Some(b"Bearer x")));
        assert!(!is_any_api_key_valid(&["k"], Some(b"k")));
        assert!(!is_any_api_key_valid(&["k"], None));
    }
}

//! The JWT verifier of connection tokens ([`HmacVerifier`], HS256/HS384/HS512), on tokens the
//! fuzzer writes. Nothing may panic, and a token is accepted only when it is correctly signed
//! with the verifier's secret.
//!
//! The first byte picks the mode:
//! - even: the rest, as text, is the token. The fuzzer cannot forge a MAC, so any token accepted
//!   must carry exactly the signature the secret gives its header and claims (under the `alg`
//!   its header names), in canonical base64url.
//! - odd: the rest is `header` `\n` `claims` (arbitrary bytes, base64url-encoded by the target)
//!   signed here with the secret under the algorithm the byte picks: this reaches the claims
//!   and time checks. An accepted token has a header naming that algorithm, a non-empty `sub`
//!   equal to the user returned, and time claims that allow `NOW`.
#![no_main]

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use herald_server::auth::HmacVerifier;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::{Sha256, Sha384, Sha512};

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef0123";
const NOW: f64 = 1_800_000_000.0;
const LEEWAY: Duration = Duration::from_secs(5);
const ALGS: [&str; 3] = ["HS256", "HS384", "HS512"];

fn mac<M: Mac + hmac::digest::KeyInit>(input: &[u8]) -> Vec<u8> {
    let mut mac = <M as Mac>::new_from_slice(SECRET).expect("HMAC takes any key length");
    mac.update(input);
    mac.finalize().into_bytes().to_vec()
}

/// The signature of `input` under `alg`, base64url; `None` for an algorithm Herald refuses.
fn signature(alg: &str, input: &[u8]) -> Option<String> {
    let bytes = match alg {
        "HS256" => mac::<Hmac<Sha256>>(input),
        "HS384" => mac::<Hmac<Sha384>>(input),
        "HS512" => mac::<Hmac<Sha512>>(input),
        _ => return None,
    };
    Some(URL_SAFE_NO_PAD.encode(bytes))
}

/// The header's `alg`, read as the verifier should (a JSON object with a string `alg`).
fn header_alg(header_b64: &str) -> Option<String> {
    let header = URL_SAFE_NO_PAD.decode(header_b64).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&header).ok()?;
    value.get("alg")?.as_str().map(str::to_owned)
}

fn claims(claims_b64: &str) -> serde_json::Value {
    let bytes = URL_SAFE_NO_PAD.decode(claims_b64).expect("accepted claims are base64url");
    serde_json::from_slice(&bytes).expect("accepted claims are JSON")
}

/// What an accepted token must be: correctly signed, its `sub` the user, its times valid now.
fn check_accepted(token: &str, user: &str) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "accepted {token:?}");
    let (h, p, s) = (parts[0], parts[1], parts[2]);
    let alg = header_alg(h).unwrap_or_else(|| panic!("accepted a token without alg: {token:?}"));
    let input = &token.as_bytes()[..h.len() + 1 + p.len()];
    let expected =
        signature(&alg, input).unwrap_or_else(|| panic!("accepted alg {alg:?}: {token:?}"));
    assert_eq!(s, expected, "accepted a token not signed with the secret: {token:?}");
    let claims = claims(p);
    assert_eq!(claims.get("sub").and_then(|s| s.as_str()), Some(user), "{token:?}");
    assert!(!user.is_empty());
    let leeway = LEEWAY.as_secs_f64();
    let time = |name: &str| claims.get(name).and_then(serde_json::Value::as_f64);
    assert!(time("exp").is_none_or(|exp| NOW < exp + leeway), "expired: {token:?}");
    assert!(time("nbf").is_none_or(|nbf| NOW >= nbf - leeway), "not yet valid: {token:?}");
    assert!(time("iat").is_none_or(|iat| iat <= NOW + leeway), "issued later: {token:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let verifier = HmacVerifier::new(SECRET, LEEWAY);
    let token = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let alg = ALGS[usize::from(mode >> 1) % ALGS.len()];
        let (header, payload) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (rest[..i].to_vec(), &rest[i + 1..]),
            None => (format!(r#"{{"alg":"{alg}"}}"#).into_bytes(), rest),
        };
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
        let sig = signature(alg, input.as_bytes()).expect("a Herald algorithm");
        format!("{input}.{sig}")
    };
    if let Ok(verified) = verifier.verify_at(&token, NOW) {
        check_accepted(&token, &verified.user);
        if let Some(expires_at) = verified.expires_at {
            let _ = expires_at.duration_since(std::time::UNIX_EPOCH);
        }
    }
});

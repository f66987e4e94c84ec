//! Browser origins allowed on `/ws` and `/sse` (`allowed_origins`): a page from another origin
//! is refused with 403 before anything is opened for it, so a site cannot make its visitors'
//! browsers hold connections to Herald (cross-site WebSocket hijacking). Requests without an
//! `Origin` header come from non-browser clients, which can send any header they like, and
//! pass; so does every request while the list is empty.

use crate::error::ApiError;

/// `origin` in the form browsers send it: lower-case scheme and host, no default port, no
/// trailing slash; `None` when it is not `scheme://host[:port]`.
pub fn normalize(origin: &str) -> Option<String> {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let (scheme, rest) = origin.split_once("://")?;
    if scheme.is_empty()
        || !scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || rest.starts_with('[') => {
            if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (host, Some(port))
        }
        _ => (rest, None),
    };
    if host.is_empty() {
        return None;
    }
    let default_port = match scheme {
        "http" | "ws" => Some("80"),
        "https" | "wss" => Some("443"),
        _ => None,
    };
    Some(match port {
        Some(p) if Some(p) != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// Checks a request's `Origin` against `allowed`: `Err` (403, naming the origin) when the list
/// is not empty and the request comes from another origin.
pub fn check(allowed: &[String], origin: Option<&str>) -> Result<(), ApiError> {
    let Some(origin) = origin else { return Ok(()) };
    if allowed.is_empty() {
        return Ok(());
    }
    match normalize(origin) {
        Some(o) if allowed.contains(&o) => Ok(()),
        _ => Err(ApiError::new(
            403,
            format!("origin {origin:?} is not allowed here (see allowed_origins)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_normalized_as_browsers_send_them() {
        assert_eq!(
            normalize("HTTPS://App.Example.com/").as_deref(),
            Some("https://app.example.com")
        );
        assert_eq!(normalize("https://a.example:443").as_deref(), Some("https://a.example"));
        assert_eq!(normalize("http://a.example:8080").as_deref(), Some("http://a.example:8080"));
        assert_eq!(normalize("http://[::1]:3000").as_deref(), Some("http://[::1]:3000"));
        for bad in
            ["a.example", "https://", "https://a.example/path", "https://a:b", "null", "://x"]
        {
            assert_eq!(normalize(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_listed_origins_pass_when_a_list_is_set() {
        let allowed = vec!["https://app.example".to_string()];
        assert!(check(&allowed, Some("https://app.example")).is_ok());
        assert!(check(&allowed, Some("https://APP.example:443")).is_ok());
        assert!(check(&allowed, None).is_ok(), "no Origin: not a browser");
        let refused = check(&allowed, Some("https://evil.example")).unwrap_err();
        assert_eq!(refused.code, 403);
        assert!(refused.message.contains("evil.example"));
        assert!(check(&allowed, Some("null")).is_err(), "sandboxed pages send null");
        assert!(check(&[], Some("https://evil.example")).is_ok(), "empty list: any");
    }
}

//! Keeping credentials out of stored rows.
//!
//! Handlers pass request headers already redacted and after rewrites (a
//! header removed by a rewrite is simply not in the list). The writer applies
//! these functions once more before storing, so a credential that slipped
//! through (a new header name, an API key in a query string such as Gemini's
//! `?key=`) still does not reach the database. Matching is by name, on
//! purpose broad: an over-redacted harmless value costs nothing, a leaked key
//! does.

use std::borrow::Cow;

/// What replaces a secret value.
pub const REDACTED: &str = "REDACTED";

/// Fragments of header and query-parameter names that carry credentials.
const SECRET_NAME_PARTS: &[&str] =
    &["auth", "cookie", "key", "token", "secret", "password", "passwd", "credential", "session", "signature"];

/// Query parameter names that are secrets although they contain none of the
/// fragments above.
const SECRET_QUERY_NAMES: &[&str] = &["sig", "code", "pwd"];

/// Whether a header or parameter named `name` holds a credential.
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_NAME_PARTS.iter().any(|part| name.contains(part))
}

/// The value to store for header `name`. Secret values are replaced; an
/// authorization scheme (`Bearer`, `Basic`) is kept since it is useful and
/// not secret.
pub fn header_value<'a>(name: &str, value: &'a str) -> Cow<'a, str> {
    if !is_secret_name(name) || value == REDACTED {
        return Cow::Borrowed(value);
    }
    match value.split_once(' ') {
        Some((scheme, _)) if !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphabetic()) => {
            Cow::Owned(format!("{scheme} {REDACTED}"))
        }
        _ => Cow::Borrowed(REDACTED),
    }
}

/// `path` (with its query string) with the values of secret-looking query
/// parameters replaced.
pub fn path(path: &str) -> Cow<'_, str> {
    let Some((base, query)) = path.split_once('?') else {
        return Cow::Borrowed(path);
    };
    let secret = |name: &str| is_secret_name(name) || SECRET_QUERY_NAMES.iter().any(|s| name.eq_ignore_ascii_case(s));
    if !query.split('&').any(|pair| secret(pair.split_once('=').map_or(pair, |(n, _)| n))) {
        return Cow::Borrowed(path);
    }
    let query: Vec<Cow<'_, str>> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if secret(name) => Cow::Owned(format!("{name}={REDACTED}")),
            _ => Cow::Borrowed(pair),
        })
        .collect();
    Cow::Owned(format!("{base}?{}", query.join("&")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_headers_are_redacted_and_schemes_kept() {
        assert_eq!(header_value("Authorization", "Bearer sk-live-123"), "Bearer REDACTED");
        assert_eq!(header_value("x-api-key", "sk-ant-abc"), "REDACTED");
        assert_eq!(header_value("X-Goog-Api-Key", "AIzaSy"), "REDACTED");
        assert_eq!(header_value("Cookie", "a=b; c=d"), "REDACTED");
        assert_eq!(header_value("Proxy-Authorization", "Basic dXNlcjpwYXNz"), "Basic REDACTED");
        assert_eq!(header_value("authorization", "REDACTED"), "REDACTED");
        assert_eq!(header_value("content-type", "application/json"), "application/json");
        assert_eq!(header_value("user-agent", "curl/8"), "curl/8");
    }

    #[test]
    fn secret_query_parameters_are_redacted() {
        assert_eq!(
            path("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=AIzaSyXYZ"),
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=REDACTED"
        );
        assert_eq!(path("/x?access_token=t&sig=s&page=2"), "/x?access_token=REDACTED&sig=REDACTED&page=2");
        assert_eq!(path("/simple?page=2&q=rust"), "/simple?page=2&q=rust");
        assert_eq!(path("/no-query"), "/no-query");
        assert_eq!(path("/odd?&&key"), "/odd?&&key");
    }
}

//! The admin token, presented in any of Refiner's three ways: `Authorization: Bearer
//! <token>`, an `api_key` parameter (query string or body), or HTTP Basic with the token as
//! user name (the password is ignored).
//!
//! Tokens are compared as SHA-256 digests with a constant-time equality, so the time taken
//! does not depend on how much of a guess is right. Every credential a request presents must
//! be the token: a right token in one place does not excuse a wrong one in another. A write
//! key is never an admin token (configuration refuses a token equal to a write key).
//!
//! [`authorize_request`] also accepts the web console's session cookie in place of the token
//! (see `api::console::session`): only when the request presents no token at all, and with
//! the CSRF and same-origin checks on every method other than GET and HEAD.

use actix_web::http::header::{HeaderMap, AUTHORIZATION};
use actix_web::{web, HttpRequest};
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;

pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The token of an `Authorization` header: a Bearer token or a Basic user name. Another
/// scheme, or a malformed value, yields `Some("")`, which never matches.
fn header_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?;
    let Ok(value) = value.to_str() else {
        return Some(String::new());
    };
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .unwrap_or_default();
        let user = decoded
            .split_once(':')
            .map_or(decoded.as_str(), |(user, _)| user);
        return Some(user.to_string());
    }
    Some(String::new())
}

/// Checks the credentials a request presents against the configured token (`None`: the
/// API is disabled). `api_keys` are the `api_key` parameters of the query and the body.
pub fn authorize(
    expected: Option<&[u8; 32]>,
    headers: &HeaderMap,
    api_keys: &[&str],
) -> Result<(), ApiError> {
    let Some(expected) = expected else {
        return Err(ApiError::Disabled);
    };
    let mut presented: Vec<String> = api_keys.iter().map(|k| k.to_string()).collect();
    presented.extend(header_token(headers));
    if presented.is_empty() {
        return Err(ApiError::MissingToken);
    }
    let mut all_match = true;
    for token in &presented {
        let matches: bool = digest(token).ct_eq(expected).into();
        all_match &= matches;
    }
    if all_match {
        Ok(())
    } else {
        Err(ApiError::InvalidToken)
    }
}

/// Checks a request: the admin token as [`authorize`] does, or, when it presents no token,
/// a console session cookie (the session store must be in the app data).
pub fn authorize_request(
    request: &HttpRequest,
    expected: Option<&[u8; 32]>,
    api_keys: &[&str],
) -> Result<(), ApiError> {
    let presents_token = !api_keys.is_empty() || request.headers().contains_key(AUTHORIZATION);
    if !presents_token && expected.is_some() {
        if let Some(id) = crate::api::console::session::cookie(request.headers()) {
            let store = request
                .app_data::<web::Data<crate::api::console::session::SessionStore>>()
                .ok_or(ApiError::InvalidSession)?;
            return store.authorize(request, &id).map(|_| ());
        }
    }
    authorize(expected, request.headers(), api_keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).expect("header"));
        headers
    }

    fn basic(user_pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
    }

    #[test]
    fn accepts_the_three_ways_and_refuses_others() {
        let token = digest("admin-token");
        let ok = |h: &HeaderMap, keys: &[&str]| authorize(Some(&token), h, keys);
        assert_eq!(ok(&headers("Bearer admin-token"), &[]), Ok(()));
        assert_eq!(ok(&headers("bearer  admin-token "), &[]), Ok(()));
        assert_eq!(ok(&headers(&basic("admin-token:")), &[]), Ok(()));
        assert_eq!(ok(&headers(&basic("admin-token")), &[]), Ok(()));
        assert_eq!(ok(&HeaderMap::new(), &["admin-token"]), Ok(()));
        assert_eq!(ok(&HeaderMap::new(), &[]), Err(ApiError::MissingToken));
        assert_eq!(
            ok(&headers("Bearer nope"), &[]),
            Err(ApiError::InvalidToken)
        );
        assert_eq!(
            ok(&headers("Token admin-token"), &[]),
            Err(ApiError::InvalidToken)
        );
        assert_eq!(
            ok(&headers(&basic(":admin-token")), &[]),
            Err(ApiError::InvalidToken)
        );
        assert_eq!(
            ok(&headers("Bearer admin-token"), &["wrong"]),
            Err(ApiError::InvalidToken)
        );
        assert_eq!(
            authorize(None, &headers("Bearer admin-token"), &[]),
            Err(ApiError::Disabled)
        );
    }
}

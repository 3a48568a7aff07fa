//! Operator logins for the HTTP API and the dashboard. Each operator named in the
//! configuration (`[[operators]]`) holds a token of which the controller keeps only the
//! SHA-256; a request shows it as `Authorization: Bearer <token>` (the CLI, scripts) or as
//! the password of HTTP Basic authentication (the browser asks for it on the dashboard).
//! The operator's name is then the audit log's actor, whatever the request says. With no
//! operators configured the API has no login: for a loopback listener, or one behind a proxy
//! that authenticates.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::api::ACTOR_HEADER;

/// An operator who may use the API: a name for the audit log and the SHA-256 (hex) of the
/// token they hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    pub name: String,
    pub token_sha256: String,
}

/// How every operator token starts, so that a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "elo_";

impl Operator {
    /// A new operator with a fresh random token: the token (to hand to them, shown once)
    /// and the entry for the configuration.
    pub fn create(name: &str) -> Result<(String, Operator), String> {
        check_name(name)?;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| format!("no entropy: {e}"))?;
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(secret));
        let operator = Operator {
            name: name.to_string(),
            token_sha256: edgeloop_shared::sha256_hex(token.as_bytes()),
        };
        Ok((token, operator))
    }
}

/// An operator's name becomes the audit log's actor: as the actor header allows.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "operator name `{name}` must be 1 to 128 visible ASCII characters"
        ));
    }
    Ok(())
}

/// Checks the configured operators: valid names, each once, and each token hash 64
/// lowercase hex digits, each once.
pub fn validate(operators: &[Operator]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    let mut hashes = std::collections::HashSet::new();
    for op in operators {
        check_name(&op.name)?;
        let hash = &op.token_sha256;
        if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!(
                "operator `{}`: token_sha256 must be 64 lowercase hex digits (`edgeloop operator add` prints it)",
                op.name
            ));
        }
        if !names.insert(op.name.as_str()) {
            return Err(format!("operator `{}` is named twice", op.name));
        }
        if !hashes.insert(hash.as_str()) {
            return Err(format!(
                "operator `{}` has the token of another operator",
                op.name
            ));
        }
    }
    Ok(())
}

/// The operators the API admits, by the SHA-256 of their tokens.
#[derive(Debug, Clone, Default)]
pub struct Logins {
    by_hash: Arc<HashMap<String, String>>,
}

impl Logins {
    pub fn new(operators: &[Operator]) -> Self {
        let by_hash = operators
            .iter()
            .map(|op| (op.token_sha256.clone(), op.name.clone()))
            .collect();
        Logins {
            by_hash: Arc::new(by_hash),
        }
    }

    /// No operators configured: every request is admitted, as without logins.
    pub fn is_open(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The operator whose token the request's `Authorization` carries: `Bearer <token>`, or
    /// `Basic` with the token as the password (any user name).
    pub fn operator(&self, headers: &HeaderMap) -> Option<&str> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
        let (scheme, credentials) = value.split_once(' ')?;
        let credentials = credentials.trim();
        let token = if scheme.eq_ignore_ascii_case("bearer") {
            credentials.to_string()
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(credentials)
                .ok()?;
            let decoded = String::from_utf8(decoded).ok()?;
            decoded.split_once(':')?.1.to_string()
        } else {
            return None;
        };
        // The lookup compares hashes, so its timing says nothing about the token.
        self.by_hash
            .get(&edgeloop_shared::sha256_hex(token.as_bytes()))
            .map(String::as_str)
    }
}

/// What needs no operator: the liveness check, a device's enrollment (it proves itself with
/// its enrollment token or its key) and bundle downloads (signed; devices fetch them).
fn is_public(method: &Method, path: &str) -> bool {
    path == "/healthz"
        || (method == Method::POST && path == "/api/v1/enroll")
        || (matches!(*method, Method::GET | Method::HEAD) && path.starts_with("/artifacts/"))
}

/// Middleware: with operators configured, a request that is not [public](is_public) must
/// carry an operator's token (401 otherwise, which makes a browser ask for it); the
/// operator's name replaces any actor the request named.
pub async fn require_login(
    State(logins): State<Logins>,
    mut request: Request,
    next: Next,
) -> Response {
    if logins.is_open() || is_public(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let Some(name) = logins.operator(request.headers()) else {
        let said = if request.headers().contains_key(header::AUTHORIZATION) {
            "the token in Authorization is not an operator's"
        } else {
            "this controller needs an operator's token: `Authorization: Bearer <token>` \
             (EDGELOOP_API_TOKEN for the CLI), or the browser's login with the token as \
             password"
        };
        return (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"edgeloop\", charset=\"UTF-8\""),
            )],
            axum::Json(serde_json::json!({ "error": said })),
        )
            .into_response();
    };
    let actor = HeaderValue::from_str(name).expect("operator names are visible ASCII");
    request.headers_mut().insert(ACTOR_HEADER, actor);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        h
    }

    fn basic(user_and_password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_and_password)
        )
    }

    #[test]
    fn a_token_admits_its_operator_as_bearer_or_basic_password() {
        let (token, alice) = Operator::create("alice").unwrap();
        let (other, bob) = Operator::create("bob").unwrap();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == 4 + 64);
        assert_ne!(token, other);
        validate(&[alice.clone(), bob.clone()]).unwrap();
        let logins = Logins::new(&[alice, bob]);
        assert!(!logins.is_open());

        assert_eq!(
            logins.operator(&headers(&format!("Bearer {token}"))),
            Some("alice")
        );
        assert_eq!(
            logins.operator(&headers(&format!("bearer  {other} "))),
            Some("bob")
        );
        // The browser's login: any user name, the token as password (which may hold ':').
        assert_eq!(
            logins.operator(&headers(&basic(&format!("x:{token}")))),
            Some("alice")
        );
        assert_eq!(
            logins.operator(&headers(&basic(&format!(":{other}")))),
            Some("bob")
        );

        for refused in [
            format!("Bearer {token}x"),
            format!("Bearer {}", alice_hash_of(&token)),
            format!("Token {token}"),
            basic(&token),
            "Basic !!!".into(),
            "Bearer".into(),
        ] {
            assert_eq!(logins.operator(&headers(&refused)), None, "{refused}");
        }
        assert_eq!(logins.operator(&HeaderMap::new()), None);
        assert!(Logins::new(&[]).is_open());
    }

    /// The stored hash is not a token.
    fn alice_hash_of(token: &str) -> String {
        edgeloop_shared::sha256_hex(token.as_bytes())
    }

    #[test]
    fn invalid_operator_entries_are_refused_with_the_reason() {
        let ok = |name: &str, hash: &str| Operator {
            name: name.into(),
            token_sha256: hash.into(),
        };
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        for (operators, says) in [
            (vec![ok("", &a)], "1 to 128 visible ASCII"),
            (vec![ok("al ice", &a)], "1 to 128 visible ASCII"),
            (vec![ok("alice", "abc")], "64 lowercase hex"),
            (vec![ok("alice", &"A".repeat(64))], "64 lowercase hex"),
            (vec![ok("alice", &a), ok("alice", &b)], "named twice"),
            (vec![ok("alice", &a), ok("bob", &a)], "token of another"),
        ] {
            let e = validate(&operators).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        validate(&[ok("alice", &a), ok("bob", &b)]).unwrap();
    }

    #[test]
    fn only_health_enrollment_and_bundle_downloads_are_public() {
        assert!(is_public(&Method::GET, "/healthz"));
        assert!(is_public(&Method::POST, "/api/v1/enroll"));
        assert!(is_public(&Method::GET, "/artifacts/vibration/2"));
        assert!(is_public(&Method::HEAD, "/artifacts/vibration/2/delta/1"));
        assert!(!is_public(&Method::GET, "/"));
        assert!(!is_public(&Method::GET, "/api/v1/enroll"));
        assert!(!is_public(&Method::GET, "/api/v1/devices"));
        assert!(!is_public(&Method::POST, "/api/v1/enrollments/x/approve"));
        assert!(!is_public(&Method::POST, "/artifacts/vibration/2"));
        assert!(!is_public(&Method::GET, "/api/v1/artifacts"));
    }
}

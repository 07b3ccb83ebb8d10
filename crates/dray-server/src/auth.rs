//! Bearer tokens: `Authorization: Bearer dray_…`, looked up by the SHA-256 of the secret
//! (the store never holds a secret), cached for [`crate::ServerConfig::token_cache`], and
//! checked against the scope each route group needs. Secrets never reach a log line: only a
//! token's id and name do.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dray_core::api::{Scope, TokenInfo, hash_token};

use crate::error::ApiError;
use crate::{App, Auth, ServerStore};

/// Who made a request: the token, or nobody when authentication is off.
#[derive(Clone, Debug)]
pub struct Caller(pub Option<TokenInfo>);

impl Caller {
    /// What idempotency keys are scoped by: the token's id, or `anonymous`.
    pub fn scope(&self) -> String {
        self.0
            .as_ref()
            .map_or_else(|| "anonymous".to_owned(), |t| t.id.to_string())
    }
}

/// Tokens checked lately, by hash.
pub struct TokenCache {
    ttl: Duration,
    seen: Mutex<HashMap<String, (TokenInfo, Instant)>>,
}

/// Most tokens the cache keeps; past it, it starts afresh.
const CACHE_MAX: usize = 10_000;

impl TokenCache {
    pub fn new(ttl: Duration) -> Self {
        TokenCache {
            ttl,
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, hash: &str) -> Option<TokenInfo> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(hash)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(t, _)| t.clone())
    }

    fn put(&self, hash: String, token: TokenInfo) {
        if self.ttl.is_zero() {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= CACHE_MAX {
            seen.clear();
        }
        seen.insert(hash, (token, Instant::now()));
    }

    /// Forgets every cached token (after a revocation through the API).
    pub fn clear(&self) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl<S: ServerStore> App<S> {
    pub(crate) fn forget_tokens(&self) {
        self.inner.tokens.clear();
    }
}

async fn authenticate<S: ServerStore>(
    app: &App<S>,
    authorization: Option<&str>,
) -> Result<Caller, ApiError> {
    if app.config().auth == Auth::InsecureNoAuth {
        return Ok(Caller(None));
    }
    let unauthorized =
        |detail: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail.to_owned());
    let value = authorization.ok_or_else(|| {
        unauthorized("send Authorization: Bearer <token> (text); make a token with `dray tokens create --scopes read,write`")
    })?;
    let secret = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
    let hash = hash_token(secret);
    if let Some(token) = app.inner.tokens.get(&hash) {
        return Ok(Caller(Some(token)));
    }
    match app.store().token_find(&hash).await? {
        Some(token) => {
            app.inner.tokens.put(hash, token.clone());
            Ok(Caller(Some(token)))
        }
        None => Err(unauthorized(
            "this token is unknown, revoked or expired; make a new one with `dray tokens create`",
        )),
    }
}

/// Middleware: the request's token must allow `scope` (401 without a valid token, 403 with
/// one that lacks the scope). Puts the [`Caller`] in the request's extensions.
pub async fn require<S: ServerStore>(
    State((app, scope)): State<(App<S>, Scope)>,
    mut req: Request,
    next: Next,
) -> Response {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let caller = match authenticate(&app, authorization.as_deref()).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Some(token) = &caller.0
        && !token.allows(scope)
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {:?} has scopes {}; this route needs {scope} (admin allows everything, write allows read)",
                token.name,
                dray_core::api::format_scopes(&token.scopes)
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

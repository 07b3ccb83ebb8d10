//! `/api/v1/tokens` (scope `admin`): list, create (the secret is shown once), revoke.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use dray_core::api::{NewToken, TokenInfo, check_token_name, generate_token, parse_scopes};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::extract::{Body, P, secs};
use crate::openapi::{ReadErrors, WriteErrors};
use crate::{App, ServerStore};

/// `POST /api/v1/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// A name for people (unique among live tokens).
    pub name: String,
    /// Comma-separated scopes: read, write, worker, admin.
    pub scopes: String,
    /// Lifetime in seconds (default: until revoked).
    pub ttl_secs: Option<f64>,
}

/// A new token: the secret is shown here only, never again.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// Send as `Authorization: Bearer <secret>`.
    pub secret: String,
    /// The token as stored.
    pub token: TokenInfo,
}

/// Every token.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    /// The tokens, newest first (revoked ones too).
    pub tokens: Vec<TokenInfo>,
}

/// A revocation.
#[derive(Debug, Serialize, ToSchema)]
pub struct Revoked {
    /// True.
    pub revoked: bool,
}

/// Every token, revoked ones too (never their secrets).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens",
    responses((status = 200, description = "The tokens", body = TokenList), ReadErrors))]
pub async fn list<S: ServerStore>(State(app): State<App<S>>) -> ApiResult<Json<TokenList>> {
    Ok(Json(TokenList {
        tokens: app.store().token_list().await?,
    }))
}

/// Makes a token.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses((status = 201, description = "The token and its secret (shown once)", body = CreatedToken), WriteErrors))]
pub async fn create<S: ServerStore>(
    State(app): State<App<S>>,
    Body(req): Body<CreateToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    check_token_name(&req.name)?;
    let scopes = parse_scopes(&req.scopes)?;
    let ttl = req.ttl_secs.map(|s| secs("ttl_secs", s)).transpose()?;
    let (secret, hash) = generate_token()?;
    let token = app
        .store()
        .token_insert(&NewToken {
            id: Uuid::now_v7(),
            name: req.name,
            scopes,
            hash,
            ttl,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(CreatedToken { secret, token })))
}

/// Revokes a token by id or name: it stops working at once on this server.
#[utoipa::path(delete, path = "/api/v1/tokens/{token}", tag = "tokens",
    params(("token" = String, Path, description = "Token id or name")),
    responses((status = 200, description = "Revoked", body = Revoked), WriteErrors))]
pub async fn revoke<S: ServerStore>(
    State(app): State<App<S>>,
    P(token): P<String>,
) -> ApiResult<Json<Revoked>> {
    if !app.store().token_revoke(&token).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "token_not_found",
            format!(
                "no live token with id or name {:?}; GET /api/v1/tokens lists them",
                dray_core::error::excerpt(&token)
            ),
        ));
    }
    app.forget_tokens();
    Ok(Json(Revoked { revoked: true }))
}

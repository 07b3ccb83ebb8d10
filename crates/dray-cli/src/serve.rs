//! `dray serve` (the HTTP API, optionally with a worker for the demo's handlers) and
//! `dray tokens create|list|revoke` (its bearer tokens).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Subcommand};
use dray::WorkflowStore;
use dray::api::{
    ApiStore, NewToken, check_token_name, format_scopes, generate_token, parse_scopes,
};
use dray_server::{App, Auth, Catalog, ServerConfig, ServerStore};

use crate::{CliError, CliResult, duration, print_json};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "DRAY_LISTEN")]
    addr: SocketAddr,
    /// No authentication at all, for local use: binds to a loopback address only.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Also run a worker for the handlers this binary knows (the demo's jobs and workflows).
    #[arg(long)]
    worker: bool,
    /// An origin a browser frontend may call from (CORS); repeatable; `*` for any.
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    body_limit: usize,
    /// Longest a request may take (live-event streams are exempt).
    #[arg(long, value_parser = duration, default_value = "60s")]
    request_timeout: Duration,
    /// Longest wait a blocking `wait` or a worker's long-poll claim may ask for.
    #[arg(long, value_parser = duration, default_value = "30s")]
    max_wait: Duration,
}

#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Make a token; its secret is printed once and never stored.
    Create {
        /// A name for people (unique among live tokens).
        name: String,
        /// Comma-separated scopes: read, write, worker, admin.
        #[arg(long, default_value = "read")]
        scopes: String,
        /// Lifetime (e.g. 30d); until revoked when omitted.
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id or name.
    Revoke {
        /// Token id or name.
        token: String,
    },
}

/// Checks a tokens command's arguments before the database is opened.
pub fn validate(cmd: &TokensCommand) -> CliResult<()> {
    if let TokensCommand::Create { name, scopes, .. } = cmd {
        check_token_name(name)?;
        parse_scopes(scopes)?;
    }
    Ok(())
}

pub async fn tokens_command<S: ApiStore>(
    store: &S,
    cmd: &TokensCommand,
    json: bool,
) -> CliResult<()> {
    match cmd {
        TokensCommand::Create { name, scopes, ttl } => {
            let (secret, hash) = generate_token()?;
            let token = store
                .token_insert(&NewToken {
                    id: uuid::Uuid::now_v7(),
                    name: name.clone(),
                    scopes: parse_scopes(scopes)?,
                    hash,
                    ttl: *ttl,
                })
                .await?;
            if json {
                print_json(&serde_json::json!({ "secret": secret, "token": token }));
            } else {
                out!("{secret}");
                eprintln!(
                    "token {} ({}) made with scopes {}; the secret above is shown only now: send it as `Authorization: Bearer <secret>`",
                    token.name,
                    token.id,
                    format_scopes(&token.scopes)
                );
            }
        }
        TokensCommand::List => {
            let tokens = store.token_list().await?;
            if json {
                print_json(&tokens);
            } else {
                for t in tokens {
                    let state = match (t.revoked_at, t.expires_at) {
                        (Some(at), _) => format!("revoked {}", at.to_rfc3339()),
                        (None, Some(at)) => format!("expires {}", at.to_rfc3339()),
                        (None, None) => "live".to_owned(),
                    };
                    out!(
                        "{}  {:<24} {:<24} created {}  {state}",
                        t.id,
                        t.name,
                        format_scopes(&t.scopes),
                        t.created_at.to_rfc3339()
                    );
                }
            }
        }
        TokensCommand::Revoke { token } => {
            if !store.token_revoke(token).await? {
                return Err(CliError::Dray(dray::Error::invalid(
                    "token",
                    format!(
                        "no live token with id or name {:?}; `dray tokens list` lists them",
                        dray::error::excerpt(token)
                    ),
                )));
            }
            if json {
                print_json(&serde_json::json!({ "revoked": token }));
            } else {
                out!("revoked {token}");
            }
        }
    }
    Ok(())
}

/// The jobs and workflows this binary knows (the demo's), for the server's catalog.
fn catalog<S: ServerStore>() -> Catalog<S> {
    crate::demo::catalog(Catalog::new())
}

pub async fn serve<S: ServerStore + WorkflowStore>(store: S, args: &ServeArgs) -> CliResult<()> {
    let config = ServerConfig {
        addr: args.addr,
        auth: if args.insecure_no_auth {
            Auth::InsecureNoAuth
        } else {
            Auth::Tokens
        },
        body_limit: args.body_limit,
        request_timeout: args.request_timeout,
        max_wait: args.max_wait,
        cors_origins: args.cors_origins.clone(),
        ..ServerConfig::default()
    };
    let listener = dray_server::bind(&config)
        .await
        .map_err(|e| CliError::Serve(format!("cannot listen on {}: {e}", args.addr)))?;
    let addr = listener.local_addr().unwrap_or(args.addr);
    // Before the worker: Dray's metric handles are made on first use.
    dray_server::metrics::install().map_err(|e| CliError::Serve(e.to_string()))?;
    let worker = if args.worker {
        Some(crate::demo::serve_worker(store.clone())?)
    } else {
        None
    };
    if !args.insecure_no_auth
        && store
            .token_list()
            .await?
            .iter()
            .all(|t| t.revoked_at.is_some())
    {
        eprintln!(
            "note: no live token exists yet: make one with `dray tokens create NAME --scopes read,write` (or run with --insecure-no-auth on loopback)"
        );
    }
    eprintln!(
        "dray serve: listening on http://{addr} (API under /api/v1, OpenAPI at /api/v1/openapi.json, Prometheus metrics at /metrics{}); Ctrl-C stops",
        if args.worker {
            ", with a worker for the demo's jobs and workflows"
        } else {
            ""
        }
    );
    let app = App::new(store.clone(), config, catalog());
    let served = dray_server::serve_on(listener, app, stop_signal()).await;
    if let Some(w) = worker
        && let Err(e) = w.shutdown().await
    {
        eprintln!("warning: the worker did not stop cleanly: {e}");
    }
    served.map_err(|e| CliError::Serve(format!("the server failed: {e}")))
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

//! HTTP completion callbacks (FastWorker's `delay_with_callback`, durable).
//!
//! A job enqueued with [`crate::EnqueueOptions::callback_url`] gets, each time it reaches a
//! terminal state (completed, dead, cancelled), one POST of its outcome to that URL. Workers
//! that have a [`crate::WorkerConfig::callback_secret`] run a dispatcher that claims pending
//! deliveries from the database (so a delivery survives any process dying), POSTs them, and
//! retries with capped exponential backoff until the endpoint answers 2xx.
//!
//! The request: `POST <url>`, `Content-Type: application/json`, body = [`CallbackBody`], and
//! the headers `Dray-Job-Id`, `Dray-Delivery` (the try number, from 1) and
//! `Dray-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the secret>`.
//! Verify it with [`verify`]; reject old timestamps to stop replays; dedup on (job id, state)
//! since a delivery can arrive more than once (at-least-once, like everything else).
//!
//! Only `http://` URLs are supported in this build (terminate TLS at a local proxy or
//! sidecar); an `https://` URL is refused at enqueue time, never silently dropped.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::types::{AttemptError, Message, MessageState};

/// Longest accepted callback URL.
pub const MAX_URL_LEN: usize = 2048;
/// How long one try may take, connect to status line.
pub const TRY_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay; doubles per try up to [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// A parsed `http://host[:port]/path` callback URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// Port (80 by default).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Endpoint {
    /// Parses and checks a callback URL.
    pub fn parse(url: &str) -> Result<Endpoint> {
        let bad = |why: &str| {
            Error::invalid(
                "callback_url",
                format!("{:?} {why}", crate::error::excerpt(url)),
            )
        };
        if url.len() > MAX_URL_LEN {
            return Err(bad("is longer than 2048 bytes"));
        }
        if url.starts_with("https://") {
            return Err(bad(
                "uses https, which this build cannot send; use http:// to a local TLS-terminating proxy",
            ));
        }
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("is not an http:// URL"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(bad(
                "carries credentials; sign with the callback secret instead",
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| bad("has an invalid port"))?)
            }
            _ => (authority, 80),
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("has no valid host"));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("has spaces or control characters in its path"));
        }
        Ok(Endpoint {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            path: path.to_owned(),
        })
    }
}

/// The JSON body of a callback.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallbackBody {
    /// The job.
    pub id: Uuid,
    /// Its kind.
    pub kind: Option<String>,
    /// Its queue.
    pub queue: String,
    /// `completed`, `dead` or `cancelled`.
    pub state: MessageState,
    /// Attempts made.
    pub attempts: i32,
    /// The output, when completed.
    pub result: Option<serde_json::Value>,
    /// Every failed attempt.
    pub errors: Vec<AttemptError>,
    /// When it finished (database clock).
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<&Message> for CallbackBody {
    fn from(m: &Message) -> Self {
        CallbackBody {
            id: m.id,
            kind: m.kind.clone(),
            queue: m.queue.clone(),
            state: m.state,
            attempts: m.attempt,
            result: m.result.clone(),
            errors: m.errors.clone(),
            finished_at: m.finished_at,
        }
    }
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `Dray-Signature` header value for `body` sent at `timestamp` (Unix seconds).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex(&mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Checks a `Dray-Signature` header against `body`: the MAC must match (compared in constant
/// time) and the timestamp must be within `tolerance` of `now` (Unix seconds).
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<()> {
    let bad = |why: &str| Error::invalid("Dray-Signature", why.to_owned());
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (t, v1) = (
        t.ok_or_else(|| bad("no timestamp"))?,
        v1.ok_or_else(|| bad("no v1 signature"))?,
    );
    if (now - t).unsigned_abs() > tolerance.as_secs() {
        return Err(bad(
            "timestamp outside the tolerance (a replay, or clocks far apart)",
        ));
    }
    let raw: Vec<u8> = (0..v1.len() / 2)
        .map(|i| u8::from_str_radix(v1.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad("signature is not hex"))?;
    mac(secret, t, body)
        .verify_slice(&raw)
        .map_err(|_| bad("signature does not match"))
}

/// POSTs `body` to `endpoint` and returns the status code. HTTP/1.1, one request per
/// connection, at most [`TRY_TIMEOUT`] in all.
pub async fn post(
    endpoint: &Endpoint,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::result::Result<u16, String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| format!("connect to {}:{}: {e}", endpoint.host, endpoint.port))?;
        let mut req = format!(
            "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: dray\r\n",
            endpoint.path,
            endpoint.host,
            endpoint.port,
            body.len()
        );
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        stream
            .write_all(body)
            .await
            .map_err(|e| format!("send: {e}"))?;
        // Only the status line matters: read until its end.
        let mut head = Vec::with_capacity(64);
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < 8192 {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or_default();
        let mut parts = line.split_whitespace();
        match (
            parts.next(),
            parts.next().and_then(|c| c.parse::<u16>().ok()),
        ) {
            (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
            _ => Err(format!("not an HTTP response: {line:?}")),
        }
    };
    tokio::time::timeout(TRY_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {TRY_TIMEOUT:?}")))
}

/// The delay before try `attempts + 1`.
pub fn retry_delay(attempts: i32) -> Duration {
    let n = attempts.clamp(1, 30) as u32 - 1;
    FIRST_RETRY_DELAY
        .saturating_mul(2u32.saturating_pow(n))
        .min(MAX_RETRY_DELAY)
}

/// Makes one try of `job`'s callback and says how it went.
pub async fn deliver(secret: &[u8], job: &Message) -> crate::CallbackSettle {
    let Some(cb) = &job.callback else {
        return crate::CallbackSettle::Delivered; // nothing to send
    };
    let retry = |error: String| crate::CallbackSettle::Retry {
        after: retry_delay(cb.attempts),
        error,
    };
    let endpoint = match Endpoint::parse(&cb.url) {
        Ok(e) => e,
        Err(e) => return retry(e.to_string()),
    };
    let body = match serde_json::to_vec(&CallbackBody::from(job)) {
        Ok(b) => b,
        Err(e) => return retry(format!("cannot serialize the outcome: {e}")),
    };
    let headers = [
        ("Dray-Job-Id", job.id.to_string()),
        ("Dray-Delivery", cb.attempts.to_string()),
        (
            "Dray-Signature",
            sign(secret, Utc::now().timestamp(), &body),
        ),
    ];
    match post(&endpoint, &headers, &body).await {
        Ok(code) if (200..300).contains(&code) => crate::CallbackSettle::Delivered,
        Ok(code) => retry(format!("the endpoint answered {code}")),
        Err(e) => retry(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = Endpoint::parse("http://127.0.0.1:8080/hooks/dray?x=1").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("127.0.0.1", 8080, "/hooks/dray?x=1")
        );
        let e = Endpoint::parse("http://example.com").unwrap();
        assert_eq!((e.port, e.path.as_str()), (80, "/"));
        for bad in [
            "https://a/b",
            "ftp://a",
            "http://",
            "http://a:99999/",
            "http://u:p@h/",
            "http://a/b c",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signatures_verify_and_detect_tampering() {
        let body = br#"{"id":1}"#;
        let h = sign(b"secret", 1_700_000_000, body);
        assert!(verify(b"secret", &h, body, 1_700_000_010, Duration::from_secs(300)).is_ok());
        assert!(verify(b"other", &h, body, 1_700_000_010, Duration::from_secs(300)).is_err());
        assert!(
            verify(
                b"secret",
                &h,
                b"{}",
                1_700_000_010,
                Duration::from_secs(300)
            )
            .is_err()
        );
        assert!(verify(b"secret", &h, body, 1_700_009_999, Duration::from_secs(300)).is_err());
        assert!(verify(b"secret", "t=x", body, 0, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn retry_delays_grow_and_cap() {
        assert_eq!(retry_delay(1), Duration::from_millis(500));
        assert_eq!(retry_delay(2), Duration::from_secs(1));
        assert_eq!(retry_delay(30), MAX_RETRY_DELAY);
    }
}

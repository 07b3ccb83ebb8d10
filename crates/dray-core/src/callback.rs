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
//! `https://` URLs are sent over TLS with the system's root certificates (a certificate that
//! does not check out fails the try, which is retried); `http://` URLs in the clear. Redirects
//! are not followed: a 3xx answer is a failed try, so a callback never lands where its URL does
//! not say. The requests go through `reqwest` (hyper and rustls), the same HTTP stack as
//! `dray serve`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
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

/// A parsed `http[s]://host[:port]/path` callback URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// True for `https://` (sent over TLS, certificate checked).
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port (80 for http, 443 for https by default).
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
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad("is not an http:// or https:// URL"));
        };
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
            _ => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("has no valid host"));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("has spaces or control characters in its path"));
        }
        Ok(Endpoint {
            tls,
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

/// The HTTP client of callbacks: no redirects, [`TRY_TIMEOUT`] per try, the system's root
/// certificates for `https://`.
fn http() -> std::result::Result<&'static reqwest::Client, String> {
    static CLIENT: std::sync::OnceLock<std::result::Result<reqwest::Client, String>> =
        std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(TRY_TIMEOUT)
                .user_agent(concat!("dray/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| format!("cannot set up the HTTP client: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// POSTs `body` (JSON) to `url` with `headers` and returns the status code; at most
/// [`TRY_TIMEOUT`] in all. A redirect is returned as its 3xx status, not followed.
pub async fn post(
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> std::result::Result<u16, String> {
    Endpoint::parse(url).map_err(|e| e.to_string())?;
    let mut req = http()?
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    match req.send().await {
        Ok(r) => Ok(r.status().as_u16()),
        Err(e) => {
            // The chain names the cause: refused, a certificate that does not check out, …
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why = format!("{why}: {s}");
                source = s.source();
            }
            Err(why)
        }
    }
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
    match post(&cb.url, &headers, body).await {
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
        assert_eq!((e.tls, e.port, e.path.as_str()), (false, 80, "/"));
        let e = Endpoint::parse("https://example.com/hook").unwrap();
        assert_eq!((e.tls, e.port, e.path.as_str()), (true, 443, "/hook"));
        for bad in [
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

    /// A one-shot HTTP server on loopback answering every request with `answer`; counts hits.
    async fn answering(
        answer: &'static str,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = vec![0u8; 8192];
                let _ = conn.read(&mut buf).await;
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        (format!("127.0.0.1:{}", addr.port()), hits)
    }

    #[tokio::test]
    async fn redirects_are_answers_not_followed() {
        let (target, target_hits) = answering("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let redirect: &'static str = Box::leak(
            format!(
                "HTTP/1.1 302 Found\r\nlocation: http://{target}/\r\ncontent-length: 0\r\n\r\n"
            )
            .into_boxed_str(),
        );
        let (from, _) = answering(redirect).await;
        let code = post(&format!("http://{from}/hook"), &[], b"{}".to_vec()).await;
        assert_eq!(code, Ok(302));
        assert_eq!(target_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        let code = post(&format!("http://{target}/hook"), &[], b"{}".to_vec()).await;
        assert_eq!(code, Ok(200));
    }

    #[tokio::test]
    async fn https_checks_the_certificate() {
        // A real TLS server (openssl s_server) with a self-signed certificate: the try fails
        // on the certificate, it is not sent in the clear nor trusted blindly.
        let dir = tempfile_dir();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl is installed");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = tokio::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(port.to_string())
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "openssl s_server came up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let err = post(
            &format!("https://127.0.0.1:{port}/hook"),
            &[],
            b"{}".to_vec(),
        )
        .await
        .unwrap_err();
        assert!(err.to_lowercase().contains("certificate"), "{err}");
        // The same server over plain http: not an HTTP answer, an error, never a success.
        let plain = post(
            &format!("http://127.0.0.1:{port}/hook"),
            &[],
            b"{}".to_vec(),
        )
        .await;
        assert!(plain.is_err() || plain.is_ok_and(|c| !(200..300).contains(&c)));
        let _ = server.kill().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dray-tls-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn retry_delays_grow_and_cap() {
        assert_eq!(retry_delay(1), Duration::from_millis(500));
        assert_eq!(retry_delay(2), Duration::from_secs(1));
        assert_eq!(retry_delay(30), MAX_RETRY_DELAY);
    }
}

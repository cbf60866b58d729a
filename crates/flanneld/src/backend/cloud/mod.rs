//! What the cloud-route backends (`aws-vpc`, `gce`, `ali-vpc`, `tencent-vpc`) share: an HTTP
//! client with timeouts, typed cloud errors that name the call, retry with backoff, request
//! signing primitives, secrets that never print, and the do-nothing-per-peer network.
//!
//! Each of those backends routes only its *own* subnet in the cloud's route table; the cloud then
//! carries pod traffic between hosts with no encapsulation, so nothing happens per remote lease.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{BackendContext, BackendError, Network};
use crate::lease::Lease;

/// How long one HTTP exchange with a cloud API or metadata service may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A failed cloud interaction, naming the call so an operator knows what to look at.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// The request never got an answer (connect error, TLS, timeout).
    #[error("{call}: {message}")]
    Transport {
        /// The API call or URL path, e.g. `ec2 DescribeInstances`.
        call: String,
        /// What went wrong.
        message: String,
    },
    /// The cloud answered with an error.
    #[error("{call}: {code}: {message} (HTTP {status})")]
    Api {
        /// The API call, e.g. `ec2 CreateRoute`.
        call: String,
        /// HTTP status.
        status: u16,
        /// The cloud's error code, e.g. `InvalidRoute.NotFound`.
        code: String,
        /// The cloud's error message.
        message: String,
    },
    /// The answer could not be understood, or lacked something required.
    #[error("{call}: {message}")]
    Invalid {
        /// The API call.
        call: String,
        /// What was wrong with the answer.
        message: String,
    },
    /// Configuration or environment is unusable (missing credentials, bad option).
    #[error("{0}")]
    Config(String),
}

impl CloudError {
    /// The cloud's error code, when the cloud gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            CloudError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether trying again may help (transport trouble, throttling, server errors).
    pub fn is_retryable(&self) -> bool {
        match self {
            CloudError::Transport { .. } => true,
            CloudError::Api { status, code, .. } => {
                *status >= 500
                    || *status == 429
                    || code.contains("Throttl")
                    || code.contains("RequestLimitExceeded")
                    || code.contains("RateLimit")
                    || code == "InternalError"
                    || code.starts_with("InternalError.")
            }
            CloudError::Invalid { .. } | CloudError::Config(_) => false,
        }
    }
}

impl From<CloudError> for BackendError {
    fn from(e: CloudError) -> Self {
        BackendError::Other(e.to_string())
    }
}

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct CloudResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl CloudResponse {
    /// The body as text (lossy), for error messages and text metadata values.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP(S) client for cloud APIs and metadata services (rustls, the system's roots).
#[derive(Clone)]
pub struct CloudHttp {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl CloudHttp {
    /// A client speaking http and https, with [`REQUEST_TIMEOUT`] per exchange.
    pub fn new() -> Result<Self, CloudError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| CloudError::Config(format!("loading TLS root certificates: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(https);
        Ok(CloudHttp {
            client,
            timeout: REQUEST_TIMEOUT,
        })
    }

    /// The same client with another per-exchange timeout (metadata services answer in
    /// milliseconds or not at all, e.g. an IMDSv2 token PUT dropped by the hop limit).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `req`; `call` names it in errors. Any HTTP status is returned as a response.
    pub async fn send(&self, call: &str, req: Request<Bytes>) -> Result<CloudResponse, CloudError> {
        let transport = |message: String| CloudError::Transport {
            call: call.to_string(),
            message,
        };
        let (parts, body) = req.into_parts();
        let req = Request::from_parts(parts, Full::new(body));
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| transport(error_chain(&e)))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| transport(format!("reading the response: {e}")))?
                .to_bytes();
            Ok(CloudResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(transport(format!("no answer within {:?}", self.timeout))),
        }
    }
}

/// An error and its causes on one line (hyper's top-level message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Runs `op` until it succeeds, a non-retryable error comes, or `attempts` are used up; waits
/// 1, 2, 4, 8, 16, 30, 30... seconds between tries and logs each failure once.
pub async fn retry<T, F, Fut>(what: &str, attempts: u32, mut op: F) -> Result<T, CloudError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CloudError>>,
{
    let mut delay = Duration::from_secs(1);
    let mut tried = 0;
    loop {
        tried += 1;
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && tried < attempts => {
                tracing::warn!(
                    "{what} failed (attempt {tried}/{attempts}), retrying in {delay:?}: {e}"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e),
        }
    }
}

/// An instance metadata service that answers a GET with the value as plain text (Tencent,
/// Alibaba, Google): retried with backoff, the value trimmed, an empty one an error.
pub struct MetadataService {
    http: CloudHttp,
    base: String,
    header: Option<(&'static str, &'static str)>,
    attempts: u32,
}

impl MetadataService {
    /// A reader of `base` (values at `<base>/<path>`), sending `header` with every request
    /// (e.g. Google's `Metadata-Flavor: Google`), trying each read up to `attempts` times.
    pub fn new(
        http: CloudHttp,
        base: &str,
        header: Option<(&'static str, &'static str)>,
        attempts: u32,
    ) -> Self {
        MetadataService {
            http,
            base: base.trim_end_matches('/').to_string(),
            header,
            attempts,
        }
    }

    /// The value at `path`, trimmed.
    pub async fn get(&self, path: &str) -> Result<String, CloudError> {
        let url = format!("{}/{path}", self.base);
        let what = format!("metadata GET {url}");
        retry(&what, self.attempts, || async {
            let mut req = Request::get(url.as_str());
            if let Some((k, v)) = self.header {
                req = req.header(k, v);
            }
            let req = req
                .body(Bytes::new())
                .map_err(|e| CloudError::Config(format!("{what}: {e}")))?;
            let resp = self.http.send(&what, req).await?;
            if !resp.status.is_success() {
                return Err(CloudError::Api {
                    call: what.clone(),
                    status: resp.status.as_u16(),
                    code: format!("HTTP {}", resp.status.as_u16()),
                    message: resp.text().trim().chars().take(200).collect(),
                });
            }
            let v = resp.text().trim().to_string();
            if v.is_empty() {
                return Err(CloudError::Invalid {
                    call: what.clone(),
                    message: "empty value".into(),
                });
            }
            Ok(v)
        })
        .await
    }
}

/// A credential: usable, but `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The value, for signing only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// HMAC-SHA256 of `data` under `key` (AWS SigV4, Tencent TC3).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&k, data).as_ref().to_vec()
}

/// HMAC-SHA1 of `data` under `key` (Alibaba Cloud RPC signature v1).
pub fn hmac_sha1(key: &[u8], data: &[u8]) -> Vec<u8> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
    ring::hmac::sign(&k, data).as_ref().to_vec()
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// RFC 3986 percent-encoding of everything but the unreserved `A-Z a-z 0-9 - _ . ~`, with
/// upper-case hex, as AWS SigV4 and Alibaba's RPC signature both want it.
pub fn percent_encode(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The first of `vars` that is set and not empty, else `default` (endpoint overrides).
pub fn env_or(vars: &[&str], default: &str) -> String {
    vars.iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| default.to_string())
}

/// The network of every cloud-route backend: the lease and the interface MTU; the cloud routes
/// between hosts, so remote leases need nothing here and nothing is removed at shutdown.
pub struct CloudRouteNetwork {
    lease: Lease,
    mtu: u32,
}

impl CloudRouteNetwork {
    /// A network for `lease`, with FLANNEL_MTU = the external interface's MTU.
    pub fn boxed(lease: Lease, ctx: &BackendContext) -> Box<dyn Network> {
        Box::new(CloudRouteNetwork {
            lease,
            mtu: ctx.ext.mtu,
        })
    }
}

#[async_trait]
impl Network for CloudRouteNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_vectors() {
        // RFC 4231 test case 2 and RFC 2202 test case 2.
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha1(b"Jefe", b"what do ya want for nothing?")),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("AKIDsecret");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "AKIDsecret");
    }

    #[test]
    fn retryable_errors() {
        let api = |status, code: &str| CloudError::Api {
            call: "x".into(),
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(api(503, "ServiceUnavailable").is_retryable());
        assert!(api(400, "RequestLimitExceeded").is_retryable());
        assert!(!api(400, "InvalidRoute.NotFound").is_retryable());
    }
}

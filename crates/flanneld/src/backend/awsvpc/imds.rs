//! The EC2 instance metadata service (IMDS): region, instance id and instance-profile
//! credentials.
//!
//! IMDSv2 first (a session token from `PUT /latest/api/token`, sent on every read), IMDSv1 when
//! the token request is refused or unanswered, as the AWS SDKs do; instances that require v2
//! reject v1 reads with 401, so the token flow is what makes flanneld work there.

use std::sync::Mutex;

use bytes::Bytes;
use http::{Method, Request, StatusCode};

use crate::backend::cloud::{env_or, retry, CloudError, CloudHttp, Secret};

use super::sigv4::Credentials;

/// Where the metadata service answers unless `AWS_EC2_METADATA_SERVICE_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";

/// The IMDSv2 session token lifetime asked for (the SDKs' default, 6 h).
const TOKEN_TTL_SECONDS: &str = "21600";

/// How many times one metadata read is tried (transport errors and 5xx only).
const ATTEMPTS: u32 = 4;

/// How long one metadata exchange may take: the service is on the host, so a silent one is
/// absent (or drops the IMDSv2 token PUT past the hop limit); v1 is tried then.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A client of the instance metadata service.
pub struct Imds {
    http: CloudHttp,
    endpoint: String,
    /// `None` = not asked yet; `Some(None)` = IMDSv1; `Some(Some(t))` = IMDSv2 with `t`.
    token: Mutex<Option<Option<Secret>>>,
}

impl Imds {
    /// A client for the endpoint the environment names (`AWS_EC2_METADATA_SERVICE_ENDPOINT`), else
    /// the link-local default.
    pub fn from_env(http: CloudHttp) -> Self {
        let endpoint = env_or(&["AWS_EC2_METADATA_SERVICE_ENDPOINT"], DEFAULT_ENDPOINT);
        Self::new(http, &endpoint)
    }

    /// A client for `endpoint` (`http://host[:port]`).
    pub fn new(http: CloudHttp, endpoint: &str) -> Self {
        Imds {
            http: http.with_timeout(TIMEOUT),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: Mutex::new(None),
        }
    }

    /// The metadata endpoint in use.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn cached_token(&self) -> Option<Option<Secret>> {
        self.token.lock().map(|t| t.clone()).unwrap_or(None)
    }

    fn set_token(&self, t: Option<Option<Secret>>) {
        if let Ok(mut g) = self.token.lock() {
            *g = t;
        }
    }

    /// Gets an IMDSv2 token, or decides for IMDSv1 when the service does not issue tokens.
    async fn token(&self) -> Result<Option<Secret>, CloudError> {
        if let Some(t) = self.cached_token() {
            return Ok(t);
        }
        let call = "imds PUT /latest/api/token";
        let req = Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.endpoint))
            .header("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS)
            .body(Bytes::new())
            .map_err(|e| {
                CloudError::Config(format!("{call}: bad endpoint {}: {e}", self.endpoint))
            })?;
        let token = match self.http.send(call, req).await {
            Ok(r) if r.status == StatusCode::OK && !r.body.is_empty() => {
                tracing::info!("aws-vpc: using IMDSv2 session tokens of {}", self.endpoint);
                Some(Secret::new(r.text().trim().to_string()))
            }
            Ok(r) if r.status.is_server_error() => {
                return Err(CloudError::Api {
                    call: call.into(),
                    status: r.status.as_u16(),
                    code: r.status.canonical_reason().unwrap_or("").to_string(),
                    message: r.text(),
                })
            }
            Ok(r) => {
                tracing::info!(
                    "aws-vpc: {} refused an IMDSv2 token (HTTP {}), falling back to IMDSv1",
                    self.endpoint,
                    r.status.as_u16()
                );
                None
            }
            Err(e) => {
                tracing::info!("aws-vpc: no IMDSv2 token ({e}), falling back to IMDSv1");
                None
            }
        };
        self.set_token(Some(token.clone()));
        Ok(token)
    }

    /// One read of `/latest/<path>`.
    async fn get_once(&self, path: &str) -> Result<String, CloudError> {
        let call = format!("imds GET /latest/{path}");
        let mut refreshed = false;
        loop {
            let token = self.token().await?;
            let mut req = Request::builder()
                .method(Method::GET)
                .uri(format!("{}/latest/{path}", self.endpoint));
            if let Some(t) = &token {
                req = req.header("X-aws-ec2-metadata-token", t.expose());
            }
            let req = req.body(Bytes::new()).map_err(|e| {
                CloudError::Config(format!("{call}: bad endpoint {}: {e}", self.endpoint))
            })?;
            let r = self.http.send(&call, req).await?;
            if r.status == StatusCode::OK {
                return Ok(r.text());
            }
            if r.status == StatusCode::UNAUTHORIZED && !refreshed {
                // An expired token, or a service that now requires v2: ask for a new token once.
                refreshed = true;
                self.set_token(None);
                continue;
            }
            let hint = if r.status == StatusCode::UNAUTHORIZED && token.is_none() {
                " (the instance requires IMDSv2 tokens and none could be had)"
            } else {
                ""
            };
            return Err(CloudError::Api {
                call,
                status: r.status.as_u16(),
                code: r.status.canonical_reason().unwrap_or("").to_string(),
                message: format!("{}{hint}", r.text().trim()),
            });
        }
    }

    /// `/latest/<path>`, retried on transport errors and 5xx.
    pub async fn get(&self, path: &str) -> Result<String, CloudError> {
        retry(&format!("imds GET /latest/{path}"), ATTEMPTS, || {
            self.get_once(path)
        })
        .await
    }

    /// The instance's region: `placement/region`, else the instance identity document's.
    pub async fn region(&self) -> Result<String, CloudError> {
        match self.get("meta-data/placement/region").await {
            Ok(r) if !r.trim().is_empty() => Ok(r.trim().to_string()),
            Ok(_) | Err(CloudError::Api { status: 404, .. }) => {
                let doc = self.get("dynamic/instance-identity/document").await?;
                region_from_identity_document(&doc)
            }
            Err(e) => Err(e),
        }
    }

    /// The instance id (`i-...`).
    pub async fn instance_id(&self) -> Result<String, CloudError> {
        let id = self.get("meta-data/instance-id").await?;
        let id = id.trim();
        if id.is_empty() {
            return Err(CloudError::Invalid {
                call: "imds GET /latest/meta-data/instance-id".into(),
                message: "empty instance id".into(),
            });
        }
        Ok(id.to_string())
    }

    /// The instance profile's role credentials, `None` when the instance has no role.
    pub async fn role_credentials(&self) -> Result<Option<Credentials>, CloudError> {
        let roles = match self.get("meta-data/iam/security-credentials/").await {
            Ok(r) => r,
            Err(CloudError::Api { status: 404, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(role) = roles.lines().map(str::trim).find(|l| !l.is_empty()) else {
            return Ok(None);
        };
        let path = format!("meta-data/iam/security-credentials/{role}");
        let doc = self.get(&path).await?;
        parse_role_credentials(&doc)
            .map(Some)
            .map_err(|message| CloudError::Invalid {
                call: format!("imds GET /latest/{path}"),
                message,
            })
    }
}

/// The `region` of an instance identity document.
fn region_from_identity_document(doc: &str) -> Result<String, CloudError> {
    let call = "imds GET /latest/dynamic/instance-identity/document";
    let v: serde_json::Value = serde_json::from_str(doc).map_err(|e| CloudError::Invalid {
        call: call.into(),
        message: format!("not JSON: {e}"),
    })?;
    v.get("region")
        .and_then(|r| r.as_str())
        .filter(|r| !r.is_empty())
        .map(str::to_string)
        .ok_or_else(|| CloudError::Invalid {
            call: call.into(),
            message: "no region in the instance identity document".into(),
        })
}

/// Reads `{"Code":"Success","AccessKeyId":..,"SecretAccessKey":..,"Token":..}`; the error never
/// contains the document (it holds secrets).
fn parse_role_credentials(doc: &str) -> Result<Credentials, String> {
    let v: serde_json::Value = serde_json::from_str(doc)
        .map_err(|_| "the credentials document is not JSON".to_string())?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).filter(|s| !s.is_empty());
    if let Some(code) = field("Code") {
        if code != "Success" {
            return Err(format!("the credentials document says Code={code}"));
        }
    }
    let (Some(id), Some(secret)) = (field("AccessKeyId"), field("SecretAccessKey")) else {
        return Err("the credentials document lacks AccessKeyId or SecretAccessKey".into());
    };
    Ok(Credentials {
        access_key_id: id.to_string(),
        secret_access_key: Secret::new(secret),
        session_token: field("Token").map(Secret::new),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_credentials_document() {
        let c = parse_role_credentials(
            r#"{"Code":"Success","LastUpdated":"2024-01-01T00:00:00Z","Type":"AWS-HMAC",
                "AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"s3cr3t","Token":"tok",
                "Expiration":"2024-01-01T06:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(c.access_key_id, "ASIAEXAMPLE");
        assert_eq!(c.secret_access_key.expose(), "s3cr3t");
        assert_eq!(c.session_token.as_ref().map(|t| t.expose()), Some("tok"));
        let e =
            parse_role_credentials(r#"{"Code":"Failure","SecretAccessKey":"s3cr3t"}"#).unwrap_err();
        assert!(e.contains("Code=Failure") && !e.contains("s3cr3t"), "{e}");
        let e = parse_role_credentials("SecretAccessKey=s3cr3t").unwrap_err();
        assert!(!e.contains("s3cr3t"), "{e}");
    }

    #[test]
    fn identity_document_region() {
        let r = region_from_identity_document(
            r#"{"accountId":"123456789012","instanceId":"i-1","region":"eu-west-3"}"#,
        )
        .unwrap();
        assert_eq!(r, "eu-west-3");
        assert!(region_from_identity_document("{}").is_err());
    }
}

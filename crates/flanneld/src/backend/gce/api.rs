//! The GCE calls the `gce` backend needs: the metadata server (`Metadata-Flavor: Google`,
//! `GCE_METADATA_HOST` honoured) for project, zone, instance, network and the service-account
//! token, and Compute Engine v1 (networks/instances get, routes get/insert/delete, global
//! operations wait).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::backend::cloud::{retry, CloudError, CloudHttp, MetadataService, Secret};

/// The metadata server's default address.
pub const DEFAULT_METADATA_HOST: &str = "169.254.169.254";
/// Compute Engine v1's default base URL.
pub const DEFAULT_COMPUTE_BASE: &str = "https://compute.googleapis.com/compute/v1/";
/// How many times a call is tried before start-up fails.
pub const ATTEMPTS: u32 = 6;
/// How long an operation may take (Go polls for 100 s).
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(100);

/// The last `/`-separated part of a metadata value or URL (`projects/1/zones/z` -> `z`).
pub fn base_name(s: &str) -> &str {
    s.trim_end_matches('/').rsplit('/').next().unwrap_or(s)
}

/// The metadata server.
pub struct Metadata {
    service: MetadataService,
}

impl Metadata {
    /// A reader of the server at `host` (`GCE_METADATA_HOST` form: `host[:port]`).
    pub fn new(http: CloudHttp, host: &str) -> Self {
        Metadata {
            service: MetadataService::new(
                http,
                &format!(
                    "http://{}/computeMetadata/v1",
                    host.trim().trim_end_matches('/')
                ),
                Some(("Metadata-Flavor", "Google")),
                ATTEMPTS,
            ),
        }
    }

    /// The raw value at `path` (below `computeMetadata/v1/`).
    pub async fn get(&self, path: &str) -> Result<String, CloudError> {
        self.service.get(path).await
    }

    /// The project id.
    pub async fn project(&self) -> Result<String, CloudError> {
        Ok(base_name(&self.get("project/project-id").await?).to_string())
    }

    /// The instance's zone name.
    pub async fn zone(&self) -> Result<String, CloudError> {
        Ok(base_name(&self.get("instance/zone").await?).to_string())
    }

    /// The instance name (the host name up to its first dot; instance names have none).
    pub async fn instance_name(&self) -> Result<String, CloudError> {
        let h = self.get("instance/hostname").await?;
        Ok(h.split('.').next().unwrap_or_default().to_string())
    }

    /// The network of the first interface.
    pub async fn network(&self) -> Result<String, CloudError> {
        Ok(base_name(&self.get("instance/network-interfaces/0/network").await?).to_string())
    }

    /// An access token of the default service account.
    pub async fn token(&self) -> Result<Secret, CloudError> {
        #[derive(Deserialize)]
        struct Token {
            access_token: String,
        }
        let text = self.get("instance/service-accounts/default/token").await?;
        let t: Token = serde_json::from_str(&text).map_err(|e| CloudError::Invalid {
            call: "metadata GET instance/service-accounts/default/token".into(),
            message: format!("not a token: {e}"),
        })?;
        Ok(Secret::new(t.access_token))
    }
}

/// A Compute Engine operation, as far as waiting for it needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Its name (what `wait` takes).
    pub name: String,
    /// `PENDING`, `RUNNING` or `DONE`.
    #[serde(default)]
    pub status: String,
    /// e.g. `insert`.
    #[serde(default)]
    pub operation_type: String,
    /// Set when the operation failed.
    #[serde(default)]
    pub error: Option<Value>,
}

/// A route, as far as the backend looks at it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Route name.
    pub name: String,
    /// Destination CIDR.
    #[serde(default)]
    pub dest_range: String,
    /// The next-hop instance's selfLink, if that is the kind of next hop.
    #[serde(default)]
    pub next_hop_instance: Option<String>,
    /// Its id (unchanged while the route exists).
    #[serde(default)]
    pub id: String,
}

/// A Compute Engine v1 client for one project, authorized with a bearer token.
pub struct Compute {
    http: CloudHttp,
    base: String,
    project: String,
    token: Secret,
}

impl Compute {
    /// A client for `project` at `base` (ends with `/compute/v1/` or similar).
    pub fn new(http: CloudHttp, base: &str, project: &str, token: Secret) -> Self {
        let mut base = base.trim().to_string();
        if !base.ends_with('/') {
            base.push('/');
        }
        Compute {
            http,
            base,
            project: project.to_string(),
            token,
        }
    }

    /// The URL of `path` below `projects/<project>/`.
    pub fn url(&self, path: &str) -> String {
        format!("{}projects/{}/{path}", self.base, self.project)
    }

    /// The request for `method` on `path` with an optional JSON body.
    pub fn build(&self, method: Method, path: &str, body: Option<&Value>) -> Request<Bytes> {
        let mut b = Request::builder()
            .method(method)
            .uri(self.url(path))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token.expose()),
            );
        let body = match body {
            Some(v) => {
                b = b.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        b.body(body).unwrap_or_else(|_| Request::new(Bytes::new()))
    }

    /// One call (`call` names it, e.g. `routes.get`), retried on retryable errors; `Ok(None)`
    /// for 404.
    async fn call(
        &self,
        call: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Option<Value>, CloudError> {
        let what = format!("gce {call}");
        retry(&what, ATTEMPTS, || {
            let method = method.clone();
            let body = body.clone();
            let what = what.clone();
            async move {
                let resp = self
                    .http
                    .send(&what, self.build(method, path, body.as_ref()))
                    .await?;
                if resp.status.as_u16() == 404 {
                    return Ok(None);
                }
                if !resp.status.is_success() {
                    return Err(api_error(&what, resp.status.as_u16(), &resp.body));
                }
                serde_json::from_slice(&resp.body)
                    .map(Some)
                    .map_err(|e| CloudError::Invalid {
                        call: what.clone(),
                        message: format!("answer is not JSON: {e}"),
                    })
            }
        })
        .await
    }

    async fn must(
        &self,
        call: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CloudError> {
        self.call(call, method, path, body)
            .await?
            .ok_or_else(|| CloudError::Api {
                call: format!("gce {call}"),
                status: 404,
                code: "notFound".into(),
                message: format!("{} was not found", self.url(path)),
            })
    }

    /// The selfLink of a resource at `path` (a network or an instance).
    pub async fn self_link(&self, call: &str, path: &str) -> Result<String, CloudError> {
        let v = self.must(call, Method::GET, path, None).await?;
        v.get("selfLink")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| CloudError::Invalid {
                call: format!("gce {call}"),
                message: "no selfLink in the answer".into(),
            })
    }

    /// The route named `name`, if it exists.
    pub async fn get_route(&self, name: &str) -> Result<Option<Route>, CloudError> {
        let Some(v) = self
            .call(
                "routes.get",
                Method::GET,
                &format!("global/routes/{name}"),
                None,
            )
            .await?
        else {
            return Ok(None);
        };
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| CloudError::Invalid {
                call: "gce routes.get".into(),
                message: format!("unexpected route: {e}"),
            })
    }

    /// Starts deleting route `name`.
    pub async fn delete_route(&self, name: &str) -> Result<Operation, CloudError> {
        let v = self
            .must(
                "routes.delete",
                Method::DELETE,
                &format!("global/routes/{name}"),
                None,
            )
            .await?;
        operation("routes.delete", v)
    }

    /// Starts inserting `route` (a Compute `Route` resource).
    pub async fn insert_route(&self, route: Value) -> Result<Operation, CloudError> {
        let v = self
            .must("routes.insert", Method::POST, "global/routes", Some(route))
            .await?;
        operation("routes.insert", v)
    }

    /// Waits (globalOperations.wait, repeated) until `op` is DONE, at most
    /// [`OPERATION_TIMEOUT`]; an operation error is returned with its code and message.
    pub async fn wait(&self, op: Operation) -> Result<(), CloudError> {
        let deadline = Instant::now() + OPERATION_TIMEOUT;
        let call = format!("globalOperations.wait {}", op.name);
        let mut op = op;
        let mut rounds = 0u32;
        loop {
            if let Some(err) = &op.error {
                return Err(operation_error(&call, err));
            }
            if op.status == "DONE" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CloudError::Invalid {
                    call: format!("gce {call}"),
                    message: format!("timeout waiting for operation to finish ({})", op.status),
                });
            }
            if rounds.is_multiple_of(5) {
                tracing::info!(
                    "gce: {} operation status: {} waiting for completion...",
                    op.operation_type,
                    op.status
                );
            }
            rounds += 1;
            let v = self
                .must(
                    &call,
                    Method::POST,
                    &format!("global/operations/{}/wait", op.name),
                    None,
                )
                .await?;
            op = operation(&call, v)?;
        }
    }
}

fn operation(call: &str, v: Value) -> Result<Operation, CloudError> {
    serde_json::from_value(v).map_err(|e| CloudError::Invalid {
        call: format!("gce {call}"),
        message: format!("not an Operation: {e}"),
    })
}

fn operation_error(call: &str, err: &Value) -> CloudError {
    let first = err
        .get("errors")
        .and_then(Value::as_array)
        .and_then(|a| a.first());
    let field = |k: &str| {
        first
            .and_then(|e| e.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    CloudError::Api {
        call: format!("gce {call}"),
        status: 200,
        code: field("code"),
        message: field("message"),
    }
}

/// A Google API error answer (`{"error":{"code","message","errors":[{"reason"}],"status"}}`).
pub fn api_error(call: &str, status: u16, body: &[u8]) -> CloudError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = &v["error"];
    let code = e["errors"][0]["reason"]
        .as_str()
        .or(e["status"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {status}"));
    let message = e["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| {
            String::from_utf8_lossy(body)
                .trim()
                .chars()
                .take(200)
                .collect()
        });
    CloudError::Api {
        call: call.into(),
        status,
        code,
        message,
    }
}

/// The route name for `subnet`: `flannel-` and the subnet with `.` and `/` as `-`.
pub fn route_name(subnet: &str) -> String {
    format!("flannel-{}", subnet.replace(['.', '/'], "-"))
}

/// The route resource flannel inserts.
pub fn route_body(subnet: &str, network_link: &str, instance_link: &str) -> Value {
    json!({
        "name": route_name(subnet),
        "destRange": subnet,
        "network": network_link,
        "nextHopInstance": instance_link,
        "priority": 1000,
        "tags": [],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_bodies() {
        assert_eq!(route_name("10.244.1.0/24"), "flannel-10-244-1-0-24");
        assert_eq!(
            base_name("projects/123/zones/us-central1-a"),
            "us-central1-a"
        );
        assert_eq!(base_name("frs-project"), "frs-project");
        let b = route_body("10.244.1.0/24", "N", "I");
        assert_eq!(
            b.to_string(),
            r#"{"destRange":"10.244.1.0/24","name":"flannel-10-244-1-0-24","network":"N","nextHopInstance":"I","priority":1000,"tags":[]}"#
        );
    }

    #[test]
    fn requests() {
        let c = Compute::new(
            CloudHttp::new().unwrap(),
            "http://10.0.0.1:8081/compute/v1",
            "p1",
            Secret::new("ya29.tok"),
        );
        let r = c.build(Method::POST, "global/routes", Some(&json!({"a": 1})));
        assert_eq!(
            r.uri().to_string(),
            "http://10.0.0.1:8081/compute/v1/projects/p1/global/routes"
        );
        assert_eq!(r.headers()["authorization"], "Bearer ya29.tok");
        assert_eq!(r.headers()["content-type"], "application/json");
    }

    #[test]
    fn errors() {
        let e = api_error(
            "gce routes.insert",
            409,
            br#"{"error":{"code":409,"message":"The resource 'projects/p/global/routes/r' already exists","errors":[{"message":"x","domain":"global","reason":"alreadyExists"}]}}"#,
        );
        assert_eq!(
            e.to_string(),
            "gce routes.insert: alreadyExists: The resource 'projects/p/global/routes/r' already exists (HTTP 409)"
        );
        assert!(!e.is_retryable());
        let e = api_error("x", 503, b"oops");
        assert!(e.is_retryable());
        assert_eq!(e.code(), Some("HTTP 503"));
        let e = operation_error(
            "w",
            &json!({"errors": [{"code": "QUOTA_EXCEEDED", "message": "Quota 'ROUTES' exceeded."}]}),
        );
        assert_eq!(e.code(), Some("QUOTA_EXCEEDED"));
    }
}

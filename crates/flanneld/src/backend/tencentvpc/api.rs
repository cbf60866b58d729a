//! The few Tencent Cloud calls tencent-vpc needs: instance metadata (region, MAC, VPC id) and
//! VPC API 3.0 (`DescribeRouteTables`, `CreateRoutes`, `DeleteRoutes`), signed with TC3.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use serde::Deserialize;
use serde_json::{json, Value};

use super::sign::{self, Tc3Input};
use crate::backend::cloud::{retry, CloudError, CloudHttp, MetadataService, Secret};

/// The VPC API's default host.
pub const DEFAULT_ENDPOINT: &str = "vpc.tencentcloudapi.com";
/// The VPC API version the backend speaks.
pub const VERSION: &str = "2017-03-12";
/// Where the instance metadata service lives (reached by name, as on a real CVM).
pub const METADATA_BASE: &str = "http://metadata.tencentyun.com/latest/meta-data";
/// How many times a call is tried before start-up fails.
pub const ATTEMPTS: u32 = 6;

/// One route of a route table, as DescribeRouteTables reports it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Route {
    /// Destination CIDR.
    #[serde(default)]
    pub destination_cidr_block: String,
    /// e.g. `NORMAL_CVM`.
    #[serde(default)]
    pub gateway_type: String,
    /// For `NORMAL_CVM`: the instance's private IP.
    #[serde(default)]
    pub gateway_id: String,
    /// The route's numeric id (what DeleteRoutes takes).
    #[serde(default)]
    pub route_id: u64,
    /// Whether the route is in effect.
    #[serde(default)]
    pub enabled: bool,
    /// `USER`, `NETD`, `CCN`...
    #[serde(default)]
    pub route_type: String,
}

/// A route table of the VPC.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RouteTable {
    /// e.g. `rtb-abcd1234`.
    pub route_table_id: String,
    /// Whether it is the VPC's main (default) table.
    #[serde(default)]
    pub main: bool,
    /// Its routes.
    #[serde(default)]
    pub route_set: Vec<Route>,
}

/// Splits an endpoint setting into (scheme, authority): `host` means https, a URL is taken
/// as written (test servers, private endpoints).
pub fn parse_endpoint(endpoint: &str) -> Result<(String, String), CloudError> {
    let endpoint = endpoint.trim().trim_end_matches('/');
    let (scheme, rest) = match endpoint.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => ("https".to_string(), endpoint),
    };
    if (scheme != "http" && scheme != "https") || rest.is_empty() || rest.contains('/') {
        return Err(CloudError::Config(format!(
            "invalid Tencent Cloud VPC endpoint {endpoint:?} (want a host name or http(s)://host[:port])"
        )));
    }
    Ok((scheme, rest.to_string()))
}

/// A VPC API client for one region, signing every call with the given key pair.
#[derive(Clone)]
pub struct VpcClient {
    http: CloudHttp,
    scheme: String,
    host: String,
    region: String,
    secret_id: String,
    secret_key: Secret,
}

impl VpcClient {
    /// A client for `endpoint` (see [`parse_endpoint`]) in `region`.
    pub fn new(
        http: CloudHttp,
        endpoint: &str,
        region: &str,
        secret_id: &str,
        secret_key: Secret,
    ) -> Result<Self, CloudError> {
        let (scheme, host) = parse_endpoint(endpoint)?;
        Ok(VpcClient {
            http,
            scheme,
            host,
            region: region.to_string(),
            secret_id: secret_id.to_string(),
            secret_key,
        })
    }

    /// The signed request for `action` with JSON `params` at `timestamp`.
    pub fn build(&self, action: &str, params: &Value, timestamp: u64) -> Request<Bytes> {
        let payload = Bytes::from(params.to_string());
        let auth = sign::authorization(
            &self.secret_id,
            &self.secret_key,
            &Tc3Input {
                service: "vpc",
                host: &self.host,
                timestamp,
                payload: &payload,
            },
        );
        let mut b = Request::post(format!("{}://{}/", self.scheme, self.host))
            .header(http::header::HOST, &self.host)
            .header(http::header::CONTENT_TYPE, sign::CONTENT_TYPE)
            .header("X-TC-Action", action)
            .header("X-TC-Version", VERSION)
            .header("X-TC-Timestamp", timestamp.to_string())
            .header(http::header::AUTHORIZATION, auth);
        if !self.region.is_empty() {
            b = b.header("X-TC-Region", &self.region);
        }
        b.body(payload)
            .unwrap_or_else(|_| Request::new(Bytes::new()))
    }

    /// One call, tried up to [`ATTEMPTS`] times on retryable errors; returns `Response`.
    pub async fn call(&self, action: &str, params: Value) -> Result<Value, CloudError> {
        let what = format!("tencent-vpc {action}");
        retry(&what, ATTEMPTS, || {
            let what = what.clone();
            let params = params.clone();
            async move {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let resp = self
                    .http
                    .send(&what, self.build(action, &params, now))
                    .await?;
                parse_response(&what, resp.status.as_u16(), &resp.body)
            }
        })
        .await
    }

    /// Every route table of `vpc_id`.
    pub async fn describe_route_tables(&self, vpc_id: &str) -> Result<Vec<RouteTable>, CloudError> {
        let resp = self
            .call(
                "DescribeRouteTables",
                json!({"Filters": [{"Name": "vpc-id", "Values": [vpc_id]}]}),
            )
            .await?;
        let tables = resp.get("RouteTableSet").cloned().unwrap_or(Value::Null);
        if tables.is_null() {
            return Ok(vec![]);
        }
        serde_json::from_value(tables).map_err(|e| CloudError::Invalid {
            call: "tencent-vpc DescribeRouteTables".into(),
            message: format!("unexpected RouteTableSet: {e}"),
        })
    }

    /// Adds an enabled `NORMAL_CVM` route `cidr` -> `gateway_ip` to `table`.
    pub async fn create_route(
        &self,
        table: &str,
        cidr: &str,
        gateway_ip: &str,
    ) -> Result<(), CloudError> {
        self.call(
            "CreateRoutes",
            json!({
                "RouteTableId": table,
                "Routes": [{
                    "DestinationCidrBlock": cidr,
                    "GatewayType": "NORMAL_CVM",
                    "GatewayId": gateway_ip,
                    "Enabled": true,
                }],
            }),
        )
        .await
        .map(|_| ())
    }

    /// Deletes route `route_id` of `table`.
    pub async fn delete_route(&self, table: &str, route_id: u64) -> Result<(), CloudError> {
        self.call(
            "DeleteRoutes",
            json!({"RouteTableId": table, "Routes": [{"RouteId": route_id}]}),
        )
        .await
        .map(|_| ())
    }
}

/// The `Response` object of an API 3.0 answer, or the error it carries.
pub fn parse_response(call: &str, status: u16, body: &[u8]) -> Result<Value, CloudError> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let Some(mut response) = parsed.and_then(|mut v| v.get_mut("Response").map(Value::take)) else {
        let text = String::from_utf8_lossy(body);
        let snippet: String = text.chars().take(200).collect();
        return Err(if status >= 400 {
            CloudError::Api {
                call: call.into(),
                status,
                code: format!("HTTP {status}"),
                message: snippet,
            }
        } else {
            CloudError::Invalid {
                call: call.into(),
                message: format!("not an API 3.0 answer: {snippet}"),
            }
        });
    };
    if let Some(err) = response.get("Error") {
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let request_id = response
            .get("RequestId")
            .and_then(Value::as_str)
            .unwrap_or_default();
        return Err(CloudError::Api {
            call: call.into(),
            status,
            code: field("Code"),
            message: format!("{} (RequestId {request_id})", field("Message")),
        });
    }
    Ok(response.take())
}

/// The instance metadata service.
pub struct Metadata {
    service: MetadataService,
}

impl Metadata {
    /// A reader of `base` (normally [`METADATA_BASE`]).
    pub fn new(http: CloudHttp, base: &str) -> Self {
        Metadata {
            service: MetadataService::new(http, base, None, ATTEMPTS),
        }
    }

    /// The text value at `path` (below `latest/meta-data/`), trimmed.
    pub async fn get(&self, path: &str) -> Result<String, CloudError> {
        self.service.get(path).await
    }

    /// The instance's region, e.g. `ap-guangzhou`.
    pub async fn region(&self) -> Result<String, CloudError> {
        self.get("placement/region").await
    }

    /// The VPC of the instance's primary interface.
    pub async fn vpc_id(&self) -> Result<String, CloudError> {
        let mac = self.get("mac").await?;
        self.get(&format!("network/interfaces/macs/{mac}/vpc-id"))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(endpoint: &str) -> VpcClient {
        VpcClient::new(
            CloudHttp::new().expect("client"),
            endpoint,
            "ap-guangzhou",
            "AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE",
            Secret::new("Gu5t9xGARNpq86cd98joQYCN3EXAMPLE"),
        )
        .expect("endpoint")
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("vpc.tencentcloudapi.com").unwrap(),
            ("https".into(), "vpc.tencentcloudapi.com".into())
        );
        assert_eq!(
            parse_endpoint("http://192.168.1.2:8080/").unwrap(),
            ("http".into(), "192.168.1.2:8080".into())
        );
        assert!(parse_endpoint("ftp://x").is_err());
        assert!(parse_endpoint("http://x/y").is_err());
    }

    #[tokio::test]
    async fn request_has_the_api_3_headers() {
        let c = client("http://10.0.0.9:8080");
        let req = c.build(
            "CreateRoutes",
            &json!({"RouteTableId": "rtb-1"}),
            1_551_113_065,
        );
        let h = req.headers();
        assert_eq!(req.uri().to_string(), "http://10.0.0.9:8080/");
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(h["host"], "10.0.0.9:8080");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-tc-action"], "CreateRoutes");
        assert_eq!(h["x-tc-version"], "2017-03-12");
        assert_eq!(h["x-tc-timestamp"], "1551113065");
        assert_eq!(h["x-tc-region"], "ap-guangzhou");
        let auth = h["authorization"].to_str().unwrap();
        assert!(auth.starts_with("TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE/2019-02-25/vpc/tc3_request, SignedHeaders=content-type;host, Signature="));
        assert!(!auth.contains("Gu5t9x"));
        assert_eq!(req.body().as_ref(), br#"{"RouteTableId":"rtb-1"}"#);
    }

    #[test]
    fn responses_and_errors() {
        let ok = parse_response(
            "tencent-vpc X",
            200,
            br#"{"Response":{"TotalCount":0,"RequestId":"r1"}}"#,
        )
        .unwrap();
        assert_eq!(ok["TotalCount"], 0);
        let err = parse_response(
            "tencent-vpc CreateRoutes",
            200,
            br#"{"Response":{"Error":{"Code":"AuthFailure.SignatureFailure","Message":"The provided credentials could not be validated."},"RequestId":"r2"}}"#,
        )
        .unwrap_err();
        assert_eq!(err.code(), Some("AuthFailure.SignatureFailure"));
        assert_eq!(
            err.to_string(),
            "tencent-vpc CreateRoutes: AuthFailure.SignatureFailure: The provided credentials could not be validated. (RequestId r2) (HTTP 200)"
        );
        assert!(!err.is_retryable());
        let throttled = parse_response(
            "x",
            200,
            br#"{"Response":{"Error":{"Code":"RequestLimitExceeded","Message":"slow down"},"RequestId":"r3"}}"#,
        )
        .unwrap_err();
        assert!(throttled.is_retryable());
        let gateway = parse_response("x", 502, b"<html>bad gateway</html>").unwrap_err();
        assert!(gateway.is_retryable());
    }

    #[test]
    fn route_tables_decode() {
        let v: Vec<RouteTable> = serde_json::from_value(json!([{
            "VpcId": "vpc-1", "RouteTableId": "rtb-1", "Main": true,
            "RouteSet": [{"DestinationCidrBlock": "10.244.1.0/24", "GatewayType": "NORMAL_CVM",
                          "GatewayId": "10.0.0.5", "RouteId": 7, "Enabled": false,
                          "RouteType": "USER", "RouteDescription": ""}]
        }]))
        .unwrap();
        assert_eq!(v[0].route_set[0].route_id, 7);
        assert!(!v[0].route_set[0].enabled);
    }
}

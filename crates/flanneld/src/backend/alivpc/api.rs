//! The Alibaba Cloud calls ali-vpc needs: instance metadata (`100.100.100.200`) and the VPC
//! API (RPC style, version 2016-04-28) signed with signature version 1.0 (HMAC-SHA1), written
//! from the provider's published algorithm and checked against its documented example.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::Request;
use serde::Deserialize;
use serde_json::Value;

use crate::backend::cloud::{hmac_sha1, retry, CloudError, CloudHttp, MetadataService, Secret};
use crate::utc::utc_civil;

/// The VPC API's default host.
pub const DEFAULT_ENDPOINT: &str = "vpc.aliyuncs.com";
/// The VPC API version spoken.
pub const VERSION: &str = "2016-04-28";
/// Where the instance metadata service lives.
pub const METADATA_BASE: &str = "http://100.100.100.200/latest/meta-data";
/// How many times a call is tried before start-up fails.
pub const ATTEMPTS: u32 = 6;

/// RFC 3986 percent-encoding as the signature wants it (only `A-Za-z0-9-_.~` stay as is).
pub fn percent_encode(s: &str) -> String {
    crate::backend::cloud::percent_encode(s)
}

/// The sorted, encoded `k=v&...` of all parameters (the request's query, minus Signature).
pub fn canonical_query(params: &BTreeMap<String, String>) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `METHOD&%2F&<encoded canonical query>`.
pub fn string_to_sign(method: &str, params: &BTreeMap<String, String>) -> String {
    format!(
        "{method}&{}&{}",
        percent_encode("/"),
        percent_encode(&canonical_query(params))
    )
}

/// Base64 of HMAC-SHA1 under `secret&`.
pub fn signature(secret: &Secret, string_to_sign: &str) -> String {
    let key = format!("{}&", secret.expose());
    base64::engine::general_purpose::STANDARD
        .encode(hmac_sha1(key.as_bytes(), string_to_sign.as_bytes()))
}

/// ISO 8601 UTC (`2016-02-23T12:46:24Z`), the `Timestamp` parameter.
pub fn iso8601(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = utc_civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// A VPC API client for one region.
pub struct VpcClient {
    http: CloudHttp,
    scheme: String,
    host: String,
    region: String,
    key_id: String,
    secret: Secret,
}

impl VpcClient {
    /// A client for `endpoint` (a host name, or `http(s)://host[:port]`) in `region`.
    pub fn new(
        http: CloudHttp,
        endpoint: &str,
        region: &str,
        key_id: &str,
        secret: Secret,
    ) -> Result<Self, CloudError> {
        let endpoint = endpoint.trim().trim_end_matches('/');
        let (scheme, host) = match endpoint.split_once("://") {
            Some((s, h)) => (s.to_ascii_lowercase(), h.to_string()),
            None => ("https".to_string(), endpoint.to_string()),
        };
        if (scheme != "http" && scheme != "https") || host.is_empty() || host.contains('/') {
            return Err(CloudError::Config(format!(
                "invalid Alibaba Cloud VPC endpoint {endpoint:?} (want a host name or http(s)://host[:port])"
            )));
        }
        Ok(VpcClient {
            http,
            scheme,
            host,
            region: region.to_string(),
            key_id: key_id.to_string(),
            secret,
        })
    }

    /// The signed GET for `action` with `extra` parameters at `timestamp` with `nonce`.
    pub fn build(
        &self,
        action: &str,
        extra: &[(&str, &str)],
        timestamp: u64,
        nonce: &str,
    ) -> Request<Bytes> {
        let mut params: BTreeMap<String, String> = [
            ("Format", "JSON"),
            ("Version", VERSION),
            ("AccessKeyId", self.key_id.as_str()),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureVersion", "1.0"),
            ("SignatureNonce", nonce),
            ("Action", action),
            ("RegionId", self.region.as_str()),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        params.insert("Timestamp".into(), iso8601(timestamp));
        let sig = signature(&self.secret, &string_to_sign("GET", &params));
        let url = format!(
            "{}://{}/?{}&Signature={}",
            self.scheme,
            self.host,
            canonical_query(&params),
            percent_encode(&sig)
        );
        Request::get(url)
            .body(Bytes::new())
            .unwrap_or_else(|_| Request::new(Bytes::new()))
    }

    /// One call, retried on throttling and transport errors; returns the JSON answer.
    pub async fn call(&self, action: &str, extra: &[(&str, &str)]) -> Result<Value, CloudError> {
        let what = format!("ali-vpc {action}");
        retry(&what, ATTEMPTS, || async {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let nonce = format!("{:032x}", rand::random::<u128>());
            let resp = self
                .http
                .send(&what, self.build(action, extra, now, &nonce))
                .await?;
            parse_response(&what, resp.status.as_u16(), &resp.body)
        })
        .await
    }

    /// The VRouter of `vpc_id`.
    pub async fn vrouter_of(&self, vpc_id: &str) -> Result<String, CloudError> {
        let v = self.call("DescribeVpcs", &[("VpcId", vpc_id)]).await?;
        v["Vpcs"]["Vpc"][0]["VRouterId"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| CloudError::Invalid {
                call: "ali-vpc DescribeVpcs".into(),
                message: format!("VPC {vpc_id} not found"),
            })
    }

    /// The first route table of `vrouter`.
    pub async fn route_table_of(&self, vrouter: &str) -> Result<String, CloudError> {
        let v = self
            .call("DescribeVRouters", &[("VRouterId", vrouter)])
            .await?;
        v["VRouters"]["VRouter"][0]["RouteTableIds"]["RouteTableId"][0]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| CloudError::Invalid {
                call: "ali-vpc DescribeVRouters".into(),
                message: format!("no route table in VRouter {vrouter}"),
            })
    }

    /// The entries of route table `table` of `vrouter`.
    pub async fn route_entries(
        &self,
        vrouter: &str,
        table: &str,
    ) -> Result<Vec<RouteEntry>, CloudError> {
        let v = self
            .call(
                "DescribeRouteTables",
                &[("VRouterId", vrouter), ("RouteTableId", table)],
            )
            .await?;
        parse_entries(&v)
    }

    /// Adds `cidr` -> instance `instance_id` to `table`.
    pub async fn create_entry(
        &self,
        table: &str,
        cidr: &str,
        instance_id: &str,
    ) -> Result<(), CloudError> {
        self.call(
            "CreateRouteEntry",
            &[
                ("RouteTableId", table),
                ("DestinationCidrBlock", cidr),
                ("NextHopType", "Instance"),
                ("NextHopId", instance_id),
            ],
        )
        .await
        .map(|_| ())
    }

    /// Removes the entry `cidr` -> `next_hop` from `table`.
    pub async fn delete_entry(
        &self,
        table: &str,
        cidr: &str,
        next_hop: &str,
    ) -> Result<(), CloudError> {
        self.call(
            "DeleteRouteEntry",
            &[
                ("RouteTableId", table),
                ("DestinationCidrBlock", cidr),
                ("NextHopId", next_hop),
            ],
        )
        .await
        .map(|_| ())
    }
}

/// One route entry, as DescribeRouteTables reports it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct RouteEntry {
    /// Destination CIDR.
    #[serde(default)]
    pub destination_cidr_block: String,
    /// `Custom` (user) or `System`.
    #[serde(default, rename = "Type")]
    pub kind: String,
    /// The next hop's instance id.
    #[serde(default)]
    pub instance_id: String,
    /// `Available`, `Pending`, `Modifying`.
    #[serde(default)]
    pub status: String,
}

/// The entries of the first table in a DescribeRouteTables answer.
pub fn parse_entries(v: &Value) -> Result<Vec<RouteEntry>, CloudError> {
    let entries = v["RouteTables"]["RouteTable"][0]["RouteEntrys"]["RouteEntry"].clone();
    if entries.is_null() {
        return Ok(vec![]);
    }
    serde_json::from_value(entries).map_err(|e| CloudError::Invalid {
        call: "ali-vpc DescribeRouteTables".into(),
        message: format!("unexpected RouteEntrys: {e}"),
    })
}

/// The answer, or the error it carries (`{"Code","Message","RequestId"}` with a 4xx/5xx).
pub fn parse_response(call: &str, status: u16, body: &[u8]) -> Result<Value, CloudError> {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    match v {
        Some(v) if (200..300).contains(&status) => Ok(v),
        Some(v) if v.get("Code").is_some() => Err(CloudError::Api {
            call: call.into(),
            status,
            code: v["Code"].as_str().unwrap_or_default().to_string(),
            message: format!(
                "{} (RequestId {})",
                v["Message"].as_str().unwrap_or_default(),
                v["RequestId"].as_str().unwrap_or_default()
            ),
        }),
        _ => Err(CloudError::Api {
            call: call.into(),
            status,
            code: format!("HTTP {status}"),
            message: String::from_utf8_lossy(body).chars().take(200).collect(),
        }),
    }
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

    /// The text value at `path`.
    pub async fn get(&self, path: &str) -> Result<String, CloudError> {
        self.service.get(path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The signature document's worked example (AccessKeyId `testid`, secret `testsecret`,
    /// ECS DescribeRegions): the English text spells the parameter `Timestamp` and gives
    /// `OLeaidS1JvxuMvnyHOwuJ+uX5qY=`, the older Chinese text `TimeStamp` and
    /// `CT9X0VtwR86fNWSnsc6v8YGOjuE=`.
    #[test]
    fn documented_examples() {
        for (ts_key, expected) in [
            ("Timestamp", "OLeaidS1JvxuMvnyHOwuJ+uX5qY="),
            ("TimeStamp", "CT9X0VtwR86fNWSnsc6v8YGOjuE="),
        ] {
            let params = p(&[
                (ts_key, "2016-02-23T12:46:24Z"),
                ("Format", "XML"),
                ("AccessKeyId", "testid"),
                ("Action", "DescribeRegions"),
                ("SignatureMethod", "HMAC-SHA1"),
                ("SignatureNonce", "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"),
                ("Version", "2014-05-26"),
                ("SignatureVersion", "1.0"),
            ]);
            let sts = string_to_sign("GET", &params);
            assert_eq!(
                sts,
                format!("GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML%26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf%26SignatureVersion%3D1.0%26{ts_key}%3D2016-02-23T12%253A46%253A24Z%26Version%3D2014-05-26")
            );
            assert_eq!(signature(&Secret::new("testsecret"), &sts), expected);
        }
    }

    /// A VPC CreateRouteEntry signed by `aliyun-python-sdk-core` 2.16.1's RPC composer (which
    /// also sends an empty `SignatureType`), with characters that need care (`/`, `*`, `~`,
    /// space).
    #[test]
    fn matches_the_python_sdk() {
        let params = p(&[
            ("Action", "CreateRouteEntry"),
            ("Version", "2016-04-28"),
            ("RegionId", "cn-hangzhou"),
            ("RouteTableId", "vtb-bp1abc"),
            ("DestinationCidrBlock", "10.244.1.0/24"),
            ("NextHopType", "Instance"),
            ("NextHopId", "i-bp1xyz"),
            ("Description", "flannel route*~ x"),
            ("Timestamp", "2024-05-06T07:08:09Z"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureType", ""),
            ("SignatureVersion", "1.0"),
            ("SignatureNonce", "6a8e2f3c-0f1e-4e58-9a76-0b5e5a3c1d2f"),
            ("AccessKeyId", "testid"),
            ("Format", "JSON"),
        ]);
        assert_eq!(
            signature(&Secret::new("testsecret"), &string_to_sign("GET", &params)),
            "elR5yaSwc15cZ9sQSKjaT9blMwY="
        );
    }

    #[test]
    fn request_building() {
        let c = VpcClient::new(
            CloudHttp::new().unwrap(),
            "http://10.0.0.7:8082",
            "cn-hangzhou",
            "testid",
            Secret::new("testsecret"),
        )
        .unwrap();
        let req = c.build(
            "CreateRouteEntry",
            &[
                ("RouteTableId", "vtb-1"),
                ("DestinationCidrBlock", "10.244.1.0/24"),
            ],
            1_456_231_584,
            "n1",
        );
        let url = req.uri().to_string();
        assert!(url.starts_with("http://10.0.0.7:8082/?AccessKeyId=testid&Action=CreateRouteEntry&DestinationCidrBlock=10.244.1.0%2F24&Format=JSON&RegionId=cn-hangzhou&RouteTableId=vtb-1&SignatureMethod=HMAC-SHA1&SignatureNonce=n1&SignatureVersion=1.0&Timestamp=2016-02-23T12%3A46%3A24Z&Version=2016-04-28&Signature="), "{url}");
        assert!(!url.contains("testsecret"));
        // The signature in the URL verifies against the parameters before it.
        let (query, sig) = url.split_once("&Signature=").unwrap();
        let params: BTreeMap<String, String> = query
            .split_once('?')
            .unwrap()
            .1
            .split('&')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.replace("%2F", "/").replace("%3A", ":"))
            })
            .collect();
        let expected = signature(&Secret::new("testsecret"), &string_to_sign("GET", &params));
        assert_eq!(sig, percent_encode(&expected));
        assert!(VpcClient::new(
            CloudHttp::new().unwrap(),
            "ftp://x",
            "r",
            "i",
            Secret::new("s")
        )
        .is_err());
    }

    #[test]
    fn answers() {
        let v = parse_response(
            "ali-vpc DescribeVpcs",
            200,
            br#"{"Vpcs":{"Vpc":[{"VpcId":"vpc-1","VRouterId":"vrt-1"}]},"TotalCount":1,"RequestId":"r"}"#,
        )
        .unwrap();
        assert_eq!(v["Vpcs"]["Vpc"][0]["VRouterId"], "vrt-1");
        let e = parse_response(
            "ali-vpc DescribeVpcs",
            404,
            br#"{"RequestId":"r2","HostId":"vpc.aliyuncs.com","Code":"InvalidAccessKeyId.NotFound","Message":"Specified access key is not found."}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "ali-vpc DescribeVpcs: InvalidAccessKeyId.NotFound: Specified access key is not found. (RequestId r2) (HTTP 404)"
        );
        let e = parse_response("x", 400, br#"{"Code":"Throttling.User","Message":"Request was denied due to user flow control.","RequestId":"r3"}"#).unwrap_err();
        assert!(e.is_retryable());
        let entries = parse_entries(&serde_json::json!({"RouteTables":{"RouteTable":[{"RouteTableId":"vtb-1","RouteEntrys":{"RouteEntry":[
            {"RouteTableId":"vtb-1","DestinationCidrBlock":"10.244.1.0/24","Type":"Custom","InstanceId":"i-1","NextHopType":"Instance","Status":"Available"}]}}]}})).unwrap();
        assert_eq!(entries[0].kind, "Custom");
        assert_eq!(entries[0].instance_id, "i-1");
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
    }
}

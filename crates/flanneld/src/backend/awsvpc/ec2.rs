//! A small typed client of the EC2 Query API for the handful of calls aws-vpc makes: POST
//! `Action=...&Version=2016-11-15` form-encoded, signed with SigV4, XML answers, errors as
//! `<Response><Errors><Error><Code>..</Code><Message>..</Message>`.

use std::net::Ipv4Addr;

use bytes::Bytes;
use http::{Method, Request, Uri};

use crate::backend::cloud::{env_or, retry, CloudError, CloudHttp};

use super::sigv4::{authorization, uri_encode, AmzDate, Credentials, Scope, SignRequest};

/// The EC2 API version every call names (the one the AWS SDKs still speak).
pub const API_VERSION: &str = "2016-11-15";

/// How many times one call is tried when the error is retryable (Go flannel: `MaxRetries(5)`).
const ATTEMPTS: u32 = 5;

/// The EC2 endpoint: `AWS_ENDPOINT_URL_EC2`, else `AWS_ENDPOINT_URL`, else the region's public
/// endpoint.
pub fn endpoint_from_env(region: &str) -> String {
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    env_or(
        &["AWS_ENDPOINT_URL_EC2", "AWS_ENDPOINT_URL"],
        &format!("https://ec2.{region}.{suffix}"),
    )
}

/// A network interface of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eni {
    /// `eni-...`.
    pub id: String,
    /// The subnet it sits in.
    pub subnet_id: String,
    /// The VPC it sits in.
    pub vpc_id: String,
    /// Every private IPv4 address it holds.
    pub private_ips: Vec<Ipv4Addr>,
}

/// One route of a route table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    /// IPv4 destination (absent for IPv6 and prefix-list routes).
    pub destination: Option<String>,
    /// Target ENI, if the route points at one.
    pub network_interface_id: Option<String>,
    /// Target instance, if any.
    pub instance_id: Option<String>,
    /// Target gateway (`local`, `igw-...`), if any.
    pub gateway_id: Option<String>,
    /// `active` or `blackhole` (the target is gone).
    pub state: String,
}

/// A route table with its routes and associations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteTable {
    /// `rtb-...`.
    pub id: String,
    /// Its VPC.
    pub vpc_id: String,
    /// Its routes.
    pub routes: Vec<Route>,
    /// Subnets explicitly associated with it.
    pub subnet_ids: Vec<String>,
    /// Whether it is its VPC's main table.
    pub main: bool,
}

/// An EC2 client for one region and one set of credentials.
pub struct Ec2 {
    http: CloudHttp,
    uri: Uri,
    host: String,
    path: String,
    region: String,
    creds: Credentials,
}

impl Ec2 {
    /// A client of `endpoint` (`https://ec2.<region>.amazonaws.com` or an override).
    pub fn new(
        http: CloudHttp,
        endpoint: &str,
        region: &str,
        creds: Credentials,
    ) -> Result<Self, CloudError> {
        let bad = |why: &str| CloudError::Config(format!("bad EC2 endpoint {endpoint:?}: {why}"));
        let uri: Uri = endpoint.parse().map_err(|e| bad(&format!("{e}")))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
            return Err(bad("it must start with http:// or https://"));
        }
        let host = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| bad("no host"))?;
        let path = match uri.path() {
            "" => "/".to_string(),
            p => p.to_string(),
        };
        Ok(Ec2 {
            http,
            uri,
            host,
            path,
            region: region.to_string(),
            creds,
        })
    }

    /// The endpoint in use (for log lines).
    pub fn endpoint(&self) -> String {
        self.uri.to_string()
    }

    async fn call_once(
        &self,
        action: &str,
        params: &[(String, String)],
    ) -> Result<String, CloudError> {
        let call = format!("ec2 {action}");
        let mut body = format!("Action={}&Version={API_VERSION}", uri_encode(action));
        for (k, v) in params {
            body.push('&');
            body.push_str(&uri_encode(k));
            body.push('=');
            body.push_str(&uri_encode(v));
        }
        let date = AmzDate::now();
        let mut headers = vec![
            (
                "Content-Type".to_string(),
                "application/x-www-form-urlencoded; charset=utf-8".to_string(),
            ),
            ("Host".to_string(), self.host.clone()),
            ("X-Amz-Date".to_string(), date.timestamp.clone()),
        ];
        if let Some(t) = &self.creds.session_token {
            headers.push(("X-Amz-Security-Token".to_string(), t.expose().to_string()));
        }
        let auth = authorization(
            &self.creds,
            &Scope {
                region: &self.region,
                service: "ec2",
                date: &date,
            },
            &SignRequest {
                method: "POST",
                path: &self.path,
                query: &[],
                headers: &headers,
                payload: body.as_bytes(),
            },
        );
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone());
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .header("Authorization", auth)
            .body(Bytes::from(body))
            .map_err(|e| CloudError::Config(format!("{call}: building the request: {e}")))?;
        let r = self.http.send(&call, req).await?;
        let text = r.text();
        if r.status.is_success() {
            return Ok(text);
        }
        let (code, message) = parse_error(&text).unwrap_or_else(|| {
            (
                r.status.canonical_reason().unwrap_or("error").to_string(),
                shorten(text.trim()),
            )
        });
        Err(CloudError::Api {
            call,
            status: r.status.as_u16(),
            code,
            message,
        })
    }

    /// Calls `action` with `params`, retrying throttling, 5xx and transport errors.
    pub async fn call(
        &self,
        action: &str,
        params: &[(String, String)],
    ) -> Result<String, CloudError> {
        retry(&format!("ec2 {action}"), ATTEMPTS, || {
            self.call_once(action, params)
        })
        .await
    }

    /// The network interfaces of instance `id`.
    pub async fn instance_enis(&self, id: &str) -> Result<Vec<Eni>, CloudError> {
        let body = self
            .call("DescribeInstances", &[p("InstanceId.1", id)])
            .await?;
        parse_instance_enis(&body, id).map_err(|message| CloudError::Invalid {
            call: "ec2 DescribeInstances".into(),
            message,
        })
    }

    /// Turns off the source/destination check, so the ENI may carry pod addresses.
    pub async fn disable_source_dest_check(&self, eni: &str) -> Result<(), CloudError> {
        self.call(
            "ModifyNetworkInterfaceAttribute",
            &[
                p("NetworkInterfaceId", eni),
                p("SourceDestCheck.Value", "false"),
            ],
        )
        .await
        .map(drop)
    }

    /// Route tables by id and/or filters (`Filter.N.Name` / `Filter.N.Value.1`), all pages.
    pub async fn route_tables(
        &self,
        ids: &[&str],
        filters: &[(&str, &str)],
    ) -> Result<Vec<RouteTable>, CloudError> {
        let mut params = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            params.push(p(&format!("RouteTableId.{}", i + 1), id));
        }
        for (i, (name, value)) in filters.iter().enumerate() {
            params.push(p(&format!("Filter.{}.Name", i + 1), name));
            params.push(p(&format!("Filter.{}.Value.1", i + 1), value));
        }
        let mut tables = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut page = params.clone();
            if let Some(t) = &next {
                page.push(p("NextToken", t));
            }
            let body = self.call("DescribeRouteTables", &page).await?;
            let (mut found, token) =
                parse_route_tables(&body).map_err(|message| CloudError::Invalid {
                    call: "ec2 DescribeRouteTables".into(),
                    message,
                })?;
            tables.append(&mut found);
            match token {
                Some(t) if next.as_ref() != Some(&t) => next = Some(t),
                _ => return Ok(tables),
            }
        }
    }

    /// Deletes the route to `cidr` in `table`.
    pub async fn delete_route(&self, table: &str, cidr: &str) -> Result<(), CloudError> {
        self.call(
            "DeleteRoute",
            &[p("RouteTableId", table), p("DestinationCidrBlock", cidr)],
        )
        .await
        .map(drop)
    }

    /// Creates the route `cidr` -> `eni` in `table`.
    pub async fn create_route(&self, table: &str, cidr: &str, eni: &str) -> Result<(), CloudError> {
        self.call(
            "CreateRoute",
            &[
                p("RouteTableId", table),
                p("DestinationCidrBlock", cidr),
                p("NetworkInterfaceId", eni),
            ],
        )
        .await
        .map(drop)
    }

    /// Points the existing route to `cidr` in `table` at `eni`.
    pub async fn replace_route(
        &self,
        table: &str,
        cidr: &str,
        eni: &str,
    ) -> Result<(), CloudError> {
        self.call(
            "ReplaceRoute",
            &[
                p("RouteTableId", table),
                p("DestinationCidrBlock", cidr),
                p("NetworkInterfaceId", eni),
            ],
        )
        .await
        .map(drop)
    }
}

fn p(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

fn shorten(s: &str) -> String {
    const MAX: usize = 300;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

type Node<'a, 'i> = roxmltree::Node<'a, 'i>;

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn text(n: Node<'_, '_>, name: &str) -> Option<String> {
    child(n, name)
        .and_then(|c| c.text())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

fn items<'a, 'i>(n: Node<'a, 'i>, set: &str) -> Vec<Node<'a, 'i>> {
    child(n, set)
        .map(|s| {
            s.children()
                .filter(|c| c.is_element() && c.tag_name().name() == "item")
                .collect()
        })
        .unwrap_or_default()
}

fn document(body: &str) -> Result<roxmltree::Document<'_>, String> {
    roxmltree::Document::parse(body).map_err(|e| format!("the answer is not XML: {e}"))
}

/// The `(Code, Message)` of an EC2 error answer (`<Response><Errors><Error>...`, or any XML with
/// an `Error` element holding a `Code`).
pub fn parse_error(body: &str) -> Option<(String, String)> {
    let doc = roxmltree::Document::parse(body).ok()?;
    let err = doc.descendants().find(|n| {
        n.is_element() && n.tag_name().name() == "Error" && child(*n, "Code").is_some()
    })?;
    let code = text(err, "Code")?;
    let message = text(err, "Message")
        .or_else(|| text(err, "message"))
        .unwrap_or_default();
    Some((code, message))
}

/// The ENIs of instance `id` in a DescribeInstances answer.
pub fn parse_instance_enis(body: &str, id: &str) -> Result<Vec<Eni>, String> {
    let doc = document(body)?;
    let root = doc.root_element();
    let instance = items(root, "reservationSet")
        .into_iter()
        .flat_map(|r| items(r, "instancesSet"))
        .find(|i| text(*i, "instanceId").as_deref() == Some(id))
        .ok_or_else(|| format!("instance {id} not found"))?;
    let mut enis = Vec::new();
    for n in items(instance, "networkInterfaceSet") {
        let Some(eni_id) = text(n, "networkInterfaceId") else {
            continue;
        };
        let mut ips: Vec<Ipv4Addr> = items(n, "privateIpAddressesSet")
            .into_iter()
            .filter_map(|a| text(a, "privateIpAddress"))
            .filter_map(|a| a.parse().ok())
            .collect();
        if let Some(primary) = text(n, "privateIpAddress").and_then(|a| a.parse().ok()) {
            if !ips.contains(&primary) {
                ips.insert(0, primary);
            }
        }
        enis.push(Eni {
            id: eni_id,
            subnet_id: text(n, "subnetId").unwrap_or_default(),
            vpc_id: text(n, "vpcId").unwrap_or_default(),
            private_ips: ips,
        });
    }
    Ok(enis)
}

/// The route tables of a DescribeRouteTables answer, and its `nextToken`.
pub fn parse_route_tables(body: &str) -> Result<(Vec<RouteTable>, Option<String>), String> {
    let doc = document(body)?;
    let root = doc.root_element();
    let mut tables = Vec::new();
    for t in items(root, "routeTableSet") {
        let id = text(t, "routeTableId").ok_or("a route table without routeTableId")?;
        let routes = items(t, "routeSet")
            .into_iter()
            .map(|r| Route {
                destination: text(r, "destinationCidrBlock"),
                network_interface_id: text(r, "networkInterfaceId"),
                instance_id: text(r, "instanceId"),
                gateway_id: text(r, "gatewayId"),
                state: text(r, "state").unwrap_or_else(|| "active".into()),
            })
            .collect();
        let mut subnet_ids = Vec::new();
        let mut main = false;
        for a in items(t, "associationSet") {
            if text(a, "main").as_deref() == Some("true") {
                main = true;
            }
            if let Some(s) = text(a, "subnetId") {
                subnet_ids.push(s);
            }
        }
        tables.push(RouteTable {
            id,
            vpc_id: text(t, "vpcId").unwrap_or_default(),
            routes,
            subnet_ids,
            main,
        });
    }
    Ok((tables, text(root, "nextToken")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSTANCES: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>8f7724cf-496f-496e-8fe3-example</requestId>
  <reservationSet>
    <item>
      <reservationId>r-1234567890abcdef0</reservationId>
      <instancesSet>
        <item>
          <instanceId>i-1234567890abcdef0</instanceId>
          <privateIpAddress>10.0.0.12</privateIpAddress>
          <networkInterfaceSet>
            <item>
              <networkInterfaceId>eni-0aaa</networkInterfaceId>
              <subnetId>subnet-1</subnetId>
              <vpcId>vpc-1</vpcId>
              <privateIpAddress>10.0.0.12</privateIpAddress>
              <sourceDestCheck>true</sourceDestCheck>
              <privateIpAddressesSet>
                <item><privateIpAddress>10.0.0.12</privateIpAddress><primary>true</primary></item>
                <item><privateIpAddress>10.0.0.13</privateIpAddress><primary>false</primary></item>
              </privateIpAddressesSet>
            </item>
            <item>
              <networkInterfaceId>eni-0bbb</networkInterfaceId>
              <subnetId>subnet-2</subnetId>
              <vpcId>vpc-1</vpcId>
              <privateIpAddress>10.0.1.7</privateIpAddress>
            </item>
          </networkInterfaceSet>
        </item>
      </instancesSet>
    </item>
  </reservationSet>
</DescribeInstancesResponse>"#;

    #[test]
    fn instances() {
        let enis = parse_instance_enis(INSTANCES, "i-1234567890abcdef0").unwrap();
        assert_eq!(enis.len(), 2);
        assert_eq!(enis[0].id, "eni-0aaa");
        assert_eq!(enis[0].subnet_id, "subnet-1");
        assert_eq!(enis[0].vpc_id, "vpc-1");
        assert_eq!(
            enis[0].private_ips,
            vec![Ipv4Addr::new(10, 0, 0, 12), Ipv4Addr::new(10, 0, 0, 13)]
        );
        assert_eq!(enis[1].private_ips, vec![Ipv4Addr::new(10, 0, 1, 7)]);
        let e = parse_instance_enis(INSTANCES, "i-other").unwrap_err();
        assert!(e.contains("i-other not found"), "{e}");
        assert!(parse_instance_enis("not xml", "i-1").is_err());
    }

    #[test]
    fn route_tables() {
        let body = r#"<DescribeRouteTablesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>x</requestId>
  <routeTableSet>
    <item>
      <routeTableId>rtb-1</routeTableId>
      <vpcId>vpc-1</vpcId>
      <routeSet>
        <item><destinationCidrBlock>10.0.0.0/16</destinationCidrBlock><gatewayId>local</gatewayId><state>active</state><origin>CreateRouteTable</origin></item>
        <item><destinationCidrBlock>10.244.3.0/24</destinationCidrBlock><networkInterfaceId>eni-9</networkInterfaceId><state>blackhole</state></item>
        <item><destinationIpv6CidrBlock>::/0</destinationIpv6CidrBlock><gatewayId>igw-1</gatewayId><state>active</state></item>
      </routeSet>
      <associationSet>
        <item><routeTableAssociationId>rtbassoc-1</routeTableAssociationId><main>false</main><subnetId>subnet-1</subnetId></item>
      </associationSet>
    </item>
    <item>
      <routeTableId>rtb-main</routeTableId>
      <vpcId>vpc-1</vpcId>
      <routeSet/>
      <associationSet><item><main>true</main></item></associationSet>
    </item>
  </routeTableSet>
  <nextToken>page2</nextToken>
</DescribeRouteTablesResponse>"#;
        let (t, next) = parse_route_tables(body).unwrap();
        assert_eq!(next.as_deref(), Some("page2"));
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].id, "rtb-1");
        assert_eq!(t[0].subnet_ids, vec!["subnet-1".to_string()]);
        assert!(!t[0].main && t[1].main);
        assert_eq!(t[0].routes.len(), 3);
        assert_eq!(t[0].routes[0].gateway_id.as_deref(), Some("local"));
        assert_eq!(t[0].routes[1].state, "blackhole");
        assert_eq!(
            t[0].routes[1].network_interface_id.as_deref(),
            Some("eni-9")
        );
        assert_eq!(t[0].routes[2].destination, None);
        assert!(t[1].routes.is_empty());
    }

    #[test]
    fn errors() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>InvalidRoute.NotFound</Code><Message>no route with destination-cidr-block 10.244.1.0/24 in route table rtb-1</Message></Error></Errors><RequestID>abc</RequestID></Response>"#;
        assert_eq!(
            parse_error(body),
            Some((
                "InvalidRoute.NotFound".into(),
                "no route with destination-cidr-block 10.244.1.0/24 in route table rtb-1".into()
            ))
        );
        let iam = r#"<ErrorResponse><Error><Type>Sender</Type><Code>AuthFailure</Code><Message>AWS was not able to validate the provided access credentials</Message></Error></ErrorResponse>"#;
        assert_eq!(parse_error(iam).unwrap().0, "AuthFailure");
        assert_eq!(parse_error("<html>bad gateway</html>"), None);
        assert_eq!(parse_error("plain"), None);
    }

    #[test]
    fn endpoints() {
        let http = CloudHttp::new().unwrap();
        let c = Credentials {
            access_key_id: "AKID".into(),
            secret_access_key: crate::backend::cloud::Secret::new("s"),
            session_token: None,
        };
        let e = Ec2::new(
            http.clone(),
            "http://192.168.100.250:5000",
            "us-east-1",
            c.clone(),
        )
        .unwrap();
        assert_eq!(e.host, "192.168.100.250:5000");
        assert_eq!(e.path, "/");
        let e = Ec2::new(
            http.clone(),
            "https://ec2.eu-west-1.amazonaws.com/",
            "eu-west-1",
            c.clone(),
        )
        .unwrap();
        assert_eq!(e.host, "ec2.eu-west-1.amazonaws.com");
        assert!(Ec2::new(http, "ec2.example.com", "x", c).is_err());
    }
}

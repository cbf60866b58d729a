//! `tencent-vpc` end to end: real flanneld processes in namespace hosts against the test-bed's
//! fake Tencent Cloud (metadata reached as `metadata.tencentyun.com` through
//! `/etc/netns/<ns>/hosts`, VPC API 3.0 checking TC3 signatures). The fake itself is driven
//! with the provider's Python SDK (`tencentcloud-sdk-python`), so it speaks the real protocol.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::{json, Value};
use testbed::cloud_tencent::{cloud_host, FakeTencent, NetnsHosts, ROUTE_TABLE_ID};
use testbed::{wait_for, Cluster, Flanneld, NetNs};

const T: Duration = Duration::from_secs(60);
const CLOUD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 250);
const KEY_ID: &str = "AKIDfrsTestKeyId0123456789";
const KEY_SECRET: &str = "frsTopSecretKey-never-logged-42";

/// Calls `action` with the official Python SDK from inside `ns`; returns the response JSON, or
/// `{"Error":{"Code":..,"Message":..}}` when the SDK raised.
fn sdk(ns: &NetNs, fake: &FakeTencent, secret: &str, action: &str, params: Value) -> Value {
    const SCRIPT: &str = r#"
import json, sys
from tencentcloud.common import credential
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException
from tencentcloud.vpc.v20170312 import vpc_client, models
endpoint, sid, skey, action, params = sys.argv[1:6]
profile = ClientProfile(httpProfile=HttpProfile(protocol="http", endpoint=endpoint))
client = vpc_client.VpcClient(credential.Credential(sid, skey), "ap-guangzhou", profile)
req = getattr(models, action + "Request")()
req.from_json_string(params)
try:
    print(getattr(client, action)(req).to_json_string())
except TencentCloudSDKException as e:
    print(json.dumps({"Error": {"Code": e.code, "Message": e.message}}))
"#;
    let out = ns.exec(
        "python3",
        &[
            "-c",
            SCRIPT,
            &fake.api_authority(),
            KEY_ID,
            secret,
            action,
            &params.to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "python SDK {action} failed (is tencentcloud-sdk-python installed? scripts/install-deps.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "SDK output not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The route table as the SDK reads it back.
fn sdk_routes(ns: &NetNs, fake: &FakeTencent) -> Vec<Value> {
    let v = sdk(
        ns,
        fake,
        KEY_SECRET,
        "DescribeRouteTables",
        json!({"Filters": [{"Name": "vpc-id", "Values": [testbed::cloud_tencent::VPC_ID]}]}),
    );
    assert_eq!(v["TotalCount"], 1, "{v}");
    v["RouteTableSet"][0]["RouteSet"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The user route for `cidr`, as the SDK sees it.
fn sdk_route(ns: &NetNs, fake: &FakeTencent, cidr: &str) -> Value {
    let routes: Vec<Value> = sdk_routes(ns, fake)
        .into_iter()
        .filter(|r| r["DestinationCidrBlock"] == cidr)
        .collect();
    assert_eq!(routes.len(), 1, "routes for {cidr}: {routes:?}");
    routes[0].clone()
}

/// A cluster whose hosts resolve `metadata.tencentyun.com` to the fake.
struct World {
    fake: FakeTencent,
    _hosts_files: Vec<NetnsHosts>,
    cloud: NetNs,
    c: Cluster,
}

fn world(n: usize, config: &str) -> World {
    let c = Cluster::new(n);
    let cloud = cloud_host(&c.underlay, CLOUD_IP);
    let fake = FakeTencent::start(&cloud, CLOUD_IP, KEY_ID, KEY_SECRET);
    let hosts_files = c
        .hosts
        .iter()
        .map(|h| NetnsHosts::write(&h.ns, CLOUD_IP, &["metadata.tencentyun.com"]))
        .collect();
    c.put_config(None, config);
    World {
        fake,
        _hosts_files: hosts_files,
        cloud,
        c,
    }
}

impl World {
    fn start(&mut self, i: usize, extra_env: &[(&str, &str)]) {
        let ep = self.fake.endpoint();
        let mut env: Vec<(&str, &str)> = vec![("TENCENTCLOUD_VPC_ENDPOINT", ep.as_str())];
        env.extend_from_slice(extra_env);
        self.c.start_flanneld_env(i, &[], &env);
    }

    fn actions_since(&self, from: usize) -> Vec<String> {
        self.fake.calls()[from..]
            .iter()
            .map(|c| match &c.error {
                Some(e) => format!("{}!{e}", c.action),
                None => c.action.clone(),
            })
            .collect()
    }
}

#[test]
fn tencent_vpc_programs_the_vpc_route_table() {
    let config = format!(
        r#"{{"Network":"10.46.0.0/16","Backend":{{"Type":"tencent-vpc","AccessKeyID":"{KEY_ID}","AccessKeySecret":"{KEY_SECRET}"}}}}"#
    );
    let mut w = world(2, &config);
    w.start(0, &[]);
    w.start(1, &[]);

    for i in 0..2 {
        let ip = w.c.hosts[i].ip.to_string();
        // The lease as Go writes it for tencent-vpc: no BackendType/BackendData.
        let lease = w.c.etcd.get(&w.c.lease_key(i)).expect("lease");
        assert_eq!(lease, format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null}}"#));
        assert_eq!(w.c.env_var(i, "FLANNEL_MTU"), "1500");
        // The route, read back through the provider's SDK.
        let r = sdk_route(&w.cloud, &w.fake, &w.c.subnet(i).to_string());
        assert_eq!(r["GatewayType"], "NORMAL_CVM");
        assert_eq!(r["GatewayId"], ip);
        assert_eq!(r["Enabled"], true);
        assert_eq!(r["RouteType"], "USER");
        assert_eq!(r["RouteTableId"], ROUTE_TABLE_ID);
        let log = w.c.flanneld(i).log();
        assert!(
            log.contains(&format!("tencent-vpc: created route {}", w.c.subnet(i))),
            "{log}"
        );
        assert!(!log.contains(KEY_SECRET), "secret in the log:\n{log}");
    }
    // Every call was signed with the configured key; the VPC's local route is untouched.
    assert!(w.fake.calls().iter().all(|c| c.secret_id == KEY_ID));
    assert!(w
        .fake
        .routes()
        .iter()
        .any(|r| r.route_type == "NETD" && r.cidr == testbed::cloud_tencent::VPC_CIDR));

    // Restart: the route is kept as it is (same RouteId), nothing created or deleted.
    let s0 = w.c.subnet(0).to_string();
    let id0 = sdk_route(&w.cloud, &w.fake, &s0)["RouteId"].clone();
    w.c.flanneld(0).stop();
    let mark = w.fake.calls().len();
    w.start(0, &[]);
    assert_eq!(w.actions_since(mark), ["DescribeRouteTables"]);
    assert_eq!(sdk_route(&w.cloud, &w.fake, &s0)["RouteId"], id0);
    w.c.flanneld(0)
        .wait_log("already present (RouteId", Duration::from_secs(5));

    // A disabled route (DisableRoutes through the SDK) is replaced by an enabled one; the
    // first CreateRoutes is throttled and retried with backoff.
    w.c.flanneld(0).stop();
    let r = sdk(
        &w.cloud,
        &w.fake,
        KEY_SECRET,
        "DisableRoutes",
        json!({"RouteTableId": ROUTE_TABLE_ID, "RouteIds": [id0]}),
    );
    assert!(r.get("Error").is_none(), "{r}");
    assert_eq!(sdk_route(&w.cloud, &w.fake, &s0)["Enabled"], false);
    w.fake.fail_next(
        "CreateRoutes",
        "RequestLimitExceeded",
        "Your current request times equals to `21` in a second, which exceeds the frequency limit `20` for a second.",
    );
    let mark = w.fake.calls().len();
    w.start(0, &[]);
    assert_eq!(
        w.actions_since(mark),
        [
            "DescribeRouteTables",
            "DeleteRoutes",
            "CreateRoutes!RequestLimitExceeded",
            "CreateRoutes"
        ]
    );
    assert_eq!(
        w.fake.calls()[mark + 1].params,
        json!({"RouteTableId": ROUTE_TABLE_ID, "Routes": [{"RouteId": id0}]})
    );
    let r = sdk_route(&w.cloud, &w.fake, &s0);
    assert_eq!(r["Enabled"], true);
    assert_ne!(r["RouteId"], id0);
    let log = w.c.flanneld(0).log();
    assert!(log.contains("(disabled)"), "{log}");
    assert!(
        log.contains("tencent-vpc CreateRoutes failed (attempt 1/6), retrying in 1s: tencent-vpc CreateRoutes: RequestLimitExceeded: Your current request times"),
        "{log}"
    );

    // A stale route for host 2's subnet (another gateway, made through the SDK while its
    // flanneld was down) is replaced.
    let s1 = w.c.subnet(1).to_string();
    w.c.flanneld(1).stop();
    let old = sdk_route(&w.cloud, &w.fake, &s1);
    let r = sdk(
        &w.cloud,
        &w.fake,
        KEY_SECRET,
        "DeleteRoutes",
        json!({"RouteTableId": ROUTE_TABLE_ID, "Routes": [{"RouteId": old["RouteId"]}]}),
    );
    assert!(r.get("Error").is_none(), "{r}");
    let r = sdk(
        &w.cloud,
        &w.fake,
        KEY_SECRET,
        "CreateRoutes",
        json!({"RouteTableId": ROUTE_TABLE_ID, "Routes": [{"DestinationCidrBlock": s1, "GatewayType": "NORMAL_CVM", "GatewayId": "192.168.100.99"}]}),
    );
    assert!(r.get("Error").is_none(), "{r}");
    w.start(1, &[]);
    let r = sdk_route(&w.cloud, &w.fake, &s1);
    assert_eq!(r["GatewayId"], w.c.hosts[1].ip.to_string());
    let log = w.c.flanneld(1).log();
    assert!(
        log.contains("(stale: via NORMAL_CVM 192.168.100.99)"),
        "{log}"
    );
}

#[test]
fn tencent_vpc_errors_are_clear_and_keys_stay_secret() {
    let mut w = world(
        1,
        r#"{"Network":"10.47.0.0/16","Backend":{"Type":"tencent-vpc"}}"#,
    );
    // The fake checks signatures for real: the SDK with a wrong key is refused.
    let r = sdk(
        &w.cloud,
        &w.fake,
        "wrong-secret",
        "DescribeRouteTables",
        json!({}),
    );
    assert_eq!(r["Error"]["Code"], "AuthFailure.SignatureFailure", "{r}");

    let args = [
        format!("--etcd-endpoints={}", w.c.etcd.url()),
        format!("--subnet-file={}", w.c.hosts[0].subnet_file.display()),
    ];
    let ep = w.fake.endpoint();
    // No keys anywhere: a clear error before any lease is taken.
    let mut f = Flanneld::start_env(
        &w.c.hosts[0].ns,
        w.c.dir.path(),
        &args,
        &[("TENCENTCLOUD_VPC_ENDPOINT", &ep)],
    );
    assert!(!f.wait_exit(T).success());
    assert!(
        f.log()
            .contains("ACCESS_KEY_ID and ACCESS_KEY_SECRET must be provided!"),
        "{}",
        f.log()
    );
    assert_eq!(w.fake.metadata_hits(), 0);

    // A wrong secret from the environment: the API's code and message name the failed call,
    // and the secret appears nowhere in the log.
    let wrong = "wrong-secret-must-not-appear-9f8e7d";
    let mut f = Flanneld::start_env(
        &w.c.hosts[0].ns,
        w.c.dir.path(),
        &args,
        &[
            ("TENCENTCLOUD_VPC_ENDPOINT", &ep),
            ("ACCESS_KEY_ID", KEY_ID),
            ("ACCESS_KEY_SECRET", wrong),
        ],
    );
    assert!(!f.wait_exit(T).success());
    let log = f.log();
    assert!(
        log.contains("tencent-vpc DescribeRouteTables: AuthFailure.SignatureFailure: The provided credentials could not be validated. Please check your signature is correct. (RequestId frs-req-"),
        "{log}"
    );
    assert!(!log.contains(wrong), "secret in the log:\n{log}");
    assert!(w.fake.metadata_hits() > 0);

    // The right keys from the environment work.
    w.start(
        0,
        &[("ACCESS_KEY_ID", KEY_ID), ("ACCESS_KEY_SECRET", KEY_SECRET)],
    );
    let s = w.c.subnet(0).to_string();
    wait_for(Duration::from_secs(5), "the route", || {
        w.fake.routes().iter().any(|r| r.cidr == s).then_some(())
    });
    assert!(!w.c.flanneld(0).log().contains(KEY_SECRET));
}

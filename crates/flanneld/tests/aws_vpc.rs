//! aws-vpc against moto in server mode (signatures checked) and a metadata service per host:
//! each host routes its own subnet to its own ENI in the right route tables, with SourceDestCheck
//! off, blackholes inside Network deleted and everything else untouched; `RouteTableID` as a
//! string and as a list, the subnet's association and the VPC main table; IMDSv1 on one host and
//! required IMDSv2 tokens plus instance-profile credentials on the other; a wrong secret is
//! rejected by moto and the error says so.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{json, Value};
use testbed::cloud_aws::{ImdsConfig, ImdsServer, Moto, Tokens};
use testbed::{Cluster, Flanneld};

const T: Duration = Duration::from_secs(60);
const REGION: &str = "eu-west-3";
const MOTO_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 250);
const NETWORK: &str = "10.50.0.0/16";
const INSIDE_BLACKHOLE: &str = "10.50.99.0/24";
const OUTSIDE_BLACKHOLE: &str = "10.99.0.0/24";
const INSIDE_ACTIVE: &str = "10.50.201.0/24";
const OUTSIDE_ACTIVE: &str = "10.60.0.0/24";

/// The cloud of one test: moto with the world built, the ids of that world.
struct World {
    moto: Moto,
    state: Value,
}

impl World {
    fn new(c: &Cluster) -> Self {
        let mut moto = Moto::start(&c.underlay, MOTO_IP, REGION);
        let hosts: Vec<String> = c.hosts.iter().map(|h| h.ip.to_string()).collect();
        let state = moto.setup(&json!({
            "hosts": hosts,
            "vpc_cidr": "192.168.0.0/16",
            "subnet_cidr": "192.168.100.0/24",
            "other_ip": "192.168.100.200",
            "doomed_ip": "192.168.100.201",
            "inside_blackhole": INSIDE_BLACKHOLE,
            "outside_blackhole": OUTSIDE_BLACKHOLE,
            "inside_active": INSIDE_ACTIVE,
            "outside_active": OUTSIDE_ACTIVE,
        }));
        World { moto, state }
    }

    fn s(&self, path: &[&str]) -> String {
        let mut v = &self.state;
        for p in path {
            v = &v[*p];
        }
        v.as_str()
            .unwrap_or_else(|| panic!("{path:?} in {}", self.state))
            .to_string()
    }

    fn table(&self, name: &str) -> String {
        self.s(&["tables", name])
    }

    fn instance(&self, i: usize) -> (String, String) {
        let v = &self.state["instances"][i];
        (
            v["instance_id"].as_str().expect("instance id").to_string(),
            v["eni"].as_str().expect("eni").to_string(),
        )
    }

    fn key(&self, who: &str) -> (String, String) {
        (
            self.s(&[who, "AccessKeyId"]),
            self.s(&[who, "SecretAccessKey"]),
        )
    }
}

fn route(dest: &str, target: &str, state: &str) -> Value {
    json!({"dest": dest, "target": target, "state": state})
}

/// A table's routes as read back, sorted by destination.
fn routes(dump: &Value, table: &str) -> Vec<Value> {
    dump["tables"][table]
        .as_array()
        .unwrap_or_else(|| panic!("no table {table} in {dump}"))
        .clone()
}

/// What a table of the world holds before flanneld touched it.
fn initial_routes(w: &World) -> Vec<Value> {
    let other = w.s(&["other_eni"]);
    let doomed = w.s(&["doomed_eni"]);
    let mut r = vec![
        route("0.0.0.0/0", &w.s(&["igw"]), "active"),
        route(INSIDE_ACTIVE, &other, "active"),
        route(INSIDE_BLACKHOLE, &doomed, "blackhole"),
        route(OUTSIDE_ACTIVE, &other, "active"),
        route(OUTSIDE_BLACKHOLE, &doomed, "blackhole"),
        route("192.168.0.0/16", "local", "active"),
    ];
    sort(&mut r);
    r
}

/// What a table routed by both hosts holds: the inside blackhole gone, the subnets added.
fn routed(w: &World, subnets: &[(String, String)]) -> Vec<Value> {
    let mut r: Vec<Value> = initial_routes(w)
        .into_iter()
        .filter(|r| r["dest"] != INSIDE_BLACKHOLE)
        .collect();
    for (subnet, eni) in subnets {
        r.push(route(subnet, eni, "active"));
    }
    sort(&mut r);
    r
}

fn sort(r: &mut [Value]) {
    r.sort_by(|a, b| a["dest"].as_str().cmp(&b["dest"].as_str()));
}

fn start(c: &mut Cluster, i: usize, env: &[(&str, &str)]) -> Flanneld {
    let h = &c.hosts[i];
    let args = vec![
        format!("--etcd-endpoints={}", c.etcd.url()),
        format!("--subnet-file={}", h.subnet_file.display()),
    ];
    let _ = std::fs::remove_file(&h.subnet_file);
    Flanneld::start_env(&h.ns, c.dir.path(), &args, env)
}

fn stop_all(c: &mut Cluster) {
    for h in &mut c.hosts {
        if let Some(mut f) = h.flanneld.take() {
            assert!(f.stop().success(), "flanneld must exit 0 on SIGTERM");
        }
    }
}

/// Both hosts' flanneld started at once (they race for the same blackholes), then waited for.
fn start_both(c: &mut Cluster, envs: [&[(&str, &str)]; 2]) {
    let mut fs = vec![start(c, 0, envs[0]), start(c, 1, envs[1])];
    for (i, f) in fs.iter_mut().enumerate() {
        let path = c.hosts[i].subnet_file.clone();
        f.wait_subnet_env(&path, T);
        f.wait_log(" routed to eni-", T);
    }
    for (i, f) in fs.into_iter().enumerate() {
        c.hosts[i].flanneld = Some(f);
    }
}

fn log(c: &Cluster, i: usize) -> String {
    c.hosts[i].flanneld.as_ref().expect("flanneld").log()
}

fn eth0_mtu(c: &Cluster, i: usize) -> String {
    let out = c.hosts[i].ns.ip(&["-o", "link", "show", "eth0"]);
    out.split(" mtu ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("mtu")
        .to_string()
}

#[test]
fn each_host_routes_its_subnet_to_its_interface() {
    let mut c = Cluster::new(2);
    let w = World::new(&c);
    let (i1, eni1) = w.instance(0);
    let (i2, eni2) = w.instance(1);
    let initial = w.moto.dump();
    for t in ["main", "assoc", "b", "c"] {
        assert_eq!(
            routes(&initial, &w.table(t)),
            initial_routes(&w),
            "table {t}"
        );
    }

    // Host 1: an IMDSv1-only metadata service named by the environment, keys in the environment.
    let imds1 = ImdsServer::start(
        &c.hosts[0].ns,
        SocketAddr::from(([127, 0, 0, 1], 1338)),
        ImdsConfig {
            instance_id: i1.clone(),
            region: REGION.into(),
            placement_region: true,
            tokens: Tokens::Unsupported,
            role: None,
        },
    );
    // Host 2: the default link-local endpoint, IMDSv2 tokens required, credentials only from
    // the instance profile (moto checks the session token of these STS credentials).
    c.hosts[1]
        .ns
        .ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    let role_creds = &w.state["role"]["credentials"];
    let imds2 = ImdsServer::start(
        &c.hosts[1].ns,
        SocketAddr::from(([169, 254, 169, 254], 80)),
        ImdsConfig {
            instance_id: i2.clone(),
            region: REGION.into(),
            placement_region: false,
            tokens: Tokens::Required,
            role: Some((
                w.s(&["role", "name"]),
                json!({
                    "Code": "Success",
                    "LastUpdated": "2024-01-01T00:00:00Z",
                    "Type": "AWS-HMAC",
                    "AccessKeyId": role_creds["AccessKeyId"],
                    "SecretAccessKey": role_creds["SecretAccessKey"],
                    "Token": role_creds["Token"],
                    "Expiration": "2099-01-01T00:00:00Z",
                }),
            )),
        },
    );
    let (node_id, node_secret) = w.key("node");
    let ec2_url = w.moto.endpoint();
    let imds1_url = imds1.endpoint();
    let no_file = c.dir.join("no-credentials-file");
    let no_file = no_file.to_str().expect("path");
    let env1 = [
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds1_url.as_str()),
        ("AWS_ENDPOINT_URL_EC2", ec2_url.as_str()),
        ("AWS_ACCESS_KEY_ID", node_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", node_secret.as_str()),
    ];
    let env2 = [
        ("AWS_ENDPOINT_URL", ec2_url.as_str()),
        ("AWS_SHARED_CREDENTIALS_FILE", no_file),
    ];

    // Phase 1: no RouteTableID -> the table associated with the instances' subnet.
    c.put_config(
        None,
        &format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"aws-vpc"}}}}"#),
    );
    start_both(&mut c, [&env1, &env2]);
    let s1 = c.subnet(0).to_string();
    let s2 = c.subnet(1).to_string();
    let both = [(s1.clone(), eni1.clone()), (s2.clone(), eni2.clone())];
    let d = w.moto.dump();
    assert_eq!(routes(&d, &w.table("assoc")), routed(&w, &both));
    for t in ["main", "b", "c"] {
        assert_eq!(
            routes(&d, &w.table(t)),
            initial_routes(&w),
            "table {t} untouched"
        );
    }
    assert_eq!(d["enis"][&eni1]["source_dest_check"], false);
    assert_eq!(d["enis"][&eni2]["source_dest_check"], false);
    assert_eq!(d["enis"][w.s(&["other_eni"])]["source_dest_check"], true);
    // The lease and subnet.env as Go's cloud backends write them.
    for i in 0..2 {
        let raw = c.etcd.get(&c.lease_key(i)).expect("lease");
        assert_eq!(
            raw,
            format!(r#"{{"PublicIP":"{}","PublicIPv6":null}}"#, c.hosts[i].ip)
        );
        assert_eq!(c.env_var(i, "FLANNEL_MTU"), eth0_mtu(&c, i));
        assert_eq!(c.env_var(i, "FLANNEL_NETWORK"), NETWORK);
    }
    let (l1, l2) = (log(&c, 0), log(&c, 1));
    assert!(
        l1.contains("refused an IMDSv2 token (HTTP 405), falling back to IMDSv1"),
        "{l1}"
    );
    assert!(
        l1.contains("using credentials from AWS_ACCESS_KEY_ID"),
        "{l1}"
    );
    assert!(l1.contains(&format!("Found {eni1} that has 192.168.100.11 IP address.")));
    assert!(
        l1.contains(&format!("Found route table {}.", w.table("assoc"))),
        "{l1}"
    );
    assert!(
        l2.contains("using IMDSv2 session tokens of http://169.254.169.254"),
        "{l2}"
    );
    assert!(l2.contains("instance profile's role credentials"), "{l2}");
    assert!(l2.contains(&format!("instance {i2} in {REGION}")), "{l2}");
    // Both hosts raced for the same blackhole: one removed it (the other may have found it gone
    // already, or got InvalidRoute.NotFound, which is fine); none failed; outside ones stay.
    assert!(
        [&l1, &l2]
            .iter()
            .any(|l| l.contains(&format!("Removing blackhole route: {INSIDE_BLACKHOLE}"))),
        "{l1}\n{l2}"
    );
    for l in [&l1, &l2] {
        assert!(!l.contains("Error cleaning up blackhole routes"), "{l}");
        assert!(
            !l.contains(OUTSIDE_BLACKHOLE),
            "outside blackholes are not touched: {l}"
        );
    }
    // IMDS: host 1 asked for a token once, then read without; host 2 read only with tokens.
    let r1 = imds1.requests();
    assert_eq!(r1[0].method, "PUT");
    assert_eq!(r1[0].status, 405);
    assert!(
        r1[1..].iter().all(|r| r.method == "GET" && r.status == 200),
        "{r1:?}"
    );
    let r2 = imds2.requests();
    assert_eq!(
        (r2[0].method.as_str(), r2[0].status),
        ("PUT", 200),
        "{r2:?}"
    );
    assert!(
        r2.iter().filter(|r| r.method == "GET").all(|r| r.token),
        "{r2:?}"
    );
    assert!(r2.iter().all(|r| r.status != 401), "{r2:?}");
    assert!(r2
        .iter()
        .any(|r| r.path == "/latest/dynamic/instance-identity/document" && r.status == 200));
    assert!(r2.iter().any(|r| r
        .path
        .starts_with("/latest/meta-data/iam/security-credentials/")));

    // Nothing is removed at shutdown.
    stop_all(&mut c);
    let d = w.moto.dump();
    assert_eq!(routes(&d, &w.table("assoc")), routed(&w, &both));

    // Phase 2: RouteTableID as a string; host 1 now reads a shared credentials file + profile.
    let cred_file = c.dir.join("aws-credentials");
    std::fs::write(
        &cred_file,
        format!(
            "[default]\naws_access_key_id = AKIAWRONGDEFAULT\naws_secret_access_key = wrong\n\n[node]\naws_access_key_id = {node_id}\naws_secret_access_key = {node_secret}\n"
        ),
    )
    .expect("write credentials file");
    let cred_file = cred_file.to_str().expect("path").to_string();
    let env1_file = [
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds1_url.as_str()),
        ("AWS_ENDPOINT_URL_EC2", ec2_url.as_str()),
        ("AWS_SHARED_CREDENTIALS_FILE", cred_file.as_str()),
        ("AWS_PROFILE", "node"),
    ];
    let (tb, tc) = (w.table("b"), w.table("c"));
    c.put_config(
        None,
        &format!(
            r#"{{"Network":"{NETWORK}","Backend":{{"Type":"aws-vpc","RouteTableID":"{tb}"}}}}"#
        ),
    );
    start_both(&mut c, [&env1_file, &env2]);
    let d = w.moto.dump();
    assert_eq!(routes(&d, &tb), routed(&w, &both));
    assert_eq!(routes(&d, &w.table("assoc")), routed(&w, &both));
    assert_eq!(routes(&d, &tc), initial_routes(&w));
    assert_eq!(routes(&d, &w.table("main")), initial_routes(&w));
    let l1 = log(&c, 0);
    assert!(l1.contains("using credentials of profile \"node\""), "{l1}");
    assert!(
        l1.contains(&format!("route tables from RouteTableID: {tb}")),
        "{l1}"
    );
    stop_all(&mut c);

    // Phase 3: RouteTableID as a list. Someone pointed host 1's route elsewhere meanwhile: it
    // is replaced; host 2's route is already right and left alone.
    w.moto.call(
        "ec2",
        "replace_route",
        &json!({"RouteTableId": tb, "DestinationCidrBlock": s1,
                "NetworkInterfaceId": w.s(&["other_eni"])}),
    );
    c.put_config(
        None,
        &format!(
            r#"{{"Network":"{NETWORK}","Backend":{{"Type":"aws-vpc","RouteTableID":["{tb}","{tc}"]}}}}"#
        ),
    );
    start_both(&mut c, [&env1, &env2]);
    let d = w.moto.dump();
    assert_eq!(routes(&d, &tb), routed(&w, &both));
    assert_eq!(routes(&d, &tc), routed(&w, &both));
    assert_eq!(routes(&d, &w.table("main")), initial_routes(&w));
    let (l1, l2) = (log(&c, 0), log(&c, 1));
    assert!(
        l1.contains(&format!("Route replaced in table {tb}: {s1} - {eni1}.")),
        "{l1}"
    );
    assert!(
        l2.contains(&format!("route {s2} -> {eni2} already in table {tb}")),
        "{l2}"
    );
    assert!(
        l2.contains(&format!("Route added to table {tc}: {s2} - {eni2}.")),
        "{l2}"
    );
    stop_all(&mut c);

    // Phase 4: the subnet loses its association -> the VPC's main table.
    w.moto.call(
        "ec2",
        "disassociate_route_table",
        &json!({"AssociationId": w.s(&["assoc_id"])}),
    );
    c.put_config(
        None,
        &format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"aws-vpc"}}}}"#),
    );
    start_both(&mut c, [&env1, &env2]);
    let d = w.moto.dump();
    let main = w.table("main");
    assert_eq!(routes(&d, &main), routed(&w, &both));
    assert!(log(&c, 0).contains(&format!("Found route table {main}.")));

    // Secrets never reach a log.
    let role_secret = role_creds["SecretAccessKey"].as_str().expect("secret");
    let role_token = role_creds["Token"].as_str().expect("token");
    for i in 0..2 {
        let l = log(&c, i);
        for s in [
            node_secret.as_str(),
            role_secret,
            role_token,
            "frs-imds-token-",
        ] {
            assert!(!l.contains(s), "a secret is in host {i}'s log");
        }
    }
}

#[test]
fn errors_name_the_call_and_code_a_wrong_secret_is_rejected_and_outages_are_retried() {
    let mut c = Cluster::new(1);
    let w = World::new(&c);
    let (i1, eni1) = w.instance(0);
    let imds = ImdsServer::start(
        &c.hosts[0].ns,
        SocketAddr::from(([127, 0, 0, 1], 1338)),
        ImdsConfig {
            instance_id: i1,
            region: REGION.into(),
            placement_region: true,
            tokens: Tokens::Optional,
            role: None,
        },
    );
    c.put_config(
        None,
        &format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"aws-vpc"}}}}"#),
    );
    let (id, secret) = w.key("node");
    let ec2_url = w.moto.endpoint();
    let imds_url = imds.endpoint();
    let wrong = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    let env = |secret: &str| {
        vec![
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT".to_string(),
                imds_url.clone(),
            ),
            ("AWS_ENDPOINT_URL_EC2".to_string(), ec2_url.clone()),
            ("AWS_ACCESS_KEY_ID".to_string(), id.clone()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), secret.to_string()),
        ]
    };
    let run = |c: &mut Cluster, env: &[(String, String)]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        start(c, 0, &env)
    };

    // A wrong secret: moto recomputes the signature and refuses; flanneld stops with the call,
    // the cloud's code and message, and never prints the secret.
    let mut f = run(&mut c, &env(wrong));
    let st = f.wait_exit(T);
    assert_eq!(st.code(), Some(1), "flanneld must fail with a wrong secret");
    let l = f.log();
    assert!(
        l.contains("ec2 DescribeInstances: AuthFailure: AWS was not able to validate the provided access credentials (HTTP 401)"),
        "{l}"
    );
    assert!(
        !l.contains(wrong) && !l.contains(&secret),
        "a secret is in the log"
    );
    assert!(!c.hosts[0].subnet_file.exists());
    let d = w.moto.dump();
    assert_eq!(routes(&d, &w.table("assoc")), initial_routes(&w));
    assert_eq!(d["enis"][&eni1]["source_dest_check"], true);

    // A route table that does not exist: the error names the call and EC2's code.
    c.put_config(
        None,
        &format!(
            r#"{{"Network":"{NETWORK}","Backend":{{"Type":"aws-vpc","RouteTableID":["rtb-0000000000nothere"]}}}}"#
        ),
    );
    let mut f = run(&mut c, &env(&secret));
    assert!(!f.wait_exit(T).success());
    let l = f.log();
    assert!(
        l.contains("ec2 DescribeRouteTables: InvalidRouteTableID.NotFound"),
        "{l}"
    );

    // A bad option is refused before anything is leased or asked of the cloud.
    c.put_config(
        None,
        &format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"aws-vpc","RouteTableID":42}}}}"#),
    );
    imds.clear_requests();
    let mut f = run(&mut c, &env(&secret));
    assert!(!f.wait_exit(T).success());
    assert!(f
        .log()
        .contains("Unexpected RouteTableID type. Must be string or array of strings."));
    assert!(imds.requests().is_empty());

    // The right secret, same everything else, while EC2 is unreachable at first: the failing
    // call is retried with backoff, then accepted and routed.
    c.put_config(
        None,
        &format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"aws-vpc"}}}}"#),
    );
    w.moto.ns.ip(&["link", "set", "eth0", "down"]);
    let mut f = run(&mut c, &env(&secret));
    f.wait_log(
        "ec2 DescribeInstances failed (attempt 1/5), retrying in 1s",
        T,
    );
    w.moto.ns.ip(&["link", "set", "eth0", "up"]);
    let path = c.hosts[0].subnet_file.clone();
    f.wait_subnet_env(&path, T);
    let s1 = c.subnet(0).to_string();
    let d = w.moto.dump();
    let mut expect: Vec<Value> = initial_routes(&w)
        .into_iter()
        .filter(|r| r["dest"] != INSIDE_BLACKHOLE)
        .collect();
    expect.push(route(&s1, &eni1, "active"));
    sort(&mut expect);
    assert_eq!(routes(&d, &w.table("assoc")), expect);
    assert_eq!(d["enis"][&eni1]["source_dest_check"], false);
    // Optional tokens: the token was used.
    assert!(imds
        .requests()
        .iter()
        .filter(|r| r.method == "GET")
        .all(|r| r.token));
}

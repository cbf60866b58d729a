//! `gce` end to end: real flanneld processes in namespace hosts against the test-bed's fake
//! Google Cloud (metadata server via `GCE_METADATA_HOST`, Compute v1 via gcloud's
//! `CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE`). The fake is driven with Google's own Python
//! client (`google-api-python-client` with its bundled Compute v1 discovery document, and
//! `google-auth`'s Compute Engine credentials reading the token from the fake metadata
//! server), so its protocol is the real one.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;
use testbed::cloud_gce::{self, FakeGce, OTHER_INSTANCE, TOKEN};
use testbed::cloud_tencent::cloud_host;
use testbed::{Cluster, Flanneld, NetNs};

const T: Duration = Duration::from_secs(60);
const CLOUD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 251);

/// Runs Google's Python client inside `ns` with one command; returns its JSON output.
fn google(ns: &NetNs, fake: &FakeGce, args: &[&str]) -> Value {
    const SCRIPT: &str = r#"
import json, os, sys
os.environ["GCE_METADATA_HOST"] = sys.argv[1]
import httplib2, google_auth_httplib2
from google.auth import compute_engine
from google.auth.compute_engine import _metadata
from google.auth.transport import _http_client
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError
project = _metadata.get_project_id(_http_client.Request())
http = google_auth_httplib2.AuthorizedHttp(compute_engine.Credentials(), http=httplib2.Http())
svc = build("compute", "v1", http=http, static_discovery=True,
            client_options={"api_endpoint": sys.argv[2]})
zone = "us-central1-a"
def wait(op):
    while op["status"] != "DONE":
        op = svc.globalOperations().wait(project=project, operation=op["name"]).execute()
    return op
cmd = sys.argv[3:]
try:
    if cmd[0] == "route":
        out = svc.routes().get(project=project, route=cmd[1]).execute()
    elif cmd[0] == "links":
        out = {"network": svc.networks().get(project=project, network="default").execute()["selfLink"],
               "instance": svc.instances().get(project=project, zone=zone, instance=cmd[1]).execute()["selfLink"]}
    elif cmd[0] == "list":
        out = svc.routes().list(project=project).execute().get("items", [])
    elif cmd[0] == "repoint":
        name, hop = cmd[1], cmd[2]
        old = svc.routes().get(project=project, route=name).execute()
        wait(svc.routes().delete(project=project, route=name).execute())
        inst = svc.instances().get(project=project, zone=zone, instance=hop).execute()["selfLink"]
        body = {"name": name, "destRange": old["destRange"], "network": old["network"],
                "nextHopInstance": inst, "priority": 1000}
        out = wait(svc.routes().insert(project=project, body=body).execute())
    else:
        raise SystemExit("unknown command")
except HttpError as e:
    out = {"httpError": e.resp.status, "reason": e.error_details}
print(json.dumps(out))
"#;
    let mut argv = vec!["-c", SCRIPT];
    let mh = fake.metadata_host();
    let base = fake.compute_base();
    argv.push(&mh);
    argv.push(&base);
    argv.extend_from_slice(args);
    let out = ns.exec("python3", &argv);
    assert!(
        out.status.success(),
        "google-api-python-client {args:?} failed (installed? scripts/install-deps.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

struct World {
    fake: FakeGce,
    cloud: NetNs,
    c: Cluster,
}

fn world(n: usize, network: &str) -> World {
    let c = Cluster::new(n);
    let cloud = cloud_host(&c.underlay, CLOUD_IP);
    let fake = FakeGce::start(&cloud, CLOUD_IP);
    c.put_config(
        None,
        &format!(r#"{{"Network":"{network}","Backend":{{"Type":"gce"}}}}"#),
    );
    World { fake, cloud, c }
}

impl World {
    fn env(&self) -> [(&'static str, String); 2] {
        [
            ("GCE_METADATA_HOST", self.fake.metadata_host()),
            (
                "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE",
                self.fake.compute_base(),
            ),
        ]
    }

    fn start(&mut self, i: usize) {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.c.start_flanneld_env(i, &[], &env);
    }

    fn route_name(&self, i: usize) -> String {
        format!(
            "flannel-{}",
            self.c.subnet(i).to_string().replace(['.', '/'], "-")
        )
    }
}

#[test]
fn gce_routes_each_subnet_to_its_instance() {
    let mut w = world(2, "10.48.0.0/16");
    // A passing server error on the first routes.get is retried with backoff.
    w.fake
        .fail_next("routes.get", 503, "backendError", "Backend Error");
    w.start(0);
    w.start(1);

    for i in 0..2 {
        let ip = w.c.hosts[i].ip;
        let lease = w.c.etcd.get(&w.c.lease_key(i)).expect("lease");
        assert_eq!(lease, format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null}}"#));
        assert_eq!(w.c.env_var(i, "FLANNEL_MTU"), "1500");
        let name = w.route_name(i);
        assert_eq!(
            name,
            format!("flannel-10-48-{}-0-24", w.c.subnet(i).network().octets()[2])
        );
        // Read back through Google's client: the selfLinks it reports for the network and
        // this host's instance are exactly the route's.
        let links = google(&w.cloud, &w.fake, &["links", &cloud_gce::instance_name(ip)]);
        let r = google(&w.cloud, &w.fake, &["route", &name]);
        assert_eq!(r["name"], name.as_str());
        assert_eq!(r["destRange"], w.c.subnet(i).to_string());
        assert_eq!(r["network"], links["network"]);
        assert_eq!(r["nextHopInstance"], links["instance"]);
        assert_eq!(r["priority"], 1000);
        let log = w.c.flanneld(i).log();
        assert!(!log.contains(TOKEN), "token in the log:\n{log}");
        assert!(
            log.contains(&format!("gce: route {name} inserted")),
            "{log}"
        );
    }
    assert!(w.c.flanneld(0).log().contains(
        "gce routes.get failed (attempt 1/6), retrying in 1s: gce routes.get: backendError: Backend Error (HTTP 503)"
    ));
    assert_eq!(
        google(&w.cloud, &w.fake, &["list"])
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // Restart: the route is kept (same id), no delete and no insert.
    let name0 = w.route_name(0);
    let id = google(&w.cloud, &w.fake, &["route", &name0])["id"].clone();
    w.c.flanneld(0).stop();
    let mark = w.fake.events().len();
    w.start(0);
    assert!(w.fake.events()[mark..].is_empty(), "{:?}", w.fake.events());
    assert_eq!(google(&w.cloud, &w.fake, &["route", &name0])["id"], id);
    assert!(w.c.flanneld(0).log().contains("exact pre-existing route"));

    // A same-named route to another instance (made with Google's client while flanneld was
    // down) is deleted, its operation waited for, and only then the route inserted.
    w.c.flanneld(0).stop();
    let done = google(&w.cloud, &w.fake, &["repoint", &name0, OTHER_INSTANCE]);
    assert_eq!(done["status"], "DONE");
    let other = google(&w.cloud, &w.fake, &["route", &name0]);
    assert!(other["nextHopInstance"]
        .as_str()
        .unwrap_or("")
        .ends_with("/instances/frs-other"));
    let mark = w.fake.events().len();
    w.start(0);
    let ev: Vec<String> = w.fake.events()[mark..].to_vec();
    let ops: Vec<&str> = ev
        .iter()
        .map(|e| e.split(' ').next_back().unwrap_or(""))
        .collect();
    let (del_op, ins_op) = (ops[0], ops[3]);
    assert_eq!(
        ev,
        [
            format!("routes.delete {name0} {del_op}"),
            format!("{del_op} RUNNING"),
            format!("{del_op} DONE"),
            format!("routes.insert {name0} {ins_op}"),
            format!("{ins_op} RUNNING"),
            format!("{ins_op} DONE"),
        ]
    );
    let r = google(&w.cloud, &w.fake, &["route", &name0]);
    assert_eq!(
        r["nextHopInstance"],
        cloud_gce::instance_link(&cloud_gce::instance_name(w.c.hosts[0].ip))
    );
    assert_ne!(r["id"], other["id"]);
    assert!(w
        .c
        .flanneld(0)
        .log()
        .contains("gce: deleting conflicting route"));
}

#[test]
fn gce_api_errors_are_clear() {
    let w = world(1, "10.49.0.0/16");
    w.fake.fail_next(
        "routes.insert",
        403,
        "forbidden",
        "Required 'compute.routes.create' permission for 'projects/frs-project/global/routes'",
    );
    let env = w.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = [
        format!("--etcd-endpoints={}", w.c.etcd.url()),
        format!("--subnet-file={}", w.c.hosts[0].subnet_file.display()),
    ];
    let mut f = Flanneld::start_env(&w.c.hosts[0].ns, w.c.dir.path(), &args, &env);
    assert!(!f.wait_exit(T).success());
    let log = f.log();
    assert!(
        log.contains("gce routes.insert: forbidden: Required 'compute.routes.create' permission for 'projects/frs-project/global/routes' (HTTP 403)"),
        "{log}"
    );
    assert!(!log.contains(TOKEN), "token in the log:\n{log}");
    assert!(w.fake.routes().is_empty());
}

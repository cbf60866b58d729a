//! The `flannel` plugin run as a runtime runs it, with Debian's real bridge + host-local as the
//! delegate, inside namespaces the test makes.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use testbed::cni::{flannel_plugin, invoke, our_cni_path, CniCall, CniOutcome};
use testbed::{NetNs, TempDir};

const V4: &str = "\nFLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
const V6: &str = "\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
const DUAL: &str = "\nFLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
const MULTI: &str = "\nFLANNEL_NETWORK=10.1.0.0/16,192.168.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";

/// A node namespace, a pod namespace and scratch files.
struct Node {
    pod: NetNs,
    host: NetNs,
    dir: TempDir,
}

impl Node {
    fn new(subnet_env: &str) -> Self {
        let dir = TempDir::new("cni");
        std::fs::write(dir.join("subnet.env"), subnet_env).unwrap();
        Node {
            pod: NetNs::new("pod"),
            host: NetNs::new("node"),
            dir,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The unit-test input template (no cniVersion) with an isolated host-local store.
    fn conf(&self, extra: Value) -> String {
        let mut c = json!({
            "name": "cni-flannel",
            "type": "flannel",
            "subnetFile": self.dir.join("subnet.env"),
            "dataDir": self.data_dir(),
            "ipam": {"dataDir": self.dir.join("ipam")},
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c.to_string()
    }

    fn call(&self, command: &str, id: &str, stdin: &str) -> CniOutcome {
        self.call_with(command, id, stdin, &our_cni_path())
    }

    fn call_with(&self, command: &str, id: &str, stdin: &str, cni_path: &str) -> CniOutcome {
        invoke(
            &self.host,
            &flannel_plugin(),
            cni_path,
            &CniCall {
                command,
                container_id: id,
                pod_ns: self.pod.name(),
                ifname: "eth0",
                stdin,
            },
        )
    }

    fn saved(&self, id: &str) -> Option<Value> {
        std::fs::read(self.data_dir().join(id))
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    fn reservations(&self) -> usize {
        std::fs::read_dir(self.dir.join("ipam/cni-flannel"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.parse::<std::net::IpAddr>().is_ok()
                    })
                    .count()
            })
            .unwrap_or(0)
    }
}

fn ip_count(result: &Value) -> usize {
    let mut n = result["ips"].as_array().map(Vec::len).unwrap_or(0);
    n += usize::from(result.get("ip4").is_some()) + usize::from(result.get("ip6").is_some());
    n
}

fn lifecycle(env: &str, id: &str, routes: Value, ranges: Value, ips: usize) {
    let node = Node::new(env);
    let conf = node.conf(json!({}));
    let add = node.call("ADD", id, &conf);
    assert!(add.ok(), "{add:?}");
    assert_eq!(ip_count(&add.json()), ips, "{}", add.stdout);
    let saved = node.saved(id).expect("saved delegate config");
    assert_eq!(
        saved,
        json!({"ipMasq":false,"ipam":{"dataDir":node.dir.join("ipam"),"routes":routes,"ranges":ranges,"type":"host-local"},"isGateway":true,"mtu":1472,"name":"cni-flannel","type":"bridge"})
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&node.data_dir().join(id)), 0o600);
    assert_eq!(mode(&node.data_dir()), 0o700);
    // The pod really got its address, routes and MTU.
    let addr = node.pod.ip(&["addr", "show", "eth0"]);
    assert!(addr.contains("mtu 1472"), "{addr}");
    if env.contains("FLANNEL_SUBNET") {
        assert!(addr.contains("inet 10.1.17."), "{addr}");
        let r = node.pod.ip(&["route"]);
        assert!(r.contains("10.1.0.0/16 via 10.1.17.1"), "{r}");
    }
    if env.contains("FLANNEL_IPV6_SUBNET") {
        assert!(addr.contains("inet6 fc00::"), "{addr}");
    }
    assert_eq!(node.reservations(), ips);
    // DEL: veth and reservation gone, saved file gone; a second DEL is fine.
    let del = node.call("DEL", id, &conf);
    assert!(del.ok() && del.stdout.is_empty(), "{del:?}");
    assert!(node.saved(id).is_none());
    assert_eq!(node.reservations(), 0);
    assert!(!node
        .pod
        .exec("ip", &["link", "show", "eth0"])
        .status
        .success());
    assert!(node.call("DEL", id, &conf).ok());
}

#[test]
fn lifecycle_v4() {
    lifecycle(
        V4,
        "some-container-id-ipv4",
        json!([{"dst":"10.1.0.0/16"}]),
        json!([[{"subnet":"10.1.17.0/24"}]]),
        1,
    );
}

#[test]
fn lifecycle_v4_multiple_networks() {
    lifecycle(
        MULTI,
        "some-container-id-ipv4-multiple",
        json!([{"dst":"10.1.0.0/16"},{"dst":"192.168.0.0/16"}]),
        json!([[{"subnet":"10.1.17.0/24"}]]),
        1,
    );
}

#[test]
fn lifecycle_v6() {
    lifecycle(
        V6,
        "some-container-id-ipv6",
        json!([{"dst":"fc00::/48"}]),
        json!([[{"subnet":"fc00::/64"}]]),
        1,
    );
}

#[test]
fn lifecycle_dual_stack_gives_two_ips() {
    lifecycle(
        DUAL,
        "some-container-id-dual-stack",
        json!([{"dst":"10.1.0.0/16"},{"dst":"fc00::/48"}]),
        json!([[{"subnet":"10.1.17.0/24"}],[{"subnet":"fc00::/64"}]]),
        2,
    );
}

#[test]
fn check_is_forwarded_to_the_delegate() {
    let node = Node::new(V4);
    let conf = node.conf(json!({"cniVersion": "0.4.0"}));
    let add = node.call("ADD", "chk", &conf);
    assert!(add.ok(), "{add:?}");
    assert_eq!(add.json()["cniVersion"], "0.4.0");
    let mut with_prev: Value = serde_json::from_str(&conf).unwrap();
    with_prev["prevResult"] = add.json();
    let check = node.call("CHECK", "chk", &with_prev.to_string());
    assert!(check.ok() && check.stdout.is_empty(), "{check:?}");
    // Break the pod behind the plugin's back: bridge's CHECK notices, and so do we.
    node.pod.ip(&["addr", "flush", "dev", "eth0"]);
    let check = node.call("CHECK", "chk", &with_prev.to_string());
    assert!(
        !check.ok(),
        "CHECK should fail after the address was removed: {check:?}"
    );
    // CHECK needs cniVersion >= 0.4.0.
    let old = node.call("CHECK", "chk", &node.conf(json!({"cniVersion": "0.3.1"})));
    assert_eq!(old.json()["msg"], "config version does not allow CHECK");
}

#[test]
fn config_saved_by_the_go_plugin_is_deleted_by_ours() {
    let node = Node::new(V4);
    // What the Go plugin wrote at ADD time (its exact format), and the pod bridge made from it.
    let go_saved = format!(
        r#"{{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{{"dataDir":"{}","ranges":[[{{"subnet":"10.1.17.0/24"}}]],"routes":[{{"dst":"10.1.0.0/16"}}],"type":"host-local"}},"isDefaultGateway":true,"isGateway":true,"mtu":1472,"name":"cni-flannel","type":"bridge"}}"#,
        node.dir.join("ipam").display()
    );
    std::fs::create_dir_all(node.data_dir()).unwrap();
    std::fs::write(node.data_dir().join("go-ctr"), &go_saved).unwrap();
    let bridge = invoke(
        &node.host,
        &PathBuf::from("/usr/lib/cni/bridge"),
        "/usr/lib/cni",
        &CniCall {
            command: "ADD",
            container_id: "go-ctr",
            pod_ns: node.pod.name(),
            ifname: "eth0",
            stdin: &go_saved,
        },
    );
    assert!(bridge.ok(), "{bridge:?}");
    assert_eq!(node.reservations(), 1);
    // Our DEL replays it without needing subnet.env.
    std::fs::remove_file(node.dir.join("subnet.env")).unwrap();
    let del = node.call("DEL", "go-ctr", &node.conf(json!({"cniVersion": "0.3.1"})));
    assert!(del.ok(), "{del:?}");
    assert_eq!(node.reservations(), 0);
    assert!(node.saved("go-ctr").is_none());
    assert!(!node
        .pod
        .exec("ip", &["link", "show", "eth0"])
        .status
        .success());
}

#[test]
fn errors_have_the_reference_codes_and_messages() {
    let node = Node::new(V4);
    // Missing subnet.env, with the hint.
    let mut conf: Value = serde_json::from_str(&node.conf(json!({}))).unwrap();
    conf["subnetFile"] = json!("/nonexistent/subnet.env");
    let out = node.call("ADD", "e1", &conf.to_string());
    assert_eq!(out.code, 1);
    assert_eq!(out.json()["code"], 999);
    assert_eq!(
        out.json()["msg"],
        "failed to load flannel 'subnet.env' file: open /nonexistent/subnet.env: no such file or directory. Check the flannel pod log for this node."
    );
    // A malformed subnet.env is an error, never a crash.
    std::fs::write(node.dir.join("bad.env"), "FLANNEL_MTU\n").unwrap();
    conf["subnetFile"] = json!(node.dir.join("bad.env"));
    let out = node.call("ADD", "e2", &conf.to_string());
    assert_eq!(out.code, 1);
    assert!(out.json()["msg"].as_str().unwrap().contains("has no '='"));
    // delegate with a name.
    let out = node.call("ADD", "e3", &node.conf(json!({"delegate": {"name": "x"}})));
    assert_eq!(
        out.json()["msg"],
        "'delegate' dictionary must not have 'name' field, it'll be set by flannel"
    );
    // Broken stdin.
    let out = node.call("ADD", "e4", "{\"name\":");
    assert_eq!(out.json()["code"], 6);
    assert_eq!(
        out.json()["msg"],
        "error unmarshall network config: unexpected end of JSON input"
    );
    // Missing name, bad version, bad container id, missing env.
    assert_eq!(
        node.call("ADD", "e5", "{}").json()["msg"],
        "missing network name"
    );
    let out = node.call("ADD", "e6", &node.conf(json!({"cniVersion": "9.9.9"})));
    assert_eq!(out.json()["code"], 1);
    assert_eq!(out.json()["msg"], "incompatible CNI versions");
    assert_eq!(
        out.json()["details"],
        "config is \"9.9.9\", plugin supports [\"0.1.0\" \"0.2.0\" \"0.3.0\" \"0.3.1\" \"0.4.0\" \"1.0.0\" \"1.1.0\"]"
    );
    let out = node.call("ADD", "-bad", &node.conf(json!({})));
    assert_eq!(out.json()["msg"], "invalid characters in containerID");
    let out = node.call_with("ADD", "e7", &node.conf(json!({})), "");
    assert_eq!(out.json()["code"], 4);
    assert_eq!(
        out.json()["msg"],
        "required env variables [CNI_PATH] missing"
    );
    // Delegate not found.
    let out = node.call_with("ADD", "e8", &node.conf(json!({})), "/nonexistent");
    assert_eq!(
        out.json()["msg"],
        "failed to delegate add: failed to find plugin \"bridge\" in path [/nonexistent]"
    );
    // The delegate's own error passes through unchanged (Debian's bridge stops at 1.0.0).
    let out = node.call("ADD", "e9", &node.conf(json!({"cniVersion": "1.1.0"})));
    assert_eq!(out.json()["code"], 1);
    assert_eq!(out.json()["msg"], "incompatible CNI versions");
    // VERSION.
    let v = node.call("VERSION", "x", "");
    assert_eq!(
        v.stdout,
        "{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"0.1.0\",\"0.2.0\",\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]}\n"
    );
    let out = node.call("FOO", "x", "{}");
    assert_eq!(out.json()["msg"], "unknown CNI_COMMAND: FOO");
}

/// A delegate that fails as told, logging each call: failure injection for the paths the real
/// bridge cannot be made to take on demand.
fn failing_delegate(dir: &Path, fail_on: &str) -> String {
    let bin = dir.join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        "#!/bin/sh\ncat >/dev/null\necho \"$CNI_COMMAND\" >> {log}\nif [ \"$CNI_COMMAND\" = \"{fail_on}\" ]; then echo '{{\"code\":11,\"msg\":\"try later\"}}'; exit 1; fi\necho '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.1.17.2/24\"}}]}}'\n",
        log = dir.join("calls.log").display()
    );
    let p = bin.join("bridge");
    std::fs::write(&p, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin.display().to_string()
}

#[test]
fn failed_delegate_del_keeps_the_saved_file_for_a_retry() {
    let node = Node::new(V4);
    let path = failing_delegate(node.dir.path(), "DEL");
    let conf = node.conf(json!({"cniVersion": "1.0.0"}));
    assert!(node.call_with("ADD", "k1", &conf, &path).ok());
    let del = node.call_with("DEL", "k1", &conf, &path);
    assert_eq!(del.code, 1);
    assert_eq!(del.json()["code"], 11);
    assert!(
        node.saved("k1").is_some(),
        "the saved config must survive a failed DEL"
    );
}

#[test]
fn failed_add_undoes_the_delegate() {
    let node = Node::new(V4);
    let path = failing_delegate(node.dir.path(), "ADD");
    let out = node.call_with(
        "ADD",
        "u1",
        &node.conf(json!({"cniVersion": "1.0.0"})),
        &path,
    );
    assert_eq!(out.json()["code"], 11);
    let calls = std::fs::read_to_string(node.dir.join("calls.log")).unwrap();
    assert_eq!(calls, "ADD\nDEL\n");
    assert!(node.saved("u1").is_some(), "kept for the runtime's DEL");
}

#[test]
fn result_is_converted_to_the_requested_version() {
    let node = Node::new(V4);
    // The fake delegate answers 1.0.0 whatever we ask; the runtime asked for 0.4.0.
    let path = failing_delegate(node.dir.path(), "never");
    let out = node.call_with(
        "ADD",
        "r1",
        &node.conf(json!({"cniVersion": "0.4.0"})),
        &path,
    );
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.json()["cniVersion"], "0.4.0");
    assert_eq!(out.json()["ips"][0]["version"], "4");
}

#[test]
fn status_reports_50_until_subnet_env_exists() {
    let node = Node::new(V4);
    let mut conf: Value = serde_json::from_str(&node.conf(json!({"cniVersion": "1.1.0"}))).unwrap();
    conf["subnetFile"] = json!(node.dir.join("later.env"));
    let out = node.call("STATUS", "", &conf.to_string());
    assert_eq!(out.json()["code"], 50, "{out:?}");
    std::fs::write(node.dir.join("later.env"), V4).unwrap();
    let out = node.call("STATUS", "", &conf.to_string());
    assert!(out.ok() && out.stdout.is_empty(), "{out:?}");
}

#[test]
fn gc_removes_saved_files_of_vanished_containers() {
    let node = Node::new(V4);
    std::fs::create_dir_all(node.data_dir()).unwrap();
    for id in ["keep-me", "gone-1", "gone-2"] {
        std::fs::write(node.data_dir().join(id), "{}").unwrap();
    }
    let conf = node.conf(json!({
        "cniVersion": "1.1.0",
        "cni.dev/valid-attachments": [{"containerID": "keep-me", "ifname": "eth0"}],
    }));
    let out = node.call("GC", "", &conf);
    assert!(out.ok(), "{out:?}");
    let mut left: Vec<String> = std::fs::read_dir(node.data_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["keep-me"]);
}

#[test]
fn mk_docker_opts_matches_the_reference_script() {
    let dir = TempDir::new("dockeropts");
    let input = dir.join("subnet.env");
    std::fs::write(
        &input,
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let output = dir.join("docker_opts.env");
    let run = |flags: &[&str]| {
        let _ = std::fs::remove_file(&output);
        let st = std::process::Command::new(testbed::binary("mk-docker-opts"))
            .arg("-f")
            .arg(&input)
            .arg("-d")
            .arg(&output)
            .args(flags)
            .env_remove("DOCKER_OPTS")
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read_to_string(&output).unwrap()
    };
    let all = "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n";
    assert_eq!(
        run(&[]),
        format!("{all}DOCKER_OPTS=\" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472\"\n")
    );
    assert_eq!(run(&["-i"]), all);
    assert_eq!(
        run(&["-c"]),
        "DOCKER_OPTS=\" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472\"\n"
    );
    assert_eq!(
        run(&["-k", "CUSTOM_KEY"]),
        format!("{all}CUSTOM_KEY=\" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472\"\n")
    );
    assert_eq!(
        run(&["-m"]),
        "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=10.1.74.1/24 --mtu=1472\"\n"
    );
}

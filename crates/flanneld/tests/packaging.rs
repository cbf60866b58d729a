//! The Kubernetes manifest and image recipe: they cannot run here (no API server, no container
//! engine), so this checks they parse and that what they embed is accepted by our own parsers.

use std::collections::BTreeMap;

use serde_yaml::Value;

fn manifest() -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../packaging/kube-flannel.yml"
    ))
    .unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn by_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} in the manifest"))
}

#[test]
fn manifest_has_every_object_with_the_reference_rbac() {
    let docs = manifest();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        vec![
            "Namespace",
            "ClusterRole",
            "ClusterRoleBinding",
            "ServiceAccount",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    let rules = by_kind(&docs, "ClusterRole")["rules"]
        .as_sequence()
        .unwrap();
    let grants: Vec<(String, Vec<String>)> = rules
        .iter()
        .map(|r| {
            (
                r["resources"][0].as_str().unwrap().to_string(),
                r["verbs"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        grants,
        vec![
            ("pods".into(), vec!["get".into()]),
            (
                "nodes".into(),
                vec!["get".into(), "list".into(), "watch".into()]
            ),
            ("nodes/status".into(), vec!["patch".into()]),
        ]
    );
}

#[test]
fn embedded_configs_are_accepted_by_our_parsers() {
    let docs = manifest();
    let data = &by_kind(&docs, "ConfigMap")["data"];
    let net =
        flannel_types::NetworkConfig::parse_and_check(data["net-conf.json"].as_str().unwrap())
            .unwrap();
    assert_eq!(net.backend_type, "vxlan");
    assert_eq!(net.network.unwrap().to_string(), "10.244.0.0/16");
    assert!(!net.enable_nftables);

    // The conflist's flannel entry, as libcni hands it to the plugin.
    let list: serde_json::Value =
        serde_json::from_str(data["cni-conf.json"].as_str().unwrap()).unwrap();
    let mut plugin = list["plugins"][0].clone();
    plugin["name"] = list["name"].clone();
    plugin["cniVersion"] = list["cniVersion"].clone();
    let conf = flannel_cni::conf::NetConf::parse(plugin.to_string().as_bytes()).unwrap();
    let env = flannel_cni::subnet_env::FlannelEnv::parse(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        "subnet.env",
    )
    .unwrap();
    let delegate = flannel_cni::delegate::build_delegate(&conf, &env).unwrap();
    assert_eq!(
        flannel_cni::delegate::serialize(&delegate),
        r#"{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}"#
    );
}

#[test]
fn daemonset_args_parse_with_our_cli_and_probes_match_health_paths() {
    let docs = manifest();
    let pod = &by_kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["command"][0].as_str(), Some("/opt/bin/flanneld"));
    let args: Vec<String> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let flanneld::cli::Command::Run(opts) = flanneld::cli::parse(args, &BTreeMap::new()).unwrap()
    else {
        panic!("help?")
    };
    assert!(opts.ip_masq && opts.kube_subnet_mgr);
    assert_eq!(opts.healthz_port, 8081);
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    let init: Vec<&str> = pod["initContainers"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|i| i["args"][1].as_str().unwrap())
        .collect();
    assert_eq!(
        init,
        vec!["/opt/bin/flannel", "/etc/kube-flannel/cni-conf.json"]
    );
    // The image recipe ships exactly those binaries.
    let recipe = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../packaging/Containerfile"
    ))
    .unwrap();
    for bin in ["flanneld", "flannel", "mk-docker-opts"] {
        assert!(
            recipe.contains(&format!("/src/target/release/{bin}")),
            "{bin}"
        );
    }
}

//! Property tests for everything that parses outside input: net-conf.json, lease keys and values
//! from etcd, subnet.env, the CNI plugin's stdin and subnet.env, and Kubernetes Nodes with their
//! annotations. Whatever arrives, the parsers return a value or a clear error; none panics.

use flannel_cni::conf::NetConf;
use flannel_cni::subnet_env::FlannelEnv;
use flannel_types::subnet_env::{cidrs_from_env, read_dotenv};
use flannel_types::{LeaseAttrs, NetworkConfig, SubnetKey};
use flanneld::store::kube::annotations::Annotations;
use flanneld::store::kube::node::{lease_from_node, pod_cidrs, Families, MiniNode};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Strings that look like what the fields hold, and some that do not.
fn fieldish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9]{1,3})?",
        "[0-9a-f:]{0,20}(/[0-9]{1,3})?",
        "(vxlan|host-gw|udp|alloc|wireguard|ipip|VXLAN|)",
        "[a-f0-9:]{17}",
        ".{0,12}",
    ]
}

/// JSON values of any shape, biased towards the shapes the parsers expect.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        fieldish().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(fieldish(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An object with a random subset of `keys` (in random letter case) set to random values.
fn object_with(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop::collection::vec(
        (prop::sample::select(keys), any::<bool>(), json_value()),
        0..8,
    )
    .prop_map(|fields| {
        let mut m = serde_json::Map::new();
        for (k, lower, v) in fields {
            let k = if lower {
                k.to_lowercase()
            } else {
                k.to_string()
            };
            m.insert(k, v);
        }
        Value::Object(m)
    })
}

const NET_CONF_KEYS: &[&str] = &[
    "Network",
    "SubnetLen",
    "SubnetMin",
    "SubnetMax",
    "EnableIPv4",
    "EnableIPv6",
    "IPv6Network",
    "IPv6SubnetLen",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "EnableNFTables",
    "Backend",
];
const LEASE_KEYS: &[&str] = &[
    "PublicIP",
    "PublicIPv6",
    "BackendType",
    "BackendData",
    "BackendV6Data",
];
const CNI_KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "subnetFile",
    "dataDir",
    "delegate",
    "ipam",
    "runtimeConfig",
    "prevResult",
    "args",
];

fn clear(e: &str) -> bool {
    !e.trim().is_empty()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn net_conf_never_panics(v in object_with(NET_CONF_KEYS), raw in ".{0,64}") {
        for text in [v.to_string(), raw] {
            if let Err(e) = NetworkConfig::parse(&text) { prop_assert!(clear(&e.to_string())); }
            if let Err(e) = NetworkConfig::parse_and_check(&text) { prop_assert!(clear(&e.to_string())); }
        }
    }

    #[test]
    fn etcd_lease_values_and_keys_never_panic(v in object_with(LEASE_KEYS), key in "[0-9a-f.:&-]{0,40}") {
        if let Err(e) = LeaseAttrs::from_json(&v.to_string()) { prop_assert!(clear(&e.to_string())); }
        if let Ok(k) = key.parse::<SubnetKey>() {
            // What parses prints back to a key that parses to the same subnets.
            prop_assert_eq!(k.to_string().parse::<SubnetKey>().ok(), Some(k));
        }
    }

    #[test]
    fn subnet_env_never_panics(lines in prop::collection::vec("[A-Z_]{0,22}(=[0-9a-f.:/,]{0,30})?", 0..8)) {
        let text = lines.join("\n");
        let vars = read_dotenv(&text);
        for key in ["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"] {
            let _ = cidrs_from_env(&vars, key);
        }
        if let Err(e) = FlannelEnv::parse(&text, "/run/flannel/subnet.env") { prop_assert!(clear(&e)); }
    }

    #[test]
    fn cni_stdin_never_panics(v in object_with(CNI_KEYS), raw in prop::collection::vec(any::<u8>(), 0..64)) {
        if let Err(e) = NetConf::parse(v.to_string().as_bytes()) { prop_assert!(clear(&e)); }
        if let Err(e) = NetConf::parse(&raw) { prop_assert!(clear(&e)); }
    }

    #[test]
    fn kube_nodes_never_panic(
        managed in prop::option::of("(true|false|)"),
        public_ip in prop::option::of(fieldish()),
        data in prop::option::of(prop_oneof![json_value().prop_map(|v| v.to_string()), ".{0,20}"]),
        cidr in prop::option::of(fieldish()),
        cidrs in prop::collection::vec(fieldish(), 0..4),
        v6 in any::<bool>(),
    ) {
        let p = "flannel.alpha.coreos.com";
        let mut ann = serde_json::Map::new();
        if let Some(m) = managed { ann.insert(format!("{p}/kube-subnet-manager"), m.into()); }
        if let Some(ip) = public_ip { ann.insert(format!("{p}/public-ip"), ip.clone().into()); ann.insert(format!("{p}/public-ipv6"), ip.into()); }
        if let Some(d) = data { ann.insert(format!("{p}/backend-data"), d.into()); }
        let node = json!({"metadata": {"name": "n", "annotations": ann},
                          "spec": {"podCIDR": cidr, "podCIDRs": cidrs}});
        let node: MiniNode = serde_json::from_value(node).expect("any annotation strings decode");
        let a = Annotations::new(p).expect("default prefix");
        if let Err(e) = pod_cidrs(&node) { prop_assert!(clear(&e.to_string())); }
        if let Err(e) = lease_from_node(&node, &a, Families { v4: true, v6 }) { prop_assert!(clear(&e)); }
    }

    #[test]
    fn annotation_prefixes_never_panic(prefix in ".{0,40}") {
        if let Err(e) = Annotations::new(&prefix) { prop_assert!(clear(&e.to_string())); }
    }
}

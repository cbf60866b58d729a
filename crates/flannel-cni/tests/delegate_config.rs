//! The reference plugin's unit cases (cni.md §1.10 and §1.4): input -> exact delegate config.

use flannel_cni::conf::NetConf;
use flannel_cni::delegate::{build_delegate, delegate_ipam, serialize};
use flannel_cni::subnet_env::FlannelEnv;
use serde_json::{json, Value};

const V4: &str = "\nFLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
const V6: &str = "\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
const DUAL: &str = "\nFLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
const MULTI: &str = "\nFLANNEL_NETWORK=10.1.0.0/16,192.168.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";

fn env(text: &str) -> FlannelEnv {
    FlannelEnv::parse(text, "/tmp/subnet.env").unwrap()
}

fn built(input: &str, subnet_env: &str) -> String {
    let conf = NetConf::parse(input.as_bytes()).unwrap();
    serialize(&build_delegate(&conf, &env(subnet_env)).unwrap())
}

#[test]
fn saved_configs_match_the_reference_bytes() {
    let input = r#"{"name":"cni-flannel","type":"flannel","subnetFile":"/x","dataDir":"/y"}"#;
    assert_eq!(
        built(input, V4),
        r#"{"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.1.0.0/16"}],"type":"host-local"},"isGateway":true,"mtu":1472,"name":"cni-flannel","type":"bridge"}"#
    );
    let kube = r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#;
    assert_eq!(
        built(kube, V4),
        r#"{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.1.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1472,"name":"cbr0","type":"bridge"}"#
    );
    let everything = r#"{"cniVersion":"1.0.0","name":"fk","type":"flannel","subnetFile":"x","dataDir":"y",
 "runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]},
 "prevResult":{"cniVersion":"1.0.0"},"args":{"a":1},"dns":{"nameservers":["1.1.1.1"]},"capabilities":{"portMappings":true},
 "ipam":{"type":"my-ipam","unknown-param":"unknown-value","ranges":[[{"subnet":"1.1.1.0/24"}]],
         "routes":[{"dst":"10.96.0.0/12"},{"dst":"192.168.244.0/24","gw":"10.1.17.20","extra":"x"}]},
 "delegate":{"bridge":"mynet0","mtu":1400,"ipMasq":true,"foo":{"bar":[1,2]}}}"#;
    assert_eq!(
        built(everything, V4),
        r#"{"bridge":"mynet0","cniVersion":"1.0.0","foo":{"bar":[1,2]},"ipMasq":true,"ipam":{"ranges":[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.96.0.0/12"},{"dst":"192.168.244.0/24","gw":"10.1.17.20"},{"dst":"10.1.0.0/16"}],"type":"my-ipam","unknown-param":"unknown-value"},"isGateway":true,"mtu":1400,"name":"fk","runtimeConfig":{"portMappings":[{"containerPort":80,"hostPort":8080,"protocol":"tcp"}]},"type":"bridge"}"#
    );
}

#[test]
fn families_and_multiple_networks() {
    let input = r#"{"name":"n","type":"flannel"}"#;
    let v: Value = serde_json::from_str(&built(input, DUAL)).unwrap();
    assert_eq!(
        v["ipam"]["ranges"],
        json!([[{"subnet":"10.1.17.0/24"}],[{"subnet":"fc00::/64"}]])
    );
    assert_eq!(
        v["ipam"]["routes"],
        json!([{"dst":"10.1.0.0/16"},{"dst":"fc00::/48"}])
    );
    let v: Value = serde_json::from_str(&built(input, V6)).unwrap();
    assert_eq!(v["ipam"]["ranges"], json!([[{"subnet":"fc00::/64"}]]));
    assert_eq!(v["ipam"]["routes"], json!([{"dst":"fc00::/48"}]));
    let multi = "\nFLANNEL_NETWORK=10.1.0.0/16,10.1.5.0/16,192.168.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n";
    let v: Value = serde_json::from_str(&built(input, multi)).unwrap();
    assert_eq!(
        v["ipam"]["routes"],
        json!([{"dst":"10.1.0.0/16"},{"dst":"192.168.0.0/16"}])
    );
    assert_eq!(v["ipMasq"], true);
    // Case 9 ("two networks", without ipam).
    assert_eq!(
        Value::Object(delegate_ipam(None, &env(MULTI)).unwrap()),
        json!({"ranges":[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.1.0.0/16"},{"dst":"192.168.0.0/16"}],"type":"host-local"})
    );
}

#[test]
fn delegate_ipam_with_an_input_ipam() {
    let ipam = json!({"type":"my-ipam","unknown-param":"unknown-value","routes":[{"dst":"10.96.0.0/12"},{"dst":"192.168.244.0/24","gw":"10.1.17.20"}]});
    let ipam = ipam.as_object().unwrap();
    let got = |e: &str| Value::Object(delegate_ipam(Some(ipam), &env(e)).unwrap());
    assert_eq!(
        got(V4),
        json!({"type":"my-ipam","unknown-param":"unknown-value","ranges":[[{"subnet":"10.1.17.0/24"}]],"routes":[{"dst":"10.96.0.0/12"},{"dst":"192.168.244.0/24","gw":"10.1.17.20"},{"dst":"10.1.0.0/16"}]})
    );
    assert_eq!(got(V6)["routes"][2], json!({"dst":"fc00::/48"}));
    assert_eq!(got(DUAL)["ranges"].as_array().unwrap().len(), 2);
    assert_eq!(got(DUAL)["routes"][3], json!({"dst":"fc00::/48"}));
    // Without a type: host-local.
    let mut no_type = ipam.clone();
    no_type.remove("type");
    assert_eq!(
        delegate_ipam(Some(&no_type), &env(V4)).unwrap()["type"],
        "host-local"
    );
}

#[test]
fn precedence_and_kept_values() {
    let c = |d: &str| {
        let input =
            format!(r#"{{"cniVersion":"0.4.0","name":"n","type":"flannel","delegate":{d}}}"#);
        serde_json::from_str::<Value>(&built(
            &input,
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        ))
        .unwrap()
    };
    let ipvlan = c(r#"{"type":"ipvlan","master":"eth0"}"#);
    assert!(ipvlan.get("isGateway").is_none());
    assert_eq!(ipvlan["mtu"], 1450);
    assert_eq!(ipvlan["ipMasq"], true);
    let kept = c(r#"{"type":"bridge","isGateway":false,"mtu":0,"ipMasq":null}"#);
    assert_eq!(kept["isGateway"], false);
    assert_eq!(kept["mtu"], 0);
    assert!(kept["ipMasq"].is_null());
}

#[test]
fn config_loading_and_defaults() {
    let c = NetConf::parse(br#"{"name":"cni-flannel","type":"flannel"}"#).unwrap();
    assert_eq!(c.subnet_file, "/run/flannel/subnet.env");
    assert_eq!(c.data_dir, "/var/lib/cni/flannel");
    assert_eq!(c.name, "cni-flannel");
    let c = NetConf::parse(br#"{"name":"n","subnetFile":"/a","dataDir":"/b"}"#).unwrap();
    assert_eq!((c.subnet_file.as_str(), c.data_dir.as_str()), ("/a", "/b"));
    assert_eq!(
        NetConf::parse(br#"{"name":"n","subnetFile":5}"#).unwrap_err(),
        "json: cannot unmarshal number into Go struct field NetConf.subnetFile of type string"
    );
}

#[test]
fn subnet_env_parsing_rules() {
    let e = env(V4);
    assert_eq!(e.networks[0].to_string(), "10.1.0.0/16");
    assert_eq!(e.subnet.unwrap().to_string(), "10.1.17.0/24");
    assert_eq!((e.mtu, e.ipmasq), (Some(1472), Some(true)));
    let e = env(DUAL);
    assert_eq!(e.ipv6_subnet.unwrap().to_string(), "fc00::/64");
    assert_eq!(
        FlannelEnv::parse("foo=bar\n", "/p").unwrap_err(),
        "/p is missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ"
    );
    assert_eq!(
        FlannelEnv::parse("FLANNEL_NETWORK=10.1.0.0/33\n", "/p").unwrap_err(),
        "invalid CIDR address: 10.1.0.0/33"
    );
    assert_eq!(
        FlannelEnv::parse("FLANNEL_MTU=abc\n", "/p").unwrap_err(),
        "strconv.ParseUint: parsing \"abc\": invalid syntax"
    );
    assert!(FlannelEnv::parse("FLANNEL_MTU=4294967296\n", "/p")
        .unwrap_err()
        .contains("value out of range"));
    // The Go plugin panics on a bare key; we give a clear error.
    assert!(FlannelEnv::parse("FLANNEL_MTU\n", "/p")
        .unwrap_err()
        .contains("has no '='"));
    // CRLF, comments, export lines and TRUE (not "true") as the reference treats them.
    let e = env("# c\r\nFLANNEL_NETWORK=10.1.0.0/16\r\nFLANNEL_SUBNET=10.1.17.1/24\r\nexport FLANNEL_MTU=1\r\nFLANNEL_MTU=1472\r\nFLANNEL_IPMASQ=TRUE\r\n");
    assert_eq!((e.mtu, e.ipmasq), (Some(1472), Some(false)));
}

#[test]
fn delegate_validation_messages() {
    let err = |d: &str| {
        let input = format!(r#"{{"name":"n","delegate":{d}}}"#);
        let conf = NetConf::parse(input.as_bytes()).unwrap();
        build_delegate(&conf, &env(V4)).unwrap_err()
    };
    assert_eq!(
        err(r#"{"type":5}"#),
        "'delegate' dictionary, if present, must have (string) 'type' field"
    );
    assert_eq!(
        err(r#"{"name":"x"}"#),
        "'delegate' dictionary must not have 'name' field, it'll be set by flannel"
    );
    assert_eq!(
        err(r#"{"ipam":{}}"#),
        "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel"
    );
    let conf = NetConf::parse(br#"{"name":"n","ipam":{"routes":"x"}}"#).unwrap();
    assert_eq!(
        build_delegate(&conf, &env(V4)).unwrap_err(),
        "failed to assemble Delegate IPAM: failed to read IPAM routes: failed to parse ipam.routes: json: cannot unmarshal string into Go value of type []types.Route"
    );
    let conf = NetConf::parse(br#"{"name":"n","ipam":{"routes":[{"dst":"nope"}]}}"#).unwrap();
    assert!(build_delegate(&conf, &env(V4))
        .unwrap_err()
        .ends_with("invalid CIDR address: nope"));
}

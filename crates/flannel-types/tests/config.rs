//! net-conf.json parsing and validation: every default and error message of the reference.

use flannel_types::backend_options::{
    IpsecOptions, UdpOptions, VxlanOptions, WireguardMode, WireguardOptions,
};
use flannel_types::NetworkConfig;

fn check(text: &str) -> Result<NetworkConfig, String> {
    NetworkConfig::parse_and_check(text).map_err(|e| e.to_string())
}

fn err(text: &str) -> String {
    check(text).expect_err(text)
}

#[test]
fn seed_example() {
    let c = check(r#"{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0","Backend":{"Type":"udp","Port":7890}}"#).unwrap();
    assert_eq!(c.network.unwrap().to_string(), "10.0.0.0/8");
    assert_eq!(c.subnet_len, 20);
    assert_eq!(c.subnet_min.unwrap().to_string(), "10.10.0.0");
    assert_eq!(c.subnet_max.unwrap().to_string(), "10.99.0.0");
    assert_eq!(c.backend_type, "udp");
    assert_eq!(UdpOptions::from_backend(&c.backend).unwrap().port, 7890);
}

#[test]
fn defaults_v4() {
    let c = check(r#"{ "network": "10.3.0.0/16" }"#).unwrap();
    assert_eq!(c.subnet_len, 24);
    assert_eq!(c.subnet_min.unwrap().to_string(), "10.3.1.0");
    assert_eq!(c.subnet_max.unwrap().to_string(), "10.3.255.0");
    assert!(c.enable_ipv4 && !c.enable_ipv6 && !c.enable_nftables);
    // Backend absent means udp (the code's default, not the docs').
    assert_eq!(c.backend_type, "udp");
    assert_eq!(UdpOptions::from_backend(&c.backend).unwrap().port, 8285);
}

#[test]
fn subnet_len_derivation() {
    // prefix <= 22 -> /24; else prefix + 2.
    assert_eq!(
        check(r#"{"Network":"10.0.0.0/22"}"#).unwrap().subnet_len,
        24
    );
    assert_eq!(
        check(r#"{"Network":"10.0.0.0/23"}"#).unwrap().subnet_len,
        25
    );
    let c = check(r#"{"Network":"10.0.0.0/28"}"#).unwrap();
    assert_eq!(c.subnet_len, 30);
    assert_eq!(c.subnet_min.unwrap().to_string(), "10.0.0.4");
    assert_eq!(c.subnet_max.unwrap().to_string(), "10.0.0.12");
}

#[test]
fn host_bits_of_network_are_masked() {
    let c = check(r#"{"Network":"10.3.7.9/16"}"#).unwrap();
    assert_eq!(c.network.unwrap().to_string(), "10.3.0.0/16");
}

#[test]
fn overrides_kept_verbatim() {
    let c = check(
        r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.5.0","SubnetMax":"10.3.8.0","SubnetLen":28}"#,
    )
    .unwrap();
    assert_eq!(c.subnet_len, 28);
    assert_eq!(c.subnet_min.unwrap().to_string(), "10.3.5.0");
    assert_eq!(c.subnet_max.unwrap().to_string(), "10.3.8.0");
}

#[test]
fn v4_error_messages() {
    assert_eq!(
        err("{}"),
        "please define a correct Network parameter in the flannel config"
    );
    assert_eq!(
        err(r#"{"Network":"0.0.0.0/0"}"#),
        "please define a correct Network parameter in the flannel config"
    );
    assert_eq!(
        err(r#"{"Network":"10.0.0.0/8","SubnetLen":31}"#),
        "SubnetLen must be less than /31"
    );
    assert_eq!(
        err(r#"{"Network":"10.0.0.0/8","SubnetLen":9}"#),
        "network must be able to accommodate at least four subnets"
    );
    assert_eq!(
        err(r#"{"Network":"10.0.0.0/29"}"#),
        "network is too small. Minimum useful network prefix is /28"
    );
    assert_eq!(
        err(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.4.0.0"}"#),
        "SubnetMin is not in the range of the Network"
    );
    assert_eq!(
        err(r#"{"Network":"10.3.0.0/16","SubnetMax":"10.4.0.0"}"#),
        "SubnetMax is not in the range of the Network"
    );
    assert_eq!(
        err(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.5"}"#),
        "SubnetMin is not on a SubnetLen boundary: 10.3.1.5"
    );
    assert_eq!(
        err(r#"{"Network":"10.3.0.0/16","SubnetMax":"10.3.9.1"}"#),
        "SubnetMax is not on a SubnetLen boundary: 10.3.9.1"
    );
    assert_eq!(
        err(r#"{"Network":"fc00::/48"}"#),
        "invalid IPv4 CIDR format"
    );
    assert_eq!(
        err(r#"{"Network":"10.3.0.0/33"}"#),
        "invalid CIDR address: 10.3.0.0/33"
    );
    assert_eq!(
        err(r#"{"Network":"10.3.0.0/16","SubnetMin":"nope"}"#),
        "invalid IP address format"
    );
    assert_eq!(
        err(r#"{"Network":"10.3.0.0/16","SubnetMin":"fc00::1"}"#),
        "invalid IPv4 address format"
    );
    // No check that min <= max (reference behaviour).
    assert!(
        check(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.9.0","SubnetMax":"10.3.2.0"}"#).is_ok()
    );
}

#[test]
fn v6_defaults_and_errors() {
    let c = check(r#"{ "enableIPv6": true, "ipv6Network": "fc00::/48", "enableIPv4": false }"#)
        .unwrap();
    assert_eq!(c.ipv6_subnet_len, 64);
    assert_eq!(c.ipv6_subnet_min.unwrap().to_string(), "fc00:0:0:1::");
    assert_eq!(c.ipv6_subnet_max.unwrap().to_string(), "fc00:0:0:ffff::");
    let c = check(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"fc00:0:0:1::","IPv6SubnetMax":"fc00:0:0:f::","IPv6SubnetLen":124}"#).unwrap();
    assert_eq!(c.ipv6_subnet_len, 124);
    assert_eq!(c.ipv6_subnet_max.unwrap().to_string(), "fc00:0:0:f::");
    let v6 = |rest: &str| {
        err(&format!(
            r#"{{"EnableIPv4":false,"EnableIPv6":true{rest}}}"#
        ))
    };
    assert_eq!(
        v6(""),
        "please define a correct IPv6Network parameter in the flannel config"
    );
    assert_eq!(
        v6(r#","IPv6Network":"fc00::/48","IPv6SubnetLen":127"#),
        "SubnetLen must be less than /127"
    );
    assert_eq!(
        v6(r#","IPv6Network":"fc00::/48","IPv6SubnetLen":49"#),
        "network must be able to accommodate at least four subnets"
    );
    assert_eq!(
        v6(r#","IPv6Network":"fc00::/125""#),
        "IPv6Network is too small. Minimum useful network prefix is /124"
    );
    assert_eq!(
        v6(r#","IPv6Network":"fc00::/48","IPv6SubnetMin":"fd00::""#),
        "IPv6SubnetMin is not in the range of the IPv6Network"
    );
    assert_eq!(
        v6(r#","IPv6Network":"fc00::/48","IPv6SubnetMax":"fd00::""#),
        "IPv6SubnetMax is not in the range of the IPv6Network"
    );
    assert_eq!(
        v6(r#","IPv6Network":"fc00::/48","IPv6SubnetMin":"fc00:0:0:1::5""#),
        "IPv6SubnetMin is not on a SubnetLen boundary: fc00:0:0:1::5"
    );
    assert_eq!(
        v6(r#","IPv6Network":"fc00::/48","IPv6SubnetMax":"fc00:0:0:2::1""#),
        "IPv6SubnetMax is not on a SubnetLen boundary: fc00:0:0:2::1"
    );
    // /63 -> /65 subnets.
    let c = check(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/63"}"#).unwrap();
    assert_eq!(c.ipv6_subnet_len, 65);
}

#[test]
fn keys_case_insensitive_unknown_ignored() {
    let c = check(r#"{"NETWORK":"10.3.0.0/16","subnetlen":26,"Whatever":[1,2],"backend":{"type":"VXLAN","vni":4}}"#).unwrap();
    assert_eq!(c.subnet_len, 26);
    assert_eq!(c.backend_type, "vxlan");
    assert_eq!(VxlanOptions::from_backend(&c.backend).unwrap().vni, 4);
}

#[test]
fn backend_without_type_is_unknown_empty() {
    let c = check(r#"{"Network":"10.3.0.0/16","Backend":{}}"#).unwrap();
    assert_eq!(c.backend_type, "");
}

#[test]
fn malformed_documents_are_clear_errors() {
    assert_eq!(
        err(r#"{"Network":"10.3.0.0/16""#),
        "unexpected end of JSON input"
    );
    assert_eq!(
        err(r#"{"Network":"10.3.0.0/16","SubnetLen":"24"}"#),
        "json: cannot unmarshal string into Go struct field subnet.Config.SubnetLen of type uint"
    );
    assert_eq!(
        err(r#"{"Network":"10.3.0.0/16","SubnetLen":-1}"#),
        "json: cannot unmarshal number -1 into Go struct field subnet.Config.SubnetLen of type uint"
    );
    assert!(err(r#"{"Network":"10.3.0.0/16","Backend":"vxlan"}"#)
        .starts_with("error decoding Backend property of config: "));
    assert!(err("[]").contains("cannot unmarshal array"));
    assert!(err(r#"{"Network":"10.3.0.0/16","EnableIPv6":"yes"}"#).contains("of type bool"));
}

#[test]
fn backend_option_defaults() {
    let none = serde_json::json!({"Type":"vxlan"});
    let v = VxlanOptions::from_backend(&none).unwrap();
    assert_eq!(
        (v.vni, v.port, v.mtu, v.gbp, v.learning, v.direct_routing),
        (1, 0, 0, false, false, false)
    );
    let w = WireguardOptions::from_backend(&none).unwrap();
    assert_eq!(
        (w.listen_port, w.listen_port_v6, w.mode),
        (51820, 51821, WireguardMode::Separate)
    );
    assert_eq!(
        WireguardOptions::from_backend(&serde_json::json!({"Mode":"bogus"}))
            .unwrap_err()
            .to_string(),
        "no valid Mode configured"
    );
    assert_eq!(
        IpsecOptions::from_backend(&serde_json::json!({"PSK":"short"}))
            .unwrap_err()
            .to_string(),
        "config error, password is too short"
    );
    let psk = "a".repeat(96);
    let i = IpsecOptions::from_backend(&serde_json::json!({ "PSK": psk })).unwrap();
    assert_eq!(i.esp_proposal, "aes128gcm16-sha256-prfsha256-ecp256");
}

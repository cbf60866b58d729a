//! The per-backend options of the `Backend` object in net-conf.json, with the reference defaults.
//!
//! Every backend reads its options from here so a config that Go flannel accepts is accepted the
//! same way (case-insensitive keys, unknown keys ignored, the same error texts).

use serde_json::Value;

use crate::config::ConfigError;
use crate::gojson::FoldedObject;

fn object(backend: &Value, go_type: &'static str) -> Result<FoldedObject, ConfigError> {
    FoldedObject::from_value(backend.clone(), go_type)
        .map_err(|e| ConfigError(format!("error decoding backend config: {e}")))
}

fn wrap<T>(r: Result<T, String>) -> Result<T, ConfigError> {
    r.map_err(|e| ConfigError(format!("error decoding backend config: {e}")))
}

const INT_MIN: i64 = i64::MIN;
const INT_MAX: i64 = i64::MAX;

/// `vxlan` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanOptions {
    /// VXLAN network identifier; the device is `flannel.<VNI>`.
    pub vni: i64,
    /// UDP destination port; 0 leaves the kernel default (8472).
    pub port: i64,
    /// Device MTU before the 50-byte overhead; 0 = the external interface's MTU.
    pub mtu: i64,
    /// VXLAN Group Based Policy extension.
    pub gbp: bool,
    /// Let the kernel learn remote MACs (off: flannel programs FDB entries).
    pub learning: bool,
    /// Route directly (no encapsulation) to peers on the same L2 segment.
    pub direct_routing: bool,
}

impl VxlanOptions {
    /// Reads the options from the raw `Backend` object.
    pub fn from_backend(backend: &Value) -> Result<Self, ConfigError> {
        let o = object(backend, "vxlan.backendConfig")?;
        Ok(VxlanOptions {
            vni: wrap(o.int_field("VNI", "int", INT_MIN, INT_MAX))?.unwrap_or(1),
            port: wrap(o.int_field("Port", "int", INT_MIN, INT_MAX))?.unwrap_or(0),
            mtu: wrap(o.int_field("MTU", "int", INT_MIN, INT_MAX))?.unwrap_or(0),
            gbp: wrap(o.bool_field("GBP"))?.unwrap_or(false),
            learning: wrap(o.bool_field("Learning"))?.unwrap_or(false),
            direct_routing: wrap(o.bool_field("DirectRouting"))?.unwrap_or(false),
        })
    }
}

/// `udp` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpOptions {
    /// UDP port used on every host (default 8285).
    pub port: i64,
}

impl UdpOptions {
    /// Reads the options from the raw `Backend` object (absent `Backend` = defaults).
    pub fn from_backend(backend: &Value) -> Result<Self, ConfigError> {
        let o = object(backend, "udp.backendConfig")?;
        Ok(UdpOptions {
            port: wrap(o.int_field("Port", "int", INT_MIN, INT_MAX))?.unwrap_or(8285),
        })
    }
}

/// `ipip` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpipOptions {
    /// Route directly to peers on the same L2 segment.
    pub direct_routing: bool,
}

impl IpipOptions {
    /// Reads the options from the raw `Backend` object.
    pub fn from_backend(backend: &Value) -> Result<Self, ConfigError> {
        let o = object(backend, "ipip.backendConfig")?;
        Ok(IpipOptions {
            direct_routing: wrap(o.bool_field("DirectRouting"))?.unwrap_or(false),
        })
    }
}

/// Default ESP proposal of the ipsec backend.
pub const DEFAULT_ESP_PROPOSAL: &str = "aes128gcm16-sha256-prfsha256-ecp256";

/// `ipsec` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpsecOptions {
    /// Pre-shared key (at least 96 characters).
    pub psk: String,
    /// Encapsulate ESP in UDP.
    pub udp_encap: bool,
    /// ESP proposal passed to strongSwan.
    pub esp_proposal: String,
}

impl IpsecOptions {
    /// Reads and checks the options from the raw `Backend` object.
    pub fn from_backend(backend: &Value) -> Result<Self, ConfigError> {
        let o = object(backend, "ipsec.backendConfig")?;
        let psk = wrap(o.string_field("PSK"))?.unwrap_or_default();
        if psk.len() < 96 {
            return Err(ConfigError("config error, password is too short".into()));
        }
        Ok(IpsecOptions {
            psk,
            udp_encap: wrap(o.bool_field("UDPEncap"))?.unwrap_or(false),
            esp_proposal: wrap(o.string_field("ESPProposal"))?
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_ESP_PROPOSAL.to_string()),
        })
    }
}

/// How the wireguard backend lays out its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireguardMode {
    /// One device per address family.
    Separate,
    /// One device, endpoint family chosen per peer.
    Auto,
    /// One device, IPv4 endpoints.
    Ipv4,
    /// One device, IPv6 endpoints.
    Ipv6,
}

/// `wireguard` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardOptions {
    /// Listen port of the IPv4 (or single) device.
    pub listen_port: i64,
    /// Listen port of the IPv6 device in separate mode.
    pub listen_port_v6: i64,
    /// Device MTU before the 80-byte overhead; 0 = external interface MTU.
    pub mtu: i64,
    /// Optional base64 pre-shared key for every peer.
    pub psk: String,
    /// Keepalive in seconds; 0 disables it.
    pub persistent_keepalive_interval: i64,
    /// Device layout.
    pub mode: WireguardMode,
}

impl WireguardOptions {
    /// Reads and checks the options from the raw `Backend` object.
    pub fn from_backend(backend: &Value) -> Result<Self, ConfigError> {
        let o = object(backend, "wireguard.backendConfig")?;
        let mode = match wrap(o.string_field("Mode"))?.as_deref() {
            None | Some("") | Some("separate") => WireguardMode::Separate,
            Some("auto") => WireguardMode::Auto,
            Some("ipv4") => WireguardMode::Ipv4,
            Some("ipv6") => WireguardMode::Ipv6,
            Some(_) => return Err(ConfigError("no valid Mode configured".into())),
        };
        Ok(WireguardOptions {
            listen_port: wrap(o.int_field("ListenPort", "int", INT_MIN, INT_MAX))?.unwrap_or(51820),
            listen_port_v6: wrap(o.int_field("ListenPortV6", "int", INT_MIN, INT_MAX))?
                .unwrap_or(51821),
            mtu: wrap(o.int_field("MTU", "int", INT_MIN, INT_MAX))?.unwrap_or(0),
            psk: wrap(o.string_field("PSK"))?.unwrap_or_default(),
            persistent_keepalive_interval: wrap(o.int_field(
                "PersistentKeepaliveInterval",
                "time.Duration",
                INT_MIN,
                INT_MAX,
            ))?
            .unwrap_or(0),
            mode,
        })
    }
}

/// `extension` options: commands run at the points of the lease life cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtensionOptions {
    /// Run before the lease; its output becomes BackendData.
    pub pre_startup_command: String,
    /// Run after the lease.
    pub post_startup_command: String,
    /// Run per remote lease added.
    pub subnet_add_command: String,
    /// Run per remote lease removed.
    pub subnet_remove_command: String,
}

impl ExtensionOptions {
    /// Reads the options from the raw `Backend` object.
    pub fn from_backend(backend: &Value) -> Result<Self, ConfigError> {
        let o = object(backend, "extension.backendConfig")?;
        Ok(ExtensionOptions {
            pre_startup_command: wrap(o.string_field("PreStartupCommand"))?.unwrap_or_default(),
            post_startup_command: wrap(o.string_field("PostStartupCommand"))?.unwrap_or_default(),
            subnet_add_command: wrap(o.string_field("SubnetAddCommand"))?.unwrap_or_default(),
            subnet_remove_command: wrap(o.string_field("SubnetRemoveCommand"))?.unwrap_or_default(),
        })
    }
}

/// Credentials of the `tencent-vpc` (and historic `ali-vpc`) backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloudKeyOptions {
    /// Access key id (falls back to `ACCESS_KEY_ID`).
    pub access_key_id: String,
    /// Access key secret (falls back to `ACCESS_KEY_SECRET`); never logged.
    pub access_key_secret: String,
}

impl CloudKeyOptions {
    /// Reads the options from the raw `Backend` object.
    pub fn from_backend(backend: &Value) -> Result<Self, ConfigError> {
        let o = object(backend, "backendConfig")?;
        Ok(CloudKeyOptions {
            access_key_id: wrap(o.string_field("AccessKeyID"))?.unwrap_or_default(),
            access_key_secret: wrap(o.string_field("AccessKeySecret"))?.unwrap_or_default(),
        })
    }
}

/// `aws-vpc` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwsVpcOptions {
    /// Route tables to program; empty = autodetect.
    pub route_table_ids: Vec<String>,
}

impl AwsVpcOptions {
    /// Reads the options; `RouteTableID` may be a string or an array of strings.
    pub fn from_backend(backend: &Value) -> Result<Self, ConfigError> {
        let o = object(backend, "awsvpc.backendConfig")?;
        let ids = match o.get_non_null("RouteTableID") {
            None => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(ConfigError(
                        "routeTableID must be a string or an array of strings".into(),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(ConfigError(
                    "routeTableID must be a string or an array of strings".into(),
                ))
            }
        };
        Ok(AwsVpcOptions {
            route_table_ids: ids,
        })
    }
}

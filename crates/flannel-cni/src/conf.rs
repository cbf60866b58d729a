//! The plugin's stdin config (`NetConf`) with Go's decoding rules.

use flannel_types::gojson::FoldedObject;
use serde_json::{Map, Value};

/// Default location of flanneld's subnet.env.
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
/// Default directory of saved delegate configs.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

/// The flannel plugin's network config.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// Requested CNI version (empty = 0.1.0).
    pub cni_version: String,
    /// Network name.
    pub name: String,
    /// flanneld's env file.
    pub subnet_file: String,
    /// Where delegate configs are saved.
    pub data_dir: String,
    /// Base of the delegate config (`None` when absent or null).
    pub delegate: Option<Map<String, Value>>,
    /// Base of the delegate's `ipam`.
    pub ipam: Option<Map<String, Value>>,
    /// Runtime-provided capability arguments.
    pub runtime_config: Option<Value>,
    /// The whole document (for `prevResult` and GC's attachments).
    pub raw: Map<String, Value>,
}

fn object(o: &FoldedObject, field: &str) -> Result<Option<Map<String, Value>>, String> {
    match o.get_non_null(field) {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        Some(other) => Err(o.type_error(field, other, "map[string]interface {}")),
    }
}

impl NetConf {
    /// Decodes the config; errors are Go's `json: cannot unmarshal ...` texts.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| flannel_types::gojson::go_syntax_error(&e))?;
        let raw = match &value {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        let o = FoldedObject::from_value(value, "NetConf")?;
        let ipam = match o.get_non_null("ipam") {
            None => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(other) => return Err(o.type_error("ipam", other, "map[string]interface {}")),
        };
        Ok(NetConf {
            cni_version: o.string_field("cniVersion")?.unwrap_or_default(),
            name: o.string_field("name")?.unwrap_or_default(),
            subnet_file: o
                .string_field("subnetFile")?
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_SUBNET_FILE.into()),
            data_dir: o
                .string_field("dataDir")?
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            delegate: object(&o, "delegate")?,
            ipam,
            runtime_config: o.get_non_null("runtimeConfig").cloned(),
            raw,
        })
    }
}

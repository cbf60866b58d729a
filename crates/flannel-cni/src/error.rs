//! The CNI error object, printed the way the Go library prints it.

use std::fmt;

/// Well-known CNI error codes.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid or missing environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin is not available.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// The Go library's code for plain (non-CNI) errors.
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: code, short message, optional details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// CNI error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation (omitted when empty).
    pub details: String,
}

impl CniError {
    /// An error with a code and message.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// A plugin error (code 999, like Go's wrapped errors).
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(code::INTERNAL, msg)
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The JSON printed on stdout: 4-space indent, no `cniVersion`, `details` only if set.
    pub fn to_json(&self) -> String {
        let mut m = serde_json::Map::new();
        m.insert("code".into(), self.code.into());
        m.insert("msg".into(), self.msg.clone().into());
        if !self.details.is_empty() {
            m.insert("details".into(), self.details.clone().into());
        }
        // Go's struct order: code, msg, details.
        let mut out = String::from("{\n");
        let mut first = true;
        for key in ["code", "msg", "details"] {
            if let Some(v) = m.get(key) {
                if !first {
                    out.push_str(",\n");
                }
                first = false;
                out.push_str(&format!("    \"{key}\": {}", crate::gojson::to_go_json(v)));
            }
        }
        out.push_str("\n}");
        out
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, "; {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

//! The network configuration (`net-conf.json`, etcd `<prefix>/config`).
//!
//! Parsing follows Go flannel exactly (case-insensitive keys, unknown keys ignored, `udp` when
//! `Backend` is absent) and validation reproduces every error message of the reference, because
//! operators grep logs for them and scripts check them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::Value;

use crate::gojson::{trimmed_literal, FoldedObject};

/// A configuration problem; the message is the reference's wording, shown to the operator as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    fn new(msg: impl Into<String>) -> Self {
        ConfigError(msg.into())
    }
}

/// The flannel network configuration, after parsing and (for etcd mode) validation.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    /// Whether IPv4 subnets are leased (default true).
    pub enable_ipv4: bool,
    /// Whether IPv6 subnets are leased (default false).
    pub enable_ipv6: bool,
    /// Whether masquerade/forward rules go to nftables instead of iptables.
    pub enable_nftables: bool,
    /// The whole IPv4 overlay network; `None` when absent or `0.0.0.0/0` (Go's "empty").
    pub network: Option<Ipv4Net>,
    /// Prefix length of each host's IPv4 subnet; 0 until defaulted.
    pub subnet_len: u32,
    /// Lowest IPv4 subnet handed out; `None` until defaulted.
    pub subnet_min: Option<Ipv4Addr>,
    /// Highest IPv4 subnet handed out; `None` until defaulted.
    pub subnet_max: Option<Ipv4Addr>,
    /// The whole IPv6 overlay network.
    pub ipv6_network: Option<Ipv6Net>,
    /// Prefix length of each host's IPv6 subnet; 0 until defaulted.
    pub ipv6_subnet_len: u32,
    /// Lowest IPv6 subnet handed out.
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    /// Highest IPv6 subnet handed out.
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    /// Lower-cased `Backend.Type` (`udp` when `Backend` is absent, empty when `Type` is missing).
    pub backend_type: String,
    /// The raw `Backend` object, parsed later by the chosen backend.
    pub backend: Value,
}

impl NetworkConfig {
    /// Parses a configuration document the way Go's `subnet.ParseConfig` does (no validation).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let obj = FoldedObject::parse(text, "subnet.Config").map_err(ConfigError)?;
        let err = ConfigError;
        let mut cfg = NetworkConfig {
            enable_ipv4: obj.bool_field("EnableIPv4").map_err(err)?.unwrap_or(true),
            enable_ipv6: obj.bool_field("EnableIPv6").map_err(err)?.unwrap_or(false),
            enable_nftables: obj
                .bool_field("EnableNFTables")
                .map_err(err)?
                .unwrap_or(false),
            network: None,
            subnet_len: obj
                .int_field("SubnetLen", "uint", 0, u32::MAX as i64)
                .map_err(err)?
                .unwrap_or(0) as u32,
            subnet_min: None,
            subnet_max: None,
            ipv6_network: None,
            ipv6_subnet_len: obj
                .int_field("IPv6SubnetLen", "uint", 0, u32::MAX as i64)
                .map_err(err)?
                .unwrap_or(0) as u32,
            ipv6_subnet_min: None,
            ipv6_subnet_max: None,
            backend_type: String::new(),
            backend: Value::Null,
        };
        if let Some(v) = obj.get("Network") {
            let net = parse_ipv4_cidr(&trimmed_literal(v))?;
            cfg.network = (net != Ipv4Net::default()).then_some(net);
        }
        if let Some(v) = obj.get("SubnetMin") {
            cfg.subnet_min = nonzero_v4(parse_ipv4_addr(&trimmed_literal(v))?);
        }
        if let Some(v) = obj.get("SubnetMax") {
            cfg.subnet_max = nonzero_v4(parse_ipv4_addr(&trimmed_literal(v))?);
        }
        if let Some(v) = obj.get("IPv6Network") {
            let net = parse_ipv6_cidr(&trimmed_literal(v))?;
            cfg.ipv6_network = (net != Ipv6Net::default()).then_some(net);
        }
        if let Some(v) = obj.get_non_null("IPv6SubnetMin") {
            cfg.ipv6_subnet_min = nonzero_v6(parse_ipv6_addr(&trimmed_literal(v))?);
        }
        if let Some(v) = obj.get_non_null("IPv6SubnetMax") {
            cfg.ipv6_subnet_max = nonzero_v6(parse_ipv6_addr(&trimmed_literal(v))?);
        }
        match obj.get_non_null("Backend") {
            None => cfg.backend_type = "udp".to_string(),
            Some(backend) => {
                let b = FoldedObject::from_value(backend.clone(), "struct { Type string }")
                    .and_then(|b| b.string_field("Type"))
                    .map_err(|e| {
                        ConfigError(format!("error decoding Backend property of config: {e}"))
                    })?;
                cfg.backend_type = b.unwrap_or_default().to_ascii_lowercase();
                cfg.backend = backend.clone();
            }
        }
        Ok(cfg)
    }

    /// Parses and validates in one step, as etcd mode does on every config read.
    pub fn parse_and_check(text: &str) -> Result<Self, ConfigError> {
        let mut cfg = Self::parse(text)?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Validates and fills in defaults like Go's `CheckNetworkConfig` (etcd mode only).
    pub fn check(&mut self) -> Result<(), ConfigError> {
        if self.enable_ipv4 {
            self.check_v4()?;
        }
        if self.enable_ipv6 {
            self.check_v6()?;
        }
        Ok(())
    }

    fn check_v4(&mut self) -> Result<(), ConfigError> {
        let network = self.network.ok_or_else(|| {
            ConfigError::new("please define a correct Network parameter in the flannel config")
        })?;
        let prefix = network.prefix_len() as u32;
        if self.subnet_len > 0 {
            if self.subnet_len > 30 {
                return Err(ConfigError::new("SubnetLen must be less than /31"));
            }
            if self.subnet_len < prefix + 2 {
                return Err(ConfigError::new(
                    "network must be able to accommodate at least four subnets",
                ));
            }
        } else if prefix > 28 {
            return Err(ConfigError::new(
                "network is too small. Minimum useful network prefix is /28",
            ));
        } else if prefix <= 22 {
            self.subnet_len = 24;
        } else {
            self.subnet_len = prefix + 2;
        }
        let size = 1u64 << (32 - self.subnet_len);
        let base = u32::from(network.network()) as u64;
        let end = base + (1u64 << (32 - prefix)); // first address after the network
        match self.subnet_min {
            None => self.subnet_min = Some(Ipv4Addr::from((base + size) as u32)),
            Some(min) if !network.contains(&min) => {
                return Err(ConfigError::new(
                    "SubnetMin is not in the range of the Network",
                ))
            }
            _ => {}
        }
        match self.subnet_max {
            // Go computes Next().IP - size in 32-bit arithmetic; wrap the same way.
            None => self.subnet_max = Some(Ipv4Addr::from(end.wrapping_sub(size) as u32)),
            Some(max) if !network.contains(&max) => {
                return Err(ConfigError::new(
                    "SubnetMax is not in the range of the Network",
                ))
            }
            _ => {}
        }
        let mask = u32::MAX << (32 - self.subnet_len);
        let min = self.subnet_min.unwrap_or(Ipv4Addr::UNSPECIFIED);
        if u32::from(min) & mask != u32::from(min) {
            return Err(ConfigError(format!(
                "SubnetMin is not on a SubnetLen boundary: {min}"
            )));
        }
        let max = self.subnet_max.unwrap_or(Ipv4Addr::UNSPECIFIED);
        if u32::from(max) & mask != u32::from(max) {
            return Err(ConfigError(format!(
                "SubnetMax is not on a SubnetLen boundary: {max}"
            )));
        }
        Ok(())
    }

    fn check_v6(&mut self) -> Result<(), ConfigError> {
        let network = self.ipv6_network.ok_or_else(|| {
            ConfigError::new("please define a correct IPv6Network parameter in the flannel config")
        })?;
        let prefix = network.prefix_len() as u32;
        if self.ipv6_subnet_len > 0 {
            if self.ipv6_subnet_len > 126 {
                return Err(ConfigError::new("SubnetLen must be less than /127"));
            }
            if self.ipv6_subnet_len < prefix + 2 {
                return Err(ConfigError::new(
                    "network must be able to accommodate at least four subnets",
                ));
            }
        } else if prefix > 124 {
            return Err(ConfigError::new(
                "IPv6Network is too small. Minimum useful network prefix is /124",
            ));
        } else if prefix <= 62 {
            self.ipv6_subnet_len = 64;
        } else {
            self.ipv6_subnet_len = prefix + 2;
        }
        let size = 1u128 << (128 - self.ipv6_subnet_len);
        let base = u128::from(network.network());
        let end = base.wrapping_add(1u128.checked_shl(128 - prefix).unwrap_or(0));
        match self.ipv6_subnet_min {
            None => self.ipv6_subnet_min = Some(Ipv6Addr::from(base.wrapping_add(size))),
            Some(min) if !network.contains(&min) => {
                return Err(ConfigError::new(
                    "IPv6SubnetMin is not in the range of the IPv6Network",
                ))
            }
            _ => {}
        }
        match self.ipv6_subnet_max {
            None => self.ipv6_subnet_max = Some(Ipv6Addr::from(end.wrapping_sub(size))),
            Some(max) if !network.contains(&max) => {
                return Err(ConfigError::new(
                    "IPv6SubnetMax is not in the range of the IPv6Network",
                ))
            }
            _ => {}
        }
        let mask = u128::MAX << (128 - self.ipv6_subnet_len);
        let min = self.ipv6_subnet_min.unwrap_or(Ipv6Addr::UNSPECIFIED);
        if u128::from(min) & mask != u128::from(min) {
            return Err(ConfigError(format!(
                "IPv6SubnetMin is not on a SubnetLen boundary: {min}"
            )));
        }
        let max = self.ipv6_subnet_max.unwrap_or(Ipv6Addr::UNSPECIFIED);
        if u128::from(max) & mask != u128::from(max) {
            return Err(ConfigError(format!(
                "IPv6SubnetMax is not on a SubnetLen boundary: {max}"
            )));
        }
        Ok(())
    }

    /// Whether `subnet` is one this configuration could hand out (range and prefix length).
    pub fn ipv4_subnet_compatible(&self, subnet: Ipv4Net) -> bool {
        match (self.subnet_min, self.subnet_max) {
            (Some(min), Some(max)) => {
                subnet.network() >= min
                    && subnet.network() <= max
                    && subnet.prefix_len() as u32 == self.subnet_len
            }
            _ => false,
        }
    }

    /// IPv6 counterpart of [`Self::ipv4_subnet_compatible`]; with IPv6 disabled only "none" fits.
    pub fn ipv6_subnet_compatible(&self, subnet: Option<Ipv6Net>) -> bool {
        if !self.enable_ipv6 {
            return subnet.is_none();
        }
        match (subnet, self.ipv6_subnet_min, self.ipv6_subnet_max) {
            (Some(s), Some(min), Some(max)) => {
                s.network() >= min
                    && s.network() <= max
                    && s.prefix_len() as u32 == self.ipv6_subnet_len
            }
            _ => false,
        }
    }
}

fn nonzero_v4(a: Ipv4Addr) -> Option<Ipv4Addr> {
    (!a.is_unspecified()).then_some(a)
}

fn nonzero_v6(a: Ipv6Addr) -> Option<Ipv6Addr> {
    (!a.is_unspecified()).then_some(a)
}

/// Parses a CIDR like Go's `net.ParseCIDR`, masking host bits.
pub fn parse_cidr(text: &str) -> Result<IpNet, ConfigError> {
    text.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| ConfigError(format!("invalid CIDR address: {text}")))
}

/// Parses an IPv4 CIDR like flannel's `IP4Net` (IPv6 rejected with the reference message).
pub fn parse_ipv4_cidr(text: &str) -> Result<Ipv4Net, ConfigError> {
    match parse_cidr(text)? {
        IpNet::V4(n) => Ok(n),
        IpNet::V6(_) => Err(ConfigError::new("invalid IPv4 CIDR format")),
    }
}

/// Parses an IPv6 CIDR like flannel's `IP6Net` (an IPv4 CIDR is taken as v4-mapped, as Go does).
pub fn parse_ipv6_cidr(text: &str) -> Result<Ipv6Net, ConfigError> {
    match parse_cidr(text)? {
        IpNet::V6(n) => Ok(n),
        IpNet::V4(n) => Ipv6Net::new(n.network().to_ipv6_mapped(), n.prefix_len() + 96)
            .map_err(|_| ConfigError(format!("invalid CIDR address: {text}"))),
    }
}

/// Parses an IPv4 address like flannel's `ParseIP4`.
pub fn parse_ipv4_addr(text: &str) -> Result<Ipv4Addr, ConfigError> {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(a),
        Ok(IpAddr::V6(a)) => a
            .to_ipv4_mapped()
            .ok_or_else(|| ConfigError::new("invalid IPv4 address format")),
        Err(_) => Err(ConfigError::new("invalid IP address format")),
    }
}

/// Parses an IPv6 address like flannel's `ParseIP6` (an IPv4 address becomes v4-mapped).
pub fn parse_ipv6_addr(text: &str) -> Result<Ipv6Addr, ConfigError> {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V6(a)) => Ok(a),
        Ok(IpAddr::V4(a)) => Ok(a.to_ipv6_mapped()),
        Err(_) => Err(ConfigError::new("invalid IP address format")),
    }
}

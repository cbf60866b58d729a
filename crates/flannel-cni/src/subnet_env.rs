//! Reading subnet.env the way the Go CNI plugin does (exact keys, comma lists, masked CIDRs).

use std::path::Path;

use ipnet::IpNet;

/// What the plugin needs from flanneld's subnet.env.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlannelEnv {
    /// `FLANNEL_NETWORK` entries (masked, de-duplicated, in order).
    pub networks: Vec<IpNet>,
    /// `FLANNEL_SUBNET` (masked).
    pub subnet: Option<IpNet>,
    /// `FLANNEL_IPV6_NETWORK` entries.
    pub ipv6_networks: Vec<IpNet>,
    /// `FLANNEL_IPV6_SUBNET` (masked).
    pub ipv6_subnet: Option<IpNet>,
    /// `FLANNEL_MTU`.
    pub mtu: Option<u32>,
    /// `FLANNEL_IPMASQ` (true only for exactly `true`).
    pub ipmasq: Option<bool>,
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("invalid CIDR address: {s}"))
}

fn parse_list(v: &str) -> Result<Vec<IpNet>, String> {
    let mut out: Vec<IpNet> = vec![];
    for part in v.split(',') {
        let n = parse_cidr(part)?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

impl FlannelEnv {
    /// Parses the text; errors are the reference's wording (without the outer prefix).
    pub fn parse(text: &str, path: &str) -> Result<Self, String> {
        let mut env = FlannelEnv::default();
        for raw in text.split('\n') {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            let (key, value) = match line.split_once('=') {
                Some(kv) => kv,
                None => {
                    if matches!(
                        line,
                        "FLANNEL_NETWORK"
                            | "FLANNEL_SUBNET"
                            | "FLANNEL_IPV6_NETWORK"
                            | "FLANNEL_IPV6_SUBNET"
                            | "FLANNEL_MTU"
                            | "FLANNEL_IPMASQ"
                    ) {
                        return Err(format!("{path}: line {line:?} has no '=' and no value"));
                    }
                    continue;
                }
            };
            match key {
                "FLANNEL_NETWORK" => env.networks = parse_list(value)?,
                "FLANNEL_SUBNET" => env.subnet = Some(parse_cidr(value)?),
                "FLANNEL_IPV6_NETWORK" => env.ipv6_networks = parse_list(value)?,
                "FLANNEL_IPV6_SUBNET" => env.ipv6_subnet = Some(parse_cidr(value)?),
                "FLANNEL_MTU" => {
                    let mtu = value.parse::<u64>().map_err(|_| {
                        format!("strconv.ParseUint: parsing {value:?}: invalid syntax")
                    })?;
                    let mtu = u32::try_from(mtu).map_err(|_| {
                        format!("strconv.ParseUint: parsing {value:?}: value out of range")
                    })?;
                    env.mtu = Some(mtu);
                }
                "FLANNEL_IPMASQ" => env.ipmasq = Some(value == "true"),
                _ => {}
            }
        }
        let mut missing = vec![];
        if env.networks.is_empty() && env.ipv6_networks.is_empty() {
            missing.push("FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK");
        }
        if env.subnet.is_none() && env.ipv6_subnet.is_none() {
            missing.push("FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET");
        }
        if env.mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if env.ipmasq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        if !missing.is_empty() {
            return Err(format!("{path} is missing {}", missing.join(", ")));
        }
        Ok(env)
    }

    /// Reads and parses a file; errors in the reference's full wording.
    pub fn load(path: &Path) -> Result<Self, String> {
        let p = path.display().to_string();
        let wrap = |e: String| {
            format!(
                "failed to load flannel 'subnet.env' file: {e}. Check the flannel pod log for this node."
            )
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            wrap(match e.kind() {
                std::io::ErrorKind::NotFound => format!("open {p}: no such file or directory"),
                _ => format!("open {p}: {e}"),
            })
        })?;
        Self::parse(&text, &p).map_err(wrap)
    }
}

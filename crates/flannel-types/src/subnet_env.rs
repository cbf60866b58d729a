//! `/run/flannel/subnet.env`: how flanneld tells the CNI plugin and Docker about this host.
//!
//! The line order and format are read by scripts and by the Go CNI plugin, so they are exact.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// What flanneld writes after it has a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The whole IPv4 network (`FLANNEL_NETWORK`), when IPv4 is enabled.
    pub network: Option<Ipv4Net>,
    /// This host's IPv4 subnet (written as its first address, `FLANNEL_SUBNET`).
    pub subnet: Option<Ipv4Net>,
    /// The whole IPv6 network, when IPv6 is enabled.
    pub ipv6_network: Option<Ipv6Net>,
    /// This host's IPv6 subnet.
    pub ipv6_subnet: Option<Ipv6Net>,
    /// MTU pods should use (`FLANNEL_MTU`).
    pub mtu: u32,
    /// Whether flanneld masquerades (`FLANNEL_IPMASQ`), so the bridge must not.
    pub ipmasq: bool,
}

fn first_host_v4(n: Ipv4Net) -> String {
    let ip = Ipv4Addr::from(u32::from(n.network()).wrapping_add(1));
    format!("{}/{}", ip, n.prefix_len())
}

fn first_host_v6(n: Ipv6Net) -> String {
    let ip = Ipv6Addr::from(u128::from(n.network()).wrapping_add(1));
    format!("{}/{}", ip, n.prefix_len())
}

impl SubnetEnv {
    /// The file contents, line for line as Go's `WriteSubnetFile` produces them.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let (Some(net), Some(sn)) = (self.network, self.subnet) {
            s.push_str(&format!(
                "FLANNEL_NETWORK={net}\nFLANNEL_SUBNET={}\n",
                first_host_v4(sn)
            ));
        }
        if let (Some(net), Some(sn)) = (self.ipv6_network, self.ipv6_subnet) {
            s.push_str(&format!(
                "FLANNEL_IPV6_NETWORK={net}\nFLANNEL_IPV6_SUBNET={}\n",
                first_host_v6(sn)
            ));
        }
        s.push_str(&format!(
            "FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.mtu, self.ipmasq
        ));
        s
    }

    /// Writes the file atomically (temp file, fsync, rename), mode 0644 whatever the umask.
    pub fn write_atomic(&self, path: &Path) -> std::io::Result<()> {
        write_file_atomic(path, self.render().as_bytes(), 0o644)
    }
}

/// Replaces `path` with `contents` so readers see the old or the new file, never a partial one.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{}.tmp{}", name, std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a dotenv file leniently (comments, `export `, quotes), as flanneld does on restart.
pub fn read_dotenv(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let mut v = v.trim();
        if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            v = &v[1..v.len() - 1];
        } else if let Some(i) = v.find(" #") {
            v = v[..i].trim_end();
        }
        out.insert(k.trim().to_string(), v.to_string());
    }
    out
}

/// The CIDRs listed under `key` (comma list, invalid entries skipped, host bits masked).
pub fn cidrs_from_env(vars: &BTreeMap<String, String>, key: &str) -> Vec<IpNet> {
    vars.get(key)
        .map(|v| {
            v.split(',')
                .filter_map(|c| c.parse::<IpNet>().ok().map(|n| n.trunc()))
                .collect()
        })
        .unwrap_or_default()
}

/// The subnets this host had before a restart, from an existing subnet.env (exactly one each).
pub fn previous_subnets(path: &Path) -> (Option<Ipv4Net>, Option<Ipv6Net>) {
    let Ok(text) = fs::read_to_string(path) else {
        return (None, None);
    };
    let vars = read_dotenv(&text);
    let v4 = match cidrs_from_env(&vars, "FLANNEL_SUBNET").as_slice() {
        [IpNet::V4(n)] => Some(*n),
        _ => None,
    };
    let v6 = match cidrs_from_env(&vars, "FLANNEL_IPV6_SUBNET").as_slice() {
        [IpNet::V6(n)] => Some(*n),
        _ => None,
    };
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_reference_layout() {
        let env = SubnetEnv {
            network: Some("10.5.0.0/16".parse().unwrap()),
            subnet: Some("10.5.72.0/24".parse().unwrap()),
            ipv6_network: Some("2001:cafe:42::/56".parse().unwrap()),
            ipv6_subnet: Some("2001:cafe:42::/64".parse().unwrap()),
            mtu: 1450,
            ipmasq: true,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n\
             FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn previous_subnet_list_rules() {
        let vars = read_dotenv("FLANNEL_SUBNET=10.244.1.0/24,not-a-cidr,10.244.2.0/24\n");
        assert_eq!(cidrs_from_env(&vars, "FLANNEL_SUBNET").len(), 2);
        let vars = read_dotenv("FLANNEL_SUBNET=not-a-cidr\n");
        assert!(cidrs_from_env(&vars, "FLANNEL_SUBNET").is_empty());
        let vars = read_dotenv("FLANNEL_SUBNET=10.5.72.1/24\n");
        assert_eq!(
            cidrs_from_env(&vars, "FLANNEL_SUBNET"),
            vec!["10.5.72.0/24".parse::<IpNet>().unwrap()]
        );
    }
}

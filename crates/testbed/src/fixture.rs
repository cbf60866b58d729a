//! Ready-made worlds that many tests share.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::{Etcd, Flanneld, Host, TempDir};

/// The default etcd prefix of flannel.
pub const PREFIX: &str = "/coreos.com/network";

/// One stand-alone host (`eth0` = 192.168.50.2/24) running a real etcd on 127.0.0.1:2379.
pub struct EtcdHost {
    /// The etcd server (dropped first).
    pub etcd: Etcd,
    /// Scratch space: subnet files, logs.
    pub dir: TempDir,
    /// The host namespace (dropped last).
    pub host: Host,
}

impl EtcdHost {
    /// Builds the host and starts etcd.
    pub fn new(tag: &str) -> Self {
        let host = Host::standalone(tag, Ipv4Addr::new(192, 168, 50, 2));
        let etcd = Etcd::start(&host.ns);
        EtcdHost {
            etcd,
            dir: TempDir::new(tag),
            host,
        }
    }

    /// Writes the network config under the default prefix.
    pub fn put_config(&self, json: &str) {
        self.etcd.put(&format!("{PREFIX}/config"), json);
    }

    /// The default subnet file path of this fixture.
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    /// Starts flanneld against this etcd with `--subnet-file` in the scratch dir plus `extra`.
    pub fn flanneld(&self, extra: &[&str]) -> Flanneld {
        let mut args = vec![
            format!("--etcd-endpoints={}", self.etcd.url()),
            format!("--subnet-file={}", self.subnet_file().display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Flanneld::start(&self.host.ns, self.dir.path(), &args)
    }

    /// Starts flanneld for the network at `prefix`, writing `subnet_file` (a name in the
    /// scratch dir), plus `extra` flags: several networks on one host.
    pub fn flanneld_for(&self, prefix: &str, subnet_file: &str, extra: &[&str]) -> Flanneld {
        let mut args = vec![
            format!("--etcd-endpoints={}", self.etcd.url()),
            format!("-etcd-prefix={prefix}"),
            format!("--subnet-file={}", self.dir.join(subnet_file).display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Flanneld::start(&self.host.ns, self.dir.path(), &args)
    }

    /// This host's subnet from the default subnet file.
    pub fn subnet(&self) -> ipnet::Ipv4Net {
        crate::env_subnet(&self.subnet_file())
    }

    /// The subnet keys under the default prefix.
    pub fn lease_keys(&self) -> Vec<String> {
        self.etcd.keys(&format!("{PREFIX}/subnets/"))
    }
}

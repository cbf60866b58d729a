//! The README's main job: a local flannel-rs cluster in network namespaces.
//!
//! Starts a real etcd and flanneld (alloc backend) on a namespace host, prints the lease as
//! stored in etcd and the subnet.env flanneld wrote, then tears everything down.

use std::time::Duration;

use testbed::fixture::PREFIX;
use testbed::EtcdHost;

fn main() {
    testbed::require_root();
    let world = EtcdHost::new("demo");
    println!(
        "== host namespace {} (eth0 {}) with etcd at {}",
        world.host.ns.name(),
        world.host.ip,
        world.etcd.url()
    );
    let config = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#;
    world.put_config(config);
    println!("== network config {PREFIX}/config = {config}");
    let mut flanneld = world.flanneld(&[]);
    let env = flanneld.wait_subnet_env(&world.subnet_file(), Duration::from_secs(30));
    println!("== lease in etcd");
    for key in world.lease_keys() {
        let value = world.etcd.get(&key).unwrap_or_default();
        let ttl = world.etcd.ttl(&key);
        println!("{key} = {value}   (TTL {ttl} s)");
    }
    println!("== {}", world.subnet_file().display());
    print!("{env}");
    let status = flanneld.stop();
    println!(
        "== flanneld stopped with {status}; lease kept: {}",
        world.lease_keys().len() == 1
    );
    println!("== tearing down namespaces");
}

//! Runs the test Kubernetes API server until killed, for trying clients by hand.
//!
//! `frs-kube-apiserver [ADDR] [--tls DIR] [--kubeconfig PATH] [--nodes N]`
//! (default 127.0.0.1:6443, plain HTTP, admin kubeconfig at ./frs-kubeconfig, no nodes).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use testbed::kubeapi::{kubelet_like_node, KubeTls};
use testbed::{KubeApiOptions, KubeApiServer};

fn main() {
    let mut addr: SocketAddr = "127.0.0.1:6443".parse().expect("addr");
    let mut opts = KubeApiOptions::default();
    let mut kubeconfig = PathBuf::from("frs-kubeconfig");
    let mut nodes = 0u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--tls" => opts.tls = Some(KubeTls::Generate(PathBuf::from(value()))),
            "--kubeconfig" => kubeconfig = PathBuf::from(value()),
            "--nodes" => nodes = value().parse().expect("--nodes N"),
            other => addr = other.parse().expect("ADDR like 127.0.0.1:6443"),
        }
    }
    let server = KubeApiServer::start(None, addr, opts);
    for i in 0..nodes {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + i + 1);
        let cidr = format!("10.{}.{}.0/24", 100 + i / 256, i % 256);
        server.create_object(kubelet_like_node(&format!("node-{i}"), &cidr, ip, &[]));
    }
    server.write_kubeconfig(&kubeconfig, KubeApiServer::ADMIN_TOKEN);
    println!(
        "serving {} (admin kubeconfig {}, admin token {}, flannel token {})",
        server.url(),
        kubeconfig.display(),
        KubeApiServer::ADMIN_TOKEN,
        KubeApiServer::FLANNEL_TOKEN
    );
    loop {
        std::thread::park();
    }
}

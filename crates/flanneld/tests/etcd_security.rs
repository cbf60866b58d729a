//! etcd with client-certificate TLS and with username/password authentication.

use std::time::Duration;

use testbed::fixture::PREFIX;
use testbed::{tls, Etcd, Flanneld, Host, TempDir};

const T: Duration = Duration::from_secs(30);

#[test]
fn connects_to_etcd_that_requires_client_certificates() {
    let host = Host::standalone("tls", "192.168.50.2".parse().unwrap());
    let dir = TempDir::new("tls");
    let files = tls::generate(dir.path());
    let etcd = Etcd::start_with(&host.ns, 2379, Some(files.clone()));
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    let subnet_file = dir.join("subnet.env");
    // http:// in the endpoint as in flannel's own functional test: certificates imply TLS.
    let mut f = Flanneld::start(
        &host.ns,
        dir.path(),
        &[
            "--etcd-endpoints=http://127.0.0.1:2379".to_string(),
            format!("--etcd-cafile={}", files.ca.display()),
            format!("--etcd-certfile={}", files.client_cert.display()),
            format!("--etcd-keyfile={}", files.client_key.display()),
            format!("--subnet-file={}", subnet_file.display()),
        ],
    );
    f.wait_subnet_env(&subnet_file, T);
    assert_eq!(etcd.keys(&format!("{PREFIX}/subnets/")).len(), 1);
    assert!(!f.log().contains("This is insecure"));
}

#[test]
fn authenticates_with_username_and_password_without_logging_it() {
    let host = Host::standalone("auth", "192.168.50.2".parse().unwrap());
    let dir = TempDir::new("auth");
    let mut etcd = Etcd::start(&host.ns);
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    etcd.enable_auth("Sup3rSecret");
    let subnet_file = dir.join("subnet.env");
    let mut f = Flanneld::start(
        &host.ns,
        dir.path(),
        &[
            format!("--etcd-endpoints={}", etcd.url()),
            "--etcd-username=root".to_string(),
            "--etcd-password=Sup3rSecret".to_string(),
            format!("--subnet-file={}", subnet_file.display()),
        ],
    );
    f.wait_subnet_env(&subnet_file, T);
    assert_eq!(etcd.keys(&format!("{PREFIX}/subnets/")).len(), 1);
    assert!(
        !f.log().contains("Sup3rSecret"),
        "password leaked into the log"
    );
}

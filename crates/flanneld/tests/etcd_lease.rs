//! flanneld's lease life cycle against a real etcd, in a namespace host.

use std::time::Duration;

use testbed::fixture::PREFIX;
use testbed::{wait_for, EtcdHost, Flanneld};

const ALLOC: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#;
const T: Duration = Duration::from_secs(30);

fn subnet_line(env: &str) -> String {
    env.lines()
        .find(|l| l.starts_with("FLANNEL_SUBNET="))
        .expect("FLANNEL_SUBNET line")
        .to_string()
}

fn key_for(env: &str) -> String {
    // FLANNEL_SUBNET=10.5.90.1/24 -> <prefix>/subnets/10.5.90.0-24
    let cidr = subnet_line(env)
        .trim_start_matches("FLANNEL_SUBNET=")
        .to_string();
    let (ip, len) = cidr.split_once('/').unwrap();
    let mut o: Vec<u8> = ip.split('.').map(|x| x.parse().unwrap()).collect();
    o[3] -= 1;
    format!("{PREFIX}/subnets/{}.{}.{}.{}-{len}", o[0], o[1], o[2], o[3])
}

#[test]
fn lease_key_json_ttl_and_subnet_env_are_exact() {
    let w = EtcdHost::new("lease");
    w.put_config(ALLOC);
    let mut f = w.flanneld(&["--public-ip=192.168.50.2"]);
    let env = f.wait_subnet_env(&w.subnet_file(), T);

    let keys = w.lease_keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = &keys[0];
    assert_eq!(key, &key_for(&env));
    assert_eq!(
        w.etcd.get(key).unwrap(),
        r#"{"PublicIP":"192.168.50.2","PublicIPv6":null}"#
    );
    let ttl = w.etcd.ttl(key);
    assert!((86300..=86400).contains(&ttl), "ttl {ttl}");

    // subnet.env: exact lines and order, mode 0644.
    let lines: Vec<&str> = env.lines().collect();
    assert_eq!(lines.len(), 4, "{env}");
    assert_eq!(lines[0], "FLANNEL_NETWORK=10.5.0.0/16");
    assert!(lines[1].starts_with("FLANNEL_SUBNET=10.5.") && lines[1].ends_with(".1/24"));
    assert_eq!(lines[2], "FLANNEL_MTU=1500");
    assert_eq!(lines[3], "FLANNEL_IPMASQ=false");
    assert!(env.ends_with('\n'));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(w.subnet_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);

    // SIGTERM: clean exit, lease kept.
    assert!(f.stop().success());
    assert_eq!(w.lease_keys(), vec![key.clone()]);
}

#[test]
fn restart_reuses_the_same_subnet() {
    let w = EtcdHost::new("restart");
    w.put_config(ALLOC);
    let mut f = w.flanneld(&[]);
    let first = f.wait_subnet_env(&w.subnet_file(), T);
    f.kill();
    std::fs::remove_file(w.subnet_file()).unwrap();
    let mut f = w.flanneld(&[]);
    let second = f.wait_subnet_env(&w.subnet_file(), T);
    assert_eq!(subnet_line(&first), subnet_line(&second));
    assert_eq!(w.lease_keys().len(), 1);
    assert!(f.log().contains("for current IP (192.168.50.2), reusing"));
}

#[test]
fn previous_subnet_from_subnet_env_is_reused_when_free() {
    let w = EtcdHost::new("prev");
    w.put_config(ALLOC);
    std::fs::write(
        w.subnet_file(),
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.77.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let mut f = w.flanneld(&[]);
    f.wait_log("Wrote subnet file", T);
    assert_eq!(
        w.lease_keys(),
        vec![format!("{PREFIX}/subnets/10.5.77.0-24")]
    );

    // Not reused when someone else holds it.
    drop(f);
    w.etcd.del(&format!("{PREFIX}/subnets/10.5.77.0-24"));
    w.etcd.put(
        &format!("{PREFIX}/subnets/10.5.77.0-24"),
        r#"{"PublicIP":"192.168.50.99","PublicIPv6":null}"#,
    );
    let mut f = w.flanneld(&[]);
    f.wait_log("Wrote subnet file", T);
    let env = std::fs::read_to_string(w.subnet_file()).unwrap();
    assert_ne!(subnet_line(&env), "FLANNEL_SUBNET=10.5.77.1/24");
    assert_eq!(w.lease_keys().len(), 2);
}

#[test]
fn fifty_racing_daemons_get_distinct_subnets() {
    let w = EtcdHost::new("race");
    // /22 split into /28s: 63 usable subnets for 50 hosts.
    w.put_config(r#"{"Network":"10.9.0.0/22","SubnetLen":28,"Backend":{"Type":"alloc"}}"#);
    let n = 50;
    for i in 0..n {
        w.host.ns.ip(&[
            "addr",
            "add",
            &format!("192.168.60.{}/24", i + 10),
            "dev",
            "eth0",
        ]);
    }
    let mut daemons: Vec<(Flanneld, std::path::PathBuf)> = (0..n)
        .map(|i| {
            let file = w.dir.join(&format!("subnet-{i}.env"));
            let f = Flanneld::start(
                &w.host.ns,
                w.dir.path(),
                &[
                    format!("--etcd-endpoints={}", w.etcd.url()),
                    format!("--subnet-file={}", file.display()),
                    format!("--public-ip=192.168.60.{}", i + 10),
                ],
            );
            (f, file)
        })
        .collect();
    let mut subnets = std::collections::BTreeSet::new();
    for (f, file) in daemons.iter_mut() {
        let env = f.wait_subnet_env(file, Duration::from_secs(90));
        subnets.insert(subnet_line(&env));
    }
    assert_eq!(subnets.len(), n, "duplicate subnets handed out");
    assert_eq!(w.lease_keys().len(), n);
    for (f, _) in daemons.iter_mut() {
        assert!(f.try_status().is_none(), "a daemon exited:\n{}", f.log());
    }
}

#[test]
fn out_of_subnets_is_a_clear_error() {
    let w = EtcdHost::new("full");
    // /28 -> /30 subnets; first skipped: .4, .8, .12 usable.
    w.put_config(r#"{"Network":"10.9.0.0/28","Backend":{"Type":"alloc"}}"#);
    for (i, sn) in ["10.9.0.4-30", "10.9.0.8-30", "10.9.0.12-30"]
        .iter()
        .enumerate()
    {
        w.etcd.put(
            &format!("{PREFIX}/subnets/{sn}"),
            &format!(r#"{{"PublicIP":"192.168.70.{i}","PublicIPv6":null}}"#),
        );
    }
    let mut f = w.flanneld(&[]);
    let st = f.wait_exit(T);
    assert_eq!(st.code(), Some(1));
    assert!(f.log().contains("out of subnets"), "{}", f.log());
    assert_eq!(w.lease_keys().len(), 3, "nothing may be lost");
}

#[test]
fn garbage_under_subnets_is_skipped_never_fatal() {
    let w = EtcdHost::new("garbage");
    // The daemon leases from 10.5.200.0 up; the test writes other hosts' keys below that.
    w.put_config(
        r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.200.0","Backend":{"Type":"alloc"}}"#,
    );
    w.etcd.put(&format!("{PREFIX}/subnets/not-a-subnet"), "{}");
    w.etcd
        .put(&format!("{PREFIX}/subnets/10.5.3.0-24"), "garbage");
    w.etcd.put(
        &format!("{PREFIX}/subnets/10.5.4.0-24"),
        r#"{"PublicIP":null}"#,
    );
    let mut f = w.flanneld(&[]);
    f.wait_subnet_env(&w.subnet_file(), T);
    assert!(f.log().contains("Ignoring bad subnet node"), "{}", f.log());
    // More garbage while running, then a valid lease: still handled.
    w.etcd.put(&format!("{PREFIX}/subnets/10.5.5.0-24"), "[1,2");
    w.etcd.put(
        &format!("{PREFIX}/subnets/10.5.6.0-24"),
        r#"{"PublicIP":"192.168.50.66","PublicIPv6":null}"#,
    );
    f.wait_log("lease added: 10.5.6.0-24", T);
    assert!(f.try_status().is_none());
    assert_eq!(f.known_leases(), vec!["10.5.6.0-24".to_string()]);
    // The garbage keys are still there: nothing deleted someone else's data.
    assert_eq!(w.lease_keys().len(), 6);
}

#[test]
fn reservation_is_honoured_and_stays_a_reservation() {
    let w = EtcdHost::new("reserve");
    w.put_config(ALLOC);
    let key = format!("{PREFIX}/subnets/10.5.200.0-24");
    w.etcd
        .put(&key, r#"{"PublicIP":"192.168.50.2","PublicIPv6":null}"#);
    let mut f = w.flanneld(&[]);
    let env = f.wait_subnet_env(&w.subnet_file(), T);
    assert_eq!(subnet_line(&env), "FLANNEL_SUBNET=10.5.200.1/24");
    assert_eq!(w.etcd.lease_id(&key), 0, "reservation got a TTL");
    assert_eq!(w.lease_keys(), vec![key]);
}

#[test]
fn own_lease_deleted_is_reacquired_in_process() {
    let w = EtcdHost::new("revoke");
    w.put_config(ALLOC);
    let mut f = w.flanneld(&[]);
    let env = f.wait_subnet_env(&w.subnet_file(), T);
    f.wait_log("Running backend", T);
    let key = key_for(&env);
    w.etcd.del(&key);
    // The reference exits here; we take the same subnet back and keep running.
    f.wait_log("re-acquired; data path unchanged", T);
    assert!(f.try_status().is_none());
    assert!(w.etcd.get(&key).is_some());
    assert!(f
        .log()
        .contains("has been revoked (deleted or expired); re-acquiring it"));
}

#[test]
fn incompatible_own_lease_is_replaced() {
    let w = EtcdHost::new("incompat");
    w.put_config(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.20.0","Backend":{"Type":"alloc"}}"#);
    let stale = format!("{PREFIX}/subnets/10.5.99.0-24");
    w.etcd
        .put(&stale, r#"{"PublicIP":"192.168.50.2","PublicIPv6":null}"#);
    let mut f = w.flanneld(&[]);
    let env = f.wait_subnet_env(&w.subnet_file(), T);
    let third: u8 = subnet_line(&env)
        .split('.')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert!((10..=20).contains(&third), "{env}");
    assert!(!w.lease_keys().contains(&stale));
}

#[test]
fn bad_config_is_reported_and_retried_until_fixed() {
    let w = EtcdHost::new("badconf");
    w.put_config(r#"{"Network":"10.5.0.0/30","Backend":{"Type":"alloc"}}"#);
    let mut f = w.flanneld(&[]);
    f.wait_log(
        "Couldn't fetch network config: network is too small. Minimum useful network prefix is /28",
        T,
    );
    assert!(f.try_status().is_none());
    w.put_config(ALLOC);
    f.wait_subnet_env(&w.subnet_file(), T);
}

#[test]
fn missing_config_names_the_etcd_v3_hint() {
    let w = EtcdHost::new("noconf");
    let mut f = w.flanneld(&[]);
    f.wait_log(
        "flannel config not found in etcd store. Did you create your config using etcdv3 API?",
        T,
    );
    wait_for(T, "daemon still running", || {
        f.try_status().is_none().then_some(())
    });
}

#[test]
fn two_networks_on_one_host() {
    let w = EtcdHost::new("multi");
    w.etcd.put(
        "/vxlan/network/config",
        r#"{"Network":"10.11.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    w.etcd.put(
        "/hostgw/network/config",
        r#"{"Network":"10.12.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    let (a_file, b_file) = (w.dir.join("vxlan.env"), w.dir.join("hostgw.env"));
    let mut a = w.flanneld_for("/vxlan/network", "vxlan.env", &[]);
    let mut b = w.flanneld_for("/hostgw/network", "hostgw.env", &[]);
    let a_env = a.wait_subnet_env(&a_file, T);
    let b_env = b.wait_subnet_env(&b_file, T);
    assert!(a_env.contains("FLANNEL_NETWORK=10.11.0.0/16\nFLANNEL_SUBNET=10.11."));
    assert!(b_env.contains("FLANNEL_NETWORK=10.12.0.0/16\nFLANNEL_SUBNET=10.12."));
    assert_eq!(w.etcd.keys("/vxlan/network/subnets/").len(), 1);
    assert_eq!(w.etcd.keys("/hostgw/network/subnets/").len(), 1);
}

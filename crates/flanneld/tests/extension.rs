//! extension backend end to end on this host's kernel: the reference's sample vxlan-by-extension
//! set-up carries pod traffic between 2 hosts; every command sees exactly the documented
//! environment and stdin; a failing command stops start-up with a clear error that names it.
//!
//! Since v0.28.2 the reference execs commands without a shell, so the sample's shell one-liners
//! (dist/extension-vxlan, verbatim) are saved as scripts and the commands run `/bin/sh <script>`.

use std::time::Duration;

use testbed::{wait_for, Cluster, Flanneld, TempDir};

const T: Duration = Duration::from_secs(30);

/// The reference's dist/extension-vxlan commands, unchanged.
const PRE: &str = r#"export VNI=1; export IF_NAME=flannel-vxlan; ip link del "$IF_NAME" 2>/dev/null; ip link add "$IF_NAME" type vxlan id "$VNI" dstport 8472 nolearning && ip link set mtu 1450 dev "$IF_NAME" && cat "/sys/class/net/${IF_NAME}/address""#;
const POST: &str = r#"export IF_NAME=flannel-vxlan; export SUBNET_IP=$(echo "$SUBNET" | cut -d'/' -f 1); ip addr add "${SUBNET_IP}/32" dev "$IF_NAME" && ip link set "$IF_NAME" up"#;
const ADD: &str = r#"export SUBNET_IP=$(echo "$SUBNET" | cut -d'/' -f 1); export IF_NAME=flannel-vxlan; read VTEP; ip route add "$SUBNET" nexthop via "$SUBNET_IP" dev "$IF_NAME" onlink && ip neigh replace "$SUBNET_IP" dev "$IF_NAME" lladdr "$VTEP" && bridge fdb add "$VTEP" dev "$IF_NAME" self dst "$PUBLIC_IP""#;

fn script(dir: &TempDir, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

#[test]
fn reference_vxlan_sample_carries_pod_traffic_between_two_hosts() {
    let mut c = Cluster::new(2);
    let d = TempDir::new("ext-sample");
    let config = serde_json::json!({
        "Network": "10.50.0.0/16",
        "Backend": {
            "Type": "extension",
            "PreStartupCommand": format!("/bin/sh {}", script(&d, "pre.sh", PRE)),
            "PostStartupCommand": format!("/bin/sh {}", script(&d, "post.sh", POST)),
            "SubnetAddCommand": format!("/bin/sh {}", script(&d, "add.sh", ADD)),
        }
    });
    c.put_config(None, &config.to_string());
    c.start_all(&[]);
    c.add_pod(0);
    c.add_pod(1);
    c.wait_full_mesh(T);
    // The VTEP MAC travelled as BackendData, a JSON string.
    let mac = c.hosts[1]
        .ns
        .run("cat", &["/sys/class/net/flannel-vxlan/address"]);
    let lease = c.lease(1);
    assert_eq!(lease["BackendType"], "extension");
    assert_eq!(lease["BackendData"], mac.trim());
    assert_eq!(c.env_var(0, "FLANNEL_MTU"), "1500");
}

/// A script that records its arguments, the documented variables and stdin under `dir/<tag>`.
const RECORD: &str = r#"tag=$1; shift
out="$DIR/$tag"
{
  echo "args=$tag $*"
  for v in NETWORK SUBNET IPV6SUBNET PUBLIC_IP PUBLIC_IPV6; do
    eval "echo $v=\${$v-UNSET}"
  done
  echo "stdin=$(cat)"
} > "$out.tmp"
mv "$out.tmp" "$out"
[ "$tag" = pre ] && echo 'data <&> "quoted"'
[ "$tag" = pre ] && echo 'this is stderr, not data' >&2
exit 0
"#;

#[test]
fn commands_get_the_documented_environment_and_stdin() {
    let mut c = Cluster::new(2);
    let d = TempDir::new("ext-env");
    let rec = script(&d, "record.sh", RECORD);
    let dirs: Vec<TempDir> = (0..2).map(|_| TempDir::new("ext-rec")).collect();
    let cmd = |tag: &str| format!("/bin/sh {rec} {tag} ${{SUBNET}} $PUBLIC_IP");
    let config = serde_json::json!({
        "Network": "10.50.0.0/16",
        "Backend": {
            "Type": "extension",
            "PreStartupCommand": cmd("pre"),
            "PostStartupCommand": cmd("post"),
            "SubnetAddCommand": cmd("add"),
            "SubnetRemoveCommand": cmd("remove"),
        }
    });
    c.put_config(None, &config.to_string());
    for (i, dir) in dirs.iter().enumerate() {
        let dir = dir.path().display().to_string();
        c.start_flanneld_env(i, &[], &[("DIR", dir.as_str())]);
    }
    let read = |h: usize, tag: &str| {
        let p = dirs[h].join(tag);
        wait_for(T, &format!("h{} {tag} record", h + 1), || {
            std::fs::read_to_string(&p).ok()
        })
    };
    // BackendData = the pre command's trimmed stdout as a JSON string, encoded as Go does.
    assert_eq!(
        c.etcd.get(&c.lease_key(1)).unwrap(),
        r#"{"PublicIP":"192.168.100.12","PublicIPv6":null,"BackendType":"extension","BackendData":"data \u003c\u0026\u003e \"quoted\""}"#
    );
    let s1 = c.subnet(0).to_string();
    let s2 = c.subnet(1).to_string();
    // Pre: before the lease, nothing set; stdin empty.
    assert_eq!(
        read(0, "pre"),
        "args=pre  \nNETWORK=UNSET\nSUBNET=UNSET\nIPV6SUBNET=UNSET\nPUBLIC_IP=UNSET\nPUBLIC_IPV6=UNSET\nstdin=\n"
    );
    // Post: our lease, Go's texts for the absent IPv6 parts.
    assert_eq!(
        read(0, "post"),
        format!("args=post {s1} 192.168.100.11\nNETWORK=10.50.0.0/16\nSUBNET={s1}\nIPV6SUBNET=::/0\nPUBLIC_IP=192.168.100.11\nPUBLIC_IPV6=<nil>\nstdin=\n")
    );
    // Add on h1 for h2's lease: its subnet and public IP; stdin = its BackendData string.
    assert_eq!(
        read(0, "add"),
        format!("args=add {s2} 192.168.100.12\nNETWORK=UNSET\nSUBNET={s2}\nIPV6SUBNET=\nPUBLIC_IP=192.168.100.12\nPUBLIC_IPV6=\nstdin=data <&> \"quoted\"\n")
    );
    // Remove when h2's lease goes.
    c.hosts[1].flanneld.as_mut().unwrap().kill();
    c.etcd.del(&c.lease_key(1));
    assert_eq!(
        read(0, "remove"),
        format!("args=remove {s2} 192.168.100.12\nNETWORK=UNSET\nSUBNET={s2}\nIPV6SUBNET=\nPUBLIC_IP=192.168.100.12\nPUBLIC_IPV6=\nstdin=data <&> \"quoted\"\n")
    );
    // Command output is never logged.
    let log = c.flanneld(0).log();
    assert!(
        !log.contains("quoted") && !log.contains("this is stderr"),
        "{log}"
    );
}

#[test]
fn a_failing_command_stops_startup_with_a_clear_error() {
    let c = Cluster::new(1);
    let d = TempDir::new("ext-fail");
    let fail = script(
        &d,
        "fail.sh",
        "echo secret-key-material; echo 'vxlan device busy' >&2; exit 7\n",
    );
    let config = serde_json::json!({
        "Network": "10.50.0.0/16",
        "Backend": {"Type": "extension", "PreStartupCommand": format!("/bin/sh {fail}")}
    });
    c.put_config(None, &config.to_string());
    let h = c.hosts[0].ns.clone();
    let mut f = Flanneld::start(
        &h,
        c.dir.path(),
        &[format!("--etcd-endpoints={}", c.etcd.url())],
    );
    let status = f.wait_exit(T);
    assert!(!status.success());
    let log = f.log();
    assert!(
        log.contains(
            r#"PreStartupCommand "/bin/sh" failed (exit status 7); stderr: "vxlan device busy""#
        ),
        "{log}"
    );
    assert!(!log.contains("secret-key-material"), "{log}");
    assert!(c.etcd.keys("/coreos.com/network/subnets").is_empty());
}

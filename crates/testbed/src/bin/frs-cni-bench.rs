//! Benchmark: the `flannel` CNI plugin's own overhead per ADD and DEL, excluding the delegate.
//!
//! A trivial delegate (a shell script that answers a canned result) is timed alone and through
//! the plugin, interleaved call by call so machine noise hits both alike; the plugin's overhead
//! is the difference of the medians. `frs-cni-bench [--calls N]`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(program: &Path, command: &str, id: &str, cni_path: &str, stdin: &str) -> Duration {
    let start = Instant::now();
    let mut child = Command::new(program)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", "/run/netns/none")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{} {command} failed: {}",
        program.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut calls = 300usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--calls" => calls = args.next().and_then(|n| n.parse().ok()).expect("--calls N"),
            _ => {
                eprintln!("usage: frs-cni-bench [--calls N]");
                std::process::exit(2);
            }
        }
    }
    let dir = testbed::TempDir::new("cnibench");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let delegate = bin.join("bridge");
    std::fs::write(
        &delegate,
        "#!/bin/sh\ncat >/dev/null\n[ \"$CNI_COMMAND\" = ADD ] && echo '{\"cniVersion\":\"1.0.0\",\"ips\":[{\"address\":\"10.1.17.2/24\",\"gateway\":\"10.1.17.1\"}]}'\nexit 0\n",
    )
    .expect("write delegate");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&delegate, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(
        dir.join("subnet.env"),
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .expect("subnet.env");
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "bench",
        "type": "flannel",
        "subnetFile": dir.join("subnet.env"),
        "dataDir": dir.join("data"),
        "delegate": {"hairpinMode": true, "isDefaultGateway": true},
    })
    .to_string();
    let delegate_conf =
        r#"{"cniVersion":"1.0.0","name":"bench","type":"bridge","ipam":{"type":"host-local"}}"#;
    let plugin = testbed::binary("flannel");
    let cni_path = bin.display().to_string();
    let (mut add, mut del, mut d_add, mut d_del) = (vec![], vec![], vec![], vec![]);
    let mut floor = vec![];
    for i in 0..calls {
        let t = Instant::now();
        let _ = Command::new("/bin/true").status();
        floor.push(t.elapsed());
        let id = format!("bench-{i}");
        d_add.push(run(&delegate, "ADD", &id, &cni_path, delegate_conf));
        add.push(run(&plugin, "ADD", &id, &cni_path, &conf));
        d_del.push(run(&delegate, "DEL", &id, &cni_path, delegate_conf));
        del.push(run(&plugin, "DEL", &id, &cni_path, &conf));
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (a, da, dl, dd) = (median(add), median(d_add), median(del), median(d_del));
    println!("flannel CNI plugin overhead, median of {calls} calls each (delegate excluded)");
    println!(
        "ADD: {:>8.0} us total, delegate alone {:>8.0} us, plugin overhead {:>8.0} us",
        us(a),
        us(da),
        us(a.saturating_sub(da))
    );
    println!(
        "DEL: {:>8.0} us total, delegate alone {:>8.0} us, plugin overhead {:>8.0} us",
        us(dl),
        us(dd),
        us(dl.saturating_sub(dd))
    );
    println!(
        "floor: starting any process (/bin/true) takes {:>8.0} us here",
        us(median(floor))
    );
    let size = std::fs::metadata(&plugin).map(|m| m.len()).unwrap_or(0);
    println!("plugin binary: {} ({} KiB)", plugin.display(), size / 1024);
}

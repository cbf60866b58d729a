//! Object helpers: timestamps, uids, and a realistic kubelet-registered Node.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// RFC 3339 UTC time with second precision, as Kubernetes writes `metav1.Time`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian, era-based).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Seconds since the epoch of a time written by [`rfc3339`] (`YYYY-MM-DDTHH:MM:SSZ`).
pub(crate) fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days since 1970-01-01 from a civil date (inverse of the conversion in `rfc3339`).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

pub(crate) fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

fn random_u64() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// A random version-4 UUID in its usual text form.
pub(crate) fn new_uid() -> String {
    let a = random_u64();
    let b = random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

fn annotations_map(annotations: &[(&str, &str)]) -> Value {
    let mut m = Map::new();
    for (k, v) in annotations {
        m.insert((*k).to_string(), (*v).into());
    }
    Value::Object(m)
}

/// A minimal Node: name, annotations, `spec.podCIDR(s)`.
pub(crate) fn simple_node(name: &str, pod_cidrs: &[&str], annotations: &[(&str, &str)]) -> Value {
    let mut spec = Map::new();
    if let Some(first) = pod_cidrs.first() {
        spec.insert("podCIDR".into(), (*first).into());
        spec.insert("podCIDRs".into(), json!(pod_cidrs));
    }
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
            "annotations": annotations_map(annotations),
        },
        "spec": spec,
        "status": {},
    })
}

/// A Node shaped like one a kubelet registers (about 5 KB of JSON: labels, addresses,
/// capacity/allocatable, five conditions, ten images with digests and sizes, nodeInfo,
/// daemonEndpoints), for benchmarks.
pub fn kubelet_like_node(
    name: &str,
    pod_cidr: &str,
    internal_ip: Ipv4Addr,
    annotations: &[(&str, &str)],
) -> Value {
    let now = now_rfc3339();
    let mut ann = annotations_map(annotations);
    if let Some(m) = ann.as_object_mut() {
        m.insert(
            "kubeadm.alpha.kubernetes.io/cri-socket".into(),
            "unix:///run/containerd/containerd.sock".into(),
        );
        m.insert("node.alpha.kubernetes.io/ttl".into(), "0".into());
        m.insert(
            "volumes.kubernetes.io/controller-managed-attach-detach".into(),
            "true".into(),
        );
    }
    let cond = |typ: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": typ,
            "status": status,
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
            "reason": reason,
            "message": message,
        })
    };
    let images = [
        ("registry.k8s.io/etcd", "3.5.16-0", 57_680_541u64),
        ("registry.k8s.io/kube-apiserver", "v1.32.6", 28_671_624),
        (
            "registry.k8s.io/kube-controller-manager",
            "v1.32.6",
            26_259_392,
        ),
        ("registry.k8s.io/kube-proxy", "v1.32.6", 30_907_858),
        ("registry.k8s.io/kube-scheduler", "v1.32.6", 20_657_536),
        ("registry.k8s.io/coredns/coredns", "v1.11.3", 18_562_039),
        ("docker.io/flannel/flannel", "v0.27.0", 32_190_420),
        (
            "docker.io/flannel/flannel-cni-plugin",
            "v1.7.1-flannel1",
            4_877_888,
        ),
        (
            "registry.k8s.io/metrics-server/metrics-server",
            "v0.7.2",
            19_494_617,
        ),
        ("registry.k8s.io/pause", "3.10", 320_368),
    ];
    let images: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, (repo, tag, size))| {
            let digest: String = (0..4)
                .map(|j| {
                    format!(
                        "{:016x}",
                        ((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
                            ^ (j * 0x1234_5678_9abc)
                    )
                })
                .collect();
            json!({
                "names": [format!("{repo}@sha256:{digest}"), format!("{repo}:{tag}")],
                "sizeBytes": size,
            })
        })
        .collect();
    let mut spec = Map::new();
    if !pod_cidr.is_empty() {
        spec.insert("podCIDR".into(), pod_cidr.into());
        spec.insert("podCIDRs".into(), json!([pod_cidr]));
    }
    spec.insert(
        "providerID".into(),
        format!("kind://docker/cluster/{name}").into(),
    );
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "standard-4",
                "topology.kubernetes.io/region": "region-1",
                "topology.kubernetes.io/zone": "region-1a",
            },
            "annotations": ann,
        },
        "spec": spec,
        "status": {
            "capacity": {
                "cpu": "4", "ephemeral-storage": "102626232Ki", "hugepages-1Gi": "0",
                "hugepages-2Mi": "0", "memory": "16369604Ki", "pods": "110",
            },
            "allocatable": {
                "cpu": "4", "ephemeral-storage": "102626232Ki", "hugepages-1Gi": "0",
                "hugepages-2Mi": "0", "memory": "16267204Ki", "pods": "110",
            },
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
                cond("NetworkUnavailable", "True", "NoRouteCreated", "Node created without a route"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": internal_ip.to_string()},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": format!("{:032x}", u128::from(u32::from(internal_ip)) * 0x1_0000_0001),
                "systemUUID": new_uid(),
                "bootID": new_uid(),
                "kernelVersion": "6.1.0-37-amd64",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "containerRuntimeVersion": "containerd://1.7.24",
                "kubeletVersion": "v1.32.6",
                "kubeProxyVersion": "v1.32.6",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "images": images,
        },
    })
}

/// What a kubelet status heartbeat changes: every condition's `lastHeartbeatTime`.
pub(crate) fn heartbeat(node: &mut Value) {
    // Always a new time, even twice within one second (the API has second precision).
    let last = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c["lastHeartbeatTime"].as_str().and_then(parse_rfc3339))
        .max();
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let t = last.map_or(now_secs, |l| now_secs.max(l + 1));
    let now = rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(t));
    if let Some(conds) = node
        .pointer_mut("/status/conditions")
        .and_then(Value::as_array_mut)
    {
        for c in conds {
            c["lastHeartbeatTime"] = now.clone().into();
        }
    } else if let Some(status) = node.get_mut("status").and_then(Value::as_object_mut) {
        status.insert(
            "conditions".into(),
            json!([{
                "type": "Ready", "status": "True", "lastHeartbeatTime": now,
                "lastTransitionTime": now, "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
            }]),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn time_format() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
            "2024-02-29T23:59:59Z"
        );
        for t in [0u64, 1_709_251_199, 951_782_400, 4_102_444_800] {
            assert_eq!(
                parse_rfc3339(&rfc3339(UNIX_EPOCH + Duration::from_secs(t))),
                Some(t)
            );
        }
    }

    #[test]
    fn kubelet_node_size() {
        let n = kubelet_like_node("node-1", "10.244.1.0/24", Ipv4Addr::new(10, 0, 0, 1), &[]);
        let len = serde_json::to_vec(&n).unwrap().len();
        assert!((4000..7000).contains(&len), "{len}");
        assert_eq!(new_uid().len(), 36);
    }
}

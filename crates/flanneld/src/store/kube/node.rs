//! The few parts of a Node that flannel needs, and how they map to leases and annotations.
//!
//! A kubelet's Node object is ~5 KB and changes every few seconds (heartbeats). Only metadata
//! name/resourceVersion/annotations, the pod CIDRs and the condition types are decoded; the rest
//! is skipped by the parser and never kept.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use flannel_types::lease::RawJson;
use flannel_types::{LeaseAttrs, SubnetKey};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use super::annotations::Annotations;
use crate::lease::Lease;

/// A Node reduced to what routing needs.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct MiniNode {
    /// Name, resourceVersion, annotations.
    #[serde(default)]
    pub metadata: MiniMeta,
    /// Pod CIDRs.
    #[serde(default)]
    pub spec: MiniSpec,
    /// Conditions (type/status/reason only).
    #[serde(default)]
    pub status: MiniStatus,
}

/// The metadata fields flannel reads.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct MiniMeta {
    /// Node name.
    #[serde(default)]
    pub name: String,
    /// Version of the object, for watches.
    #[serde(default, rename = "resourceVersion")]
    pub resource_version: String,
    /// Annotations (a kubelet sets only a handful).
    #[serde(default, deserialize_with = "null_as_default")]
    pub annotations: BTreeMap<String, String>,
}

/// The spec fields flannel reads.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct MiniSpec {
    /// `spec.podCIDR`.
    #[serde(default, rename = "podCIDR", deserialize_with = "null_as_default")]
    pub pod_cidr: String,
    /// `spec.podCIDRs`.
    #[serde(default, rename = "podCIDRs", deserialize_with = "null_as_default")]
    pub pod_cidrs: Vec<String>,
}

/// The status fields flannel reads.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct MiniStatus {
    /// Conditions, reduced.
    #[serde(default, deserialize_with = "null_as_default")]
    pub conditions: Vec<MiniCondition>,
}

/// One node condition, reduced.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct MiniCondition {
    /// e.g. `NetworkUnavailable`.
    #[serde(default, rename = "type")]
    pub type_: String,
    /// `True` / `False` / `Unknown`.
    #[serde(default)]
    pub status: String,
    /// Machine-readable reason.
    #[serde(default)]
    pub reason: String,
}

/// A page of a Node list.
#[derive(Debug, Default, Deserialize)]
pub struct MiniNodeList {
    /// resourceVersion and continue token.
    #[serde(default)]
    pub metadata: ListMeta,
    /// The nodes.
    #[serde(default, deserialize_with = "null_as_default")]
    pub items: Vec<MiniNode>,
}

/// List metadata.
#[derive(Debug, Default, Deserialize)]
pub struct ListMeta {
    /// The list's resourceVersion, where a watch continues.
    #[serde(default, rename = "resourceVersion")]
    pub resource_version: String,
    /// Token of the next page, empty on the last one.
    #[serde(default, rename = "continue")]
    pub continue_token: Option<String>,
}

/// A Pod reduced to its node name.
#[derive(Debug, Default, Deserialize)]
pub struct MiniPod {
    /// The spec.
    #[serde(default)]
    pub spec: MiniPodSpec,
}

/// Pod spec, reduced.
#[derive(Debug, Default, Deserialize)]
pub struct MiniPodSpec {
    /// The node the pod runs on.
    #[serde(default, rename = "nodeName")]
    pub node_name: String,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl MiniNode {
    /// Keeps only flannel's annotations (what remote nodes are compared on).
    pub fn retain_annotations(&mut self, ann: &Annotations) {
        self.metadata.annotations.retain(|k, _| ann.is_ours(k));
    }

    /// An annotation's value, or "" when absent.
    pub fn annotation(&self, name: &str) -> &str {
        self.metadata
            .annotations
            .get(name)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// Whether the NetworkUnavailable condition already says flannel is up.
    pub fn network_marked_up(&self) -> bool {
        self.status.conditions.iter().any(|c| {
            c.type_ == "NetworkUnavailable" && c.status == "False" && c.reason == "FlannelIsUp"
        })
    }
}

/// Why a node's pod CIDRs cannot be used (reference wording).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodCidrError {
    /// The controller-manager has not assigned one yet.
    #[error("node {0:?} pod cidr not assigned")]
    NotAssigned(String),
    /// More than two entries.
    #[error("node {0:?} pod cidrs should be IPv4/IPv6 only or dualstack")]
    TooMany(String),
    /// Not a CIDR.
    #[error("node {node:?} has an invalid pod CIDR {cidr:?}")]
    Invalid {
        /// The node.
        node: String,
        /// The text.
        cidr: String,
    },
}

/// A node's pod CIDRs by family (host bits cleared, as Go's `net.ParseCIDR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodCidrs {
    /// The IPv4 pod CIDR.
    pub v4: Option<Ipv4Net>,
    /// The IPv6 pod CIDR.
    pub v6: Option<Ipv6Net>,
}

/// Classifies `spec.podCIDR` / `spec.podCIDRs` as the reference does.
pub fn pod_cidrs(node: &MiniNode) -> Result<PodCidrs, PodCidrError> {
    let name = &node.metadata.name;
    if node.spec.pod_cidr.is_empty() {
        return Err(PodCidrError::NotAssigned(name.clone()));
    }
    let texts: Vec<&str> = match node.spec.pod_cidrs.len() {
        0 => vec![node.spec.pod_cidr.as_str()],
        1 | 2 => node.spec.pod_cidrs.iter().map(String::as_str).collect(),
        _ => return Err(PodCidrError::TooMany(name.clone())),
    };
    let mut out = PodCidrs::default();
    for t in texts {
        match t.parse::<IpNet>() {
            Ok(IpNet::V4(n)) => out.v4 = Some(n.trunc()),
            Ok(IpNet::V6(n)) => out.v6 = Some(n.trunc()),
            Err(_) => {
                return Err(PodCidrError::Invalid {
                    node: name.clone(),
                    cidr: t.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Which address families the network uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Families {
    /// IPv4 enabled.
    pub v4: bool,
    /// IPv6 enabled.
    pub v6: bool,
}

fn raw_data(text: &str, what: &str) -> Result<Option<RawJson>, String> {
    if text.is_empty() || text == "null" {
        return Ok(None);
    }
    RawJson::new(text)
        .map(Some)
        .map_err(|e| format!("{what} is not JSON ({e}): {text:?}"))
}

/// The lease a remote node announces; `Ok(None)` for nodes flannel does not manage.
pub fn lease_from_node(
    node: &MiniNode,
    ann: &Annotations,
    fam: Families,
) -> Result<Option<Lease>, String> {
    if node.annotation(&ann.subnet_kube_managed) != "true" {
        return Ok(None);
    }
    let cidrs = pod_cidrs(node).map_err(|e| e.to_string())?;
    let ip_text = node.annotation(&ann.backend_public_ip);
    let public_ip: Ipv4Addr = ip_text.parse().map_err(|_| {
        format!(
            "annotation {} is not an IPv4 address: {ip_text:?}",
            ann.backend_public_ip
        )
    })?;
    let v4 = cidrs
        .v4
        .ok_or_else(|| format!("node {:?} has no IPv4 pod CIDR", node.metadata.name))?;
    let mut attrs = LeaseAttrs {
        public_ip,
        public_ipv6: None,
        backend_type: node.annotation(&ann.backend_type).to_string(),
        backend_data: raw_data(node.annotation(&ann.backend_data), &ann.backend_data)?,
        backend_v6_data: None,
    };
    let mut v6 = None;
    if fam.v6 {
        let text = node.annotation(&ann.backend_public_ipv6);
        let ip: Ipv6Addr = text.parse().map_err(|_| {
            format!(
                "annotation {} is not an IPv6 address: {text:?}",
                ann.backend_public_ipv6
            )
        })?;
        attrs.public_ipv6 = Some(ip);
        attrs.backend_v6_data =
            raw_data(node.annotation(&ann.backend_v6_data), &ann.backend_v6_data)?;
        v6 = Some(
            cidrs
                .v6
                .ok_or_else(|| format!("node {:?} has no IPv6 pod CIDR", node.metadata.name))?,
        );
    }
    Ok(Some(Lease {
        key: SubnetKey::new(v4, v6),
        attrs,
        expiration: None,
        ttl_id: 0,
    }))
}

/// The annotation values a node must carry for `attrs` (after the operator's overwrites).
pub fn desired_annotations(
    node: &MiniNode,
    ann: &Annotations,
    attrs: &LeaseAttrs,
) -> Vec<(String, String)> {
    let data = |d: &Option<RawJson>| {
        d.as_ref()
            .map_or("null".to_string(), |d| d.get().to_string())
    };
    let overwrite = node.annotation(&ann.backend_public_ip_overwrite);
    let public_ip = if overwrite.is_empty() {
        attrs.public_ip.to_string()
    } else {
        overwrite.to_string()
    };
    let mut want = vec![
        (ann.backend_type.clone(), attrs.backend_type.clone()),
        (ann.backend_data.clone(), data(&attrs.backend_data)),
        (ann.backend_public_ip.clone(), public_ip),
    ];
    if let Some(v6) = attrs.public_ipv6 {
        let overwrite = node.annotation(&ann.backend_public_ipv6_overwrite);
        let ip = if overwrite.is_empty() {
            v6.to_string()
        } else {
            overwrite.to_string()
        };
        want.push((ann.backend_v6_data.clone(), data(&attrs.backend_v6_data)));
        want.push((ann.backend_public_ipv6.clone(), ip));
    }
    want.push((ann.subnet_kube_managed.clone(), "true".to_string()));
    want
}

/// The strategic-merge patch that sets the differing annotations, or `None` when the node
/// already carries every value (a restart then writes nothing).
pub fn annotation_patch(node: &MiniNode, want: &[(String, String)]) -> Option<serde_json::Value> {
    let mut changed = serde_json::Map::new();
    for (k, v) in want {
        if node.metadata.annotations.get(k) != Some(v) {
            changed.insert(k.clone(), serde_json::Value::String(v.clone()));
        }
    }
    if changed.is_empty() {
        None
    } else {
        Some(serde_json::json!({"metadata": {"annotations": changed}}))
    }
}

/// The status patch marking the node's network as up (reference condition text).
pub fn network_available_patch(now: std::time::SystemTime) -> serde_json::Value {
    let ts = rfc3339(now);
    serde_json::json!({"status": {"conditions": [{
        "type": "NetworkUnavailable",
        "status": "False",
        "lastHeartbeatTime": ts,
        "lastTransitionTime": ts,
        "reason": "FlannelIsUp",
        "message": "Flannel is running on this node",
    }]}})
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC), the form Kubernetes uses for condition times.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (year, month, day, h, m, s) = crate::utc::utc_civil(secs);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann() -> Annotations {
        Annotations::new("flannel.alpha.coreos.com").unwrap()
    }

    fn node(json: serde_json::Value) -> MiniNode {
        serde_json::from_value(json).unwrap()
    }

    const FAM4: Families = Families {
        v4: true,
        v6: false,
    };

    #[test]
    fn go_vxlan_node_becomes_lease() {
        let n = node(serde_json::json!({
            "metadata": {"name": "n2", "resourceVersion": "7", "annotations": {
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"12:c6:65:89:b4:e3\"}",
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/public-ip": "192.168.77.17",
                "node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
            "status": {"images": [{"names": ["x"], "sizeBytes": 1}]}
        }));
        let l = lease_from_node(&n, &ann(), FAM4).unwrap().unwrap();
        assert_eq!(l.key.to_string(), "10.244.1.0-24");
        assert_eq!(
            l.attrs.to_json(),
            r#"{"PublicIP":"192.168.77.17","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}}"#
        );
    }

    #[test]
    fn unmanaged_and_broken_nodes() {
        let n = node(
            serde_json::json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.0.0.0/24"}}),
        );
        assert_eq!(lease_from_node(&n, &ann(), FAM4), Ok(None));
        let n = node(
            serde_json::json!({"metadata": {"name": "n", "annotations": {
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            "flannel.alpha.coreos.com/public-ip": "garbage"}},
            "spec": {"podCIDR": "10.0.0.0/24"}}),
        );
        assert!(lease_from_node(&n, &ann(), FAM4)
            .unwrap_err()
            .contains("garbage"));
        let n = node(
            serde_json::json!({"metadata": {"name": "n", "annotations": {
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            "flannel.alpha.coreos.com/public-ip": "1.2.3.4",
            "flannel.alpha.coreos.com/backend-data": "{not json"}},
            "spec": {"podCIDR": "10.0.0.0/24"}}),
        );
        assert!(lease_from_node(&n, &ann(), FAM4).is_err());
        // host-gw writes the literal null.
        let n = node(
            serde_json::json!({"metadata": {"name": "n", "annotations": {
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            "flannel.alpha.coreos.com/backend-type": "host-gw",
            "flannel.alpha.coreos.com/backend-data": "null",
            "flannel.alpha.coreos.com/public-ip": "1.2.3.4"}},
            "spec": {"podCIDR": "10.0.0.7/24"}}),
        );
        let l = lease_from_node(&n, &ann(), FAM4).unwrap().unwrap();
        assert_eq!(l.attrs.backend_data, None);
        assert_eq!(l.key.to_string(), "10.0.0.0-24");
    }

    #[test]
    fn pod_cidr_rules() {
        let mk = |one: &str, all: &[&str]| {
            node(
                serde_json::json!({"metadata": {"name": "n1"}, "spec": {"podCIDR": one, "podCIDRs": all}}),
            )
        };
        assert_eq!(
            pod_cidrs(&mk("", &[])).unwrap_err().to_string(),
            "node \"n1\" pod cidr not assigned"
        );
        assert_eq!(
            pod_cidrs(&mk(
                "10.0.0.0/24",
                &["10.0.0.0/24", "fd00::/64", "10.1.0.0/24"]
            ))
            .unwrap_err()
            .to_string(),
            "node \"n1\" pod cidrs should be IPv4/IPv6 only or dualstack"
        );
        let c = pod_cidrs(&mk("10.0.0.0/24", &["10.0.0.0/24", "fd00:1::/64"])).unwrap();
        assert_eq!(c.v4.unwrap().to_string(), "10.0.0.0/24");
        assert_eq!(c.v6.unwrap().to_string(), "fd00:1::/64");
    }

    #[test]
    fn patch_only_what_differs_and_honours_overwrite() {
        let a = ann();
        let attrs = LeaseAttrs {
            public_ip: "192.168.1.5".parse().unwrap(),
            public_ipv6: None,
            backend_type: "host-gw".into(),
            backend_data: None,
            backend_v6_data: None,
        };
        let mut n = node(
            serde_json::json!({"metadata": {"name": "n", "annotations": {
            "flannel.alpha.coreos.com/public-ip-overwrite": "172.18.0.2"}}}),
        );
        let want = desired_annotations(&n, &a, &attrs);
        let p = annotation_patch(&n, &want).unwrap();
        assert_eq!(
            p.to_string(),
            r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data":"null","flannel.alpha.coreos.com/backend-type":"host-gw","flannel.alpha.coreos.com/kube-subnet-manager":"true","flannel.alpha.coreos.com/public-ip":"172.18.0.2"}}}"#
        );
        for (k, v) in want.clone() {
            n.metadata.annotations.insert(k, v);
        }
        assert_eq!(annotation_patch(&n, &want), None);
    }

    #[test]
    fn times_are_rfc3339() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_798_387_756);
        assert_eq!(rfc3339(t), "2026-12-27T16:09:16Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}

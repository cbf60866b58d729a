//! Node annotation names, derived from `--kube-annotation-prefix` with the reference's rules.
//!
//! Mixed clusters depend on these names: Go flannel nodes read exactly what we write.

use std::sync::OnceLock;

use regex::Regex;

/// The full names of the annotations flannel reads and writes on a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotations {
    /// `kube-subnet-manager`: `"true"` on nodes managed by flannel in kube mode.
    pub subnet_kube_managed: String,
    /// `backend-type`: the backend name (empty for udp/alloc).
    pub backend_type: String,
    /// `backend-data`: the backend's JSON text (`null` when it has none).
    pub backend_data: String,
    /// `backend-v6-data`: the IPv6 side's JSON text.
    pub backend_v6_data: String,
    /// `public-ip`: where other hosts send overlay traffic.
    pub backend_public_ip: String,
    /// `public-ipv6`.
    pub backend_public_ipv6: String,
    /// `public-ip-overwrite` (set by operators): advertised instead of our address.
    pub backend_public_ip_overwrite: String,
    /// `public-ipv6-overwrite` (set by operators).
    pub backend_public_ipv6_overwrite: String,
    /// `node-public-ip` (set by operators): replaces `--public-ip`.
    pub node_public_ip: String,
    /// `node-public-ipv6` (set by operators): replaces `--public-ipv6`.
    pub node_public_ipv6: String,
}

/// An annotation prefix that the reference rejects, with its exact message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// More than one `/`.
    #[error("subnet/kube: prefix can contain at most single slash")]
    TooManySlashes,
    /// Not a lowercase FQDN followed by an optional name part.
    #[error("subnet/kube: prefix must be in a format: fqdn/[0-9a-z-_]*")]
    BadFormat,
}

fn prefix_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$").expect("static regex")
    })
}

impl Annotations {
    /// Builds the names from a prefix such as `flannel.alpha.coreos.com` or `org.com/net`.
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        let mut prefix = prefix.to_string();
        match prefix.matches('/').count() {
            0 => prefix.push('/'),
            1 => {}
            _ => return Err(PrefixError::TooManySlashes),
        }
        if !prefix.ends_with('/') && !prefix.ends_with('-') {
            prefix.push('-');
        }
        if !prefix_regex().is_match(&prefix) {
            return Err(PrefixError::BadFormat);
        }
        let name = |n: &str| format!("{prefix}{n}");
        Ok(Annotations {
            subnet_kube_managed: name("kube-subnet-manager"),
            backend_type: name("backend-type"),
            backend_data: name("backend-data"),
            backend_v6_data: name("backend-v6-data"),
            backend_public_ip: name("public-ip"),
            backend_public_ipv6: name("public-ipv6"),
            backend_public_ip_overwrite: name("public-ip-overwrite"),
            backend_public_ipv6_overwrite: name("public-ipv6-overwrite"),
            node_public_ip: name("node-public-ip"),
            node_public_ipv6: name("node-public-ipv6"),
        })
    }

    /// Whether an annotation name is one flannel reads (everything else on a Node is skipped).
    pub fn is_ours(&self, key: &str) -> bool {
        // All names share the prefix up to and including "kube-subnet-manager"'s start.
        let prefix_len = self.subnet_kube_managed.len() - "kube-subnet-manager".len();
        key.len() > prefix_len
            && key.as_bytes()[..prefix_len] == self.subnet_kube_managed.as_bytes()[..prefix_len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_prefix_cases() {
        let a = Annotations::new("flannel.alpha.coreos.com").unwrap();
        assert_eq!(a.backend_type, "flannel.alpha.coreos.com/backend-type");
        assert_eq!(
            a.subnet_kube_managed,
            "flannel.alpha.coreos.com/kube-subnet-manager"
        );
        assert_eq!(
            a.node_public_ipv6,
            "flannel.alpha.coreos.com/node-public-ipv6"
        );
        let a = Annotations::new("org.com/prefix").unwrap();
        assert_eq!(a.backend_type, "org.com/prefix-backend-type");
        let a = Annotations::new("org.com/").unwrap();
        assert_eq!(a.backend_data, "org.com/backend-data");
        let a = Annotations::new("org.com/net-").unwrap();
        assert_eq!(a.public_ip(), "org.com/net-public-ip");
        assert_eq!(
            Annotations::new("a.b/c/d"),
            Err(PrefixError::TooManySlashes)
        );
        for bad in [
            "Flannel.io",
            "nodots",
            "org.com/UPPER",
            "org.com/a.b",
            ".org.com",
            "",
        ] {
            assert_eq!(Annotations::new(bad), Err(PrefixError::BadFormat), "{bad}");
        }
    }

    #[test]
    fn recognises_own_annotations() {
        let a = Annotations::new("flannel.alpha.coreos.com").unwrap();
        assert!(a.is_ours("flannel.alpha.coreos.com/backend-data"));
        assert!(!a.is_ours("node.alpha.kubernetes.io/ttl"));
        assert!(!a.is_ours("flannel.alpha.coreos.com/"));
    }

    impl Annotations {
        fn public_ip(&self) -> &str {
            &self.backend_public_ip
        }
    }
}

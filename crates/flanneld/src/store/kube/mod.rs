//! The Kubernetes subnet store (`--kube-subnet-mgr`): a host's subnet is its Node's
//! `spec.podCIDR(s)`, and hosts find each other through Node annotations written exactly as Go
//! flannel writes them, so Go and Rust nodes share one cluster.
//!
//! Differences from the reference, on purpose: an API server that is down or refuses us is
//! retried with backoff (logged once per step) instead of exiting; a node whose podCIDR is not
//! assigned yet is waited for; annotations and the NetworkUnavailable condition are only written
//! when they differ, so restarts cause no writes; a relist after `410 Expired` is diffed against
//! what the backend has, so nothing is lost or duplicated.

pub mod annotations;
pub mod client;
pub mod node;
mod watch;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use flannel_types::{LeaseAttrs, NetworkConfig, SubnetKey};
use tokio::sync::{mpsc, Mutex};

use self::annotations::Annotations;
use self::node::{Families, MiniNode, PodCidrError};
use super::{OwnLeaseEvent, StoreError, StoreInspection, SubnetStore};
use crate::lease::{Lease, StoreUpdate};

/// Default capacity of the event queue (`EVENT_QUEUE_DEPTH`).
const DEFAULT_QUEUE_DEPTH: usize = 5000;

/// What kube mode is configured with (flags and environment).
#[derive(Debug, Clone, Default)]
pub struct KubeSettings {
    /// `--kube-api-url`.
    pub api_url: String,
    /// `--kubeconfig-file`.
    pub kubeconfig: String,
    /// `--kube-annotation-prefix`.
    pub annotation_prefix: String,
    /// `--net-config-path`.
    pub net_config_path: String,
    /// `--set-node-network-unavailable`.
    pub set_node_network_unavailable: bool,
}

/// Exponential backoff 1 s .. 8 s, so failures are neither retried in a tight loop nor logged
/// more than once per step.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(8);

    pub(crate) fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    /// The delay of this step (the caller logs it once), and the next step doubled.
    pub(crate) fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// A subnet store backed by the Kubernetes API.
pub struct KubeStore {
    client: kube::Client,
    node_name: String,
    ann: Annotations,
    config: NetworkConfig,
    mark_network_available: bool,
    queue_depth: usize,
    own: Mutex<Option<MiniNode>>,
}

fn invalid(msg: impl Into<String>) -> StoreError {
    StoreError::Invalid(msg.into())
}

impl KubeStore {
    /// Reads net-conf.json, builds the API client and finds this host's node name.
    /// Bad local configuration fails at once; an unreachable API server is retried.
    pub async fn connect(s: KubeSettings) -> Result<Self, StoreError> {
        let ann = Annotations::new(&s.annotation_prefix).map_err(|e| invalid(e.to_string()))?;
        let text = std::fs::read_to_string(&s.net_config_path).map_err(|e| {
            invalid(format!(
                "failed to read net conf: open {}: {e}",
                s.net_config_path
            ))
        })?;
        let config = NetworkConfig::parse(&text)
            .map_err(|e| invalid(format!("error parsing subnet config: {e}")))?;
        let queue_depth = match std::env::var("EVENT_QUEUE_DEPTH") {
            Ok(v) if !v.is_empty() => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    invalid(format!("EVENT_QUEUE_DEPTH={v:?} is not a positive integer"))
                })?,
            _ => DEFAULT_QUEUE_DEPTH,
        };
        let client = client::build(&s.api_url, &s.kubeconfig).await?;
        let node_name = resolve_node_name(&client).await?;
        tracing::info!("Kubernetes subnet manager for node {node_name:?}");
        Ok(KubeStore {
            client,
            node_name,
            ann,
            config,
            mark_network_available: s.set_node_network_unavailable,
            queue_depth,
            own: Mutex::new(None),
        })
    }

    /// This host's node name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    fn families(&self) -> Families {
        Families {
            v4: self.config.enable_ipv4,
            v6: self.config.enable_ipv6,
        }
    }

    /// GETs the own node, retrying (with backoff, one log line per step) until the API answers.
    async fn fetch_own_node(&self) -> MiniNode {
        let mut backoff = Backoff::new();
        loop {
            match client::get_node(&self.client, &self.node_name).await {
                Ok(n) => {
                    *self.own.lock().await = Some(n.clone());
                    return n;
                }
                Err(e) => {
                    let wait = backoff.step();
                    crate::metrics::metrics().store_error();
                    tracing::error!(
                        "failed to get node {:?} from the Kubernetes API: {} (retrying in {wait:?})",
                        self.node_name,
                        client::explain(&e)
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn cached_own_node(&self) -> MiniNode {
        if let Some(n) = self.own.lock().await.clone() {
            return n;
        }
        self.fetch_own_node().await
    }

    /// PATCHes `nodes/<name>/status`, retrying with backoff until the server accepts.
    async fn patch_status(&self, patch: &serde_json::Value, what: &str) {
        let mut backoff = Backoff::new();
        loop {
            match client::patch_node_status(&self.client, &self.node_name, patch).await {
                Ok(n) => {
                    *self.own.lock().await = Some(n);
                    return;
                }
                Err(e) => {
                    let wait = backoff.step();
                    crate::metrics::metrics().store_error();
                    tracing::error!(
                        "failed to patch node {:?} ({what}): {} (retrying in {wait:?})",
                        self.node_name,
                        client::explain(&e)
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn check_inside(&self, cidrs: &node::PodCidrs) -> Result<SubnetKey, StoreError> {
        let v4 = match (self.config.enable_ipv4, cidrs.v4) {
            (true, Some(c)) => {
                let net = self.config.network.ok_or_else(|| {
                    invalid("please define a correct Network parameter in the flannel config")
                })?;
                if !net.contains(&c) {
                    return Err(invalid(format!(
                        "subnet \"{net}\" specified in the flannel net config doesn't contain \"{c}\" PodCIDR of the \"{}\" node",
                        self.node_name
                    )));
                }
                c
            }
            (true, None) => {
                return Err(invalid(format!(
                    "node {:?} has no IPv4 pod CIDR but EnableIPv4 is set",
                    self.node_name
                )))
            }
            (false, _) => return Err(invalid(
                "kube mode of flannel-rs needs EnableIPv4 (IPv6-only networks are not supported)",
            )),
        };
        let v6 = match (self.config.enable_ipv6, cidrs.v6) {
            (true, Some(c)) => {
                let net = self.config.ipv6_network.ok_or_else(|| {
                    invalid("please define a correct IPv6Network parameter in the flannel config")
                })?;
                if !net.contains(&c) {
                    return Err(invalid(format!(
                        "subnet \"{net}\" specified in the flannel net config doesn't contain \"{c}\" IPv6 PodCIDR of the \"{}\" node",
                        self.node_name
                    )));
                }
                Some(c)
            }
            (true, None) => {
                return Err(invalid(format!(
                    "node {:?} has no IPv6 pod CIDR but EnableIPv6 is set",
                    self.node_name
                )))
            }
            (false, _) => None,
        };
        Ok(SubnetKey::new(v4, v6))
    }
}

/// `NODE_NAME`, else the node of the pod `POD_NAMESPACE/POD_NAME` (as the reference).
async fn resolve_node_name(client: &kube::Client) -> Result<String, StoreError> {
    if let Ok(n) = std::env::var("NODE_NAME") {
        if !n.is_empty() {
            return Ok(n);
        }
    }
    let (pod, ns) = match (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE")) {
        (Ok(p), Ok(n)) if !p.is_empty() && !n.is_empty() => (p, n),
        _ => {
            return Err(invalid(
                "env variables POD_NAME and POD_NAMESPACE must be set",
            ))
        }
    };
    let mut backoff = Backoff::new();
    loop {
        match client::get_pod(client, &ns, &pod).await {
            Ok(p) if !p.spec.node_name.is_empty() => return Ok(p.spec.node_name),
            Ok(_) => {
                return Err(invalid(format!(
                    "pod {ns}/{pod} has no spec.nodeName; set NODE_NAME"
                )))
            }
            Err(e) => {
                let wait = backoff.step();
                crate::metrics::metrics().store_error();
                tracing::error!(
                    "failed to get pod {ns}/{pod} to learn the node name: {} (retrying in {wait:?})",
                    client::explain(&e)
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[async_trait]
impl SubnetStore for KubeStore {
    fn name(&self) -> String {
        format!("Kubernetes API (node {})", self.node_name)
    }

    async fn network_config(&self) -> Result<NetworkConfig, StoreError> {
        Ok(self.config.clone())
    }

    fn event_queue_depth(&self) -> usize {
        self.queue_depth
    }

    async fn stored_public_ips(&self) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        let n = self.fetch_own_node().await;
        let v4 = n.annotation(&self.ann.node_public_ip).parse().ok();
        let v6 = n.annotation(&self.ann.node_public_ipv6).parse().ok();
        (v4, v6)
    }

    async fn acquire_lease(
        &self,
        _config: &NetworkConfig,
        attrs: &LeaseAttrs,
    ) -> Result<Lease, StoreError> {
        let mut waiting_since: Option<std::time::Instant> = None;
        let mut last_log = std::time::Instant::now();
        let node = loop {
            let n = self.fetch_own_node().await;
            match node::pod_cidrs(&n) {
                Ok(c) => break (n, c),
                Err(e @ PodCidrError::NotAssigned(_)) => {
                    if waiting_since.is_none() || last_log.elapsed() > Duration::from_secs(30) {
                        tracing::warn!(
                            "Waiting for node {:?} to be assigned spec.podCIDR ({e}); the controller-manager assigns it when it allocates node CIDRs",
                            self.node_name
                        );
                        last_log = std::time::Instant::now();
                    }
                    waiting_since.get_or_insert_with(std::time::Instant::now);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(invalid(e.to_string())),
            }
        };
        let (n, cidrs) = node;
        if let Some(t) = waiting_since {
            tracing::info!(
                "node {:?} got spec.podCIDR {} after {:?}",
                self.node_name,
                n.spec.pod_cidr,
                t.elapsed()
            );
        }
        let key = self.check_inside(&cidrs)?;
        let want = node::desired_annotations(&n, &self.ann, attrs);
        let overwrite = n.annotation(&self.ann.backend_public_ip_overwrite);
        if !overwrite.is_empty() && n.annotation(&self.ann.backend_public_ip) != overwrite {
            tracing::info!(
                "Overriding public ip with '{overwrite}' from node annotation '{}'",
                self.ann.backend_public_ip_overwrite
            );
        }
        match node::annotation_patch(&n, &want) {
            Some(patch) => {
                tracing::info!(
                    "Setting node {:?} annotations: {}",
                    self.node_name,
                    patch["metadata"]["annotations"]
                );
                self.patch_status(&patch, "annotations").await;
            }
            None => tracing::info!(
                "node {:?} already carries flannel's annotations; nothing to write",
                self.node_name
            ),
        }
        Ok(Lease {
            key,
            attrs: attrs.clone(),
            expiration: None,
            ttl_id: 0,
        })
    }

    async fn lease_by_public_ip(&self, _public_ip: Ipv4Addr) -> Result<Option<Lease>, StoreError> {
        // In kube mode the previous lease is the own node's annotations (VtepMAC restore).
        let n = self.cached_own_node().await;
        let mut managed = n.clone();
        managed
            .metadata
            .annotations
            .insert(self.ann.subnet_kube_managed.clone(), "true".into());
        Ok(node::lease_from_node(&managed, &self.ann, self.families())
            .ok()
            .flatten())
    }

    async fn renew_lease(&self, lease: &Lease) -> Result<Lease, StoreError> {
        // Node podCIDRs do not expire.
        Ok(lease.clone())
    }

    async fn watch_leases(&self, tx: mpsc::Sender<StoreUpdate>) -> Result<(), StoreError> {
        watch::run(self, tx).await
    }

    async fn watch_own_lease(
        &self,
        _lease: &Lease,
        tx: mpsc::Sender<OwnLeaseEvent>,
    ) -> Result<(), StoreError> {
        // The own lease cannot be revoked in kube mode (the reference does not watch it either).
        tx.closed().await;
        Ok(())
    }

    async fn inspect(&self) -> Result<StoreInspection, StoreError> {
        watch::inspect(self).await
    }

    async fn complete_lease(&self, _lease: &Lease) -> Result<(), StoreError> {
        if !self.mark_network_available {
            return Ok(());
        }
        let n = self.cached_own_node().await;
        if n.network_marked_up() {
            tracing::info!(
                "node {:?} already has NetworkUnavailable=False (FlannelIsUp); nothing to write",
                self.node_name
            );
            return Ok(());
        }
        let patch = node::network_available_patch(SystemTime::now());
        self.patch_status(&patch, "NetworkUnavailable condition")
            .await;
        tracing::info!(
            "node {:?}: NetworkUnavailable=False (FlannelIsUp)",
            self.node_name
        );
        Ok(())
    }
}

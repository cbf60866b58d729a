//! `gce`: this host's subnet as a Compute Engine route to this instance (Google Cloud).
//!
//! As Go flannel did (it was removed in v0.20.0): the lease carries the public IP only; project,
//! zone, instance name and network come from the metadata server, the bearer token from the
//! default service account; the route `flannel-<subnet with . and / as ->` (destRange the
//! subnet, the network's and the instance's selfLinks, priority 1000) is ensured: an existing
//! one with this instance as next hop is kept, one with another next hop is deleted (and its
//! operation waited for) before the insert (waited for too). Nothing per remote lease, nothing
//! removed at shutdown.
//!
//! `GCE_METADATA_HOST` overrides the metadata server (as Google's libraries do) and
//! `CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE` the Compute base URL (as gcloud does).

pub mod api;

use async_trait::async_trait;

use self::api::{Compute, Metadata};
use super::cloud::{env_or, CloudError, CloudHttp, CloudRouteNetwork};
use super::{Backend, BackendContext, BackendError, Network};

/// The gce backend.
pub struct GceBackend;

impl GceBackend {
    /// Registry constructor (gce has no options).
    pub fn create(_ctx: &BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(GceBackend))
    }
}

/// Whether two resource links name the same resource (hosts and API versions may differ).
fn same_resource(a: &str, b: &str) -> bool {
    let tail = |s: &str| s.find("projects/").map(|i| s[i..].to_string());
    a == b || (tail(a).is_some() && tail(a) == tail(b))
}

async fn ensure_route(subnet: &str) -> Result<(), CloudError> {
    let http = CloudHttp::new()?;
    let meta = Metadata::new(
        http.clone(),
        &env_or(&["GCE_METADATA_HOST"], api::DEFAULT_METADATA_HOST),
    );
    let network = meta.network().await?;
    let project = meta.project().await?;
    let instance = meta.instance_name().await?;
    let zone = meta.zone().await?;
    let token = meta.token().await?;
    let base = env_or(
        &["CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE"],
        api::DEFAULT_COMPUTE_BASE,
    );
    let compute = Compute::new(http, &base, &project, token);
    let network_link = compute
        .self_link("networks.get", &format!("global/networks/{network}"))
        .await?;
    let instance_link = compute
        .self_link(
            "instances.get",
            &format!("zones/{zone}/instances/{instance}"),
        )
        .await?;
    let name = api::route_name(subnet);
    tracing::info!("gce: project {project}, zone {zone}, instance {instance}, network {network}");
    if let Some(existing) = compute.get_route(&name).await? {
        let hop = existing.next_hop_instance.as_deref().unwrap_or_default();
        if same_resource(hop, &instance_link) && existing.dest_range == subnet {
            tracing::info!(
                "gce: exact pre-existing route {name} found (id {}), kept",
                existing.id
            );
            return Ok(());
        }
        tracing::info!(
            "gce: deleting conflicting route {name} (destRange {}, nextHopInstance {hop:?})",
            existing.dest_range
        );
        let op = compute.delete_route(&name).await?;
        compute.wait(op).await?;
    }
    tracing::info!("gce: inserting route {name} for subnet {subnet} -> {instance_link}");
    let op = compute
        .insert_route(api::route_body(subnet, &network_link, &instance_link))
        .await?;
    compute.wait(op).await?;
    tracing::info!("gce: route {name} inserted");
    Ok(())
}

#[async_trait]
impl Backend for GceBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        let lease = ctx.acquire_public_only_lease().await?;
        ensure_route(&lease.key.ipv4.to_string()).await?;
        Ok(CloudRouteNetwork::boxed(lease, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_links() {
        let a = "https://www.googleapis.com/compute/v1/projects/p/zones/z/instances/i";
        let b = "https://compute.googleapis.com/compute/v1/projects/p/zones/z/instances/i";
        assert!(same_resource(a, b));
        assert!(!same_resource(
            a,
            "https://www.googleapis.com/compute/v1/projects/p/zones/z/instances/j"
        ));
        assert!(!same_resource("", a));
    }
}

//! `ali-vpc`: this host's subnet as a route entry of the VPC's VRouter table (Alibaba Cloud).
//!
//! As Go flannel did (it was removed in v0.20.0): the lease carries the public IP only; keys
//! come from `AccessKeyID` / `AccessKeySecret`, else `ACCESS_KEY_ID` / `ACCESS_KEY_SECRET`
//! (never logged); region, instance and VPC from the metadata service; the VPC's VRouter and
//! its first route table from the API; the entry `<subnet>` -> this instance is kept when
//! available, other custom entries to this instance are removed (except `0.0.0.0/0`, used for
//! DNAT), then the entry is created and all entries are waited for (60 s). Nothing per remote
//! lease, nothing removed at shutdown.
//!
//! Beyond Go: a custom entry for this subnet pointing at another instance (a stale entry of a
//! host that had the subnet before) is replaced; calls are retried with backoff on throttling;
//! `ALIBABA_CLOUD_VPC_ENDPOINT` overrides the API endpoint. Proven by signature vectors and
//! request/answer unit tests only (no fake Alibaba Cloud in the test-bed yet).

pub mod api;

use std::time::{Duration, Instant};

use async_trait::async_trait;
use flannel_types::backend_options::CloudKeyOptions;

use self::api::{Metadata, RouteEntry, VpcClient};
use super::cloud::{env_or, CloudError, CloudHttp, CloudRouteNetwork};
use super::tencentvpc::credentials;
use super::{Backend, BackendContext, BackendError, Network};

/// How long entries may stay pending after the change.
const WAIT: Duration = Duration::from_secs(60);

/// The ali-vpc backend.
pub struct AliVpcBackend {
    opts: CloudKeyOptions,
}

impl AliVpcBackend {
    /// Registry constructor: reads the options.
    pub fn create(ctx: &BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        let opts = CloudKeyOptions::from_backend(&ctx.config.backend)?;
        Ok(Box::new(AliVpcBackend { opts }))
    }
}

/// What to change in the table: entries to delete (cidr, next hop, why), and whether the
/// wanted entry must be created.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Entries to delete first.
    pub delete: Vec<(String, String, String)>,
    /// Whether `cidr` -> instance must be created.
    pub create: bool,
}

/// Compares the table's entries with the wanted `cidr` -> `instance`.
pub fn plan(entries: &[RouteEntry], cidr: &str, instance: &str) -> Plan {
    let mut p = Plan {
        create: true,
        ..Plan::default()
    };
    for e in entries.iter().filter(|e| e.kind == "Custom") {
        let del = |why: &str| {
            (
                e.destination_cidr_block.clone(),
                e.instance_id.clone(),
                why.to_string(),
            )
        };
        if e.instance_id == instance {
            if e.destination_cidr_block == cidr && e.status == "Available" && p.create {
                p.create = false;
            } else if e.destination_cidr_block == "0.0.0.0/0" {
                // Used for DNAT through this instance: kept, as Go does.
            } else {
                p.delete
                    .push(del(&format!("old entry of this instance ({})", e.status)));
            }
        } else if e.destination_cidr_block == cidr {
            p.delete.push(del("stale: another instance"));
        }
    }
    p
}

async fn ensure_route(opts: &CloudKeyOptions, cidr: &str) -> Result<(), CloudError> {
    let (id, secret) = credentials(opts)?;
    let http = CloudHttp::new()?;
    let meta = Metadata::new(http.clone(), api::METADATA_BASE);
    let region = meta.get("region-id").await?;
    let instance = meta.get("instance-id").await?;
    let vpc_id = meta.get("vpc-id").await?;
    let endpoint = env_or(&["ALIBABA_CLOUD_VPC_ENDPOINT"], api::DEFAULT_ENDPOINT);
    let client = VpcClient::new(http, &endpoint, &region, &id, secret)?;
    let vrouter = client.vrouter_of(&vpc_id).await?;
    let table = client.route_table_of(&vrouter).await?;
    tracing::info!("ali-vpc: VPC {vpc_id} (region {region}), VRouter {vrouter}, table {table}");
    let p = plan(
        &client.route_entries(&vrouter, &table).await?,
        cidr,
        &instance,
    );
    for (dst, hop, why) in &p.delete {
        tracing::info!("ali-vpc: removing route entry {dst} -> {hop} from {table} ({why})");
        client.delete_entry(&table, dst, hop).await?;
    }
    if p.create {
        client.create_entry(&table, cidr, &instance).await?;
        tracing::info!("ali-vpc: created route entry {cidr} -> {instance} in {table}");
    } else {
        tracing::info!("ali-vpc: keeping route entry {cidr} -> {instance} in {table}");
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let entries = client.route_entries(&vrouter, &table).await?;
        if entries.iter().all(|e| e.status == "Available") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CloudError::Invalid {
                call: "ali-vpc DescribeRouteTables".into(),
                message: format!("route entries of {table} not available after {WAIT:?}"),
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[async_trait]
impl Backend for AliVpcBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        credentials(&self.opts)?;
        let lease = ctx.acquire_public_only_lease().await?;
        ensure_route(&self.opts, &lease.key.ipv4.to_string()).await?;
        Ok(CloudRouteNetwork::boxed(lease, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(cidr: &str, kind: &str, inst: &str, status: &str) -> RouteEntry {
        RouteEntry {
            destination_cidr_block: cidr.into(),
            kind: kind.into(),
            instance_id: inst.into(),
            status: status.into(),
        }
    }

    #[test]
    fn plans() {
        let c = "10.244.1.0/24";
        assert_eq!(
            plan(&[], c, "i-1"),
            Plan {
                delete: vec![],
                create: true
            }
        );
        let p = plan(
            &[
                e(c, "Custom", "i-1", "Available"),
                e("0.0.0.0/0", "Custom", "i-1", "Available"),
                e("192.168.0.0/24", "System", "", "Available"),
                e("10.244.9.0/24", "Custom", "i-2", "Available"),
            ],
            c,
            "i-1",
        );
        assert_eq!(
            p,
            Plan {
                delete: vec![],
                create: false
            }
        );
        let p = plan(
            &[
                e("10.244.7.0/24", "Custom", "i-1", "Available"),
                e(c, "Custom", "i-9", "Available"),
            ],
            c,
            "i-1",
        );
        assert_eq!(
            p.delete,
            vec![
                (
                    "10.244.7.0/24".into(),
                    "i-1".into(),
                    "old entry of this instance (Available)".into()
                ),
                (c.into(), "i-9".into(), "stale: another instance".into()),
            ]
        );
        assert!(p.create);
    }
}

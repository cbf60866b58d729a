//! `tencent-vpc`: this host's subnet as a route of the VPC's route table (Tencent Cloud).
//!
//! As Go flannel: the lease carries the public IP only; region and VPC come from the instance
//! metadata service (`metadata.tencentyun.com`); the route `<subnet>` -> `NORMAL_CVM <ExtAddr>`
//! is ensured in the VPC's route table (an existing enabled one is kept, a disabled one
//! replaced); nothing happens per remote lease and nothing is removed at shutdown. Keys come
//! from the `AccessKeyID` / `AccessKeySecret` options, else `ACCESS_KEY_ID` /
//! `ACCESS_KEY_SECRET`, and are never logged (Go logs the whole config, keys included).
//!
//! Beyond Go: the VPC's main table is preferred when there are several (Go takes the first);
//! a same-destination user route pointing at another gateway (a stale route of a host that had
//! this subnet before) is replaced instead of making CreateRoutes fail; API calls are retried
//! with backoff on throttling and transport errors; `TENCENTCLOUD_VPC_ENDPOINT` overrides the
//! API endpoint (a host name, or `http(s)://host[:port]`).

pub mod api;
pub mod sign;

use std::net::Ipv4Addr;

use async_trait::async_trait;
use flannel_types::backend_options::CloudKeyOptions;

use self::api::{Metadata, RouteTable, VpcClient};
use super::cloud::{env_or, CloudError, CloudHttp, CloudRouteNetwork, Secret};
use super::{Backend, BackendContext, BackendError, Network};

/// The route type flannel's routes have (user-created).
const ROUTE_TYPE: &str = "USER";
/// The gateway type of a route to an instance.
const GATEWAY_TYPE: &str = "NORMAL_CVM";

/// The tencent-vpc backend.
pub struct TencentVpcBackend {
    opts: CloudKeyOptions,
}

impl TencentVpcBackend {
    /// Registry constructor: reads the options (bad options fail here, before any lease).
    pub fn create(ctx: &BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        let opts = CloudKeyOptions::from_backend(&ctx.config.backend)?;
        Ok(Box::new(TencentVpcBackend { opts }))
    }
}

/// The key pair from the options, else from the environment (both from one place, as Go).
pub fn credentials(opts: &CloudKeyOptions) -> Result<(String, Secret), CloudError> {
    if !opts.access_key_id.is_empty() && !opts.access_key_secret.is_empty() {
        return Ok((
            opts.access_key_id.clone(),
            Secret::new(opts.access_key_secret.clone()),
        ));
    }
    let id = std::env::var("ACCESS_KEY_ID").unwrap_or_default();
    let secret = std::env::var("ACCESS_KEY_SECRET").unwrap_or_default();
    if id.is_empty() || secret.is_empty() {
        return Err(CloudError::Config(
            "ACCESS_KEY_ID and ACCESS_KEY_SECRET must be provided!".into(),
        ));
    }
    Ok((id, Secret::new(secret)))
}

/// What to do with a route table so that it routes `cidr` to `gateway`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The route already in place (kept).
    pub keep: Option<u64>,
    /// Routes to delete first, with why.
    pub delete: Vec<(u64, String)>,
    /// Whether the route must be created.
    pub create: bool,
}

/// Compares the table with the wanted route: an enabled user route `cidr` -> `NORMAL_CVM
/// gateway` is kept; disabled or foreign-gateway user routes for `cidr` are deleted.
pub fn plan(table: &RouteTable, cidr: &str, gateway: &str) -> Plan {
    let mut p = Plan::default();
    for r in table
        .route_set
        .iter()
        .filter(|r| r.destination_cidr_block == cidr && r.route_type == ROUTE_TYPE)
    {
        let ours = r.gateway_type == GATEWAY_TYPE && r.gateway_id == gateway;
        if ours && r.enabled && p.keep.is_none() {
            p.keep = Some(r.route_id);
        } else if ours && r.enabled {
            p.delete.push((r.route_id, "duplicate".into()));
        } else if ours {
            p.delete.push((r.route_id, "disabled".into()));
        } else {
            p.delete.push((
                r.route_id,
                format!("stale: via {} {}", r.gateway_type, r.gateway_id),
            ));
        }
    }
    p.create = p.keep.is_none();
    p
}

/// Picks the table flannel programs: the VPC's main table, else the first.
pub fn choose_table(tables: &[RouteTable]) -> Option<&RouteTable> {
    tables.iter().find(|t| t.main).or_else(|| tables.first())
}

async fn ensure_route(
    opts: &CloudKeyOptions,
    cidr: &str,
    gateway: Ipv4Addr,
) -> Result<(), CloudError> {
    let (id, secret) = credentials(opts)?;
    let http = CloudHttp::new()?;
    let meta = Metadata::new(http.clone(), api::METADATA_BASE);
    let region = meta.region().await?;
    let vpc_id = meta.vpc_id().await?;
    let endpoint = env_or(&["TENCENTCLOUD_VPC_ENDPOINT"], api::DEFAULT_ENDPOINT);
    let client = VpcClient::new(http, &endpoint, &region, &id, secret)?;
    let tables = client.describe_route_tables(&vpc_id).await?;
    let Some(table) = choose_table(&tables) else {
        return Err(CloudError::Invalid {
            call: "tencent-vpc DescribeRouteTables".into(),
            message: format!("no suitable routing table found in VPC {vpc_id}"),
        });
    };
    let gateway = gateway.to_string();
    tracing::info!(
        "tencent-vpc: VPC {vpc_id} (region {region}), route table {}",
        table.route_table_id
    );
    let p = plan(table, cidr, &gateway);
    for (route_id, why) in &p.delete {
        tracing::info!(
            "tencent-vpc: deleting route {route_id} for {cidr} in {} ({why})",
            table.route_table_id
        );
        client
            .delete_route(&table.route_table_id, *route_id)
            .await?;
    }
    match p.keep {
        Some(route_id) => tracing::info!(
            "tencent-vpc: route {cidr} -> {GATEWAY_TYPE} {gateway} already present (RouteId {route_id}), kept"
        ),
        None => {
            client
                .create_route(&table.route_table_id, cidr, &gateway)
                .await?;
            tracing::info!(
                "tencent-vpc: created route {cidr} -> {GATEWAY_TYPE} {gateway} in {}",
                table.route_table_id
            );
        }
    }
    Ok(())
}

#[async_trait]
impl Backend for TencentVpcBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        // Fail on missing keys before touching the lease store.
        credentials(&self.opts)?;
        let ip = ctx.ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let lease = ctx.acquire_public_only_lease().await?;
        ensure_route(&self.opts, &lease.key.ipv4.to_string(), ip).await?;
        Ok(CloudRouteNetwork::boxed(lease, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::api::Route;
    use super::*;

    fn route(id: u64, cidr: &str, gw: &str, enabled: bool) -> Route {
        Route {
            destination_cidr_block: cidr.into(),
            gateway_type: GATEWAY_TYPE.into(),
            gateway_id: gw.into(),
            route_id: id,
            enabled,
            route_type: ROUTE_TYPE.into(),
        }
    }

    fn table(routes: Vec<Route>) -> RouteTable {
        RouteTable {
            route_table_id: "rtb-1".into(),
            main: true,
            route_set: routes,
        }
    }

    #[test]
    fn plans() {
        let c = "10.244.1.0/24";
        assert_eq!(
            plan(&table(vec![]), c, "10.0.0.5"),
            Plan {
                create: true,
                ..Plan::default()
            }
        );
        let p = plan(&table(vec![route(1, c, "10.0.0.5", true)]), c, "10.0.0.5");
        assert_eq!(p.keep, Some(1));
        assert!(!p.create && p.delete.is_empty());
        let p = plan(&table(vec![route(2, c, "10.0.0.5", false)]), c, "10.0.0.5");
        assert_eq!(p.delete, vec![(2, "disabled".to_string())]);
        assert!(p.create);
        let p = plan(
            &table(vec![
                route(3, c, "10.0.0.9", true),
                route(4, "10.244.2.0/24", "10.0.0.5", true),
            ]),
            c,
            "10.0.0.5",
        );
        assert_eq!(
            p.delete,
            vec![(3, "stale: via NORMAL_CVM 10.0.0.9".to_string())]
        );
        assert!(p.create);
        // System routes (not USER) are never touched.
        let mut sys = route(5, c, "10.0.0.9", true);
        sys.route_type = "NETD".into();
        assert!(plan(&table(vec![sys]), c, "10.0.0.5").delete.is_empty());
    }

    #[test]
    fn main_table_first() {
        let mut a = table(vec![]);
        a.main = false;
        a.route_table_id = "rtb-a".into();
        let b = table(vec![]);
        assert_eq!(
            choose_table(&[a.clone(), b]).unwrap().route_table_id,
            "rtb-1"
        );
        assert_eq!(choose_table(&[a]).unwrap().route_table_id, "rtb-a");
        assert!(choose_table(&[]).is_none());
    }

    #[test]
    fn keys_from_options() {
        let opts = CloudKeyOptions {
            access_key_id: "AKID".into(),
            access_key_secret: "s3cret".into(),
        };
        let (id, secret) = credentials(&opts).unwrap();
        assert_eq!(id, "AKID");
        assert_eq!(secret.expose(), "s3cret");
        assert_eq!(format!("{secret:?}"), "<redacted>");
    }
}

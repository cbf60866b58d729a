//! `aws-vpc`: the VPC's route tables carry pod traffic; flanneld only routes its own subnet to
//! its own network interface (Go flannel's `backend/awsvpc`, removed upstream in v0.20.0).
//!
//! At start: lease (`{"PublicIP":..,"PublicIPv6":null}`), region and instance id from the
//! instance metadata service (IMDSv2 tokens, v1 fallback), credentials from the default chain,
//! the ENI whose private IPs hold the interface address, SourceDestCheck off (a failure is a
//! warning), then per route table (`RouteTableID`, a string or a list; else the subnet's
//! association; else the VPC's main table): blackhole routes inside `Network` deleted, and the
//! route `<subnet> -> ENI` made to exist (created, or replaced when it points elsewhere; left
//! alone when already right). Nothing per remote lease, nothing removed at shutdown.

pub mod creds;
pub mod ec2;
pub mod imds;
pub mod sigv4;

use async_trait::async_trait;
use flannel_types::gojson::FoldedObject;
use flannel_types::ConfigError;
use ipnet::Ipv4Net;
use serde_json::Value;

use super::cloud::{CloudError, CloudHttp, CloudRouteNetwork};
use super::{Backend, BackendContext, BackendError, Network};
use ec2::{Ec2, Eni, RouteTable};
use imds::Imds;

/// The `Backend` options of aws-vpc.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AwsVpcOptions {
    /// `RouteTableID`: the tables to route in; `None` = detect from the subnet / VPC.
    pub route_tables: Option<Vec<String>>,
}

impl AwsVpcOptions {
    /// Reads the options from the raw `Backend` object (keys case-insensitive, as Go's decoder).
    pub fn from_backend(backend: &Value) -> Result<Self, ConfigError> {
        let o = FoldedObject::from_value(backend.clone(), "awsvpc.backendConfig")
            .map_err(|e| ConfigError(format!("error decoding VPC backend config: {e}")))?;
        let route_tables = match o.get_non_null("RouteTableID") {
            None => None,
            Some(Value::String(s)) => Some(vec![s.clone()]),
            Some(Value::Array(items)) => {
                let mut tables = Vec::with_capacity(items.len());
                for i in items {
                    match i {
                        Value::String(s) => tables.push(s.clone()),
                        _ => {
                            return Err(ConfigError(
                                "Unexpected type in RouteTableID slice. Must be strings.".into(),
                            ))
                        }
                    }
                }
                Some(tables)
            }
            Some(_) => {
                return Err(ConfigError(
                    "Unexpected RouteTableID type. Must be string or array of strings.".into(),
                ))
            }
        };
        if let Some(t) = &route_tables {
            if t.is_empty() {
                return Err(ConfigError(
                    "RouteTableID is an empty list: name at least one route table, or leave it out to use the subnet's".into(),
                ));
            }
            if t.iter().any(|s| s.trim().is_empty()) {
                return Err(ConfigError(
                    "RouteTableID holds an empty route table id".into(),
                ));
            }
        }
        Ok(AwsVpcOptions { route_tables })
    }
}

/// The aws-vpc backend.
pub struct AwsVpcBackend {
    opts: AwsVpcOptions,
}

impl AwsVpcBackend {
    /// Registry constructor: validates the options before anything is leased.
    pub fn create(ctx: &BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        let opts = AwsVpcOptions::from_backend(&ctx.config.backend)?;
        Ok(Box::new(AwsVpcBackend { opts }))
    }
}

#[async_trait]
impl Backend for AwsVpcBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        let lease = ctx.acquire_public_only_lease().await?;
        let iface_addr = ctx.ext.iface_addr.ok_or_else(|| {
            BackendError::Other(format!(
                "aws-vpc: interface {} has no IPv4 address to find its network interface by",
                ctx.ext.name
            ))
        })?;
        let subnet = lease.key.ipv4;
        setup(&self.opts, iface_addr, subnet, ctx.config.network).await?;
        Ok(CloudRouteNetwork::boxed(lease, ctx))
    }
}

/// Everything the cloud needs for this host: found, checked and routed.
async fn setup(
    opts: &AwsVpcOptions,
    iface_addr: std::net::Ipv4Addr,
    subnet: Ipv4Net,
    network: Option<Ipv4Net>,
) -> Result<(), BackendError> {
    let http = CloudHttp::new()?;
    let imds = Imds::from_env(http.clone());
    let region = imds
        .region()
        .await
        .map_err(|e| BackendError::Other(format!("error getting EC2 region name: {e}")))?;
    let instance_id = imds
        .instance_id()
        .await
        .map_err(|e| BackendError::Other(format!("error getting EC2 instance ID: {e}")))?;
    let creds = creds::resolve(&imds).await?;
    let endpoint = ec2::endpoint_from_env(&region);
    let ec2 = Ec2::new(http, &endpoint, &region, creds)?;
    tracing::info!(
        "aws-vpc: instance {instance_id} in {region}, EC2 API at {}",
        ec2.endpoint()
    );

    let enis = ec2.instance_enis(&instance_id).await?;
    let eni = find_eni(&enis, iface_addr).ok_or_else(|| {
        BackendError::Other(format!(
            "unable to find ENI that matches the {iface_addr} IP address (instance {instance_id} has {})",
            describe_enis(&enis)
        ))
    })?;
    tracing::info!("Found {} that has {iface_addr} IP address.", eni.id);

    match ec2.disable_source_dest_check(&eni.id).await {
        Ok(()) => tracing::info!("aws-vpc: SourceDestCheck disabled on {}", eni.id),
        Err(e) => tracing::warn!("failed to disable SourceDestCheck on {}: {e}.", eni.id),
    }

    let tables = match &opts.route_tables {
        Some(t) => {
            tracing::info!("aws-vpc: route tables from RouteTableID: {}", t.join(", "));
            t.clone()
        }
        None => {
            let t = detect_route_table(&ec2, eni).await?;
            tracing::info!("Found route table {t}.");
            vec![t]
        }
    };
    for table in &tables {
        route_in_table(&ec2, table, subnet, network, &eni.id).await?;
    }
    tracing::info!(
        "aws-vpc: {subnet} routed to {} in {}",
        eni.id,
        tables.join(", ")
    );
    Ok(())
}

/// The ENI holding `addr` among its private IPs.
pub fn find_eni(enis: &[Eni], addr: std::net::Ipv4Addr) -> Option<&Eni> {
    enis.iter().find(|e| e.private_ips.contains(&addr))
}

fn describe_enis(enis: &[Eni]) -> String {
    if enis.is_empty() {
        return "no network interfaces".into();
    }
    enis.iter()
        .map(|e| {
            let ips: Vec<String> = e.private_ips.iter().map(|i| i.to_string()).collect();
            format!("{} [{}]", e.id, ips.join(" "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The table of the ENI's subnet: its explicit association, else the VPC's main table.
async fn detect_route_table(ec2: &Ec2, eni: &Eni) -> Result<String, BackendError> {
    let assoc = ec2
        .route_tables(&[], &[("association.subnet-id", &eni.subnet_id)])
        .await
        .map_err(|e| {
            BackendError::Other(format!(
                "error describing routeTables for subnetID {}: {e}",
                eni.subnet_id
            ))
        })?;
    if let Some(t) = assoc.first() {
        return Ok(t.id.clone());
    }
    let main = ec2
        .route_tables(
            &[],
            &[("association.main", "true"), ("vpc-id", &eni.vpc_id)],
        )
        .await
        .map_err(|e| {
            BackendError::Other(format!(
                "error describing the main route table of {}: {e}",
                eni.vpc_id
            ))
        })?;
    main.first().map(|t| t.id.clone()).ok_or_else(|| {
        BackendError::Other(format!("main route table not found (VPC {})", eni.vpc_id))
    })
}

/// What one table needs: blackholes (inside `network`) to delete, and what to do about our route.
#[derive(Debug, PartialEq, Eq)]
pub struct TablePlan {
    /// Destinations of blackhole routes inside the flannel network.
    pub delete_blackholes: Vec<String>,
    /// What to do for `<subnet> -> ENI`.
    pub own: OwnRoute,
}

/// The state of this host's route in a table.
#[derive(Debug, PartialEq, Eq)]
pub enum OwnRoute {
    /// Present, active, pointing at our ENI: nothing to do.
    Present,
    /// Absent (or about to be deleted as a blackhole): create it.
    Create,
    /// Present but pointing elsewhere: replace it.
    Replace,
}

/// Decides, from a table's current routes, what to change (pure, so it is unit-tested).
pub fn plan(table: &RouteTable, subnet: Ipv4Net, network: Option<Ipv4Net>, eni: &str) -> TablePlan {
    let mut delete_blackholes = Vec::new();
    let mut own = OwnRoute::Create;
    for r in &table.routes {
        let Some(dest) = r.destination.as_deref() else {
            continue;
        };
        let parsed: Option<Ipv4Net> = dest.parse().ok();
        if r.state == "blackhole" {
            let inside = match (parsed, network) {
                (Some(d), Some(n)) => n.contains(&d),
                _ => false,
            };
            if inside {
                delete_blackholes.push(dest.to_string());
                continue;
            }
        }
        if parsed.map(|d| d.trunc()) == Some(subnet.trunc()) {
            own = if r.state == "active" && r.network_interface_id.as_deref() == Some(eni) {
                OwnRoute::Present
            } else {
                OwnRoute::Replace
            };
        }
    }
    TablePlan {
        delete_blackholes,
        own,
    }
}

fn not_found(e: &CloudError) -> bool {
    e.code() == Some("InvalidRoute.NotFound")
}

/// Deletes the blackholes and makes `<subnet> -> eni` exist in `table`; idempotent.
async fn route_in_table(
    ec2: &Ec2,
    table: &str,
    subnet: Ipv4Net,
    network: Option<Ipv4Net>,
    eni: &str,
) -> Result<(), BackendError> {
    let found = ec2
        .route_tables(&[table], &[])
        .await
        .map_err(|e| BackendError::Other(format!("error describing route table {table}: {e}")))?;
    let t = found
        .iter()
        .find(|t| t.id == table)
        .ok_or_else(|| BackendError::Other(format!("route table {table} not found")))?;
    let plan = plan(t, subnet, network, eni);
    for dest in &plan.delete_blackholes {
        tracing::info!("Removing blackhole route: {dest} (table {table})");
        match ec2.delete_route(table, dest).await {
            Ok(()) => {}
            // Another host removed it first: they all race for the same blackholes.
            Err(e) if not_found(&e) => {
                tracing::info!("aws-vpc: blackhole route {dest} already gone from {table}")
            }
            Err(e) => tracing::error!("Error cleaning up blackhole routes: {e}"),
        }
    }
    let cidr = subnet.to_string();
    match plan.own {
        OwnRoute::Present => {
            tracing::info!("aws-vpc: route {cidr} -> {eni} already in table {table}");
            return Ok(());
        }
        OwnRoute::Replace => {
            ec2.replace_route(table, &cidr, eni).await.map_err(|e| {
                BackendError::Other(format!("unable to replace route {cidr} in {table}: {e}"))
            })?;
            tracing::info!("Route replaced in table {table}: {cidr} - {eni}.");
            return Ok(());
        }
        OwnRoute::Create => {}
    }
    match ec2.create_route(table, &cidr, eni).await {
        Ok(()) => {}
        // Someone created it between our look and our create (or a retried create landed).
        Err(e) if e.code() == Some("RouteAlreadyExists") => {
            ec2.replace_route(table, &cidr, eni).await.map_err(|e| {
                BackendError::Other(format!("unable to replace route {cidr} in {table}: {e}"))
            })?;
        }
        Err(e) => {
            return Err(BackendError::Other(format!(
                "unable to add route {cidr} to {table}: {e}"
            )))
        }
    }
    tracing::info!("Route added to table {table}: {cidr} - {eni}.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ec2::Route;
    use super::*;
    use serde_json::json;

    #[test]
    fn route_table_id_option() {
        let o = |v: Value| AwsVpcOptions::from_backend(&v);
        assert_eq!(o(json!({"Type": "aws-vpc"})).unwrap().route_tables, None);
        assert_eq!(
            o(json!({"Type": "aws-vpc", "RouteTableID": null}))
                .unwrap()
                .route_tables,
            None
        );
        assert_eq!(
            o(json!({"Type": "aws-vpc", "RouteTableID": "rtb-1"}))
                .unwrap()
                .route_tables,
            Some(vec!["rtb-1".to_string()])
        );
        assert_eq!(
            o(json!({"routetableid": ["rtb-1", "rtb-2"]}))
                .unwrap()
                .route_tables,
            Some(vec!["rtb-1".to_string(), "rtb-2".to_string()])
        );
        assert_eq!(
            o(json!({"RouteTableID": 7})).unwrap_err().to_string(),
            "Unexpected RouteTableID type. Must be string or array of strings."
        );
        assert_eq!(
            o(json!({"RouteTableID": ["rtb-1", 2]}))
                .unwrap_err()
                .to_string(),
            "Unexpected type in RouteTableID slice. Must be strings."
        );
        assert!(o(json!({"RouteTableID": []}))
            .unwrap_err()
            .to_string()
            .contains("empty list"));
        assert!(o(json!({"RouteTableID": ""})).is_err());
        assert!(o(json!("aws-vpc"))
            .unwrap_err()
            .to_string()
            .starts_with("error decoding VPC backend config: json: cannot unmarshal string"));
    }

    fn route(dest: &str, eni: Option<&str>, state: &str) -> Route {
        Route {
            destination: Some(dest.into()),
            network_interface_id: eni.map(str::to_string),
            state: state.into(),
            ..Route::default()
        }
    }

    fn table(routes: Vec<Route>) -> RouteTable {
        RouteTable {
            id: "rtb-1".into(),
            routes,
            ..RouteTable::default()
        }
    }

    #[test]
    fn plans() {
        let net: Ipv4Net = "10.50.0.0/16".parse().unwrap();
        let sub: Ipv4Net = "10.50.3.0/24".parse().unwrap();
        let t = table(vec![
            route("192.168.0.0/16", None, "active"),
            route("10.50.9.0/24", Some("eni-gone"), "blackhole"),
            route("10.99.0.0/24", Some("eni-gone"), "blackhole"),
            route("10.0.0.0/8", Some("eni-gone"), "blackhole"),
            route("10.50.7.0/24", Some("eni-other"), "active"),
        ]);
        let p = plan(&t, sub, Some(net), "eni-me");
        assert_eq!(p.delete_blackholes, vec!["10.50.9.0/24".to_string()]);
        assert_eq!(p.own, OwnRoute::Create);

        let t = table(vec![route("10.50.3.0/24", Some("eni-me"), "active")]);
        assert_eq!(plan(&t, sub, Some(net), "eni-me").own, OwnRoute::Present);
        let t = table(vec![route("10.50.3.0/24", Some("eni-other"), "active")]);
        assert_eq!(plan(&t, sub, Some(net), "eni-me").own, OwnRoute::Replace);
        // Our own old route, now a blackhole, is deleted and created anew.
        let t = table(vec![route("10.50.3.0/24", Some("eni-old"), "blackhole")]);
        let p = plan(&t, sub, Some(net), "eni-me");
        assert_eq!(p.delete_blackholes, vec!["10.50.3.0/24".to_string()]);
        assert_eq!(p.own, OwnRoute::Create);
        // Without a Network nothing counts as inside it.
        assert!(plan(&t, sub, None, "eni-me").delete_blackholes.is_empty());
    }

    #[test]
    fn eni_by_address() {
        let enis = vec![
            Eni {
                id: "eni-a".into(),
                subnet_id: "s".into(),
                vpc_id: "v".into(),
                private_ips: vec!["10.0.0.5".parse().unwrap()],
            },
            Eni {
                id: "eni-b".into(),
                subnet_id: "s".into(),
                vpc_id: "v".into(),
                private_ips: vec!["10.0.1.5".parse().unwrap(), "10.0.1.6".parse().unwrap()],
            },
        ];
        assert_eq!(
            find_eni(&enis, "10.0.1.6".parse().unwrap()).unwrap().id,
            "eni-b"
        );
        assert!(find_eni(&enis, "10.0.9.9".parse().unwrap()).is_none());
        assert_eq!(
            describe_enis(&enis),
            "eni-a [10.0.0.5], eni-b [10.0.1.5 10.0.1.6]"
        );
    }
}

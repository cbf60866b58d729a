//! `flanneld doctor`: answers "why does pod A not reach pod B" on one host, read-only.
//!
//! It reads the leases (etcd or Kubernetes, with the daemon's own flags), subnet.env, the kernel
//! (flannel's devices, addresses, routes, neighbours, FDB) and the firewall, and prints every
//! disagreement with what would fix it. It never writes anything: no netlink change, no store
//! write, no firewall change. Exit status: 0 all agree, 1 something drifts, 2 it could not look.

pub mod checks;
pub mod udp;
pub mod wg;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use self::checks::{Diagnosis, Inputs, KernelState, RulesState, SubnetEnvState};
use crate::cli::Options;
use crate::netlink::Netlink;
use crate::rules;
use crate::store::kube::{KubeSettings, KubeStore};
use crate::store::{StoreInspection, SubnetStore};

/// How long one store read may take before doctor gives up.
const STORE_TIMEOUT: Duration = Duration::from_secs(15);

/// The outcome of a doctor run.
pub enum Verdict {
    /// Store, subnet.env and kernel agree.
    Consistent,
    /// At least one finding.
    Drift,
}

/// Runs the diagnosis and prints it (text, or JSON with `json`). Errors mean it could not look.
pub async fn run(opts: &Options, json: bool) -> anyhow::Result<Verdict> {
    let store: Arc<dyn SubnetStore> = if opts.kube_subnet_mgr {
        let settings = KubeSettings {
            api_url: opts.kube_api_url.clone(),
            kubeconfig: opts.kubeconfig_file.clone(),
            annotation_prefix: opts.kube_annotation_prefix.clone(),
            net_config_path: opts.net_config_path.clone(),
            set_node_network_unavailable: false,
        };
        let s = tokio::time::timeout(STORE_TIMEOUT, KubeStore::connect(settings))
            .await
            .context("the Kubernetes API did not answer")?
            .context("cannot use the Kubernetes API")?;
        Arc::new(s)
    } else {
        Arc::new(crate::daemon::etcd_store(opts))
    };
    let config = tokio::time::timeout(STORE_TIMEOUT, store.network_config())
        .await
        .with_context(|| format!("{} did not answer", store.name()))?
        .with_context(|| format!("cannot read the network config from {}", store.name()))?;
    let inspection: StoreInspection = tokio::time::timeout(STORE_TIMEOUT, store.inspect())
        .await
        .with_context(|| format!("{} did not answer", store.name()))?
        .with_context(|| format!("cannot read the leases from {}", store.name()))?;

    let subnet_env = match std::fs::read_to_string(&opts.subnet_file) {
        Ok(text) => SubnetEnvState::Vars(flannel_types::subnet_env::read_dotenv(&text)),
        Err(e) => SubnetEnvState::Unreadable(opts.subnet_file.clone(), e.to_string()),
    };
    let nl = Netlink::open().context("failed to open netlink")?;
    let kernel = read_kernel(&nl).await?;

    let own = inspection.own.clone().or_else(|| {
        let SubnetEnvState::Vars(v) = &subnet_env else {
            return None;
        };
        let s: ipnet::Ipv4Net = v.get("FLANNEL_SUBNET")?.parse().ok()?;
        inspection
            .leases
            .iter()
            .find(|l| l.key.ipv4 == s.trunc())
            .cloned()
    });
    let rules = match own {
        None => RulesState::NotWanted,
        Some(l) => {
            let manager = rules::for_config(config.enable_nftables);
            let random_fully = !opts.ip_masq_fully_random_disable
                && (config.enable_nftables || rules::iptables::supports_random_fully().await);
            let set = crate::daemon::rule_set(
                opts,
                random_fully,
                config.enable_ipv4.then_some(config.network).flatten(),
                Some(l.key.ipv4),
                config.enable_ipv6.then_some(config.ipv6_network).flatten(),
                l.key.ipv6,
            );
            let firewall = if config.enable_nftables {
                "nftables"
            } else {
                "iptables"
            };
            if set == rules::RuleSet::default() {
                RulesState::NotWanted
            } else {
                match manager.is_current(&set).await {
                    Ok(true) => RulesState::Current,
                    Ok(false) => RulesState::Missing(firewall),
                    Err(e) => RulesState::Unknown(e.to_string()),
                }
            }
        }
    };

    let public_ip = opts.public_ip.parse().ok();
    let diagnosis = checks::diagnose(&Inputs {
        config: &config,
        store: &inspection,
        subnet_env: &subnet_env,
        kernel: &kernel,
        rules,
        ip_masq: opts.ip_masq,
        blackhole_route: opts.ip_blackhole_route,
        public_ip,
        kube: opts.kube_subnet_mgr,
    });
    print(&diagnosis, &store.name(), json);
    Ok(if diagnosis.findings.is_empty() {
        Verdict::Consistent
    } else {
        Verdict::Drift
    })
}

/// Reads flannel's part of the kernel state, read-only.
pub async fn read_kernel(nl: &Netlink) -> anyhow::Result<KernelState> {
    let links = nl.links().await?;
    let mut k = KernelState {
        names: links.iter().map(|l| (l.index, l.name.clone())).collect(),
        up: links.iter().map(|l| (l.index, l.up)).collect(),
        addresses: nl.addresses().await?,
        routes: nl.routes(false).await?,
        ..Default::default()
    };
    for l in links.iter().filter(|l| l.name.starts_with("flannel")) {
        if let Some(d) = nl.link_details(&l.name).await? {
            if d.name.starts_with("flannel-wg") {
                use crate::backend::wireguard::{kernel, uapi};
                let view = match d.kind.as_deref() {
                    Some("wireguard") => Some(kernel::read_device(&d.name).await),
                    Some("tun") => Some(uapi::read_device(&d.name)),
                    _ => None,
                };
                if let Some(v) = view {
                    k.wireguard.insert(d.name.clone(), v);
                }
            }
            if d.kind.as_deref() == Some("vxlan") {
                k.neighbours
                    .insert(d.index, nl.neighbours(d.index, false).await?);
                k.fdb.insert(d.index, nl.neighbours(d.index, true).await?);
            }
            k.devices.push(d);
        }
    }
    Ok(k)
}

fn print(d: &Diagnosis, store: &str, json: bool) {
    if json {
        let doc = serde_json::json!({
            "consistent": d.findings.is_empty(),
            "store": store,
            "backend": d.backend,
            "network": d.network,
            "ownSubnet": d.own_subnet,
            "remoteLeases": d.remote_leases,
            "findings": d.findings,
        });
        println!("{doc:#}");
        return;
    }
    println!(
        "flanneld doctor: {store}; backend {:?}, network {}, this host {}, {} remote lease(s)",
        d.backend,
        d.network.as_deref().unwrap_or("(none)"),
        d.own_subnet.as_deref().unwrap_or("(no lease)"),
        d.remote_leases
    );
    if d.findings.is_empty() {
        println!("OK: the store, subnet.env and the kernel agree.");
        return;
    }
    for f in &d.findings {
        println!("PROBLEM {} [{}]: {}", f.check, f.subject, f.problem);
        println!("    fix: {}", f.fix);
    }
    println!("{} problem(s) found.", d.findings.len());
}

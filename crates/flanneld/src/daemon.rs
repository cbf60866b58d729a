//! The daemon's life cycle, in the reference's start-up order: store, config, interface,
//! backend + lease, subnet.env, lease watch, renewal; then wait for a signal or revocation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use flannel_types::subnet_env::previous_subnets;
use flannel_types::{NetworkConfig, SubnetEnv};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::backend::{self, BackendContext};
use crate::cli::Options;
use crate::health::{self, Readiness};
use crate::iface::{self, IpStack, Selection};
use crate::lease::{Lease, LeaseEvent, LeaseWatcher, StoreUpdate};
use crate::netlink::{Netlink, RouteSpec};
use crate::rules::{self, Masq, RuleSet};
use crate::store::etcd::{EtcdSettings, EtcdStore};
use crate::store::kube::{KubeSettings, KubeStore};
use crate::store::{OwnLeaseEvent, SubnetStore};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why the daemon stopped without an error (exit status 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// SIGINT or SIGTERM.
    Signal,
    /// Our lease was deleted or expired.
    LeaseRevoked,
}

async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

fn parse_opt<T: std::str::FromStr>(value: &str, flag: &str) -> anyhow::Result<Option<T>> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| anyhow::anyhow!("invalid {flag} value {value:?}"))
}

pub(crate) fn etcd_store(opts: &Options) -> EtcdStore {
    let subnet_file = PathBuf::from(&opts.subnet_file);
    let (prev4, prev6) = previous_subnets(&subnet_file);
    EtcdStore::new(
        EtcdSettings {
            endpoints: opts
                .etcd_endpoints
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            prefix: opts.etcd_prefix.clone(),
            keyfile: opts.etcd_keyfile.clone(),
            certfile: opts.etcd_certfile.clone(),
            cafile: opts.etcd_cafile.clone(),
            username: opts.etcd_username.clone(),
            password: opts.etcd_password.clone(),
        },
        prev4,
        prev6,
    )
}

/// Fetches the network config, retrying every second (the reference waits forever).
async fn wait_for_config(store: &dyn SubnetStore) -> NetworkConfig {
    loop {
        match store.network_config().await {
            Ok(c) => {
                tracing::info!("Found network config - Backend type: {}", c.backend_type);
                return c;
            }
            Err(e) => {
                crate::metrics::metrics().store_error();
                tracing::error!("Couldn't fetch network config: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn check_br_netfilter(config: &NetworkConfig) -> anyhow::Result<()> {
    if config.enable_nftables {
        return Ok(());
    }
    let mut needed = vec![];
    if config.enable_ipv4 {
        needed.push("/proc/sys/net/bridge/bridge-nf-call-iptables");
    }
    if config.enable_ipv6 {
        needed.push("/proc/sys/net/bridge/bridge-nf-call-ip6tables");
    }
    for p in needed {
        if std::fs::metadata(p).is_err() {
            bail!("Failed to check br_netfilter: stat {p}: no such file or directory (load the br_netfilter module)");
        }
    }
    Ok(())
}

/// Runs the daemon until a signal or lease revocation; errors are fatal start-up failures.
pub async fn run(opts: Options) -> anyhow::Result<Shutdown> {
    tracing::info!("CLI flags config: {}", opts.redacted());
    if !(1..=1439).contains(&opts.subnet_lease_renew_margin) {
        bail!("Invalid subnet-lease-renew-margin option, out of acceptable range");
    }
    let mut public_ip: Option<Ipv4Addr> = parse_opt(&opts.public_ip, "--public-ip")?;
    let mut public_ipv6: Option<Ipv6Addr> = parse_opt(&opts.public_ipv6, "--public-ipv6")?;
    let can_reach: Option<IpAddr> = parse_opt(&opts.iface_can_reach, "--iface-can-reach")?;

    let signal = shutdown_signal();
    tokio::pin!(signal);

    let store: Arc<dyn SubnetStore> = if opts.kube_subnet_mgr {
        let settings = KubeSettings {
            api_url: opts.kube_api_url.clone(),
            kubeconfig: opts.kubeconfig_file.clone(),
            annotation_prefix: opts.kube_annotation_prefix.clone(),
            net_config_path: opts.net_config_path.clone(),
            set_node_network_unavailable: opts.set_node_network_unavailable,
        };
        tokio::select! {
            s = KubeStore::connect(settings) => Arc::new(s.context("Failed to create SubnetManager")?),
            _ = &mut signal => return Ok(Shutdown::Signal),
        }
    } else {
        Arc::new(etcd_store(&opts))
    };
    tracing::info!("Created subnet manager: {}", store.name());

    let readiness = Readiness::default();
    let mut tasks = tokio::task::JoinSet::new();
    if opts.healthz_port > 0 {
        let ip: IpAddr = opts
            .healthz_ip
            .parse()
            .with_context(|| format!("invalid --healthz-ip {:?}", opts.healthz_ip))?;
        let port = u16::try_from(opts.healthz_port)
            .with_context(|| format!("invalid --healthz-port {}", opts.healthz_port))?;
        let addr = SocketAddr::new(ip, port);
        let listener = health::bind(addr)
            .await
            .with_context(|| format!("Start healthz server error: cannot listen on {addr}"))?;
        tracing::info!("Start healthz server on {addr}");
        tasks.spawn(health::serve(listener, readiness.clone()));
    }

    let config = tokio::select! {
        c = wait_for_config(store.as_ref()) => c,
        _ = &mut signal => return Ok(Shutdown::Signal),
    };
    if !config.enable_ipv4 && !config.enable_ipv6 {
        bail!("none defined stack");
    }
    check_br_netfilter(&config)?;

    // Kube mode: the node-public-ip(v6) annotations replace --public-ip(v6).
    let (stored4, stored6) = tokio::select! {
        s = store.stored_public_ips() => s,
        _ = &mut signal => return Ok(Shutdown::Signal),
    };
    if let Some(ip) = stored4 {
        tracing::info!("Using public IP {ip} from the node-public-ip annotation");
        public_ip = Some(ip);
    }
    if let Some(ip) = stored6 {
        tracing::info!("Using public IPv6 {ip} from the node-public-ipv6 annotation");
        public_ipv6 = Some(ip);
    }

    let nl = Netlink::open().context("failed to open netlink")?;
    let selection = Selection {
        ifaces: opts.iface.clone(),
        regexes: opts.iface_regex.clone(),
        can_reach,
        public_ip,
        public_ipv6,
    };
    let stack = IpStack {
        v4: config.enable_ipv4,
        v6: config.enable_ipv6,
    };
    let ext = iface::select(&nl, &selection, stack)
        .await
        .context("Failed to find any valid interface to use")?;
    tracing::info!(
        "Using interface with name {} and address {:?}",
        ext.name,
        ext.iface_addr
            .map(IpAddr::V4)
            .or(ext.iface_v6_addr.map(IpAddr::V6))
    );
    tracing::info!(
        "Defaulting external address to interface address ({:?})",
        ext.ext_addr
    );

    let ctx = BackendContext {
        store: store.clone(),
        ext,
        config: config.clone(),
    };
    let constructor = backend::lookup(&config.backend_type).context("Error fetching backend")?;
    if config.backend_type != "udp" {
        backend::udp::remove_leftover_device(&nl).await;
    }
    if config.backend_type != "wireguard" {
        backend::wireguard::remove_leftover_device(&nl).await;
    }
    let be = constructor(&ctx).context("Error fetching backend")?;
    let network = tokio::select! {
        n = be.register_network(&ctx) => n.context("Error registering network")?,
        _ = &mut signal => return Ok(Shutdown::Signal),
    };
    backend::engine::preattach::release_unclaimed();
    let lease = network.lease().clone();

    setup_traffic_rules(&opts, &config, &lease, &mut tasks).await?;
    if opts.ip_blackhole_route {
        tasks.spawn(keep_blackhole_routes(
            nl.clone(),
            lease.clone(),
            resync_period(&opts),
        ));
    }

    let env = SubnetEnv {
        network: config.enable_ipv4.then_some(config.network).flatten(),
        subnet: config.enable_ipv4.then_some(lease.key.ipv4),
        ipv6_network: config.enable_ipv6.then_some(config.ipv6_network).flatten(),
        ipv6_subnet: if config.enable_ipv6 {
            lease.key.ipv6
        } else {
            None
        },
        mtu: network.mtu(),
        ipmasq: opts.ip_masq,
    };
    match env.write_atomic(std::path::Path::new(&opts.subnet_file)) {
        Ok(()) => {
            tracing::info!("Wrote subnet file to {}", opts.subnet_file);
            readiness.set_ready();
            tracing::info!("flannel is ready");
        }
        // The reference only warns and then runs on uselessly (never ready): fail instead.
        Err(e) => bail!("failed to write subnet file {}: {e}", opts.subnet_file),
    }

    // Lease watch -> backend.
    tracing::info!("Running backend.");
    let (watch_tx, watch_rx) = mpsc::channel(store.event_queue_depth());
    {
        let store = store.clone();
        tasks.spawn(async move {
            if let Err(e) = store.watch_leases(watch_tx).await {
                tracing::error!("lease watch stopped: {e}");
            }
        });
    }
    crate::metrics::metrics().set_lease_expiry(lease.expiration);
    tasks.spawn(drive_backend(
        network,
        LeaseWatcher::new(lease.key),
        watch_rx,
        config.backend_type.clone(),
    ));

    notify_systemd_ready();
    {
        let store = store.clone();
        let lease = lease.clone();
        tasks.spawn(async move {
            if let Err(e) = store.complete_lease(&lease).await {
                tracing::error!("{e}");
            }
        });
    }

    let margin = Duration::from_secs(opts.subnet_lease_renew_margin as u64 * 60);
    let outcome = tokio::select! {
        r = keep_lease(store.clone(), config.clone(), lease, margin) => r,
        _ = &mut signal => Shutdown::Signal,
    };
    match outcome {
        Shutdown::LeaseRevoked => tracing::info!("Lease has been revoked. Shutting down daemon."),
        Shutdown::Signal => tracing::info!("shutdownHandler sent cancel signal..."),
    }
    tasks.abort_all();
    tracing::info!("Exiting cleanly...");
    Ok(outcome)
}

/// Tells systemd (`Type=notify` units) that flanneld is ready: subnet.env is written and the
/// backend runs. Does nothing without `NOTIFY_SOCKET`.
fn notify_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
        let sock = UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                <UnixAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)?
            }
            None => UnixAddr::from_pathname(&path)?,
        };
        sock.send_to_addr(b"READY=1", &addr)?;
        Ok(())
    })();
    match sent {
        Ok(()) => tracing::info!("notified systemd: READY=1"),
        Err(e) => tracing::warn!("failed to notify systemd at {path:?}: {e}"),
    }
}

/// Feeds lease updates to the backend (as event batches, with a resync after every snapshot)
/// and runs its periodic check, until the watch ends.
async fn drive_backend(
    mut network: Box<dyn backend::Network>,
    mut watcher: LeaseWatcher,
    mut watch_rx: mpsc::Receiver<StoreUpdate>,
    backend_type: String,
) {
    let metrics = crate::metrics::metrics();
    metrics.set_leases(&backend_type, 0);
    let mut check = tokio::time::interval(network.check_interval());
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    loop {
        let update = tokio::select! {
            u = watch_rx.recv() => match u {
                Some(u) => u,
                None => break,
            },
            _ = check.tick() => {
                let known: Vec<Lease> = watcher.known().cloned().collect();
                network.check(&known).await;
                continue;
            }
        };
        let is_snapshot = matches!(update, StoreUpdate::Snapshot(_));
        let batch = watcher.apply(update);
        for e in &batch {
            match e {
                LeaseEvent::Added(l) => tracing::info!(
                    "lease added: {} (PublicIP {}, backend {:?})",
                    l.key,
                    l.attrs.public_ip,
                    l.attrs.backend_type
                ),
                LeaseEvent::Removed(l) => tracing::info!("lease removed: {}", l.key),
            }
        }
        if !batch.is_empty() {
            let added = batch
                .iter()
                .filter(|e| matches!(e, LeaseEvent::Added(_)))
                .count();
            metrics.lease_events(added, batch.len() - added);
            network.handle_events(batch).await;
            metrics.set_leases(&backend_type, watcher.known().count());
        }
        if is_snapshot {
            let known: Vec<Lease> = watcher.known().cloned().collect();
            network.resync(&known).await;
        }
    }
}

fn resync_period(opts: &Options) -> Duration {
    Duration::from_secs(opts.iptables_resync.max(1) as u64)
}

/// Installs masquerade/forward rules and keeps them in place (re-applied when changed).
/// The masquerade/forward rules flannel wants for a network and this host's subnet(s).
pub(crate) fn rule_set(
    opts: &Options,
    random_fully: bool,
    v4: Option<Ipv4Net>,
    pod4: Option<Ipv4Net>,
    v6: Option<Ipv6Net>,
    pod6: Option<Ipv6Net>,
) -> RuleSet {
    RuleSet {
        masq_v4: match (v4, pod4) {
            (Some(cluster), Some(pod)) if opts.ip_masq => Some(Masq { cluster, pod }),
            _ => None,
        },
        masq_v6: match (v6, pod6) {
            (Some(cluster), Some(pod)) if opts.ip_masq => Some(Masq { cluster, pod }),
            _ => None,
        },
        forward_v4: v4.filter(|_| opts.iptables_forward_rules),
        forward_v6: v6.filter(|_| opts.iptables_forward_rules),
        random_fully,
    }
}

async fn setup_traffic_rules(
    opts: &Options,
    config: &NetworkConfig,
    lease: &Lease,
    tasks: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<()> {
    let manager = rules::for_config(config.enable_nftables);
    tracing::info!("Cleaning-up unused traffic manager rules");
    manager.cleanup_other().await;
    let random_fully = !opts.ip_masq_fully_random_disable
        && (config.enable_nftables || rules::iptables::supports_random_fully().await);
    let v4 = config.enable_ipv4.then_some(config.network).flatten();
    let v6 = config.enable_ipv6.then_some(config.ipv6_network).flatten();
    let build = |v4, pod4, v6, pod6| rule_set(opts, random_fully, v4, pod4, v6, pod6);
    let set = build(v4, Some(lease.key.ipv4), v6, lease.key.ipv6);
    // The rules of the previous run (from the old subnet.env) are removed if they differ.
    let previous =
        previous_network(&opts.subnet_file).map(|(n4, s4, n6, s6)| build(n4, s4, n6, s6));
    if set == RuleSet::default() {
        return Ok(());
    }
    manager
        .apply(&set, previous.as_ref().filter(|p| **p != set))
        .await
        .context("Failed to setup masq/forward rules")?;
    tracing::info!("traffic rules installed");
    let period = resync_period(opts);
    tasks.spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            match manager.is_current(&set).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("flannel's firewall rules were changed; restoring them");
                    if let Err(e) = manager.apply(&set, None).await {
                        tracing::error!("{e}");
                    }
                }
                Err(e) => tracing::error!("{e}"),
            }
        }
    });
    Ok(())
}

/// (IPv4 network, IPv4 subnet, IPv6 network, IPv6 subnet) of a subnet.env.
type RecordedNetwork = (
    Option<Ipv4Net>,
    Option<Ipv4Net>,
    Option<Ipv6Net>,
    Option<Ipv6Net>,
);

/// Network and subnet recorded in an existing subnet.env (before we overwrite it).
fn previous_network(path: &str) -> Option<RecordedNetwork> {
    use flannel_types::subnet_env::{cidrs_from_env, read_dotenv};
    let text = std::fs::read_to_string(path).ok()?;
    let vars = read_dotenv(&text);
    let one = |key: &str| match cidrs_from_env(&vars, key).as_slice() {
        [n] => Some(*n),
        _ => None,
    };
    let v4 = |n: Option<IpNet>| match n {
        Some(IpNet::V4(n)) => Some(n),
        _ => None,
    };
    let v6 = |n: Option<IpNet>| match n {
        Some(IpNet::V6(n)) => Some(n),
        _ => None,
    };
    Some((
        v4(one("FLANNEL_NETWORK")),
        v4(one("FLANNEL_SUBNET")),
        v6(one("FLANNEL_IPV6_NETWORK")),
        v6(one("FLANNEL_IPV6_SUBNET")),
    ))
}

/// Keeps `blackhole <own subnet>` routes (for set-ups without the bridge plugin).
async fn keep_blackhole_routes(nl: Netlink, lease: Lease, period: Duration) {
    let mut wanted = vec![RouteSpec {
        dst: IpNet::V4(lease.key.ipv4),
        gateway: None,
        oif: None,
        onlink: false,
        blackhole: true,
    }];
    if let Some(v6) = lease.key.ipv6 {
        wanted.push(RouteSpec {
            dst: IpNet::V6(v6),
            gateway: None,
            oif: None,
            onlink: false,
            blackhole: true,
        });
    }
    loop {
        for w in &wanted {
            let present = nl
                .routes(w.dst.addr().is_ipv6())
                .await
                .map(|rs| rs.iter().any(|r| w.matches(r)))
                .unwrap_or(false);
            if !present {
                match nl.replace_route(w).await {
                    Ok(()) => tracing::info!("blackhole route {} installed", w.dst),
                    Err(e) => tracing::error!("Failed to setup blackhole route, {e}"),
                }
            }
        }
        tokio::time::sleep(period).await;
    }
}

/// Delay before the next renewal attempt after a failure: 1 s doubling to 8 s, so a renewal
/// that fell due during a store outage succeeds within seconds of the store's return.
fn renew_retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(3))
}

/// Spawns the watch of the own lease; its events arrive on the returned receiver.
fn watch_own(
    store: &Arc<dyn SubnetStore>,
    lease: &Lease,
) -> (mpsc::Receiver<OwnLeaseEvent>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(8);
    let watched = lease.clone();
    let watch_store = store.clone();
    let handle = tokio::spawn(async move {
        if let Err(e) = watch_store.watch_own_lease(&watched, tx).await {
            tracing::error!("own lease watch stopped: {e}");
        }
    });
    (rx, handle)
}

/// Renews the lease before it expires and watches it. A lease that vanishes (deleted or
/// expired) is re-acquired in-process; returns only when that yields a different subnet (the
/// data path must then be rebuilt by a restart).
async fn keep_lease(
    store: Arc<dyn SubnetStore>,
    config: NetworkConfig,
    mut lease: Lease,
    margin: Duration,
) -> Shutdown {
    let (mut rx, mut watch) = watch_own(&store, &lease);
    let mut failures = 0u32;
    let mut retry_at: Option<SystemTime> = None;
    loop {
        let due = retry_at.or_else(|| lease.expiration.map(|exp| exp - margin));
        let wait = match due {
            Some(t) => t
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
            None => Duration::from_secs(365 * 24 * 3600),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait), if due.is_some() => {
                match store.renew_lease(&lease).await {
                    Ok(l) => {
                        tracing::info!("Lease renewed, new expiration: {:?}", l.expiration);
                        crate::metrics::metrics().lease_renewed();
                        crate::metrics::metrics().set_lease_expiry(l.expiration);
                        lease = l;
                        retry_at = None;
                        failures = 0;
                    }
                    Err(e) => {
                        crate::metrics::metrics().store_error();
                        let delay = renew_retry_delay(failures);
                        failures += 1;
                        tracing::error!("Error renewing lease (trying again in {delay:?}): {e}");
                        retry_at = Some(SystemTime::now() + delay);
                    }
                }
            }
            ev = rx.recv() => match ev {
                Some(OwnLeaseEvent::Updated(l)) => {
                    if l.ttl_id == 0 && lease.ttl_id != 0 {
                        tracing::info!("Own lease was turned into a reservation; no more renewals");
                        lease.ttl_id = 0;
                        lease.expiration = None;
                        crate::metrics::metrics().set_lease_expiry(None);
                    }
                }
                Some(OwnLeaseEvent::Revoked) | None => {
                    watch.abort();
                    tracing::warn!(
                        "Lease {} has been revoked (deleted or expired); re-acquiring it",
                        lease.key
                    );
                    let mut failures = 0u32;
                    let fresh = loop {
                        match store.reacquire_lease(&config, &lease).await {
                            Ok(l) => break l,
                            Err(e) => {
                                crate::metrics::metrics().store_error();
                                let delay = renew_retry_delay(failures);
                                failures += 1;
                                tracing::error!("Error re-acquiring the lease (trying again in {delay:?}): {e}");
                                tokio::time::sleep(delay).await;
                            }
                        }
                    };
                    if fresh.key != lease.key {
                        tracing::error!(
                            "Re-acquired lease {} differs from the lost {}; restarting to rebuild the data path",
                            fresh.key, lease.key
                        );
                        return Shutdown::LeaseRevoked;
                    }
                    tracing::info!("Lease {} re-acquired; data path unchanged", fresh.key);
                    crate::metrics::metrics().set_lease_expiry(fresh.expiration);
                    lease = fresh;
                    retry_at = None;
                    (rx, watch) = watch_own(&store, &lease);
                }
            }
        }
    }
}

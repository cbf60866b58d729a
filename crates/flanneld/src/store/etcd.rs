//! The etcd v3 subnet store, byte-compatible with Go flannel's keys and values.
//!
//! Improvements over the reference: a subnet taken by another host between our list and our
//! create is retried with another subnet (the reference exits); a reservation (key without an
//! etcd lease) stays a reservation; a malformed key or value is logged and skipped; a dead
//! endpoint in `--etcd-endpoints` fails over to the next one.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use flannel_types::{LeaseAttrs, NetworkConfig, SubnetKey};
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::{mpsc, Mutex};

use super::allocate::pick_free_subnet;
use super::{OwnLeaseEvent, StoreError, StoreInspection, SubnetStore};
use crate::lease::{Lease, LeaseEvent, StoreUpdate};

/// Lifetime of a lease in etcd (Go flannel's `subnetTTL`).
pub const SUBNET_TTL: Duration = Duration::from_secs(24 * 3600);

/// Attempts of the acquire loop before giving up.
const ACQUIRE_ATTEMPTS: usize = 10;

/// Deadline of one unary etcd request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdSettings {
    /// Endpoint URLs, tried in order.
    pub endpoints: Vec<String>,
    /// Key prefix of the flannel network.
    pub prefix: String,
    /// Client key file (TLS is used only when key and certificate are both given).
    pub keyfile: String,
    /// Client certificate file.
    pub certfile: String,
    /// CA bundle file.
    pub cafile: String,
    /// etcd user.
    pub username: String,
    /// etcd password.
    pub password: String,
}

/// A subnet store in etcd v3.
pub struct EtcdStore {
    settings: EtcdSettings,
    client: Mutex<Option<Client>>,
    next_endpoint: Mutex<usize>,
    previous_v4: Option<Ipv4Net>,
    previous_v6: Option<Ipv6Net>,
}

fn unavailable(context: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> StoreError {
    let context = context.into();
    move |e| StoreError::Unavailable {
        context,
        source: Box::new(e),
    }
}

impl EtcdStore {
    /// A store for `settings`; `previous_*` are the subnets of an existing subnet.env.
    pub fn new(
        settings: EtcdSettings,
        previous_v4: Option<Ipv4Net>,
        previous_v6: Option<Ipv6Net>,
    ) -> Self {
        if settings.keyfile.is_empty() || settings.certfile.is_empty() {
            tracing::warn!(
                "no certificate provided: connecting to etcd with http. This is insecure"
            );
        }
        EtcdStore {
            settings,
            client: Mutex::new(None),
            next_endpoint: Mutex::new(0),
            previous_v4,
            previous_v6,
        }
    }

    fn config_key(&self) -> String {
        format!("{}/config", self.settings.prefix)
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.settings.prefix)
    }

    fn lease_key(&self, key: &SubnetKey) -> String {
        format!("{}{}", self.subnets_prefix(), key)
    }

    fn connect_options(&self) -> Result<ConnectOptions, StoreError> {
        let s = &self.settings;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if !s.username.is_empty() {
            opts = opts.with_user(s.username.clone(), s.password.clone());
        }
        if let Some(tls) = self.tls()? {
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }

    fn tls(&self) -> Result<Option<TlsOptions>, StoreError> {
        let s = &self.settings;
        if s.keyfile.is_empty() || s.certfile.is_empty() {
            return Ok(None);
        }
        let read = |p: &str, what: &str| {
            std::fs::read(p).map_err(|e| StoreError::Io {
                context: format!("failed to read etcd {what} {p}"),
                source: e,
            })
        };
        let cert = read(&s.certfile, "certificate file")?;
        let key = read(&s.keyfile, "key file")?;
        let mut tls = TlsOptions::new().identity(Identity::from_pem(cert, key));
        if !s.cafile.is_empty() {
            tls = tls.ca_certificate(Certificate::from_pem(read(&s.cafile, "CA file")?));
        }
        Ok(Some(tls))
    }

    fn endpoint_url(&self, ep: &str) -> String {
        let tls = !self.settings.keyfile.is_empty() && !self.settings.certfile.is_empty();
        match ep.strip_prefix("http://") {
            // With client certificates configured the connection is always TLS.
            Some(rest) if tls => format!("https://{rest}"),
            _ => ep.to_string(),
        }
    }

    /// A connected client; tries each endpoint in turn until one answers.
    async fn client(&self) -> Result<Client, StoreError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let endpoints = &self.settings.endpoints;
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable {
                context: "no etcd endpoints configured".into(),
                source: "empty --etcd-endpoints".into(),
            });
        }
        let mut next = self.next_endpoint.lock().await;
        let mut last_err = None;
        for i in 0..endpoints.len() {
            let idx = (*next + i) % endpoints.len();
            let url = self.endpoint_url(&endpoints[idx]);
            let attempt = async {
                let mut c = Client::connect([url.as_str()], Some(self.connect_options()?))
                    .await
                    .map_err(unavailable(format!("failed to connect to etcd at {url}")))?;
                c.get(self.config_key(), Some(GetOptions::new().with_count_only()))
                    .await
                    .map_err(unavailable(format!("etcd at {url} did not answer")))?;
                Ok::<_, StoreError>(c)
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
                Ok(Ok(c)) => {
                    tracing::info!("connected to etcd at {url}");
                    *next = idx;
                    *guard = Some(c.clone());
                    return Ok(c);
                }
                Ok(Err(e)) => last_err = Some(e),
                Err(_) => {
                    last_err = Some(StoreError::Unavailable {
                        context: format!("etcd at {url} did not answer"),
                        source: "timed out".into(),
                    })
                }
            }
        }
        *next = (*next + 1) % endpoints.len();
        Err(last_err.unwrap_or(StoreError::MaxRetries))
    }

    /// Runs one request with a deadline; on failure the connection is dropped so the next
    /// request reconnects (possibly to another endpoint).
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client().await?;
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, f(client)).await {
            Ok(r) => r.map_err(unavailable(what)),
            Err(_) => Err(StoreError::Unavailable {
                context: what.to_string(),
                source: "etcd request timed out".into(),
            }),
        };
        if result.is_err() {
            self.reset_client().await;
        }
        result
    }

    async fn reset_client(&self) {
        *self.client.lock().await = None;
        let mut next = self.next_endpoint.lock().await;
        *next = (*next + 1) % self.settings.endpoints.len().max(1);
    }

    /// Decodes one stored lease; `None` (with a warning) for anything malformed.
    fn decode(&self, kv: &KeyValue) -> Option<Lease> {
        match self.decode_entry(kv) {
            Ok(l) => Some(l),
            Err((key, e)) => {
                tracing::warn!("Ignoring bad subnet node {key}: {e}");
                None
            }
        }
    }

    /// Decodes one stored lease, or says which key is bad and why.
    fn decode_entry(&self, kv: &KeyValue) -> Result<Lease, (String, String)> {
        let key = String::from_utf8_lossy(kv.key());
        let name = key.strip_prefix(&self.subnets_prefix()).unwrap_or(&key);
        let subnet: SubnetKey = name
            .parse()
            .map_err(|e| (key.to_string(), format!("{e}")))?;
        let value = String::from_utf8_lossy(kv.value());
        let attrs = LeaseAttrs::from_json(&value).map_err(|e| (key.to_string(), format!("{e}")))?;
        Ok(Lease {
            key: subnet,
            attrs,
            expiration: None,
            ttl_id: kv.lease(),
        })
    }

    /// All leases and the revision they were read at.
    async fn list(&self) -> Result<(Vec<Lease>, i64), StoreError> {
        let prefix = self.subnets_prefix();
        let resp = self
            .call("failed to list subnet leases", |mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok((
            resp.kvs().iter().filter_map(|kv| self.decode(kv)).collect(),
            rev,
        ))
    }

    async fn grant(&self) -> Result<(i64, SystemTime), StoreError> {
        let resp = self
            .call("failed to grant an etcd lease", |mut c| async move {
                c.lease_grant(SUBNET_TTL.as_secs() as i64, None).await
            })
            .await?;
        let exp = SystemTime::now() + Duration::from_secs(resp.ttl().max(0) as u64);
        Ok((resp.id(), exp))
    }

    async fn revoke(&self, id: i64) {
        if id == 0 {
            return;
        }
        let r = self
            .call("failed to revoke an etcd lease", |mut c| async move {
                c.lease_revoke(id).await
            })
            .await;
        if let Err(e) = r {
            tracing::debug!("{e}");
        }
    }

    /// Writes `attrs` for an existing key: with a fresh 24 h lease, or none for a reservation.
    async fn update(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        reservation: bool,
    ) -> Result<Lease, StoreError> {
        let (id, expiration) = if reservation {
            (0, None)
        } else {
            let (id, exp) = self.grant().await?;
            (id, Some(exp))
        };
        let k = self.lease_key(key);
        let v = attrs.to_json();
        let opts = (id != 0).then(|| PutOptions::new().with_lease(id));
        self.call(&format!("failed to write lease {k}"), |mut c| async move {
            c.put(k, v, opts).await
        })
        .await?;
        Ok(Lease {
            key: *key,
            attrs: attrs.clone(),
            expiration,
            ttl_id: id,
        })
    }

    /// Creates a new lease key if nobody holds it; `Ok(None)` when someone was faster.
    async fn create(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
    ) -> Result<Option<Lease>, StoreError> {
        let (id, exp) = self.grant().await?;
        let k = self.lease_key(key);
        let v = attrs.to_json();
        let kk = k.clone();
        let resp = self
            .call(&format!("failed to create lease {k}"), |mut c| async move {
                let txn = Txn::new()
                    .when([Compare::create_revision(kk.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(kk, v, Some(PutOptions::new().with_lease(id)))]);
                c.txn(txn).await
            })
            .await;
        match resp {
            Ok(r) if r.succeeded() => Ok(Some(Lease {
                key: *key,
                attrs: attrs.clone(),
                expiration: Some(exp),
                ttl_id: id,
            })),
            Ok(_) => {
                self.revoke(id).await;
                Ok(None)
            }
            Err(e) => {
                self.revoke(id).await;
                Err(e)
            }
        }
    }

    async fn delete(&self, key: &SubnetKey) -> Result<(), StoreError> {
        let k = self.lease_key(key);
        self.call(&format!("failed to delete lease {k}"), |mut c| async move {
            c.delete(k, None).await
        })
        .await
        .map(|_| ())
    }
}

fn backoff(current: Duration) -> Duration {
    (current * 2).min(Duration::from_secs(5))
}

#[async_trait]
impl SubnetStore for EtcdStore {
    fn name(&self) -> String {
        format!(
            "etcd {} (prefix {})",
            self.settings.endpoints.join(","),
            self.settings.prefix
        )
    }

    async fn network_config(&self) -> Result<NetworkConfig, StoreError> {
        let key = self.config_key();
        let resp = self
            .call("failed to read the network config", |mut c| async move {
                c.get(key, None).await
            })
            .await?;
        let kv = resp.kvs().first().ok_or(StoreError::ConfigNotFound)?;
        let text = String::from_utf8_lossy(kv.value());
        Ok(NetworkConfig::parse_and_check(&text)?)
    }

    async fn reacquire_lease(
        &self,
        config: &NetworkConfig,
        lost: &Lease,
    ) -> Result<Lease, StoreError> {
        if let Some(l) = self.create(&lost.key, &lost.attrs).await? {
            return Ok(l);
        }
        tracing::warn!("subnet {} was taken by another host meanwhile", lost.key);
        self.acquire_lease(config, &lost.attrs).await
    }

    async fn acquire_lease(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
    ) -> Result<Lease, StoreError> {
        let mut collided: BTreeSet<SubnetKey> = BTreeSet::new();
        for _ in 0..ACQUIRE_ATTEMPTS {
            let (leases, _) = self.list().await?;
            if let Some(own) = find_by_public_ip(&leases, attrs.public_ip) {
                if config.ipv4_subnet_compatible(own.key.ipv4)
                    && config.ipv6_subnet_compatible(own.key.ipv6)
                {
                    let reservation = own.ttl_id == 0;
                    tracing::info!(
                        "Found {} {} for current IP ({}), reusing",
                        if reservation { "reservation" } else { "lease" },
                        own.key,
                        attrs.public_ip
                    );
                    return self.update(&own.key, attrs, reservation).await;
                }
                tracing::info!(
                    "Found lease {} for current IP ({}) but not compatible with current config, deleting",
                    own.key,
                    attrs.public_ip
                );
                self.delete(&own.key).await?;
                continue;
            }
            let mut taken: BTreeSet<SubnetKey> = leases.iter().map(|l| l.key).collect();
            taken.extend(collided.iter().copied());
            let mut candidate = None;
            if let Some(prev) = self.previous_v4 {
                let prev_key = SubnetKey::new(prev, self.previous_v6);
                let used = taken.iter().any(|k| k.ipv4 == prev);
                if !used {
                    if config.ipv4_subnet_compatible(prev)
                        && config.ipv6_subnet_compatible(self.previous_v6)
                    {
                        tracing::info!("Found previously leased subnet ({prev_key}), reusing");
                        candidate = Some(prev_key);
                    } else {
                        tracing::error!(
                            "Found previously leased subnet ({prev_key}) that is not compatible with the Etcd network config, ignoring"
                        );
                    }
                }
            }
            let key = match candidate {
                Some(k) => k,
                None => {
                    tracing::info!(
                        "Picking subnet in range {} ... {}",
                        config.subnet_min.unwrap_or(Ipv4Addr::UNSPECIFIED),
                        config.subnet_max.unwrap_or(Ipv4Addr::UNSPECIFIED)
                    );
                    pick_free_subnet(config, &taken, &mut rand::rng())?
                }
            };
            match self.create(&key, attrs).await? {
                Some(lease) => {
                    tracing::info!(
                        "Allocated lease ({}) to current node ({})",
                        key,
                        attrs.public_ip
                    );
                    return Ok(lease);
                }
                None => {
                    tracing::info!(
                        "subnet {key} was taken by another host meanwhile, trying another one"
                    );
                    collided.insert(key);
                }
            }
        }
        Err(StoreError::MaxRetries)
    }

    async fn lease_by_public_ip(&self, public_ip: Ipv4Addr) -> Result<Option<Lease>, StoreError> {
        let (leases, _) = self.list().await?;
        Ok(find_by_public_ip(&leases, public_ip).cloned())
    }

    async fn inspect(&self) -> Result<StoreInspection, StoreError> {
        let prefix = self.subnets_prefix();
        let resp = self
            .call("failed to list subnet leases", |mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        let mut out = StoreInspection::default();
        for kv in resp.kvs() {
            match self.decode_entry(kv) {
                Ok(l) => out.leases.push(l),
                Err(bad) => out.rejected.push(bad),
            }
        }
        Ok(out)
    }

    async fn renew_lease(&self, lease: &Lease) -> Result<Lease, StoreError> {
        if lease.ttl_id == 0 {
            return Ok(lease.clone()); // reservations never expire
        }
        let renewed = self.update(&lease.key, &lease.attrs, false).await?;
        // The key now hangs on the new lease; drop the old one so leases do not pile up.
        self.revoke(lease.ttl_id).await;
        Ok(renewed)
    }

    async fn watch_leases(&self, tx: mpsc::Sender<StoreUpdate>) -> Result<(), StoreError> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.watch_leases_once(&tx).await {
                Ok(WatchEnd::ReceiverGone) => return Ok(()),
                Ok(WatchEnd::Resync) => {
                    tracing::info!("lease watch needs a resync (compaction or cancel), re-listing");
                    delay = Duration::from_millis(100);
                }
                Err(e) => {
                    crate::metrics::metrics().store_error();
                    tracing::warn!("lease watch failed, retrying in {delay:?}: {e}");
                    self.reset_client().await;
                    tokio::time::sleep(delay).await;
                    delay = backoff(delay);
                }
            }
            if tx.is_closed() {
                return Ok(());
            }
        }
    }

    async fn watch_own_lease(
        &self,
        lease: &Lease,
        tx: mpsc::Sender<OwnLeaseEvent>,
    ) -> Result<(), StoreError> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.watch_own_once(lease, &tx).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    crate::metrics::metrics().store_error();
                    tracing::warn!("own lease watch failed, retrying in {delay:?}: {e}");
                    self.reset_client().await;
                    tokio::time::sleep(delay).await;
                    delay = backoff(delay);
                }
            }
        }
    }
}

enum WatchEnd {
    ReceiverGone,
    Resync,
}

impl EtcdStore {
    async fn watch_leases_once(
        &self,
        tx: &mpsc::Sender<StoreUpdate>,
    ) -> Result<WatchEnd, StoreError> {
        let (leases, rev) = self.list().await?;
        if tx.send(StoreUpdate::Snapshot(leases)).await.is_err() {
            return Ok(WatchEnd::ReceiverGone);
        }
        let mut client = self.client().await?;
        let opts = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(rev + 1);
        let mut stream = client
            .watch(self.subnets_prefix(), Some(opts))
            .await
            .map_err(unavailable("failed to watch subnet leases"))?;
        loop {
            let resp = tokio::select! {
                r = stream.message() => r.map_err(unavailable("subnet lease watch broke"))?,
                _ = tx.closed() => return Ok(WatchEnd::ReceiverGone),
            };
            let Some(resp) = resp else {
                return Err(StoreError::Unavailable {
                    context: "subnet lease watch ended".into(),
                    source: "stream closed by etcd".into(),
                });
            };
            if resp.compact_revision() > 0 || resp.canceled() {
                return Ok(WatchEnd::Resync);
            }
            let events: Vec<LeaseEvent> = resp
                .events()
                .iter()
                .filter_map(|ev| match ev.event_type() {
                    EventType::Put => ev
                        .kv()
                        .and_then(|kv| self.decode(kv))
                        .map(LeaseEvent::Added),
                    EventType::Delete => {
                        let kv = ev.kv()?;
                        let key = String::from_utf8_lossy(kv.key());
                        let name = key.strip_prefix(&self.subnets_prefix()).unwrap_or(&key);
                        let subnet: SubnetKey = name.parse().ok()?;
                        let attrs = ev
                            .prev_kv()
                            .and_then(|p| {
                                LeaseAttrs::from_json(&String::from_utf8_lossy(p.value())).ok()
                            })
                            .unwrap_or_else(|| LeaseAttrs::public_only(Ipv4Addr::UNSPECIFIED));
                        Some(LeaseEvent::Removed(Lease {
                            key: subnet,
                            attrs,
                            expiration: None,
                            ttl_id: 0,
                        }))
                    }
                })
                .collect();
            if !events.is_empty() && tx.send(StoreUpdate::Events(events)).await.is_err() {
                return Ok(WatchEnd::ReceiverGone);
            }
        }
    }

    async fn watch_own_once(
        &self,
        lease: &Lease,
        tx: &mpsc::Sender<OwnLeaseEvent>,
    ) -> Result<(), StoreError> {
        let key = self.lease_key(&lease.key);
        let k = key.clone();
        let resp = self
            .call("failed to read own lease", |mut c| async move {
                c.get(k, None).await
            })
            .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.kvs().is_empty() {
            let _ = tx.send(OwnLeaseEvent::Revoked).await;
            return Ok(());
        }
        let mut client = self.client().await?;
        let mut stream = client
            .watch(
                key.clone(),
                Some(WatchOptions::new().with_start_revision(rev + 1)),
            )
            .await
            .map_err(unavailable("failed to watch own lease"))?;
        loop {
            let resp = tokio::select! {
                r = stream.message() => r.map_err(unavailable("own lease watch broke"))?,
                _ = tx.closed() => return Ok(()),
            };
            let Some(resp) = resp else {
                return Err(StoreError::Unavailable {
                    context: "own lease watch ended".into(),
                    source: "stream closed by etcd".into(),
                });
            };
            if resp.compact_revision() > 0 || resp.canceled() {
                return Err(StoreError::Unavailable {
                    context: "own lease watch was cancelled".into(),
                    source: "compaction".into(),
                });
            }
            for ev in resp.events() {
                let msg = match ev.event_type() {
                    EventType::Delete => OwnLeaseEvent::Revoked,
                    EventType::Put => match ev.kv().and_then(|kv| self.decode(kv)) {
                        Some(l) => OwnLeaseEvent::Updated(l),
                        None => continue,
                    },
                };
                let revoked = msg == OwnLeaseEvent::Revoked;
                if tx.send(msg).await.is_err() || revoked {
                    return Ok(());
                }
            }
        }
    }
}

fn find_by_public_ip(leases: &[Lease], ip: Ipv4Addr) -> Option<&Lease> {
    leases.iter().find(|l| l.attrs.public_ip == ip)
}

//! `ipsec`: pod traffic between hosts in ESP tunnels keyed by strongSwan's `charon` (IKEv2,
//! pre-shared key), wire- and host-compatible with Go flannel's ipsec backend.
//!
//! flanneld starts `charon` (searched where the reference looks, see [`charon::SEARCH_PATHS`])
//! or uses one that already answers on `/var/run/charon.vici`, and talks VICI to it
//! ([`vici`]). Per remote lease: the kernel gets three XFRM policies with reqid 11 (out
//! `<own subnet> -> <remote subnet>`, in and fwd the other way; template ESP tunnel between the
//! two PublicIPs), charon gets the PSK for the remote PublicIP and a connection
//! `<ownPublicIP>-<ownSubnet>-<remoteSubnet>-<remotePublicIP>` with child
//! `<ownSubnet>-<remoteSubnet>` (IKEv2, `aes256-sha256-modp4096`, ESPProposal, reqid 11,
//! `policies = no`: the SAs match our policies by reqid), which it starts at once. No device,
//! no routes. Lease: `{"PublicIP":..,"PublicIPv6":null,"BackendType":"ipsec"}`; FLANNEL_MTU =
//! E − 77 (− 8 with UDPEncap).
//!
//! Better than the reference: stale reqid-11 policies inside the network (an earlier run, peers
//! that left while we were down) and our stale charon connections are removed after every
//! snapshot; charon dying (or being restarted by someone) is noticed within seconds and it is
//! started again with the PSKs and connections reloaded; policies deleted behind our back are
//! put back; a departed peer's PSK is unloaded too.

pub mod charon;
pub mod vici;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use flannel_types::backend_options::IpsecOptions;
use flannel_types::{LeaseAttrs, SubnetKey};
use ipnet::Ipv4Net;
use serde_json::Value;

use super::{Backend, BackendContext, BackendError, Network};
use crate::lease::Lease;
use crate::netlink::xfrm::{EspTunnelPolicy, PolicyDir, Xfrm};
use charon::Charon;
use vici::Section;

/// The backend type written into leases.
const BACKEND_TYPE: &str = "ipsec";

/// Request id tying charon's SAs to our policies (the reference's `defaultReqID`).
pub const REQID: u32 = 11;

/// Tunnel IP header, ESP header, IV, padding, trailer and ICV (the reference's figure).
const OVERHEAD: u32 = 77;

/// The UDP header when ESP is encapsulated in UDP (port 4500).
const UDP_ENCAP_OVERHEAD: u32 = 8;

/// The reference's fixed IKE proposal.
pub const IKE_PROPOSAL: &str = "aes256-sha256-modp4096";

/// The ipsec backend.
pub struct IpsecBackend {
    backend: Value,
}

impl IpsecBackend {
    /// Registry constructor (the options are read when the network is registered, as the
    /// reference does, so its errors read `Error registering network: ...`).
    pub fn create(ctx: &BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(IpsecBackend {
            backend: ctx.config.backend.clone(),
        }))
    }
}

/// Reads the options with the reference's error texts.
fn options(backend: &Value) -> Result<IpsecOptions, BackendError> {
    IpsecOptions::from_backend(backend).map_err(|e| {
        let text = e.to_string();
        if text.contains("password is too short") {
            BackendError::Other(text)
        } else {
            BackendError::Other(format!("error decoding IPSEC backend config: {text}"))
        }
    })
}

/// `<ownPublicIP>-<ownSubnet>-<remoteSubnet>-<remotePublicIP>`, the reference's name.
pub fn connection_name(own: &Lease, remote: &Lease) -> String {
    format!(
        "{}-{}-{}-{}",
        own.attrs.public_ip, own.key.ipv4, remote.key.ipv4, remote.attrs.public_ip
    )
}

/// `<ownSubnet>-<remoteSubnet>`, the reference's child SA name.
pub fn child_name(own: &Lease, remote: &Lease) -> String {
    format!("{}-{}", own.key.ipv4, remote.key.ipv4)
}

/// The id under which the PSK for `owner` is loaded (so it can be replaced and unloaded).
fn psk_id(owner: Ipv4Addr) -> String {
    format!("flannel-{owner}")
}

/// The VICI `load-conn` body of a peer's connection, with the values Go flannel sends.
pub fn connection_config(own: &Lease, remote: &Lease, esp_proposal: &str, encap: bool) -> Section {
    let child = Section::new()
        .list("local_ts", [own.key.ipv4.to_string()])
        .list("remote_ts", [remote.key.ipv4.to_string()])
        .list("esp_proposals", [esp_proposal])
        .kv("start_action", "start")
        .kv("close_action", "trap")
        .kv("dpd_action", "restart")
        .kv("mode", "tunnel")
        .kv("reqid", REQID.to_string())
        .kv("rekey_time", "1h")
        .kv("policies", "no");
    // Go sends `rekey_time = ""` for the IKE SA (charon reads it as 0: never rekeyed) and
    // empty ids (charon: %any, i.e. the addresses); sent the same here.
    Section::new()
        .list("local_addrs", [own.attrs.public_ip.to_string()])
        .list("remote_addrs", [remote.attrs.public_ip.to_string()])
        .list("proposals", [IKE_PROPOSAL])
        .kv("version", "2")
        .kv("encap", encap.to_string())
        .kv("keyingtries", "0")
        .kv("rekey_time", "")
        .section("local", Section::new().kv("id", "").kv("auth", "psk"))
        .section("remote", Section::new().kv("id", "").kv("auth", "psk"))
        .section(
            "children",
            Section::new().section(&child_name(own, remote), child),
        )
}

/// The three policies of a peer: out own -> remote; in and fwd remote -> own.
pub fn policies(own: &Lease, remote: &Lease) -> [EspTunnelPolicy; 3] {
    let (me, peer) = (own.attrs.public_ip, remote.attrs.public_ip);
    let (mine, theirs) = (own.key.ipv4, remote.key.ipv4);
    let incoming = |dir| EspTunnelPolicy {
        src: theirs,
        dst: mine,
        dir,
        tmpl_src: peer,
        tmpl_dst: me,
        reqid: REQID,
    };
    [
        EspTunnelPolicy {
            src: mine,
            dst: theirs,
            dir: PolicyDir::Out,
            tmpl_src: me,
            tmpl_dst: peer,
            reqid: REQID,
        },
        incoming(PolicyDir::In),
        incoming(PolicyDir::Fwd),
    ]
}

fn err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Other(e.to_string())
}

#[async_trait]
impl Backend for IpsecBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        let opts = options(&self.backend)?;
        tracing::info!(
            "IPSec config: UDPEncap={} ESPProposal={}",
            opts.udp_encap,
            opts.esp_proposal
        );
        let overhead = OVERHEAD
            + if opts.udp_encap {
                UDP_ENCAP_OVERHEAD
            } else {
                0
            };
        if ctx.ext.mtu <= overhead {
            return Err(BackendError::Other(format!(
                "MTU {} of iface {} is too small for ipsec",
                ctx.ext.mtu, ctx.ext.name
            )));
        }
        let public_ip = ctx.ext.ext_addr.ok_or_else(|| {
            BackendError::Other(format!(
                "interface {} has no IPv4 address, which the ipsec backend needs",
                ctx.ext.name
            ))
        })?;
        let xfrm = Xfrm::open().map_err(err)?;
        let charon = Charon::start(Path::new(vici::DEFAULT_SOCKET))
            .await
            .map_err(|e| {
                BackendError::Other(format!("error creating CharonIKEDaemon struct: {e}"))
            })?;
        let attrs = LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: BACKEND_TYPE.into(),
            backend_data: None,
            backend_v6_data: None,
        };
        let lease = ctx.store.acquire_lease(&ctx.config, &attrs).await?;
        let net = IpsecNetwork {
            lease,
            network: ctx.config.network,
            opts,
            mtu: ctx.ext.mtu - overhead,
            charon,
            xfrm,
            peers: BTreeMap::new(),
        };
        net.load_psk(public_ip)
            .await
            .map_err(|e| BackendError::Other(format!("Failed to load PSK: {e}")))?;
        Ok(Box::new(net))
    }
}

struct IpsecNetwork {
    lease: Lease,
    network: Option<Ipv4Net>,
    opts: IpsecOptions,
    mtu: u32,
    charon: Charon,
    xfrm: Xfrm,
    /// Remote leases whose policies and connection are in place.
    peers: BTreeMap<SubnetKey, Lease>,
}

impl IpsecNetwork {
    async fn load_psk(&self, owner: Ipv4Addr) -> Result<(), vici::ViciError> {
        let mut c = self.charon.client().await?;
        c.load_shared(&psk_id(owner), &self.opts.psk, &[owner.to_string()])
            .await?;
        tracing::info!("Loaded shared key for: {owner}");
        Ok(())
    }

    async fn load_connection(&self, remote: &Lease) -> Result<(), vici::ViciError> {
        let name = connection_name(&self.lease, remote);
        let conf = connection_config(
            &self.lease,
            remote,
            &self.opts.esp_proposal,
            self.opts.udp_encap,
        );
        self.charon.client().await?.load_conn(&name, conf).await?;
        tracing::info!("Loaded connection: {name}");
        Ok(())
    }

    async fn add_policies(&self, remote: &Lease) {
        for p in policies(&self.lease, remote) {
            match self.xfrm.update_policy(&p).await {
                Ok(()) => tracing::info!("ipsec policy installed: {p}"),
                Err(e) => tracing::error!("error adding ipsec {} policy: {e}", p.dir),
            }
        }
    }

    async fn add(&mut self, remote: &Lease) {
        if remote.attrs.backend_type != BACKEND_TYPE {
            tracing::warn!(
                "Ignoring non-ipsec event: type: {:?} ({})",
                remote.attrs.backend_type,
                remote.key
            );
            return;
        }
        if remote.key.ipv4 == self.lease.key.ipv4 {
            tracing::warn!("Ignoring own lease add event: {}", remote.key);
            return;
        }
        if let Some(old) = self.peers.get(&remote.key).cloned() {
            if old.attrs.public_ip != remote.attrs.public_ip {
                self.remove(&old).await;
            }
        }
        self.add_policies(remote).await;
        if let Err(e) = self.load_psk(remote.attrs.public_ip).await {
            tracing::error!("error loading shared key into IKE daemon: {e}");
        }
        if let Err(e) = self.load_connection(remote).await {
            tracing::error!("error loading connection into IKE daemon: {e}");
        }
        self.peers.insert(remote.key, remote.clone());
    }

    async fn remove(&mut self, remote: &Lease) {
        if remote.attrs.backend_type != BACKEND_TYPE || remote.key.ipv4 == self.lease.key.ipv4 {
            return;
        }
        let remote = self
            .peers
            .remove(&remote.key)
            .unwrap_or_else(|| remote.clone());
        let name = connection_name(&self.lease, &remote);
        match self.unload_conn(&name).await {
            Ok(()) => tracing::info!("Unloaded connection: {name}"),
            Err(e) => tracing::error!("error unloading charon connections: {e}"),
        }
        for p in policies(&self.lease, &remote) {
            match self.xfrm.delete_policy(&p).await {
                Ok(()) => tracing::info!("ipsec policy removed: {p}"),
                Err(e) => tracing::error!("error deleting ipsec {} policy: {e}", p.dir),
            }
        }
        let ip = remote.attrs.public_ip;
        let still_used = ip == self.lease.attrs.public_ip
            || self.peers.values().any(|l| l.attrs.public_ip == ip);
        if !still_used {
            if let Err(e) = self.unload_psk(ip).await {
                tracing::warn!("error unloading the shared key of {ip}: {e}");
            }
        }
    }

    async fn unload_conn(&self, name: &str) -> Result<(), vici::ViciError> {
        self.charon.client().await?.unload_conn(name).await
    }

    async fn unload_psk(&self, owner: Ipv4Addr) -> Result<(), vici::ViciError> {
        self.charon
            .client()
            .await?
            .unload_shared(&psk_id(owner))
            .await
    }

    /// Loads our PSK and every peer's PSK and connection again (a new charon).
    async fn reload_charon(&self) {
        if let Err(e) = self.load_psk(self.lease.attrs.public_ip).await {
            tracing::error!("Failed to load PSK: {e}");
        }
        for remote in self.peers.values() {
            if let Err(e) = self.load_psk(remote.attrs.public_ip).await {
                tracing::error!("error loading shared key into IKE daemon: {e}");
            }
            if let Err(e) = self.load_connection(remote).await {
                tracing::error!("error loading connection into IKE daemon: {e}");
            }
        }
        tracing::info!(
            "charon reloaded: shared keys and {} connection(s)",
            self.peers.len()
        );
    }

    /// The policies every current peer needs.
    fn wanted_policies(&self) -> BTreeSet<EspTunnelPolicy> {
        self.peers
            .values()
            .flat_map(|r| policies(&self.lease, r))
            .collect()
    }

    /// Whether a kernel policy is flannel's (reqid 11, both subnets inside the network).
    fn is_flannel_policy(&self, p: &EspTunnelPolicy) -> bool {
        p.reqid == REQID
            && self
                .network
                .is_some_and(|n| n.contains(&p.src) && n.contains(&p.dst))
    }
}

#[async_trait]
impl Network for IpsecNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn lease_added(&mut self, lease: &Lease) {
        tracing::info!("Subnet added: {}", lease.key);
        self.add(lease).await
    }

    async fn lease_removed(&mut self, lease: &Lease) {
        tracing::info!("Subnet removed: {}", lease.key);
        self.remove(lease).await
    }

    /// Forgets peers that are gone, then removes flannel's reqid-11 policies and our charon
    /// connections that no current peer needs (an earlier run's, peers gone while we were down).
    async fn resync(&mut self, current: &[Lease]) {
        let keys: BTreeSet<SubnetKey> = current.iter().map(|l| l.key).collect();
        let gone: Vec<Lease> = self
            .peers
            .values()
            .filter(|l| !keys.contains(&l.key))
            .cloned()
            .collect();
        for l in gone {
            self.remove(&l).await;
        }
        let wanted = self.wanted_policies();
        match self.xfrm.esp_tunnel_policies().await {
            Ok(have) => {
                for p in have {
                    if self.is_flannel_policy(&p) && !wanted.contains(&p) {
                        match self.xfrm.delete_policy(&p).await {
                            Ok(()) => tracing::info!("removed stale ipsec policy: {p}"),
                            Err(e) => tracing::error!("{e}"),
                        }
                    }
                }
            }
            Err(e) => tracing::error!("{e}"),
        }
        let names: BTreeSet<String> = self
            .peers
            .values()
            .map(|r| connection_name(&self.lease, r))
            .collect();
        let ours = format!("{}-", self.lease.attrs.public_ip);
        let loaded = match self.charon.client().await {
            Ok(mut c) => c.get_conns().await,
            Err(e) => Err(e),
        };
        match loaded {
            Ok(loaded) => {
                for n in loaded {
                    if n.starts_with(&ours) && !names.contains(&n) {
                        match self.unload_conn(&n).await {
                            Ok(()) => tracing::info!("unloaded stale connection: {n}"),
                            Err(e) => tracing::error!("{e}"),
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("could not list charon's connections: {e}"),
        }
    }

    fn check_interval(&self) -> Duration {
        Duration::from_secs(2)
    }

    /// Restarts a dead charon (reloading everything into it) and puts back policies that were
    /// deleted behind our back.
    async fn check(&mut self, _current: &[Lease]) {
        match self.charon.ensure_running().await {
            Ok(true) => self.reload_charon().await,
            Ok(false) => {}
            Err(e) => tracing::error!("charon: {e}"),
        }
        let wanted = self.wanted_policies();
        if wanted.is_empty() {
            return;
        }
        match self.xfrm.esp_tunnel_policies().await {
            Ok(have) => {
                let have: BTreeSet<EspTunnelPolicy> = have.into_iter().collect();
                for p in wanted.difference(&have) {
                    match self.xfrm.update_policy(p).await {
                        Ok(()) => tracing::info!("ipsec policy recovered: {p}"),
                        Err(e) => tracing::error!("{e}"),
                    }
                }
            }
            Err(e) => tracing::error!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(subnet: &str, ip: &str) -> Lease {
        Lease {
            key: SubnetKey {
                ipv4: subnet.parse().unwrap(),
                ipv6: None,
            },
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                public_ipv6: None,
                backend_type: BACKEND_TYPE.into(),
                backend_data: None,
                backend_v6_data: None,
            },
            expiration: None,
            ttl_id: 0,
        }
    }

    #[test]
    fn names_and_policies_as_the_reference() {
        let own = lease("10.5.1.0/24", "192.168.100.11");
        let remote = lease("10.5.2.0/24", "192.168.100.12");
        assert_eq!(
            connection_name(&own, &remote),
            "192.168.100.11-10.5.1.0/24-10.5.2.0/24-192.168.100.12"
        );
        assert_eq!(child_name(&own, &remote), "10.5.1.0/24-10.5.2.0/24");
        let [out, inp, fwd] = policies(&own, &remote);
        assert_eq!(
            out.to_string(),
            "src 10.5.1.0/24 dst 10.5.2.0/24 dir out tmpl src 192.168.100.11 dst 192.168.100.12 proto esp reqid 11 mode tunnel"
        );
        assert_eq!(
            inp.to_string(),
            "src 10.5.2.0/24 dst 10.5.1.0/24 dir in tmpl src 192.168.100.12 dst 192.168.100.11 proto esp reqid 11 mode tunnel"
        );
        assert_eq!(fwd.dir, PolicyDir::Fwd);
        assert_eq!((fwd.src, fwd.tmpl_src), (inp.src, inp.tmpl_src));
    }

    #[test]
    fn connection_carries_the_reference_proposals() {
        let own = lease("10.5.1.0/24", "192.168.100.11");
        let remote = lease("10.5.2.0/24", "192.168.100.12");
        let c = connection_config(&own, &remote, "aes128gcm16-sha256-prfsha256-ecp256", true);
        assert_eq!(c.get_list("proposals").unwrap(), ["aes256-sha256-modp4096"]);
        assert_eq!(c.get_str("version"), Some("2"));
        assert_eq!(c.get_str("encap"), Some("true"));
        assert_eq!(c.get_str("keyingtries"), Some("0"));
        assert_eq!(c.get_list("remote_addrs").unwrap(), ["192.168.100.12"]);
        assert_eq!(c.get_section("local").unwrap().get_str("auth"), Some("psk"));
        let child = c
            .get_section("children")
            .and_then(|ch| ch.get_section("10.5.1.0/24-10.5.2.0/24"))
            .unwrap();
        assert_eq!(child.get_str("reqid"), Some("11"));
        assert_eq!(child.get_str("policies"), Some("no"));
        assert_eq!(child.get_str("start_action"), Some("start"));
        assert_eq!(child.get_str("close_action"), Some("trap"));
        assert_eq!(child.get_str("mode"), Some("tunnel"));
        assert_eq!(child.get_str("rekey_time"), Some("1h"));
        assert_eq!(
            child.get_list("esp_proposals").unwrap(),
            ["aes128gcm16-sha256-prfsha256-ecp256"]
        );
        assert_eq!(child.get_list("local_ts").unwrap(), ["10.5.1.0/24"]);
    }

    #[test]
    fn short_psk_is_the_reference_error() {
        let e = options(&serde_json::json!({"Type": "ipsec", "PSK": "short"})).unwrap_err();
        assert_eq!(e.to_string(), "config error, password is too short");
        let psk = "x".repeat(96);
        let o = options(&serde_json::json!({"Type": "ipsec", "PSK": psk})).unwrap();
        assert_eq!(o.esp_proposal, "aes128gcm16-sha256-prfsha256-ecp256");
        assert!(!o.udp_encap);
    }
}

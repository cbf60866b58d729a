//! `udp`: TUN device `flannel0` and user-space encapsulation, wire-compatible with Go flannel
//! (the UDP payload is the raw IPv4 packet, sent to `<peer PublicIP>:<Port>`).
//!
//! Unlike Go's single-threaded one-packet-per-syscall loop, the data path batches system calls,
//! uses TUN and UDP segmentation offloads and one worker per TUN queue (see `datapath`). The
//! device is persistent, so a restart (even after SIGKILL) only pauses forwarding.

pub mod codec;
pub mod kernel;
pub mod packet;
pub mod routes;

pub use super::engine::steer;

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use flannel_types::backend_options::UdpOptions;
use flannel_types::LeaseAttrs;
use ipnet::IpNet;

use super::engine::{self as datapath, Mode};
use super::{Backend, BackendContext, BackendError, Network};
use crate::lease::{Lease, LeaseEvent};
use crate::netlink::{Netlink, RouteSpec};
use codec::UdpCodec;
use routes::RouteTable;

/// The TUN device name (Go's `flannel%d` template yields `flannel0`).
pub const DEVICE: &str = "flannel0";
/// IPv4 + UDP header bytes added on the wire.
const OVERHEAD: u32 = 28;

/// Removes a `flannel0` left by an earlier udp run (it persists across restarts) when the
/// network now uses another backend: its route for the whole network would swallow traffic.
pub async fn remove_leftover_device(nl: &Netlink) {
    crate::backend::engine::preattach::release(DEVICE);
    kernel::remove_device(nl).await;
    match nl.link_details(DEVICE).await {
        Ok(Some(d)) if d.kind.as_deref() == Some("tun") => {
            tracing::info!("udp: removing {DEVICE} left by an earlier udp run");
            if let Err(e) = nl.delete_link(d.index, DEVICE).await {
                tracing::warn!("{e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("{e}"),
    }
}

/// The udp backend.
pub struct UdpBackend {
    port: u16,
}

impl UdpBackend {
    /// Registry constructor.
    pub fn create(ctx: &BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        let opts = UdpOptions::from_backend(&ctx.config.backend)?;
        let port = u16::try_from(opts.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| BackendError::Other(format!("invalid udp Port {}", opts.port)))?;
        Ok(Box::new(UdpBackend { port }))
    }
}

fn err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Other(e.to_string())
}

struct UdpNetwork {
    lease: Lease,
    mtu: u32,
    port: u16,
    shared: Arc<UdpCodec>,
    /// The in-kernel (BPF) data path, when in use; the TUN engine then carries only what it
    /// passes on (and everything when this is `None`).
    kernel: Option<kernel::KernelPath>,
}

/// Which data path `FLANNEL_UDP_DATAPATH` asks for: unset or `auto` (the BPF path where the
/// kernel allows it, else the TUN engine), `kernel` (the BPF path, required), or a TUN engine
/// mode (`offload`, `batch`, `simple`).
fn kernel_path_wanted() -> (bool, bool) {
    match std::env::var("FLANNEL_UDP_DATAPATH").as_deref() {
        Err(_) | Ok("") | Ok("auto") => (true, false),
        Ok("kernel") => (true, true),
        Ok(_) => (false, false),
    }
}

#[async_trait]
impl Backend for UdpBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        let public_ip = ctx.ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let bind_ip = ctx.ext.iface_addr.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let mtu = ctx.ext.mtu.saturating_sub(OVERHEAD);
        // Go's udp lease carries only the public IP (no BackendType).
        let lease = ctx
            .store
            .acquire_lease(&ctx.config, &LeaseAttrs::public_only(public_ip))
            .await?;
        let tun_ip = lease.key.ipv4.network();

        let mode = Mode::from_env();
        let queues = mode.queues();
        let (devs, mode) = match datapath::open_tun(DEVICE, mode, queues) {
            Ok(d) => d,
            Err(e) => {
                // A persistent flannel0 from a run with other queue/offload settings cannot be
                // attached to; replace it.
                tracing::warn!("udp: cannot attach to {DEVICE} ({e}); recreating it");
                let nl = Netlink::open().map_err(err)?;
                if let Some(d) = nl.link_details(DEVICE).await.map_err(err)? {
                    nl.delete_link(d.index, DEVICE).await.map_err(err)?;
                }
                datapath::open_tun(DEVICE, mode, queues)
                    .map_err(|e| err(format!("failed to open TUN device {DEVICE}: {e}")))?
            }
        };

        let nl = Netlink::open().map_err(err)?;
        let dev = nl
            .link_details(DEVICE)
            .await
            .map_err(err)?
            .ok_or_else(|| err(format!("{DEVICE} missing after creation")))?;
        if dev.mtu != mtu {
            nl.set_mtu(dev.index, mtu, DEVICE).await.map_err(err)?;
        }
        let addrs = nl.addresses().await.map_err(err)?;
        for a in addrs.iter().filter(|a| a.index == dev.index) {
            let stale = a.ip != IpAddr::V4(tun_ip)
                && matches!((a.ip, ctx.config.network), (IpAddr::V4(ip), Some(n)) if n.contains(&ip));
            if stale {
                nl.del_address(a, DEVICE).await.map_err(err)?;
            }
        }
        nl.add_address(dev.index, IpAddr::V4(tun_ip), 32, DEVICE)
            .await
            .map_err(err)?;
        nl.set_up(dev.index, DEVICE).await.map_err(err)?;
        // Our ICMP "net unreachable" replies come out of flannel0 with flannel0's own address
        // as source; without accept_local the kernel drops them as martians (Go's do get lost).
        let sysctl = format!("/proc/sys/net/ipv4/conf/{DEVICE}/accept_local");
        if let Err(e) = std::fs::write(&sysctl, "1") {
            tracing::warn!(
                "udp: cannot set {sysctl}: {e}; ICMP unreachable replies may be dropped"
            );
        }
        if let Some(network) = ctx.config.network {
            nl.replace_route(&RouteSpec {
                dst: IpNet::V4(network),
                gateway: None,
                oif: Some(dev.index),
                onlink: false,
                blackhole: false,
            })
            .await
            .map_err(err)?;
        }

        let shared = Arc::new(UdpCodec {
            routes: RwLock::new(RouteTable::default()),
            tun_ip,
        });
        let (running, _) = datapath::start(
            devs,
            mode,
            SocketAddrV4::new(bind_ip, self.port),
            mtu as usize,
            shared.clone(),
        )
        .map_err(|e| {
            err(format!(
                "failed to start the udp data path on {bind_ip}:{}: {e}",
                self.port
            ))
        })?;
        tracing::info!(
            "udp: {DEVICE} mtu {mtu}, {:?} data path, {} queue(s), UDP GSO {}, GRO {}, CPU steering {}",
            running.mode,
            running.queues,
            running.gso,
            running.gro,
            running.cpu_steering
        );
        let (want_kernel, required) = kernel_path_wanted();
        let kernel = match (want_kernel, ctx.ext.iface_addr) {
            (false, _) => {
                // An earlier run's kernel path would keep handling our traffic.
                kernel::remove_device(&nl).await;
                None
            }
            (true, None) => {
                let e = format!("{} has no IPv4 address", ctx.ext.name);
                if required {
                    return Err(err(format!("udp: no kernel data path: {e}")));
                }
                tracing::info!("udp: no kernel data path ({e}); the TUN engine carries all");
                None
            }
            (true, Some(src)) => {
                match kernel::KernelPath::start(
                    nl.clone(),
                    ctx.ext.index,
                    ctx.ext.mtu,
                    tun_ip,
                    src,
                    self.port,
                )
                .await
                {
                    Ok(k) => {
                        tracing::info!(
                        "udp: kernel data path: BPF encapsulation on each peer's route, decapsulation on {} ingress (the TUN engine handles the rest)",
                        ctx.ext.name
                    );
                        Some(k)
                    }
                    Err(e) if required => {
                        return Err(err(format!("udp: no kernel data path: {e}")))
                    }
                    Err(e) => {
                        tracing::info!(
                            "udp: no kernel data path ({e}); the TUN engine carries all"
                        );
                        // Whatever part of it was set up before the failure.
                        kernel::remove_device(&nl).await;
                        None
                    }
                }
            }
        };
        Ok(Box::new(UdpNetwork {
            lease,
            mtu,
            port: self.port,
            shared,
            kernel,
        }))
    }
}

#[async_trait]
impl Network for UdpNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn handle_events(&mut self, batch: Vec<LeaseEvent>) {
        {
            let mut routes = self
                .shared
                .routes
                .write()
                .unwrap_or_else(|p| p.into_inner());
            for e in &batch {
                match e {
                    LeaseEvent::Added(l) => {
                        let peer = SocketAddrV4::new(l.attrs.public_ip, self.port);
                        routes.insert(l.key.ipv4, peer);
                        tracing::info!("udp: {} via {peer}", l.key.ipv4);
                    }
                    LeaseEvent::Removed(l) => {
                        routes.remove(l.key.ipv4);
                        tracing::info!("udp: removed route {}", l.key.ipv4);
                    }
                }
            }
        }
        let Some(k) = self.kernel.as_mut() else {
            return;
        };
        for e in batch {
            let r = match &e {
                LeaseEvent::Added(l) => k.add(l.key.ipv4, l.attrs.public_ip).await,
                LeaseEvent::Removed(l) => k.remove(l.key.ipv4).await,
            };
            if let Err(e) = r {
                tracing::warn!("udp: kernel route: {e}");
            }
        }
    }

    async fn resync(&mut self, current: &[Lease]) {
        let mut fresh = RouteTable::default();
        for l in current {
            fresh.insert(l.key.ipv4, SocketAddrV4::new(l.attrs.public_ip, self.port));
        }
        *self
            .shared
            .routes
            .write()
            .unwrap_or_else(|p| p.into_inner()) = fresh;
        if let Some(k) = self.kernel.as_mut() {
            let want: Vec<_> = current
                .iter()
                .filter(|l| l.key != self.lease.key)
                .map(|l| (l.key.ipv4, l.attrs.public_ip))
                .collect();
            k.resync(&want).await;
        }
    }
}

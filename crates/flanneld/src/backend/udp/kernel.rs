//! The udp backend's kernel data path: the same wire format as the TUN engine (UDP datagrams
//! on port `Port` whose payload is the pod's IPv4 packet, as Go flannel sends them), but
//! encapsulated and decapsulated inside the kernel by two small BPF programs, so packets never
//! cross into user space:
//! - transmit: each remote subnet's route carries a lightweight-tunnel BPF program
//!   (`encap bpf xmit`) that pushes the outer IPv4 + UDP header for that host and lets the
//!   kernel route the result (TCP super-packets stay whole: the kernel segments them as UDP
//!   tunnel packets at the last moment, or the NIC does);
//! - receive: a TCX ingress program on the underlay interface strips the outer headers of
//!   datagrams to our address and port, and the inner packet continues as if it had arrived
//!   bare (to the bridge and the pod). Anything it does not recognise (fragments, IP options,
//!   non-IPv4 payloads) goes on to the TUN engine's socket as before.

use std::net::Ipv4Addr;

use crate::bpf::{helper, Asm, Cond, Insn, Size, FP};

/// The name of the transmit programs; routes name them `flannel_udp_tx/<peer>` (shown by
/// `ip route`; how flannel finds its routes).
pub const TX_NAME: &str = "flannel_udp_tx";

/// Whether a route hands packets to one of our transmit programs.
fn is_ours(r: &crate::netlink::Route) -> bool {
    r.bpf_program
        .as_deref()
        .is_some_and(|n| n.split('/').next() == Some(TX_NAME))
}
/// The name of the receive program (shown by `bpftool net`).
pub const RX_NAME: &str = "flannel_udp_rx";
/// `BPF_LWT_ENCAP_IP`.
const LWT_ENCAP_IP: i32 = 2;
/// `BPF_LWT_REROUTE`: route the packet again by its new (outer) destination.
const LWT_REROUTE: i32 = 128;
/// `BPF_DROP`.
const LWT_DROP: i32 = 2;
/// `BPF_ADJ_ROOM_MAC`.
const ADJ_ROOM_MAC: i32 = 1;
/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (newer kernels).
const ADJ_ROOM_DECAP_L4_UDP: i32 = 1 << 10;
/// `TCX_PASS` / `TC_ACT_OK`.
const TC_PASS: i32 = 0;
/// Outer IPv4 + UDP header bytes.
pub const ENCAP_LEN: i32 = 28;

/// Network-order bytes as the immediate a 32-bit store writes to memory.
fn be32_imm(ip: Ipv4Addr) -> i32 {
    i32::from_le_bytes(ip.octets())
}

/// Network-order 16-bit value as the immediate a 16-bit store writes to memory.
fn be16_imm(v: u16) -> i32 {
    i32::from(u16::from_le_bytes(v.to_be_bytes()))
}

/// The transmit program for one remote host: an outer IPv4 header (`src` -> `dst`, DF,
/// TTL 64, UDP) and a UDP header (`port` -> `port`, no checksum), then reroute. The header
/// is built on the stack at fp-32, fields at their natural alignment (the verifier wants it).
pub fn tx_program(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Vec<Insn> {
    let mut a = Asm::new();
    a.mov(6, 1)
        .load(Size::W, 2, 6, 0) // r2 = skb->len
        .mov(3, 2)
        .add_imm(3, ENCAP_LEN)
        .be16(3) // IPv4 total length
        .mov(4, 2)
        .add_imm(4, 8)
        .be16(4) // UDP length
        .store_imm(Size::B, FP, -32, 0x45)
        .store_imm(Size::B, FP, -31, 0)
        .store(Size::H, FP, -30, 3)
        .store_imm(Size::H, FP, -28, 0) // id (the kernel numbers segments)
        .store_imm(Size::H, FP, -26, be16_imm(0x4000)) // DF, as Go's socket sends
        .store_imm(Size::B, FP, -24, 64)
        .store_imm(Size::B, FP, -23, 17)
        .store_imm(Size::H, FP, -22, 0) // checksum: filled in by the kernel
        .store_imm(Size::W, FP, -20, be32_imm(src))
        .store_imm(Size::W, FP, -16, be32_imm(dst))
        .store_imm(Size::H, FP, -12, be16_imm(port))
        .store_imm(Size::H, FP, -10, be16_imm(port))
        .store(Size::H, FP, -8, 4)
        .store_imm(Size::H, FP, -6, 0)
        .mov(1, 6)
        .mov_imm(2, LWT_ENCAP_IP)
        .mov(3, FP)
        .add_imm(3, -32)
        .mov_imm(4, ENCAP_LEN)
        .call(helper::LWT_PUSH_ENCAP)
        .jump_if(Cond::Ne, 0, 0, "drop")
        .mov_imm(0, LWT_REROUTE)
        .exit()
        .label("drop")
        .mov_imm(0, LWT_DROP)
        .exit();
    a.finish()
}

/// The receive program: for Ethernet + IPv4 (no options, not a fragment) + UDP to
/// `local`:`port` carrying an IPv4 packet, removes the 28 outer bytes after the Ethernet
/// header; passes everything on. The first 44 bytes are copied to fp-50 so that the IPv4
/// header starts 4-byte aligned at fp-36.
pub fn rx_program(local: Ipv4Addr, port: u16) -> Vec<Insn> {
    let mut a = Asm::new();
    a.mov(6, 1)
        .mov(1, 6)
        .mov_imm(2, 0)
        .mov(3, FP)
        .add_imm(3, -50)
        .mov_imm(4, 44)
        .call(helper::SKB_LOAD_BYTES)
        .jump_if(Cond::Ne, 0, 0, "pass")
        .load(Size::H, 2, FP, -38) // EtherType
        .jump_if(Cond::Ne, 2, be16_imm(0x0800), "pass")
        .load(Size::B, 2, FP, -36) // version + IHL
        .jump_if(Cond::Ne, 2, 0x45, "pass")
        .load(Size::H, 2, FP, -30) // flags + fragment offset
        .and_imm(2, be16_imm(0x3fff))
        .jump_if(Cond::Ne, 2, 0, "pass")
        .load(Size::B, 2, FP, -27) // protocol
        .jump_if(Cond::Ne, 2, 17, "pass")
        .load(Size::W, 2, FP, -20) // destination address
        .jump32_if(Cond::Ne, 2, be32_imm(local) as u32, "pass")
        .load(Size::H, 2, FP, -14) // UDP destination port
        .jump_if(Cond::Ne, 2, be16_imm(port), "pass")
        .load(Size::B, 2, FP, -8) // inner version
        .and_imm(2, 0xf0)
        .jump_if(Cond::Ne, 2, 0x40, "pass")
        // Kernels with BPF_F_ADJ_ROOM_DECAP_L4_UDP also reset a TCP super-packet's UDP
        // tunnel offload state (left stale, the kernel segments the inner packet in software
        // on its way to the pod); older ones refuse the flag (-EINVAL): decapsulate without.
        .mov(1, 6)
        .mov_imm(2, -ENCAP_LEN)
        .mov_imm(3, ADJ_ROOM_MAC)
        .mov_imm(4, ADJ_ROOM_DECAP_L4_UDP)
        .call(helper::SKB_ADJUST_ROOM)
        .jump_if(Cond::Ne, 0, -22, "pass")
        .mov(1, 6)
        .mov_imm(2, -ENCAP_LEN)
        .mov_imm(3, ADJ_ROOM_MAC)
        .mov_imm(4, 0)
        .call(helper::SKB_ADJUST_ROOM)
        .label("pass")
        .mov_imm(0, TC_PASS)
        .exit();
    a.finish()
}

/// Headroom asked of routes for the pushed headers (outer IPv4 + UDP + Ethernet).
const HEADROOM: u32 = ENCAP_LEN as u32 + 14;

/// The kernel data path of one udp network: the receive program attached to the underlay
/// interface (detached when this is dropped) and one encapsulating route per remote subnet.
pub struct KernelPath {
    nl: crate::netlink::Netlink,
    /// Underlay interface index (routes' device, receive hook).
    oif: u32,
    /// Outer source address (the interface address, as the TUN engine's socket binds).
    src: Ipv4Addr,
    port: u16,
    _rx: std::os::fd::OwnedFd,
    /// What each installed route encapsulates to.
    routes: std::collections::HashMap<ipnet::Ipv4Net, Ipv4Addr>,
}

impl KernelPath {
    /// Loads and attaches the receive program on interface `oif` for datagrams to
    /// `src`:`port`. Fails (and changes nothing) where BPF is unavailable: an older kernel,
    /// no CAP_BPF/CAP_SYS_ADMIN, or a sandbox that filters `bpf(2)`.
    pub fn start(
        nl: crate::netlink::Netlink,
        oif: u32,
        src: Ipv4Addr,
        port: u16,
    ) -> Result<KernelPath, crate::bpf::BpfError> {
        use crate::bpf::{ProgType, Program};
        // Try a transmit program first, so a kernel without LWT BPF fails before anything
        // is attached.
        Program::load(ProgType::LwtXmit, TX_NAME, &tx_program(src, src, port))?;
        let rx = Program::load(ProgType::SchedCls, RX_NAME, &rx_program(src, port))?;
        let link = rx.attach_tcx_ingress(oif)?;
        Ok(KernelPath {
            nl,
            oif,
            src,
            port,
            _rx: link,
            routes: Default::default(),
        })
    }

    /// Routes `subnet` through a transmit program that encapsulates to `peer`.
    pub async fn add(&mut self, subnet: ipnet::Ipv4Net, peer: Ipv4Addr) -> Result<(), String> {
        use crate::bpf::{ProgType, Program};
        if self.routes.get(&subnet) == Some(&peer) {
            return Ok(());
        }
        let prog = Program::load(
            ProgType::LwtXmit,
            TX_NAME,
            &tx_program(self.src, peer, self.port),
        )
        .map_err(|e| e.to_string())?;
        // The route's name must differ per peer: the kernel shares one nexthop (and so one
        // program) among routes whose BPF encap compares equal, and it compares names only.
        self.nl
            .replace_bpf_route(
                ipnet::IpNet::V4(subnet),
                self.oif,
                prog.raw_fd(),
                &format!("{TX_NAME}/{peer}"),
                HEADROOM,
            )
            .await
            .map_err(|e| e.to_string())?;
        // The route holds the program now; our fd closes here.
        self.routes.insert(subnet, peer);
        Ok(())
    }

    /// Removes the route of `subnet`.
    pub async fn remove(&mut self, subnet: ipnet::Ipv4Net) -> Result<(), String> {
        self.routes.remove(&subnet);
        self.nl
            .delete_link_route(&self.spec(subnet))
            .await
            .map_err(|e| e.to_string())
    }

    fn spec(&self, subnet: ipnet::Ipv4Net) -> crate::netlink::RouteSpec {
        crate::netlink::RouteSpec {
            dst: ipnet::IpNet::V4(subnet),
            gateway: None,
            oif: Some(self.oif),
            onlink: false,
            blackhole: false,
        }
    }

    /// Makes the routes exactly `want` (subnet -> peer): installs what is missing and removes
    /// device routes into `network` on the underlay that no lease explains (peers that left
    /// while flanneld was down, or another backend's leftovers).
    pub async fn resync(
        &mut self,
        network: Option<ipnet::Ipv4Net>,
        own: ipnet::Ipv4Net,
        want: &[(ipnet::Ipv4Net, Ipv4Addr)],
    ) {
        let keep: std::collections::HashSet<_> = want.iter().map(|(s, _)| *s).collect();
        self.routes.retain(|s, _| keep.contains(s));
        for (subnet, peer) in want {
            if let Err(e) = self.add(*subnet, *peer).await {
                tracing::warn!("udp: kernel route {subnet}: {e}");
            }
        }
        let Some(network) = network else { return };
        let routes = match self.nl.routes(false).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("udp: {e}");
                return;
            }
        };
        for r in routes {
            let Some(ipnet::IpNet::V4(dst)) = r.destination_net() else {
                continue;
            };
            let stale = r.table == 254
                && r.oif == Some(self.oif)
                && r.gateway.is_none()
                && is_ours(&r)
                && dst.prefix_len() > network.prefix_len()
                && network.contains(&dst)
                && dst != own
                && !self.routes.contains_key(&dst);
            if stale {
                tracing::info!("udp: removing stale route {dst}");
                if let Err(e) = self.nl.delete_link_route(&self.spec(dst)).await {
                    tracing::warn!("udp: {e}");
                }
            }
        }
    }
}

/// Removes every route that hands packets to flannel's udp transmit program (another backend
/// now runs; these would keep encapsulating to the old udp peers).
pub async fn remove_routes(nl: &crate::netlink::Netlink) {
    let routes = match nl.routes(false).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("udp: {e}");
            return;
        }
    };
    for r in routes.iter().filter(|r| is_ours(r)) {
        tracing::info!(
            "udp: removing kernel-path route {} left by an earlier udp run",
            r.destination_net()
                .map(|d| d.to_string())
                .unwrap_or_default()
        );
        let Some(dst) = r.destination_net() else {
            continue;
        };
        let spec = crate::netlink::RouteSpec {
            dst,
            gateway: None,
            oif: r.oif,
            onlink: false,
            blackhole: false,
        };
        if let Err(e) = nl.delete_link_route(&spec).await {
            tracing::warn!("udp: {e}");
        }
    }
}

//! The udp backend's kernel data path (`FLANNEL_UDP_DATAPATH=kernel`): the same wire format as
//! the TUN engine (UDP datagrams on port `Port` whose payload is the pod's IPv4 packet, as Go
//! flannel sends them), encapsulated and decapsulated inside the kernel by two small BPF
//! programs, so packets never cross into user space:
//! - transmit: each remote subnet is routed `via <its network address> dev flannel-udprx
//!   onlink`, with a permanent neighbour entry whose MAC carries the remote host's address
//!   (`02:66:a.b.c.d`); a TCX egress program on `flannel-udprx` reads it, pushes the outer
//!   IPv4 + UDP header and hands the packet to the underlay interface (TCP super-packets stay
//!   whole: the kernel or the NIC segments them as UDP tunnel packets). It runs after
//!   netfilter has seen the inner packet, as the TUN path does, and the outer packet does not
//!   pass netfilter again (so NAT of the inner flow is never applied to it);
//! - receive: a TCX ingress program on the underlay interface turns datagrams to our address
//!   and port into VXLAN datagrams for `flannel-udprx` (a VXLAN device used only for this),
//!   whose kernel receive path takes the outer headers off (see [`rx_program`] for why not
//!   BPF itself). Anything it does not recognise (fragments, IP options, non-IPv4 payloads)
//!   goes on to the TUN engine's socket as before.

use std::net::Ipv4Addr;

use crate::bpf::{helper, Asm, Cond, Insn, Size, FP};

/// The name of the transmit program (shown by `bpftool net`).
pub const TX_NAME: &str = "flannel_udp_tx";
/// The name of the receive program.
pub const RX_NAME: &str = "flannel_udp_rx";
/// `BPF_ADJ_ROOM_MAC`.
const ADJ_ROOM_MAC: i32 = 1;
/// `BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP`: the kernel then treats TCP
/// super-packets as UDP tunnel packets when it segments them.
const ADJ_ROOM_ENCAP_UDP4: i32 = (1 << 1) | (1 << 4);
/// `TCX_PASS` / `TC_ACT_OK`.
const TC_PASS: i32 = 0;
/// `TC_ACT_SHOT`.
const TC_SHOT: i32 = 2;
/// Outer IPv4 + UDP header bytes.
const ENCAP_LEN: i32 = 28;
/// The first two bytes of a peer neighbour's MAC; the other four are the peer's address.
pub const PEER_MAC_MARK: [u8; 2] = [0x02, 0x66];

/// The neighbour MAC that tells the transmit program where `peer` is.
pub fn peer_mac(peer: Ipv4Addr) -> [u8; 6] {
    let o = peer.octets();
    [PEER_MAC_MARK[0], PEER_MAC_MARK[1], o[0], o[1], o[2], o[3]]
}

/// Ends a tc program with its two exits: `pass` (hand the packet on unchanged) and `shot`
/// (drop it: it was modified half-way).
fn finish_tc(mut a: Asm) -> Vec<Insn> {
    a.label("pass")
        .mov_imm(0, TC_PASS)
        .exit()
        .label("shot")
        .mov_imm(0, TC_SHOT)
        .exit();
    a.finish()
}

/// Network-order bytes as the immediate a 32-bit store writes to memory.
fn be32_imm(ip: Ipv4Addr) -> i32 {
    i32::from_le_bytes(ip.octets())
}

/// Network-order 16-bit value as the immediate a 16-bit store writes to memory.
fn be16_imm(v: u16) -> i32 {
    i32::from(u16::from_le_bytes(v.to_be_bytes()))
}

/// The transmit program (TCX egress of [`RX_DEVICE`]). For an IPv4 frame addressed to a peer
/// MAC ([`peer_mac`]): room for 28 bytes after the Ethernet header, an outer IPv4 header
/// (`src` -> the peer, DF, TTL 64, UDP, checksum computed here) and a UDP header (`port` ->
/// `port`, no checksum), then out of interface `underlay` to the peer's neighbour. Stack: the
/// first 16 bytes of the frame at fp-26 (the peer address 4-byte aligned at fp-24), the new
/// headers at fp-56.
pub fn tx_program(src: Ipv4Addr, port: u16, underlay: u32) -> Vec<Insn> {
    let mut a = Asm::new();
    a.mov(6, 1)
        .skb_load_bytes(6, 0, -26, 16, "pass")
        .load(Size::H, 2, FP, -26)
        .jump_if(
            Cond::Ne,
            2,
            i32::from(u16::from_le_bytes(PEER_MAC_MARK)),
            "pass",
        )
        .load(Size::H, 2, FP, -14) // EtherType
        .jump_if(Cond::Ne, 2, be16_imm(0x0800), "pass")
        .load(Size::W, 7, FP, -24) // the peer's address
        .load(Size::W, 8, 6, 0) // skb->len, Ethernet header included
        .mov(1, 6)
        .mov_imm(2, ENCAP_LEN)
        .mov_imm(3, ADJ_ROOM_MAC)
        .mov_imm(4, ADJ_ROOM_ENCAP_UDP4)
        .call(helper::SKB_ADJUST_ROOM)
        .jump_if(Cond::Ne, 0, 0, "shot")
        .mov(2, 8)
        .add_imm(2, ENCAP_LEN - 14)
        .be16(2) // outer total length (wraps for super-packets: segmentation rewrites it)
        .store_imm(Size::B, FP, -56, 0x45)
        .store_imm(Size::B, FP, -55, 0)
        .store(Size::H, FP, -54, 2)
        .store_imm(Size::H, FP, -52, 0)
        .store_imm(Size::H, FP, -50, be16_imm(0x4000)) // DF, as Go's socket sends
        .store_imm(Size::B, FP, -48, 64)
        .store_imm(Size::B, FP, -47, 17)
        .store_imm(Size::H, FP, -46, 0)
        .store_imm(Size::W, FP, -44, be32_imm(src))
        .store(Size::W, FP, -40, 7)
        .store_imm(Size::H, FP, -36, be16_imm(port))
        .store_imm(Size::H, FP, -34, be16_imm(port))
        .mov(3, 8)
        .add_imm(3, 8 - 14)
        .be16(3)
        .store(Size::H, FP, -32, 3)
        .store_imm(Size::H, FP, -30, 0)
        // Header checksum: sum the 20 bytes, fold, complement.
        .mov_imm(1, 0)
        .mov_imm(2, 0)
        .mov(3, FP)
        .add_imm(3, -56)
        .mov_imm(4, 20)
        .mov_imm(5, 0)
        .call(helper::CSUM_DIFF)
        .mov(1, 0)
        .rsh_imm(1, 16)
        .and_imm(0, 0xffff)
        .add(0, 1)
        .mov(1, 0)
        .rsh_imm(1, 16)
        .and_imm(0, 0xffff)
        .add(0, 1)
        .xor_imm(0, 0xffff)
        .store(Size::H, FP, -46, 0)
        .skb_store_bytes(6, 14, -56, ENCAP_LEN, "shot")
        .mov_imm(1, underlay as i32)
        .mov_imm(2, 0)
        .mov_imm(3, 0)
        .mov_imm(4, 0)
        .call(helper::REDIRECT_NEIGH)
        .exit();
    finish_tc(a)
}

/// The receive program. A datagram for `local`:`port` (Ethernet + IPv4 without options, not
/// a fragment, UDP, carrying an IPv4 packet) is turned into a VXLAN datagram for
/// `local`:`rx_port` (VNI 1, inner Ethernet header to `rx_mac`) and passed on, so the
/// kernel's own VXLAN receive path (device [`RX_DEVICE`]) takes the outer headers off: that
/// path also resets the UDP tunnel offload state of TCP super-packets, which a BPF
/// decapsulation cannot on kernels before `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (left stale, the
/// kernel segments the inner packet in software on its way to a bridge). Everything else
/// passes untouched (to the TUN engine's socket).
///
/// Stack: the first 44 bytes of the packet at fp-50 (IPv4 header 4-byte aligned at fp-36),
/// the 30 bytes written after the IPv4 header at fp-88, the new total length at fp-92.
pub fn rx_program(local: Ipv4Addr, port: u16, rx_port: u16, rx_mac: [u8; 6]) -> Vec<Insn> {
    let m = rx_mac;
    let mut a = Asm::new();
    a.mov(6, 1)
        .skb_load_bytes(6, 0, -50, 44, "pass")
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
        .load(Size::H, 7, FP, -34) // old total length (network order)
        .load(Size::H, 8, FP, -12) // old UDP length (network order)
        .load(Size::H, 9, FP, -16) // UDP source port
        // Room for the VXLAN + inner Ethernet headers after the IPv4 header.
        .mov(1, 6)
        .mov_imm(2, VXLAN_ROOM)
        .mov_imm(3, ADJ_ROOM_NET)
        .mov_imm(4, ADJ_ROOM_FIXED_GSO)
        .call(helper::SKB_ADJUST_ROOM)
        .jump_if(Cond::Ne, 0, 0, "pass")
        // UDP header to the VXLAN port.
        .store(Size::H, FP, -88, 9)
        .store_imm(Size::H, FP, -86, be16_imm(rx_port))
        .be16(8)
        .add_imm(8, VXLAN_ROOM)
        .be16(8)
        .store(Size::H, FP, -84, 8)
        .store_imm(Size::H, FP, -82, 0)
        // VXLAN header: flags I, VNI 1.
        .store_imm(Size::W, FP, -80, i32::from_le_bytes([0x08, 0, 0, 0]))
        .store_imm(Size::W, FP, -76, i32::from_le_bytes([0, 0, 1, 0]))
        // Inner Ethernet: to the receive device, from nobody in particular, IPv4.
        .store_imm(
            Size::W,
            FP,
            -72,
            i32::from_le_bytes([m[0], m[1], m[2], m[3]]),
        )
        .store_imm(
            Size::H,
            FP,
            -68,
            i32::from(u16::from_le_bytes([m[4], m[5]])),
        )
        .store_imm(
            Size::H,
            FP,
            -66,
            i32::from(u16::from_le_bytes([m[0] | 2, 0])),
        )
        .store_imm(Size::W, FP, -64, 0)
        .store_imm(Size::H, FP, -60, be16_imm(0x0800))
        .skb_store_bytes(6, 14 + 20, -88, 30, "shot")
        // Outer total length + 30 - 8, and the header checksum with it.
        .mov(2, 7)
        .be16(2)
        .add_imm(2, VXLAN_ROOM)
        .be16(2)
        .store(Size::H, FP, -92, 2)
        .skb_store_bytes(6, 14 + 2, -92, 2, "shot")
        .load(Size::H, 4, FP, -92)
        .mov(1, 6)
        .mov_imm(2, 14 + 10)
        .mov(3, 7)
        .mov_imm(5, 2)
        .call(helper::L3_CSUM_REPLACE)
        .jump_if(Cond::Ne, 0, 0, "shot");
    finish_tc(a)
}

/// The kernel VXLAN device that finishes the receive path (see [`rx_program`]).
pub const RX_DEVICE: &str = "flannel-udprx";
/// Its UDP port (only datagrams rewritten by the receive program use it).
pub const RX_PORT: u16 = 8473;
/// Its MAC address (locally administered).
pub const RX_MAC: [u8; 6] = [0x0e, 0x66, 0x6c, 0x75, 0x64, 0x70];
/// Bytes the receive program inserts: VXLAN (8) + inner Ethernet (14) headers.
const VXLAN_ROOM: i32 = 22;
/// `BPF_ADJ_ROOM_NET`.
const ADJ_ROOM_NET: i32 = 0;
/// `BPF_F_ADJ_ROOM_FIXED_GSO`.
const ADJ_ROOM_FIXED_GSO: i32 = 1;

/// The kernel data path of one udp network: the device the programs sit on, and one route +
/// neighbour entry per remote subnet. The programs are attached as tc filters, which belong
/// to the interfaces: they keep forwarding while flanneld restarts, and a new flanneld
/// replaces them atomically.
pub struct KernelPath {
    nl: crate::netlink::Netlink,
    /// The device's index (the routes' device).
    dev: u32,
    /// What each route leads to.
    routes: std::collections::HashMap<ipnet::Ipv4Net, Ipv4Addr>,
}

impl KernelPath {
    /// Creates (or reuses) [`RX_DEVICE`] (with address `own`, the subnet's first, as
    /// flannel0 has: masquerading on the way out takes its source from there), loads both
    /// programs and attaches them (replacing an earlier run's): transmit on the device's
    /// egress, receive on interface `underlay`'s ingress for datagrams to `src`:`port`. Fails where BPF is unavailable (an
    /// older kernel, no CAP_BPF/CAP_SYS_ADMIN, a sandbox filtering `bpf(2)`) before the device
    /// is touched.
    pub async fn start(
        nl: crate::netlink::Netlink,
        underlay: u32,
        mtu: u32,
        own: Ipv4Addr,
        src: Ipv4Addr,
        port: u16,
    ) -> Result<KernelPath, String> {
        use crate::bpf::{ProgType, Program};
        let tx = Program::load(
            ProgType::SchedCls,
            TX_NAME,
            &tx_program(src, port, underlay),
        )
        .map_err(|e| e.to_string())?;
        let rx = Program::load(
            ProgType::SchedCls,
            RX_NAME,
            &rx_program(src, port, RX_PORT, RX_MAC),
        )
        .map_err(|e| e.to_string())?;
        let dev = rx_device(&nl, mtu).await?;
        nl.add_address(dev, std::net::IpAddr::V4(own), 32, RX_DEVICE)
            .await
            .map_err(|e| e.to_string())?;
        nl.attach_tc_bpf(dev, true, tx.raw_fd(), TX_NAME)
            .await
            .map_err(|e| e.to_string())?;
        nl.attach_tc_bpf(underlay, false, rx.raw_fd(), RX_NAME)
            .await
            .map_err(|e| e.to_string())?;
        Ok(KernelPath {
            nl,
            dev,
            routes: Default::default(),
        })
    }

    fn spec(&self, subnet: ipnet::Ipv4Net) -> crate::netlink::RouteSpec {
        crate::netlink::RouteSpec {
            dst: ipnet::IpNet::V4(subnet),
            gateway: Some(std::net::IpAddr::V4(subnet.network())),
            oif: Some(self.dev),
            onlink: true,
            blackhole: false,
        }
    }

    /// Routes `subnet` to `peer`: the neighbour entry first, so the route never points at a
    /// missing one.
    pub async fn add(&mut self, subnet: ipnet::Ipv4Net, peer: Ipv4Addr) -> Result<(), String> {
        if self.routes.get(&subnet) == Some(&peer) {
            return Ok(());
        }
        self.nl
            .replace_neighbour(
                self.dev,
                std::net::IpAddr::V4(subnet.network()),
                peer_mac(peer),
            )
            .await
            .map_err(|e| e.to_string())?;
        self.nl
            .replace_route(&self.spec(subnet))
            .await
            .map_err(|e| e.to_string())?;
        self.routes.insert(subnet, peer);
        Ok(())
    }

    /// Removes the route and neighbour entry of `subnet`.
    pub async fn remove(&mut self, subnet: ipnet::Ipv4Net) -> Result<(), String> {
        self.routes.remove(&subnet);
        self.nl
            .delete_route(&self.spec(subnet))
            .await
            .map_err(|e| e.to_string())?;
        self.nl
            .delete_neighbour(self.dev, std::net::IpAddr::V4(subnet.network()))
            .await
            .map_err(|e| e.to_string())
    }

    /// Makes the routes exactly `want` (subnet -> peer): installs what is missing and removes
    /// routes through the device that no lease explains (peers that left while flanneld was
    /// down).
    pub async fn resync(&mut self, want: &[(ipnet::Ipv4Net, Ipv4Addr)]) {
        let keep: std::collections::HashSet<_> = want.iter().map(|(s, _)| *s).collect();
        self.routes.retain(|s, _| keep.contains(s));
        for (subnet, peer) in want {
            if let Err(e) = self.add(*subnet, *peer).await {
                tracing::warn!("udp: kernel route {subnet}: {e}");
            }
        }
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
            if r.table == 254 && r.oif == Some(self.dev) && !self.routes.contains_key(&dst) {
                tracing::info!("udp: removing stale route {dst}");
                if let Err(e) = self.remove(dst).await {
                    tracing::warn!("udp: {e}");
                }
            }
        }
    }
}

/// The receive device: a VXLAN device (VNI 1, port [`RX_PORT`], MAC [`RX_MAC`], no
/// learning) that only sees what the receive program rewrote; reused when it exists as such.
async fn rx_device(nl: &crate::netlink::Netlink, mtu: u32) -> Result<u32, String> {
    let wanted = |d: &crate::netlink::LinkDetails| {
        d.kind.as_deref() == Some("vxlan")
            && d.mac == Some(RX_MAC)
            && d.vxlan
                .as_ref()
                .is_some_and(|x| x.vni == Some(1) && x.port == Some(RX_PORT))
    };
    let existing = nl
        .link_details(RX_DEVICE)
        .await
        .map_err(|e| e.to_string())?;
    let dev = match existing {
        Some(d) if wanted(&d) => d,
        other => {
            if let Some(d) = other {
                nl.delete_link(d.index, RX_DEVICE)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            nl.create_vxlan(&crate::netlink::VxlanSpec {
                name: RX_DEVICE.into(),
                vni: 1,
                // Not bound to the underlay: its MTU (the routes' forwarding limit) may then
                // equal the underlay's.
                dev: 0,
                local: None,
                port: RX_PORT,
                learning: false,
                gbp: false,
                mtu,
                mac: RX_MAC,
            })
            .await
            .map_err(|e| e.to_string())?;
            nl.link_details(RX_DEVICE)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{RX_DEVICE} vanished after creation"))?
        }
    };
    if dev.mtu != mtu {
        nl.set_mtu(dev.index, mtu, RX_DEVICE)
            .await
            .map_err(|e| e.to_string())?;
    }
    nl.set_up(dev.index, RX_DEVICE)
        .await
        .map_err(|e| e.to_string())?;
    Ok(dev.index)
}

/// Removes [`RX_DEVICE`] (and with it every route and neighbour entry of the kernel path and
/// the transmit program) and the receive program: the kernel path is no longer wanted.
pub async fn remove_device(nl: &crate::netlink::Netlink) {
    let Ok(Some(d)) = nl.link_details(RX_DEVICE).await else {
        return;
    };
    // The receive program sits on the underlay interface, whichever it was.
    if let Ok(links) = nl.links().await {
        for l in links.iter().filter(|l| l.index != d.index) {
            if let Err(e) = nl.detach_tc_bpf(l.index, false).await {
                tracing::debug!("udp: {e}");
            }
        }
    }
    tracing::info!("udp: removing {RX_DEVICE} left by an earlier udp run");
    if let Err(e) = nl.delete_link(d.index, RX_DEVICE).await {
        tracing::warn!("udp: {e}");
    }
}

//! The udp backend's packet loops: TUN <-> UDP, on dedicated threads.
//!
//! Three modes of the same code, so each technique's gain can be measured:
//! - `simple`: one queue, one packet per system call, no busy polling (what Go flannel's C
//!   loop does);
//! - `batch`: one TUN queue + one SO_REUSEPORT socket per worker, the TUN drained in batches,
//!   recvmmsg/sendmmsg on the socket;
//! - `offload` (default): `batch` plus TUN offloads (IFF_VNET_HDR: the kernel hands over 64 KB
//!   TCP super-packets, split here into MTU packets; received packets are coalesced back before
//!   the TUN write) and UDP GSO/GRO (many datagrams per send/receive call).
//!
//! Each worker serves both directions of its TUN queue on one thread, so a reply that the kernel
//! produces while we write a packet to the TUN is picked up without sleeping. After activity a
//! worker can keep polling for `FLANNEL_UDP_SPIN_US` microseconds (default 0: off) before it
//! blocks, which spares
//! back-to-back packets a thread wake-up. Buffers are allocated once per worker; the route table
//! is read under a lock once per batch.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};

use tun_rs::{DeviceBuilder, GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::packet::{decrement_ttl, icmp_net_unreachable, ipv4_dst};
use super::routes::RouteTable;
use super::sock::{MultiRecv, MultiSend, UdpSock, MAX_GSO_BYTES, MAX_GSO_SEGMENTS};

/// Which data path to run (env `FLANNEL_UDP_DATAPATH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One packet per system call, one queue.
    Simple,
    /// Batched system calls, one queue per worker.
    Batch,
    /// Batched plus TUN and UDP segmentation offloads.
    Offload,
}

impl Mode {
    /// From `FLANNEL_UDP_DATAPATH` (`simple`, `batch`, `offload`; default `offload`).
    pub fn from_env() -> Mode {
        match std::env::var("FLANNEL_UDP_DATAPATH").as_deref() {
            Ok("simple") => Mode::Simple,
            Ok("batch") => Mode::Batch,
            _ => Mode::Offload,
        }
    }
}

/// What is shared between the packet threads and the lease handler.
pub struct Shared {
    /// Remote subnets -> peers; replaced entry by entry while packets flow.
    pub routes: RwLock<RouteTable>,
    /// Source of ICMP replies (this host's flannel0 address).
    pub tun_ip: Ipv4Addr,
}

/// What actually runs (after fallbacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// The mode in effect.
    pub mode: Mode,
    /// Number of TUN queues / workers.
    pub queues: usize,
    /// UDP send segmentation in use.
    pub gso: bool,
    /// UDP receive coalescing in use.
    pub gro: bool,
    /// Workers pinned to CPUs, with TUN queues and sockets chosen by CPU.
    pub cpu_steering: bool,
}

/// Opens (or re-attaches to) the persistent TUN device, one handle per queue. Falls back from
/// offload to plain batching if the kernel refuses IFF_VNET_HDR.
pub fn open_tun(name: &str, mode: Mode, queues: usize) -> io::Result<(Vec<SyncDevice>, Mode)> {
    let try_open = |offload: bool, multi: bool| -> io::Result<Vec<SyncDevice>> {
        let first = DeviceBuilder::new()
            .name(name)
            .multi_queue(multi)
            .offload(offload)
            .build_sync()?;
        // Keep the device (and its address and routes) when flanneld exits, so a restart
        // only pauses forwarding instead of tearing the network down.
        first.persist()?;
        let mut devs = vec![first];
        for _ in 1..queues {
            devs.push(devs[0].try_clone()?);
        }
        Ok(devs)
    };
    let multi = queues > 1;
    match mode {
        Mode::Offload => match try_open(true, multi) {
            Ok(d) => Ok((d, Mode::Offload)),
            Err(e) => {
                tracing::warn!("udp: TUN offloads unavailable ({e}); using batched mode");
                try_open(false, multi).map(|d| (d, Mode::Batch))
            }
        },
        other => try_open(false, multi).map(|d| (d, other)),
    }
}

/// Starts one packet worker per TUN queue.
pub fn start(
    devs: Vec<SyncDevice>,
    mode: Mode,
    bind: SocketAddrV4,
    mtu: usize,
    shared: Arc<Shared>,
) -> io::Result<Running> {
    let queues = devs.len();
    let mut running = Running {
        mode,
        queues,
        gso: false,
        gro: false,
        cpu_steering: false,
    };
    let spin = std::env::var("FLANNEL_UDP_SPIN_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Bind every socket first: the reuseport group's order is the workers' order.
    let mut socks = vec![];
    for _ in 0..queues {
        let sock = UdpSock::bind(bind, true)?;
        if mode == Mode::Offload {
            running.gso = sock.gso_supported();
            running.gro = sock.enable_gro();
        }
        socks.push(sock);
    }
    let want_steering = mode != Mode::Simple
        && queues > 1
        && super::steer::contiguous_cpus() == Some(queues)
        && std::env::var("FLANNEL_UDP_CPU_STEERING").as_deref() == Ok("1");
    if want_steering {
        let steered = super::steer::steer_tun_by_cpu(devs[0].as_raw_fd())
            .and_then(|_| super::steer::steer_reuseport_by_cpu(socks[0].as_raw_fd()));
        match steered {
            Ok(()) => running.cpu_steering = true,
            Err(e) => tracing::info!("udp: CPU steering unavailable ({e}); using flow hashing"),
        }
    }
    for (q, (dev, sock)) in devs.into_iter().zip(socks).enumerate() {
        dev.set_nonblocking(true)?;
        let mut w = Worker::new(dev, sock, shared.clone(), mtu, mode, running, spin);
        let pin = running.cpu_steering;
        std::thread::Builder::new()
            .name(format!("udp-q{q}"))
            .spawn(move || {
                if pin {
                    if let Err(e) = super::steer::pin_current_thread(q) {
                        tracing::warn!("udp: cannot pin worker {q} to CPU {q}: {e}");
                    }
                }
                w.run()
            })?;
    }
    Ok(running)
}

/// Where a packet read from the TUN goes.
enum Verdict {
    Send(SocketAddrV4),
    Unreachable,
    Drop,
}

fn classify(pkt: &mut [u8], routes: &RouteTable) -> Verdict {
    let Some(dst) = ipv4_dst(pkt) else {
        return Verdict::Drop;
    };
    match routes.lookup(dst) {
        None => Verdict::Unreachable,
        Some(peer) => {
            if decrement_ttl(pkt) {
                Verdict::Send(peer)
            } else {
                Verdict::Drop
            }
        }
    }
}

/// Packets per TUN drain.
const TX_BATCH: usize = 256;
/// Datagrams (or coalesced groups) per recvmmsg.
const RX_BATCH: usize = 16;
/// Packets handed to one coalescing TUN write (flushed earlier when full).
const RX_OUT: usize = 256;

/// Nanoseconds since the first call, shared by every worker (for the busy-poll window).
fn now_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// When any worker last moved a packet.
static LAST_ACTIVITY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One TUN queue and its UDP socket, both directions, on one thread.
struct Worker {
    dev: SyncDevice,
    sock: UdpSock,
    shared: Arc<Shared>,
    mode: Mode,
    run: Running,
    spin_ns: u64,
    // TUN -> UDP
    orig: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    peers: Vec<Option<SocketAddrV4>>,
    icmp: Vec<u8>,
    out: MultiSend,
    // UDP -> TUN
    rx: MultiRecv,
    rx_out: Vec<Vec<u8>>,
    gro_table: GROTable,
}

impl Worker {
    fn new(
        dev: SyncDevice,
        sock: UdpSock,
        shared: Arc<Shared>,
        mtu: usize,
        mode: Mode,
        run: Running,
        spin_us: u64,
    ) -> Self {
        let offload = mode == Mode::Offload;
        let batch = if mode == Mode::Simple { 1 } else { TX_BATCH };
        let rx_size = if run.gro { 65_535 } else { mtu.max(1500) + 64 };
        let rx_batch = if mode == Mode::Simple { 1 } else { RX_BATCH };
        Worker {
            dev,
            sock,
            shared,
            mode,
            run,
            spin_ns: spin_us * 1000,
            orig: vec![0u8; VIRTIO_NET_HDR_LEN + 65_535],
            bufs: (0..batch).map(|_| vec![0u8; mtu + 64]).collect(),
            sizes: vec![0; batch],
            peers: vec![None; batch],
            icmp: vec![0u8; 256],
            out: MultiSend::new(),
            rx: MultiRecv::new(rx_batch, rx_size),
            rx_out: (0..if offload { RX_OUT } else { 0 })
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + 65_535))
                .collect(),
            gro_table: GROTable::new(),
        }
    }

    fn run(&mut self) {
        let fds = [self.dev.as_raw_fd(), self.sock.as_raw_fd()];
        loop {
            let moved = self.pump_tun() + self.pump_udp();
            let now = now_ns();
            if moved > 0 {
                LAST_ACTIVITY.store(now, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            let last = LAST_ACTIVITY.load(std::sync::atomic::Ordering::Relaxed);
            if self.spin_ns > 0 && now.saturating_sub(last) < self.spin_ns {
                std::hint::spin_loop();
                continue;
            }
            let mut p = [
                libc::pollfd {
                    fd: fds[0],
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: fds[1],
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: p is a valid array of two pollfds for the call.
            unsafe {
                libc::poll(p.as_mut_ptr(), 2, -1);
            }
        }
    }

    fn send_unreachable(&mut self, i: usize) {
        let vnet = self.mode == Mode::Offload;
        let off = if vnet { VIRTIO_NET_HDR_LEN } else { 0 };
        self.icmp[..off].fill(0);
        let pkt = &self.bufs[i][..self.sizes[i]];
        if let Some(n) = icmp_net_unreachable(pkt, self.shared.tun_ip, &mut self.icmp[off..]) {
            let _ = self.dev.send(&self.icmp[..off + n]);
        }
    }

    /// Reads what the TUN has (one packet in simple mode), forwards it; returns the count.
    fn pump_tun(&mut self) -> usize {
        let offload = self.mode == Mode::Offload;
        let cap = self.bufs.len();
        let mut n = 0;
        loop {
            let r = if offload {
                if cap - n < 64 {
                    break;
                }
                self.dev
                    .recv_multiple(&mut self.orig, &mut self.bufs[n..], &mut self.sizes[n..], 0)
            } else {
                if n == cap {
                    break;
                }
                self.dev.recv(&mut self.bufs[n]).map(|len| {
                    self.sizes[n] = len;
                    1
                })
            };
            match r {
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("udp: TUN read: {e}");
                    break;
                }
            }
            if self.mode == Mode::Simple {
                break;
            }
        }
        if n == 0 {
            return 0;
        }
        {
            let shared = self.shared.clone();
            let routes = shared.routes.read().unwrap_or_else(|p| p.into_inner());
            for i in 0..n {
                let verdict = classify(&mut self.bufs[i][..self.sizes[i]], &routes);
                self.peers[i] = match verdict {
                    Verdict::Send(p) => Some(p),
                    Verdict::Unreachable => {
                        self.send_unreachable(i);
                        None
                    }
                    Verdict::Drop => None,
                };
            }
        }
        if self.mode == Mode::Simple {
            if let Some(peer) = self.peers[0] {
                if let Err(e) = self.sock.send_to(&self.bufs[0][..self.sizes[0]], peer) {
                    tracing::debug!("udp: send to {peer}: {e}");
                }
            }
            return n;
        }
        // Group consecutive equal-size packets to one peer into one UDP_SEGMENT send.
        let gso = self.run.gso;
        let mut segs: Vec<&[u8]> = Vec::with_capacity(MAX_GSO_SEGMENTS);
        let mut i = 0;
        while i < n {
            let Some(peer) = self.peers[i] else {
                i += 1;
                continue;
            };
            segs.clear();
            let size = self.sizes[i];
            let mut bytes = 0;
            let mut j = i;
            while j < n
                && self.peers[j] == Some(peer)
                && (gso || j == i)
                && segs.len() < MAX_GSO_SEGMENTS
                && bytes + self.sizes[j] <= MAX_GSO_BYTES
                && self.sizes[j] <= size
            {
                segs.push(&self.bufs[j][..self.sizes[j]]);
                bytes += self.sizes[j];
                j += 1;
                if self.sizes[j - 1] < size {
                    break; // a shorter segment must be the last one
                }
            }
            self.out.push(peer, &segs);
            i = j;
        }
        if let Err(e) = self.out.flush(&self.sock) {
            tracing::debug!("udp: sendmmsg: {e}");
        }
        n
    }

    /// Reads what the socket has, writes the packets to the TUN; returns the datagram count.
    fn pump_udp(&mut self) -> usize {
        if self.mode == Mode::Simple {
            let n = match self.sock.recv(&mut self.bufs[0]) {
                Ok(n) => n,
                Err(_) => return 0,
            };
            let pkt = &mut self.bufs[0][..n];
            if decrement_ttl(pkt) {
                let _ = self.dev.send(pkt);
            }
            return 1;
        }
        let n = match self.rx.recv(&self.sock) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    tracing::debug!("udp: recvmmsg: {e}");
                }
                return 0;
            }
        };
        let offload = self.mode == Mode::Offload;
        let mut datagrams = 0;
        let mut k = 0;
        for m in 0..n {
            let seg = self.rx.seg[m].max(1);
            let data = self.rx.buf(m);
            for chunk in data.chunks_mut(seg) {
                datagrams += 1;
                if !offload {
                    if decrement_ttl(chunk) {
                        let _ = self.dev.send(chunk);
                    }
                    continue;
                }
                if k == self.rx_out.len() {
                    Self::flush_tun(&self.dev, &mut self.gro_table, &mut self.rx_out[..k]);
                    k = 0;
                }
                let b = &mut self.rx_out[k];
                b.clear();
                b.resize(VIRTIO_NET_HDR_LEN, 0);
                b.extend_from_slice(chunk);
                if decrement_ttl(&mut b[VIRTIO_NET_HDR_LEN..]) {
                    k += 1;
                }
            }
        }
        if offload && k > 0 {
            Self::flush_tun(&self.dev, &mut self.gro_table, &mut self.rx_out[..k]);
        }
        datagrams
    }

    /// Coalesces (GRO) and writes received packets to the TUN.
    fn flush_tun(dev: &SyncDevice, gro: &mut GROTable, bufs: &mut [Vec<u8>]) {
        if let Err(e) = dev.send_multiple(gro, bufs, VIRTIO_NET_HDR_LEN) {
            tracing::debug!("udp: TUN write: {e}");
        }
    }
}

//! The TUN <-> UDP packet engine shared by the `udp` and `wireguard` backends: one worker thread
//! per TUN queue, both directions, batched system calls and offloads. What a packet becomes on
//! the wire is the backend's business, behind [`Codec`] (udp: the raw IPv4 packet; wireguard:
//! a WireGuard message).
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
//! blocks, which spares back-to-back packets a thread wake-up. Buffers are allocated once per
//! worker.

pub mod gro;
pub mod preattach;
pub mod sock;
pub mod steer;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tun_rs::{DeviceBuilder, GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use sock::{MultiRecv, MultiSend, SockAddr, UdpSock, MAX_GSO_BYTES, MAX_GSO_SEGMENTS};

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

    /// The number of TUN queues / workers for this mode (`FLANNEL_UDP_QUEUES`, default: one
    /// per CPU, at most 16).
    pub fn queues(self) -> usize {
        match self {
            Mode::Simple => 1,
            _ => std::env::var("FLANNEL_UDP_QUEUES")
                .ok()
                .and_then(|q| q.parse().ok())
                .unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(1)
                })
                .clamp(1, 16),
        }
    }
}

/// What to do with one packet read from the TUN; `A` is the codec's socket address type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tx<A> {
    /// Nothing is sent.
    Drop,
    /// Send the packet itself (possibly modified in place) to this address.
    InPlace(A),
    /// Send the first `usize` bytes of the packet's output buffer to this address.
    Encoded(A, usize),
}

/// What handling a datagram produced.
pub enum Emit<'a, A> {
    /// An IP packet for the TUN.
    Tun(&'a [u8]),
    /// A datagram to send back to the network.
    Net(A, &'a [u8]),
}

/// What a backend puts on the wire: the engine moves packets, the codec decides what they
/// become. Shared by every worker; per-worker scratch state lives in [`Codec::Local`].
pub trait Codec: Send + Sync + 'static {
    /// Per-worker state (scratch buffers).
    type Local: Send + 'static;
    /// Peer addresses: `SocketAddrV4` for an IPv4-only backend (no cost for IPv6 on its
    /// packet path), `SocketAddr` for both families on one dual-stack socket.
    type Addr: SockAddr;
    /// Bytes an encoded datagram may need beyond the packet (0: packets are sent in place).
    const ROOM: usize;
    /// The backend's name, for the data-path metrics.
    const NAME: &'static str;
    /// Fresh per-worker state.
    fn local(&self) -> Self::Local;
    /// Decides, for a batch of packets read from the TUN (`pkts[i][..sizes[i]]`), what to send
    /// (`verdicts[i]`; encoded datagrams go to `outs[i]`). `reply` writes a packet back to
    /// the TUN (e.g. an ICMP error).
    #[allow(clippy::too_many_arguments)]
    fn outbound(
        &self,
        local: &mut Self::Local,
        pkts: &mut [Vec<u8>],
        sizes: &[usize],
        outs: &mut [Vec<u8>],
        verdicts: &mut [Tx<Self::Addr>],
        reply: &mut dyn FnMut(&[u8]),
    );
    /// Handles one datagram from `src`; `scratch` is a 64 KB work buffer.
    fn inbound(
        &self,
        local: &mut Self::Local,
        src: Self::Addr,
        dgram: &mut [u8],
        scratch: &mut [u8],
        emit: &mut dyn FnMut(Emit<'_, Self::Addr>),
    );
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

/// Opens (or re-attaches to) the persistent TUN device, one handle per queue, taking the
/// handles [`preattach::grab_existing`] opened at start when they match. Falls back from
/// offload to plain batching if the kernel refuses IFF_VNET_HDR.
pub fn open_tun(name: &str, mode: Mode, queues: usize) -> io::Result<(Vec<SyncDevice>, Mode)> {
    match preattach::take(name, mode, queues) {
        Some(held) => Ok(held),
        None => open_tun_now(name, mode, queues),
    }
}

/// [`open_tun`] without the handles grabbed at start.
fn open_tun_now(name: &str, mode: Mode, queues: usize) -> io::Result<(Vec<SyncDevice>, Mode)> {
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
                tracing::warn!("{name}: TUN offloads unavailable ({e}); using batched mode");
                try_open(false, multi).map(|d| (d, Mode::Batch))
            }
        },
        other => try_open(false, multi).map(|d| (d, other)),
    }
}

/// Starts one packet worker per TUN queue. Returns what runs and one more handle on the
/// first worker's socket (for sends outside the packet loops, e.g. timers).
pub fn start<C: Codec>(
    devs: Vec<SyncDevice>,
    mode: Mode,
    bind: C::Addr,
    mtu: usize,
    codec: Arc<C>,
) -> io::Result<(Running, UdpSock)> {
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
    let sender = socks[0].try_clone()?;
    let want_steering = mode != Mode::Simple
        && queues > 1
        && steer::contiguous_cpus() == Some(queues)
        && std::env::var("FLANNEL_UDP_CPU_STEERING").as_deref() == Ok("1");
    if want_steering {
        let steered = steer::steer_tun_by_cpu(devs[0].as_raw_fd())
            .and_then(|_| steer::steer_reuseport_by_cpu(socks[0].as_raw_fd()));
        match steered {
            Ok(()) => running.cpu_steering = true,
            Err(e) => tracing::info!("CPU steering unavailable ({e}); using flow hashing"),
        }
    }
    for (q, (dev, sock)) in devs.into_iter().zip(socks).enumerate() {
        dev.set_nonblocking(true)?;
        let mut w = Worker::new(dev, sock, codec.clone(), mtu, mode, running, spin);
        let pin = running.cpu_steering;
        std::thread::Builder::new()
            .name(format!("tun-q{q}"))
            .spawn(move || {
                if pin {
                    if let Err(e) = steer::pin_current_thread(q) {
                        tracing::warn!("cannot pin worker {q} to CPU {q}: {e}");
                    }
                }
                w.run()
            })?;
    }
    Ok((running, sender))
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

/// Writes one packet to the TUN, with an empty virtio-net header when offloads are on.
fn write_tun(dev: &SyncDevice, vnet: bool, tmp: &mut Vec<u8>, pkt: &[u8]) {
    let r = if vnet {
        tmp.clear();
        tmp.resize(VIRTIO_NET_HDR_LEN, 0);
        tmp.extend_from_slice(pkt);
        dev.send(tmp)
    } else {
        dev.send(pkt)
    };
    if let Err(e) = r {
        tracing::debug!("TUN write: {e}");
    }
}

/// One TUN queue and its UDP socket, both directions, on one thread.
struct Worker<C: Codec> {
    dev: SyncDevice,
    sock: UdpSock,
    codec: Arc<C>,
    local: C::Local,
    mode: Mode,
    run: Running,
    spin_ns: u64,
    // TUN -> UDP
    orig: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    outs: Vec<Vec<u8>>,
    verdicts: Vec<Tx<C::Addr>>,
    tmp: Vec<u8>,
    out: MultiSend<C::Addr>,
    // UDP -> TUN
    rx: MultiRecv<C::Addr>,
    rx_out: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    gro_table: GROTable,
    /// Our own receive coalescing (else tun-rs's GRO table), `FLANNEL_UDP_RX_GRO=tun-rs` to
    /// compare.
    own_gro: bool,
    coalescer: gro::Coalescer,
    counters: crate::metrics::DatapathCounters,
}

impl<C: Codec> Worker<C> {
    fn new(
        dev: SyncDevice,
        sock: UdpSock,
        codec: Arc<C>,
        mtu: usize,
        mode: Mode,
        run: Running,
        spin_us: u64,
    ) -> Self {
        let offload = mode == Mode::Offload;
        let batch = if mode == Mode::Simple { 1 } else { TX_BATCH };
        let rx_size = if run.gro { 65_535 } else { mtu.max(1500) + 64 };
        let rx_batch = if mode == Mode::Simple { 1 } else { RX_BATCH };
        let out_len = if C::ROOM > 0 {
            (mtu + 64 + C::ROOM).max(256)
        } else {
            0
        };
        let local = codec.local();
        let family = sock.family();
        Worker {
            dev,
            sock,
            codec,
            local,
            mode,
            run,
            spin_ns: spin_us * 1000,
            orig: vec![0u8; VIRTIO_NET_HDR_LEN + 65_535],
            bufs: (0..batch).map(|_| vec![0u8; mtu + 64]).collect(),
            sizes: vec![0; batch],
            outs: (0..batch).map(|_| vec![0u8; out_len]).collect(),
            verdicts: vec![Tx::Drop; batch],
            tmp: Vec::with_capacity(VIRTIO_NET_HDR_LEN + 65_535),
            out: MultiSend::new(family),
            rx: MultiRecv::new(rx_batch, rx_size),
            rx_out: (0..if offload { RX_OUT } else { 0 })
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + 65_535))
                .collect(),
            scratch: vec![0u8; 65_535 + 256],
            gro_table: GROTable::new(),
            own_gro: std::env::var("FLANNEL_UDP_RX_GRO").as_deref() != Ok("tun-rs"),
            coalescer: gro::Coalescer::default(),
            counters: crate::metrics::metrics().datapath(C::NAME),
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
                    tracing::debug!("TUN read: {e}");
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
            let dev = &self.dev;
            let tmp = &mut self.tmp;
            let mut reply = |pkt: &[u8]| write_tun(dev, offload, tmp, pkt);
            self.codec.outbound(
                &mut self.local,
                &mut self.bufs[..n],
                &self.sizes[..n],
                &mut self.outs[..n],
                &mut self.verdicts[..n],
                &mut reply,
            );
        }
        let dropped = self.verdicts[..n]
            .iter()
            .filter(|v| matches!(v, Tx::Drop))
            .count();
        if dropped > 0 {
            self.counters.drop_no_peer.inc_by(dropped as u64);
        }
        let datagram = |i: usize| -> Option<(C::Addr, &[u8])> {
            match self.verdicts[i] {
                Tx::Drop => None,
                Tx::InPlace(p) => Some((p, &self.bufs[i][..self.sizes[i]])),
                Tx::Encoded(p, len) => Some((p, &self.outs[i][..len])),
            }
        };
        if self.mode == Mode::Simple {
            if let Some((peer, data)) = datagram(0) {
                match self.sock.send_to(data, peer) {
                    Ok(_) => {
                        self.counters.packets_out.inc();
                        self.counters.bytes_out.inc_by(data.len() as u64);
                    }
                    Err(e) => {
                        self.counters.drop_send.inc();
                        tracing::debug!("send to {peer}: {e}");
                    }
                }
            }
            return n;
        }
        let (mut sent, mut sent_bytes) = (0u64, 0u64);
        // Group consecutive equal-size datagrams to one peer into one UDP_SEGMENT send.
        let gso = self.run.gso;
        let mut segs: [&[u8]; MAX_GSO_SEGMENTS] = [&[]; MAX_GSO_SEGMENTS];
        let mut i = 0;
        while i < n {
            let Some((peer, first)) = datagram(i) else {
                i += 1;
                continue;
            };
            let mut nseg = 0;
            let size = first.len();
            let mut bytes = 0;
            let mut j = i;
            while j < n && (gso || j == i) && nseg < MAX_GSO_SEGMENTS {
                let Some((p, d)) = datagram(j) else { break };
                if p != peer || bytes + d.len() > MAX_GSO_BYTES || d.len() > size {
                    break;
                }
                segs[nseg] = d;
                nseg += 1;
                bytes += d.len();
                j += 1;
                if d.len() < size {
                    break; // a shorter segment must be the last one
                }
            }
            if self.out.push(peer, &segs[..nseg]) {
                sent += nseg as u64;
                sent_bytes += bytes as u64;
            } else {
                self.counters.drop_send.inc_by(nseg as u64);
            }
            i = j;
        }
        match self.out.flush(&self.sock) {
            Ok(_) => {
                self.counters.packets_out.inc_by(sent);
                self.counters.bytes_out.inc_by(sent_bytes);
            }
            Err(e) => {
                self.counters.drop_send.inc_by(sent);
                tracing::debug!("sendmmsg: {e}");
            }
        }
        n
    }

    /// Reads what the socket has, writes the packets to the TUN; returns the datagram count.
    fn pump_udp(&mut self) -> usize {
        let n = match self.rx.recv(&self.sock) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    tracing::debug!("recvmmsg: {e}");
                }
                return 0;
            }
        };
        let offload = self.mode == Mode::Offload;
        let Worker {
            dev,
            sock,
            codec,
            local,
            rx,
            rx_out,
            scratch,
            gro_table,
            tmp,
            counters,
            own_gro,
            coalescer,
            ..
        } = self;
        let own_gro = *own_gro;
        let mut datagrams = 0;
        let mut bytes = 0u64;
        let mut k = 0;
        for m in 0..n {
            let seg = rx.seg[m].max(1);
            let src = rx.source(m);
            let data = rx.buf(m);
            for chunk in data.chunks_mut(seg) {
                datagrams += 1;
                bytes += chunk.len() as u64;
                let mut emit = |e: Emit<'_, C::Addr>| match e {
                    Emit::Tun(pkt) => {
                        if !offload {
                            if let Err(e) = dev.send(pkt) {
                                counters.drop_tun.inc();
                                tracing::debug!("TUN write: {e}");
                            }
                            return;
                        }
                        if own_gro {
                            coalescer.push(pkt, &mut |b| {
                                if let Err(e) = dev.send(b) {
                                    counters.drop_tun.inc();
                                    tracing::debug!("TUN write: {e}");
                                }
                            });
                            return;
                        }
                        if k == rx_out.len() {
                            Self::flush_tun(dev, gro_table, &mut rx_out[..k], counters);
                            k = 0;
                        }
                        let b = &mut rx_out[k];
                        b.clear();
                        b.resize(VIRTIO_NET_HDR_LEN, 0);
                        b.extend_from_slice(pkt);
                        k += 1;
                    }
                    Emit::Net(to, d) => {
                        if let Err(e) = sock.send_to(d, to) {
                            tracing::debug!("send to {to}: {e}");
                        }
                    }
                };
                codec.inbound(local, src, chunk, scratch, &mut emit);
            }
        }
        let _ = tmp;
        if offload && k > 0 {
            Self::flush_tun(dev, gro_table, &mut rx_out[..k], counters);
        }
        if offload && own_gro {
            coalescer.flush(&mut |b| {
                if let Err(e) = dev.send(b) {
                    counters.drop_tun.inc();
                    tracing::debug!("TUN write: {e}");
                }
            });
        }
        counters.packets_in.inc_by(datagrams as u64);
        counters.bytes_in.inc_by(bytes);
        datagrams
    }

    /// Coalesces (GRO) and writes received packets to the TUN.
    fn flush_tun(
        dev: &SyncDevice,
        gro: &mut GROTable,
        bufs: &mut [Vec<u8>],
        counters: &crate::metrics::DatapathCounters,
    ) {
        if let Err(e) = dev.send_multiple(gro, bufs, VIRTIO_NET_HDR_LEN) {
            counters.drop_tun.inc_by(bufs.len() as u64);
            tracing::debug!("TUN write: {e}");
        }
    }
}

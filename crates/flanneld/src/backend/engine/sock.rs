//! The engine's UDP socket: batched system calls (recvmmsg/sendmmsg) and the kernel's UDP
//! segmentation offloads (UDP_SEGMENT to send many equal datagrams in one call, UDP_GRO to
//! receive them coalesced), each used only when the kernel accepts it.
//!
//! The address family is a type parameter ([`SockAddr`]): the udp backend (IPv4 only, as in
//! Go flannel) uses [`SocketAddrV4`] and plain `sockaddr_in`s, so it pays nothing for IPv6;
//! the wireguard backend uses [`SocketAddr`] on one dual-stack `[::]` socket, where IPv4
//! peers are IPv4-mapped IPv6 addresses inside the kernel and plain IPv4 addresses here.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Largest UDP payload the kernel coalesces or segments in one go.
pub const MAX_GSO_BYTES: usize = 65_000;
/// Kernel limit of segments per UDP_SEGMENT send.
pub const MAX_GSO_SEGMENTS: usize = 64;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
    sa
}

fn from_sockaddr_in(sa: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    )
}

fn sockaddr_in6(ip: Ipv6Addr, port: u16, flowinfo: u32, scope_id: u32) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_port = port.to_be();
    sa.sin6_flowinfo = flowinfo;
    sa.sin6_addr.s6_addr = ip.octets();
    sa.sin6_scope_id = scope_id;
    sa
}

/// A socket address type the engine can send to and receive from: the engine is generic over
/// it so that an IPv4-only user (udp) keeps fixed-size `sockaddr_in`s and no family checks on
/// its packet path, while wireguard gets both families.
pub trait SockAddr:
    Copy + PartialEq + Send + Sync + std::fmt::Display + std::fmt::Debug + 'static
{
    /// The C socket address stored per message (big enough for every family of the type).
    type Raw: Copy + Send + 'static;
    /// An all-zero C address (a receive buffer).
    fn raw_zeroed() -> Self::Raw;
    /// The C address for a socket of `family`, with its length; `None` when such a socket
    /// cannot reach this address (an IPv6 peer on an IPv4-only socket).
    fn to_raw(self, family: libc::c_int) -> Option<(Self::Raw, libc::socklen_t)>;
    /// The address the kernel wrote (IPv4-mapped IPv6 addresses come back as IPv4).
    fn from_raw(raw: &Self::Raw) -> Self;
    /// The family of a socket bound to this address.
    fn family(self) -> libc::c_int;
    /// What to bind instead when the kernel has no IPv6 at all (`[::]:p` -> `0.0.0.0:p`).
    fn v4_fallback(self) -> Option<Self> {
        None
    }
}

impl SockAddr for SocketAddrV4 {
    type Raw = libc::sockaddr_in;

    fn raw_zeroed() -> libc::sockaddr_in {
        // SAFETY: plain data; all-zero is a valid value.
        unsafe { zeroed() }
    }

    #[inline]
    fn to_raw(self, _family: libc::c_int) -> Option<(libc::sockaddr_in, libc::socklen_t)> {
        Some((
            sockaddr_in(self),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ))
    }

    #[inline]
    fn from_raw(raw: &libc::sockaddr_in) -> Self {
        from_sockaddr_in(raw)
    }

    fn family(self) -> libc::c_int {
        libc::AF_INET
    }
}

impl SockAddr for SocketAddr {
    /// A `sockaddr_in6`, which also holds a `sockaddr_in` (on a socket that fell back to IPv4).
    type Raw = libc::sockaddr_in6;

    fn raw_zeroed() -> libc::sockaddr_in6 {
        // SAFETY: plain data; all-zero is a valid value.
        unsafe { zeroed() }
    }

    fn to_raw(self, family: libc::c_int) -> Option<(libc::sockaddr_in6, libc::socklen_t)> {
        let len6 = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        match (self, family) {
            (SocketAddr::V6(a), libc::AF_INET6) => Some((
                sockaddr_in6(*a.ip(), a.port(), a.flowinfo(), a.scope_id()),
                len6,
            )),
            (SocketAddr::V4(a), libc::AF_INET6) => {
                Some((sockaddr_in6(a.ip().to_ipv6_mapped(), a.port(), 0, 0), len6))
            }
            (SocketAddr::V4(a), _) => {
                let mut raw = Self::raw_zeroed();
                let sin = sockaddr_in(a);
                // SAFETY: sockaddr_in (16 bytes) fits in sockaddr_in6 (28 bytes); both are
                // plain data and the kernel reads it as sockaddr_in by its family.
                unsafe {
                    std::ptr::write_unaligned(&mut raw as *mut _ as *mut libc::sockaddr_in, sin)
                };
                Some((raw, size_of::<libc::sockaddr_in>() as libc::socklen_t))
            }
            (SocketAddr::V6(_), _) => None,
        }
    }

    fn from_raw(raw: &libc::sockaddr_in6) -> Self {
        if raw.sin6_family == libc::AF_INET as libc::sa_family_t {
            // SAFETY: the kernel wrote a sockaddr_in (its family says so), which is smaller.
            let sin =
                unsafe { std::ptr::read_unaligned(raw as *const _ as *const libc::sockaddr_in) };
            return SocketAddr::V4(from_sockaddr_in(&sin));
        }
        let ip = Ipv6Addr::from(raw.sin6_addr.s6_addr);
        let port = u16::from_be(raw.sin6_port);
        match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
            None => SocketAddr::V6(SocketAddrV6::new(
                ip,
                port,
                raw.sin6_flowinfo,
                raw.sin6_scope_id,
            )),
        }
    }

    fn family(self) -> libc::c_int {
        match self {
            SocketAddr::V4(_) => libc::AF_INET,
            SocketAddr::V6(_) => libc::AF_INET6,
        }
    }

    fn v4_fallback(self) -> Option<Self> {
        match self {
            SocketAddr::V6(a) if a.ip().is_unspecified() => Some(SocketAddr::V4(
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, a.port()),
            )),
            _ => None,
        }
    }
}

fn unreachable_family(dst: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        format!("{dst}: the socket is IPv4 only (the kernel has no IPv6)"),
    )
}

/// A bound UDP socket (IPv4, or dual-stack IPv6).
pub struct UdpSock {
    fd: OwnedFd,
    family: libc::c_int,
}

impl AsRawFd for UdpSock {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl UdpSock {
    /// Binds `addr`; with `reuse_port` several sockets (one per worker) share the port and the
    /// kernel spreads incoming flows over them. An IPv6 socket is dual-stack (IPV6_V6ONLY off,
    /// whatever `net.ipv6.bindv6only` says), so `[::]:port` serves IPv4 peers as well, as the
    /// kernel's WireGuard does with its two sockets. On a kernel without IPv6, `[::]:port`
    /// becomes `0.0.0.0:port`.
    pub fn bind<A: SockAddr>(addr: A, reuse_port: bool) -> io::Result<Self> {
        match Self::bind_family(addr, reuse_port) {
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => match addr.v4_fallback() {
                Some(v4) => {
                    tracing::warn!("no IPv6 in this kernel ({e}); binding {v4} instead of {addr}");
                    Self::bind_family(v4, reuse_port)
                }
                None => Err(e),
            },
            r => r,
        }
    }

    fn bind_family<A: SockAddr>(addr: A, reuse_port: bool) -> io::Result<Self> {
        let family = addr.family();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = check(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: fd is a fresh, owned descriptor.
        let sock = UdpSock {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            family,
        };
        if family == libc::AF_INET6 {
            sock.setsockopt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
        }
        if reuse_port {
            sock.setsockopt(libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        }
        let _ = sock.setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
        let _ = sock.setsockopt(libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20);
        let (sa, len) = addr
            .to_raw(family)
            .ok_or_else(|| unreachable_family(addr))?;
        // SAFETY: sa is a valid socket address of `len` bytes for the duration of the call.
        check(unsafe {
            libc::bind(
                sock.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                len,
            )
        })?;
        Ok(sock)
    }

    /// The socket's address family (`AF_INET` or `AF_INET6`).
    pub fn family(&self) -> libc::c_int {
        self.family
    }

    /// The address the socket is bound to (e.g. to learn an ephemeral port).
    pub fn local_addr<A: SockAddr>(&self) -> io::Result<A> {
        let mut raw = A::raw_zeroed();
        let mut len = size_of::<A::Raw>() as libc::socklen_t;
        // SAFETY: raw is writable for len bytes; the kernel writes at most that much.
        check(unsafe {
            libc::getsockname(
                self.as_raw_fd(),
                &mut raw as *mut _ as *mut libc::sockaddr,
                &mut len,
            )
        })?;
        Ok(A::from_raw(&raw))
    }

    fn setsockopt(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        value: libc::c_int,
    ) -> io::Result<()> {
        // SAFETY: value lives across the call; the length matches its type.
        check(unsafe {
            libc::setsockopt(
                self.as_raw_fd(),
                level,
                name,
                &value as *const _ as *const libc::c_void,
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
        .map(|_| ())
    }

    /// Asks the kernel to coalesce received datagrams (UDP GRO); `false` if unsupported.
    pub fn enable_gro(&self) -> bool {
        self.setsockopt(SOL_UDP, UDP_GRO, 1).is_ok()
    }

    /// Whether UDP_SEGMENT (send-side segmentation) is available.
    pub fn gso_supported(&self) -> bool {
        self.setsockopt(SOL_UDP, UDP_SEGMENT, 0).is_ok()
    }

    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(UdpSock {
            fd: self.fd.try_clone()?,
            family: self.family,
        })
    }

    /// Sends one datagram.
    pub fn send_to<A: SockAddr>(&self, buf: &[u8], dst: A) -> io::Result<usize> {
        let (sa, len) = dst
            .to_raw(self.family)
            .ok_or_else(|| unreachable_family(dst))?;
        // SAFETY: buf and sa are valid for the call; len is sa's length.
        let n = unsafe {
            libc::sendto(
                self.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                len,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Receives one datagram without blocking (`WouldBlock` when none is queued).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                self.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Reusable state for receiving many (possibly GRO-coalesced) datagrams in one recvmmsg.
pub struct MultiRecv<A: SockAddr = SocketAddrV4> {
    bufs: Vec<Vec<u8>>,
    iovs: Vec<libc::iovec>,
    names: Vec<A::Raw>,
    ctrl: Vec<[u64; 8]>,
    hdrs: Vec<libc::mmsghdr>,
    /// Bytes received per message.
    pub lens: Vec<usize>,
    /// Segment size per message (the GRO size, or the length when not coalesced).
    pub seg: Vec<usize>,
}

// The raw pointers in the headers point into this struct's own heap buffers.
unsafe impl<A: SockAddr> Send for MultiRecv<A> {}

impl<A: SockAddr> MultiRecv<A> {
    /// Room for `batch` messages of up to `size` bytes each.
    pub fn new(batch: usize, size: usize) -> Self {
        let mut r = MultiRecv {
            bufs: (0..batch).map(|_| vec![0u8; size]).collect(),
            // SAFETY: these C structs are plain data; zero is valid and every pointer is set
            // before use.
            iovs: vec![unsafe { zeroed() }; batch],
            names: vec![A::raw_zeroed(); batch],
            ctrl: vec![[0u64; 8]; batch],
            hdrs: vec![unsafe { zeroed() }; batch],
            lens: vec![0; batch],
            seg: vec![0; batch],
        };
        for i in 0..batch {
            r.iovs[i].iov_base = r.bufs[i].as_mut_ptr() as *mut libc::c_void;
            r.iovs[i].iov_len = r.bufs[i].len();
        }
        r
    }

    /// Received message `i`.
    pub fn buf(&mut self, i: usize) -> &mut [u8] {
        let n = self.lens[i];
        &mut self.bufs[i][..n]
    }

    /// Sender of message `i`.
    pub fn source(&self, i: usize) -> A {
        A::from_raw(&self.names[i])
    }

    /// Takes whatever is queued, without blocking (`WouldBlock` when nothing is); returns how
    /// many messages.
    pub fn recv(&mut self, sock: &UdpSock) -> io::Result<usize> {
        let batch = self.bufs.len();
        for i in 0..batch {
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = &mut self.names[i] as *mut _ as *mut libc::c_void;
            h.msg_namelen = size_of::<A::Raw>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = size_of::<[u64; 8]>();
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at live buffers owned by self.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                batch as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            let len = self.hdrs[i].msg_len as usize;
            self.lens[i] = len;
            self.seg[i] = gro_size(&self.hdrs[i].msg_hdr).unwrap_or(len);
        }
        Ok(n)
    }
}

fn gro_size(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: the control buffer was filled by the kernel; CMSG_* walk it within its length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                return (v > 0).then_some(v as usize);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Reusable state for sending many datagrams (each group optionally one UDP_SEGMENT send) in
/// one sendmmsg.
pub struct MultiSend<A: SockAddr = SocketAddrV4> {
    iovs: Vec<libc::iovec>,
    /// Destination and its length per message.
    names: Vec<(A::Raw, libc::socklen_t)>,
    /// The family of the socket the messages go out on.
    family: libc::c_int,
    ctrl: Vec<[u64; 4]>,
    hdrs: Vec<libc::mmsghdr>,
    /// (first iov, iov count, segment size) per message.
    msgs: Vec<(usize, usize, usize)>,
}

unsafe impl<A: SockAddr> Send for MultiSend<A> {}

impl<A: SockAddr> MultiSend<A> {
    /// Empty state for a socket of `family` ([`UdpSock::family`]); vectors grow to the largest
    /// batch once and are reused.
    pub fn new(family: libc::c_int) -> Self {
        MultiSend {
            iovs: Vec::with_capacity(256),
            names: Vec::with_capacity(256),
            family,
            ctrl: Vec::with_capacity(256),
            hdrs: Vec::with_capacity(256),
            msgs: Vec::with_capacity(256),
        }
    }

    /// Forgets the queued messages.
    pub fn clear(&mut self) {
        self.iovs.clear();
        self.names.clear();
        self.msgs.clear();
    }

    /// Number of queued messages.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Queues `segments` (each one datagram) for `dst`; more than one segment is sent with
    /// UDP_SEGMENT = the first segment's size (the caller guarantees equal sizes, except a
    /// shorter last one). The slices must stay valid until [`Self::flush`]. Returns `false`
    /// (nothing queued) when the socket cannot reach `dst` (IPv6 on an IPv4-only socket).
    pub fn push(&mut self, dst: A, segments: &[&[u8]]) -> bool {
        let Some(name) = dst.to_raw(self.family) else {
            return false;
        };
        let first = self.iovs.len();
        for s in segments {
            self.iovs.push(libc::iovec {
                iov_base: s.as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            });
        }
        self.names.push(name);
        let seg = if segments.len() > 1 {
            segments[0].len()
        } else {
            0
        };
        self.msgs.push((first, segments.len(), seg));
        true
    }

    /// Sends everything queued; returns the number of messages the kernel took.
    pub fn flush(&mut self, sock: &UdpSock) -> io::Result<usize> {
        let n = self.msgs.len();
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: plain data structs, fully initialised below.
        self.hdrs.resize(n, unsafe { zeroed() });
        self.ctrl.resize(n, [0u64; 4]);
        for (i, &(first, count, seg)) in self.msgs.iter().enumerate() {
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = &mut self.names[i].0 as *mut _ as *mut libc::c_void;
            h.msg_namelen = self.names[i].1;
            h.msg_iov = &mut self.iovs[first];
            h.msg_iovlen = count;
            h.msg_flags = 0;
            if seg > 0 {
                h.msg_control = self.ctrl[i].as_mut_ptr() as *mut libc::c_void;
                // SAFETY: CMSG_SPACE of a u16 fits in the 32-byte control buffer.
                unsafe {
                    h.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg as u16);
                }
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
            self.hdrs[i].msg_len = 0;
        }
        let mut sent = 0;
        let mut first_error = None;
        while sent < n {
            // SAFETY: headers point at buffers the caller keeps alive until flush returns.
            let r = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    self.hdrs[sent..].as_mut_ptr(),
                    (n - sent) as libc::c_uint,
                    0,
                )
            };
            if r < 0 {
                // Skip the message the kernel refused and carry on with the rest.
                first_error.get_or_insert(io::Error::last_os_error());
                sent += 1;
                continue;
            }
            if r == 0 {
                break;
            }
            sent += r as usize;
        }
        self.clear();
        match first_error {
            Some(e) => Err(e),
            None => Ok(sent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_peers_are_v4_mapped_on_a_dual_stack_socket_and_plain_v4_here() {
        let v4: SocketAddr = "192.168.100.12:51820".parse().unwrap();
        let (raw, len) = v4.to_raw(libc::AF_INET6).unwrap();
        assert_eq!(len as usize, size_of::<libc::sockaddr_in6>());
        assert_eq!(
            Ipv6Addr::from(raw.sin6_addr.s6_addr),
            "::ffff:192.168.100.12".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(SocketAddr::from_raw(&raw), v4);
        // On an IPv4 socket (kernel without IPv6): a sockaddr_in inside the same storage.
        let (raw, len) = v4.to_raw(libc::AF_INET).unwrap();
        assert_eq!(len as usize, size_of::<libc::sockaddr_in>());
        assert_eq!(SocketAddr::from_raw(&raw), v4);
        let v6: SocketAddr = "[fd00:100::12]:51821".parse().unwrap();
        assert_eq!(
            SocketAddr::from_raw(&v6.to_raw(libc::AF_INET6).unwrap().0),
            v6
        );
        assert!(v6.to_raw(libc::AF_INET).is_none());
        assert_eq!(
            v6.v4_fallback(),
            None,
            "only the wildcard falls back to IPv4"
        );
        let any: SocketAddr = "[::]:51820".parse().unwrap();
        assert_eq!(any.v4_fallback(), Some("0.0.0.0:51820".parse().unwrap()));
    }

    /// Loopback only: a socket, no links, addresses or routes.
    #[test]
    fn one_dual_stack_socket_receives_both_families_batched() {
        let any: SocketAddr = "[::]:0".parse().unwrap();
        let sock = match UdpSock::bind(any, false) {
            Ok(s) => s,
            Err(e) => panic!("bind {any}: {e}"),
        };
        let port = sock.local_addr::<SocketAddr>().unwrap().port();
        let to4: SocketAddr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        let to6: SocketAddr = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port);
        let from4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let from6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
        from4.send_to(b"four", to4).unwrap();
        from6.send_to(b"six", to6).unwrap();
        let mut rx: MultiRecv<SocketAddr> = MultiRecv::new(4, 2048);
        let mut got = vec![];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 2 && std::time::Instant::now() < deadline {
            if let Ok(n) = rx.recv(&sock) {
                for i in 0..n {
                    got.push((rx.source(i), rx.buf(i).to_vec()));
                }
            }
        }
        got.sort_by_key(|(_, d)| d.len());
        assert_eq!(
            got,
            vec![
                (from6.local_addr().unwrap(), b"six".to_vec()),
                (from4.local_addr().unwrap(), b"four".to_vec()),
            ]
        );
        // And back to both, in one sendmmsg.
        let mut tx: MultiSend<SocketAddr> = MultiSend::new(sock.family());
        let (a, b) = (from4.local_addr().unwrap(), from6.local_addr().unwrap());
        assert!(tx.push(a, &[b"to-four"]));
        assert!(tx.push(b, &[b"to-six"]));
        assert_eq!(tx.flush(&sock).unwrap(), 2);
        let mut buf = [0u8; 64];
        let (n, src) = from4.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], src), (&b"to-four"[..], to4));
        let (n, src) = from6.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], src.port()), (&b"to-six"[..], port));
    }
}

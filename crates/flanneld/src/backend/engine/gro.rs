//! Receive-side TCP coalescing for the TUN device (what the kernel's GRO does for a NIC).
//!
//! Consecutive in-order segments of one TCP flow (IPv4 or IPv6) are merged into one
//! super-packet and written to the TUN with a virtio-net header asking the kernel to treat it as
//! GSO TCPv4 (TCPv6) with a partial checksum, so the stack handles 64 KB at a time. Each packet is copied once, into its
//! flow's buffer: no allocation per packet, and no checksum computation (the inner checksum was
//! valid when sent; the outer UDP checksum, or WireGuard's AEAD, covered the trip).
//!
//! Rules (those of Linux's `tcp_gro_receive`): IPv4 without options, DF set, not a fragment, or
//! IPv6 without extension headers; same addresses, ports, TOS, TTL (traffic class, flow label,
//! hop limit), acknowledgement number, window, data offset and options;
//! only ACK (and PSH, which ends the super-packet) set; the sequence number continues the flow;
//! every segment but the last has the first one's size; at most 64 KB in all.

use tun_rs::VIRTIO_NET_HDR_LEN;

/// Flows coalesced at once per worker; a new flow beyond that flushes the oldest.
const MAX_FLOWS: usize = 8;
/// The largest IPv4 packet.
const MAX_PACKET: usize = 65_535;
/// A flow buffer: the virtio-net header and the largest IPv6 super-packet (header + 64 KB).
const MAX_BUF: usize = VIRTIO_NET_HDR_LEN + 40 + MAX_PACKET;

const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// A flow's key: IP version, addresses, ports (IPv4 uses the first 13 bytes, the rest is 0).
type Key = [u8; 37];
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// One flow being coalesced: `buf` is a virtio-net header followed by the super-packet.
struct Flow {
    key: Key,
    buf: Vec<u8>,
    /// IP header length: 20 (IPv4) or 40 (IPv6).
    ip_len: usize,
    /// IP + TCP header length.
    hdr_len: usize,
    /// Payload size of the first segment (the GSO size).
    mss: usize,
    next_seq: u32,
    segments: u16,
}

/// The coalescer of one worker; reused for every batch.
pub struct Coalescer {
    flows: Vec<Flow>,
    spare: Vec<Vec<u8>>,
    single: Vec<u8>,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            flows: Vec::with_capacity(MAX_FLOWS),
            spare: (0..MAX_FLOWS)
                .map(|_| Vec::with_capacity(MAX_BUF))
                .collect(),
            single: Vec::with_capacity(MAX_BUF),
        }
    }
}

/// What the coalescer needs to know of a TCP segment.
struct Segment {
    key: Key,
    ip_len: usize,
    hdr_len: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

/// The flow key of an IPv4 or IPv6 packet with `ip_len` bytes of IP header (ports are read
/// from just after it, whatever the protocol).
#[inline]
fn flow_key(pkt: &[u8], ip_len: usize) -> Option<Key> {
    let mut key = [0u8; 37];
    key[0] = pkt[0] >> 4;
    let (addrs, n) = if ip_len == 20 {
        (pkt.get(12..20)?, 8)
    } else {
        (pkt.get(8..40)?, 32)
    };
    key[1..1 + n].copy_from_slice(addrs);
    key[1 + n..5 + n].copy_from_slice(pkt.get(ip_len..ip_len + 4)?);
    Some(key)
}

/// Parses `pkt` if it is an IPv4 or IPv6 TCP segment that may be coalesced.
fn segment(pkt: &[u8]) -> Option<Segment> {
    let ip_len = match pkt.first()? {
        0x45 => {
            if pkt.len() < 40 || pkt[9] != 6 {
                return None;
            }
            let total = u16::from_be_bytes([pkt[2], pkt[3]]) as usize;
            // DF set, MF clear, offset 0.
            if total != pkt.len() || pkt[6] & 0x7f != 0x40 || pkt[7] != 0 {
                return None;
            }
            20
        }
        b if b >> 4 == 6 => {
            // Next header TCP (no extension headers), payload length consistent.
            if pkt.len() < 60
                || pkt[6] != 6
                || u16::from_be_bytes([pkt[4], pkt[5]]) as usize != pkt.len() - 40
            {
                return None;
            }
            40
        }
        _ => return None,
    };
    let t = &pkt[ip_len..];
    let doff = (t[12] >> 4) as usize * 4;
    if doff < 20 || ip_len + doff > pkt.len() {
        return None;
    }
    let flags = t[13];
    let payload = pkt.len() - ip_len - doff;
    if payload == 0 || flags & !(TCP_ACK | TCP_PSH) != 0 || flags & TCP_ACK == 0 {
        return None;
    }
    Some(Segment {
        key: flow_key(pkt, ip_len)?,
        ip_len,
        hdr_len: ip_len + doff,
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        flags,
        payload,
    })
}

impl Flow {
    fn packet(&self) -> &[u8] {
        &self.buf[VIRTIO_NET_HDR_LEN..]
    }

    /// Whether `pkt` (parsed as `s`) continues this flow (same key, hence same family).
    fn accepts(&self, pkt: &[u8], s: &Segment) -> bool {
        let first = self.packet();
        let ip = self.ip_len;
        let same_ip = if ip == 20 {
            // TOS, and TTL (protocol already equal)
            pkt[1] == first[1] && pkt[8] == first[8]
        } else {
            // traffic class and flow label, hop limit
            pkt[..4] == first[..4] && pkt[7] == first[7]
        };
        s.hdr_len == self.hdr_len
            && s.seq == self.next_seq
            && s.payload <= self.mss
            && first.len() + s.payload <= self.max_len()
            && self.segments < u16::MAX
            && same_ip
            // acknowledgement number, data offset, flags but PSH, window
            && pkt[ip + 8..ip + 12] == first[ip + 8..ip + 12]
            && pkt[ip + 12] == first[ip + 12]
            && pkt[ip + 13] & !TCP_PSH == first[ip + 13] & !TCP_PSH
            && pkt[ip + 14..ip + 16] == first[ip + 14..ip + 16]
            // options
            && pkt[ip + 20..s.hdr_len] == first[ip + 20..self.hdr_len]
    }

    /// The largest super-packet: its IP length field is 16 bits (IPv4: the whole packet,
    /// IPv6: the payload).
    fn max_len(&self) -> usize {
        if self.ip_len == 20 {
            MAX_PACKET
        } else {
            MAX_PACKET + 40
        }
    }
}

/// RFC 1071 sum of 16-bit words, not yet folded.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u32::from(*b) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

impl Coalescer {
    /// Takes one packet bound for the TUN; `write` receives finished buffers (virtio-net header
    /// + packet) to write to the TUN.
    pub fn push(&mut self, pkt: &[u8], write: &mut dyn FnMut(&[u8])) {
        let Some(s) = segment(pkt) else {
            // Not coalescable: whatever its flow holds goes first, to keep the order.
            if !self.flows.is_empty() {
                let key = match pkt.first().map(|b| b >> 4) {
                    Some(4) => flow_key(pkt, (pkt[0] & 0xf) as usize * 4),
                    Some(6) => flow_key(pkt, 40),
                    _ => None,
                };
                if let Some(key) = key {
                    self.flush_key(&key, write);
                }
            }
            self.write_single(pkt, write);
            return;
        };
        if let Some(i) = self.flows.iter().position(|f| f.key == s.key) {
            if self.flows[i].accepts(pkt, &s) {
                let f = &mut self.flows[i];
                f.buf.extend_from_slice(&pkt[s.hdr_len..]);
                f.next_seq = s.seq.wrapping_add(s.payload as u32);
                f.segments += 1;
                if s.flags & TCP_PSH != 0 {
                    f.buf[VIRTIO_NET_HDR_LEN + f.ip_len + 13] |= TCP_PSH;
                }
                if s.flags & TCP_PSH != 0 || s.payload < f.mss {
                    self.flush_at(i, write);
                }
                return;
            }
            self.flush_at(i, write);
        }
        if s.flags & TCP_PSH != 0 {
            self.write_single(pkt, write);
            return;
        }
        if self.flows.len() == MAX_FLOWS {
            self.flush_at(0, write);
        }
        let mut buf = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(MAX_BUF));
        buf.clear();
        buf.resize(VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(pkt);
        self.flows.push(Flow {
            key: s.key,
            buf,
            ip_len: s.ip_len,
            hdr_len: s.hdr_len,
            mss: s.payload,
            next_seq: s.seq.wrapping_add(s.payload as u32),
            segments: 1,
        });
    }

    /// Writes out every flow (end of a batch).
    pub fn flush(&mut self, write: &mut dyn FnMut(&[u8])) {
        while !self.flows.is_empty() {
            self.flush_at(0, write);
        }
    }

    fn flush_key(&mut self, key: &Key, write: &mut dyn FnMut(&[u8])) {
        if let Some(i) = self.flows.iter().position(|f| f.key == *key) {
            self.flush_at(i, write);
        }
    }

    fn write_single(&mut self, pkt: &[u8], write: &mut dyn FnMut(&[u8])) {
        self.single.clear();
        self.single.resize(VIRTIO_NET_HDR_LEN, 0);
        self.single.extend_from_slice(pkt);
        write(&self.single);
    }

    fn flush_at(&mut self, i: usize, write: &mut dyn FnMut(&[u8])) {
        let mut f = self.flows.remove(i);
        if f.segments > 1 {
            let (hdr_len, mss, ip) = (f.hdr_len, f.mss, f.ip_len);
            let p = &mut f.buf[VIRTIO_NET_HDR_LEN..];
            let total = p.len();
            let tcp_len = (total - ip) as u32;
            let (gso, addrs) = if ip == 20 {
                p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                p[10..12].copy_from_slice(&[0, 0]);
                let ip_sum = !fold(sum16(&p[..20], 0));
                p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
                (VIRTIO_NET_HDR_GSO_TCPV4, 12..20)
            } else {
                p[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
                (VIRTIO_NET_HDR_GSO_TCPV6, 8..40)
            };
            // CHECKSUM_PARTIAL: the TCP checksum field holds the folded pseudo-header sum.
            let pseudo = fold(sum16(&p[addrs], 6 + tcp_len));
            p[ip + 16..ip + 18].copy_from_slice(&pseudo.to_be_bytes());
            let h = &mut f.buf[..VIRTIO_NET_HDR_LEN];
            h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            h[1] = gso;
            h[2..4].copy_from_slice(&(hdr_len as u16).to_le_bytes());
            h[4..6].copy_from_slice(&(mss as u16).to_le_bytes());
            h[6..8].copy_from_slice(&(ip as u16).to_le_bytes());
            h[8..10].copy_from_slice(&16u16.to_le_bytes());
        }
        write(&f.buf);
        self.spare.push(f.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP segment 10.0.0.1:1000 -> 10.0.0.2:2000 with a valid checksum.
    fn tcp(seq: u32, payload: &[u8], flags: u8, opts: &[u8]) -> Vec<u8> {
        let doff = 20 + opts.len();
        let total = 20 + doff + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let ip_sum = !fold(sum16(&p[..20], 0));
        p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        p[20..22].copy_from_slice(&1000u16.to_be_bytes());
        p[22..24].copy_from_slice(&2000u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&7u32.to_be_bytes());
        p[32] = ((doff / 4) as u8) << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&500u16.to_be_bytes());
        p[40..doff + 20].copy_from_slice(opts);
        p[20 + doff..].copy_from_slice(payload);
        let tcp_len = (total - 20) as u32;
        let sum = !fold(sum16(&p[20..], sum16(&p[12..20], 6 + tcp_len)));
        p[36..38].copy_from_slice(&sum.to_be_bytes());
        p
    }

    fn run(pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut c = Coalescer::default();
        let mut out = vec![];
        for p in pkts {
            c.push(p, &mut |b| out.push(b.to_vec()));
        }
        c.flush(&mut |b| out.push(b.to_vec()));
        out
    }

    #[test]
    fn in_order_segments_become_one_gso_packet_with_a_partial_checksum() {
        let a = [1u8; 100];
        let b = [2u8; 100];
        let c = [3u8; 40];
        let out = run(&[
            tcp(1, &a, TCP_ACK, &[]),
            tcp(101, &b, TCP_ACK, &[]),
            tcp(201, &c, TCP_ACK | TCP_PSH, &[]),
        ]);
        assert_eq!(out.len(), 1);
        let (h, p) = out[0].split_at(VIRTIO_NET_HDR_LEN);
        assert_eq!(h[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(h[1], VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(u16::from_le_bytes([h[2], h[3]]), 40);
        assert_eq!(u16::from_le_bytes([h[4], h[5]]), 100);
        assert_eq!(u16::from_le_bytes([h[6], h[7]]), 20);
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16);
        assert_eq!(p.len(), 40 + 240);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
        assert_eq!(fold(sum16(&p[..20], 0)), 0xffff, "IP header checksum valid");
        assert_eq!(p[33], TCP_ACK | TCP_PSH);
        assert_eq!(&p[40..140], &a[..]);
        assert_eq!(&p[240..], &c[..]);
        // Completing the partial checksum over the TCP part gives a valid segment.
        let mut q = p.to_vec();
        let partial = u16::from_be_bytes([q[36], q[37]]);
        q[36..38].copy_from_slice(&[0, 0]);
        let full = !fold(sum16(&q[20..], u32::from(partial)));
        q[36..38].copy_from_slice(&full.to_be_bytes());
        let tcp_len = (q.len() - 20) as u32;
        assert_eq!(
            fold(sum16(&q[20..], sum16(&q[12..20], 6 + tcp_len))),
            0xffff
        );
    }

    #[test]
    fn gaps_other_flags_and_differing_options_are_not_merged() {
        let d = [9u8; 50];
        // A sequence gap.
        assert_eq!(
            run(&[tcp(1, &d, TCP_ACK, &[]), tcp(500, &d, TCP_ACK, &[])]).len(),
            2
        );
        // A FIN is passed on alone, after what was pending.
        let out = run(&[tcp(1, &d, TCP_ACK, &[]), tcp(51, &d, TCP_ACK | 0x01, &[])]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1][VIRTIO_NET_HDR_LEN + 33], TCP_ACK | 0x01);
        // Different timestamps.
        let ts1 = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0];
        let ts2 = [1, 1, 8, 10, 0, 0, 0, 2, 0, 0, 0, 0];
        assert_eq!(
            run(&[tcp(1, &d, TCP_ACK, &ts1), tcp(51, &d, TCP_ACK, &ts2)]).len(),
            2
        );
        assert_eq!(
            run(&[tcp(1, &d, TCP_ACK, &ts1), tcp(51, &d, TCP_ACK, &ts1)]).len(),
            1
        );
        // A bigger segment after a smaller one.
        assert_eq!(
            run(&[tcp(1, &d[..10], TCP_ACK, &[]), tcp(11, &d, TCP_ACK, &[])]).len(),
            2
        );
        // Non-TCP passes through unchanged, with an empty header.
        let mut udp = tcp(1, &d, TCP_ACK, &[]);
        udp[9] = 17;
        let out = run(std::slice::from_ref(&udp));
        assert_eq!(&out[0][..VIRTIO_NET_HDR_LEN], &[0u8; VIRTIO_NET_HDR_LEN]);
        assert_eq!(&out[0][VIRTIO_NET_HDR_LEN..], &udp[..]);
    }

    /// An IPv6 TCP segment fc00::1:1000 -> fc00::2:2000 with a valid checksum.
    fn tcp6(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
        let total = 40 + 20 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        p[6] = 6;
        p[7] = 64;
        p[8..10].copy_from_slice(&[0xfc, 0]);
        p[23] = 1;
        p[24..26].copy_from_slice(&[0xfc, 0]);
        p[39] = 2;
        p[40..42].copy_from_slice(&1000u16.to_be_bytes());
        p[42..44].copy_from_slice(&2000u16.to_be_bytes());
        p[44..48].copy_from_slice(&seq.to_be_bytes());
        p[48..52].copy_from_slice(&7u32.to_be_bytes());
        p[52] = 5 << 4;
        p[53] = flags;
        p[54..56].copy_from_slice(&500u16.to_be_bytes());
        p[60..].copy_from_slice(payload);
        let sum = !fold(sum16(&p[40..], sum16(&p[8..40], 6 + (total - 40) as u32)));
        p[56..58].copy_from_slice(&sum.to_be_bytes());
        p
    }

    #[test]
    fn ipv6_segments_become_one_gso_tcpv6_packet_with_a_partial_checksum() {
        let a = [1u8; 100];
        let b = [2u8; 100];
        let c = [3u8; 40];
        let out = run(&[
            tcp6(1, &a, TCP_ACK),
            tcp6(101, &b, TCP_ACK),
            tcp6(201, &c, TCP_ACK | TCP_PSH),
        ]);
        assert_eq!(out.len(), 1);
        let (h, p) = out[0].split_at(VIRTIO_NET_HDR_LEN);
        assert_eq!(h[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(h[1], VIRTIO_NET_HDR_GSO_TCPV6);
        assert_eq!(u16::from_le_bytes([h[2], h[3]]), 60, "header length");
        assert_eq!(u16::from_le_bytes([h[4], h[5]]), 100, "MSS");
        assert_eq!(u16::from_le_bytes([h[6], h[7]]), 40, "checksum start");
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16, "checksum offset");
        assert_eq!(p.len(), 60 + 240);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]) as usize, p.len() - 40);
        assert_eq!(p[53], TCP_ACK | TCP_PSH);
        assert_eq!(&p[60..160], &a[..]);
        assert_eq!(&p[260..], &c[..]);
        let mut q = p.to_vec();
        let partial = u16::from_be_bytes([q[56], q[57]]);
        q[56..58].copy_from_slice(&[0, 0]);
        let full = !fold(sum16(&q[40..], u32::from(partial)));
        q[56..58].copy_from_slice(&full.to_be_bytes());
        let tcp_len = (q.len() - 40) as u32;
        assert_eq!(fold(sum16(&q[40..], sum16(&q[8..40], 6 + tcp_len))), 0xffff);
        // A different hop limit, a gap, or an extension header: not merged.
        let mut other = tcp6(101, &b, TCP_ACK);
        other[7] = 63;
        assert_eq!(run(&[tcp6(1, &a, TCP_ACK), other]).len(), 2);
        assert_eq!(
            run(&[tcp6(1, &a, TCP_ACK), tcp6(500, &b, TCP_ACK)]).len(),
            2
        );
        let mut ext = tcp6(1, &a, TCP_ACK);
        ext[6] = 0;
        let out = run(std::slice::from_ref(&ext));
        assert_eq!(&out[0][VIRTIO_NET_HDR_LEN..], &ext[..]);
        // IPv4 and IPv6 flows side by side keep their own order.
        let out = run(&[
            tcp6(1, &a, TCP_ACK),
            tcp(1, &a, TCP_ACK, &[]),
            tcp6(101, &b, TCP_ACK),
            tcp(101, &b, TCP_ACK, &[]),
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0][VIRTIO_NET_HDR_LEN] >> 4, 6);
        assert_eq!(out[0].len(), VIRTIO_NET_HDR_LEN + 60 + 200);
        assert_eq!(out[1].len(), VIRTIO_NET_HDR_LEN + 40 + 200);
    }

    #[test]
    fn a_single_segment_is_written_unchanged() {
        let p = tcp(1, &[5u8; 70], TCP_ACK, &[]);
        let out = run(std::slice::from_ref(&p));
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0][..VIRTIO_NET_HDR_LEN], &[0u8; VIRTIO_NET_HDR_LEN]);
        assert_eq!(&out[0][VIRTIO_NET_HDR_LEN..], &p[..]);
    }
}

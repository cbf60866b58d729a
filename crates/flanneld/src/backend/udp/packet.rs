//! IPv4 packet handling of the udp backend: TTL with an incremental checksum (RFC 1624) and the
//! ICMP "net unreachable" reply, exactly as Go flannel's C proxy does them.

use std::net::Ipv4Addr;

/// Smallest valid IPv4 header.
pub const IPV4_HEADER: usize = 20;

/// The destination of an IPv4 packet (`None` if it is not one).
pub fn ipv4_dst(pkt: &[u8]) -> Option<u32> {
    if pkt.len() < IPV4_HEADER || pkt[0] >> 4 != 4 {
        return None;
    }
    Some(u32::from_be_bytes([pkt[16], pkt[17], pkt[18], pkt[19]]))
}

/// Decrements the TTL and patches the header checksum incrementally; `false` means drop (not
/// IPv4, or the TTL reached zero).
pub fn decrement_ttl(pkt: &mut [u8]) -> bool {
    if pkt.len() < IPV4_HEADER || pkt[0] >> 4 != 4 {
        return false;
    }
    let ttl = pkt[8];
    if ttl <= 1 {
        return false;
    }
    let old = u16::from_be_bytes([pkt[8], pkt[9]]);
    pkt[8] = ttl - 1;
    let new = u16::from_be_bytes([pkt[8], pkt[9]]);
    let hc = u16::from_be_bytes([pkt[10], pkt[11]]);
    // HC' = ~(~HC + ~m + m')
    let mut sum = (!hc as u32) + (!old as u32) + new as u32;
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let hc2 = !(sum as u16);
    pkt[10..12].copy_from_slice(&hc2.to_be_bytes());
    true
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [b] = chunks.remainder() {
        sum += (*b as u32) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes an ICMP destination-unreachable/net-unreachable reply to `orig` into `out` (from
/// `src`, TTL 8); returns its length, or `None` when the reference sends none (the original is
/// ICMP, a non-first fragment, or malformed).
pub fn icmp_net_unreachable(orig: &[u8], src: Ipv4Addr, out: &mut [u8]) -> Option<usize> {
    if orig.len() < IPV4_HEADER || orig[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((orig[0] & 0x0f) as usize) * 4;
    if ihl < IPV4_HEADER || orig.len() < ihl {
        return None;
    }
    let frag_offset = u16::from_be_bytes([orig[6], orig[7]]) & 0x1fff;
    if orig[9] == 1 || frag_offset != 0 {
        return None;
    }
    let quoted = (ihl + 8).min(orig.len());
    let total = IPV4_HEADER + 8 + quoted;
    if out.len() < total {
        return None;
    }
    let out = &mut out[..total];
    out.fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[8] = 8; // TTL
    out[9] = 1; // ICMP
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&orig[12..16]);
    let hc = checksum(&out[..IPV4_HEADER]);
    out[10..12].copy_from_slice(&hc.to_be_bytes());
    let icmp = &mut out[IPV4_HEADER..];
    icmp[0] = 3; // destination unreachable
    icmp[1] = 0; // net unreachable
    icmp[8..].copy_from_slice(&orig[..quoted]);
    let ic = checksum(icmp);
    icmp[2..4].copy_from_slice(&ic.to_be_bytes());
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(ttl: u8, proto: u8) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = ttl;
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 5, 1, 2]);
        p[16..20].copy_from_slice(&[10, 5, 2, 2]);
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn ttl_decrement_keeps_the_checksum_valid() {
        for ttl in [2u8, 64, 255] {
            let mut p = packet(ttl, 6);
            assert!(decrement_ttl(&mut p));
            assert_eq!(p[8], ttl - 1);
            assert_eq!(checksum(&p[..20]), 0, "checksum must verify");
        }
    }

    #[test]
    fn ttl_one_is_dropped() {
        let mut p = packet(1, 6);
        assert!(!decrement_ttl(&mut p));
        assert!(!decrement_ttl(&mut [0x60u8; 40]), "IPv6 is not forwarded");
    }

    #[test]
    fn net_unreachable_reply() {
        let orig = packet(64, 17);
        let mut out = [0u8; 128];
        let n = icmp_net_unreachable(&orig, Ipv4Addr::new(10, 5, 1, 0), &mut out).unwrap();
        assert_eq!(n, 20 + 8 + 28);
        assert_eq!(checksum(&out[..20]), 0);
        assert_eq!(checksum(&out[20..n]), 0);
        assert_eq!((out[20], out[21], out[8]), (3, 0, 8));
        assert_eq!(&out[16..20], &[10, 5, 1, 2]);
        // Never for ICMP or non-first fragments.
        assert!(icmp_net_unreachable(&packet(64, 1), Ipv4Addr::LOCALHOST, &mut out).is_none());
        let mut frag = packet(64, 17);
        frag[7] = 10;
        assert!(icmp_net_unreachable(&frag, Ipv4Addr::LOCALHOST, &mut out).is_none());
    }
}

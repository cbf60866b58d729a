//! The udp backend's forwarding table: remote subnet -> peer socket address (also wireguard's
//! allowed-ips, for IPv4 and IPv6).
//!
//! Longest-prefix match with one hash map per prefix length in use (in practice one: every
//! lease has SubnetLen), so a lookup costs the same with 10 or 10 000 leases.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

use ipnet::{Ipv4Net, Ipv6Net};

/// An IPv4 or IPv6 prefix, with its address as an integer so that the lookup is a mask and a
/// hash probe per prefix length, the same code for both families.
pub trait Prefix: Copy + Ord {
    /// The address as an integer (host byte order).
    type Bits: Copy + Eq + Hash + std::ops::BitAnd<Output = Self::Bits>;
    /// The network address, as an integer.
    fn bits(&self) -> Self::Bits;
    /// The prefix length.
    fn length(&self) -> u8;
    /// The netmask of a prefix length.
    fn mask(len: u8) -> Self::Bits;
    /// The prefix back from its parts.
    fn from_parts(bits: Self::Bits, len: u8) -> Option<Self>;
}

impl Prefix for Ipv4Net {
    type Bits = u32;
    fn bits(&self) -> u32 {
        u32::from(self.network())
    }
    fn length(&self) -> u8 {
        self.prefix_len()
    }
    #[inline]
    fn mask(len: u8) -> u32 {
        u32::MAX.checked_shl(32 - len as u32).unwrap_or(0)
    }
    fn from_parts(bits: u32, len: u8) -> Option<Self> {
        Ipv4Net::new(Ipv4Addr::from(bits), len).ok()
    }
}

impl Prefix for Ipv6Net {
    type Bits = u128;
    fn bits(&self) -> u128 {
        u128::from(self.network())
    }
    fn length(&self) -> u8 {
        self.prefix_len()
    }
    #[inline]
    fn mask(len: u8) -> u128 {
        u128::MAX.checked_shl(128 - len as u32).unwrap_or(0)
    }
    fn from_parts(bits: u128, len: u8) -> Option<Self> {
        Ipv6Net::new(Ipv6Addr::from(bits), len).ok()
    }
}

/// Remote subnets and where to send their packets.
/// `V` is what a route leads to (udp: the peer's socket address; wireguard: a peer id); `P`
/// the prefix family.
#[derive(Debug, Clone)]
pub struct RouteTable<V = SocketAddrV4, P: Prefix = Ipv4Net> {
    /// (prefix length, network -> peer), longest prefix first.
    by_len: Vec<(u8, HashMap<P::Bits, V>)>,
}

impl<V, P: Prefix> Default for RouteTable<V, P> {
    fn default() -> Self {
        RouteTable { by_len: vec![] }
    }
}

impl<V: Copy + Ord, P: Prefix> RouteTable<V, P> {
    /// Adds or replaces the route for `subnet`.
    pub fn insert(&mut self, subnet: P, peer: V) {
        let len = subnet.length();
        let net = subnet.bits();
        match self.by_len.iter_mut().find(|(l, _)| *l == len) {
            Some((_, m)) => {
                m.insert(net, peer);
            }
            None => {
                self.by_len.push((len, HashMap::from([(net, peer)])));
                self.by_len.sort_by_key(|e| std::cmp::Reverse(e.0));
            }
        }
    }

    /// Removes the route for `subnet`.
    pub fn remove(&mut self, subnet: P) {
        let len = subnet.length();
        let net = subnet.bits();
        if let Some((_, m)) = self.by_len.iter_mut().find(|(l, _)| *l == len) {
            m.remove(&net);
        }
        self.by_len.retain(|(_, m)| !m.is_empty());
    }

    /// The peer for destination `dst` (host byte order), longest prefix first.
    pub fn lookup(&self, dst: P::Bits) -> Option<V> {
        self.by_len
            .iter()
            .find_map(|(len, m)| m.get(&(dst & P::mask(*len))).copied())
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.by_len.iter().map(|(_, m)| m.len()).sum()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All routes (for logs and tests).
    pub fn entries(&self) -> Vec<(P, V)> {
        let mut v: Vec<_> = self
            .by_len
            .iter()
            .flat_map(|(len, m)| {
                m.iter()
                    .filter_map(move |(net, peer)| P::from_parts(*net, *len).map(|n| (n, *peer)))
            })
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_removal_works() {
        let mut t: RouteTable = RouteTable::default();
        let a: SocketAddrV4 = "192.168.0.1:8285".parse().unwrap();
        let b: SocketAddrV4 = "192.168.0.2:8285".parse().unwrap();
        t.insert("10.5.0.0/16".parse().unwrap(), a);
        t.insert("10.5.7.0/24".parse().unwrap(), b);
        let ip = |s: &str| u32::from(s.parse::<Ipv4Addr>().unwrap());
        assert_eq!(t.lookup(ip("10.5.7.9")), Some(b));
        assert_eq!(t.lookup(ip("10.5.8.9")), Some(a));
        assert_eq!(t.lookup(ip("10.6.0.1")), None);
        t.remove("10.5.7.0/24".parse().unwrap());
        assert_eq!(t.lookup(ip("10.5.7.9")), Some(a));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn ipv6_prefixes_match_longest_first() {
        let mut t: RouteTable<u32, Ipv6Net> = RouteTable::default();
        t.insert("fc00:5::/48".parse().unwrap(), 1);
        t.insert("fc00:5:0:100::/64".parse().unwrap(), 2);
        let ip = |s: &str| u128::from(s.parse::<Ipv6Addr>().unwrap());
        assert_eq!(t.lookup(ip("fc00:5:0:100::7")), Some(2));
        assert_eq!(t.lookup(ip("fc00:5:0:200::7")), Some(1));
        assert_eq!(t.lookup(ip("fc00:6::1")), None);
        assert_eq!(
            t.entries(),
            vec![
                ("fc00:5::/48".parse().unwrap(), 1),
                ("fc00:5:0:100::/64".parse().unwrap(), 2)
            ]
        );
        t.insert("::/0".parse().unwrap(), 3);
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(3));
    }

    #[test]
    fn many_leases_same_cost() {
        let mut t: RouteTable = RouteTable::default();
        for i in 0..10_000u32 {
            let net = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap();
            t.insert(net, SocketAddrV4::new(Ipv4Addr::from(i), 8285));
        }
        assert_eq!(t.by_len.len(), 1, "one map per prefix length");
        assert_eq!(
            t.lookup(0x0a00_0000 + (9_999 << 8) + 7),
            Some(SocketAddrV4::new(Ipv4Addr::from(9_999), 8285))
        );
    }
}

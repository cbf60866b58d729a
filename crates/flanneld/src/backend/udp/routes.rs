//! The udp backend's forwarding table: remote subnet -> peer socket address.
//!
//! Longest-prefix match with one hash map per prefix length in use (in practice one: every
//! lease has SubnetLen), so a lookup costs the same with 10 or 10 000 leases.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;

/// Remote subnets and where to send their packets.
/// `V` is what a route leads to (udp: the peer's socket address; wireguard: a peer id).
#[derive(Debug, Clone)]
pub struct RouteTable<V = SocketAddrV4> {
    /// (prefix length, network -> peer), longest prefix first.
    by_len: Vec<(u8, HashMap<u32, V>)>,
}

impl<V> Default for RouteTable<V> {
    fn default() -> Self {
        RouteTable { by_len: vec![] }
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len as u32)
    }
}

impl<V: Copy + Ord> RouteTable<V> {
    /// Adds or replaces the route for `subnet`.
    pub fn insert(&mut self, subnet: Ipv4Net, peer: V) {
        let len = subnet.prefix_len();
        let net = u32::from(subnet.network());
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
    pub fn remove(&mut self, subnet: Ipv4Net) {
        let len = subnet.prefix_len();
        let net = u32::from(subnet.network());
        if let Some((_, m)) = self.by_len.iter_mut().find(|(l, _)| *l == len) {
            m.remove(&net);
        }
        self.by_len.retain(|(_, m)| !m.is_empty());
    }

    /// The peer for destination `dst` (host byte order), longest prefix first.
    pub fn lookup(&self, dst: u32) -> Option<V> {
        self.by_len
            .iter()
            .find_map(|(len, m)| m.get(&(dst & mask(*len))).copied())
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
    pub fn entries(&self) -> Vec<(Ipv4Net, V)> {
        let mut v: Vec<_> = self
            .by_len
            .iter()
            .flat_map(|(len, m)| {
                m.iter().filter_map(move |(net, peer)| {
                    Ipv4Net::new(Ipv4Addr::from(*net), *len)
                        .ok()
                        .map(|n| (n, *peer))
                })
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
        let mut t = RouteTable::default();
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
    fn many_leases_same_cost() {
        let mut t = RouteTable::default();
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

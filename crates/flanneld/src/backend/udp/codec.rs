//! What the udp backend puts on the wire: the raw IPv4 packet, TTL decremented, sent to the
//! peer whose subnet holds the destination (Go's `proxy_amd64.c` behaviour).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::RwLock;

use super::packet::{decrement_ttl, icmp_net_unreachable, ipv4_dst};
use super::routes::RouteTable;
use crate::backend::engine::{Codec, Emit, Tx};

/// The udp backend's codec, shared between the packet threads and the lease handler.
pub struct UdpCodec {
    /// Remote subnets -> peers; replaced entry by entry while packets flow.
    pub routes: RwLock<RouteTable>,
    /// Source of ICMP replies (this host's flannel0 address).
    pub tun_ip: Ipv4Addr,
}

impl Codec for UdpCodec {
    /// The ICMP reply buffer.
    type Local = Vec<u8>;
    type Addr = SocketAddrV4;
    const ROOM: usize = 0;
    const NAME: &'static str = "udp";

    fn local(&self) -> Vec<u8> {
        vec![0u8; 256]
    }

    fn outbound(
        &self,
        icmp: &mut Vec<u8>,
        pkts: &mut [Vec<u8>],
        sizes: &[usize],
        _outs: &mut [Vec<u8>],
        verdicts: &mut [Tx<SocketAddrV4>],
        reply: &mut dyn FnMut(&[u8]),
    ) {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        for (i, pkt) in pkts.iter_mut().enumerate() {
            let pkt = &mut pkt[..sizes[i]];
            verdicts[i] = match ipv4_dst(pkt) {
                None => Tx::Drop,
                Some(dst) => match routes.lookup(dst) {
                    None => {
                        if let Some(n) = icmp_net_unreachable(pkt, self.tun_ip, icmp) {
                            reply(&icmp[..n]);
                        }
                        Tx::Drop
                    }
                    Some(peer) if decrement_ttl(pkt) => Tx::InPlace(peer),
                    Some(_) => Tx::Drop,
                },
            };
        }
    }

    fn inbound(
        &self,
        _icmp: &mut Vec<u8>,
        _src: SocketAddrV4,
        dgram: &mut [u8],
        _scratch: &mut [u8],
        emit: &mut dyn FnMut(Emit<'_, SocketAddrV4>),
    ) {
        if decrement_ttl(dgram) {
            emit(Emit::Tun(dgram));
        }
    }
}

//! XFRM (IPsec) policies over the kernel's `NETLINK_XFRM` socket: the ipsec backend's
//! `<subnet> <-> <subnet>` ESP tunnel policies, as Go flannel installs them through
//! vishvananda/netlink (selector of the two subnets, no ports or protocol, infinite lifetimes,
//! action allow, one template `ESP tunnel <src> -> <dst> reqid N` with all algorithms allowed).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use futures::StreamExt;
use ipnet::Ipv4Net;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_xfrm::policy::{DelGetMessage, ModifyMessage};
use netlink_packet_xfrm::{
    Address, LifetimeConfig, Selector, UserPolicyId, UserPolicyInfo, UserTemplate, XfrmAttrs,
    XfrmMessage, IPPROTO_ESP, XFRM_MODE_TUNNEL, XFRM_POLICY_ALLOW,
};
use netlink_proto::sys::{protocols::NETLINK_XFRM, SocketAddr};
use netlink_proto::ConnectionHandle;

const AF_INET: u16 = libc::AF_INET as u16;

/// Direction of a policy (the kernel's `XFRM_POLICY_IN/OUT/FWD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyDir {
    /// Traffic received for this host.
    In,
    /// Traffic sent by this host.
    Out,
    /// Traffic forwarded by this host (to its pods).
    Fwd,
}

impl PolicyDir {
    fn to_kernel(self) -> u8 {
        match self {
            PolicyDir::In => 0,
            PolicyDir::Out => 1,
            PolicyDir::Fwd => 2,
        }
    }

    fn from_kernel(d: u8) -> Option<Self> {
        match d {
            0 => Some(PolicyDir::In),
            1 => Some(PolicyDir::Out),
            2 => Some(PolicyDir::Fwd),
            _ => None,
        }
    }
}

impl fmt::Display for PolicyDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyDir::In => "in",
            PolicyDir::Out => "out",
            PolicyDir::Fwd => "fwd",
        })
    }
}

/// An IPv4 ESP tunnel policy: packets `src` -> `dst` (subnets) in direction `dir` must be
/// carried by an SA `tmpl_src` -> `tmpl_dst` with request id `reqid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EspTunnelPolicy {
    /// Selector source subnet.
    pub src: Ipv4Net,
    /// Selector destination subnet.
    pub dst: Ipv4Net,
    /// Direction.
    pub dir: PolicyDir,
    /// Tunnel (outer) source address.
    pub tmpl_src: Ipv4Addr,
    /// Tunnel (outer) destination address.
    pub tmpl_dst: Ipv4Addr,
    /// The template's request id (flannel: 11), linking the policy to charon's SAs.
    pub reqid: u32,
}

impl fmt::Display for EspTunnelPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "src {} dst {} dir {} tmpl src {} dst {} proto esp reqid {} mode tunnel",
            self.src, self.dst, self.dir, self.tmpl_src, self.tmpl_dst, self.reqid
        )
    }
}

impl EspTunnelPolicy {
    fn selector(&self) -> Selector {
        let mut s = Selector::default();
        s.source_prefix(&IpAddr::V4(self.src.network()), self.src.prefix_len());
        s.destination_prefix(&IpAddr::V4(self.dst.network()), self.dst.prefix_len());
        s.family = AF_INET;
        s
    }

    fn template(&self) -> UserTemplate {
        let mut t = UserTemplate::default();
        t.source(&IpAddr::V4(self.tmpl_src));
        t.destination(&IpAddr::V4(self.tmpl_dst));
        t.protocol(IPPROTO_ESP);
        t.mode(XFRM_MODE_TUNNEL);
        t.reqid(self.reqid);
        t
    }

    /// Reads an IPv4 ESP tunnel policy with exactly one template out of a kernel policy
    /// message; anything else is `None`.
    fn from_kernel(m: &ModifyMessage) -> Option<Self> {
        let info = &m.user_policy_info;
        let sel = &info.selector;
        if sel.family != AF_INET || info.action != XFRM_POLICY_ALLOW {
            return None;
        }
        let tmpls: Vec<&UserTemplate> = m
            .nlas
            .iter()
            .filter_map(|a| match a {
                XfrmAttrs::Template(t) => Some(t.iter()),
                _ => None,
            })
            .flatten()
            .collect();
        let [t] = tmpls.as_slice() else {
            return None;
        };
        if t.id.proto != IPPROTO_ESP || t.mode != XFRM_MODE_TUNNEL || t.family != AF_INET {
            return None;
        }
        Some(EspTunnelPolicy {
            src: Ipv4Net::new(v4(&sel.saddr), sel.prefixlen_s).ok()?.trunc(),
            dst: Ipv4Net::new(v4(&sel.daddr), sel.prefixlen_d).ok()?.trunc(),
            dir: PolicyDir::from_kernel(info.direction)?,
            tmpl_src: v4(&t.saddr),
            tmpl_dst: v4(&t.id.daddr),
            reqid: t.reqid,
        })
    }
}

fn v4(a: &Address) -> Ipv4Addr {
    Ipv4Addr::new(a.addr[0], a.addr[1], a.addr[2], a.addr[3])
}

/// An XFRM netlink failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum XfrmError {
    /// The socket could not be opened.
    #[error("failed to open an xfrm netlink socket: {0}")]
    Open(#[from] std::io::Error),
    /// The kernel refused a request (errno) or the connection failed.
    #[error("{context}: {reason}")]
    Request {
        /// What was being done.
        context: String,
        /// Why it failed.
        reason: String,
        /// The kernel's errno, if it answered with one.
        errno: Option<i32>,
    },
}

impl XfrmError {
    /// Whether the kernel said "no such policy".
    pub fn is_not_found(&self) -> bool {
        matches!(self, XfrmError::Request { errno: Some(e), .. } if *e == libc::ENOENT)
    }
}

/// A handle on the kernel's XFRM netlink socket of the current network namespace.
#[derive(Clone)]
pub struct Xfrm {
    handle: ConnectionHandle<XfrmMessage>,
}

impl Xfrm {
    /// Opens the socket (must run inside a tokio runtime).
    pub fn open() -> Result<Self, XfrmError> {
        let (conn, handle, _) = netlink_proto::new_connection::<XfrmMessage>(NETLINK_XFRM)?;
        tokio::spawn(conn);
        Ok(Xfrm { handle })
    }

    /// Sends one request and collects the answers (errors and the final ACK are folded in).
    async fn request(
        &self,
        msg: XfrmMessage,
        flags: u16,
        context: impl Fn() -> String,
    ) -> Result<Vec<XfrmMessage>, XfrmError> {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        let req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        let mut answers = self
            .handle
            .request(req, SocketAddr::new(0, 0))
            .map_err(|e| XfrmError::Request {
                context: context(),
                reason: e.to_string(),
                errno: None,
            })?;
        let mut out = vec![];
        while let Some(m) = answers.next().await {
            match m.payload {
                NetlinkPayload::InnerMessage(x) => out.push(x),
                NetlinkPayload::Error(e) => {
                    if let Some(code) = e.code {
                        let errno = -code.get();
                        return Err(XfrmError::Request {
                            context: context(),
                            reason: std::io::Error::from_raw_os_error(errno).to_string(),
                            errno: Some(errno),
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Installs `p`, replacing a policy with the same selector and direction
    /// (`XFRM_MSG_UPDPOLICY`: add or update, like Go's get-then-add-or-update).
    pub async fn update_policy(&self, p: &EspTunnelPolicy) -> Result<(), XfrmError> {
        let info = UserPolicyInfo {
            selector: p.selector(),
            lifetime_cfg: LifetimeConfig::default(),
            direction: p.dir.to_kernel(),
            action: XFRM_POLICY_ALLOW,
            ..Default::default()
        };
        let msg = XfrmMessage::UpdatePolicy(ModifyMessage {
            user_policy_info: info,
            nlas: vec![XfrmAttrs::Template(vec![p.template()])],
        });
        self.request(msg, NLM_F_REQUEST | NLM_F_ACK, || {
            format!("error updating policy {p}")
        })
        .await
        .map(|_| ())
    }

    /// Deletes the policy with `p`'s selector and direction; one that is already gone is not an
    /// error.
    pub async fn delete_policy(&self, p: &EspTunnelPolicy) -> Result<(), XfrmError> {
        let id = UserPolicyId {
            selector: p.selector(),
            index: 0,
            direction: p.dir.to_kernel(),
        };
        let msg = XfrmMessage::DeletePolicy(DelGetMessage {
            user_policy_id: id,
            nlas: vec![],
        });
        match self
            .request(msg, NLM_F_REQUEST | NLM_F_ACK, || {
                format!("error deleting policy {p}")
            })
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Every IPv4 ESP tunnel policy (one template) of the main policy database.
    pub async fn esp_tunnel_policies(&self) -> Result<Vec<EspTunnelPolicy>, XfrmError> {
        let msg = XfrmMessage::GetPolicy(DelGetMessage::default());
        let answers = self
            .request(msg, NLM_F_REQUEST | NLM_F_DUMP, || {
                "error listing xfrm policies".to_string()
            })
            .await?;
        Ok(answers
            .iter()
            .filter_map(|m| match m {
                XfrmMessage::AddPolicy(p) | XfrmMessage::UpdatePolicy(p) => {
                    EspTunnelPolicy::from_kernel(p)
                }
                _ => None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_kernel_message() {
        let p = EspTunnelPolicy {
            src: "10.5.1.0/24".parse().unwrap(),
            dst: "10.5.2.0/24".parse().unwrap(),
            dir: PolicyDir::Fwd,
            tmpl_src: "192.168.100.12".parse().unwrap(),
            tmpl_dst: "192.168.100.11".parse().unwrap(),
            reqid: 11,
        };
        let m = ModifyMessage {
            user_policy_info: UserPolicyInfo {
                selector: p.selector(),
                lifetime_cfg: LifetimeConfig::default(),
                direction: p.dir.to_kernel(),
                action: XFRM_POLICY_ALLOW,
                ..Default::default()
            },
            nlas: vec![XfrmAttrs::Template(vec![p.template()])],
        };
        assert_eq!(EspTunnelPolicy::from_kernel(&m), Some(p));
        assert_eq!(
            p.to_string(),
            "src 10.5.1.0/24 dst 10.5.2.0/24 dir fwd tmpl src 192.168.100.12 dst 192.168.100.11 proto esp reqid 11 mode tunnel"
        );
    }
}

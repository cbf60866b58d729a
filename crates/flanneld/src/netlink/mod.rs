//! The only module that speaks rtnetlink.
//!
//! Everything else asks for links, addresses and routes in domain terms; this module knows how
//! to build and read the netlink messages, and puts the object name into every error. One file
//! per object kind, so each backend's kernel needs sit together:
//! - [`link`]: any link (list, details, up, MTU, delete);
//! - [`vxlan`], [`iptun`]: the link kinds flannel creates (vxlan, ipip);
//! - [`address`], [`route`], [`neighbour`] (ARP/NDP and FDB entries);
//! - [`events`]: link change notifications;
//! - [`xfrm`]: IPsec policies (the XFRM netlink family, its own socket).

pub mod address;
pub mod events;
pub mod iptun;
pub mod link;
pub mod neighbour;
pub mod route;
pub mod tc;
pub mod vxlan;
pub mod wireguard;
pub mod xfrm;

pub use address::Address;
pub use events::{link_events, LinkEvent};
pub use iptun::{IpipSpec, IptunInfo};
pub use link::{Link, LinkDetails};
pub use neighbour::Neighbour;
pub use route::{Route, RouteSpec};
pub use vxlan::{VxlanInfo, VxlanSpec};

use rtnetlink::Handle;

/// A netlink failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct NetlinkError {
    context: String,
    #[source]
    source: rtnetlink::Error,
}

/// Failure to open the netlink socket at all.
#[derive(Debug, thiserror::Error)]
#[error("failed to open a netlink socket: {0}")]
pub struct OpenError(#[from] std::io::Error);

fn wrap(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let context = context.into();
    move |source| NetlinkError { context, source }
}

/// A handle on the kernel's routing netlink socket of the current network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink connection (must run inside a tokio runtime).
    pub fn open() -> Result<Self, OpenError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }
}

/// Whether a netlink failure means "no such object" (harmless when deleting).
pub fn is_not_found(e: &NetlinkError) -> bool {
    matches!(
        errno(e),
        Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::ENODEV) | Some(libc::EADDRNOTAVAIL)
    )
}

/// Treats "no such object" as success (deleting what is already gone).
fn ignore_not_found(r: Result<(), NetlinkError>) -> Result<(), NetlinkError> {
    match r {
        Err(e) if is_not_found(&e) => Ok(()),
        other => other,
    }
}

/// Whether a netlink failure means "already exists".
pub fn is_exists(e: &NetlinkError) -> bool {
    errno(e) == Some(libc::EEXIST)
}

fn errno(e: &NetlinkError) -> Option<i32> {
    match &e.source {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn mac6(v: &[u8]) -> Option<[u8; 6]> {
    v.try_into().ok()
}

/// A MAC address as lower-case colon text, the way Go prints it in BackendData.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    if s.split(':').any(|p| p.len() != 2) {
        return None;
    }
    parts.try_into().ok()
}

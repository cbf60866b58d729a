//! Link change notifications (a multicast netlink subscription).

use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;

use super::link::link_name;
use super::OpenError;

/// A change of the set of links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link was created or changed.
    New {
        /// Index.
        index: u32,
        /// Name.
        name: String,
    },
    /// A link was deleted.
    Deleted {
        /// Index.
        index: u32,
        /// Name.
        name: String,
    },
}

/// Subscribes to link changes; the receiver yields events until the task is dropped.
pub fn link_events() -> Result<tokio::sync::mpsc::UnboundedReceiver<LinkEvent>, OpenError> {
    let (conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let ev = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => LinkEvent::New {
                    index: m.header.index,
                    name: link_name(&m),
                },
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                    LinkEvent::Deleted {
                        index: m.header.index,
                        name: link_name(&m),
                    }
                }
                _ => continue,
            };
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

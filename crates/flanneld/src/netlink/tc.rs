//! tc BPF classifiers attached through netlink (a `clsact` qdisc and a direct-action `bpf`
//! filter): unlike a TCX link, such an attachment belongs to the interface, not to a file
//! descriptor, so it keeps working while flanneld restarts.

use netlink_packet_core::{
    NetlinkMessage, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption,
};
use netlink_packet_route::RouteNetlinkMessage;

use super::{errno, ignore_not_found, is_exists, wrap, Netlink, NetlinkError};

/// The filter priority and handle flannel uses (one filter per hook).
const PRIORITY: u16 = 0xf1a;
const FILTER_HANDLE: u32 = 1;
/// `ETH_P_ALL` in network order, as tc wants the protocol.
const ALL_PROTOCOLS: u16 = 0x0003u16.to_be();

fn hook(egress: bool) -> TcHandle {
    TcHandle {
        major: 0xffff,
        minor: if egress {
            TcHandle::MIN_EGRESS
        } else {
            TcHandle::MIN_INGRESS
        },
    }
}

impl Netlink {
    async fn tc_request(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), rtnetlink::Error> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut handle = self.handle.clone();
        let mut response = handle.request(req)?;
        while let Some(m) = futures::StreamExt::next(&mut response).await {
            if let netlink_packet_core::NetlinkPayload::Error(e) = m.payload {
                if e.code.is_some() {
                    return Err(rtnetlink::Error::NetlinkError(e));
                }
            }
        }
        Ok(())
    }

    /// Attaches BPF program `prog_fd` (named `name`) to interface `index`'s ingress or
    /// egress, replacing what flannel attached there before (atomically: no packet sees
    /// neither).
    pub async fn attach_tc_bpf(
        &self,
        index: u32,
        egress: bool,
        prog_fd: i32,
        name: &str,
    ) -> Result<(), NetlinkError> {
        let mut q = TcMessage::with_index(index as i32);
        q.header.parent = TcHandle::CLSACT;
        q.header.handle = TcHandle::from(0xffff_0000);
        q.attributes.push(TcAttribute::Kind("clsact".into()));
        let r = self
            .tc_request(
                RouteNetlinkMessage::NewQueueDiscipline(q),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
            .map_err(wrap(format!(
                "failed to add a clsact qdisc to interface #{index}"
            )));
        match r {
            Err(e) if !is_exists(&e) => return Err(e),
            _ => {}
        }
        let mut f = TcMessage::with_index(index as i32);
        f.header.parent = hook(egress);
        f.header.handle = TcHandle::from(FILTER_HANDLE);
        f.header.info = ((PRIORITY as u32) << 16) | ALL_PROTOCOLS as u32;
        f.attributes.push(TcAttribute::Kind("bpf".into()));
        f.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(prog_fd as u32)),
            TcOption::Bpf(TcFilterBpfOption::ProgName(name.into())),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]));
        self.tc_request(
            RouteNetlinkMessage::NewTrafficFilter(f),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map_err(wrap(format!(
            "failed to attach BPF program {name} to interface #{index}"
        )))
    }

    /// Removes flannel's BPF filter from interface `index`'s ingress or egress (absent is
    /// fine).
    pub async fn detach_tc_bpf(&self, index: u32, egress: bool) -> Result<(), NetlinkError> {
        let mut f = TcMessage::with_index(index as i32);
        f.header.parent = hook(egress);
        f.header.handle = TcHandle::from(FILTER_HANDLE);
        f.header.info = ((PRIORITY as u32) << 16) | ALL_PROTOCOLS as u32;
        f.attributes.push(TcAttribute::Kind("bpf".into()));
        let r = self
            .tc_request(RouteNetlinkMessage::DelTrafficFilter(f), 0)
            .await
            .map_err(wrap(format!(
                "failed to remove flannel's BPF filter from interface #{index}"
            )));
        match r {
            // EINVAL: no clsact qdisc there at all.
            Err(e) if errno(&e) == Some(libc::EINVAL) => Ok(()),
            other => ignore_not_found(other),
        }
    }
}

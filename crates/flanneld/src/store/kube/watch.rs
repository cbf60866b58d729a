//! List + watch of Nodes, turned into lease snapshots and events.
//!
//! Only what routing needs is kept per node (its lease). A heartbeat that changes nothing
//! flannel reads produces no event, so it costs one parse and no netlink call. Bookmarks move
//! the resume point; `410 Expired` (HTTP status or `ERROR` event) leads to a relist whose
//! snapshot the lease watcher diffs; other failures are retried with backoff.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::core::WatchEvent;
use tokio::sync::mpsc;

use super::client::{self, explain, status_code};
use super::node::{lease_from_node, MiniNode};
use super::{Backoff, KubeStore};
use crate::lease::{Lease, LeaseEvent, StoreUpdate};
use crate::store::{StoreError, StoreInspection};

/// Nodes per list page.
const PAGE: u32 = 500;
/// Server-side watch timeout; the watch is then re-opened from the newest resourceVersion.
const WATCH_TIMEOUT_SECS: u32 = 290;
/// A watch that delivers nothing (not even a bookmark) for this long is considered dead.
const IDLE: Duration = Duration::from_secs(WATCH_TIMEOUT_SECS as u64 + 30);

/// Per-node state: the lease it announces, and the last complaint about it (logged once).
struct Tracker<'a> {
    store: &'a KubeStore,
    leases: HashMap<String, Lease>,
    complaints: HashMap<String, String>,
}

/// What a node announces.
enum Parsed {
    /// Our own node, or one flannel does not manage.
    Skip,
    /// A managed node whose annotations cannot be used (logged once).
    Bad,
    /// A usable lease.
    Lease(Lease),
}

impl Tracker<'_> {
    fn parse(&mut self, node: &MiniNode) -> Parsed {
        let name = &node.metadata.name;
        if *name == self.store.node_name {
            return Parsed::Skip;
        }
        match lease_from_node(node, &self.store.ann, self.store.families()) {
            Ok(l) => {
                self.complaints.remove(name);
                l.map_or(Parsed::Skip, Parsed::Lease)
            }
            Err(msg) => {
                if self.complaints.get(name) != Some(&msg) {
                    tracing::warn!("Ignoring node {name:?}: {msg}");
                    self.complaints.insert(name.clone(), msg);
                }
                Parsed::Bad
            }
        }
    }

    fn reset(&mut self, nodes: &[MiniNode]) -> Vec<Lease> {
        self.leases.clear();
        self.complaints
            .retain(|n, _| nodes.iter().any(|x| x.metadata.name == *n));
        for n in nodes {
            if let Parsed::Lease(l) = self.parse(n) {
                self.leases.insert(n.metadata.name.clone(), l);
            }
        }
        self.leases.values().cloned().collect()
    }

    fn updated(&mut self, node: &MiniNode, out: &mut Vec<LeaseEvent>) {
        let name = &node.metadata.name;
        match self.parse(node) {
            // A managed node announcing garbage keeps its last good lease (as the reference).
            Parsed::Bad => {}
            Parsed::Skip => {
                if let Some(old) = self.leases.remove(name) {
                    out.push(LeaseEvent::Removed(old));
                }
            }
            Parsed::Lease(l) => match self.leases.get(name) {
                None => {
                    self.leases.insert(name.clone(), l.clone());
                    out.push(LeaseEvent::Added(l));
                }
                Some(old) if old.key != l.key => {
                    out.push(LeaseEvent::Removed(old.clone()));
                    out.push(LeaseEvent::Added(l.clone()));
                    self.leases.insert(name.clone(), l);
                }
                Some(old) if old.attrs != l.attrs => {
                    out.push(LeaseEvent::Added(l.clone()));
                    self.leases.insert(name.clone(), l);
                }
                Some(_) => {}
            },
        }
    }

    fn deleted(&mut self, node: &MiniNode, out: &mut Vec<LeaseEvent>) {
        self.complaints.remove(&node.metadata.name);
        if let Some(old) = self.leases.remove(&node.metadata.name) {
            out.push(LeaseEvent::Removed(old));
        }
    }
}

/// Lists every node page by page; returns the nodes and the list's resourceVersion.
async fn list_all(store: &KubeStore) -> Result<(Vec<MiniNode>, String), kube::Error> {
    let mut nodes = vec![];
    let mut token: Option<String> = None;
    loop {
        let page = client::list_nodes(&store.client, PAGE, token.take()).await?;
        let rv = page.metadata.resource_version;
        nodes.extend(page.items.into_iter().map(|mut n| {
            n.retain_annotations(&store.ann);
            n.status.conditions.clear();
            n
        }));
        match page.metadata.continue_token.filter(|t| !t.is_empty()) {
            Some(t) => token = Some(t),
            None => return Ok((nodes, rv)),
        }
    }
}

/// Every managed node's lease (the own node's too) and the nodes whose annotations are unusable.
pub(super) async fn inspect(store: &KubeStore) -> Result<StoreInspection, StoreError> {
    let (nodes, _) = list_all(store).await.map_err(|e| StoreError::Unavailable {
        context: "failed to list nodes".into(),
        source: explain(&e).into(),
    })?;
    let mut out = StoreInspection::default();
    for n in &nodes {
        match lease_from_node(n, &store.ann, store.families()) {
            Ok(Some(l)) => {
                if n.metadata.name == store.node_name {
                    out.own = Some(l.clone());
                }
                out.leases.push(l);
            }
            Ok(None) => {}
            Err(msg) => out
                .rejected
                .push((format!("node {}", n.metadata.name), msg)),
        }
    }
    Ok(out)
}

enum WatchEnd {
    /// Re-watch from the newest resourceVersion.
    Rewatch { failed: bool, got_events: bool },
    /// The resourceVersion is gone: list again.
    Relist,
    /// The daemon stopped listening.
    Closed,
}

/// Runs until the receiver goes away.
pub(super) async fn run(
    store: &KubeStore,
    tx: mpsc::Sender<StoreUpdate>,
) -> Result<(), StoreError> {
    let mut tracker = Tracker {
        store,
        leases: HashMap::new(),
        complaints: HashMap::new(),
    };
    let mut backoff = Backoff::new();
    'relist: loop {
        let (nodes, mut rv) = match list_all(store).await {
            Ok(x) => x,
            Err(e) => {
                let wait = backoff.step();
                crate::metrics::metrics().store_error();
                tracing::error!(
                    "failed to list nodes: {} (retrying in {wait:?})",
                    explain(&e)
                );
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        backoff.reset();
        let leases = tracker.reset(&nodes);
        drop(nodes);
        tracing::info!(
            "Node list: {} flannel lease(s) of other nodes, resourceVersion {rv}",
            leases.len()
        );
        if tx.send(StoreUpdate::Snapshot(leases)).await.is_err() {
            return Ok(());
        }
        loop {
            let started = Instant::now();
            match watch_once(&mut tracker, &mut rv, &tx).await {
                WatchEnd::Closed => return Ok(()),
                WatchEnd::Relist => {
                    tracing::info!("node watch from resourceVersion {rv} expired (410); relisting");
                    continue 'relist;
                }
                WatchEnd::Rewatch { failed, got_events } => {
                    if got_events {
                        backoff.reset();
                    }
                    if failed || (!got_events && started.elapsed() < Duration::from_secs(1)) {
                        let wait = backoff.step();
                        if failed {
                            tracing::info!("re-opening the node watch in {wait:?}");
                        }
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
    }
}

async fn watch_once(
    tracker: &mut Tracker<'_>,
    rv: &mut String,
    tx: &mpsc::Sender<StoreUpdate>,
) -> WatchEnd {
    let store = tracker.store;
    let stream = match client::watch_nodes(&store.client, rv, WATCH_TIMEOUT_SECS).await {
        Ok(s) => s,
        Err(e) if status_code(&e) == Some(410) => return WatchEnd::Relist,
        Err(e) => {
            crate::metrics::metrics().store_error();
            tracing::error!("failed to watch nodes: {}", explain(&e));
            return WatchEnd::Rewatch {
                failed: true,
                got_events: false,
            };
        }
    };
    let mut stream = Box::pin(stream.ready_chunks(1024));
    let mut got_events = false;
    loop {
        let chunk = match tokio::time::timeout(IDLE, stream.next()).await {
            Err(_) => {
                tracing::warn!("node watch silent for {IDLE:?}; reconnecting");
                return WatchEnd::Rewatch {
                    failed: true,
                    got_events,
                };
            }
            Ok(None) => {
                return WatchEnd::Rewatch {
                    failed: false,
                    got_events,
                }
            }
            Ok(Some(c)) => c,
        };
        got_events = true;
        let mut events = vec![];
        let mut end = None;
        for item in chunk {
            match item {
                Ok(WatchEvent::Added(mut n)) | Ok(WatchEvent::Modified(mut n)) => {
                    n.retain_annotations(&store.ann);
                    rv.clone_from(&n.metadata.resource_version);
                    tracker.updated(&n, &mut events);
                }
                Ok(WatchEvent::Deleted(n)) => {
                    rv.clone_from(&n.metadata.resource_version);
                    tracker.deleted(&n, &mut events);
                }
                Ok(WatchEvent::Bookmark(b)) => *rv = b.metadata.resource_version,
                Ok(WatchEvent::Error(s)) if s.code == 410 => {
                    end = Some(WatchEnd::Relist);
                    break;
                }
                Ok(WatchEvent::Error(s)) => {
                    crate::metrics::metrics().store_error();
                    tracing::error!("node watch error: {} {}: {}", s.code, s.reason, s.message);
                    end = Some(WatchEnd::Rewatch {
                        failed: true,
                        got_events,
                    });
                    break;
                }
                Err(e) if status_code(&e) == Some(410) => {
                    end = Some(WatchEnd::Relist);
                    break;
                }
                Err(e) => {
                    crate::metrics::metrics().store_error();
                    tracing::error!("node watch failed: {}", explain(&e));
                    end = Some(WatchEnd::Rewatch {
                        failed: true,
                        got_events,
                    });
                    break;
                }
            }
        }
        if !events.is_empty() && tx.send(StoreUpdate::Events(events)).await.is_err() {
            return WatchEnd::Closed;
        }
        if let Some(e) = end {
            return e;
        }
    }
}

//! Leases as the daemon sees them, and the watcher that turns store updates into event batches.
//!
//! Backends only ever handle batches of "added"/"removed" events; snapshots (initial list,
//! compaction recovery, reconnects) are diffed against what the backend already knows, so a
//! resync never re-applies or forgets anything by accident.

use std::collections::BTreeMap;
use std::time::SystemTime;

use flannel_types::{LeaseAttrs, SubnetKey};

/// One host's lease on a subnet.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The subnet(s) leased.
    pub key: SubnetKey,
    /// What the host advertises.
    pub attrs: LeaseAttrs,
    /// When the lease expires; `None` for a reservation (never expires).
    pub expiration: Option<SystemTime>,
    /// The store's handle for the lease's TTL (etcd lease id; 0 = none).
    pub ttl_id: i64,
}

/// A change of the set of remote leases.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    /// A lease appeared or its attributes changed.
    Added(Lease),
    /// A lease is gone (expired or deleted); carries the last known attributes.
    Removed(Lease),
}

impl LeaseEvent {
    /// The lease the event is about.
    pub fn lease(&self) -> &Lease {
        match self {
            LeaseEvent::Added(l) | LeaseEvent::Removed(l) => l,
        }
    }
}

/// What a store's watch delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreUpdate {
    /// The complete current set of leases (initial list or after a resync).
    Snapshot(Vec<Lease>),
    /// Incremental changes, in order.
    Events(Vec<LeaseEvent>),
}

/// Tracks remote leases and emits backend batches; ignores this host's own lease.
#[derive(Debug, Default)]
pub struct LeaseWatcher {
    own: Option<SubnetKey>,
    known: BTreeMap<SubnetKey, Lease>,
}

impl LeaseWatcher {
    /// A watcher that never reports `own`.
    pub fn new(own: SubnetKey) -> Self {
        LeaseWatcher {
            own: Some(own),
            known: BTreeMap::new(),
        }
    }

    /// The remote leases currently known.
    pub fn known(&self) -> impl Iterator<Item = &Lease> {
        self.known.values()
    }

    /// Applies a store update and returns the batch the backend must handle (maybe empty).
    pub fn apply(&mut self, update: StoreUpdate) -> Vec<LeaseEvent> {
        match update {
            StoreUpdate::Snapshot(leases) => self.reset(leases),
            StoreUpdate::Events(events) => {
                events.into_iter().filter_map(|e| self.event(e)).collect()
            }
        }
    }

    fn is_own(&self, key: &SubnetKey) -> bool {
        self.own.as_ref() == Some(key)
    }

    fn reset(&mut self, leases: Vec<Lease>) -> Vec<LeaseEvent> {
        let mut batch = vec![];
        let mut fresh: BTreeMap<SubnetKey, Lease> = BTreeMap::new();
        for l in leases {
            if !self.is_own(&l.key) {
                fresh.insert(l.key, l);
            }
        }
        for (key, old) in &self.known {
            if !fresh.contains_key(key) {
                batch.push(LeaseEvent::Removed(old.clone()));
            }
        }
        for (key, l) in &fresh {
            match self.known.get(key) {
                Some(old) if old.attrs == l.attrs => {}
                _ => batch.push(LeaseEvent::Added(l.clone())),
            }
        }
        self.known = fresh;
        batch
    }

    fn event(&mut self, e: LeaseEvent) -> Option<LeaseEvent> {
        let key = e.lease().key;
        if self.is_own(&key) {
            return None;
        }
        match e {
            LeaseEvent::Added(l) => {
                self.known.insert(key, l.clone());
                Some(LeaseEvent::Added(l))
            }
            LeaseEvent::Removed(l) => {
                // Deletions carry no value in etcd; hand the backend the attributes it saw.
                let last = self.known.remove(&key).unwrap_or(l);
                Some(LeaseEvent::Removed(last))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, ip: &str) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::public_only(ip.parse().unwrap()),
            expiration: None,
            ttl_id: 0,
        }
    }

    #[test]
    fn own_lease_never_reported() {
        let mut w = LeaseWatcher::new("10.0.1.0-24".parse().unwrap());
        let b = w.apply(StoreUpdate::Snapshot(vec![
            lease("10.0.1.0-24", "1.1.1.1"),
            lease("10.0.2.0-24", "1.1.1.2"),
        ]));
        assert_eq!(b, vec![LeaseEvent::Added(lease("10.0.2.0-24", "1.1.1.2"))]);
        let b = w.apply(StoreUpdate::Events(vec![LeaseEvent::Removed(lease(
            "10.0.1.0-24",
            "1.1.1.1",
        ))]));
        assert!(b.is_empty());
    }

    #[test]
    fn resync_diffs_against_known() {
        let mut w = LeaseWatcher::new("10.0.1.0-24".parse().unwrap());
        w.apply(StoreUpdate::Snapshot(vec![
            lease("10.0.2.0-24", "1.1.1.2"),
            lease("10.0.3.0-24", "1.1.1.3"),
        ]));
        let b = w.apply(StoreUpdate::Snapshot(vec![
            lease("10.0.2.0-24", "1.1.1.2"),
            lease("10.0.4.0-24", "1.1.1.4"),
        ]));
        assert_eq!(
            b,
            vec![
                LeaseEvent::Removed(lease("10.0.3.0-24", "1.1.1.3")),
                LeaseEvent::Added(lease("10.0.4.0-24", "1.1.1.4")),
            ]
        );
    }

    #[test]
    fn removal_carries_last_known_attrs() {
        let mut w = LeaseWatcher::new("10.0.1.0-24".parse().unwrap());
        w.apply(StoreUpdate::Snapshot(vec![lease("10.0.2.0-24", "1.1.1.2")]));
        let b = w.apply(StoreUpdate::Events(vec![LeaseEvent::Removed(lease(
            "10.0.2.0-24",
            "0.0.0.0",
        ))]));
        assert_eq!(
            b,
            vec![LeaseEvent::Removed(lease("10.0.2.0-24", "1.1.1.2"))]
        );
    }
}

//! Re-attaching to flannel's persistent TUN devices the moment flanneld starts.
//!
//! `flannel0` (udp) and `flannel-wg` (user-space wireguard) outlive flanneld so that a restart
//! only pauses forwarding. While no process holds one of their queues the kernel drops every
//! packet routed to them; a new flanneld used to re-attach only once it had read the config and
//! its lease (tens of milliseconds). [`grab_existing`] attaches right after the command line is
//! parsed, so from then on packets wait in the TUN's queue instead of being dropped, and
//! [`super::open_tun`] later takes these handles instead of opening new ones.

use std::sync::Mutex;

use tun_rs::SyncDevice;

use super::Mode;

/// Handles opened at start: device name, the mode and queue count asked for, and what
/// [`super::open_tun`] returned for them.
type Held = (String, Mode, usize, Vec<SyncDevice>, Mode);

static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());

fn held() -> std::sync::MutexGuard<'static, Vec<Held>> {
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `name` is an existing TUN/TAP device in this network namespace.
fn is_tun(name: &str) -> bool {
    std::path::Path::new("/sys/class/net")
        .join(name)
        .join("tun_flags")
        .exists()
}

/// Attaches to each of `names` that exists as a TUN device, with the queue count and offloads
/// this process's environment asks for. A device that cannot be attached this way (another
/// layout from an earlier run) is left to the backend, which recreates it.
pub fn grab_existing(names: &[&str]) {
    for &name in names {
        if !is_tun(name) {
            continue;
        }
        let mode = Mode::from_env();
        let queues = mode.queues();
        match super::open_tun_now(name, mode, queues) {
            Ok((devs, got)) => {
                tracing::debug!("{name}: re-attached {} queue(s) at start", devs.len());
                held().push((name.to_string(), mode, queues, devs, got));
            }
            Err(e) => tracing::debug!("{name}: not re-attached at start: {e}"),
        }
    }
}

/// The handles grabbed at start for `name`, if they were opened with this mode and queue count.
pub(super) fn take(name: &str, mode: Mode, queues: usize) -> Option<(Vec<SyncDevice>, Mode)> {
    let mut held = held();
    let i = held
        .iter()
        .position(|(n, m, q, _, _)| n == name && *m == mode && *q == queues)?;
    let (_, _, _, devs, got) = held.swap_remove(i);
    Some((devs, got))
}

/// Closes the handles of `name` grabbed at start (its backend is not the configured one).
pub fn release(name: &str) {
    held().retain(|(n, ..)| n != name);
}

/// Closes every handle no backend claimed.
pub fn release_unclaimed() {
    held().clear();
}

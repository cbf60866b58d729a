//! The wireguard backend (work in progress): one WireGuard peer per remote lease, on the
//! kernel's WireGuard where it exists, else on a user-space WireGuard over TUN.

pub mod datapath;
pub mod kernel;

//! The standard WireGuard cross-platform UAPI on `/var/run/wireguard/<device>.sock`, as
//! wireguard-go serves it, so `wg show flannel-wg` (and `wg set`) work against the user-space
//! device. Text protocol: `get=1` or `set=1`, `key=value` lines, a blank line ends a request;
//! every reply ends with `errno=N` and a blank line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use super::datapath::{WgDeviceConfig, WgPeer};
use super::keys::{hex_key, parse_hex_key};
use super::userspace::{apply_peer, WgCodec};

/// The directory of UAPI sockets (the path `wg` looks in).
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Binds `/var/run/wireguard/<name>.sock` (replacing a stale one) and serves it on a thread.
pub fn serve(name: &str, codec: Arc<WgCodec>) -> std::io::Result<()> {
    std::fs::create_dir_all(SOCKET_DIR)?;
    let _ = std::fs::set_permissions(SOCKET_DIR, std::fs::Permissions::from_mode(0o755));
    let path = format!("{SOCKET_DIR}/{name}.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("wg-uapi".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let codec = codec.clone();
                let _ = std::thread::Builder::new()
                    .name("wg-uapi-conn".into())
                    .spawn(move || handle(conn, &codec));
            }
        })?;
    Ok(())
}

fn handle(conn: UnixStream, codec: &WgCodec) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut lines = BufReader::new(conn).lines();
    while let Some(Ok(op)) = lines.next() {
        let mut body = vec![];
        for l in lines.by_ref() {
            match l {
                Ok(l) if l.is_empty() => break,
                Ok(l) => body.push(l),
                Err(_) => return,
            }
        }
        let reply = match op.as_str() {
            "get=1" => get(codec),
            "set=1" => match set(codec, &body) {
                Ok(()) => "errno=0\n\n".to_string(),
                Err(e) => {
                    tracing::warn!("wireguard UAPI set: {e}");
                    "errno=22\n\n".to_string()
                }
            },
            "" => continue,
            _ => "errno=22\n\n".to_string(),
        };
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// The `get=1` reply.
pub fn get(codec: &WgCodec) -> String {
    let st = codec.status();
    let mut s = format!(
        "private_key={}\nlisten_port={}\n",
        hex_key(&st.private_key),
        st.listen_port
    );
    for p in st.peers {
        let c = &p.config;
        s += &format!("public_key={}\n", hex_key(&c.public_key));
        if let Some(psk) = &c.preshared_key {
            s += &format!("preshared_key={}\n", hex_key(psk));
        }
        s += "protocol_version=1\n";
        if let Some(e) = c.endpoint {
            s += &format!("endpoint={e}\n");
        }
        let (sec, nsec) = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        s += &format!(
            "last_handshake_time_sec={sec}\nlast_handshake_time_nsec={nsec}\ntx_bytes={}\nrx_bytes={}\npersistent_keepalive_interval={}\n",
            p.tx_bytes, p.rx_bytes, c.keepalive_secs
        );
        for a in &c.allowed_ips {
            s += &format!("allowed_ip={a}\n");
        }
    }
    s + "errno=0\n\n"
}

/// Applies a `set=1` request.
pub fn set(codec: &WgCodec, body: &[String]) -> Result<(), String> {
    struct Pending {
        peer: WgPeer,
        remove: bool,
    }
    let mut pending: Option<Pending> = None;
    let flush = |p: Option<Pending>| -> Result<(), String> {
        match p {
            None => Ok(()),
            Some(p) if p.remove => {
                codec.remove_peer(&p.peer.public_key);
                Ok(())
            }
            Some(p) => apply_peer(codec, None, &p.peer),
        }
    };
    for line in body {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("bad line {line:?}"))?;
        let key = || parse_hex_key(v).ok_or_else(|| format!("bad key in {k}"));
        match (k, pending.as_mut()) {
            ("private_key", None) => {
                let status = codec.status();
                codec.set_device(&WgDeviceConfig {
                    private_key: key()?,
                    listen_port: status.listen_port,
                });
            }
            ("listen_port", None) => {
                let port: u16 = v.parse().map_err(|_| format!("bad port {v}"))?;
                if port != codec.status().listen_port {
                    return Err("the listen port cannot be changed at run time".into());
                }
            }
            ("fwmark", None) => {}
            ("replace_peers", None) => {
                if v == "true" {
                    codec.clear_peers();
                }
            }
            ("public_key", _) => {
                flush(pending.take())?;
                let pk = key()?;
                let peer = codec
                    .peers()
                    .into_iter()
                    .find(|p| p.public_key == pk)
                    .unwrap_or(WgPeer {
                        public_key: pk,
                        preshared_key: None,
                        endpoint: None,
                        allowed_ips: vec![],
                        keepalive_secs: 0,
                    });
                pending = Some(Pending {
                    peer,
                    remove: false,
                });
            }
            (_, None) => return Err(format!("unexpected key {k}")),
            ("remove", Some(p)) => p.remove = v == "true",
            ("update_only", Some(_)) | ("protocol_version", Some(_)) => {}
            ("preshared_key", Some(p)) => {
                let k = key()?;
                p.peer.preshared_key = (k != [0; 32]).then_some(k);
            }
            ("endpoint", Some(p)) => {
                p.peer.endpoint = Some(v.parse().map_err(|_| format!("bad endpoint {v}"))?)
            }
            ("persistent_keepalive_interval", Some(p)) => {
                p.peer.keepalive_secs = v.parse().map_err(|_| format!("bad interval {v}"))?
            }
            ("replace_allowed_ips", Some(p)) => {
                if v == "true" {
                    p.peer.allowed_ips.clear();
                }
            }
            ("allowed_ip", Some(p)) => p
                .peer
                .allowed_ips
                .push(v.parse().map_err(|_| format!("bad allowed_ip {v}"))?),
            (k, Some(_)) => return Err(format!("unexpected key {k}")),
        }
    }
    flush(pending)
}

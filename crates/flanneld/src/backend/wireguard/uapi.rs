//! The standard WireGuard cross-platform UAPI on `/var/run/wireguard/<device>.sock`, as
//! wireguard-go serves it, so `wg show flannel-wg` (and `wg set`) work against the user-space
//! device. Text protocol: `get=1` or `set=1`, `key=value` lines, a blank line ends a request;
//! every reply ends with `errno=N` and a blank line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use super::datapath::{WgDeviceConfig, WgDeviceView, WgPeer};
use super::keys::{hex_key, parse_hex_key, public_key};
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

/// Reads the device `name` through its UAPI socket (ours or wireguard-go's), as `wg show`
/// does; the private key only yields the public one and is dropped.
pub fn read_device(name: &str) -> Result<WgDeviceView, String> {
    let path = format!("{SOCKET_DIR}/{name}.sock");
    let mut conn = UnixStream::connect(&path).map_err(|e| format!("{path}: {e}"))?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    conn.write_all(b"get=1\n\n")
        .map_err(|e| format!("{path}: {e}"))?;
    let mut text = String::new();
    for line in BufReader::new(conn).lines() {
        let line = line.map_err(|e| format!("{path}: {e}"))?;
        if line.is_empty() {
            break;
        }
        text.push_str(&line);
        text.push('\n');
    }
    parse_get_reply(&text).map_err(|e| format!("{path}: {e}"))
}

/// Parses a `get=1` reply (without its final blank line).
pub fn parse_get_reply(text: &str) -> Result<WgDeviceView, String> {
    let mut view = WgDeviceView::default();
    let mut errno = None;
    for line in text.lines() {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("malformed line {line:?}"))?;
        let key = || parse_hex_key(v).ok_or_else(|| format!("bad key in {k}"));
        match k {
            "private_key" => {
                let private = key()?;
                view.public_key = (private != [0; 32]).then(|| public_key(&private));
            }
            "listen_port" => view.listen_port = v.parse().map_err(|_| format!("bad {line:?}"))?,
            "public_key" => view.peers.push(WgPeer {
                public_key: key()?,
                preshared_key: None,
                endpoint: None,
                allowed_ips: vec![],
                keepalive_secs: 0,
            }),
            "errno" => errno = v.parse::<i32>().ok(),
            _ => {
                let Some(p) = view.peers.last_mut() else {
                    continue;
                };
                match k {
                    "preshared_key" => p.preshared_key = Some(key()?).filter(|k| *k != [0; 32]),
                    "endpoint" => p.endpoint = v.parse().ok(),
                    "persistent_keepalive_interval" => p.keepalive_secs = v.parse().unwrap_or(0),
                    "allowed_ip" => p
                        .allowed_ips
                        .push(v.parse().map_err(|_| format!("bad {line:?}"))?),
                    _ => {}
                }
            }
        }
    }
    match errno {
        Some(0) => Ok(view),
        Some(n) => Err(format!("the device answered errno={n}")),
        None => Err("no errno in the reply (not a WireGuard UAPI socket?)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_reply_is_read_back_without_secrets() {
        let private = [5u8; 32];
        let text = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\npreshared_key={}\nprotocol_version=1\nendpoint=[fd00::2]:51821\nlast_handshake_time_sec=0\npersistent_keepalive_interval=25\nallowed_ip=10.5.2.0/24\nallowed_ip=fd10:0:2::/64\npublic_key={}\npreshared_key={}\nendpoint=192.168.1.3:51820\nerrno=0\n",
            hex_key(&private),
            hex_key(&[2; 32]),
            hex_key(&[8; 32]),
            hex_key(&[3; 32]),
            hex_key(&[0; 32]),
        );
        let v = parse_get_reply(&text).unwrap();
        assert_eq!(v.public_key, Some(public_key(&private)));
        assert_eq!(v.listen_port, 51820);
        assert_eq!(v.peers.len(), 2);
        assert_eq!(v.peers[0].public_key, [2; 32]);
        assert_eq!(v.peers[0].preshared_key, Some([8; 32]));
        assert_eq!(
            v.peers[0].endpoint,
            Some("[fd00::2]:51821".parse().unwrap())
        );
        assert_eq!(v.peers[0].keepalive_secs, 25);
        assert_eq!(
            v.peers[0].allowed_ips,
            vec![
                "10.5.2.0/24".parse().unwrap(),
                "fd10:0:2::/64".parse().unwrap()
            ]
        );
        assert_eq!(v.peers[1].preshared_key, None, "an all-zero PSK is none");
        assert!(parse_get_reply("errno=19\n")
            .unwrap_err()
            .contains("errno=19"));
        assert!(parse_get_reply("listen_port=1\n").is_err());
        assert!(parse_get_reply("garbage\nerrno=0\n").is_err());
    }
}

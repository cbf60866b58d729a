//! WireGuard keys as flannel keeps them: the private key file (`/run/flannel/wgkey`, or
//! `WIREGUARD_KEY_FILE`) holds the base64 key without a newline, mode 0400, written once and
//! reused so the public key stays the same across restarts; keys in leases and the PSK are
//! base64 too. Error texts follow Go's `wgtypes.ParseKey`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};

use super::datapath::WgKey;

/// Where the private key is kept unless `WIREGUARD_KEY_FILE` says otherwise.
pub const DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";

/// The key file path in effect.
pub fn key_file() -> PathBuf {
    std::env::var_os("WIREGUARD_KEY_FILE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_FILE))
}

/// Parses a base64 key of 32 bytes, with `wgtypes.ParseKey`'s messages.
pub fn parse_key(s: &str) -> Result<WgKey, String> {
    let raw = STANDARD
        .decode(s)
        .map_err(|e| format!("wgtypes: failed to parse base64-encoded key: {e}"))?;
    <WgKey>::try_from(raw.as_slice())
        .map_err(|_| format!("wgtypes: incorrect key size: {}", raw.len()))
}

/// Base64 text of a key.
pub fn encode_key(k: &WgKey) -> String {
    STANDARD.encode(k)
}

/// Hex text of a key (the UAPI's form).
pub fn hex_key(k: &WgKey) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses the UAPI's hex form of a key.
pub fn parse_hex_key(s: &str) -> Option<WgKey> {
    if s.len() != 64 {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

/// The public key of a private key.
pub fn public_key(private: &WgKey) -> WgKey {
    PublicKey::from(&StaticSecret::from(*private)).to_bytes()
}

/// A new private key, clamped as `wgtypes.GeneratePrivateKey` does.
pub fn generate_private_key() -> WgKey {
    let mut k: WgKey = rand::random();
    k[0] &= 248;
    k[31] = (k[31] & 127) | 64;
    k
}

/// Reads the private key from `path`, or creates it (mode 0400, base64, no newline) when the
/// file does not exist. A file that exists but does not hold a key is an error: it is never
/// overwritten, so a typo cannot silently change the host's identity.
pub fn load_or_create(path: &Path) -> Result<(WgKey, bool), String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_key(text.trim())
            .map(|k| (k, false))
            .map_err(|e| format!("failed to parse key file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate_private_key();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("failed to create {}: {e}", dir.display()))?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(path)
                .map_err(|e| format!("failed to write key file {}: {e}", path.display()))?;
            f.write_all(encode_key(&key).as_bytes())
                .map_err(|e| format!("failed to write key file {}: {e}", path.display()))?;
            Ok((key, true))
        }
        Err(e) => Err(format!("failed to read key file {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_problem() {
        assert_eq!(
            parse_key("AAAA").unwrap_err(),
            "wgtypes: incorrect key size: 3"
        );
        assert!(parse_key("not base64!")
            .unwrap_err()
            .starts_with("wgtypes: failed to parse base64-encoded key"));
        let k = generate_private_key();
        assert_eq!(parse_key(&encode_key(&k)).unwrap(), k);
        assert_eq!(parse_hex_key(&hex_key(&k)).unwrap(), k);
    }

    #[test]
    fn known_public_key() {
        // From `wg pubkey`: private yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
        let private = parse_key("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(
            encode_key(&public_key(&private)),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn key_file_is_created_once_0400_without_newline() {
        let dir = std::env::temp_dir().join(format!("wgkey-test-{}", std::process::id()));
        let path = dir.join("sub/wgkey");
        let _ = std::fs::remove_dir_all(&dir);
        let (k1, created) = load_or_create(&path).unwrap();
        assert!(created);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 44);
        assert!(!text.ends_with('\n'));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400);
        let (k2, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(k1, k2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

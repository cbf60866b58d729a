//! A small typed client of strongSwan's VICI protocol (the control socket of `charon`,
//! `unix:///var/run/charon.vici`), as `swanctl` speaks it.
//!
//! Wire format: every packet is a 4-byte big-endian length, then a 1-byte packet type
//! (`CMD_REQUEST`, `CMD_RESPONSE`, `CMD_UNKNOWN`, `EVENT_*`), then for named types a 1-byte
//! name length and the name, then a message: a sequence of elements `SECTION_START name`,
//! `SECTION_END`, `KEY_VALUE key value`, `LIST_START name`, `LIST_ITEM value`, `LIST_END`
//! (names: 1-byte length; values: 2-byte big-endian length).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Where charon serves VICI (the reference's `unix:///var/run/charon.vici`).
pub const DEFAULT_SOCKET: &str = "/var/run/charon.vici";

/// charon's upper bound of a VICI packet.
const MAX_PACKET: usize = 512 * 1024;

/// How long one request may take before the daemon is considered wedged.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

mod packet {
    pub const CMD_REQUEST: u8 = 0;
    pub const CMD_RESPONSE: u8 = 1;
    pub const CMD_UNKNOWN: u8 = 2;
    pub const EVENT_REGISTER: u8 = 3;
    pub const EVENT_UNREGISTER: u8 = 4;
    pub const EVENT_CONFIRM: u8 = 5;
    pub const EVENT_UNKNOWN: u8 = 6;
    pub const EVENT: u8 = 7;
}

mod element {
    pub const SECTION_START: u8 = 1;
    pub const SECTION_END: u8 = 2;
    pub const KEY_VALUE: u8 = 3;
    pub const LIST_START: u8 = 4;
    pub const LIST_ITEM: u8 = 5;
    pub const LIST_END: u8 = 6;
}

/// A VICI failure.
#[derive(Debug, thiserror::Error)]
pub enum ViciError {
    /// The socket could not be reached or broke.
    #[error("vici socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// charon did not answer in time.
    #[error("vici socket {0}: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout(PathBuf),
    /// charon does not know the command.
    #[error("vici command {0:?} is unknown to charon")]
    UnknownCommand(String),
    /// A message that cannot be encoded (name or value too long).
    #[error("cannot encode vici message: {0}")]
    Encode(String),
    /// A malformed packet or message from charon.
    #[error("malformed vici message: {0}")]
    Decode(String),
    /// The command ran and failed (`success = no`).
    #[error("vici command {command:?} failed: {errmsg}")]
    Failed {
        /// The command.
        command: String,
        /// charon's `errmsg`.
        errmsg: String,
    },
}

/// A message value: a string, a list of strings or a nested section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `KEY_VALUE`.
    Str(String),
    /// `LIST_START` .. `LIST_END`.
    List(Vec<String>),
    /// `SECTION_START` .. `SECTION_END`.
    Section(Section),
}

/// A VICI message (or section): named values in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Section {
    entries: Vec<(String, Value)>,
}

impl Section {
    /// An empty message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key/value pair.
    pub fn kv(mut self, key: &str, value: impl Into<String>) -> Self {
        self.entries.push((key.into(), Value::Str(value.into())));
        self
    }

    /// Adds a list.
    pub fn list<S: Into<String>>(mut self, key: &str, items: impl IntoIterator<Item = S>) -> Self {
        let items = items.into_iter().map(Into::into).collect();
        self.entries.push((key.into(), Value::List(items)));
        self
    }

    /// Adds a nested section.
    pub fn section(mut self, key: &str, s: Section) -> Self {
        self.entries.push((key.into(), Value::Section(s)));
        self
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The string value of `key`.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The list value of `key`.
    pub fn get_list(&self, key: &str) -> Option<&[String]> {
        match self.get(key)? {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    /// The section value of `key`.
    pub fn get_section(&self, key: &str) -> Option<&Section> {
        match self.get(key)? {
            Value::Section(s) => Some(s),
            _ => None,
        }
    }

    /// Appends the message's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ViciError> {
        for (k, v) in &self.entries {
            match v {
                Value::Str(s) => {
                    out.push(element::KEY_VALUE);
                    put_name(out, k)?;
                    put_value(out, s)?;
                }
                Value::List(items) => {
                    out.push(element::LIST_START);
                    put_name(out, k)?;
                    for i in items {
                        out.push(element::LIST_ITEM);
                        put_value(out, i)?;
                    }
                    out.push(element::LIST_END);
                }
                Value::Section(s) => {
                    out.push(element::SECTION_START);
                    put_name(out, k)?;
                    s.encode(out)?;
                    out.push(element::SECTION_END);
                }
            }
        }
        Ok(())
    }

    /// Decodes a whole message.
    pub fn decode(buf: &[u8]) -> Result<Section, ViciError> {
        let mut r = Reader { buf, pos: 0 };
        let s = r.section(0)?;
        if r.pos != buf.len() {
            return Err(ViciError::Decode("unbalanced SECTION_END".into()));
        }
        Ok(s)
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) -> Result<(), ViciError> {
    let len = u8::try_from(name.len())
        .map_err(|_| ViciError::Encode(format!("name {name:?} longer than 255 bytes")))?;
    out.push(len);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

fn put_value(out: &mut Vec<u8>, value: &str) -> Result<(), ViciError> {
    let len = u16::try_from(value.len())
        .map_err(|_| ViciError::Encode("value longer than 65535 bytes".into()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value.as_bytes());
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ViciError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| ViciError::Decode("truncated message".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, ViciError> {
        Ok(self.take(1)?[0])
    }

    fn name(&mut self) -> Result<String, ViciError> {
        let n = self.byte()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn value(&mut self) -> Result<String, ViciError> {
        let b = self.take(2)?;
        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    /// Elements up to the end of the buffer (depth 0) or the matching `SECTION_END`.
    fn section(&mut self, depth: usize) -> Result<Section, ViciError> {
        if depth > 32 {
            return Err(ViciError::Decode("sections nested too deeply".into()));
        }
        let mut s = Section::new();
        while self.pos < self.buf.len() {
            match self.byte()? {
                element::KEY_VALUE => {
                    let k = self.name()?;
                    let v = self.value()?;
                    s.entries.push((k, Value::Str(v)));
                }
                element::LIST_START => {
                    let k = self.name()?;
                    let mut items = vec![];
                    loop {
                        match self.byte()? {
                            element::LIST_ITEM => items.push(self.value()?),
                            element::LIST_END => break,
                            t => {
                                return Err(ViciError::Decode(format!(
                                    "element type {t} inside list {k:?}"
                                )))
                            }
                        }
                    }
                    s.entries.push((k, Value::List(items)));
                }
                element::SECTION_START => {
                    let k = self.name()?;
                    let inner = self.section(depth + 1)?;
                    s.entries.push((k, Value::Section(inner)));
                }
                element::SECTION_END if depth > 0 => return Ok(s),
                t => return Err(ViciError::Decode(format!("unexpected element type {t}"))),
            }
        }
        if depth > 0 {
            return Err(ViciError::Decode("missing SECTION_END".into()));
        }
        Ok(s)
    }
}

/// One packet: its type, its name (named types) and its message bytes.
#[derive(Debug, PartialEq, Eq)]
struct Packet {
    kind: u8,
    name: Option<String>,
    body: Vec<u8>,
}

fn is_named(kind: u8) -> bool {
    matches!(
        kind,
        packet::CMD_REQUEST | packet::EVENT_REGISTER | packet::EVENT_UNREGISTER | packet::EVENT
    )
}

impl Packet {
    fn encode(&self) -> Result<Vec<u8>, ViciError> {
        let mut p = vec![self.kind];
        if let Some(n) = &self.name {
            put_name(&mut p, n)?;
        }
        p.extend_from_slice(&self.body);
        if p.len() > MAX_PACKET {
            return Err(ViciError::Encode(format!("packet of {} bytes", p.len())));
        }
        let mut out = (p.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&p);
        Ok(out)
    }

    fn decode(p: &[u8]) -> Result<Packet, ViciError> {
        let mut r = Reader { buf: p, pos: 0 };
        let kind = r.byte()?;
        let name = if is_named(kind) {
            Some(r.name()?)
        } else {
            None
        };
        Ok(Packet {
            kind,
            name,
            body: p[r.pos..].to_vec(),
        })
    }
}

/// A connection to charon's VICI socket.
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
}

impl Client {
    /// Connects to the socket at `path`.
    pub async fn connect(path: &Path) -> Result<Client, ViciError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ViciError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Client {
            stream,
            path: path.to_path_buf(),
        })
    }

    fn io(&self) -> impl Fn(std::io::Error) -> ViciError + '_ {
        |source| ViciError::Io {
            path: self.path.clone(),
            source,
        }
    }

    async fn read_packet(&mut self) -> Result<Packet, ViciError> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).await.map_err(self.io())?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_PACKET {
            return Err(ViciError::Decode(format!("packet length {len}")));
        }
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf).await.map_err(self.io())?;
        Packet::decode(&buf)
    }

    async fn exchange(&mut self, command: &str, msg: &Section) -> Result<Section, ViciError> {
        let mut body = vec![];
        msg.encode(&mut body)?;
        let p = Packet {
            kind: packet::CMD_REQUEST,
            name: Some(command.into()),
            body,
        }
        .encode()?;
        self.stream.write_all(&p).await.map_err(self.io())?;
        loop {
            let answer = self.read_packet().await?;
            match answer.kind {
                packet::CMD_RESPONSE => return Section::decode(&answer.body),
                packet::CMD_UNKNOWN => return Err(ViciError::UnknownCommand(command.into())),
                // Events of a registration (none here): not the answer.
                packet::EVENT | packet::EVENT_CONFIRM | packet::EVENT_UNKNOWN => continue,
                t => return Err(ViciError::Decode(format!("unexpected packet type {t}"))),
            }
        }
    }

    /// Sends command `command` with `msg` and returns the response message.
    pub async fn request(&mut self, command: &str, msg: &Section) -> Result<Section, ViciError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(command, msg)).await {
            Ok(r) => r,
            Err(_) => Err(ViciError::Timeout(self.path.clone())),
        }
    }

    /// Like [`Client::request`] for commands that answer `success = yes|no` + `errmsg`.
    pub async fn call(&mut self, command: &str, msg: &Section) -> Result<Section, ViciError> {
        let r = self.request(command, msg).await?;
        if r.get_str("success") == Some("yes") {
            Ok(r)
        } else {
            Err(ViciError::Failed {
                command: command.into(),
                errmsg: r.get_str("errmsg").unwrap_or("(no errmsg)").to_string(),
            })
        }
    }

    /// `version`: the daemon name and version, e.g. `charon 5.9.8`.
    pub async fn version(&mut self) -> Result<String, ViciError> {
        let r = self.request("version", &Section::new()).await?;
        Ok(format!(
            "{} {}",
            r.get_str("daemon").unwrap_or("?"),
            r.get_str("version").unwrap_or("?")
        ))
    }

    /// `load-shared`: an IKE pre-shared key `data` for `owners`, replacing the key with the same
    /// `id`.
    pub async fn load_shared(
        &mut self,
        id: &str,
        data: &str,
        owners: &[String],
    ) -> Result<(), ViciError> {
        let msg = Section::new()
            .kv("id", id)
            .kv("type", "IKE")
            .kv("data", data)
            .list("owners", owners.iter().cloned());
        self.call("load-shared", &msg).await.map(|_| ())
    }

    /// `unload-shared`: removes the key loaded with `id`.
    pub async fn unload_shared(&mut self, id: &str) -> Result<(), ViciError> {
        self.call("unload-shared", &Section::new().kv("id", id))
            .await
            .map(|_| ())
    }

    /// `load-conn`: loads (or replaces) connection `name` with its configuration.
    pub async fn load_conn(&mut self, name: &str, conf: Section) -> Result<(), ViciError> {
        self.call("load-conn", &Section::new().section(name, conf))
            .await
            .map(|_| ())
    }

    /// `unload-conn`: removes connection `name` (and closes its SAs).
    pub async fn unload_conn(&mut self, name: &str) -> Result<(), ViciError> {
        self.call("unload-conn", &Section::new().kv("name", name))
            .await
            .map(|_| ())
    }

    /// `get-conns`: the names of the connections loaded over VICI.
    pub async fn get_conns(&mut self) -> Result<Vec<String>, ViciError> {
        let r = self.request("get-conns", &Section::new()).await?;
        Ok(r.get_list("conns")
            .map(<[String]>::to_vec)
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_swanctl_does() {
        let msg = Section::new()
            .kv("name", "c")
            .list("owners", ["1.2.3.4"])
            .section("s", Section::new().kv("k", "v"));
        let mut body = vec![];
        msg.encode(&mut body).unwrap();
        assert_eq!(
            body,
            [
                &[3, 4][..],
                b"name",
                &[0, 1],
                b"c",
                &[4, 6],
                b"owners",
                &[5, 0, 7],
                b"1.2.3.4",
                &[6, 1, 1],
                b"s",
                &[3, 1],
                b"k",
                &[0, 1],
                b"v",
                &[2]
            ]
            .concat()
        );
        assert_eq!(Section::decode(&body).unwrap(), msg);
        let p = Packet {
            kind: packet::CMD_REQUEST,
            name: Some("version".into()),
            body: vec![],
        };
        let wire = p.encode().unwrap();
        assert_eq!(wire, [&[0, 0, 0, 9, 0, 7][..], b"version"].concat());
        assert_eq!(Packet::decode(&wire[4..]).unwrap(), p);
        let resp = Packet::decode(&[1, 3, 1, b'a', 0, 0]).unwrap();
        assert_eq!(resp.name, None);
        assert_eq!(Section::decode(&resp.body).unwrap().get_str("a"), Some(""));
    }

    #[test]
    fn rejects_malformed_messages() {
        for bad in [
            &[3, 5, b'a'][..],         // truncated name
            &[3, 1, b'a', 0, 9, b'x'], // truncated value
            &[2],                      // SECTION_END at top level
            &[1, 1, b's'],             // missing SECTION_END
            &[4, 1, b'l', 3],          // KEY_VALUE inside a list
            &[9],                      // unknown element
        ] {
            assert!(Section::decode(bad).is_err(), "{bad:?}");
        }
        let deep: Vec<u8> = std::iter::repeat_n([1u8, 1, b's'], 40).flatten().collect();
        assert!(Section::decode(&deep).is_err());
        assert!(Packet::decode(&[]).is_err());
        let long = "x".repeat(256);
        assert!(Section::new().kv(&long, "v").encode(&mut vec![]).is_err());
    }
}

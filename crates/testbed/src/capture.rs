//! Packet captures with tcpdump inside a namespace, for tests that assert what is (and is not)
//! on a wire, e.g. that an underlay carries only encrypted tunnel traffic.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::netns::NetNs;

/// One captured packet, from its IP header on (IPv4 or IPv6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet(pub Vec<u8>);

impl Packet {
    /// The IP version (4 or 6; 0 for an empty packet).
    pub fn version(&self) -> u8 {
        self.0.first().map_or(0, |b| b >> 4)
    }

    /// The transport protocol and where its header starts (IPv6 extension headers are not
    /// followed: their protocol is reported as is).
    pub fn transport(&self) -> Option<(u8, usize)> {
        let p = &self.0;
        match self.version() {
            4 if p.len() >= 20 => Some((p[9], (p[0] & 0xf) as usize * 4)),
            6 if p.len() >= 40 => Some((p[6], 40)),
            _ => None,
        }
    }

    /// Source and destination addresses.
    pub fn addrs(&self) -> Option<(IpAddr, IpAddr)> {
        let p = &self.0;
        match self.version() {
            4 if p.len() >= 20 => {
                let a: [u8; 4] = p[12..16].try_into().ok()?;
                let b: [u8; 4] = p[16..20].try_into().ok()?;
                Some((a.into(), b.into()))
            }
            6 if p.len() >= 40 => {
                let a: [u8; 16] = p[8..24].try_into().ok()?;
                let b: [u8; 16] = p[24..40].try_into().ok()?;
                Some((a.into(), b.into()))
            }
            _ => None,
        }
    }

    /// Source port, destination port and payload of a UDP packet.
    pub fn udp(&self) -> Option<(u16, u16, &[u8])> {
        let (proto, off) = self.transport()?;
        let u = self.0.get(off..)?;
        if proto != 17 || u.len() < 8 {
            return None;
        }
        Some((
            u16::from_be_bytes([u[0], u[1]]),
            u16::from_be_bytes([u[2], u[3]]),
            &u[8..],
        ))
    }
}

/// Captures on `dev` in `ns` what matches the tcpdump `filter` while `trigger` runs: tcpdump
/// is started (in immediate mode: each packet is handed over as it passes), `trigger` runs
/// once tcpdump reports that it listens (at most 10 s later), and the capture stops when
/// `trigger` has returned and tcpdump's output has been quiet for 300 ms (at most 5 s), so
/// the packets `trigger` caused are all in. Panics if tcpdump fails to start.
pub fn capture(ns: &NetNs, dev: &str, filter: &str, trigger: impl FnOnce()) -> Vec<Packet> {
    let mut child = ns
        .command("tcpdump")
        .args([
            "-Z",
            "root",
            "--immediate-mode",
            "-i",
            dev,
            "-n",
            "-x",
            "-l",
            "-U",
        ])
        .arg(filter)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (apt-get install tcpdump)");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let errs = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("listening on") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let stdout = child.stdout.take().expect("stdout");
    let text = Arc::new(Mutex::new(String::new()));
    let out = {
        let text = text.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut t = text.lock().unwrap_or_else(|p| p.into_inner());
                t.push_str(&line);
                t.push('\n');
            }
        })
    };
    let len = || text.lock().unwrap_or_else(|p| p.into_inner()).len();
    if rx.recv_timeout(Duration::from_secs(10)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "tcpdump on {dev} did not start: {}",
            errs.join().unwrap_or_default()
        );
    }
    trigger();
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut last, mut since) = (len(), Instant::now());
    while Instant::now() < deadline && since.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(20));
        let now = len();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    // SIGINT: tcpdump writes out what it has and exits.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    let _ = out.join();
    let _ = errs.join();
    let text = text.lock().unwrap_or_else(|p| p.into_inner());
    parse_hex_dump(&text)
}

/// The packets of `tcpdump -x` output: a header line per packet, then `0x0000:  4500 ...` lines.
pub fn parse_hex_dump(text: &str) -> Vec<Packet> {
    let mut pkts: Vec<Packet> = vec![];
    for line in text.lines() {
        if !line.trim_start().starts_with("0x") {
            pkts.push(Packet(vec![]));
            continue;
        }
        let Some(cur) = pkts.last_mut() else { continue };
        for word in line.split(':').nth(1).unwrap_or("").split_whitespace() {
            for i in (0..word.len()).step_by(2) {
                if let Some(b) = word
                    .get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    cur.0.push(b);
                }
            }
        }
    }
    pkts.retain(|p| !p.0.is_empty());
    pkts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_dump_parses_v4_and_v6_udp() {
        let text = "\
12:00:00.000 IP 192.168.100.11.51820 > 192.168.100.12.51820: UDP, length 4
\t0x0000:  4500 0020 0000 4000 4011 0000 c0a8 640b
\t0x0010:  c0a8 640c ca6c ca6c 000c 0000 0400 0000
12:00:00.001 IP6 fd00:100::11.51821 > fd00:100::12.51821: UDP, length 4
\t0x0000:  6000 0000 000c 1140 fd00 0100 0000 0000
\t0x0010:  0000 0000 0000 0011 fd00 0100 0000 0000
\t0x0020:  0000 0000 0000 0012 ca6d ca6d 000c 0000
\t0x0030:  0100 0000
";
        let p = parse_hex_dump(text);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].version(), 4);
        assert_eq!(p[0].udp(), Some((51820, 51820, &[4u8, 0, 0, 0][..])));
        assert_eq!(p[1].version(), 6);
        assert_eq!(p[1].udp(), Some((51821, 51821, &[1u8, 0, 0, 0][..])));
        assert_eq!(
            p[1].addrs().unwrap().1,
            "fd00:100::12".parse::<IpAddr>().unwrap()
        );
    }
}

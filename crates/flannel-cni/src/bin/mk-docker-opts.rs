//! `mk-docker-opts`: turns flanneld's subnet.env into Docker daemon options, with the options
//! and output of flannel's `mk-docker-opts.sh` (`-f -d -i -c -m -k`).

use std::process::ExitCode;

fn usage(argv0: &str) -> ExitCode {
    eprintln!(
        "{argv0} [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate Docker daemon options based on flannel env file
OPTIONS:
\t-f\tPath to flannel env file. Defaults to /run/flannel/subnet.env
\t-d\tPath to Docker env file to write to. Defaults to /run/docker_opts.env
\t-i\tOutput each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500
\t-c\tOutput combined Docker options into DOCKER_OPTS var
\t-k\tSet the combined options key to this value (default DOCKER_OPTS=)
\t-m\tDo not output --ip-masq (useful for older Docker version)"
    );
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let argv0 = args
        .first()
        .cloned()
        .unwrap_or_else(|| "mk-docker-opts".into());
    let mut flannel_env = "/run/flannel/subnet.env".to_string();
    let mut docker_env = "/run/docker_opts.env".to_string();
    let mut key = "DOCKER_OPTS".to_string();
    let (mut indiv, mut combined, mut ipmasq) = (false, false, true);
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        let mut take = || {
            i += 1;
            args.get(i).cloned()
        };
        match a.as_str() {
            "-f" => match take() {
                Some(v) => flannel_env = v,
                None => return usage(&argv0),
            },
            "-d" => match take() {
                Some(v) => docker_env = v,
                None => return usage(&argv0),
            },
            "-k" => match take() {
                Some(v) => key = v,
                None => return usage(&argv0),
            },
            "-i" => indiv = true,
            "-c" => combined = true,
            "-m" => ipmasq = false,
            _ => return usage(&argv0),
        }
        i += 1;
    }
    if !indiv && !combined {
        indiv = true;
        combined = true;
    }
    let vars = std::fs::read_to_string(&flannel_env)
        .map(|t| flannel_types::subnet_env::read_dotenv(&t))
        .unwrap_or_default();
    let get = |k: &str| vars.get(k).filter(|v| !v.is_empty()).cloned();
    // Options in the order the script's `set | grep` lists them (alphabetical).
    let mut opts: Vec<(&str, String)> = vec![];
    if let Some(s) = get("FLANNEL_SUBNET") {
        opts.push(("DOCKER_OPT_BIP", format!("--bip={s}")));
    }
    if let Some(m) = get("FLANNEL_IPMASQ").filter(|_| ipmasq) {
        match m.as_str() {
            "true" => opts.push(("DOCKER_OPT_IPMASQ", "--ip-masq=false".into())),
            "false" => opts.push(("DOCKER_OPT_IPMASQ", "--ip-masq=true".into())),
            other => {
                eprintln!("Invalid value of FLANNEL_IPMASQ: {other}");
                return ExitCode::from(1);
            }
        }
    }
    if let Some(m) = get("FLANNEL_MTU") {
        opts.push(("DOCKER_OPT_MTU", format!("--mtu={m}")));
    }
    let mut out = String::new();
    let mut docker_opts = std::env::var(&key)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| format!("{v} "))
        .unwrap_or_default();
    for (name, value) in &opts {
        if indiv {
            out.push_str(&format!("{name}=\"{value}\"\n"));
        }
        docker_opts.push_str(&format!(" {value}"));
    }
    if combined {
        out.push_str(&format!("{key}=\"{docker_opts}\"\n"));
    }
    if let Err(e) = std::fs::write(&docker_env, out) {
        eprintln!("{argv0}: cannot write {docker_env}: {e}");
        return ExitCode::from(1);
    }
    // Like the script: refuse when the routing table already routes our subnet via a gateway.
    if let Some(subnet) = get("FLANNEL_SUBNET") {
        if let Ok(net) = subnet.parse::<ipnet::Ipv4Net>() {
            if let Some(route) = gateway_route_to(net.trunc()) {
                eprintln!("Your routing table already contains the subnet: {route}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

/// A route to exactly `net` through a gateway, from /proc/net/route.
fn gateway_route_to(net: ipnet::Ipv4Net) -> Option<String> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(u32::from_be)
            .map(std::net::Ipv4Addr::from)
    };
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Some(dst), Some(gw), Some(mask)) = (hex(f[1]), hex(f[2]), hex(f[7])) else {
            continue;
        };
        let len = u32::from(mask).count_ones() as u8;
        if dst == net.network() && len == net.prefix_len() && !gw.is_unspecified() {
            return Some(format!("{net} via {gw} dev {}", f[0]));
        }
    }
    None
}

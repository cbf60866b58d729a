//! flanneld's command line, compatible with Go flannel's `flag` package.
//!
//! Operators keep their unit files and DaemonSet args, so every flag keeps its name, default and
//! syntax (one or two dashes, `--flag=value` or `--flag value`, `--bool` / `--bool=false`), with
//! `FLANNELD_*` environment variables as fallback. Unlike Go flannel, a mistake exits non-zero.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Every option of flanneld, with the reference defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Comma-separated etcd endpoints.
    pub etcd_endpoints: String,
    /// etcd key prefix of this flannel network.
    pub etcd_prefix: String,
    /// Client TLS key for etcd.
    pub etcd_keyfile: String,
    /// Client TLS certificate for etcd.
    pub etcd_certfile: String,
    /// CA bundle used to verify etcd.
    pub etcd_cafile: String,
    /// etcd v3 user.
    pub etcd_username: String,
    /// etcd v3 password (never logged).
    pub etcd_password: String,
    /// Interfaces (names or IPs) to try, in order.
    pub iface: Vec<String>,
    /// Regexes matched against interface IPs, then names.
    pub iface_regex: Vec<String>,
    /// Pick the interface the kernel would use to reach this address.
    pub iface_can_reach: String,
    /// Where subnet.env is written.
    pub subnet_file: String,
    /// IPv4 address advertised to other hosts.
    pub public_ip: String,
    /// IPv6 address advertised to other hosts.
    pub public_ipv6: String,
    /// Renew the lease this many minutes before it expires.
    pub subnet_lease_renew_margin: i64,
    /// Install masquerade rules for traffic leaving the overlay.
    pub ip_masq: bool,
    /// Do not use fully random source ports when masquerading.
    pub ip_masq_fully_random_disable: bool,
    /// Use the Kubernetes API instead of etcd.
    pub kube_subnet_mgr: bool,
    /// Kubernetes API server URL.
    pub kube_api_url: String,
    /// Prefix of the node annotations flannel reads and writes.
    pub kube_annotation_prefix: String,
    /// kubeconfig path.
    pub kubeconfig_file: String,
    /// Print the version and exit.
    pub version: bool,
    /// Address of the health server.
    pub healthz_ip: String,
    /// Port of the health server; 0 disables it.
    pub healthz_port: i64,
    /// Seconds between checks of the firewall rules (and blackhole route).
    pub iptables_resync: i64,
    /// Add FORWARD accept rules for the flannel network.
    pub iptables_forward_rules: bool,
    /// Keep a blackhole route for this host's subnet.
    pub ip_blackhole_route: bool,
    /// net-conf.json path (Kubernetes mode).
    pub net_config_path: String,
    /// Kubernetes mode: clear the node's NetworkUnavailable condition after start.
    pub set_node_network_unavailable: bool,
    /// Log verbosity (klog `-v`).
    pub v: i64,
    /// klog per-file verbosity (accepted for compatibility).
    pub vmodule: String,
    /// klog backtrace location (accepted for compatibility).
    pub log_backtrace_at: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            etcd_endpoints: "http://127.0.0.1:4001,http://127.0.0.1:2379".into(),
            etcd_prefix: "/coreos.com/network".into(),
            etcd_keyfile: String::new(),
            etcd_certfile: String::new(),
            etcd_cafile: String::new(),
            etcd_username: String::new(),
            etcd_password: String::new(),
            iface: vec![],
            iface_regex: vec![],
            iface_can_reach: String::new(),
            subnet_file: "/run/flannel/subnet.env".into(),
            public_ip: String::new(),
            public_ipv6: String::new(),
            subnet_lease_renew_margin: 60,
            ip_masq: false,
            ip_masq_fully_random_disable: false,
            kube_subnet_mgr: false,
            kube_api_url: String::new(),
            kube_annotation_prefix: "flannel.alpha.coreos.com".into(),
            kubeconfig_file: String::new(),
            version: false,
            healthz_ip: "0.0.0.0".into(),
            healthz_port: 0,
            iptables_resync: 5,
            iptables_forward_rules: true,
            ip_blackhole_route: false,
            net_config_path: "/etc/kube-flannel/net-conf.json".into(),
            set_node_network_unavailable: true,
            v: 0,
            vmodule: String::new(),
            log_backtrace_at: String::new(),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Str,
    StrList,
    Int,
    Bool,
}

struct Flag {
    name: &'static str,
    kind: Kind,
    help: &'static str,
}

const fn flag(name: &'static str, kind: Kind, help: &'static str) -> Flag {
    Flag { name, kind, help }
}

const FLAGS: &[Flag] = &[
    flag(
        "etcd-endpoints",
        Kind::Str,
        "a comma-delimited list of etcd endpoints",
    ),
    flag("etcd-prefix", Kind::Str, "etcd prefix"),
    flag(
        "etcd-keyfile",
        Kind::Str,
        "SSL key file used to secure etcd communication",
    ),
    flag(
        "etcd-certfile",
        Kind::Str,
        "SSL certification file used to secure etcd communication",
    ),
    flag(
        "etcd-cafile",
        Kind::Str,
        "SSL Certificate Authority file used to secure etcd communication",
    ),
    flag(
        "etcd-username",
        Kind::Str,
        "username for BasicAuth to etcd",
    ),
    flag(
        "etcd-password",
        Kind::Str,
        "password for BasicAuth to etcd",
    ),
    flag(
        "iface",
        Kind::StrList,
        "interface to use (IP or name) for inter-host communication. Can be specified multiple times to check each option in order. Returns the first match found.",
    ),
    flag(
        "iface-regex",
        Kind::StrList,
        "regex expression to match the first interface to use (IP or name) for inter-host communication. Can be specified multiple times to check each regex in order. Returns the first match found. Regexes are checked after specific interfaces specified by the iface option have already been checked.",
    ),
    flag(
        "iface-can-reach",
        Kind::Str,
        "detect interface to use (IP or name) for inter-host communication based on which will be used for provided IP. This is exactly the interface to use of command 'ip route get <ip-address>'",
    ),
    flag(
        "subnet-file",
        Kind::Str,
        "filename where env variables (subnet, MTU, ... ) will be written to",
    ),
    flag(
        "public-ip",
        Kind::Str,
        "IP accessible by other nodes for inter-host communication",
    ),
    flag(
        "public-ipv6",
        Kind::Str,
        "IPv6 accessible by other nodes for inter-host communication",
    ),
    flag(
        "subnet-lease-renew-margin",
        Kind::Int,
        "subnet lease renewal margin, in minutes, ranging from 1 to 1439",
    ),
    flag(
        "ip-masq",
        Kind::Bool,
        "setup IP masquerade rule for traffic destined outside of overlay network",
    ),
    flag(
        "ip-masq-fully-random-disable",
        Kind::Bool,
        "disable fully random source port allocation in masquerade rules",
    ),
    flag(
        "kube-subnet-mgr",
        Kind::Bool,
        "contact the Kubernetes API for subnet assignment instead of etcd.",
    ),
    flag(
        "kube-api-url",
        Kind::Str,
        "Kubernetes API server URL. Does not need to be specified if flannel is running in a pod.",
    ),
    flag(
        "kube-annotation-prefix",
        Kind::Str,
        "Kubernetes annotation prefix. Can contain single slash \"/\", otherwise it will be appended at the end.",
    ),
    flag(
        "kubeconfig-file",
        Kind::Str,
        "kubeconfig file location. Does not need to be specified if flannel is running in a pod.",
    ),
    flag("version", Kind::Bool, "print version and exit"),
    flag(
        "healthz-ip",
        Kind::Str,
        "the IP address for healthz server to listen",
    ),
    flag(
        "healthz-port",
        Kind::Int,
        "the port for healthz server to listen(0 to disable)",
    ),
    flag(
        "iptables-resync",
        Kind::Int,
        "resync period for iptables rules, in seconds",
    ),
    flag(
        "iptables-forward-rules",
        Kind::Bool,
        "add default accept rules to FORWARD chain in iptables",
    ),
    flag(
        "ip-blackhole-route",
        Kind::Bool,
        "add blackhole route for the local subnet",
    ),
    flag(
        "net-config-path",
        Kind::Str,
        "path to the network configuration file",
    ),
    flag(
        "set-node-network-unavailable",
        Kind::Bool,
        "set NodeNetworkUnavailable after ready",
    ),
    flag("v", Kind::Int, "number for the log level verbosity"),
    flag(
        "vmodule",
        Kind::Str,
        "comma-separated list of pattern=N settings for file-filtered logging",
    ),
    flag(
        "log_backtrace_at",
        Kind::Str,
        "when logging hits line file:N, emit a stack trace",
    ),
];

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Run the daemon with these options.
    Run(Box<Options>),
    /// Print usage to stderr and exit 0.
    Help,
    /// `flanneld doctor [flags] [--json]`: compare the store, subnet.env and the kernel, read-only.
    Doctor {
        /// The daemon's flags (store, subnet file, masquerade...), to know what should be there.
        opts: Box<Options>,
        /// Print the findings as one JSON document.
        json: bool,
    },
}

/// A command-line or environment mistake; printed with the usage, exit status 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

impl Options {
    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let int = |v: &str| v.parse::<i64>().map_err(|_| "parse error".to_string());
        let boolean = |v: &str| parse_go_bool(v).ok_or_else(|| "parse error".to_string());
        match name {
            "etcd-endpoints" => self.etcd_endpoints = value.into(),
            "etcd-prefix" => self.etcd_prefix = value.into(),
            "etcd-keyfile" => self.etcd_keyfile = value.into(),
            "etcd-certfile" => self.etcd_certfile = value.into(),
            "etcd-cafile" => self.etcd_cafile = value.into(),
            "etcd-username" => self.etcd_username = value.into(),
            "etcd-password" => self.etcd_password = value.into(),
            "iface" => self.iface.push(value.into()),
            "iface-regex" => self.iface_regex.push(value.into()),
            "iface-can-reach" => self.iface_can_reach = value.into(),
            "subnet-file" => self.subnet_file = value.into(),
            "public-ip" => self.public_ip = value.into(),
            "public-ipv6" => self.public_ipv6 = value.into(),
            "subnet-lease-renew-margin" => self.subnet_lease_renew_margin = int(value)?,
            "ip-masq" => self.ip_masq = boolean(value)?,
            "ip-masq-fully-random-disable" => self.ip_masq_fully_random_disable = boolean(value)?,
            "kube-subnet-mgr" => self.kube_subnet_mgr = boolean(value)?,
            "kube-api-url" => self.kube_api_url = value.into(),
            "kube-annotation-prefix" => self.kube_annotation_prefix = value.into(),
            "kubeconfig-file" => self.kubeconfig_file = value.into(),
            "version" => self.version = boolean(value)?,
            "healthz-ip" => self.healthz_ip = value.into(),
            "healthz-port" => self.healthz_port = int(value)?,
            "iptables-resync" => self.iptables_resync = int(value)?,
            "iptables-forward-rules" => self.iptables_forward_rules = boolean(value)?,
            "ip-blackhole-route" => self.ip_blackhole_route = boolean(value)?,
            "net-config-path" => self.net_config_path = value.into(),
            "set-node-network-unavailable" => self.set_node_network_unavailable = boolean(value)?,
            "v" => self.v = int(value)?,
            "vmodule" => self.vmodule = value.into(),
            "log_backtrace_at" => self.log_backtrace_at = value.into(),
            _ => return Err("unknown flag".into()),
        }
        Ok(())
    }

    /// The options as a log line, with secrets masked (Go flannel logs the password in clear).
    pub fn redacted(&self) -> String {
        let mut o = self.clone();
        if !o.etcd_password.is_empty() {
            o.etcd_password = "<redacted>".into();
        }
        format!("{o:?}")
    }
}

/// Parses `args` (without argv[0]) and then the environment (`FLANNELD_*`) for unset flags.
pub fn parse<I, S>(args: I, env: &BTreeMap<String, String>) -> Result<Command, UsageError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut args: Vec<String> = args.into_iter().map(Into::into).collect();
    if args.first().map(String::as_str) == Some("doctor") {
        args.remove(0);
        let before = args.len();
        args.retain(|a| a != "--json" && a != "-json" && a != "--json=true" && a != "-json=true");
        let json = args.len() != before;
        return match parse_flags(args, env)? {
            Command::Run(opts) => Ok(Command::Doctor { opts, json }),
            other => Ok(other),
        };
    }
    parse_flags(args, env)
}

/// Parses flags (no subcommand), then the environment for unset ones.
fn parse_flags(args: Vec<String>, env: &BTreeMap<String, String>) -> Result<Command, UsageError> {
    let mut opts = Options::default();
    let mut given: Vec<&'static str> = vec![];
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            if let Some(extra) = args.get(i) {
                return Err(UsageError(format!("unexpected argument: {extra}")));
            }
            break;
        }
        if arg.len() < 2 || !arg.starts_with('-') {
            return Err(UsageError(format!("unexpected argument: {arg}")));
        }
        let body = arg
            .strip_prefix("--")
            .unwrap_or_else(|| &arg[1..])
            .to_string();
        if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
            return Err(UsageError(format!("bad flag syntax: {arg}")));
        }
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (body.clone(), None),
        };
        if name == "h" || name == "help" {
            return Ok(Command::Help);
        }
        let Some(spec) = FLAGS.iter().find(|f| f.name == name) else {
            return Err(UsageError(format!(
                "flag provided but not defined: -{name}"
            )));
        };
        let value = match (spec.kind, inline) {
            (Kind::Bool, None) => "true".to_string(),
            (_, Some(v)) => v,
            (_, None) => match args.get(i) {
                Some(v) => {
                    i += 1;
                    v.clone()
                }
                None => return Err(UsageError(format!("flag needs an argument: -{name}"))),
            },
        };
        opts.set(spec.name, &value)
            .map_err(|e| UsageError(format!("invalid value {value:?} for flag -{name}: {e}")))?;
        given.push(spec.name);
    }
    for spec in FLAGS {
        if given.contains(&spec.name) {
            continue;
        }
        let key = format!("FLANNELD_{}", spec.name.to_uppercase().replace('-', "_"));
        if spec.name == "version" {
            continue; // the reference checks --version before reading the environment
        }
        if let Some(value) = env.get(&key).filter(|v| !v.is_empty()) {
            opts.set(spec.name, value).map_err(|e| {
                UsageError(format!(
                    "invalid value {value:?} for environment variable {key}: {e}"
                ))
            })?;
        }
    }
    Ok(Command::Run(Box::new(opts)))
}

/// The usage text, in the reference's layout.
pub fn usage(argv0: &str) -> String {
    let defaults = Options::default();
    let mut out = format!(
        "Usage: {argv0} [OPTION]...\n       {argv0} doctor [OPTION]... [--json]   (read-only diagnosis: store, subnet.env, kernel; exit 0 = consistent, 1 = drift)\n"
    );
    for f in FLAGS {
        let default = match f.name {
            "etcd-endpoints" => format!("{:?}", defaults.etcd_endpoints),
            "etcd-prefix" => format!("{:?}", defaults.etcd_prefix),
            "subnet-file" => format!("{:?}", defaults.subnet_file),
            "subnet-lease-renew-margin" => "60".into(),
            "kube-annotation-prefix" => format!("{:?}", defaults.kube_annotation_prefix),
            "healthz-ip" => format!("{:?}", defaults.healthz_ip),
            "healthz-port" => "0".into(),
            "iptables-resync" => "5".into(),
            "iptables-forward-rules" | "set-node-network-unavailable" => "true".into(),
            "net-config-path" => format!("{:?}", defaults.net_config_path),
            _ => String::new(),
        };
        let _ = write!(out, "  -{}", f.name);
        match f.kind {
            Kind::Str | Kind::StrList => out.push_str(" string"),
            Kind::Int => out.push_str(" int"),
            Kind::Bool => {}
        }
        let _ = write!(out, "\n    \t{}", f.help);
        if !default.is_empty() {
            let _ = write!(out, " (default {default})");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Options {
        match parse(args.iter().copied(), &BTreeMap::new()).unwrap() {
            Command::Run(o) => *o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_match_reference() {
        let o = run(&[]);
        assert_eq!(
            o.etcd_endpoints,
            "http://127.0.0.1:4001,http://127.0.0.1:2379"
        );
        assert_eq!(o.etcd_prefix, "/coreos.com/network");
        assert_eq!(o.subnet_file, "/run/flannel/subnet.env");
        assert_eq!(o.subnet_lease_renew_margin, 60);
        assert!(o.iptables_forward_rules && o.set_node_network_unavailable);
        assert!(!o.ip_masq);
        assert_eq!(o.healthz_ip, "0.0.0.0");
        assert_eq!(o.iptables_resync, 5);
    }

    #[test]
    fn go_syntax_variants() {
        let o = run(&[
            "-subnet-file",
            "/vxlan.env",
            "-etcd-prefix=/vxlan/network",
            "-v",
            "10",
            "--ip-masq",
            "--iptables-forward-rules=false",
            "--iface",
            "eth0",
            "-iface=10.0.0.1",
        ]);
        assert_eq!(o.subnet_file, "/vxlan.env");
        assert_eq!(o.etcd_prefix, "/vxlan/network");
        assert_eq!(o.v, 10);
        assert!(o.ip_masq);
        assert!(!o.iptables_forward_rules);
        assert_eq!(o.iface, vec!["eth0", "10.0.0.1"]);
    }

    #[test]
    fn bool_does_not_consume_next_word() {
        let err = parse(["--ip-masq", "false"], &BTreeMap::new()).unwrap_err();
        assert_eq!(err.0, "unexpected argument: false");
    }

    #[test]
    fn errors_are_clear() {
        let e = |a: &[&str]| parse(a.iter().copied(), &BTreeMap::new()).unwrap_err().0;
        assert_eq!(e(&["-x"]), "flag provided but not defined: -x");
        assert_eq!(
            e(&["--healthz-port=abc"]),
            "invalid value \"abc\" for flag -healthz-port: parse error"
        );
        assert_eq!(
            e(&["--etcd-prefix"]),
            "flag needs an argument: -etcd-prefix"
        );
        assert_eq!(e(&["---x"]), "bad flag syntax: ---x");
    }

    #[test]
    fn env_fallback_only_for_unset_flags() {
        let env: BTreeMap<String, String> = [
            ("FLANNELD_ETCD_PREFIX", "/env"),
            ("FLANNELD_IP_MASQ", "true"),
            ("FLANNELD_PUBLIC_IP", "1.2.3.4"),
            ("FLANNELD_IFACE", "eth1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let Command::Run(o) = parse(["--etcd-prefix=/cli"], &env).unwrap() else {
            panic!()
        };
        assert_eq!(o.etcd_prefix, "/cli");
        assert!(o.ip_masq);
        assert_eq!(o.public_ip, "1.2.3.4");
        assert_eq!(o.iface, vec!["eth1"]);
    }

    #[test]
    fn help_requested() {
        assert!(matches!(
            parse(["-h"], &BTreeMap::new()).unwrap(),
            Command::Help
        ));
        assert!(usage("flanneld").starts_with("Usage: flanneld [OPTION]...\n"));
    }

    #[test]
    fn password_is_redacted() {
        let o = run(&["--etcd-password=s3cret"]);
        assert!(!o.redacted().contains("s3cret"));
    }
}

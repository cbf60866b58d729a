//! TLS for the test API server: material made with the openssl CLI (server certificate with the
//! bind IP in its SAN, client certificates for the two users), the rustls server config, and the
//! user name (CN) and groups (O) of a client certificate.

use crate::tls::{openssl, sign_with_ca};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where the server's TLS material comes from.
#[derive(Debug, Clone)]
pub enum KubeTls {
    /// Generate a CA, a server certificate (SAN: the bind IP, 127.0.0.1, localhost, kubernetes)
    /// and client certificates `admin.pem`/`admin-key.pem` (CN admin, O system:masters) and
    /// `flannel.pem`/`flannel-key.pem` (CN system:serviceaccount:kube-flannel:flannel) in this
    /// directory.
    Generate(PathBuf),
    /// Use existing PEM files; `ca` also verifies client certificates.
    Files {
        /// CA certificate.
        ca: PathBuf,
        /// Server certificate (chain).
        cert: PathBuf,
        /// Server private key.
        key: PathBuf,
    },
}

/// The files the server uses.
#[derive(Debug, Clone)]
pub struct KubeTlsFiles {
    /// CA certificate (goes into kubeconfigs).
    pub ca: PathBuf,
    /// Server certificate.
    pub cert: PathBuf,
    /// Server key.
    pub key: PathBuf,
    /// Generated client certificates: (user, cert, key).
    pub clients: Vec<(String, PathBuf, PathBuf)>,
}

fn ec_req(dir: &Path, name: &str, subj: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subj,
        ],
    );
}

/// Resolves the material, generating it when asked to.
pub(crate) fn material(tls: &KubeTls, ip: IpAddr) -> KubeTlsFiles {
    let dir = match tls {
        KubeTls::Files { ca, cert, key } => {
            return KubeTlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                clients: Vec::new(),
            }
        }
        KubeTls::Generate(dir) => dir,
    };
    std::fs::create_dir_all(dir).expect("create TLS dir");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=frs-kube-ca",
        ],
    );
    let mut san = String::from("IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default");
    if !ip.is_unspecified() && ip != IpAddr::from([127, 0, 0, 1]) {
        san.push_str(&format!(",IP:{ip}"));
    }
    ec_req(dir, "server", "/CN=kube-apiserver");
    sign_with_ca(
        dir,
        "server",
        &format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
    );
    let mut clients = Vec::new();
    for (file, user, org) in [
        ("admin", "admin", Some("system:masters")),
        ("flannel", super::FLANNEL_USER, None),
        ("nobody", super::NOBODY_USER, None),
    ] {
        let subj = match org {
            Some(o) => format!("/O={o}/CN={user}"),
            None => format!("/CN={user}"),
        };
        ec_req(dir, file, &subj);
        sign_with_ca(dir, file, "extendedKeyUsage=clientAuth\n");
        clients.push((
            user.to_string(),
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}-key.pem")),
        ));
    }
    KubeTlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
        clients,
    }
}

/// A rustls server config (ring provider, HTTP/1.1 only) that asks for, but does not require,
/// a client certificate signed by the CA.
pub(crate) fn server_config(files: &KubeTlsFiles) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .expect("read server certificate")
        .collect::<Result<_, _>>()
        .expect("parse server certificate");
    let key = PrivateKeyDer::from_pem_file(&files.key).expect("read server key");
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&files.ca).expect("read CA") {
        roots.add(ca.expect("parse CA")).expect("add CA");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .expect("client verifier");
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server certificate");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// One DER element: (tag, contents, rest).
fn der(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&l0, mut rest) = rest.split_first()?;
    let len = if l0 < 0x80 {
        usize::from(l0)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = len << 8 | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The subject's CN and O values of a DER certificate.
pub(crate) fn subject_names(cert: &[u8]) -> Option<(String, Vec<String>)> {
    let (_, cert, _) = der(cert)?;
    let (_, tbs, _) = der(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = der(rest)?;
    if tag == 0xa0 {
        rest = r; // explicit version
    }
    // serial, signature algorithm, issuer, validity, subject
    for _ in 0..4 {
        rest = der(rest)?.2;
    }
    let (_, mut subject, _) = der(rest)?;
    let (mut cn, mut orgs) = (None, Vec::new());
    while !subject.is_empty() {
        let (_, mut set, r) = der(subject)?;
        subject = r;
        while !set.is_empty() {
            let (_, atv, r) = der(set)?;
            set = r;
            let (_, oid, r) = der(atv)?;
            let (_, value, _) = der(r)?;
            let value = String::from_utf8_lossy(value).into_owned();
            match oid {
                [0x55, 0x04, 0x03] => cn = Some(value),
                [0x55, 0x04, 0x0a] => orgs.push(value),
                _ => {}
            }
        }
    }
    Some((cn?, orgs))
}

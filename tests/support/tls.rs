//! TLS for the tests: certificates made inside the test (rcgen; nothing is committed), the
//! analyser with a `tls://` listener beside its plaintext one, an in-process rustls sender
//! whose every step the test controls, and unbound sending dnstap over TLS.

use super::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;

/// A certificate authority that exists for one test.
/// The names of the analyser's certificate and of the default client certificates.
const LOCAL: &[&str] = &["localhost", "127.0.0.1"];

pub struct TestCa {
    name: String,
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, written as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            name: name.into(),
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// Writes the CA certificate (what a peer trusts) into `dir`.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("{}-ca.pem", self.name));
        fs::write(&path, &self.pem).unwrap();
        path
    }

    /// The analyser's certificate: valid for `localhost` and 127.0.0.1.
    pub fn server_cert(&self, dir: &Path, file: &str) -> CertFiles {
        self.issue(dir, file, LOCAL, ExtendedKeyUsagePurpose::ServerAuth, false)
    }

    /// A sender's certificate for mTLS; `expired` makes one whose validity ended in 2021.
    pub fn client_cert(&self, dir: &Path, file: &str, expired: bool) -> CertFiles {
        self.issue(
            dir,
            file,
            LOCAL,
            ExtendedKeyUsagePurpose::ClientAuth,
            expired,
        )
    }

    /// A sender's certificate for mTLS valid for the DNS names `names` (subjectAltName).
    pub fn client_cert_for(&self, dir: &Path, file: &str, names: &[&str]) -> CertFiles {
        self.issue(dir, file, names, ExtendedKeyUsagePurpose::ClientAuth, false)
    }

    fn issue(
        &self,
        dir: &Path,
        file: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> CertFiles {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = CertFiles {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
        };
        fs::write(&files.cert, cert.pem()).unwrap();
        fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

/// The analyser serving plaintext on `an.port()` and TLS on `tls_port`.
pub struct TlsAnalyser {
    pub an: Analyser,
    pub tls_port: u16,
}

impl TlsAnalyser {
    /// Serves TLS with `server` (and mTLS against `client_ca` if given) plus `extra` options.
    pub fn serve(server: &CertFiles, client_ca: Option<&Path>, extra: &[&str]) -> TlsAnalyser {
        let (cert, key) = (server.cert.display(), server.key.display());
        let (cert, key) = (cert.to_string(), key.to_string());
        let mut args = vec![
            "--listen",
            "tls://127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ];
        let ca = client_ca.map(|p| p.display().to_string());
        if let Some(ca) = &ca {
            args.extend(["--tls-client-ca", ca.as_str()]);
        }
        args.extend(extra);
        let an = Analyser::serve_tcp(&args);
        // Both listeners were bound (and listening) before the analyser logged them.
        let tls_port = an.bound_port("tls").expect("a tls:// listener in its log");
        TlsAnalyser { an, tls_port }
    }
}

/// A rustls client configuration trusting `ca`, presenting `client` if given.
pub fn client_config(ca: &Path, client: Option<&CertFiles>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let chain = CertificateDer::pem_file_iter(&files.cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    Arc::new(config)
}

/// Only TLS 1.2, to exercise the older protocol.
pub fn client_config_tls12(ca: &Path) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A blocking TLS connection to the analyser, driven step by step by the test.
pub type TlsClient = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects to `127.0.0.1:port` as `localhost`. The handshake runs on the first read/write;
/// `handshake` forces it.
pub fn tls_connect(port: u16, config: Arc<rustls::ClientConfig>) -> TlsClient {
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Completes the TLS handshake; the error if the analyser refused it.
pub fn handshake(c: &mut TlsClient) -> std::io::Result<()> {
    while c.conn.is_handshaking() {
        c.conn.complete_io(&mut c.sock)?;
    }
    Ok(())
}

/// The DER of the certificate the analyser presented.
pub fn presented_cert(c: &TlsClient) -> Vec<u8> {
    c.conn.peer_certificates().unwrap()[0].to_vec()
}

pub fn pem_der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().to_vec()
}

/// Frame Streams control frames.
pub fn control(kind: u32, content_type: bool) -> Vec<u8> {
    let mut body = kind.to_be_bytes().to_vec();
    if content_type {
        let ct = b"protobuf:dnstap.Dnstap";
        body.extend(1u32.to_be_bytes());
        body.extend((ct.len() as u32).to_be_bytes());
        body.extend(ct);
    }
    let mut f = 0u32.to_be_bytes().to_vec();
    f.extend((body.len() as u32).to_be_bytes());
    f.extend(body);
    f
}

pub const FS_ACCEPT: u32 = 1;
pub const FS_START: u32 = 2;
pub const FS_STOP: u32 = 3;
pub const FS_READY: u32 = 4;
pub const FS_FINISH: u32 = 5;

/// READY → ACCEPT: the bidirectional handshake up to START (not sent).
pub fn fs_ready(c: &mut impl ReadWrite) -> std::io::Result<()> {
    c.write_all(&control(FS_READY, true))?;
    c.flush()?;
    let want = control(FS_ACCEPT, true);
    let mut got = vec![0; want.len()];
    c.read_exact(&mut got)?;
    assert_eq!(got, want, "ACCEPT");
    Ok(())
}

/// Sends a Frame Streams capture file (START, data frames, STOP) after READY/ACCEPT and
/// waits for FINISH: the whole stream, bidirectional.
pub fn send_capture(c: &mut impl ReadWrite, capture: &Path) -> std::io::Result<()> {
    fs_ready(c)?;
    let bytes = fs::read(capture).unwrap();
    for chunk in bytes.chunks(1000) {
        c.write_all(chunk)?;
    }
    c.flush()?;
    let want = control(FS_FINISH, false);
    let mut got = vec![0; want.len()];
    c.read_exact(&mut got)?;
    assert_eq!(got, want, "FINISH");
    Ok(())
}

pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// True once the analyser has closed `c` (end of stream, an alert or a reset); what it sends
/// before (a TLS alert in the clear) is read past. False if still open after the read timeout.
pub fn closed_by_peer(c: &mut impl Read) -> bool {
    let mut buf = [0; 512];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            // A signal to the test process interrupts a read with a timeout: not an answer.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

/// `connections_closed.<reason>` of the exit summary.
pub fn closed(out: &Output, reason: &str) -> u64 {
    out.summary["connections_closed"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no connections_closed.{reason} in the summary"))
}

/// `tls.<counter>` of the exit summary.
pub fn tls_count(out: &Output, counter: &str) -> u64 {
    out.summary["tls"][counter]
        .as_u64()
        .unwrap_or_else(|| panic!("no tls.{counter} in the summary"))
}

/// unbound's TLS settings for its dnstap stream.
pub struct UnboundTls<'a> {
    pub ca_bundle: &'a Path,
    pub client: Option<&'a CertFiles>,
}

/// unbound forwarding to `upstream` (silent.test to `silent`), sending dnstap over TLS to
/// 127.0.0.1:`tap_port` as `localhost`: the live unbound.conf with TLS instead of `dnstap-tls: no`.
pub fn start_unbound_tls(
    dir: &TempDir,
    (upstream, silent): (u16, u16),
    tap_port: u16,
    tls: &UnboundTls<'_>,
) -> Forwarder {
    let bin = require_binary("unbound", "unbound");
    let mut settings = format!(
        "dnstap-tls: yes\n    dnstap-tls-server-name: \"localhost\"\n    \
         dnstap-tls-cert-bundle: \"{}\"",
        tls.ca_bundle.display()
    );
    if let Some(c) = tls.client {
        settings += &format!(
            "\n    dnstap-tls-client-cert-file: \"{}\"\n    dnstap-tls-client-key-file: \"{}\"",
            c.cert.display(),
            c.key.display()
        );
    }
    let spawn = |port: u16| {
        let vars = [
            ("DIR", dir.path().display().to_string()),
            ("PORT", port.to_string()),
            ("UPSTREAM", upstream.to_string()),
            ("SILENT", silent.to_string()),
            ("TAP", tap_port.to_string()),
        ];
        let plain = render("unbound.conf", &vars);
        assert!(plain.contains("dnstap-tls: no"), "unbound.conf changed");
        let conf = dir.join("unbound-tls.conf");
        fs::write(&conf, plain.replace("dnstap-tls: no", &settings)).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.arg("-d").arg("-c").arg(&conf);
        Server::spawn("unbound", cmd, dir.join("unbound.log"))
    };
    let (server, port) = start_on_free_port("unbound", spawn, answers_dns, READY_WITHIN);
    Forwarder { port, server }
}

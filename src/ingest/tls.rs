//! Frame Streams over TLS (and mTLS): the listener's certificate state and the encrypted
//! transport of one connection. `rustls` does the protocol and the certificate checks; it is
//! sans-IO, so the reader's mio loop keeps the sockets and this module only moves bytes
//! between the socket, rustls and the connection's frame buffer.
//!
//! Certificates rotate without a restart: before a new connection is accepted, the files are
//! looked at (at most once per second); when they changed, a new server configuration is built
//! and used for the handshakes from then on. Established connections keep the configuration
//! they started with. A new set that does not load leaves the previous one in use.

use crate::metrics::{Disconnect, Metrics};
use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The certificate files are looked at no more often than this.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The files a TLS listener serves from (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server certificate, then its intermediates.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CAs a sender's certificate must chain to. With it every sender must present
    /// one (mTLS); without it no sender is asked for one.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }
}

/// Why the TLS files could not be turned into a server configuration.
#[derive(Debug)]
pub enum TlsConfigError {
    Read {
        path: PathBuf,
        source: io::Error,
    },
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    NoCertificate(PathBuf),
    ClientCa {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    /// rustls refused the set: a key that does not match the certificate, an unsupported key.
    Rejected {
        cert: PathBuf,
        source: rustls::Error,
    },
}

impl std::fmt::Display for TlsConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read { path, .. } => write!(f, "cannot read {}", path.display()),
            Self::Pem { path, .. } => write!(f, "{} is not valid PEM", path.display()),
            Self::NoCertificate(path) => {
                write!(f, "{} holds no PEM certificate", path.display())
            }
            Self::ClientCa { path, .. } => {
                write!(f, "{} is not a usable client CA", path.display())
            }
            Self::Rejected { cert, .. } => {
                write!(f, "{} and its key cannot serve TLS", cert.display())
            }
        }
    }
}

impl std::error::Error for TlsConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            Self::Pem { source, .. } => Some(source),
            Self::NoCertificate(_) => None,
            Self::ClientCa { source, .. } => Some(source),
            Self::Rejected { source, .. } => Some(source),
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read {
        path: path.into(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsConfigError::Pem {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate(path.into()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsConfigError::Pem {
        path: path.into(),
        source,
    })
}

/// Builds the server side of TLS 1.2 and 1.3 from the files.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsConfigError> {
    server_config_with(files, ALL_VERSIONS, ClientCerts::Required)
}

/// TLS 1.3 and 1.2, the versions rustls serves.
pub const ALL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// With a client CA: whether a client must present a certificate in the handshake, or may
/// come without one (a certificate presented is verified either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    Required,
    /// The metrics port: the kubelet's probes come without one, and the HTTP layer asks for
    /// it on the other paths.
    Optional,
}

/// Builds the server side of the given TLS `versions` from the files.
pub fn server_config_with(
    files: &TlsFiles,
    versions: &[&'static rustls::SupportedProtocolVersion],
    client_certs: ClientCerts,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let rejected = |source| TlsConfigError::Rejected {
        cert: files.cert.clone(),
        source,
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(rejected)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            let (_, unusable) = roots.add_parsable_certificates(certificates(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match client_certs {
                ClientCerts::Required => verifier,
                ClientCerts::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|source| TlsConfigError::ClientCa {
                    path: ca.clone(),
                    source,
                })?;
            if unusable > 0 {
                // add_parsable_certificates skips what it cannot parse; a CA file that is
                // partly garbage is a mistake worth refusing rather than half-trusting.
                return Err(TlsConfigError::Pem {
                    path: ca.clone(),
                    source: rustls::pki_types::pem::Error::Base64Decode(format!(
                        "{unusable} certificate(s) are not parsable X.509"
                    )),
                });
            }
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certificates(&files.cert)?, private_key(&files.key)?)
        .map_err(rejected)?;
    // TLS 1.3 session tickets come unasked after the handshake; unbound 1.17's dnstap client
    // then fails with "bad record mac" and reconnects (tests/live_tls.rs found it). A sender
    // keeps its connection for hours: resumption would gain nothing.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// What identifies one version of a file: a new file (atomic rename, the kubelet's symlink
/// swap) changes the inode, an edit in place the size or the modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp(Option<(u64, u64, u64, SystemTime)>);

impl Stamp {
    pub(crate) fn of(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self(std::fs::metadata(path).ok().map(|m| {
            let modified = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            (m.dev(), m.ino(), m.len(), modified)
        }))
    }
}

/// A TLS listener's certificate state: the configuration new handshakes get, reloaded when
/// the files change.
pub struct TlsAcceptor {
    files: TlsFiles,
    config: Arc<ServerConfig>,
    /// The files as they were when last loaded, or last tried.
    stamps: Vec<Stamp>,
    checked: Instant,
    metrics: Arc<Metrics>,
}

impl TlsAcceptor {
    /// Loads the files; at startup a set that does not load is an error.
    pub fn load(files: &TlsFiles, metrics: Arc<Metrics>) -> Result<Self, TlsConfigError> {
        let stamps = files.paths().map(Stamp::of).collect();
        let config = server_config(files)?;
        Ok(Self {
            files: files.clone(),
            config,
            stamps,
            checked: Instant::now(),
            metrics,
        })
    }

    /// A new connection's TLS state, with the newest certificates that loaded.
    pub fn accept(&mut self, tcp: TcpStream) -> io::Result<TlsStream> {
        self.refresh(Instant::now());
        let tls = ServerConnection::new(self.config.clone()).map_err(io::Error::other)?;
        Ok(TlsStream {
            tcp,
            tls: Box::new(tls),
            handshake_done: false,
            peer_closed: false,
        })
    }

    /// Reloads the files if they changed since they were last looked at (at most once per
    /// `RELOAD_CHECK`). A set that fails is reported once per change, not once per second.
    fn refresh(&mut self, now: Instant) {
        if now.duration_since(self.checked) < RELOAD_CHECK {
            return;
        }
        self.checked = now;
        let stamps: Vec<Stamp> = self.files.paths().map(Stamp::of).collect();
        if stamps == self.stamps {
            return;
        }
        self.stamps = stamps;
        match server_config(&self.files) {
            Ok(config) => {
                self.config = config;
                self.metrics.tls_cert_reloads.fetch_add(1, Relaxed);
                eprintln!(
                    "dnstap-analyser: TLS certificate reloaded from {}; new connections use it",
                    self.files.cert.display()
                );
            }
            Err(e) => {
                self.metrics.tls_cert_reload_errors.fetch_add(1, Relaxed);
                eprintln!(
                    "dnstap-analyser: error: TLS certificate not reloaded: {}; \
                     new connections keep the previous one",
                    crate::metrics::ErrorChain(&e)
                );
            }
        }
    }
}

/// Why a TLS connection was closed by its TLS layer. It travels inside the `io::Error` of
/// `TlsStream::read_into` so the reader can count it apart from a peer that went away.
#[derive(Debug)]
pub struct TlsFailure {
    pub kind: TlsFailureKind,
    pub error: rustls::Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailureKind {
    /// The TLS handshake failed: not TLS (plaintext on the TLS port), no common version or
    /// cipher, the sender refusing the analyser's certificate.
    Handshake,
    /// mTLS: the sender presented no certificate, or one the client CA does not vouch for
    /// (another CA, expired, not for client authentication).
    ClientCert,
    /// After the handshake: a corrupt record, a second renegotiation attempt, a fatal alert.
    Established,
}

impl TlsFailure {
    fn new(error: rustls::Error, handshaking: bool) -> Self {
        use rustls::Error as E;
        let kind = match &error {
            _ if !handshaking => TlsFailureKind::Established,
            E::NoCertificatesPresented | E::InvalidCertificate(_) => TlsFailureKind::ClientCert,
            _ => TlsFailureKind::Handshake,
        };
        Self { kind, error }
    }

    /// The counter of the connection it closed.
    pub fn counter(&self) -> Disconnect {
        match self.kind {
            TlsFailureKind::Handshake => Disconnect::TlsHandshake,
            TlsFailureKind::ClientCert => Disconnect::TlsClientCert,
            TlsFailureKind::Established => Disconnect::TlsError,
        }
    }

    /// The failure inside an error of `TlsStream::read_into`, if it is one.
    pub fn take(e: io::Error) -> Option<Self> {
        e.into_inner()?.downcast::<Self>().ok().map(|b| *b)
    }
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            TlsFailureKind::Handshake => f.write_str("TLS handshake failed"),
            TlsFailureKind::ClientCert => f.write_str("client certificate refused"),
            TlsFailureKind::Established => f.write_str("TLS error"),
        }
    }
}

impl std::error::Error for TlsFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// One TLS connection: the socket and rustls's state of it.
pub struct TlsStream {
    tcp: TcpStream,
    tls: Box<ServerConnection>,
    handshake_done: bool,
    /// close_notify came: the stream has ended even while the socket stays open.
    peer_closed: bool,
}

impl TlsStream {
    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    /// The client certificate the handshake verified (mTLS), if the sender presented one.
    pub fn client_certificate(&self) -> Option<rustls::pki_types::CertificateDer<'static>> {
        let chain = self.tls.peer_certificates()?;
        chain.first().map(|c| c.clone().into_owned())
    }

    /// Still in the TLS handshake (for the handshake deadline's message).
    pub fn is_handshaking(&self) -> bool {
        self.tls.is_handshaking()
    }

    /// Reads what the socket holds, decrypts it and appends the plaintext to `buf`: the same
    /// buffer the frame decoder reads, so past this point TLS and plaintext connections are
    /// alike. Returns the plaintext bytes added, like `read`: `Ok(0)` once the sender closed
    /// (close_notify or end of the socket), `WouldBlock` when nothing new is readable (also
    /// when only handshake records came), and an error holding a `TlsFailure` when TLS fails.
    pub fn read_into(
        &mut self,
        scratch: &mut [u8],
        buf: &mut super::ReadBuffer,
        metrics: &Metrics,
    ) -> io::Result<usize> {
        let mut got = 0;
        let mut ended = self.peer_closed;
        while got == 0 && !ended {
            let n = match self.tcp.read(scratch) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            ended = n == 0;
            match self.decrypt(&scratch[..n], buf) {
                Ok((plain, closed)) => {
                    got += plain;
                    self.peer_closed |= closed;
                    ended |= closed;
                }
                Err(e) => {
                    // rustls has queued an alert saying why: send it if the socket takes it.
                    let _ = self.send_pending();
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
            if !self.handshake_done && !self.tls.is_handshaking() {
                self.handshake_done = true;
                metrics.tls_handshakes.fetch_add(1, Relaxed);
            }
        }
        // Handshake records, alerts: best effort here, the reader's flush retries.
        let _ = self.send_pending();
        if got > 0 || ended {
            Ok(got)
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    /// Feeds ciphertext to rustls and moves the plaintext out; true once the sender has sent
    /// close_notify (what follows it is ignored).
    fn decrypt(
        &mut self,
        mut cipher: &[u8],
        buf: &mut super::ReadBuffer,
    ) -> Result<(usize, bool), TlsFailure> {
        let mut got = 0;
        loop {
            let handshaking = self.tls.is_handshaking();
            // Ok(0): rustls takes nothing more after close_notify. An error is a record
            // larger than TLS allows: the stream cannot go on.
            let taken = self.tls.read_tls(&mut cipher).map_err(|e| {
                let e = rustls::Error::General(format!("unreadable TLS record: {e}"));
                TlsFailure::new(e, handshaking)
            })?;
            let state = self
                .tls
                .process_new_packets()
                .map_err(|e| TlsFailure::new(e, handshaking))?;
            let mut left = state.plaintext_bytes_to_read();
            while left > 0 {
                let mut reader = self.tls.reader();
                let chunk = match reader.fill_buf() {
                    Ok(c) if !c.is_empty() => c,
                    _ => break,
                };
                let n = chunk.len();
                buf.extend_from_slice(chunk);
                reader.consume(n);
                got += n;
                left = left.saturating_sub(n);
            }
            if state.peer_has_closed() {
                return Ok((got, true));
            }
            if cipher.is_empty() || taken == 0 {
                return Ok((got, false));
            }
        }
    }

    /// Writes the TLS records rustls has ready; `WouldBlock` if the socket is full.
    fn send_pending(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.tcp)?;
        }
        Ok(())
    }
}

/// Plaintext replies (ACCEPT, FINISH) go through rustls; `flush` sends what is encrypted.
impl Write for TlsStream {
    fn write(&mut self, plain: &[u8]) -> io::Result<usize> {
        // Records still waiting would be followed by more: the socket must drain first.
        self.send_pending()?;
        let n = self.tls.writer().write(plain)?;
        match self.send_pending() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            // Taken: what the socket did not take yet goes with the next flush.
            _ => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    /// A scratch directory with a self-signed certificate for localhost.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir()
                .join(format!("dnstap-analyser-tls-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        fn files(&self) -> TlsFiles {
            TlsFiles {
                cert: self.0.join("tls.crt"),
                key: self.0.join("tls.key"),
                client_ca: None,
            }
        }

        /// Writes a new certificate and key; returns the certificate's DER.
        fn issue(&self) -> Vec<u8> {
            let key = KeyPair::generate().unwrap();
            let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            let cert = params.self_signed(&key).unwrap();
            std::fs::write(self.0.join("tls.crt"), cert.pem()).unwrap();
            std::fs::write(self.0.join("tls.key"), key.serialize_pem()).unwrap();
            cert.der().to_vec()
        }

        /// A certificate whose key is not the one beside it.
        fn mismatch(&self) {
            let other = KeyPair::generate().unwrap();
            self.issue();
            std::fs::write(self.0.join("tls.key"), other.serialize_pem()).unwrap();
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn acceptor(dir: &Dir) -> (TlsAcceptor, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        (
            TlsAcceptor::load(&dir.files(), metrics.clone()).unwrap(),
            metrics,
        )
    }

    #[test]
    fn a_changed_set_is_loaded_and_a_broken_one_keeps_the_previous() {
        let dir = Dir::new("rotate");
        dir.issue();
        let (mut a, metrics) = acceptor(&dir);
        let first = a.config.clone();
        let t0 = a.checked;
        a.refresh(t0 + Duration::from_secs(2));
        assert!(
            Arc::ptr_eq(&a.config, &first),
            "unchanged files are not reloaded"
        );

        dir.issue();
        a.refresh(t0 + Duration::from_secs(4));
        assert!(!Arc::ptr_eq(&a.config, &first));
        assert_eq!(metrics.tls_cert_reloads.load(Relaxed), 1);
        let second = a.config.clone();

        dir.mismatch();
        a.refresh(t0 + Duration::from_secs(6));
        a.refresh(t0 + Duration::from_secs(8));
        assert!(
            Arc::ptr_eq(&a.config, &second),
            "the broken set is not used"
        );
        assert_eq!(
            metrics.tls_cert_reload_errors.load(Relaxed),
            1,
            "once per change"
        );
        assert_eq!(metrics.tls_cert_reloads.load(Relaxed), 1);
    }

    #[test]
    fn the_files_are_looked_at_at_most_once_a_second() {
        let dir = Dir::new("often");
        dir.issue();
        let (mut a, metrics) = acceptor(&dir);
        let t0 = a.checked;
        dir.issue();
        a.refresh(t0 + Duration::from_millis(500));
        assert_eq!(metrics.tls_cert_reloads.load(Relaxed), 0);
        a.refresh(t0 + RELOAD_CHECK);
        assert_eq!(metrics.tls_cert_reloads.load(Relaxed), 1);
    }

    #[test]
    fn a_set_that_cannot_serve_is_refused_at_startup_naming_the_file() {
        let dir = Dir::new("startup");
        let metrics = Arc::new(Metrics::default());
        let missing = TlsAcceptor::load(&dir.files(), metrics.clone())
            .err()
            .unwrap();
        assert!(matches!(missing, TlsConfigError::Read { .. }), "{missing}");
        assert!(missing.to_string().contains("tls.crt"), "{missing}");

        dir.mismatch();
        let mismatch = TlsAcceptor::load(&dir.files(), metrics.clone())
            .err()
            .unwrap();
        assert!(
            matches!(mismatch, TlsConfigError::Rejected { .. }),
            "{mismatch}"
        );

        std::fs::write(dir.0.join("tls.crt"), "not PEM at all").unwrap();
        let garbage = TlsAcceptor::load(&dir.files(), metrics).err().unwrap();
        assert!(
            matches!(garbage, TlsConfigError::NoCertificate(_)),
            "{garbage}"
        );
    }

    #[test]
    fn failures_are_counted_by_stage() {
        use rustls::{CertificateError, Error};
        let cases = [
            (
                Error::NoCertificatesPresented,
                true,
                Disconnect::TlsClientCert,
            ),
            (
                Error::InvalidCertificate(CertificateError::Expired),
                true,
                Disconnect::TlsClientCert,
            ),
            (Error::DecryptError, true, Disconnect::TlsHandshake),
            (Error::DecryptError, false, Disconnect::TlsError),
        ];
        for (error, handshaking, counter) in cases {
            let f = TlsFailure::new(error, handshaking);
            assert_eq!(f.counter(), counter, "{f:?}");
            let back = TlsFailure::take(io::Error::new(io::ErrorKind::InvalidData, f)).unwrap();
            assert_eq!(back.counter(), counter);
        }
        assert!(TlsFailure::take(io::ErrorKind::ConnectionReset.into()).is_none());
    }
}

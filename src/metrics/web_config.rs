//! `--metrics-web-config`: the Prometheus exporter-toolkit web configuration file, the format
//! of exporters' `--web.config.file`, so that the ServiceMonitor of a node-exporter and of the
//! analyser take the same secrets. The subset the metrics port honours:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/metrics-tls/tls.crt
//!   key_file: /etc/metrics-tls/tls.key
//!   client_auth_type: RequireAndVerifyClientCert   # or NoClientCert, VerifyClientCertIfGiven
//!   client_ca_file: /etc/metrics-tls/ca.crt
//!   min_version: TLS12                             # TLS12 or TLS13
//!   max_version: TLS13
//! http_server_config:
//!   http2: false                                   # accepted; HTTP/1.1 is all it speaks
//! basic_auth_users:
//!   prometheus: $2y$10$...                         # bcrypt
//! ```
//!
//! Anything else the toolkit knows (inline PEM, cipher suites, curves, allowed SANs, extra
//! headers, its rate limiter) or does not know is refused when the file is read: a setting an
//! operator believes in but that is silently ignored would be worse than a failed start.

use super::auth::BasicAuth;
use crate::ingest::tls::{ClientCerts, Stamp, TlsConfigError, TlsFiles};
use rustls::ServerConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The file as written (unknown keys are refused by serde; keys the toolkit has but the
/// analyser does not honour are read so that the error can name them).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsServerConfig>,
    http_server_config: Option<HttpServerConfig>,
    #[serde(default)]
    basic_auth_users: Option<BTreeMap<String, String>>,
    rate_limit: Option<yaml_serde::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServerConfig {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
    max_version: Option<String>,
    cert: Option<yaml_serde::Value>,
    key: Option<yaml_serde::Value>,
    client_ca: Option<yaml_serde::Value>,
    client_allowed_sans: Option<yaml_serde::Value>,
    cipher_suites: Option<yaml_serde::Value>,
    prefer_server_cipher_suites: Option<yaml_serde::Value>,
    curve_preferences: Option<yaml_serde::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpServerConfig {
    #[allow(dead_code)] // Accepted: HTTP/2 is never offered (no ALPN), whatever it says.
    http2: Option<bool>,
    headers: Option<yaml_serde::Value>,
}

/// Which requests need a client certificate (the toolkit's `client_auth_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `NoClientCert`: none is asked for.
    None,
    /// `VerifyClientCertIfGiven`: one presented must chain to the client CA.
    VerifyIfGiven,
    /// `RequireAndVerifyClientCert`: every path but `/healthz` and `/readyz` needs one that
    /// chains to the client CA.
    RequireAndVerify,
}

/// TLS on the metrics port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub files: TlsFiles,
    pub client_auth: ClientAuth,
    /// Newest first, as rustls takes them.
    pub versions: Vec<&'static rustls::SupportedProtocolVersion>,
}

impl TlsSettings {
    /// The rustls configuration of these files as they are now.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsConfigError> {
        // The handshake lets a client without certificate in: the kubelet's probes have none;
        // the HTTP layer refuses such a client every other path.
        crate::ingest::tls::server_config_with(&self.files, &self.versions, ClientCerts::Optional)
    }
}

/// What the web configuration file asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebConfig {
    /// `None`: plain HTTP.
    pub tls: Option<TlsSettings>,
    /// User name to bcrypt hash; empty: no basic authentication.
    pub users: BTreeMap<String, String>,
}

/// Why the web configuration file cannot be used.
#[derive(Debug)]
pub enum WebConfigError {
    Read(PathBuf, std::io::Error),
    Yaml(PathBuf, yaml_serde::Error),
    /// A setting that is valid for the toolkit but that the analyser does not honour, or a
    /// contradiction (a client CA without a client auth type).
    Invalid(PathBuf, String),
    Tls(PathBuf, TlsConfigError),
}

impl std::fmt::Display for WebConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read(p, _) => write!(f, "cannot read web config {}", p.display()),
            Self::Yaml(p, e) => write!(f, "web config {}: {e}", p.display()),
            Self::Invalid(p, why) => write!(f, "web config {}: {why}", p.display()),
            Self::Tls(p, _) => write!(f, "web config {}: TLS", p.display()),
        }
    }
}

impl std::error::Error for WebConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read(_, e) => Some(e),
            Self::Tls(_, e) => Some(e),
            Self::Yaml(..) | Self::Invalid(..) => None,
        }
    }
}

impl WebConfig {
    /// Reads and checks the file (its certificates are loaded by `LiveWebConfig`).
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| WebConfigError::Read(path.into(), e))?;
        Self::parse(&text).map_err(|e| match e {
            Parse::Yaml(e) => WebConfigError::Yaml(path.into(), e),
            Parse::Invalid(why) => WebConfigError::Invalid(path.into(), why),
        })
    }

    /// The paths whose change means a reload: the file's own and its certificates'.
    pub fn tls_paths(&self) -> Vec<PathBuf> {
        self.tls
            .iter()
            .flat_map(|t| {
                [
                    Some(&t.files.cert),
                    Some(&t.files.key),
                    t.files.client_ca.as_ref(),
                ]
                .into_iter()
                .flatten()
                .cloned()
            })
            .collect()
    }

    fn parse(text: &str) -> Result<Self, Parse> {
        // An empty file is the toolkit's "no TLS, no authentication".
        let file: File = match text.trim().is_empty() {
            true => File::default(),
            false => yaml_serde::from_str(text).map_err(Parse::Yaml)?,
        };
        unsupported("rate_limit", &file.rate_limit)?;
        if let Some(http) = &file.http_server_config {
            unsupported("http_server_config.headers", &http.headers)?;
        }
        let users = file.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            check_hash(user, hash)?;
        }
        let tls = file.tls_server_config.map(tls_settings).transpose()?;
        Ok(Self { tls, users })
    }
}

/// The web configuration as the metrics thread uses it. Like the exporters, it follows the
/// file: the file and its certificates are looked at (at most once a second, when a
/// connection comes) and a changed set is used from the next connection on. A set that does
/// not load, or that would turn TLS on or off (a restart does that), leaves the previous one
/// in use.
pub struct LiveWebConfig {
    path: PathBuf,
    config: WebConfig,
    tls: Option<Arc<ServerConfig>>,
    pub auth: BasicAuth,
    stamps: Vec<Stamp>,
    checked: Instant,
}

impl LiveWebConfig {
    /// Reads the file and loads its certificates: a set that cannot serve is refused now,
    /// not at the first scrape.
    pub fn load(path: &Path, now: Instant) -> Result<Self, WebConfigError> {
        let config = WebConfig::load(path)?;
        // Before the certificates are read: a change while they are is seen next time.
        let stamps = Self::stamps_of(path, Some(&config));
        let tls = config.tls.as_ref().map(TlsSettings::server_config);
        let tls = tls
            .transpose()
            .map_err(|e| WebConfigError::Tls(path.into(), e))?;
        Ok(Self {
            path: path.into(),
            auth: BasicAuth::new(config.users.clone(), now),
            stamps,
            config,
            tls,
            checked: now,
        })
    }

    fn stamps_of(path: &Path, config: Option<&WebConfig>) -> Vec<Stamp> {
        std::iter::once(path.to_path_buf())
            .chain(config.map(WebConfig::tls_paths).unwrap_or_default())
            .map(|p| Stamp::of(&p))
            .collect()
    }

    /// The rustls configuration new connections get; `None`: plain HTTP.
    pub fn tls(&self) -> Option<&Arc<ServerConfig>> {
        self.tls.as_ref()
    }

    pub fn client_auth(&self) -> ClientAuth {
        self.config
            .tls
            .as_ref()
            .map_or(ClientAuth::None, |t| t.client_auth)
    }

    /// Reloads what changed since it was last looked at.
    pub fn refresh(&mut self, now: Instant) {
        if now.saturating_duration_since(self.checked) < Duration::from_secs(1) {
            return;
        }
        self.checked = now;
        let stamps = Self::stamps_of(&self.path, Some(&self.config));
        if stamps == self.stamps {
            return;
        }
        self.stamps = stamps;
        let loaded = Self::load(&self.path, now).and_then(|new| {
            match new.tls.is_some() == self.tls.is_some() {
                true => Ok(new),
                false => Err(WebConfigError::Invalid(
                    self.path.clone(),
                    "turning TLS on or off takes a restart".into(),
                )),
            }
        });
        match loaded {
            Ok(new) => {
                *self = new;
                eprintln!(
                    "dnstap-analyser: metrics web config reloaded from {}; new connections use it",
                    self.path.display()
                );
            }
            Err(e) => eprintln!(
                "dnstap-analyser: error: metrics web config not reloaded: {}; \
                 new connections keep the previous one",
                crate::metrics::ErrorChain(&e)
            ),
        }
    }
}

enum Parse {
    Yaml(yaml_serde::Error),
    Invalid(String),
}

fn unsupported(key: &str, value: &Option<yaml_serde::Value>) -> Result<(), Parse> {
    match value {
        None | Some(yaml_serde::Value::Null) => Ok(()),
        Some(_) => Err(Parse::Invalid(format!(
            "{key} is not supported by dnstap-analyser (docs/security.md lists what is)"
        ))),
    }
}

fn tls_settings(t: TlsServerConfig) -> Result<TlsSettings, Parse> {
    for (key, value) in [
        ("cert", &t.cert),
        ("key", &t.key),
        ("client_ca", &t.client_ca),
        ("client_allowed_sans", &t.client_allowed_sans),
        ("cipher_suites", &t.cipher_suites),
        (
            "prefer_server_cipher_suites",
            &t.prefer_server_cipher_suites,
        ),
        ("curve_preferences", &t.curve_preferences),
    ] {
        unsupported(&format!("tls_server_config.{key}"), value)?;
    }
    let invalid = |why: &str| Parse::Invalid(format!("tls_server_config: {why}"));
    let (Some(cert), Some(key)) = (t.cert_file, t.key_file) else {
        return Err(invalid("needs both cert_file and key_file"));
    };
    let client_auth = match t.client_auth_type.as_deref().unwrap_or("NoClientCert") {
        "NoClientCert" => ClientAuth::None,
        "VerifyClientCertIfGiven" => ClientAuth::VerifyIfGiven,
        "RequireAndVerifyClientCert" => ClientAuth::RequireAndVerify,
        other @ ("RequestClientCert" | "RequireAnyClientCert") => {
            return Err(invalid(&format!(
                "client_auth_type {other} accepts unverified certificates and is not \
                 supported: use RequireAndVerifyClientCert"
            )))
        }
        other => {
            return Err(invalid(&format!(
                "unknown client_auth_type {other:?} (NoClientCert, VerifyClientCertIfGiven, \
                 RequireAndVerifyClientCert)"
            )))
        }
    };
    match (client_auth, &t.client_ca_file) {
        (ClientAuth::None, Some(_)) => {
            return Err(invalid(
                "client_ca_file is set but client_auth_type is NoClientCert",
            ))
        }
        (ClientAuth::VerifyIfGiven | ClientAuth::RequireAndVerify, None) => {
            return Err(invalid("client_auth_type needs client_ca_file"))
        }
        _ => {}
    }
    // Ranked by minor version: 2 is TLS 1.2.
    let version = |v: Option<&str>, default| match v.unwrap_or(default) {
        "TLS13" => Ok(3),
        "TLS12" => Ok(2),
        other => Err(invalid(&format!(
            "TLS version {other:?} is not supported (TLS12, TLS13)"
        ))),
    };
    let min = version(t.min_version.as_deref(), "TLS12")?;
    let max = version(t.max_version.as_deref(), "TLS13")?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [(3, &rustls::version::TLS13), (2, &rustls::version::TLS12)]
            .into_iter()
            .filter(|(rank, _)| (min..=max).contains(rank))
            .map(|(_, v)| v)
            .collect();
    if versions.is_empty() {
        return Err(invalid("min_version is above max_version"));
    }
    Ok(TlsSettings {
        files: TlsFiles {
            cert,
            key,
            client_ca: t.client_ca_file,
        },
        client_auth,
        versions,
    })
}

/// A hash bcrypt cannot use would refuse that user's every scrape: refuse the file instead.
fn check_hash(user: &str, hash: &str) -> Result<(), Parse> {
    // Parsing only: verifying would cost a full bcrypt round per user.
    match hash.parse::<bcrypt::HashParts>() {
        Ok(_) => Ok(()),
        Err(_) => Err(Parse::Invalid(format!(
            "basic_auth_users.{user}: not a bcrypt hash (htpasswd -nBC 10 \"\" | tr -d ':\\n')"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(text: &str) -> String {
        match WebConfig::parse(text) {
            Err(Parse::Invalid(why)) => why,
            Err(Parse::Yaml(e)) => format!("yaml: {e}"),
            Ok(c) => panic!("accepted {text:?}: {c:?}"),
        }
    }

    #[test]
    fn the_supported_subset_reads() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let c = WebConfig::parse(&format!(
            "tls_server_config:\n  cert_file: /c\n  key_file: /k\n  \
             client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: /ca\n  \
             min_version: TLS13\nhttp_server_config:\n  http2: false\n\
             basic_auth_users:\n  prometheus: '{hash}'\n"
        ))
        .ok()
        .unwrap();
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.client_auth, ClientAuth::RequireAndVerify);
        assert_eq!(tls.files.client_ca.as_deref(), Some(Path::new("/ca")));
        assert_eq!(tls.versions.len(), 1);
        assert_eq!(c.users["prometheus"], hash);
        assert_eq!(c.tls_paths().len(), 3);
        let empty = WebConfig::parse("").ok().unwrap();
        assert_eq!(empty, WebConfig::default());
    }

    #[test]
    fn unknown_and_unsupported_settings_are_refused_by_name() {
        let unknown = invalid("basic_auth_user:\n  a: b\n");
        assert!(unknown.contains("basic_auth_user"), "{unknown}");
        let typo = invalid("tls_server_config:\n  cert_fil: /c\n");
        assert!(typo.contains("cert_fil"), "{typo}");
        for (text, key) in [
            ("tls_server_config:\n  cert: x\n", "tls_server_config.cert"),
            (
                "tls_server_config:\n  cert_file: /c\n  key_file: /k\n  cipher_suites: [a]\n",
                "cipher_suites",
            ),
            ("rate_limit:\n  interval: 1s\n", "rate_limit"),
            (
                "http_server_config:\n  headers:\n    X-Frame-Options: deny\n",
                "headers",
            ),
            (
                "tls_server_config:\n  cert_file: /c\n  key_file: /k\n  client_auth_type: RequireAnyClientCert\n",
                "RequireAnyClientCert",
            ),
            (
                "tls_server_config:\n  cert_file: /c\n  key_file: /k\n  client_auth_type: RequireAndVerifyClientCert\n",
                "client_ca_file",
            ),
            (
                "tls_server_config:\n  cert_file: /c\n  key_file: /k\n  client_ca_file: /ca\n",
                "NoClientCert",
            ),
            (
                "tls_server_config:\n  cert_file: /c\n  key_file: /k\n  min_version: TLS11\n",
                "TLS11",
            ),
            ("tls_server_config:\n  cert_file: /c\n", "key_file"),
            ("basic_auth_users:\n  prometheus: secret\n", "bcrypt"),
        ] {
            let why = invalid(text);
            assert!(why.contains(key), "{text:?}: {why}");
        }
    }
}

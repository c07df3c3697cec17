//! How every Trellis binary connects to NATS: one set of flags and environment variables (the
//! natscli names: `NATS_URL`, `NATS_USER` / `NATS_PASSWORD`, `NATS_TOKEN`, `NATS_NKEY`,
//! `NATS_CREDS`, `NATS_CA`, `NATS_CERT` / `NATS_KEY`, and `NATS_TLS_SERVER_NAME`), resolved
//! once into the client's connect options.
//!
//! One way of authenticating at a time: credentials in the URL, a user and password, a token,
//! an NKey seed file or a `.creds` file (decentralised JWT); two of them are an error that names
//! both. Files are read when the options are resolved, at start-up: a missing or unreadable file
//! is an error naming its option. Secrets (passwords, tokens, seeds) are never shown: `Debug`
//! prints them `<redacted>`, errors name the option and the file, not the contents.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_nats::rustls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::config::{Secret, SecretUrl};
use crate::nats::Servers;

/// The NATS connection options of a Trellis binary (flags with environment fallbacks). Every
/// binary flattens it into its flags; [`NatsOptions::resolve`] checks and reads it.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsOptions {
    /// NATS server URL (or a comma-separated list). Credentials in it (`user:password@`,
    /// `token@`) are handed to the client as credentials, never as part of an address.
    #[arg(
        long = "nats-url",
        env = "NATS_URL",
        hide_env_values = true,
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub url: SecretUrl,

    /// User name to log in to NATS with (with `--nats-password`).
    #[arg(long = "nats-user", env = "NATS_USER", global = true)]
    pub user: Option<String>,

    /// Password of `--nats-user`.
    #[arg(long = "nats-password", env = "NATS_PASSWORD", hide_env_values = true, global = true)]
    pub password: Option<Secret>,

    /// Token to log in to NATS with.
    #[arg(long = "nats-token", env = "NATS_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<Secret>,

    /// A file holding the NKey seed (`SU…`) to log in to NATS with.
    #[arg(long = "nats-nkey", env = "NATS_NKEY", global = true)]
    pub nkey: Option<PathBuf>,

    /// A `.creds` file (user JWT and NKey seed: decentralised authentication).
    #[arg(long = "nats-creds", env = "NATS_CREDS", global = true)]
    pub creds: Option<PathBuf>,

    /// A PEM file of the CA certificates that sign the NATS server's certificate. Any TLS option
    /// makes the client require TLS.
    #[arg(long = "nats-ca", env = "NATS_CA", global = true)]
    pub ca: Option<PathBuf>,

    /// A PEM file of the client certificate (for servers that verify clients; with `--nats-key`).
    #[arg(long = "nats-cert", env = "NATS_CERT", global = true)]
    pub cert: Option<PathBuf>,

    /// A PEM file of the client certificate's private key.
    #[arg(long = "nats-key", env = "NATS_KEY", global = true)]
    pub key: Option<PathBuf>,

    /// The name the server's certificate must carry, when it is not the host of the URL (a
    /// server reached by IP address or through a load balancer).
    #[arg(long = "nats-tls-server-name", env = "NATS_TLS_SERVER_NAME", global = true)]
    pub tls_server_name: Option<String>,
}

/// A problem with the NATS options; the message names the option (and the file), never a secret.
#[derive(Debug, thiserror::Error)]
pub enum NatsOptionsError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read {option} {}: {error}", path.display())]
    Unreadable { option: &'static str, path: PathBuf, error: std::io::Error },
    #[error("{option} {}: {problem}", path.display())]
    BadFile { option: &'static str, path: PathBuf, problem: String },
}

/// The one way of authenticating that the options chose.
pub enum Auth {
    None,
    UserPassword { user: String, password: Secret },
    Token(Secret),
    NKey { seed: Secret },
    Creds { path: PathBuf, contents: Secret },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::UserPassword { user, password } => write!(f, "UserPassword({user}, {password:?})"),
            Self::Token(token) => write!(f, "Token({token:?})"),
            Self::NKey { seed } => write!(f, "NKey({seed:?})"),
            Self::Creds { path, .. } => write!(f, "Creds({})", path.display()),
        }
    }
}

/// Options checked and files read: what [`crate::nats::connect`] hands to the client.
#[derive(Debug)]
pub struct Resolved {
    pub addresses: Vec<async_nats::ServerAddr>,
    pub auth: Auth,
    /// The TLS configuration, when any TLS option is set.
    pub tls: Option<Tls>,
}

/// A client TLS configuration built from `NATS_CA`, `NATS_CERT` / `NATS_KEY` and
/// `NATS_TLS_SERVER_NAME`.
pub struct Tls(rustls::ClientConfig);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

impl NatsOptions {
    /// Options with only a server URL (tests, benchmarks).
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: SecretUrl::new(url),
            user: None,
            password: None,
            token: None,
            nkey: None,
            creds: None,
            ca: None,
            cert: None,
            key: None,
            tls_server_name: None,
        }
    }

    /// Checks the options and reads their files.
    pub fn resolve(&self) -> Result<Resolved, NatsOptionsError> {
        let servers = Servers::parse(&self.url).map_err(|e| NatsOptionsError::Invalid(format!("{e:#}")))?;
        let mut sources: Vec<(&str, Auth)> = Vec::new();
        if let Some(auth) = servers.auth() {
            sources.push(("credentials in NATS_URL", auth));
        }
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => sources.push((
                "NATS_USER/NATS_PASSWORD",
                Auth::UserPassword { user: user.clone(), password: password.clone() },
            )),
            (Some(_), None) => return Err(invalid("NATS_USER (--nats-user) is set without NATS_PASSWORD")),
            (None, Some(_)) => return Err(invalid("NATS_PASSWORD (--nats-password) is set without NATS_USER")),
            (None, None) => {}
        }
        if let Some(token) = &self.token {
            sources.push(("NATS_TOKEN", Auth::Token(token.clone())));
        }
        if let Some(path) = &self.nkey {
            sources.push(("NATS_NKEY", Auth::NKey { seed: read_seed(path)? }));
        }
        if let Some(path) = &self.creds {
            sources.push(("NATS_CREDS", read_creds(path)?));
        }
        if sources.len() > 1 {
            let names: Vec<&str> = sources.iter().map(|(name, _)| *name).collect();
            return Err(invalid(&format!(
                "conflicting NATS credentials: {} are all set; use exactly one way of logging in",
                names.join(", ")
            )));
        }
        let auth = sources.pop().map_or(Auth::None, |(_, auth)| auth);
        Ok(Resolved { addresses: servers.addresses, auth, tls: self.tls()? })
    }

    fn tls(&self) -> Result<Option<Tls>, NatsOptionsError> {
        if self.ca.is_none() && self.cert.is_none() && self.key.is_none() && self.tls_server_name.is_none() {
            return Ok(None);
        }
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(path) => {
                let certificates = read_certificates("NATS_CA", path)?;
                for certificate in certificates {
                    roots
                        .add(certificate)
                        .map_err(|e| bad_file("NATS_CA", path, format!("not a CA certificate: {e}")))?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err(invalid(
                        "a TLS option is set without NATS_CA (--nats-ca), and the system has no CA certificates",
                    ));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(&format!("TLS: {e}")))?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| invalid(&format!("TLS: {e}")))?;
        let builder = match &self.tls_server_name {
            None => builder.with_webpki_verifier(webpki),
            Some(name) => {
                let name = ServerName::try_from(name.clone()).map_err(|_| {
                    invalid(&format!(
                        "NATS_TLS_SERVER_NAME (--nats-tls-server-name) {name:?} is not a DNS name or IP address"
                    ))
                })?;
                builder.dangerous().with_custom_certificate_verifier(Arc::new(FixedServerName { inner: webpki, name }))
            }
        };
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certificates("NATS_CERT", cert)?;
                let bytes = read("NATS_KEY", key)?;
                let private = PrivateKeyDer::from_pem_slice(&bytes)
                    .map_err(|_| bad_file("NATS_KEY", key, "no PEM private key in it".into()))?;
                builder
                    .with_client_auth_cert(chain, private)
                    .map_err(|e| bad_file("NATS_KEY", key, format!("does not go with NATS_CERT: {e}")))?
            }
            (Some(_), None) => return Err(invalid("NATS_CERT (--nats-cert) is set without NATS_KEY (--nats-key)")),
            (None, Some(_)) => return Err(invalid("NATS_KEY (--nats-key) is set without NATS_CERT (--nats-cert)")),
            (None, None) => builder.with_no_client_auth(),
        };
        Ok(Some(Tls(config)))
    }
}

impl Resolved {
    /// The client's connect options for these credentials and TLS settings.
    pub fn connect_options(&self) -> Result<async_nats::ConnectOptions, NatsOptionsError> {
        let options = async_nats::ConnectOptions::new();
        let options = match &self.auth {
            Auth::None => options,
            Auth::UserPassword { user, password } => options.user_and_password(user.clone(), password.expose().into()),
            Auth::Token(token) => options.token(token.expose().into()),
            Auth::NKey { seed } => options.nkey(seed.expose().into()),
            Auth::Creds { path, contents } => options
                .credentials(contents.expose())
                .map_err(|_| bad_file("NATS_CREDS", path, "not a NATS credentials file".into()))?,
        };
        Ok(match &self.tls {
            None => options,
            Some(Tls(config)) => options.require_tls(true).tls_client_config(config.clone()),
        })
    }
}

/// Verifies the server's certificate for a name of its own instead of the URL's host.
#[derive(Debug)]
struct FixedServerName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedServerName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn invalid(message: &str) -> NatsOptionsError {
    NatsOptionsError::Invalid(message.to_owned())
}

fn bad_file(option: &'static str, path: &Path, problem: String) -> NatsOptionsError {
    NatsOptionsError::BadFile { option, path: path.to_owned(), problem }
}

fn read(option: &'static str, path: &Path) -> Result<Vec<u8>, NatsOptionsError> {
    std::fs::read(path).map_err(|error| NatsOptionsError::Unreadable { option, path: path.to_owned(), error })
}

fn read_certificates(option: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, NatsOptionsError> {
    let bytes = read(option, path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_file(option, path, format!("not a PEM file: {e}")))?;
    if certificates.is_empty() {
        return Err(bad_file(option, path, "no PEM certificate in it".into()));
    }
    Ok(certificates)
}

/// The seed of an NKey seed file: its first line that is a seed (`S…`), checked.
fn read_seed(path: &Path) -> Result<Secret, NatsOptionsError> {
    let text = String::from_utf8(read("NATS_NKEY", path)?)
        .map_err(|_| bad_file("NATS_NKEY", path, "not a text file".into()))?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with('S') && !line.contains(' '))
        .ok_or_else(|| bad_file("NATS_NKEY", path, "no NKey seed in it".into()))?;
    nkeys::KeyPair::from_seed(seed).map_err(|_| bad_file("NATS_NKEY", path, "not a valid NKey seed".into()))?;
    Ok(Secret::new(seed))
}

fn read_creds(path: &Path) -> Result<Auth, NatsOptionsError> {
    let contents = String::from_utf8(read("NATS_CREDS", path)?)
        .map_err(|_| bad_file("NATS_CREDS", path, "not a text file".into()))?;
    async_nats::ConnectOptions::new()
        .credentials(&contents)
        .map_err(|_| bad_file("NATS_CREDS", path, "not a NATS credentials file (user JWT and NKey seed)".into()))?;
    Ok(Auth::Creds { path: path.to_owned(), contents: Secret::new(contents) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(url: &str) -> NatsOptions {
        NatsOptions::from_url(url)
    }

    #[test]
    fn one_way_of_logging_in_at_a_time() {
        let mut both = options("nats://u:url-password@a:4222");
        both.token = Some(Secret::new("token-value-7"));
        let err = both.resolve().unwrap_err().to_string();
        assert!(err.contains("conflicting") && err.contains("NATS_URL") && err.contains("NATS_TOKEN"), "{err}");
        assert!(!err.contains("url-password") && !err.contains("token-value-7"), "{err}");

        let mut half = options("nats://a:4222");
        half.user = Some("api".into());
        let err = half.resolve().unwrap_err().to_string();
        assert!(err.contains("NATS_USER") && err.contains("NATS_PASSWORD"), "{err}");

        let mut user = options("nats://a:4222");
        user.user = Some("api".into());
        user.password = Some(Secret::new("pw-value-9"));
        let resolved = user.resolve().unwrap();
        assert!(
            matches!(&resolved.auth, Auth::UserPassword { user, password } if user == "api" && password.expose() == "pw-value-9")
        );
        let shown = format!("{user:?} {resolved:?}");
        assert!(!shown.contains("pw-value-9"), "{shown}");
    }

    #[test]
    fn the_url_credentials_keep_working() {
        let resolved = options("nats://u:p@a:4222").resolve().unwrap();
        assert!(
            matches!(&resolved.auth, Auth::UserPassword { user, password } if user == "u" && password.expose() == "p")
        );
        let resolved = options("nats://tok@a:4222").resolve().unwrap();
        assert!(matches!(&resolved.auth, Auth::Token(t) if t.expose() == "tok"));
    }

    #[test]
    fn missing_and_bad_files_name_their_option() {
        let dir = std::env::temp_dir().join(format!("nats-options-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.file");
        for (set, option) in [
            (&mut |o: &mut NatsOptions, p: &Path| o.nkey = Some(p.into())) as &mut dyn FnMut(&mut NatsOptions, &Path),
            &mut |o, p| o.creds = Some(p.into()),
            &mut |o, p| o.ca = Some(p.into()),
        ]
        .into_iter()
        .zip(["NATS_NKEY", "NATS_CREDS", "NATS_CA"])
        {
            let mut o = options("nats://a:4222");
            set(&mut o, &missing);
            let err = o.resolve().unwrap_err().to_string();
            assert!(err.contains(option) && err.contains("missing.file"), "{err}");
        }
        let garbage = dir.join("garbage");
        std::fs::write(&garbage, "SUNOTASEED-secret-material\n").unwrap();
        let mut o = options("nats://a:4222");
        o.nkey = Some(garbage.clone());
        let err = o.resolve().unwrap_err().to_string();
        assert!(err.contains("NATS_NKEY") && !err.contains("secret-material"), "{err}");
        let mut o = options("nats://a:4222");
        o.creds = Some(garbage.clone());
        let err = o.resolve().unwrap_err().to_string();
        assert!(err.contains("NATS_CREDS") && !err.contains("secret-material"), "{err}");
        let mut o = options("nats://a:4222");
        o.ca = Some(garbage);
        let err = o.resolve().unwrap_err().to_string();
        assert!(err.contains("NATS_CA") && err.contains("no PEM certificate"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_seed_is_read_and_redacted() {
        let dir = std::env::temp_dir().join(format!("nats-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = nkeys::KeyPair::new_user();
        let seed = key.seed().unwrap();
        let path = dir.join("user.nk");
        std::fs::write(&path, format!("{seed}\n")).unwrap();
        let mut o = options("nats://a:4222");
        o.nkey = Some(path);
        let resolved = o.resolve().unwrap();
        assert!(matches!(&resolved.auth, Auth::NKey { seed: s } if s.expose() == seed));
        assert!(!format!("{resolved:?}").contains(&seed));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

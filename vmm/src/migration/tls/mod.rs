//! How a migration link is secured, chosen on each side (exactly one):
//!
//! - `--tls-dir DIR`: certificates in QEMU's tls-creds-x509 layout (`ca-cert.pem`;
//!   `server-cert.pem` + `server-key.pem` on the destination, `client-cert.pem` +
//!   `client-key.pem` on the source). Mutual authentication always (QEMU's verify-peer=on): each
//!   side checks the other's chain against `ca-cert.pem`; the source also checks the
//!   destination's name (the URL's host, or `--tls-hostname`). `--tls-authz NAME` on either
//!   side further requires the peer's certificate to carry NAME as a DNS name or subject CN.
//! - `--tls-psk FILE`: a pre-shared key (QEMU's `keys.psk`: `identity:hexkey` lines, the first
//!   is used; or a bare hex key; at least 16 bytes). rustls has no external-PSK support, so both
//!   sides derive the same Ed25519 key from it (HKDF-SHA256) and a self-signed certificate for
//!   it; each accepts only a peer that presents that exact public key and proves it holds the
//!   private key (the TLS 1.3 CertificateVerify signature).
//! - `--insecure`: plain TCP, named in the log and in the migration report.
//!
//! TLS 1.3 only, rustls with the ring provider. Both connections of a migration (main and
//! urgent) do the handshake, bounded by `HANDSHAKE_TIMEOUT`; the peer's identity is checked
//! inside it, so the destination never reads a frame from an unauthenticated peer. Private key
//! and PSK files readable by group or others are refused, as ssh does.

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::server::danger::ClientCertVerifier;
use rustls::{CertificateError, ClientConfig, OtherError, ServerConfig};
use serde::{Deserialize, Serialize};

use super::link::Link;
use crate::host_file::{self, HostFileError};
use psk::{psk_identity, PinnedKey, PSK_NAME};
use x509::{own_cert, roots, AuthzClient, AuthzServer};

mod psk;
mod x509;

#[cfg(test)]
mod tests;

/// How long a peer may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Credential files are small; a larger one is not one.
const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "choose how the migration link is secured: --tls-dir DIR (certificates), --tls-psk FILE \
         (a pre-shared key) or --insecure (plain TCP: anyone who reaches the port can send a \
         VM, and guest memory crosses the network in clear)"
    )]
    NoChoice,
    #[error("choose only one of --tls-dir, --tls-psk and --insecure")]
    Conflict,
    /// The flag that only means something with certificates.
    #[error("{0} applies to --tls-dir (certificates) only")]
    NeedsX509(&'static str),
    #[error(transparent)]
    File(#[from] HostFileError),
    #[error(
        "{path} is readable by group or others (mode {mode:03o}): a key must be private to its \
         owner (chmod 600)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// Why the key file does not hold a key (never the key itself).
    #[error("the pre-shared key in {path}: {reason}")]
    Psk { path: PathBuf, reason: &'static str },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Config(#[source] rustls::Error),
    #[error("TLS setup: the CA certificates: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("deriving the certificate of the pre-shared key: {0}")]
    Derive(#[source] rcgen::Error),
    #[error("'{0}' is not a name a TLS certificate can be checked against")]
    ServerName(String),
    #[error("TLS handshake with {peer}: {source}")]
    Handshake {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {peer}: not done after {secs:.1} s (a silent or stalled peer)")]
    HandshakeTimeout { peer: String, secs: f64 },
}

/// The three choices as the command line and the API request carry them. Paths are read by the
/// VMM process when the migration starts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[group(id = "transport", multiple = false)]
pub struct TransportArgs {
    /// TLS with certificates: a directory in QEMU's tls-creds-x509 layout (ca-cert.pem;
    /// server-cert.pem + server-key.pem on the destination, client-cert.pem + client-key.pem on
    /// the source). Each side verifies the other's certificate against ca-cert.pem.
    #[arg(long, value_name = "DIR")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// TLS with a pre-shared key: a file (mode 600) holding QEMU's keys.psk lines
    /// (identity:hexkey; the first is used) or a bare hex key, at least 16 bytes. Both sides
    /// must name the same key.
    #[arg(long, value_name = "FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_psk: Option<PathBuf>,
    /// Plain TCP, no authentication, no encryption: anyone who reaches the port can send a VM,
    /// and guest memory crosses the network in clear. Named in the log and the report.
    #[arg(long)]
    #[serde(default)]
    pub insecure: bool,
}

impl TransportArgs {
    /// `--insecure`.
    pub fn insecure() -> Self {
        TransportArgs {
            insecure: true,
            ..Default::default()
        }
    }

    /// Makes relative paths absolute against `cwd` (the VMM that reads them may run elsewhere).
    pub fn absolute(&mut self, cwd: &Path) {
        for p in [&mut self.tls_dir, &mut self.tls_psk].into_iter().flatten() {
            if p.is_relative() {
                *p = cwd.join(&*p);
            }
        }
    }
}

/// How one side secures its migration links.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    Insecure,
    X509 {
        dir: PathBuf,
        /// `--tls-authz`: the name the peer's certificate must carry.
        authz: Option<String>,
        /// Source only: the name the destination's certificate must carry instead of the URL's
        /// host.
        hostname: Option<String>,
    },
    Psk {
        file: PathBuf,
    },
}

impl Transport {
    /// Exactly one choice, and the x509-only flags only with it.
    pub fn choose(
        args: &TransportArgs,
        authz: Option<&str>,
        hostname: Option<&str>,
    ) -> Result<Transport, TlsError> {
        let t = match (&args.tls_dir, &args.tls_psk, args.insecure) {
            (None, None, false) => return Err(TlsError::NoChoice),
            (Some(dir), None, false) => {
                return Ok(Transport::X509 {
                    dir: dir.clone(),
                    authz: authz.map(str::to_string),
                    hostname: hostname.map(str::to_string),
                })
            }
            (None, Some(file), false) => Transport::Psk { file: file.clone() },
            (None, None, true) => Transport::Insecure,
            _ => return Err(TlsError::Conflict),
        };
        if authz.is_some() {
            return Err(TlsError::NeedsX509("--tls-authz"));
        }
        if hostname.is_some() {
            return Err(TlsError::NeedsX509("--tls-hostname"));
        }
        Ok(t)
    }

    /// What the migration report calls it.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Insecure => "tcp-insecure",
            Transport::X509 { .. } => "tls-x509",
            Transport::Psk { .. } => "tls-psk",
        }
    }

    /// The source's side, for a destination at `addr` (HOST:PORT): reads the credentials now.
    pub fn connector(&self, addr: &str) -> Result<Connector, TlsError> {
        let provider = provider();
        let (config, name) = match self {
            Transport::Insecure => {
                warn_insecure();
                return Ok(Connector(None));
            }
            Transport::Psk { file } => {
                let id = psk_identity(file)?;
                let verifier = Arc::new(PinnedKey::new(id.spki, &provider));
                let mut config = ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(TlsError::Config)?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_client_auth_cert(vec![id.cert], id.key)
                    .map_err(TlsError::Config)?;
                config.resumption = rustls::client::Resumption::disabled();
                (config, PSK_NAME.to_string())
            }
            Transport::X509 {
                dir,
                authz,
                hostname,
            } => {
                let roots = Arc::new(roots(dir)?);
                let (chain, key) = own_cert(dir, "client")?;
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    provider.clone(),
                )
                .build()
                .map_err(TlsError::Verifier)?;
                let verifier = Arc::new(AuthzServer {
                    inner: webpki,
                    authz: authz.clone(),
                });
                let mut config = ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(TlsError::Config)?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_client_auth_cert(chain, key)
                    .map_err(TlsError::Config)?;
                config.resumption = rustls::client::Resumption::disabled();
                let name = match hostname {
                    Some(h) => h.clone(),
                    None => host_of(addr).to_string(),
                };
                (config, name)
            }
        };
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name))?;
        Ok(Connector(Some((Arc::new(config), server_name))))
    }

    /// The destination's side: reads the credentials now.
    pub fn acceptor(&self) -> Result<Acceptor, TlsError> {
        let provider = provider();
        let (verifier, chain, key): (Arc<dyn ClientCertVerifier>, _, _) = match self {
            Transport::Insecure => {
                warn_insecure();
                return Ok(Acceptor(None));
            }
            Transport::Psk { file } => {
                let id = psk_identity(file)?;
                (
                    Arc::new(PinnedKey::new(id.spki, &provider)),
                    vec![id.cert],
                    id.key,
                )
            }
            Transport::X509 { dir, authz, .. } => {
                let roots = Arc::new(roots(dir)?);
                let (chain, key) = own_cert(dir, "server")?;
                let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots,
                    provider.clone(),
                )
                .build()
                .map_err(TlsError::Verifier)?;
                (
                    Arc::new(AuthzClient {
                        inner: webpki,
                        authz: authz.clone(),
                    }),
                    chain,
                    key,
                )
            }
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
        // One connection per migration, never resumed.
        config.send_tls13_tickets = 0;
        Ok(Acceptor(Some(Arc::new(config))))
    }
}

fn warn_insecure() {
    tracing::warn!(
        "migration over plain TCP (--insecure): the peer is not authenticated and guest memory \
         crosses the network in clear"
    );
}

/// rustls deprecates its ring provider (0.23.48) for lacking post-quantum key exchange, in favour
/// of aws-lc-rs, whose build needs cmake, which this project does without: ring it is, with
/// X25519/ECDHE key exchange.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// HOST of HOST:PORT, without an IPv6 address's brackets.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The source's TLS settings for one migration (None: plain TCP).
pub struct Connector(Option<(Arc<ClientConfig>, ServerName<'static>)>);

/// The destination's TLS settings (None: plain TCP).
pub struct Acceptor(Option<Arc<ServerConfig>>);

impl Connector {
    /// Secures a connection to `peer`: the handshake and the destination's identity checked.
    pub fn connect(&self, sock: TcpStream, peer: &str) -> Result<Link, TlsError> {
        match &self.0 {
            None => Ok(Link::plain(sock)),
            Some((config, name)) => {
                let conn = rustls::ClientConnection::new(config.clone(), name.clone())
                    .map_err(TlsError::Config)?;
                handshake(sock, conn.into(), peer)
            }
        }
    }
}

impl Acceptor {
    /// Secures a connection from `peer`: the handshake and the source's identity checked,
    /// before any frame is read.
    pub fn accept(&self, sock: TcpStream, peer: &str) -> Result<Link, TlsError> {
        match &self.0 {
            None => Ok(Link::plain(sock)),
            Some(config) => {
                let conn =
                    rustls::ServerConnection::new(config.clone()).map_err(TlsError::Config)?;
                handshake(sock, conn.into(), peer)
            }
        }
    }
}

/// Runs the handshake to its end within `HANDSHAKE_TIMEOUT` in all (a peer trickling bytes
/// cannot hold it open), then leaves the socket without timeouts.
fn handshake(sock: TcpStream, conn: rustls::Connection, peer: &str) -> Result<Link, TlsError> {
    handshake_within(sock, conn, peer, HANDSHAKE_TIMEOUT)
}

fn handshake_within(
    sock: TcpStream,
    mut conn: rustls::Connection,
    peer: &str,
    limit: Duration,
) -> Result<Link, TlsError> {
    use std::io::{Error, ErrorKind};
    let deadline = Instant::now() + limit;
    let result = (|| -> std::io::Result<()> {
        let mut s = &sock;
        while conn.is_handshaking() || conn.wants_write() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left < Duration::from_millis(1) {
                return Err(ErrorKind::TimedOut.into());
            }
            s.set_read_timeout(Some(left))?;
            s.set_write_timeout(Some(left))?;
            if conn.wants_write() {
                conn.write_tls(&mut s)?;
                continue;
            }
            if conn.read_tls(&mut s)? == 0 {
                return Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "the peer closed the connection (does it use TLS with the same kind of \
                     credentials?)",
                ));
            }
            if let Err(e) = conn.process_new_packets() {
                // The alert rustls queued tells the peer why; best effort.
                let _ = conn.write_tls(&mut s);
                return Err(Error::new(ErrorKind::InvalidData, describe(&e)));
            }
        }
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
        Ok(())
    })();
    match result {
        Ok(()) => Ok(Link::tls(sock, conn)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(TlsError::HandshakeTimeout {
                peer: peer.to_string(),
                secs: limit.as_secs_f64(),
            })
        }
        Err(source) => Err(TlsError::Handshake {
            peer: peer.to_string(),
            source,
        }),
    }
}

/// A rustls error in words, with what it likely means here (rustls shows our own refusals'
/// reasons with Debug).
pub(super) fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(why))) => {
            format!("the peer's certificate is refused: {why}")
        }
        rustls::Error::InvalidCertificate(why) => {
            format!("the peer's certificate is refused: {why:?}")
        }
        rustls::Error::AlertReceived(alert) => format!(
            "the peer refused this side: TLS alert {alert:?} (its credentials do not accept \
             this side's certificate or key)"
        ),
        rustls::Error::InvalidMessage(_) => {
            format!("{e} (not TLS: is the peer started with --insecure?)")
        }
        other => other.to_string(),
    }
}

/// Reads a credential file through `host_file` (a regular file, bounded); `private` ones must
/// not be readable by group or others.
fn read_file(path: &Path, what: &'static str, private: bool) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let file = host_file::open_regular(path, what)?;
    let io = |source| HostFileError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if private && mode & 0o077 != 0 {
        return Err(TlsError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_FILE {
        return Err(HostFileError::TooBig {
            what,
            path: path.to_owned(),
            size: meta.len(),
            max: MAX_FILE,
        }
        .into());
    }
    let mut data = Vec::new();
    file.take(MAX_FILE).read_to_end(&mut data).map_err(io)?;
    Ok(data)
}

fn refused(what: &'static str) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(what)))))
}

#[derive(Debug)]
struct Refused(&'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Refused {}

/// TLS 1.2 is never negotiated (TLS 1.3 only): a call means a bug, refused.
fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::General("TLS 1.2 is not offered".into()))
}

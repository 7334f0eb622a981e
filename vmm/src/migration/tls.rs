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

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use serde::{Deserialize, Serialize};

use super::link::Link;
use crate::host_file::{self, HostFileError};

/// How long a peer may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Credential files are small; a larger one is not one.
const MAX_FILE: u64 = 1 << 20;
const PSK_INFO: &[u8] = b"vmm migration psk v1";
/// The name in the PSK-derived certificate (never checked: the key is).
const PSK_NAME: &str = "vmm-migration-psk";
const MIN_PSK_BYTES: usize = 16;
/// PKCS#8 v1 (RFC 8410) of an Ed25519 private key, up to its 32-byte seed.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

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

fn pem_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read_file(path, what, false)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no CERTIFICATE in it"));
    }
    Ok(certs)
}

fn roots(dir: &Path) -> Result<RootCertStore, TlsError> {
    let path = dir.join("ca-cert.pem");
    let mut roots = RootCertStore::empty();
    for c in certs(&path, "the TLS CA certificate")? {
        roots
            .add(c)
            .map_err(|e| pem_error(&path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// This side's `{role}-cert.pem` (chain) and `{role}-key.pem`.
fn own_cert(
    dir: &Path,
    role: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = certs(
        &dir.join(format!("{role}-cert.pem")),
        "this side's TLS certificate",
    )?;
    let path = dir.join(format!("{role}-key.pem"));
    let data = read_file(&path, "this side's TLS private key", true)?;
    let key = PrivateKeyDer::from_pem_slice(&data).map_err(|e| pem_error(&path, e))?;
    Ok((chain, key))
}

/// The certificate and key both sides derive from one pre-shared key.
struct PskIdentity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    spki: Vec<u8>,
}

fn psk_identity(path: &Path) -> Result<PskIdentity, TlsError> {
    let data = read_file(path, "the TLS pre-shared key", true)?;
    let psk = parse_psk(&data).map_err(|reason| TlsError::Psk {
        path: path.to_owned(),
        reason,
    })?;
    derive_identity(&psk)
}

/// QEMU's keys.psk (`identity:hexkey` lines, the first counts) or a bare hex key.
fn parse_psk(data: &[u8]) -> Result<Vec<u8>, &'static str> {
    let text = std::str::from_utf8(data).map_err(|_| "the file is not text")?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or("the file is empty")?;
    let hex = line.rsplit_once(':').map_or(line, |(_, k)| k).trim();
    if hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("the key is not hexadecimal (identity:hexkey or hexkey)");
    }
    let key: Vec<u8> = hex
        .as_bytes()
        .chunks(2)
        .map(|p| {
            let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            digit(p[0]) << 4 | digit(p[1])
        })
        .collect();
    if key.len() < MIN_PSK_BYTES {
        return Err("the key is shorter than 16 bytes (32 hex digits)");
    }
    Ok(key)
}

/// HKDF-SHA256(psk) -> an Ed25519 seed -> its key pair and a self-signed certificate. rustls
/// has no external PSK, so the key stands in for it: only a holder of the PSK holds the private
/// key, and the handshake proves possession.
fn derive_identity(psk: &[u8]) -> Result<PskIdentity, TlsError> {
    let mut pkcs8 = ED25519_PKCS8_V1_PREFIX.to_vec();
    let mut seed = [0u8; 32];
    ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[])
        .extract(psk)
        .expand(&[PSK_INFO], ring::hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut seed))
        // Cannot fail: 32 bytes is within HKDF-SHA256's output limit.
        .map_err(|_| TlsError::Derive(rcgen::Error::RingUnspecified))?;
    pkcs8.extend_from_slice(&seed);
    seed.fill(0);
    let key_der = PrivatePkcs8KeyDer::from(pkcs8);
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key_der, &rcgen::PKCS_ED25519)
        .map_err(TlsError::Derive)?;
    let mut params =
        rcgen::CertificateParams::new(vec![PSK_NAME.to_string()]).map_err(TlsError::Derive)?;
    params.serial_number = Some(rcgen::SerialNumber::from(1u64));
    let cert = params.self_signed(&key_pair).map_err(TlsError::Derive)?;
    use rcgen::PublicKeyData;
    Ok(PskIdentity {
        cert: cert.der().clone(),
        spki: key_pair.subject_public_key_info(),
        key: PrivateKeyDer::Pkcs8(key_der),
    })
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

/// The PSK's verifier, on both sides: the peer's certificate must hold the derived public key
/// (its name, dates and issuer do not matter), and its handshake signature must verify.
#[derive(Debug)]
struct PinnedKey {
    spki: Vec<u8>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedKey {
    fn new(spki: Vec<u8>, provider: &CryptoProvider) -> Self {
        PinnedKey {
            spki,
            algorithms: provider.signature_verification_algorithms,
        }
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if cert.subject_public_key_info().as_ref() != self.spki.as_slice() {
            return Err(refused(
                "its key is not the one this side's pre-shared key derives (a different \
                 --tls-psk)",
            ));
        }
        Ok(())
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

/// TLS 1.2 is never negotiated (TLS 1.3 only): a call means a bug, refused.
fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::General("TLS 1.2 is not offered".into()))
}

impl ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `--tls-authz NAME`: the certificate carries NAME as a DNS name or as its subject's CN.
fn authorized(end_entity: &CertificateDer<'_>, name: &str) -> Result<(), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let by_dns = cert.valid_dns_names().any(|n| n == name);
    if by_dns || subject_cns(cert.subject()).any(|cn| cn == name.as_bytes()) {
        Ok(())
    } else {
        Err(refused("it does not carry the name --tls-authz requires"))
    }
}

/// The source's x509 verifier: the CA's chain and the name (rustls' own), then `--tls-authz`.
#[derive(Debug)]
struct AuthzServer {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    authz: Option<String>,
}

impl ServerCertVerifier for AuthzServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if let Some(name) = &self.authz {
            authorized(end_entity, name)?;
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The destination's x509 verifier: the CA's chain (client auth mandatory), then
/// `--tls-authz`.
#[derive(Debug)]
struct AuthzClient {
    inner: Arc<dyn ClientCertVerifier>,
    authz: Option<String>,
}

impl ClientCertVerifier for AuthzClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(name) = &self.authz {
            authorized(end_entity, name)?;
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// One DER element: (tag, contents, the rest). None if malformed (a certificate that got this
/// far was parsed by webpki already; this only walks its subject).
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| a << 8 | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The commonName values of a Name's RDN sequence (its contents, without the outer SEQUENCE).
fn subject_cns(name: &[u8]) -> impl Iterator<Item = &[u8]> {
    const CN: [u8; 3] = [0x55, 0x04, 0x03];
    let mut sets = name;
    let mut found = Vec::new();
    while let Some((0x31, set, rest)) = der_next(sets) {
        sets = rest;
        let mut atvs = set;
        while let Some((0x30, atv, rest)) = der_next(atvs) {
            atvs = rest;
            if let Some((0x06, oid, value)) = der_next(atv) {
                if oid == CN {
                    if let Some((_, v, _)) = der_next(value) {
                        found.push(v);
                    }
                }
            }
        }
    }
    found.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_parse_as_qemu_writes_them_and_short_or_odd_keys_are_refused() {
        let key = "00112233445566778899aabbccddeeff";
        assert_eq!(parse_psk(key.as_bytes()).unwrap().len(), 16);
        let qemu = format!("qemu:{key}00\nother:{key}\n");
        assert_eq!(parse_psk(qemu.as_bytes()).unwrap().len(), 17);
        assert!(parse_psk(b"qemu:0011").is_err());
        assert!(parse_psk(b"zz112233445566778899aabbccddeeff").is_err());
        assert!(parse_psk(b"\n\n").is_err());
        assert!(parse_psk(b"0011223344556677889").is_err());
    }

    #[test]
    fn one_psk_derives_one_key_and_another_a_different_one() {
        let a = derive_identity(&[7u8; 32]).unwrap();
        let b = derive_identity(&[7u8; 32]).unwrap();
        let c = derive_identity(&[8u8; 32]).unwrap();
        assert_eq!(a.spki, b.spki);
        assert_ne!(a.spki, c.spki);
        let pin = PinnedKey::new(a.spki.clone(), &provider());
        assert!(pin.check(&b.cert).is_ok());
        assert!(pin.check(&c.cert).is_err());
    }

    #[test]
    fn exactly_one_choice_and_x509_flags_only_with_certificates() {
        let none = TransportArgs::default();
        assert!(matches!(
            Transport::choose(&none, None, None),
            Err(TlsError::NoChoice)
        ));
        let msg = TlsError::NoChoice.to_string();
        for flag in ["--tls-dir", "--tls-psk", "--insecure"] {
            assert!(msg.contains(flag), "{msg}");
        }
        let both = TransportArgs {
            tls_psk: Some("k".into()),
            insecure: true,
            ..Default::default()
        };
        assert!(matches!(
            Transport::choose(&both, None, None),
            Err(TlsError::Conflict)
        ));
        let psk = TransportArgs {
            tls_psk: Some("k".into()),
            ..Default::default()
        };
        assert!(Transport::choose(&psk, Some("src"), None).is_err());
        assert_eq!(
            Transport::choose(&TransportArgs::insecure(), None, None)
                .unwrap()
                .name(),
            "tcp-insecure"
        );
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("h.example:7"), "h.example");
    }

    fn psk_file(dir: &Path, name: &str, key: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, key).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// A listener on loopback whose first connection is accepted with `server` in a thread.
    fn serve(server: Transport) -> (String, std::thread::JoinHandle<Result<Link, TlsError>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let acceptor = server.acceptor().unwrap();
        let t = std::thread::spawn(move || {
            let (s, peer) = l.accept().unwrap();
            acceptor.accept(s, &peer.to_string())
        });
        (addr, t)
    }

    #[test]
    fn a_psk_link_carries_both_directions_at_once_and_a_wrong_key_fails_both_sides() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let good = psk_file(
            dir.path(),
            "a",
            "id:00112233445566778899aabbccddeeff\n",
            0o600,
        );
        let psk = Transport::Psk { file: good.clone() };
        let (addr, t) = serve(psk.clone());
        let sock = TcpStream::connect(&addr).unwrap();
        let mut client = psk.connector(&addr).unwrap().connect(sock, &addr).unwrap();
        let mut server = t.join().unwrap().unwrap();
        assert!(client.is_tls() && server.is_tls());
        // A reader blocked on each side must not hold up that side's writer.
        let mut server_r = server.try_clone().unwrap();
        let mut client_r = client.try_clone().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expect = data.clone();
        let got_s = std::thread::spawn(move || {
            let mut v = vec![0; expect.len()];
            server_r.read_exact(&mut v).unwrap();
            assert!(v == expect);
        });
        let expect = data.clone();
        let got_c = std::thread::spawn(move || {
            let mut v = vec![0; expect.len()];
            client_r.read_exact(&mut v).unwrap();
            assert!(v == expect);
        });
        let d = data.clone();
        let send_s = std::thread::spawn(move || server.write_all(&d).unwrap());
        client.write_all(&data).unwrap();
        send_s.join().unwrap();
        got_s.join().unwrap();
        got_c.join().unwrap();
        // EOF reads as EOF.
        drop(client);

        let bad = psk_file(dir.path(), "b", "ffeeddccbbaa99887766554433221100", 0o600);
        let (addr, t) = serve(psk);
        let sock = TcpStream::connect(&addr).unwrap();
        let e = Transport::Psk { file: bad }
            .connector(&addr)
            .unwrap()
            .connect(sock, &addr)
            .err()
            .unwrap();
        assert!(e.to_string().contains("--tls-psk"), "{e}");
        let e = t.join().unwrap().err().unwrap();
        assert!(matches!(e, TlsError::Handshake { .. }), "{e}");
    }

    #[test]
    fn plain_tcp_to_a_tls_side_is_refused_and_open_key_files_are_refused() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let key = psk_file(dir.path(), "a", "00112233445566778899aabbccddeeff", 0o600);
        let (addr, t) = serve(Transport::Psk { file: key });
        let mut sock = TcpStream::connect(&addr).unwrap();
        sock.write_all(b"VMMG\x01\x00 a Hello frame, raw").unwrap();
        let e = t.join().unwrap().err().unwrap().to_string();
        assert!(e.contains("--insecure"), "{e}");
        let open = psk_file(dir.path(), "b", "00112233445566778899aabbccddeeff", 0o644);
        let e = Transport::Psk { file: open }.acceptor().err().unwrap();
        assert!(matches!(e, TlsError::Permissions { .. }), "{e}");
    }

    /// A peer that connects and says nothing, or trickles a byte at a time, is given up on
    /// at the deadline of the whole handshake, named.
    #[test]
    fn a_silent_or_trickling_peer_times_out_the_handshake() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let key = psk_file(dir.path(), "a", "00112233445566778899aabbccddeeff", 0o600);
        let Acceptor(Some(config)) = (Transport::Psk { file: key }).acceptor().unwrap() else {
            panic!("no TLS config")
        };
        for trickle in [false, true] {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, from) = l.accept().unwrap();
            let t = std::thread::spawn(move || {
                // A TLS record header, then one byte of its body every 50 ms.
                if trickle {
                    let _ = peer.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]);
                    for _ in 0..20 {
                        std::thread::sleep(Duration::from_millis(50));
                        let _ = peer.write_all(&[0]);
                    }
                }
                std::thread::sleep(Duration::from_millis(600));
            });
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let started = Instant::now();
            let e = handshake_within(
                s,
                conn.into(),
                &from.to_string(),
                Duration::from_millis(300),
            )
            .err()
            .unwrap();
            assert!(matches!(e, TlsError::HandshakeTimeout { .. }), "{e}");
            assert!(e.to_string().contains(&from.to_string()), "{e}");
            assert!(started.elapsed() < Duration::from_millis(500), "{e}");
            t.join().unwrap();
        }
    }

    #[test]
    fn a_subjects_common_names_are_found() {
        let mut params = rcgen::CertificateParams::new(vec!["dns.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "source-1");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "lab");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert!(authorized(cert.der(), "source-1").is_ok());
        assert!(authorized(cert.der(), "dns.example").is_ok());
        assert!(authorized(cert.der(), "lab").is_err());
        assert!(authorized(cert.der(), "source").is_err());
    }
}

//! `--tls-psk`: the key file, the Ed25519 identity both sides derive from it, and the verifier
//! that accepts only a peer presenting that exact key.

use std::path::Path;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::{no_tls12, read_file, refused, TlsError};

const PSK_INFO: &[u8] = b"vmm migration psk v1";
/// The name in the PSK-derived certificate (never checked: the key is).
pub(super) const PSK_NAME: &str = "vmm-migration-psk";
const MIN_PSK_BYTES: usize = 16;
/// PKCS#8 v1 (RFC 8410) of an Ed25519 private key, up to its 32-byte seed.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The certificate and key both sides derive from one pre-shared key.
pub(super) struct PskIdentity {
    pub(super) cert: CertificateDer<'static>,
    pub(super) key: PrivateKeyDer<'static>,
    pub(super) spki: Vec<u8>,
}

pub(super) fn psk_identity(path: &Path) -> Result<PskIdentity, TlsError> {
    let data = read_file(path, "the TLS pre-shared key", true)?;
    let psk = parse_psk(&data).map_err(|reason| TlsError::Psk {
        path: path.to_owned(),
        reason,
    })?;
    derive_identity(&psk)
}

/// QEMU's keys.psk (`identity:hexkey` lines, the first counts) or a bare hex key.
pub(super) fn parse_psk(data: &[u8]) -> Result<Vec<u8>, &'static str> {
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
pub(super) fn derive_identity(psk: &[u8]) -> Result<PskIdentity, TlsError> {
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

/// The PSK's verifier, on both sides: the peer's certificate must hold the derived public key
/// (its name, dates and issuer do not matter), and its handshake signature must verify.
#[derive(Debug)]
pub(super) struct PinnedKey {
    spki: Vec<u8>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedKey {
    pub(super) fn new(spki: Vec<u8>, provider: &CryptoProvider) -> Self {
        PinnedKey {
            spki,
            algorithms: provider.signature_verification_algorithms,
        }
    }

    pub(super) fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
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

//! `--tls-dir`: the certificates and keys in QEMU's layout, and `--tls-authz`, which checks a
//! name in the peer's certificate on top of rustls' chain (and host name) checks.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use super::{no_tls12, read_file, refused, TlsError};

fn pem_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

pub(super) fn certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read_file(path, what, false)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no CERTIFICATE in it"));
    }
    Ok(certs)
}

pub(super) fn roots(dir: &Path) -> Result<RootCertStore, TlsError> {
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
pub(super) fn own_cert(
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

/// `--tls-authz NAME`: the certificate carries NAME as a DNS name or as its subject's CN.
pub(super) fn authorized(end_entity: &CertificateDer<'_>, name: &str) -> Result<(), rustls::Error> {
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
pub(super) struct AuthzServer {
    pub(super) inner: Arc<rustls::client::WebPkiServerVerifier>,
    pub(super) authz: Option<String>,
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
pub(super) struct AuthzClient {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) authz: Option<String>,
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

//! Credentials for migrations over TLS, made fresh in each test: a pre-shared key file
//! (`--tls-psk`) and QEMU-layout certificate directories (`--tls-dir`) signed by CAs made
//! with rcgen.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

fn write_private(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A new random key in QEMU's keys.psk format, mode 600, at DIR/NAME.
pub fn psk_file(dir: &Path, name: &str) -> PathBuf {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .unwrap();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(name);
    write_private(&path, format!("vmm:{hex}\n").as_bytes());
    path
}

/// A CA that signs the certificates of `--tls-dir` directories.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(&self, sans: &[&str], cn: &str, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*s).try_into().unwrap()),
            })
            .collect();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// DIR/NAME with ca-cert.pem (this CA) and server-cert.pem + server-key.pem for `sans`
    /// (DNS names or IP addresses).
    pub fn server_dir(&self, dir: &Path, name: &str, sans: &[&str]) -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca-cert.pem"), &self.cert_pem).unwrap();
        let (cert, key) = self.leaf(sans, "destination", ExtendedKeyUsagePurpose::ServerAuth);
        std::fs::write(d.join("server-cert.pem"), cert).unwrap();
        write_private(&d.join("server-key.pem"), key.as_bytes());
        d
    }

    /// DIR/NAME with ca-cert.pem (`trust`, the CA that must have signed the destination's
    /// certificate) and client-cert.pem + client-key.pem signed by this CA for subject CN `cn`.
    pub fn client_dir(&self, dir: &Path, name: &str, trust: &Ca, cn: &str) -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca-cert.pem"), &trust.cert_pem).unwrap();
        let (cert, key) = self.leaf(&[], cn, ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(d.join("client-cert.pem"), cert).unwrap();
        write_private(&d.join("client-key.pem"), key.as_bytes());
        d
    }
}

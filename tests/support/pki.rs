//! A private PKI for tests: a CA that the proxy trusts for backends and clients trust for the proxy, a
//! server certificate for localhost, and certificates that must be refused (another CA, another name).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

pub struct Pki {
    pub dir: PathBuf,
    /// The trusted CA.
    pub ca: PathBuf,
    /// localhost / 127.0.0.1 / ::1, signed by the CA.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// localhost, signed by an unrelated CA.
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
    /// Signed by the CA but for another name only.
    pub wrong_name_cert: PathBuf,
    pub wrong_name_key: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(names: &[&str], issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (ca_pem, issuer) = ca("imapgate test CA");
        let (cert, key) = leaf(&["localhost", "127.0.0.1", "::1"], &issuer);
        let (_, rogue_issuer) = ca("rogue CA");
        let (rogue_cert, rogue_key) = leaf(&["localhost", "127.0.0.1"], &rogue_issuer);
        let (wrong_cert, wrong_key) = leaf(&["other.invalid"], &issuer);
        Pki {
            dir: dir.to_owned(),
            ca: write("ca.pem", &ca_pem),
            cert: write("server.pem", &cert),
            key: write("server-key.pem", &key),
            rogue_cert: write("rogue.pem", &rogue_cert),
            rogue_key: write("rogue-key.pem", &rogue_key),
            wrong_name_cert: write("wrong-name.pem", &wrong_cert),
            wrong_name_key: write("wrong-name-key.pem", &wrong_key),
            issuer,
        }
    }

    /// A certificate for `names` signed by the test CA, valid from `days_from` to `days_to` days from now
    /// (negative: in the past), written as `{stem}.pem` and `{stem}-key.pem`: (cert, key).
    pub fn issue(&self, stem: &str, names: &[&str], days_from: i64, days_to: i64) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.use_authority_key_identifier_extension = true;
        let now = std::time::SystemTime::now();
        let at = |days: i64| {
            let offset = std::time::Duration::from_secs(days.unsigned_abs() * 86_400);
            let when = if days < 0 { now - offset } else { now + offset };
            rcgen::date_time_ymd(1970, 1, 1) + when.duration_since(std::time::UNIX_EPOCH).unwrap()
        };
        params.not_before = at(days_from);
        params.not_after = at(days_to);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (self.dir.join(format!("{stem}.pem")), self.dir.join(format!("{stem}-key.pem")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

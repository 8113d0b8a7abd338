//! Certificates made at test time with rcgen (a private CA, server and client leaves), and
//! temporary directories to write them into. No key is ever committed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::CertificateDer;

/// A directory of its own under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tp-tmp-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    /// Writes `contents` to a scratch file, then renames it over `file`: readers see the old or
    /// the new file, never half of one.
    pub fn replace(&self, file: &str, contents: &str) -> PathBuf {
        let path = self.path(file);
        let scratch = self.path(&format!("{file}.new"));
        std::fs::write(&scratch, contents).unwrap();
        std::fs::rename(&scratch, &path).unwrap();
        path
    }

    /// Writes `contents` to `file`; its path as a string, for a setting.
    pub fn write(&self, file: &str, contents: &str) -> String {
        self.replace(file, contents).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    pub der: CertificateDer<'static>,
}

/// A certificate signed by a [`Ca`], with its key.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { issuer: Issuer::new(params, key), pem: cert.pem(), der: cert.der().clone() }
    }

    /// A certificate for a server on loopback (and `localhost`).
    pub fn server(&self, name: &str) -> Leaf {
        self.leaf(name, vec!["127.0.0.1".into(), "localhost".into()])
    }

    /// A client certificate.
    pub fn client(&self, name: &str) -> Leaf {
        self.leaf(name, Vec::new())
    }

    fn leaf(&self, name: &str, names: Vec<String>) -> Leaf {
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
    }
}

impl Leaf {
    /// Certificate and key in one PEM, as reqwest's `Identity` wants them.
    pub fn identity(&self) -> reqwest::Identity {
        reqwest::Identity::from_pem(format!("{}{}", self.cert_pem, self.key_pem).as_bytes()).unwrap()
    }
}

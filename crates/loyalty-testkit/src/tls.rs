//! Certificates made at test time: a CA, a server certificate for `localhost` and `127.0.0.1`
//! and a client certificate (for an internal caller), as PEM strings and as files in a
//! temporary directory (removed on drop) for the programs that want files (PostgreSQL,
//! redis-server, `loyalty serve`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use loyalty::{Scope, ServerTls};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The name the server certificate is issued for (besides 127.0.0.1).
pub const SERVER_NAME: &str = "localhost";

pub struct TestPki {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

fn key_pair() -> KeyPair {
    KeyPair::generate().expect("an ECDSA P-256 key")
}

impl TestPki {
    /// A fresh CA with a server and a client certificate (ECDSA P-256; milliseconds).
    pub fn generate() -> TestPki {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(DnType::CommonName, "loyalty test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = key_pair();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let mut server =
            CertificateParams::new(vec![SERVER_NAME.to_string(), "127.0.0.1".to_string()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = key_pair();
        let server_cert = server.signed_by(&server_key, &issuer).unwrap();

        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client.distinguished_name.push(DnType::CommonName, "till-1");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = key_pair();
        let client_cert = client.signed_by(&client_key, &issuer).unwrap();

        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "loyalty-pki-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = TestPki {
            dir,
            ca_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        };
        for (name, pem) in [
            ("ca.pem", &pki.ca_pem),
            ("server.crt", &pki.server_cert_pem),
            ("server.key", &pki.server_key_pem),
            ("client.crt", &pki.client_cert_pem),
            ("client.key", &pki.client_key_pem),
        ] {
            std::fs::write(pki.dir.join(name), pem).unwrap();
        }
        pki
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    pub fn server_key_path(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// The server's TLS with this CA's certificate; with `client_cert_scopes`, client
    /// certificates of this CA are verified and required for those scopes.
    pub fn server_tls(&self, client_cert_scopes: Option<&[Scope]>) -> ServerTls {
        ServerTls::from_pem(
            self.server_cert_pem.clone().into_bytes(),
            self.server_key_pem.clone().into_bytes(),
            client_cert_scopes.map(|_| self.ca_pem.clone().into_bytes()),
            client_cert_scopes
                .map(<[Scope]>::to_vec)
                .unwrap_or_default(),
        )
        .expect("the generated certificates make a valid server TLS")
    }

    /// A client that trusts this CA and checks the server's name; with `certificate`, it
    /// presents the client certificate.
    pub fn client_tls(&self, certificate: bool) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(SERVER_NAME);
        if certificate {
            config.identity(self.client_identity())
        } else {
            config
        }
    }

    pub fn client_identity(&self) -> Identity {
        Identity::from_pem(&self.client_cert_pem, &self.client_key_pem)
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! TLS: the server's certificate, the CA of client certificates (a second factor for
//! internal callers) and the one rustls crypto provider of the process.
//!
//! Everything is read and checked at start-up (`config.rs`), so a missing, unreadable or
//! mismatched file stops the server with an error naming its variable instead of failing on
//! the first connection.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::platform::caller::Scope;

pub const CERT_VARIABLE: &str = "LOYALTY_TLS_CERT";
pub const KEY_VARIABLE: &str = "LOYALTY_TLS_KEY";
pub const CLIENT_CA_VARIABLE: &str = "LOYALTY_TLS_CLIENT_CA";
pub const CLIENT_CERT_SCOPES_VARIABLE: &str = "LOYALTY_TLS_CLIENT_CERT_SCOPES";

/// A client that opens a connection and never finishes its handshake must not hold it forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes ring the process's rustls provider. tonic and redis build their TLS configurations
/// with the process default, which rustls can only pick by itself while exactly one provider
/// is compiled in; a dependency adding another would otherwise panic at the first handshake.
/// Idempotent.
pub fn install_crypto_provider() {
    let _ = CryptoProvider::install_default(rustls::crypto::ring::default_provider());
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side of TLS: its certificate chain and key, and optionally the CA that signs
/// the certificates of internal callers.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_certificates: Option<ClientCertificates>,
}

/// Client certificates as a second factor: connections may present one signed by `ca_pem`
/// (a presented certificate that does not verify fails the handshake); API keys of
/// `required_for` are accepted only over a connection that did.
#[derive(Clone, Debug)]
pub struct ClientCertificates {
    ca_pem: Vec<u8>,
    required_for: Vec<Scope>,
}

impl ClientCertificates {
    /// Whether a key of `scope` needs a verified client certificate on its connection.
    pub fn required_for(&self, scope: Scope) -> bool {
        self.required_for.contains(&scope)
    }

    pub fn scopes(&self) -> &[Scope] {
        &self.required_for
    }
}

/// The scopes that need a client certificate unless configured otherwise: every internal
/// caller. `app` keys live in customers' phones, which have no certificate to show.
pub const DEFAULT_CLIENT_CERT_SCOPES: &str = "pos,admin,scheduler";

/// Parses a comma-separated list of scopes; an unknown one is an error naming the variable.
pub fn parse_scopes(value: &str) -> Result<Vec<Scope>, String> {
    let mut scopes = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let scope = Scope::parse(item).ok_or_else(|| {
            format!(
                "{CLIENT_CERT_SCOPES_VARIABLE}={value:?}: unknown scope {item:?} \
                 (known: pos, app, scheduler, admin)"
            )
        })?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    Ok(scopes)
}

/// Reads a file named by a setting; the error names the variable and the path.
pub fn read_setting_file(variable: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{variable}={}: cannot read it: {e}", path.display()))
}

/// The certificates of a PEM file (at least one).
pub fn certificates(variable: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{variable}: not a valid PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{variable}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)"
        ));
    }
    Ok(certs)
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    // The message never quotes the file: it holds a secret.
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        format!(
            "{KEY_VARIABLE}: no usable private key in it (expected PEM PKCS#8, PKCS#1 or SEC1): {e}"
        )
    })
}

/// A root store of the CA certificates of a PEM file; every certificate must be usable.
pub fn root_store(variable: &str, pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(variable, pem)? {
        roots
            .add(cert)
            .map_err(|e| format!("{variable}: not a usable CA certificate: {e}"))?;
    }
    Ok(roots)
}

impl ServerTls {
    /// From PEM contents; checks what the handshake will need (the key fits the certificate,
    /// the CA is a usable trust anchor), with errors naming the variables.
    pub fn from_pem(
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        client_ca_pem: Option<Vec<u8>>,
        client_cert_scopes: Vec<Scope>,
    ) -> Result<ServerTls, String> {
        let certs = certificates(CERT_VARIABLE, &cert_pem)?;
        let key = private_key(&key_pem)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        builder
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("{KEY_VARIABLE} does not fit {CERT_VARIABLE}: {e}"))?;
        let client_certificates = match client_ca_pem {
            Some(ca_pem) => {
                let roots = root_store(CLIENT_CA_VARIABLE, &ca_pem)?;
                WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| format!("{CLIENT_CA_VARIABLE}: {e}"))?;
                Some(ClientCertificates {
                    ca_pem,
                    required_for: client_cert_scopes,
                })
            }
            None => None,
        };
        Ok(ServerTls {
            cert_pem,
            key_pem,
            client_certificates,
        })
    }

    /// From the files named by the settings.
    pub fn load(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        client_cert_scopes: Vec<Scope>,
    ) -> Result<ServerTls, String> {
        let cert_pem = read_setting_file(CERT_VARIABLE, cert)?;
        let key_pem = read_setting_file(KEY_VARIABLE, key)?;
        let client_ca_pem = client_ca
            .map(|path| read_setting_file(CLIENT_CA_VARIABLE, path))
            .transpose()?;
        Self::from_pem(cert_pem, key_pem, client_ca_pem, client_cert_scopes)
    }

    pub fn client_certificates(&self) -> Option<&ClientCertificates> {
        self.client_certificates.as_ref()
    }

    /// tonic's configuration. A client certificate is optional at the TLS level, so apps
    /// without one still connect; the authentication layer then decides per API key.
    pub fn server_config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        match &self.client_certificates {
            Some(client) => config
                .client_ca_root(Certificate::from_pem(&client.ca_pem))
                .client_auth_optional(true),
            None => config,
        }
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("key", &"<redacted>")
            .field(
                "client_cert_scopes",
                &self.client_certificates.as_ref().map(|c| c.scopes()),
            )
            .finish_non_exhaustive()
    }
}

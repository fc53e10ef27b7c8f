//! TLS with rustls: the server side clients connect to, test and demo certificates, and
//! (for targets that ask for it) the client side pgwarden uses towards Postgres.
//!
//! The client-facing configuration offers TLS 1.2 and 1.3, asks for no client certificate,
//! and issues no session tickets (each costs CPU per connection and a bursty fleet of
//! short-lived clients would rarely resume). The certificate can be reloaded in place.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Certificates of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert_path)?;
    // The key's contents never appear in an error: only that it could not be read.
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|_| file_error(key_path, "no usable private key"))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The client-facing TLS acceptor; a reload installs a new one.
pub struct ServerTls {
    acceptor: RwLock<TlsAcceptor>,
}

impl ServerTls {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            acceptor: RwLock::new(Self::prepare(cert_path, key_path)?),
        })
    }

    /// Reads a certificate and key into an acceptor, to [`install`](Self::install) once
    /// the rest of a reload has succeeded too.
    pub fn prepare(cert_path: &Path, key_path: &Path) -> Result<TlsAcceptor, TlsError> {
        Ok(TlsAcceptor::from(server_config(cert_path, key_path)?))
    }

    /// New handshakes use `acceptor`; connections already encrypted keep theirs.
    pub fn install(&self, acceptor: TlsAcceptor) {
        *self.acceptor.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// How pgwarden connects to a target's Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTlsMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, else plain TCP (as libpq's `sslmode=prefer`).
    Prefer,
    /// TLS, without checking the server's certificate (protects against passive snooping
    /// only).
    Require,
    /// TLS, with the certificate checked against `ca_path` and the target's host name.
    VerifyFull,
}

/// The TLS connector for a target, if its mode asks for TLS.
pub fn backend_connector(
    mode: BackendTlsMode,
    ca_path: Option<&Path>,
) -> Result<Option<TlsConnector>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let config = match mode {
        BackendTlsMode::Disable => return Ok(None),
        BackendTlsMode::VerifyFull => {
            let path = ca_path
                .ok_or_else(|| TlsError::Config("tls = \"verify-full\" needs ca_path".into()))?;
            let mut roots = RootCertStore::empty();
            for cert in load_certs(path)? {
                roots.add(cert).map_err(|e| file_error(path, e))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        BackendTlsMode::Require | BackendTlsMode::Prefer => unverified_client_config()?,
    };
    Ok(Some(TlsConnector::from(Arc::new(config))))
}

/// A client config that encrypts without authenticating the server (libpq's
/// `sslmode=require`), handshake signatures still checked. Also used by the bench.
pub fn unverified_client_config() -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(accept_any::AcceptAnyCertificate(provider())))
        .with_no_client_auth())
}

/// The server name to verify a target's certificate against.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| TlsError::Config(format!("invalid host name {host:?}: {e}")))
}

mod accept_any {
    //! `tls = "require"`: encryption without authentication of the server, as libpq's
    //! `sslmode=require`. Signatures are still checked, so the handshake is sound.
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, Error, SignatureScheme};

    #[derive(Debug)]
    pub struct AcceptAnyCertificate(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAnyCertificate {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

/// A CA and a server certificate it signed, as PEM: for the demo and for tests.
pub struct GeneratedCertificates {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Generates an ECDSA P-256 CA and a server certificate for `names` (DNS names or IPs).
pub fn generate_certificates(names: &[&str]) -> Result<GeneratedCertificates, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let err = |e: rcgen::Error| TlsError::Config(format!("generating a certificate: {e}"));
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pgwarden generated CA");
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(err)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).map_err(err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "pgwarden");
    let cert = params.signed_by(&key, &ca).map_err(err)?;
    Ok(GeneratedCertificates {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_and_reload_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let generated = generate_certificates(&["localhost", "127.0.0.1"]).expect("generate");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, &generated.cert_pem).expect("write");
        std::fs::write(&key, &generated.key_pem).expect("write");
        let tls = ServerTls::load(&cert, &key).expect("load");
        tls.install(ServerTls::prepare(&cert, &key).expect("reload"));
        std::fs::write(&key, "not a key").expect("write");
        let Err(err) = ServerTls::prepare(&cert, &key) else {
            panic!("bad key refused")
        };
        assert!(
            !err.to_string().contains("not a key"),
            "key contents never shown: {err}"
        );
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &generated.ca_pem).expect("write");
        assert!(backend_connector(BackendTlsMode::VerifyFull, Some(&ca))
            .expect("ok")
            .is_some());
        assert!(backend_connector(BackendTlsMode::VerifyFull, None).is_err());
        assert!(backend_connector(BackendTlsMode::Disable, None)
            .expect("ok")
            .is_none());
    }
}

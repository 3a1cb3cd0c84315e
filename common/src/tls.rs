//! TLS material and peer identity.
//!
//! Every connection in the cluster is mutual TLS against the cluster CA. This
//! module finds and loads the PEM files (with errors that say which file and
//! what to do), builds the rustls server configuration the coordinator
//! accepts with, the tonic client configuration agents and `ccc` connect
//! with, and reads a peer's role and name back from its certificate.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ids::validate_name;
use crate::pki::{self, Role};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {} holds no usable PEM data: {why}", path.display())]
    BadPem {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error(
        "no {role} certificate in {}: expected {role}-<name>.pem (make one with `ccc certs {role} <name>`, or pass --cert and --key)",
        dir.display()
    )]
    NoClientCert { role: Role, dir: PathBuf },
    #[error(
        "several {role} certificates in {}: {}; choose one with --cert and --key",
        dir.display(),
        found.join(", ")
    )]
    SeveralClientCerts {
        role: Role,
        dir: PathBuf,
        found: Vec<String>,
    },
    #[error("peer certificate is not usable: {0}")]
    PeerCert(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Installs ring as the process-wide rustls provider. Every binary calls it
/// first thing; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Who is at the other end of a connection, read from its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub role: Role,
    /// The certificate's CN; for agents, the agent id.
    pub name: String,
}

impl PeerIdentity {
    /// Reads the role from the `ccc://<role>/<name>` URI SAN and checks that
    /// the CN is the same name. The chain itself was verified by rustls.
    pub fn from_der(der: &[u8]) -> Result<Self, Error> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| Error::PeerCert(format!("not a valid X.509 certificate: {e}")))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| Error::PeerCert("no subject CN".into()))?
            .to_owned();
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| Error::PeerCert(format!("bad subjectAltName: {e}")))?;
        let uri = sans
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .find_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("ccc://") => Some(*uri),
                _ => None,
            })
            .ok_or_else(|| {
                Error::PeerCert(format!(
                    "certificate {cn:?} has no ccc:// role (not issued by `ccc certs`)"
                ))
            })?;
        let (role, name) = uri
            .trim_start_matches("ccc://")
            .split_once('/')
            .ok_or_else(|| Error::PeerCert(format!("malformed role URI {uri:?}")))?;
        let role: Role = role.parse().map_err(Error::PeerCert)?;
        if name != cn {
            return Err(Error::PeerCert(format!(
                "role URI names {name:?} but the CN is {cn:?}"
            )));
        }
        validate_name(name).map_err(|e| Error::PeerCert(e.to_string()))?;
        Ok(Self { role, name: cn })
    }

    /// Reads the first certificate of a PEM file's contents.
    pub fn from_pem(pem: &[u8]) -> Result<Self, Error> {
        let der = CertificateDer::from_pem_slice(pem)
            .map_err(|e| Error::PeerCert(format!("not a PEM certificate: {e}")))?;
        Self::from_der(&der)
    }
}

/// Paths of the CA certificate, our certificate and our private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    /// The coordinator's files: `--ca`, `--cert`, `--key` where given, else
    /// `ca.pem`, `coordinator.pem`, `coordinator-key.pem` in `certs_dir`.
    pub fn for_server(
        certs_dir: &Path,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Self {
        Self {
            ca: ca.unwrap_or_else(|| certs_dir.join(pki::CA_FILE)),
            cert: cert.unwrap_or_else(|| certs_dir.join(pki::SERVER_FILE)),
            key: key.unwrap_or_else(|| certs_dir.join(pki::SERVER_KEY_FILE)),
        }
    }

    /// An agent's or admin's files: explicit paths where given; else the one
    /// `<role>-<name>.pem` in `certs_dir` (an error where there are none or
    /// several). A key defaults to the certificate's name with `-key.pem`.
    pub fn for_client(
        certs_dir: &Path,
        role: Role,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Self, Error> {
        let cert = match cert {
            Some(cert) => cert,
            None => find_client_cert(certs_dir, role)?,
        };
        let key = key.unwrap_or_else(|| key_path_for(&cert));
        Ok(Self {
            ca: ca.unwrap_or_else(|| certs_dir.join(pki::CA_FILE)),
            cert,
            key,
        })
    }

    pub fn load(&self) -> Result<TlsMaterial, Error> {
        let read = |what, path: &Path| {
            fs::read(path).map_err(|source| Error::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        let material = TlsMaterial {
            ca_pem: read("CA certificate", &self.ca)?,
            cert_pem: read("certificate", &self.cert)?,
            key_pem: read("private key", &self.key)?,
        };
        // Parse now so a wrong file is reported by name, at start.
        let bad = |what, path: &Path, why: String| Error::BadPem {
            what,
            path: path.to_owned(),
            why,
        };
        material
            .ca_certs()
            .map_err(|e| bad("CA certificate", &self.ca, e))?;
        material
            .certs()
            .map_err(|e| bad("certificate", &self.cert, e))?;
        material
            .key()
            .map_err(|e| bad("private key", &self.key, e))?;
        Ok(material)
    }
}

/// `x/agent-a.pem` -> `x/agent-a-key.pem`.
pub fn key_path_for(cert: &Path) -> PathBuf {
    let stem = cert
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.strip_suffix(".pem").unwrap_or(n))
        .unwrap_or("cert");
    cert.with_file_name(format!("{stem}-key.pem"))
}

fn find_client_cert(dir: &Path, role: Role) -> Result<PathBuf, Error> {
    let prefix = format!("{role}-");
    let mut found: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix) && n.ends_with(".pem") && !n.ends_with("-key.pem"))
            .collect(),
        Err(_) => Vec::new(),
    };
    found.sort();
    match found.len() {
        0 => Err(Error::NoClientCert {
            role,
            dir: dir.to_owned(),
        }),
        1 => Ok(dir.join(&found[0])),
        _ => Err(Error::SeveralClientCerts {
            role,
            dir: dir.to_owned(),
            found,
        }),
    }
}

/// The PEM bytes of a CA certificate, a certificate chain and a key.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TlsMaterial {
    fn ca_certs(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        pem_certs(&self.ca_pem)
    }

    fn certs(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        pem_certs(&self.cert_pem)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, String> {
        PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| e.to_string())
    }

    /// The identity our own certificate carries.
    pub fn identity(&self) -> Result<PeerIdentity, Error> {
        let certs = self.certs().map_err(Error::PeerCert)?;
        PeerIdentity::from_der(&certs[0])
    }

    /// Why the coordinator would refuse our certificate, if we can tell
    /// locally: expired, not yet valid, or issued by a CA other than the one
    /// in our CA file. With TLS 1.3 the client learns of a refusal only as
    /// "connection closed", so callers add this to that error.
    pub fn diagnose(&self, now_unix_secs: i64) -> Option<String> {
        let certs = self.certs().ok()?;
        let (_, cert) = X509Certificate::from_der(&certs[0]).ok()?;
        let validity = cert.validity();
        if now_unix_secs > validity.not_after.timestamp() {
            return Some(format!(
                "this client certificate expired at {}",
                validity.not_after
            ));
        }
        if now_unix_secs < validity.not_before.timestamp() {
            return Some(format!(
                "this client certificate is not valid before {}",
                validity.not_before
            ));
        }
        let ca_certs = self.ca_certs().ok()?;
        let (_, ca) = X509Certificate::from_der(&ca_certs[0]).ok()?;
        let ca_key_id = ca
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
                _ => None,
            });
        let issuer_key_id = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|k| k.0)
                }
                _ => None,
            });
        if let (Some(ca_id), Some(issuer_id)) = (ca_key_id, issuer_key_id)
            && ca_id != issuer_id
        {
            return Some(
                "this client certificate was issued by another CA than the cluster CA file".into(),
            );
        }
        None
    }

    /// The coordinator's rustls configuration: a client certificate signed by
    /// the cluster CA is required; HTTP/2 only (gRPC).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, Error> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in self.ca_certs().map_err(Error::Config)? {
            roots
                .add(ca)
                .map_err(|e| Error::Config(format!("CA certificate: {e}")))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .map_err(|e| Error::Config(format!("client verifier: {e}")))?;
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                self.certs().map_err(Error::Config)?,
                self.key().map_err(Error::Config)?,
            )
            .map_err(|e| Error::Config(format!("certificate and key: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// The client side: trust only the cluster CA, present our certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block".into());
    }
    Ok(certs)
}

/// Describes why a TLS handshake failed in words an operator can act on.
pub fn describe_handshake_error(err: &std::io::Error) -> String {
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::NoCertificatesPresented) => "no client certificate presented".into(),
        Some(rustls::Error::InvalidCertificate(cert_err)) => match cert_err {
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
                "client certificate has expired".into()
            }
            rustls::CertificateError::NotValidYet
            | rustls::CertificateError::NotValidYetContext { .. } => {
                "client certificate is not valid yet".into()
            }
            rustls::CertificateError::UnknownIssuer => {
                "client certificate is not signed by the cluster CA".into()
            }
            rustls::CertificateError::BadSignature => {
                // Same CA name, different key: another cluster's CA.
                "client certificate is not signed by the cluster CA (bad signature)".into()
            }
            other => format!("invalid client certificate: {other:?}"),
        },
        Some(rustls::Error::InvalidMessage(_)) => {
            "not a TLS connection (plaintext gRPC or another protocol?)".into()
        }
        Some(other) => other.to_string(),
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_path_is_derived_from_the_cert_name() {
        assert_eq!(
            key_path_for(Path::new("c/agent-a.pem")),
            PathBuf::from("c/agent-a-key.pem")
        );
    }

    #[test]
    fn client_cert_discovery_wants_exactly_one() {
        let dir = std::env::temp_dir().join(format!("ccc-tls-find-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        let err = TlsPaths::for_client(&dir, Role::Agent, None, None, None).expect_err("none");
        assert!(err.to_string().contains("ccc certs agent <name>"), "{err}");
        fs::write(dir.join("agent-a.pem"), "x").expect("write");
        fs::write(dir.join("agent-a-key.pem"), "x").expect("write");
        fs::write(dir.join("admin-root.pem"), "x").expect("write");
        let paths = TlsPaths::for_client(&dir, Role::Agent, None, None, None).expect("one");
        assert_eq!(paths.cert, dir.join("agent-a.pem"));
        assert_eq!(paths.key, dir.join("agent-a-key.pem"));
        fs::write(dir.join("agent-b.pem"), "x").expect("write");
        let err = TlsPaths::for_client(&dir, Role::Agent, None, None, None).expect_err("two");
        assert!(
            err.to_string().contains("agent-a.pem, agent-b.pem"),
            "{err}"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}

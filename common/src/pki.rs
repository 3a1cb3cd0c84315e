//! The cluster PKI, made by our own code with rcgen: one CA, a server
//! certificate for the coordinator, and one client certificate per agent and
//! per admin.
//!
//! The role travels inside each certificate twice: as the subject's OU and as
//! a URI SAN `ccc://<role>/<name>`; [`crate::tls::PeerIdentity`] reads it back
//! on the coordinator. The CN is the name. Private keys are written with mode
//! 0600 and are never overwritten without `force`.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::ids::{InvalidName, validate_name};

/// What a certificate allows its holder to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// May open the agent stream (`AgentGateway`).
    Agent,
    /// May call the `Admin` service.
    Admin,
    /// The coordinator's server certificate.
    Coordinator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Admin => "admin",
            Self::Coordinator => "coordinator",
        }
    }

    /// The URI SAN that carries the role and name, e.g. `ccc://agent/pc-01`.
    pub fn uri(self, name: &str) -> String {
        format!("ccc://{}/{name}", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Self::Agent),
            "admin" => Ok(Self::Admin),
            "coordinator" => Ok(Self::Coordinator),
            other => Err(format!("unknown role {other:?}")),
        }
    }
}

/// The organisation written into every certificate's subject.
pub const ORGANIZATION: &str = "Claude Code Cluster";
pub const CA_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const SERVER_FILE: &str = "coordinator.pem";
pub const SERVER_KEY_FILE: &str = "coordinator-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} already exists (use --force to overwrite)", .0.display())]
    Exists(PathBuf),
    #[error("no cluster CA in {}: run `ccc certs init` first", .0.display())]
    NoCa(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    #[error("invalid subject alternative name {0:?}")]
    InvalidSan(String),
    #[error("a {0} certificate is not issued with this call")]
    WrongRole(Role),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (tolerating clock skew between PCs) for `days` days.
    pub fn days_from_now(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster CA: it signs every other certificate.
pub struct CertificateAuthority {
    cert_pem: String,
    key: KeyPair,
}

impl CertificateAuthority {
    pub fn generate(validity: Validity) -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Claude Code Cluster CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key,
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem)?;
        // Parse once now so a broken CA file fails here, not at first issue.
        Issuer::from_ca_cert_pem(cert_pem, &key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The coordinator's server certificate; each SAN that parses as an IP
    /// address becomes an IP SAN, the others DNS names.
    pub fn issue_server(&self, sans: &[String], validity: Validity) -> Result<PemPair, Error> {
        let mut names = Vec::with_capacity(sans.len());
        for san in sans {
            let san = san.trim();
            if san.is_empty() || san.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(Error::InvalidSan(san.to_owned()));
            }
            names.push(san.to_owned());
        }
        if names.is_empty() {
            return Err(Error::InvalidSan(String::new()));
        }
        let mut params = CertificateParams::new(names.clone())
            .map_err(|_| Error::InvalidSan(names.join(",")))?;
        params.subject_alt_names.push(SanType::URI(
            Role::Coordinator
                .uri("coordinator")
                .try_into()
                .map_err(|_| Error::InvalidSan("coordinator".into()))?,
        ));
        self.sign_leaf(
            params,
            Role::Coordinator,
            "coordinator",
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
        )
    }

    /// A client certificate for an agent or an admin named `name`.
    pub fn issue_client(
        &self,
        role: Role,
        name: &str,
        validity: Validity,
    ) -> Result<PemPair, Error> {
        if role == Role::Coordinator {
            return Err(Error::WrongRole(role));
        }
        validate_name(name)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names.push(SanType::URI(
            role.uri(name)
                .try_into()
                .map_err(|_| Error::InvalidSan(role.uri(name)))?,
        ));
        self.sign_leaf(
            params,
            role,
            name,
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
        )
    }

    fn sign_leaf(
        &self,
        mut params: CertificateParams,
        role: Role,
        name: &str,
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<PemPair, Error> {
        let key = KeyPair::generate()?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The file names of a client certificate and its key, e.g.
/// `agent-pc-01.pem` and `agent-pc-01-key.pem`.
pub fn client_file_names(role: Role, name: &str) -> (String, String) {
    (
        format!("{role}-{name}.pem"),
        format!("{role}-{name}-key.pem"),
    )
}

/// A directory of PEM files managed by `ccc certs`.
pub struct PkiDir {
    dir: PathBuf,
}

impl PkiDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Creates the cluster CA (`ca.pem`, `ca-key.pem`).
    pub fn init(&self, validity: Validity, force: bool) -> Result<Vec<PathBuf>, Error> {
        let ca = CertificateAuthority::generate(validity)?;
        let pair = PemPair {
            cert_pem: ca.cert_pem().to_owned(),
            key_pem: ca.key_pem(),
        };
        self.write_pair(&pair, CA_FILE, CA_KEY_FILE, force)
    }

    pub fn load_ca(&self) -> Result<CertificateAuthority, Error> {
        let cert_path = self.path(CA_FILE);
        let key_path = self.path(CA_KEY_FILE);
        if !cert_path.exists() || !key_path.exists() {
            return Err(Error::NoCa(self.dir.clone()));
        }
        let cert = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        CertificateAuthority::from_pem(&cert, &key)
    }

    /// Issues `coordinator.pem` / `coordinator-key.pem`.
    pub fn issue_server(
        &self,
        sans: &[String],
        validity: Validity,
        force: bool,
    ) -> Result<Vec<PathBuf>, Error> {
        self.refuse_existing(&[SERVER_FILE, SERVER_KEY_FILE], force)?;
        let pair = self.load_ca()?.issue_server(sans, validity)?;
        self.write_pair(&pair, SERVER_FILE, SERVER_KEY_FILE, force)
    }

    /// Issues `<role>-<name>.pem` / `<role>-<name>-key.pem`.
    pub fn issue_client(
        &self,
        role: Role,
        name: &str,
        validity: Validity,
        force: bool,
    ) -> Result<Vec<PathBuf>, Error> {
        validate_name(name)?;
        let (cert_file, key_file) = client_file_names(role, name);
        self.refuse_existing(&[&cert_file, &key_file], force)?;
        let pair = self.load_ca()?.issue_client(role, name, validity)?;
        self.write_pair(&pair, &cert_file, &key_file, force)
    }

    fn refuse_existing(&self, files: &[&str], force: bool) -> Result<(), Error> {
        if force {
            return Ok(());
        }
        match files.iter().map(|f| self.path(f)).find(|p| p.exists()) {
            Some(existing) => Err(Error::Exists(existing)),
            None => Ok(()),
        }
    }

    fn write_pair(
        &self,
        pair: &PemPair,
        cert_file: &str,
        key_file: &str,
        force: bool,
    ) -> Result<Vec<PathBuf>, Error> {
        self.refuse_existing(&[cert_file, key_file], force)?;
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let key_path = self.path(key_file);
        let cert_path = self.path(cert_file);
        write_atomically(&key_path, pair.key_pem.as_bytes(), 0o600)?;
        write_atomically(&cert_path, pair.cert_pem.as_bytes(), 0o644)?;
        Ok(vec![cert_path, key_path])
    }
}

/// Writes through a temporary file created with `mode`, then renames, so a
/// key is never readable by others, not even for a moment, and a crash never
/// leaves half a PEM file.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = path.with_extension("pem.tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(contents).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests;

//! Connecting to the Admin API with an admin certificate.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use common::pki::Role;
use common::proto::admin_client::AdminClient;
use common::telemetry::error_chain;
use common::tls::TlsPaths;
use serde::Deserialize;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, clap::Args)]
pub struct ConnArgs {
    /// TOML file with `coordinator`, `certs_dir`, `ca`, `cert`, `key`.
    #[arg(long, env = "CCC_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// The coordinator's gRPC URL [default: https://127.0.0.1:7443].
    #[arg(long, env = "CCC_COORDINATOR", global = true)]
    coordinator: Option<String>,
    /// Directory of the cluster PKI [default: certs].
    #[arg(long, env = "CCC_CERTS_DIR", global = true)]
    certs_dir: Option<PathBuf>,
    /// Cluster CA certificate [default: <certs-dir>/ca.pem].
    #[arg(long, env = "CCC_CA", global = true)]
    ca: Option<PathBuf>,
    /// Admin certificate [default: the one <certs-dir>/admin-*.pem].
    #[arg(long, env = "CCC_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Admin private key [default: the certificate's name with -key.pem].
    #[arg(long, env = "CCC_KEY", global = true)]
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    version: Option<u32>,
    coordinator: Option<String>,
    certs_dir: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl ConnArgs {
    fn file(&self) -> anyhow::Result<FileConfig> {
        let file: FileConfig = common::config::load_toml(self.config.as_deref())?;
        common::config::check_version(file.version).map_err(anyhow::Error::msg)?;
        Ok(file)
    }

    pub fn certs_dir(&self) -> anyhow::Result<PathBuf> {
        Ok(self
            .certs_dir
            .clone()
            .or(self.file()?.certs_dir)
            .unwrap_or_else(|| PathBuf::from("certs")))
    }

    pub async fn connect(self) -> anyhow::Result<(AdminClient<Channel>, Diagnosis)> {
        let file = self.file()?;
        let certs_dir = self.certs_dir()?;
        let url = self
            .coordinator
            .or(file.coordinator)
            .unwrap_or_else(|| "https://127.0.0.1:7443".into());
        let paths = TlsPaths::for_client(
            &certs_dir,
            Role::Admin,
            self.ca.or(file.ca),
            self.cert.or(file.cert),
            self.key.or(file.key),
        )?;
        let tls = paths.load()?;
        let diagnosis =
            Diagnosis(tls.diagnose(
                i64::try_from(common::time::UnixMillis::now().0 / 1000).unwrap_or(i64::MAX),
            ));
        let endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| format!("invalid coordinator URL {url:?}"))?
            .tls_config(tls.client_config())
            .context("TLS configuration")?
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))
            .with_context(|| format!("cannot connect to the coordinator at {url}"))?;
        Ok((AdminClient::new(channel), diagnosis))
    }
}

/// What we can tell locally about why the coordinator would refuse us.
pub struct Diagnosis(Option<String>);

impl Diagnosis {
    /// A gRPC status as a readable error. With TLS 1.3 a refused client
    /// certificate shows up only as a closed connection at the first call,
    /// so a transport failure is explained with what we know of our own
    /// certificate.
    pub fn explain(&self, s: tonic::Status) -> anyhow::Error {
        let mut text = format!("{:?}: {}", s.code(), s.message());
        if let Some(source) = std::error::Error::source(&s) {
            text.push_str(&format!(" ({})", error_chain(source)));
            text.push_str(match &self.0 {
                Some(_) => "; the coordinator refused the connection",
                None => "; the coordinator closed the connection (if it is running, it refused this client certificate: see its log)",
            });
            if let Some(why) = &self.0 {
                text.push_str(&format!(": {why}"));
            }
        }
        anyhow::anyhow!(text)
    }
}

//! Connecting to the Admin API with an admin certificate.
//!
//! The connection options belong to the commands that connect; they are
//! also accepted before the command (`ccc --coordinator URL agents`). A flag
//! wins over the environment (`CCC_*`), which wins over the `--config`
//! file, which wins over the default.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use common::pki::Role;
use common::proto::admin_client::AdminClient;
use common::telemetry::error_chain;
use common::tls::TlsPaths;
use serde::Deserialize;
use tonic::transport::{Channel, Endpoint};

/// The coordinator's address when none is given.
pub const DEFAULT_COORDINATOR: &str = "https://127.0.0.1:7443";

/// Where to find the PKI: `ccc certs` needs only this.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct PkiArgs {
    /// TOML file with `coordinator`, `certs_dir`, `ca`, `cert`, `key` [env: CCC_CONFIG]
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Directory of the cluster PKI [env: CCC_CERTS_DIR] [default: certs]
    #[arg(long, value_name = "DIR", global = true)]
    pub certs_dir: Option<PathBuf>,
}

/// How to reach the coordinator, for the commands that connect.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ConnArgs {
    #[command(flatten)]
    pub pki: PkiArgs,
    /// The coordinator's address, `host:port` or `https://host:port` [env: CCC_COORDINATOR] [default: https://127.0.0.1:7443]
    #[arg(long, value_name = "URL")]
    pub coordinator: Option<String>,
    /// Cluster CA certificate [env: CCC_CA] [default: <certs-dir>/ca.pem]
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Admin certificate [env: CCC_CERT] [default: the one <certs-dir>/admin-*.pem]
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Admin private key [env: CCC_KEY] [default: the certificate's name with -key.pem]
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
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

/// The environment variables `ccc` reads, passed in so they can be tested.
pub type Env = BTreeMap<String, String>;

/// The process environment's `CCC_*` variables.
pub fn process_env() -> Env {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("CCC_"))
        .collect()
}

impl PkiArgs {
    /// These flags, else the ones given before the command.
    pub fn or(self, outer: &PkiArgs) -> Self {
        Self {
            config: self.config.or_else(|| outer.config.clone()),
            certs_dir: self.certs_dir.or_else(|| outer.certs_dir.clone()),
        }
    }

    fn config_path(&self, env: &Env) -> Option<PathBuf> {
        self.config
            .clone()
            .or_else(|| env.get("CCC_CONFIG").map(PathBuf::from))
    }

    fn file(&self, env: &Env) -> anyhow::Result<FileConfig> {
        let file: FileConfig = common::config::load_toml(self.config_path(env).as_deref())?;
        common::config::check_version(file.version).map_err(anyhow::Error::msg)?;
        Ok(file)
    }

    pub fn certs_dir(&self, env: &Env) -> anyhow::Result<PathBuf> {
        let from_file = self.file(env)?.certs_dir;
        Ok(self
            .certs_dir
            .clone()
            .or_else(|| env.get("CCC_CERTS_DIR").map(PathBuf::from))
            .or(from_file)
            .unwrap_or_else(|| PathBuf::from("certs")))
    }
}

impl ConnArgs {
    /// These flags, else the ones given before the command.
    pub fn or(self, outer: &ConnArgs) -> Self {
        Self {
            pki: self.pki.or(&outer.pki),
            coordinator: self.coordinator.or_else(|| outer.coordinator.clone()),
            ca: self.ca.or_else(|| outer.ca.clone()),
            cert: self.cert.or_else(|| outer.cert.clone()),
            key: self.key.or_else(|| outer.key.clone()),
        }
    }

    /// Resolves the settings and loads the admin certificate.
    pub fn resolve(self, env: &Env) -> anyhow::Result<Connection> {
        let file = self.pki.file(env)?;
        let certs_dir = self.pki.certs_dir(env)?;
        let path = |flag: Option<PathBuf>, var: &str, file: Option<PathBuf>| {
            flag.or_else(|| env.get(var).map(PathBuf::from)).or(file)
        };
        let url = coordinator_url(
            &self
                .coordinator
                .or_else(|| env.get("CCC_COORDINATOR").cloned())
                .or(file.coordinator)
                .unwrap_or_else(|| DEFAULT_COORDINATOR.into()),
        )?;
        let paths = TlsPaths::for_client(
            &certs_dir,
            Role::Admin,
            path(self.ca, "CCC_CA", file.ca),
            path(self.cert, "CCC_CERT", file.cert),
            path(self.key, "CCC_KEY", file.key),
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
        Ok(Connection {
            url,
            endpoint,
            diagnosis,
        })
    }
}

/// The coordinator's URL: `host:port` means https; plain http is refused
/// with the reason (the coordinator only speaks TLS).
pub fn coordinator_url(given: &str) -> anyhow::Result<String> {
    let given = given.trim();
    if let Some(rest) = given.strip_prefix("http://") {
        anyhow::bail!("the coordinator speaks TLS: use https://{rest} (or just {rest})");
    }
    if given.starts_with("https://") {
        return Ok(given.to_owned());
    }
    if given.contains("://") {
        anyhow::bail!("unsupported coordinator URL {given:?}: use host:port or https://host:port");
    }
    Ok(format!("https://{given}"))
}

/// A resolved connection: it can connect again (`ccc logs -f` does after a
/// coordinator restart).
pub struct Connection {
    pub url: String,
    endpoint: Endpoint,
    pub diagnosis: Diagnosis,
}

impl Connection {
    pub async fn client(&self) -> anyhow::Result<AdminClient<Channel>> {
        let channel = self
            .endpoint
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))
            .with_context(|| format!("cannot connect to the coordinator at {}", self.url))?;
        Ok(AdminClient::new(channel))
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
            let cause = error_chain(source);
            if !text.contains(&cause) {
                text.push_str(&format!(" ({cause})"));
            }
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

#[cfg(test)]
mod tests {
    use super::coordinator_url;

    #[test]
    fn a_bare_address_means_https_and_http_is_refused_with_the_fix() {
        assert_eq!(
            coordinator_url("127.0.0.1:7443").expect("ok"),
            "https://127.0.0.1:7443"
        );
        assert_eq!(
            coordinator_url("https://c.lan:7443").expect("ok"),
            "https://c.lan:7443"
        );
        let err = coordinator_url("http://127.0.0.1:7443").expect_err("http");
        assert!(
            err.to_string().contains("speaks TLS: use https://"),
            "{err}"
        );
    }
}

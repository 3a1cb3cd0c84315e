//! Who the coordinator is on GitHub: a token (personal or fine-grained), or
//! a GitHub App. As an App it signs a short JWT with the App's private key
//! (RS256, `iss` = the App id, valid nine minutes), looks up the App's
//! installation on each repository, and mints an installation token for it,
//! cached until five minutes before it expires. Tokens live in memory only
//! and never reach a log (`Secret` prints as redacted).

use std::collections::HashMap;
use std::time::Duration;

use common::time::UnixMillis;
use common::types::Secret;
use serde::Deserialize;
use tokio::sync::Mutex;

/// A token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

pub struct App {
    pub app_id: u64,
    key: jsonwebtoken::EncodingKey,
    tokens: Mutex<HashMap<String, (Secret, UnixMillis)>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("app_id", &self.app_id)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize)]
struct Claims {
    iat: u64,
    exp: u64,
    iss: String,
}

impl App {
    /// The App from its id and private key (PEM, PKCS#1 or PKCS#8).
    pub fn new(app_id: u64, key_pem: &str) -> Result<Self, String> {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_pem.as_bytes())
            .map_err(|e| format!("the GitHub App key is not an RSA private key in PEM: {e}"))?;
        Ok(Self {
            app_id,
            key,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// A JWT that authenticates as the App for the next nine minutes
    /// (issued a minute in the past, for clocks that differ).
    pub fn jwt(&self, now: UnixMillis) -> Result<Secret, String> {
        let now = now.0 / 1000;
        let claims = Claims {
            iat: now.saturating_sub(60),
            exp: now + 9 * 60,
            iss: self.app_id.to_string(),
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &self.key,
        )
        .map(Secret::new)
        .map_err(|e| format!("cannot sign the GitHub App JWT: {e}"))
    }

    /// The cached installation token of `repo`, if still good at `now`.
    pub async fn cached(&self, repo: &str, now: UnixMillis) -> Option<Secret> {
        let tokens = self.tokens.lock().await;
        let (token, expires) = tokens.get(&repo.to_lowercase())?;
        (expires.0 > now.saturating_add(RENEW_BEFORE).0).then(|| token.clone())
    }

    pub async fn remember(&self, repo: &str, token: Secret, expires: UnixMillis) {
        self.tokens
            .lock()
            .await
            .insert(repo.to_lowercase(), (token, expires));
    }
}

/// GitHub's answer to minting an installation token.
#[derive(Deserialize)]
pub struct Minted {
    pub token: String,
    pub expires_at: String,
}

/// `2026-12-01T13:00:00Z` as unix milliseconds.
pub fn parse_time(text: &str) -> Option<UnixMillis> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp())
        .ok()
        .map(|s| UnixMillis(s * 1000))
}

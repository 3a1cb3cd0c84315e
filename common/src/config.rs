//! Helpers every binary's configuration uses: human durations (`500ms`, `5s`,
//! `10m`, `1h`), and reading a TOML file with errors that name the file.
//!
//! Each binary resolves its settings the same way: a command-line flag wins,
//! then its `CCC_...` environment variable (both handled by clap), then the
//! TOML file given with `--config`, then the built-in default.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
}

/// The config file format this build reads.
pub const FILE_VERSION: u32 = 1;

/// Checks a config file's `version` key (absent means the current one).
pub fn check_version(version: Option<u32>) -> Result<(), String> {
    match version {
        Some(v) if v != FILE_VERSION => Err(format!(
            "unsupported config version {v} (this build reads version {FILE_VERSION})"
        )),
        _ => Ok(()),
    }
}

/// Parses a human duration with `humantime` (`250ms`, `5s`, `10m`, `2h`,
/// `1d`, `1h 30m`); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let duration = match s.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && (0.0..=1e9).contains(&seconds) => {
            Duration::from_secs_f64(seconds)
        }
        Ok(_) => return Err(format!("duration {s:?} is out of range")),
        Err(_) => humantime::parse_duration(s).map_err(|e| {
            format!("invalid duration {s:?}: {e} (expected e.g. 500ms, 5s, 10m, 1h 30m)")
        })?,
    };
    if duration.as_secs() > 1_000_000_000 {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(duration)
}

/// Parses a size: `4096`, `512KiB`, `64MiB`, `1GiB` (also KB/MB/GB as powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. 64MiB)"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Deserializes an optional size from a TOML string or integer.
pub fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::N(n)) => Ok(Some(n)),
        Some(Raw::S(s)) => parse_size(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

/// Deserializes an optional human duration from a TOML string.
pub fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    raw.map(|s| parse_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// Reads a TOML file; `None` gives the empty configuration (every key unset).
pub fn load_toml<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, Error> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: shown.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| Error::Parse {
        path: shown,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "s", "5 fortnights", "-1s", "1e99s", "-3", "100000y"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1 kb"), Ok(1024));
        assert!(parse_size("1TiB").is_err());
        assert!(parse_size("x").is_err());
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[serde(default, deserialize_with = "de_opt_duration")]
        timeout: Option<Duration>,
    }

    #[test]
    fn toml_errors_name_the_file_and_the_key() {
        let dir = std::env::temp_dir().join(format!("ccc-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("c.toml");
        std::fs::write(&path, "timeout = \"3s\"\n").expect("write");
        let ok: Sample = load_toml(Some(&path)).expect("parses");
        assert_eq!(ok.timeout, Some(Duration::from_secs(3)));
        std::fs::write(&path, "timeout = \"3 parsecs\"\n").expect("write");
        let err = load_toml::<Sample>(Some(&path)).expect_err("bad unit");
        assert!(err.to_string().contains("c.toml"), "{err}");
        std::fs::write(&path, "tmeout = \"3s\"\n").expect("write");
        let err = load_toml::<Sample>(Some(&path)).expect_err("unknown key");
        assert!(err.to_string().contains("tmeout"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Row encoding: one version byte, then JSON. JSON keeps rows readable when
//! debugging a store by hand; the version byte lets a later release migrate.

use serde::Serialize;
use serde::de::DeserializeOwned;

const ROW_VERSION: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![ROW_VERSION];
    // Serializing our own plain data types to JSON cannot fail.
    serde_json::to_writer(&mut out, value).expect("invariant: row types serialize to JSON");
    out
}

pub fn decode<T: DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
    match raw.split_first() {
        Some((&ROW_VERSION, body)) => serde_json::from_slice(body).map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!("unknown row version {v}")),
        None => Err("empty row".into()),
    }
}

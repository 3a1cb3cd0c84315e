//! Durable state behind one narrow trait, implemented with sled.
//!
//! Architecture invariant: this is the only module that imports sled. The
//! rest of the coordinator sees [`Store`]: load everything at start, then
//! `commit` a batch of writes atomically and durably (flushed before it
//! returns), so whoever is acknowledged afterwards can rely on it.
//!
//! Layout: tree `agents` (key: agent id, value: versioned record), tree
//! `meta` (key `schema_version`). Values are one version byte followed by
//! JSON, so a later schema can read older rows.

use std::path::Path;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::core::{AgentRecord, Write};

mod codec;

/// The layout this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("store I/O failed: {0}")]
    Io(#[from] sled::Error),
    #[error("store task failed: {0}")]
    Task(String),
    #[error("store holds schema version {found}, this build reads version {SCHEMA_VERSION}")]
    Schema { found: u32 },
    #[error("corrupt row {key:?} in tree {tree}: {why}")]
    Corrupt {
        tree: &'static str,
        key: String,
        why: String,
    },
}

/// What the coordinator needs from durable storage.
pub trait Store: Send + Sync + 'static {
    fn load_agents(&self) -> Result<Vec<AgentRecord>, Error>;
    /// Applies every write in one transaction and flushes it to disk.
    fn commit(&self, writes: &[Write]) -> Result<(), Error>;
}

pub struct SledStore {
    db: sled::Db,
    agents: sled::Tree,
    meta: sled::Tree,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, checking its schema version.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|source| Error::Open {
                path: dir.display().to_string(),
                source,
            })?;
        let agents = db.open_tree("agents")?;
        let meta = db.open_tree("meta")?;
        match meta.get(b"schema_version")? {
            None => {
                meta.insert(b"schema_version", &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(raw) => {
                let found = <[u8; 4]>::try_from(raw.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| Error::Corrupt {
                        tree: "meta",
                        key: "schema_version".into(),
                        why: format!("{} bytes, expected 4", raw.len()),
                    })?;
                if found != SCHEMA_VERSION {
                    return Err(Error::Schema { found });
                }
            }
        }
        Ok(Self { db, agents, meta })
    }
}

impl Store for SledStore {
    fn load_agents(&self) -> Result<Vec<AgentRecord>, Error> {
        self.agents
            .iter()
            .map(|row| {
                let (key, value) = row?;
                codec::decode(&value).map_err(|why| Error::Corrupt {
                    tree: "agents",
                    key: String::from_utf8_lossy(&key).into_owned(),
                    why,
                })
            })
            .collect()
    }

    fn commit(&self, writes: &[Write]) -> Result<(), Error> {
        if writes.is_empty() {
            return Ok(());
        }
        // Encode outside the transaction: the closure below must be pure
        // because sled may run it more than once.
        let rows: Vec<(Vec<u8>, Vec<u8>)> = writes
            .iter()
            .map(|w| match w {
                Write::Agent(record) => (
                    record.id.as_str().as_bytes().to_vec(),
                    codec::encode(record),
                ),
            })
            .collect();
        (&self.agents, &self.meta)
            .transaction(|(agents, _meta)| {
                for (key, value) in &rows {
                    agents.insert(key.as_slice(), value.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => Error::Io(e),
                TransactionError::Abort(()) => Error::Io(sled::Error::ReportableBug(
                    "transaction aborted without a reason".into(),
                )),
            })?;
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;

//! The store's model for tests: the tables of [`SledStore`](super::SledStore)
//! as ordered maps in memory. Not durable: what it holds is gone when it is
//! dropped.
//!
//! Invariant: after the same commits and prunes it answers every read of
//! [`Store`](super::Store) exactly as the sled store does. It holds the same
//! keys and the same encoded values, made by the same interpretation of
//! writes (`Rows`), and reads them with the same code (the `Store` impl of
//! every `Backend`); only where the bytes sit differs. The store's tests
//! check this on random histories, so tests of the core (its property
//! tests) can read what a step wrote through the `Store` trait, as the
//! driver and a restart do, instead of interpreting writes themselves.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, PoisonError, RwLock, RwLockWriteGuard};

use super::{Backend, Error, Rows, Table, Tables};

/// A store that keeps its rows in memory; see the module docs.
#[derive(Default)]
pub struct MemoryStore {
    tables: Tables<MemoryTable>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

type Map = BTreeMap<Arc<[u8]>, Arc<[u8]>>;

/// One table: its rows in key order, behind a lock of its own. A commit
/// holds the locks of every table (always taken in the same order); a read
/// holds one at a time, as sled reads one tree at a time.
#[derive(Default)]
pub(super) struct MemoryTable(RwLock<Map>);

impl MemoryTable {
    fn write(&self) -> RwLockWriteGuard<'_, Map> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Table for MemoryTable {
    type Bytes = Arc<[u8]>;

    fn get(&self, key: &[u8]) -> Result<Option<Arc<[u8]>>, Error> {
        let map = self.0.read().unwrap_or_else(PoisonError::into_inner);
        Ok(map.get(key).cloned())
    }

    /// The rows are copied out (values are shared, not cloned), so no lock
    /// is held while the caller goes through them.
    fn range(
        &self,
        from: &[u8],
        through: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Arc<[u8]>, Arc<[u8]>), Error>> {
        let map = self.0.read().unwrap_or_else(PoisonError::into_inner);
        let rows: Vec<_> = match through {
            // An empty range, as sled has it; `BTreeMap::range` would panic.
            Some(end) if end < from => Vec::new(),
            _ => {
                let end = through.map_or(Bound::Unbounded, Bound::Included);
                map.range::<[u8], _>((Bound::Included(from), end))
                    .map(|(key, value)| Ok((Arc::clone(key), Arc::clone(value))))
                    .collect()
            }
        };
        rows.into_iter()
    }

    fn remove(&self, keys: Vec<Arc<[u8]>>) -> Result<(), Error> {
        let mut map = self.write();
        for key in keys {
            map.remove(&key);
        }
        Ok(())
    }
}

impl Backend for MemoryStore {
    type Table = MemoryTable;

    fn tables(&self) -> &Tables<MemoryTable> {
        &self.tables
    }

    /// Every table locked at once, so no read sees half a commit.
    fn apply(&self, rows: &Rows) -> Result<(), Error> {
        let mut maps = self.tables.each().map(MemoryTable::write);
        for (map, rows) in maps.iter_mut().zip(rows.each()) {
            for (key, value) in rows {
                match value {
                    Some(value) => {
                        map.insert(Arc::from(key.as_slice()), Arc::from(value.as_slice()))
                    }
                    None => map.remove(key.as_slice()),
                };
            }
        }
        Ok(())
    }
}

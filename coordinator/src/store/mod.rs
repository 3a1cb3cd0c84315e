//! Durable state behind one narrow trait, implemented with sled.
//!
//! Architecture invariant: this is the only module that imports sled. The
//! rest of the coordinator sees [`Store`]: load everything at start, then
//! `commit` a batch of writes atomically and durably (flushed before it
//! returns), so whoever is acknowledged afterwards can rely on it.
//!
//! Layout: tree `agents` (key: agent id), tree `tasks` (key: task number,
//! big-endian so byte order is numeric order), tree `output` (key: task,
//! attempt, seq, all big-endian; value: kind byte + raw bytes), tree
//! `admins` (key: admin certificate name; revocations), tree `deliveries`
//! (key: `X-GitHub-Delivery`; value: when it was handled, big-endian unix
//! ms, for de-duplication within a window), tree `outbox` (key: task,
//! big-endian, and an effect byte; the GitHub writes still owed), tree
//! `meta`
//! (key `schema_version`). Record values are one version byte followed by
//! JSON, so a later schema can read older rows.
//!
//! Every flush goes through [`flush`], which holds a crossbeam-epoch guard
//! across `Db::flush`. sled 0.34.7's flush path (`Tree::flush` →
//! `iobuf::flush` → `make_stable_inner` → `IoBufs::current_iobuf`) turns the
//! current IO-buffer pointer into an `Arc` without a guard of its own; when
//! another thread seals that buffer meanwhile (a write that rolls it, or
//! sled's periodic flusher), the buffer's deferred drop can run and the flush
//! bumps a refcount on freed memory, which glibc later reports as "double
//! free or corruption". A guard pinned for the whole flush keeps the
//! deferred drop from running until the flush is done. The periodic flusher
//! stays off too (`flush_every_ms(None)`): the driver flushes every batch.
//! sled 0.34 is no longer developed; keeping every sled call here lets the
//! store move to another engine without touching anything else.
//!
//! `MemoryStore` (`memory.rs`, built for tests only) is the same store in
//! memory, the model tests read what was written from. The two share everything but where
//! the bytes sit: `Rows` is the one interpretation of [`Write`]s as keys
//! and encoded values, and [`Store`] is implemented once, over any
//! `Backend` (its `Table`s and how it applies one commit's rows), so both
//! decode with the same code.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use common::ids::{Attempt, TaskId};
use common::time::UnixMillis;
use common::types::OutputKind;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::core::outbox::{Effect, OutboxEntry};
use crate::core::task::TRUNCATION_MARKER;
use crate::core::{AdminRecord, AgentRecord, OutputPosition, Task, Write};

mod codec;
#[cfg(test)]
mod memory;

#[cfg(test)]
pub use memory::MemoryStore;

/// The layout this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    /// Another process holds the store's lock.
    #[error("another coordinator is already using {path}")]
    Locked { path: String },
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

impl Error {
    /// Another process (a second coordinator) has the store open.
    pub fn is_locked(&self) -> bool {
        matches!(self, Self::Locked { .. })
    }
}

/// sled reports its lock only as an I/O error with this text.
/// sled's page cache. Its default (1 GiB) lets the coordinator's memory
/// grow with the history it ever read (a restart reads every task); the
/// live work and the recent output fit in this.
const CACHE_BYTES: u64 = 64 << 20;

fn open_error(path: &Path, source: sled::Error) -> Error {
    let path = path.display().to_string();
    match &source {
        sled::Error::Io(e) if e.to_string().starts_with("could not acquire lock") => {
            Error::Locked { path }
        }
        _ => Error::Open { path, source },
    }
}

/// One stored chunk of a task's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredChunk {
    pub attempt: Attempt,
    pub seq: u64,
    pub kind: OutputKind,
    pub data: Arc<[u8]>,
}

/// What the coordinator needs from durable storage.
pub trait Store: Send + Sync + 'static {
    fn load_agents(&self) -> Result<Vec<AgentRecord>, Error>;
    fn load_tasks(&self) -> Result<Vec<Task>, Error>;
    /// One task as last committed.
    fn load_task(&self, id: TaskId) -> Result<Option<Task>, Error>;
    /// Every task as last committed, in id order, one at a time (never all
    /// in memory at once).
    fn scan_tasks(&self, visit: &mut dyn FnMut(Task)) -> Result<(), Error>;
    fn load_admins(&self) -> Result<Vec<AdminRecord>, Error>;
    /// Webhook deliveries handled, with when.
    fn load_deliveries(&self) -> Result<Vec<(String, UnixMillis)>, Error>;
    /// GitHub writes still owed, in key order.
    fn load_outbox(&self) -> Result<Vec<OutboxEntry>, Error>;
    /// How far the output of `task` goes: the last seq of `attempt`, and the
    /// bytes of the attempts from `since` on (the task's output budget) and
    /// whether they were truncated.
    fn output_position(
        &self,
        task: TaskId,
        since: Attempt,
        attempt: Attempt,
    ) -> Result<OutputPosition, Error>;
    /// Up to `limit` chunks of `task` at or after `(attempt, seq)`, in order.
    fn read_output(
        &self,
        task: TaskId,
        from: (Attempt, u64),
        limit: usize,
    ) -> Result<Vec<StoredChunk>, Error>;
    /// Deletes the output of tasks that ended before `ended_before`, looking
    /// at up to `limit` tasks after `after` (in id order); the task to go on
    /// after, or `None` once every task was looked at, and how many tasks'
    /// output was deleted.
    fn prune_output(
        &self,
        ended_before: UnixMillis,
        after: Option<TaskId>,
        limit: usize,
    ) -> Result<(Option<TaskId>, usize), Error>;
    /// Applies every write atomically; a durable store has flushed them to
    /// disk when it returns.
    fn commit(&self, writes: &[Write]) -> Result<(), Error>;
}

/// The tables of a store, one `T` each: a store's tables ([`Table`]), or
/// the rows one commit writes to each ([`Rows`]).
#[derive(Default)]
struct Tables<T> {
    agents: T,
    tasks: T,
    output: T,
    admins: T,
    deliveries: T,
    outbox: T,
}

impl<T> Tables<T> {
    /// Makes each table from its name.
    fn try_new<E>(mut make: impl FnMut(&'static str) -> Result<T, E>) -> Result<Self, E> {
        Ok(Self {
            agents: make("agents")?,
            tasks: make("tasks")?,
            output: make("output")?,
            admins: make("admins")?,
            deliveries: make("deliveries")?,
            outbox: make("outbox")?,
        })
    }

    /// Every table, always in the same order.
    fn each(&self) -> [&T; 6] {
        [
            &self.agents,
            &self.tasks,
            &self.output,
            &self.admins,
            &self.deliveries,
            &self.outbox,
        ]
    }
}

/// One row a commit writes: its key, and its encoded value or `None` when
/// the row is deleted.
type Row = (Vec<u8>, Option<Vec<u8>>);

/// The rows one commit writes, table by table, in the order of the writes.
type Rows = Tables<Vec<Row>>;

impl Rows {
    /// The one interpretation of [`Write`]s as rows: every store applies
    /// exactly these. Encoding happens here, before any transaction, so
    /// sled's transaction closure stays pure (sled may run it twice).
    fn of(writes: &[Write]) -> Self {
        let mut rows = Self::default();
        for write in writes {
            let (table, key, value) = match write {
                Write::Agent(record) => (
                    &mut rows.agents,
                    record.id.as_str().as_bytes().to_vec(),
                    Some(codec::encode(record)),
                ),
                Write::ForgetAgent(id) => (&mut rows.agents, id.as_str().as_bytes().to_vec(), None),
                Write::Admin(record) => (
                    &mut rows.admins,
                    record.name.as_bytes().to_vec(),
                    Some(codec::encode(record)),
                ),
                Write::Task(task) => (
                    &mut rows.tasks,
                    task_key(task.id).to_vec(),
                    Some(codec::encode(task)),
                ),
                Write::Delivery { id, at } => (
                    &mut rows.deliveries,
                    id.as_bytes().to_vec(),
                    Some(at.0.to_be_bytes().to_vec()),
                ),
                Write::ForgetDelivery(id) => (&mut rows.deliveries, id.as_bytes().to_vec(), None),
                Write::Outbox(entry) => (
                    &mut rows.outbox,
                    outbox_key(entry.task, entry.effect).to_vec(),
                    Some(codec::encode(entry)),
                ),
                Write::OutboxDone(task, effect) => {
                    (&mut rows.outbox, outbox_key(*task, *effect).to_vec(), None)
                }
                Write::Output(chunk) => {
                    let mut value = Vec::with_capacity(chunk.data.len() + 1);
                    value.push(chunk.kind.to_byte());
                    value.extend_from_slice(&chunk.data);
                    (
                        &mut rows.output,
                        output_key(chunk.task, chunk.attempt, chunk.seq).to_vec(),
                        Some(value),
                    )
                }
            };
            table.push((key, value));
        }
        rows
    }
}

/// A table of byte keys in key order, as the reads use it: a sled tree, or
/// an ordered map in memory.
trait Table {
    /// A key or a value as the table hands it out.
    type Bytes: AsRef<[u8]>;

    fn get(&self, key: &[u8]) -> Result<Option<Self::Bytes>, Error>;

    /// The rows from `from` on (through `through`, if given), in key order.
    fn range(
        &self,
        from: &[u8],
        through: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Self::Bytes, Self::Bytes), Error>>;

    /// Deletes these rows (at once, but not in a commit's transaction).
    fn remove(&self, keys: Vec<Self::Bytes>) -> Result<(), Error>;
}

/// What a store is beyond the shared code: where its tables are, and how
/// one commit's rows are applied. [`Store`] is implemented once for every
/// backend, so the stores differ in nothing else.
trait Backend: Send + Sync + 'static {
    type Table: Table;

    fn tables(&self) -> &Tables<Self::Table>;

    /// Applies the rows of one commit atomically (and durably, for a
    /// durable store) before it returns.
    fn apply(&self, rows: &Rows) -> Result<(), Error>;
}

pub struct SledStore {
    db: sled::Db,
    tables: Tables<sled::Tree>,
}

/// A task's key: its number, big-endian, so byte order is numeric order.
fn task_key(task: TaskId) -> [u8; 8] {
    task.0.to_be_bytes()
}

fn output_key(task: TaskId, attempt: Attempt, seq: u64) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..8].copy_from_slice(&task_key(task));
    key[8..12].copy_from_slice(&attempt.0.to_be_bytes());
    key[12..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The key before every output key of `task`.
fn first_output_key(task: TaskId) -> [u8; 20] {
    output_key(task, Attempt(0), 0)
}

/// The key after every output key of `task`.
fn last_output_key(task: TaskId) -> [u8; 20] {
    output_key(task, Attempt(u32::MAX), u64::MAX)
}

/// An outbox row's key: the task (big-endian) and the effect, so a task's
/// effects sit together in key order.
fn outbox_key(task: TaskId, effect: Effect) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&task_key(task));
    key[8] = effect.to_byte();
    key
}

/// A key that is a name (agent, admin, delivery), as it is shown in errors.
fn text_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// A binary key (task, output, outbox), as it is shown in errors.
fn byte_key(key: &[u8]) -> String {
    format!("{key:?}")
}

/// A record row (version byte and JSON) of `tree`.
fn decode_record<R: DeserializeOwned>(
    tree: &'static str,
    show_key: fn(&[u8]) -> String,
    key: &[u8],
    value: &[u8],
) -> Result<R, Error> {
    codec::decode(value).map_err(|why| Error::Corrupt {
        tree,
        key: show_key(key),
        why,
    })
}

fn decode_task(key: &[u8], value: &[u8]) -> Result<Task, Error> {
    decode_record("tasks", byte_key, key, value)
}

fn decode_delivery(key: &[u8], value: &[u8]) -> Result<(String, UnixMillis), Error> {
    let id = text_key(key);
    let at = <[u8; 8]>::try_from(value)
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Corrupt {
            tree: "deliveries",
            key: id.clone(),
            why: format!("{} bytes, expected 8", value.len()),
        })?;
    Ok((id, UnixMillis(at)))
}

fn decode_chunk(key: &[u8], value: &[u8]) -> Result<StoredChunk, Error> {
    let corrupt = |why: &str| Error::Corrupt {
        tree: "output",
        key: byte_key(key),
        why: why.to_owned(),
    };
    let attempt = key
        .get(8..12)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| corrupt("short key"))?;
    let seq = key
        .get(12..20)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt("short key"))?;
    let (&kind, data) = value.split_first().ok_or_else(|| corrupt("empty value"))?;
    Ok(StoredChunk {
        attempt: Attempt(attempt),
        seq,
        kind: OutputKind::from_byte(kind).ok_or_else(|| corrupt("unknown output kind"))?,
        data: Arc::from(data),
    })
}

/// Every row of `table` from `from` on (through `through`), decoded.
fn decode_rows<T: Table, R>(
    table: &T,
    from: &[u8],
    through: Option<&[u8]>,
    decode: impl Fn(&[u8], &[u8]) -> Result<R, Error>,
) -> impl Iterator<Item = Result<R, Error>> {
    table.range(from, through).map(move |row| {
        let (key, value) = row?;
        decode(key.as_ref(), value.as_ref())
    })
}

impl<B: Backend> Store for B {
    fn load_outbox(&self) -> Result<Vec<OutboxEntry>, Error> {
        decode_rows(&self.tables().outbox, &[], None, |key, value| {
            decode_record("outbox", byte_key, key, value)
        })
        .collect()
    }

    fn load_deliveries(&self) -> Result<Vec<(String, UnixMillis)>, Error> {
        decode_rows(&self.tables().deliveries, &[], None, decode_delivery).collect()
    }

    fn load_agents(&self) -> Result<Vec<AgentRecord>, Error> {
        decode_rows(&self.tables().agents, &[], None, |key, value| {
            decode_record("agents", text_key, key, value)
        })
        .collect()
    }

    fn load_tasks(&self) -> Result<Vec<Task>, Error> {
        decode_rows(&self.tables().tasks, &[], None, decode_task).collect()
    }

    fn load_task(&self, id: TaskId) -> Result<Option<Task>, Error> {
        let key = task_key(id);
        self.tables()
            .tasks
            .get(&key)?
            .map(|value| decode_task(&key, value.as_ref()))
            .transpose()
    }

    fn scan_tasks(&self, visit: &mut dyn FnMut(Task)) -> Result<(), Error> {
        for task in decode_rows(&self.tables().tasks, &[], None, decode_task) {
            visit(task?);
        }
        Ok(())
    }

    fn load_admins(&self) -> Result<Vec<AdminRecord>, Error> {
        decode_rows(&self.tables().admins, &[], None, |key, value| {
            decode_record("admins", text_key, key, value)
        })
        .collect()
    }

    fn output_position(
        &self,
        task: TaskId,
        since: Attempt,
        attempt: Attempt,
    ) -> Result<OutputPosition, Error> {
        let mut position = OutputPosition::default();
        let (from, through) = (first_output_key(task), last_output_key(task));
        for chunk in decode_rows(&self.tables().output, &from, Some(&through), decode_chunk) {
            let chunk = chunk?;
            if chunk.attempt < since {
                continue;
            }
            position.stored_bytes += u64::try_from(chunk.data.len()).unwrap_or(u64::MAX);
            position.truncated |=
                chunk.kind == OutputKind::System && chunk.data.starts_with(TRUNCATION_MARKER);
            if chunk.attempt == attempt {
                position.last_seq = position.last_seq.max(chunk.seq);
            }
        }
        Ok(position)
    }

    fn read_output(
        &self,
        task: TaskId,
        from: (Attempt, u64),
        limit: usize,
    ) -> Result<Vec<StoredChunk>, Error> {
        let (from, through) = (output_key(task, from.0, from.1), last_output_key(task));
        decode_rows(&self.tables().output, &from, Some(&through), decode_chunk)
            .take(limit)
            .collect()
    }

    fn prune_output(
        &self,
        ended_before: UnixMillis,
        after: Option<TaskId>,
        limit: usize,
    ) -> Result<(Option<TaskId>, usize), Error> {
        let tables = self.tables();
        let from = task_key(TaskId(after.map_or(0, |id| id.0.saturating_add(1))));
        let mut looked = 0;
        let mut pruned = 0;
        for task in decode_rows(&tables.tasks, &from, None, decode_task) {
            let task = task?;
            looked += 1;
            if task.state.is_terminal() && task.updated_at < ended_before {
                let (start, end) = (first_output_key(task.id), last_output_key(task.id));
                let keys = tables
                    .output
                    .range(&start, Some(&end))
                    .map(|row| row.map(|(key, _)| key))
                    .collect::<Result<Vec<_>, Error>>()?;
                if !keys.is_empty() {
                    tables.output.remove(keys)?;
                    pruned += 1;
                }
            }
            if looked == limit {
                return Ok((Some(task.id), pruned));
            }
        }
        Ok((None, pruned))
    }

    fn commit(&self, writes: &[Write]) -> Result<(), Error> {
        // Every write is one row: no writes, nothing to apply.
        if writes.is_empty() {
            return Ok(());
        }
        self.apply(&Rows::of(writes))
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, checking its schema version.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        // No periodic background flush: the driver flushes every batch
        // before it answers, so sled's own flusher thread would only add a
        // second writer racing the first.
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|source| open_error(dir, source))?;
        Self::from_db(db)
    }

    /// A real store in a temporary place (on Linux, shared memory), removed
    /// when dropped: for simulations and benchmarks.
    pub fn temporary() -> Result<Self, Error> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(|source| Error::Open {
                path: "(temporary)".into(),
                source,
            })?;
        Self::from_db(db)
    }

    fn from_db(db: sled::Db) -> Result<Self, Error> {
        let tables = Tables::try_new(|name| db.open_tree(name))?;
        let meta = db.open_tree("meta")?;
        match meta.get(b"schema_version")? {
            None => {
                meta.insert(b"schema_version", &SCHEMA_VERSION.to_be_bytes())?;
                flush(&db)?;
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
        Ok(Self { db, tables })
    }
}

impl Table for sled::Tree {
    type Bytes = sled::IVec;

    fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, Error> {
        Ok(sled::Tree::get(self, key)?)
    }

    fn range(
        &self,
        from: &[u8],
        through: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), Error>> {
        let end = through.map_or(Bound::Unbounded, Bound::Included);
        sled::Tree::range::<&[u8], _>(self, (Bound::Included(from), end))
            .map(|row| row.map_err(Error::Io))
    }

    fn remove(&self, keys: Vec<sled::IVec>) -> Result<(), Error> {
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key);
        }
        Ok(self.apply_batch(batch)?)
    }
}

impl Backend for SledStore {
    type Table = sled::Tree;

    fn tables(&self) -> &Tables<sled::Tree> {
        &self.tables
    }

    /// One sled transaction over the trees the rows touch, then one flush.
    fn apply(&self, rows: &Rows) -> Result<(), Error> {
        let (trees, rows): (Vec<&sled::Tree>, Vec<&Vec<Row>>) = self
            .tables
            .each()
            .into_iter()
            .zip(rows.each())
            .filter(|(_, rows)| !rows.is_empty())
            .unzip();
        trees[..]
            .transaction(|trees| {
                for (tree, rows) in trees.iter().zip(&rows) {
                    for (key, value) in rows.iter() {
                        match value {
                            Some(value) => tree.insert(key.as_slice(), value.as_slice())?,
                            None => tree.remove(key.as_slice())?,
                        };
                    }
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => Error::Io(e),
                TransactionError::Abort(()) => Error::Task("transaction aborted".into()),
            })?;
        flush(&self.db)?;
        Ok(())
    }
}

/// `Db::flush` with an epoch guard held across it (see the module docs:
/// without it, sled 0.34.7's flush can touch an IO buffer that a concurrent
/// writer has already sealed and freed).
fn flush(db: &sled::Db) -> Result<usize, sled::Error> {
    let _guard = sled::pin();
    db.flush()
}

#[cfg(test)]
mod tests;

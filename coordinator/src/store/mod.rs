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

use std::path::Path;
use std::sync::Arc;

use common::ids::{Attempt, TaskId};
use common::time::UnixMillis;
use common::types::OutputKind;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::core::outbox::{Effect, OutboxEntry};
use crate::core::task::TRUNCATION_MARKER;
use crate::core::{AdminRecord, AgentRecord, OutputPosition, Task, Write};

mod codec;

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
    /// Applies every write in one transaction and flushes it to disk.
    fn commit(&self, writes: &[Write]) -> Result<(), Error>;
}

pub struct SledStore {
    db: sled::Db,
    agents: sled::Tree,
    tasks: sled::Tree,
    output: sled::Tree,
    admins: sled::Tree,
    deliveries: sled::Tree,
    outbox: sled::Tree,
}

fn output_key(task: TaskId, attempt: Attempt, seq: u64) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..8].copy_from_slice(&task.0.to_be_bytes());
    key[8..12].copy_from_slice(&attempt.0.to_be_bytes());
    key[12..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// An outbox row's key: the task (big-endian) and the effect, so a task's
/// effects sit together in key order.
fn outbox_key(task: TaskId, effect: Effect) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&task.0.to_be_bytes());
    key[8] = effect.to_byte();
    key
}

fn decode_chunk(key: &[u8], value: &[u8]) -> Result<StoredChunk, Error> {
    let corrupt = |why: &str| Error::Corrupt {
        tree: "output",
        key: format!("{key:?}"),
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
        let agents = db.open_tree("agents")?;
        let tasks = db.open_tree("tasks")?;
        let output = db.open_tree("output")?;
        let admins = db.open_tree("admins")?;
        let deliveries = db.open_tree("deliveries")?;
        let outbox = db.open_tree("outbox")?;
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
        Ok(Self {
            db,
            agents,
            tasks,
            output,
            admins,
            deliveries,
            outbox,
        })
    }
}

fn decode_task(key: &[u8], value: &[u8]) -> Result<Task, Error> {
    codec::decode(value).map_err(|why| Error::Corrupt {
        tree: "tasks",
        key: format!("{key:?}"),
        why,
    })
}

impl Store for SledStore {
    fn load_outbox(&self) -> Result<Vec<OutboxEntry>, Error> {
        self.outbox
            .iter()
            .map(|row| {
                let (key, value) = row?;
                codec::decode(&value).map_err(|why| Error::Corrupt {
                    tree: "outbox",
                    key: format!("{key:?}"),
                    why,
                })
            })
            .collect()
    }

    fn load_deliveries(&self) -> Result<Vec<(String, UnixMillis)>, Error> {
        self.deliveries
            .iter()
            .map(|row| {
                let (key, value) = row?;
                let id = String::from_utf8_lossy(&key).into_owned();
                let at = <[u8; 8]>::try_from(value.as_ref())
                    .map(u64::from_be_bytes)
                    .map_err(|_| Error::Corrupt {
                        tree: "deliveries",
                        key: id.clone(),
                        why: format!("{} bytes, expected 8", value.len()),
                    })?;
                Ok((id, UnixMillis(at)))
            })
            .collect()
    }

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

    fn load_tasks(&self) -> Result<Vec<Task>, Error> {
        self.tasks
            .iter()
            .map(|row| {
                let (key, value) = row?;
                decode_task(&key, &value)
            })
            .collect()
    }

    fn load_task(&self, id: TaskId) -> Result<Option<Task>, Error> {
        let key = id.0.to_be_bytes();
        self.tasks
            .get(key)?
            .map(|value| decode_task(&key, &value))
            .transpose()
    }

    fn scan_tasks(&self, visit: &mut dyn FnMut(Task)) -> Result<(), Error> {
        for row in &self.tasks {
            let (key, value) = row?;
            visit(decode_task(&key, &value)?);
        }
        Ok(())
    }

    fn load_admins(&self) -> Result<Vec<AdminRecord>, Error> {
        self.admins
            .iter()
            .map(|row| {
                let (key, value) = row?;
                codec::decode(&value).map_err(|why| Error::Corrupt {
                    tree: "admins",
                    key: String::from_utf8_lossy(&key).into_owned(),
                    why,
                })
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
        for row in self.output.scan_prefix(task.0.to_be_bytes()) {
            let (key, value) = row?;
            let chunk = decode_chunk(&key, &value)?;
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
        let start = output_key(task, from.0, from.1);
        let end = output_key(task, Attempt(u32::MAX), u64::MAX);
        self.output
            .range(start..=end)
            .take(limit)
            .map(|row| {
                let (key, value) = row?;
                decode_chunk(&key, &value)
            })
            .collect()
    }

    fn prune_output(
        &self,
        ended_before: UnixMillis,
        after: Option<TaskId>,
        limit: usize,
    ) -> Result<(Option<TaskId>, usize), Error> {
        let from = after.map_or(0, |id| id.0.saturating_add(1));
        let mut looked = 0;
        let mut pruned = 0;
        for row in self.tasks.range(from.to_be_bytes()..) {
            let (key, value) = row?;
            let task = decode_task(&key, &value)?;
            looked += 1;
            if task.state.is_terminal() && task.updated_at < ended_before {
                let start = output_key(task.id, Attempt(0), 0);
                let end = output_key(task.id, Attempt(u32::MAX), u64::MAX);
                let mut batch = sled::Batch::default();
                let mut any = false;
                for key in self.output.range(start..=end).keys() {
                    batch.remove(key?);
                    any = true;
                }
                if any {
                    self.output.apply_batch(batch)?;
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
        if writes.is_empty() {
            return Ok(());
        }
        // Encode outside the transaction: the closure below must be pure
        // because sled may run it more than once.
        // `None`: the row is deleted.
        let mut agent_rows: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut admin_rows: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut task_rows: Vec<([u8; 8], Vec<u8>)> = Vec::new();
        let mut output_rows: Vec<([u8; 20], Vec<u8>)> = Vec::new();
        let mut delivery_rows: Vec<(Vec<u8>, Option<[u8; 8]>)> = Vec::new();
        let mut outbox_rows: Vec<([u8; 9], Option<Vec<u8>>)> = Vec::new();
        for write in writes {
            match write {
                Write::Agent(record) => agent_rows.push((
                    record.id.as_str().as_bytes().to_vec(),
                    Some(codec::encode(record)),
                )),
                Write::ForgetAgent(id) => agent_rows.push((id.as_str().as_bytes().to_vec(), None)),
                Write::Admin(record) => {
                    admin_rows.push((record.name.as_bytes().to_vec(), codec::encode(record)));
                }
                Write::Task(task) => task_rows.push((task.id.0.to_be_bytes(), codec::encode(task))),
                Write::Delivery { id, at } => {
                    delivery_rows.push((id.as_bytes().to_vec(), Some(at.0.to_be_bytes())));
                }
                Write::ForgetDelivery(id) => delivery_rows.push((id.as_bytes().to_vec(), None)),
                Write::Outbox(entry) => {
                    outbox_rows.push((
                        outbox_key(entry.task, entry.effect),
                        Some(codec::encode(entry)),
                    ));
                }
                Write::OutboxDone(task, effect) => {
                    outbox_rows.push((outbox_key(*task, *effect), None))
                }
                Write::Output {
                    task,
                    attempt,
                    seq,
                    kind,
                    data,
                } => {
                    let mut value = Vec::with_capacity(data.len() + 1);
                    value.push(kind.to_byte());
                    value.extend_from_slice(data);
                    output_rows.push((output_key(*task, *attempt, *seq), value));
                }
            }
        }
        (
            &self.agents,
            &self.tasks,
            &self.output,
            &self.admins,
            &self.deliveries,
            &self.outbox,
        )
            .transaction(|(agents, tasks, output, admins, deliveries, outbox)| {
                for (key, value) in &outbox_rows {
                    match value {
                        Some(value) => outbox.insert(key.as_slice(), value.as_slice())?,
                        None => outbox.remove(key.as_slice())?,
                    };
                }
                for (key, value) in &delivery_rows {
                    match value {
                        Some(at) => deliveries.insert(key.as_slice(), at.as_slice())?,
                        None => deliveries.remove(key.as_slice())?,
                    };
                }
                for (key, value) in &agent_rows {
                    match value {
                        Some(value) => agents.insert(key.as_slice(), value.as_slice())?,
                        None => agents.remove(key.as_slice())?,
                    };
                }
                for (key, value) in &admin_rows {
                    admins.insert(key.as_slice(), value.as_slice())?;
                }
                for (key, value) in &task_rows {
                    tasks.insert(key.as_slice(), value.as_slice())?;
                }
                for (key, value) in &output_rows {
                    output.insert(key.as_slice(), value.as_slice())?;
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

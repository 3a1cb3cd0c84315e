//! Output waiting for the coordinator's acknowledgement, on disk: one
//! append-only file per attempt, so a coordinator that is unreachable for
//! a long time costs disk, not memory, and nothing is lost.
//!
//! Record: seq (u64, big-endian), kind (u8), length (u32, big-endian), data.
//! When an attempt ends, its result is saved beside its output
//! (`<task>-a<n>.result`, JSON, written aside and renamed), so an agent that
//! dies before the coordinator has the result still reports it after a
//! restart, with the output the coordinator lacks, instead of the finished
//! (and pushed) work being run again. Both files are removed when the
//! coordinator acknowledges the result or tells the agent to cancel the
//! attempt; at start, output without a result belongs to an attempt whose
//! process died with the earlier run and is removed.
//!
//! The driver never touches the disk itself: [`Spool::spawn`] moves the
//! spool to a blocking thread that serves a [`SpoolHandle`]'s requests one
//! at a time, in the order they were made. So a chunk is written before a
//! later resend reads the file, and a result is saved before a later
//! removal of its attempt.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::ids::{Attempt, TaskId};
use common::protocol::OutputChunk;
use common::types::{FinishedReport, OutputKind};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("output spool {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the output spool has stopped")]
    Stopped,
}

/// Records longer than this are not ours: a damaged file ends there.
const MAX_RECORD: u32 = 16 << 20;
/// Requests the spool's thread may have queued before callers wait.
const QUEUED_REQUESTS: usize = 256;

/// A record's header: seq, kind, length of the data that follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    seq: u64,
    kind: OutputKind,
    len: u32,
}

impl Header {
    const LEN: usize = 13;

    fn encode(self) -> [u8; Self::LEN] {
        let mut bytes = [0u8; Self::LEN];
        bytes[..8].copy_from_slice(&self.seq.to_be_bytes());
        bytes[8] = self.kind.to_byte();
        bytes[9..].copy_from_slice(&self.len.to_be_bytes());
        bytes
    }

    /// Reads the next header: `None` at the end of the file, or at a
    /// damaged record (nothing after one can be trusted).
    fn read(reader: &mut impl Read) -> std::io::Result<Option<Self>> {
        let mut bytes = [0u8; Self::LEN];
        match reader.read_exact(&mut bytes) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let [s0, s1, s2, s3, s4, s5, s6, s7, kind, l0, l1, l2, l3] = bytes;
        let header = Self {
            seq: u64::from_be_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            kind: OutputKind::from_byte(kind).unwrap_or(OutputKind::Stdout),
            len: u32::from_be_bytes([l0, l1, l2, l3]),
        };
        Ok((header.len <= MAX_RECORD && header.seq != 0).then_some(header))
    }
}

pub struct Spool {
    dir: PathBuf,
    /// Each attempt's open file and the length of its whole records.
    open: HashMap<(TaskId, Attempt), (File, u64)>,
    /// Chunks that could not be written (disk full, I/O error), kept in
    /// memory instead, until acknowledged: owed output is never dropped.
    unwritten: HashMap<(TaskId, Attempt), Vec<OutputChunk>>,
    /// Attempts whose file could not be cut back after a failed write:
    /// nothing more is appended to it (it would be misread).
    broken: std::collections::HashSet<(TaskId, Attempt)>,
}

impl Spool {
    /// Opens the spool directory. Attempts an earlier run finished but
    /// could not hand over come back; everything else it left is removed.
    pub fn open(data_dir: &Path) -> Result<(Self, Vec<Finished>), Error> {
        let dir = data_dir.join("spool");
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let spool = Self {
            dir,
            open: HashMap::new(),
            unwritten: HashMap::new(),
            broken: std::collections::HashSet::new(),
        };
        let entries = std::fs::read_dir(&spool.dir).map_err(|source| Error::Io {
            path: spool.dir.clone(),
            source,
        })?;
        let names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        let mut finished = Vec::new();
        for name in &names {
            let Some(key) = name.strip_suffix(".result").and_then(parse_key) else {
                continue;
            };
            match spool.recover(key) {
                Ok(done) => finished.push(done),
                Err(e) => {
                    tracing::warn!(file = %name, error = %e, "cannot recover a finished attempt")
                }
            }
        }
        for name in names {
            let key = name
                .strip_suffix(".result")
                .or_else(|| name.strip_suffix(".spool"))
                .and_then(parse_key);
            let kept =
                key.is_some_and(|(t, a)| finished.iter().any(|f| f.task == t && f.attempt == a));
            if !kept {
                let _ = std::fs::remove_file(spool.dir.join(&name));
            }
        }
        Ok((spool, finished))
    }

    fn recover(&self, (task, attempt): (TaskId, Attempt)) -> Result<Finished, Error> {
        let path = self.result_path(task, attempt);
        let text = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let report: FinishedReport = serde_json::from_slice(&text).map_err(|e| Error::Io {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        let unacked: Vec<(u64, usize)> = self.record_sizes(task, attempt)?;
        let whole = unacked
            .iter()
            .enumerate()
            .all(|(i, (seq, _))| *seq == i as u64 + 1)
            && unacked.len() as u64 == report.last_output_seq;
        if !whole {
            // Chunks kept in memory died with the process: the coordinator
            // will have the output up to the first gap.
            tracing::warn!(task_id = %task, attempt = attempt.0, "the saved output of a finished attempt has gaps");
        }
        Ok(Finished {
            task,
            attempt,
            report,
            unacked,
        })
    }

    /// Saves an attempt's result, so that it survives the agent process
    /// until the coordinator acknowledges it. Written aside and renamed, but
    /// not synced: a crash of the process loses nothing, and after a power
    /// cut (rare, and costly to guard against on every attempt) the
    /// coordinator runs the attempt again when its lease runs out.
    pub fn save_result(
        &mut self,
        task: TaskId,
        attempt: Attempt,
        report: &FinishedReport,
    ) -> Result<(), Error> {
        let path = self.result_path(task, attempt);
        let err = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let json = serde_json::to_vec(report)
            .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let aside = path.with_extension("result-new");
        let mut file = File::create(&aside).map_err(err)?;
        file.write_all(&json)
            .and_then(|()| std::fs::rename(&aside, &path))
            .map_err(err)
    }

    fn path(&self, task: TaskId, attempt: Attempt) -> PathBuf {
        self.dir.join(format!("{task}-a{}.spool", attempt.0))
    }

    fn result_path(&self, task: TaskId, attempt: Attempt) -> PathBuf {
        self.dir.join(format!("{task}-a{}.result", attempt.0))
    }

    /// Keeps `chunk` until its attempt is removed. On a write error the
    /// file is cut back to its last whole record and the chunk is kept in
    /// memory; the error is returned for the log, the chunk is not lost.
    pub fn append(&mut self, chunk: &OutputChunk) -> Result<(), Error> {
        let key = (chunk.task, chunk.attempt);
        let written = if self.broken.contains(&key) {
            Err(Error::Io {
                path: self.path(chunk.task, chunk.attempt),
                source: std::io::Error::other("the file is damaged; kept in memory"),
            })
        } else {
            self.write(chunk)
        };
        if written.is_err() {
            self.unwritten.entry(key).or_default().push(chunk.clone());
        }
        written
    }

    fn write(&mut self, chunk: &OutputChunk) -> Result<(), Error> {
        let path = self.path(chunk.task, chunk.attempt);
        let err = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let (file, len) = match self.open.entry((chunk.task, chunk.attempt)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert((
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(err)?,
                0,
            )),
        };
        let size = u32::try_from(chunk.data.len())
            .ok()
            .filter(|&n| n <= MAX_RECORD)
            .ok_or_else(|| err(std::io::Error::other("chunk too large to spool")))?;
        let header = Header {
            seq: chunk.seq,
            kind: chunk.kind,
            len: size,
        };
        let mut record = Vec::with_capacity(Header::LEN + chunk.data.len());
        record.extend_from_slice(&header.encode());
        record.extend_from_slice(&chunk.data);
        match file.write_all(&record) {
            Ok(()) => {
                *len += record.len() as u64;
                Ok(())
            }
            Err(source) => {
                // A torn record would make every later one unreadable.
                if file.set_len(*len).is_err() {
                    self.broken.insert((chunk.task, chunk.attempt));
                }
                Err(err(source))
            }
        }
    }

    /// The chunks of an attempt with a seq above `after`, in order, at most
    /// about `max_bytes` of them (at least one): a large backlog is resent
    /// in steps.
    pub fn read_after(
        &self,
        task: TaskId,
        attempt: Attempt,
        after: u64,
        max_bytes: usize,
    ) -> Result<Vec<OutputChunk>, Error> {
        let (mut chunks, whole_file) = self.read_file(task, attempt, after, max_bytes)?;
        if let Some(kept) = self.unwritten.get(&(task, attempt)) {
            // Only those among what was read: the answer must be a run of
            // consecutive seqs, or the next step would skip some.
            let read_through = match chunks.last() {
                Some(last) if !whole_file => last.seq,
                _ => u64::MAX,
            };
            chunks.extend(
                kept.iter()
                    .filter(|c| c.seq > after && c.seq <= read_through)
                    .cloned(),
            );
            chunks.sort_by_key(|c| c.seq);
            chunks.dedup_by_key(|c| c.seq);
            let mut total = 0;
            let keep = chunks
                .iter()
                .take_while(|c| {
                    let fits = total == 0 || total + c.data.len() <= max_bytes;
                    total += c.data.len();
                    fits
                })
                .count();
            chunks.truncate(keep);
        }
        Ok(chunks)
    }

    /// The attempt's file for reading; `None` when it has none.
    fn open_file(&self, task: TaskId, attempt: Attempt) -> Result<Option<File>, Error> {
        let path = self.path(task, attempt);
        match File::open(&path) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io { path, source }),
        }
    }

    /// Seq and size of every record in the attempt's file, read from the
    /// headers alone (a large file is not loaded).
    fn record_sizes(&self, task: TaskId, attempt: Attempt) -> Result<Vec<(u64, usize)>, Error> {
        let Some(file) = self.open_file(task, attempt)? else {
            return Ok(Vec::new());
        };
        let end = file
            .metadata()
            .map_err(|source| Error::Io {
                path: self.path(task, attempt),
                source,
            })?
            .len();
        let mut reader = BufReader::new(file);
        let (mut at, mut sizes) = (0u64, Vec::new());
        // A read error ends the records as a damaged one does.
        while let Ok(Some(header)) = Header::read(&mut reader) {
            at += Header::LEN as u64 + u64::from(header.len);
            if at > end {
                break; // Torn: nothing after this counts.
            }
            if reader.seek_relative(i64::from(header.len)).is_err() {
                break;
            }
            sizes.push((header.seq, header.len as usize));
        }
        Ok(sizes)
    }

    fn read_file(
        &self,
        task: TaskId,
        attempt: Attempt,
        after: u64,
        max_bytes: usize,
    ) -> Result<(Vec<OutputChunk>, bool), Error> {
        let err = |source| Error::Io {
            path: self.path(task, attempt),
            source,
        };
        let Some(file) = self.open_file(task, attempt)? else {
            return Ok((Vec::new(), true));
        };
        let mut reader = BufReader::new(file);
        let mut chunks = Vec::new();
        let mut total = 0usize;
        let mut whole_file = false;
        while total < max_bytes || chunks.is_empty() {
            let Some(header) = Header::read(&mut reader).map_err(err)? else {
                whole_file = true; // The end, or a damaged record.
                break;
            };
            if header.seq <= after {
                // Already acknowledged: skipped without reading it.
                if reader.seek_relative(i64::from(header.len)).is_err() {
                    whole_file = true;
                    break;
                }
                continue;
            }
            let mut data = vec![0u8; header.len as usize];
            if reader.read_exact(&mut data).is_err() {
                whole_file = true; // A torn last record: it was never sent either.
                break;
            }
            total += data.len();
            chunks.push(OutputChunk {
                task,
                attempt,
                seq: header.seq,
                kind: header.kind,
                data: Arc::from(data),
            });
        }
        Ok((chunks, whole_file))
    }

    /// The coordinator has the attempt's chunks up to `acked`: those kept
    /// in memory go. (The file is append-only; it goes with the attempt.)
    pub fn acknowledged(&mut self, task: TaskId, attempt: Attempt, acked: u64) {
        if let Some(kept) = self.unwritten.get_mut(&(task, attempt)) {
            kept.retain(|c| c.seq > acked);
        }
    }

    pub fn remove(&mut self, task: TaskId, attempt: Attempt) {
        self.open.remove(&(task, attempt));
        self.unwritten.remove(&(task, attempt));
        self.broken.remove(&(task, attempt));
        let _ = std::fs::remove_file(self.path(task, attempt));
        let _ = std::fs::remove_file(self.result_path(task, attempt));
    }
}

impl Spool {
    /// Moves the spool to a blocking thread owned by `tracker`; it serves
    /// the returned handle's requests, in order, until every handle is gone.
    pub fn spawn(self, tracker: &TaskTracker) -> SpoolHandle {
        let (requests, rx) = mpsc::channel(QUEUED_REQUESTS);
        tracker.spawn_blocking(move || self.serve(rx));
        SpoolHandle { requests }
    }

    fn serve(mut self, mut requests: mpsc::Receiver<Request>) {
        while let Some(request) = requests.blocking_recv() {
            match request {
                Request::Append(chunk) => {
                    if let Err(e) = self.append(&chunk) {
                        // Kept in memory: sent while connected, lost only
                        // if the agent dies before it is acknowledged.
                        warn!(task_id = %chunk.task, attempt = chunk.attempt.0, error = %e, "cannot spool output");
                    }
                }
                Request::SaveResult {
                    task,
                    attempt,
                    report,
                    saved,
                } => {
                    let _ = saved.send(self.save_result(task, attempt, &report));
                }
                Request::ReadAfter {
                    task,
                    attempt,
                    after,
                    max_bytes,
                    chunks,
                } => {
                    let _ = chunks.send(self.read_after(task, attempt, after, max_bytes));
                }
                Request::Acknowledged { task, attempt, seq } => {
                    self.acknowledged(task, attempt, seq);
                }
                Request::Remove { task, attempt } => self.remove(task, attempt),
            }
        }
    }
}

/// What the spool's thread is asked to do.
#[derive(Debug)]
enum Request {
    Append(OutputChunk),
    SaveResult {
        task: TaskId,
        attempt: Attempt,
        report: Box<FinishedReport>,
        saved: oneshot::Sender<Result<(), Error>>,
    },
    ReadAfter {
        task: TaskId,
        attempt: Attempt,
        after: u64,
        max_bytes: usize,
        chunks: oneshot::Sender<Result<Vec<OutputChunk>, Error>>,
    },
    Acknowledged {
        task: TaskId,
        attempt: Attempt,
        seq: u64,
    },
    Remove {
        task: TaskId,
        attempt: Attempt,
    },
}

/// The driver's side of the spool's thread: [`Spool`]'s operations, each
/// queued behind those asked before it.
#[derive(Clone, Debug)]
pub struct SpoolHandle {
    requests: mpsc::Sender<Request>,
}

impl SpoolHandle {
    /// Queues `chunk` to be written; a write error is logged there and the
    /// chunk kept in memory (see [`Spool::append`]).
    pub async fn append(&self, chunk: OutputChunk) {
        self.ask(Request::Append(chunk)).await;
    }

    /// Saves an attempt's result and waits until it is saved.
    pub async fn save_result(
        &self,
        task: TaskId,
        attempt: Attempt,
        report: FinishedReport,
    ) -> Result<(), Error> {
        let (saved, answer) = oneshot::channel();
        self.ask(Request::SaveResult {
            task,
            attempt,
            report: Box::new(report),
            saved,
        })
        .await;
        answer.await.unwrap_or(Err(Error::Stopped))
    }

    /// See [`Spool::read_after`]: what was appended before is included.
    pub async fn read_after(
        &self,
        task: TaskId,
        attempt: Attempt,
        after: u64,
        max_bytes: usize,
    ) -> Result<Vec<OutputChunk>, Error> {
        let (chunks, answer) = oneshot::channel();
        self.ask(Request::ReadAfter {
            task,
            attempt,
            after,
            max_bytes,
            chunks,
        })
        .await;
        answer.await.unwrap_or(Err(Error::Stopped))
    }

    pub async fn acknowledged(&self, task: TaskId, attempt: Attempt, seq: u64) {
        self.ask(Request::Acknowledged { task, attempt, seq }).await;
    }

    pub async fn remove(&self, task: TaskId, attempt: Attempt) {
        self.ask(Request::Remove { task, attempt }).await;
    }

    async fn ask(&self, request: Request) {
        // The thread ends only when every handle is gone; an answer it can
        // no longer give is `Error::Stopped`.
        let _ = self.requests.send(request).await;
    }
}

/// An attempt an earlier run of the agent finished and had not handed over.
#[derive(Debug)]
pub struct Finished {
    pub task: TaskId,
    pub attempt: Attempt,
    pub report: FinishedReport,
    /// Seq and size of each spooled chunk (the coordinator says which it has).
    pub unacked: Vec<(u64, usize)>,
}

/// `t-12-a3` → (t-12, 3).
fn parse_key(stem: &str) -> Option<(TaskId, Attempt)> {
    let (task, attempt) = stem.rsplit_once("-a")?;
    Some((task.parse().ok()?, Attempt(attempt.parse().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(attempt: u32, seq: u64, len: usize) -> OutputChunk {
        OutputChunk {
            task: TaskId(1),
            attempt: Attempt(attempt),
            seq,
            kind: OutputKind::Stdout,
            data: Arc::from(vec![b'x'; len]),
        }
    }

    fn seqs(chunks: &[OutputChunk]) -> Vec<u64> {
        chunks.iter().map(|c| c.seq).collect()
    }

    #[test]
    fn a_saved_result_and_its_output_outlive_the_agent_and_nothing_else_does() {
        let dir = std::env::temp_dir().join(format!("ccc-spool-restart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut spool, none) = Spool::open(&dir).expect("open");
        assert!(none.is_empty());
        for seq in 1..=3 {
            spool.append(&chunk(1, seq, 10)).expect("append");
            spool.append(&chunk(2, seq, 20)).expect("append");
        }
        let report = FinishedReport {
            branch: "ccc/x".into(),
            commit: "abc".into(),
            last_output_seq: 3,
            ..FinishedReport::new(common::types::Outcome::Succeeded, "pushed")
        };
        spool
            .save_result(TaskId(1), Attempt(1), &report)
            .expect("save");
        drop(spool);

        // Attempt 1 finished: it comes back. Attempt 2 was still running.
        let (spool, finished) = Spool::open(&dir).expect("reopen");
        assert_eq!(finished.len(), 1, "{finished:?}");
        assert_eq!(
            (finished[0].task, finished[0].attempt),
            (TaskId(1), Attempt(1))
        );
        assert_eq!(finished[0].report, report);
        assert_eq!(finished[0].unacked, vec![(1, 10), (2, 10), (3, 10)]);
        assert!(
            spool
                .read_after(TaskId(1), Attempt(2), 0, usize::MAX)
                .expect("read")
                .is_empty(),
            "the output of an attempt that died with the agent is gone"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_disk_keeps_output_in_memory_and_resends_come_in_consecutive_steps() {
        let dir = std::env::temp_dir().join(format!("ccc-spool-full-{}", std::process::id()));
        let (mut spool, _) = Spool::open(&dir).expect("open");
        // Attempt 1 writes to a device that is always full.
        std::os::unix::fs::symlink("/dev/full", spool.path(TaskId(1), Attempt(1)))
            .expect("symlink");
        for seq in 1..=3 {
            assert!(
                spool.append(&chunk(1, seq, 10)).is_err(),
                "the error is reported"
            );
        }
        std::fs::remove_file(spool.path(TaskId(1), Attempt(1))).expect("unlink");
        let back = spool
            .read_after(TaskId(1), Attempt(1), 1, usize::MAX)
            .expect("read");
        assert_eq!(seqs(&back), vec![2, 3], "nothing is lost");
        spool.acknowledged(TaskId(1), Attempt(1), 2);
        assert_eq!(
            spool.unwritten[&(TaskId(1), Attempt(1))].len(),
            1,
            "acknowledged chunks leave memory"
        );

        // Attempt 2: seqs 1, 2 and 4..=6 on disk, 3 in memory (its write
        // failed); read in steps of about two chunks.
        for seq in [1, 2, 4, 5, 6] {
            spool.append(&chunk(2, seq, 100)).expect("append");
        }
        spool
            .unwritten
            .insert((TaskId(1), Attempt(2)), vec![chunk(2, 3, 100)]);
        let mut after = 0;
        let mut resent = Vec::new();
        loop {
            let step = spool
                .read_after(TaskId(1), Attempt(2), after, 200)
                .expect("read");
            let Some(last) = step.last() else { break };
            after = last.seq;
            resent.extend(seqs(&step));
        }
        assert_eq!(resent, vec![1, 2, 3, 4, 5, 6]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_spools_thread_serves_requests_in_the_order_they_were_made() {
        let dir = std::env::temp_dir().join(format!("ccc-spool-thread-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (spool, _) = Spool::open(&dir).expect("open");
        let tracker = TaskTracker::new();
        let handle = spool.spawn(&tracker);
        for seq in 1..=3 {
            handle.append(chunk(1, seq, 10)).await;
        }
        let back = handle
            .read_after(TaskId(1), Attempt(1), 1, usize::MAX)
            .await
            .expect("read");
        assert_eq!(seqs(&back), vec![2, 3], "appends asked before are read");
        let report = FinishedReport::new(common::types::Outcome::Succeeded, "pushed");
        handle
            .save_result(TaskId(1), Attempt(1), report)
            .await
            .expect("saved");
        assert!(
            dir.join("spool/t-1-a1.result").exists(),
            "saved when answered"
        );
        handle.remove(TaskId(1), Attempt(1)).await;
        drop(handle);
        tracker.close();
        tracker.wait().await;
        let (_, finished) = Spool::open(&dir).expect("reopen");
        assert!(finished.is_empty(), "removed after it was saved");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn chunks_come_back_in_order_from_the_ack_on() {
        let dir = std::env::temp_dir().join(format!("ccc-spool-{}", std::process::id()));
        let (mut spool, _) = Spool::open(&dir).expect("open");
        for seq in 1..=5u64 {
            let data: Vec<u8> = vec![0xff, u8::try_from(seq).unwrap_or(0), b'\n'];
            spool
                .append(&OutputChunk {
                    task: TaskId(1),
                    attempt: Attempt(2),
                    seq,
                    kind: OutputKind::Stderr,
                    data: Arc::from(data),
                })
                .expect("append");
        }
        let back = spool
            .read_after(TaskId(1), Attempt(2), 3, usize::MAX)
            .expect("read");
        assert_eq!(back.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(&*back[0].data, &[0xff, 4, b'\n']);
        assert_eq!(back[0].kind, OutputKind::Stderr);
        spool.remove(TaskId(1), Attempt(2));
        assert!(
            spool
                .read_after(TaskId(1), Attempt(2), 0, usize::MAX)
                .expect("read")
                .is_empty()
        );
        let again = Spool::open(&dir).expect("reopen");
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

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

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::ids::{Attempt, TaskId};
use common::types::{FinishedReport, OutputKind};

use crate::session::Chunk;

#[derive(Debug, thiserror::Error)]
#[error("output spool {}: {source}", path.display())]
pub struct Error {
    path: PathBuf,
    source: std::io::Error,
}

/// Records longer than this are not ours: a damaged file ends there.
const MAX_RECORD: u32 = 16 << 20;

pub struct Spool {
    dir: PathBuf,
    /// Each attempt's open file and the length of its whole records.
    open: HashMap<(TaskId, Attempt), (File, u64)>,
    /// Chunks that could not be written (disk full, I/O error), kept in
    /// memory instead, until acknowledged: owed output is never dropped.
    unwritten: HashMap<(TaskId, Attempt), Vec<Chunk>>,
    /// Attempts whose file could not be cut back after a failed write:
    /// nothing more is appended to it (it would be misread).
    broken: std::collections::HashSet<(TaskId, Attempt)>,
}

impl Spool {
    /// Opens the spool directory. Attempts an earlier run finished but
    /// could not hand over come back; everything else it left is removed.
    pub fn open(data_dir: &Path) -> Result<(Self, Vec<Finished>), Error> {
        let dir = data_dir.join("spool");
        std::fs::create_dir_all(&dir).map_err(|source| Error {
            path: dir.clone(),
            source,
        })?;
        let spool = Self {
            dir,
            open: HashMap::new(),
            unwritten: HashMap::new(),
            broken: std::collections::HashSet::new(),
        };
        let entries = std::fs::read_dir(&spool.dir).map_err(|source| Error {
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
        let text = std::fs::read(&path).map_err(|source| Error {
            path: path.clone(),
            source,
        })?;
        let report: FinishedReport = serde_json::from_slice(&text).map_err(|e| Error {
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
        let err = |source| Error {
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
    pub fn append(&mut self, chunk: &Chunk) -> Result<(), Error> {
        let key = (chunk.task, chunk.attempt);
        let written = if self.broken.contains(&key) {
            Err(Error {
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

    fn write(&mut self, chunk: &Chunk) -> Result<(), Error> {
        let path = self.path(chunk.task, chunk.attempt);
        let err = |source| Error {
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
        let mut record = Vec::with_capacity(13 + chunk.data.len());
        record.extend_from_slice(&chunk.seq.to_be_bytes());
        record.push(chunk.kind.to_byte());
        record.extend_from_slice(&size.to_be_bytes());
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
    ) -> Result<Vec<Chunk>, Error> {
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
            Err(source) => Err(Error { path, source }),
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
            .map_err(|source| Error {
                path: self.path(task, attempt),
                source,
            })?
            .len();
        let mut reader = BufReader::new(file);
        let (mut at, mut sizes) = (0u64, Vec::new());
        let mut header = [0u8; 13];
        while reader.read_exact(&mut header).is_ok() {
            let seq = u64::from_be_bytes(header[..8].try_into().unwrap_or([0; 8]));
            let len = u32::from_be_bytes(header[9..].try_into().unwrap_or([0; 4]));
            at += 13 + u64::from(len);
            if len > MAX_RECORD || seq == 0 || at > end {
                break; // Damaged or torn: nothing after this counts.
            }
            if reader.seek_relative(i64::from(len)).is_err() {
                break;
            }
            sizes.push((seq, len as usize));
        }
        Ok(sizes)
    }

    fn read_file(
        &self,
        task: TaskId,
        attempt: Attempt,
        after: u64,
        max_bytes: usize,
    ) -> Result<(Vec<Chunk>, bool), Error> {
        let err = |source| Error {
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
        let mut header = [0u8; 13];
        while total < max_bytes || chunks.is_empty() {
            match reader.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    whole_file = true;
                    break;
                }
                Err(e) => return Err(err(e)),
            }
            let seq = u64::from_be_bytes(header[..8].try_into().unwrap_or([0; 8]));
            let kind = OutputKind::from_byte(header[8]).unwrap_or(OutputKind::Stdout);
            let len = u32::from_be_bytes(header[9..].try_into().unwrap_or([0; 4]));
            if len > MAX_RECORD || seq == 0 {
                whole_file = true; // Damaged: nothing after this can be trusted.
                break;
            }
            if seq <= after {
                // Already acknowledged: skipped without reading it.
                if reader.seek_relative(i64::from(len)).is_err() {
                    whole_file = true;
                    break;
                }
                continue;
            }
            let mut data = vec![0u8; len as usize];
            if reader.read_exact(&mut data).is_err() {
                whole_file = true; // A torn last record: it was never sent either.
                break;
            }
            total += data.len();
            chunks.push(Chunk {
                task,
                attempt,
                seq,
                kind,
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

    fn chunk(attempt: u32, seq: u64, len: usize) -> Chunk {
        Chunk {
            task: TaskId(1),
            attempt: Attempt(attempt),
            seq,
            kind: OutputKind::Stdout,
            data: Arc::from(vec![b'x'; len]),
        }
    }

    fn seqs(chunks: &[Chunk]) -> Vec<u64> {
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

    #[test]
    fn chunks_come_back_in_order_from_the_ack_on() {
        let dir = std::env::temp_dir().join(format!("ccc-spool-{}", std::process::id()));
        let (mut spool, _) = Spool::open(&dir).expect("open");
        for seq in 1..=5u64 {
            let data: Vec<u8> = vec![0xff, u8::try_from(seq).unwrap_or(0), b'\n'];
            spool
                .append(&Chunk {
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

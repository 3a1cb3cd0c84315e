//! Output waiting for the coordinator's acknowledgement, on disk: one
//! append-only file per attempt, so a coordinator that is unreachable for
//! a long time costs disk, not memory, and nothing is lost.
//!
//! Record: seq (u64, big-endian), kind (u8), length (u32, big-endian), data.
//! A file is removed when the coordinator acknowledges the attempt's result
//! or tells the agent to cancel it; files left by an earlier run of the
//! agent belong to attempts it no longer runs and are removed at start.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::ids::{Attempt, TaskId};
use common::types::OutputKind;

use crate::session::Chunk;

#[derive(Debug, thiserror::Error)]
#[error("output spool {}: {source}", path.display())]
pub struct Error {
    path: PathBuf,
    source: std::io::Error,
}

pub struct Spool {
    dir: PathBuf,
    open: HashMap<(TaskId, Attempt), File>,
}

impl Spool {
    /// Opens the spool directory, removing what an earlier run left.
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        let dir = data_dir.join("spool");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| Error {
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            dir,
            open: HashMap::new(),
        })
    }

    fn path(&self, task: TaskId, attempt: Attempt) -> PathBuf {
        self.dir.join(format!("{task}-a{}.spool", attempt.0))
    }

    pub fn append(&mut self, chunk: &Chunk) -> Result<(), Error> {
        let path = self.path(chunk.task, chunk.attempt);
        let err = |source| Error {
            path: path.clone(),
            source,
        };
        let file = match self.open.entry((chunk.task, chunk.attempt)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(err)?,
            ),
        };
        let len = u32::try_from(chunk.data.len()).unwrap_or(u32::MAX);
        let mut record = Vec::with_capacity(13 + chunk.data.len());
        record.extend_from_slice(&chunk.seq.to_be_bytes());
        record.push(chunk.kind.to_byte());
        record.extend_from_slice(&len.to_be_bytes());
        record.extend_from_slice(&chunk.data);
        file.write_all(&record).map_err(|source| Error {
            path: path.clone(),
            source,
        })
    }

    /// The chunks of an attempt with a seq above `after`, in order.
    pub fn read_after(
        &self,
        task: TaskId,
        attempt: Attempt,
        after: u64,
    ) -> Result<Vec<Chunk>, Error> {
        let path = self.path(task, attempt);
        let err = |source| Error {
            path: path.clone(),
            source,
        };
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(err(e)),
        };
        let mut reader = BufReader::new(file);
        let mut chunks = Vec::new();
        let mut header = [0u8; 13];
        loop {
            match reader.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(err(e)),
            }
            let seq = u64::from_be_bytes(header[..8].try_into().unwrap_or([0; 8]));
            let kind = OutputKind::from_byte(header[8]).unwrap_or(OutputKind::Stdout);
            let len = u32::from_be_bytes(header[9..].try_into().unwrap_or([0; 4]));
            let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
            if reader.read_exact(&mut data).is_err() {
                break; // A torn last record: it was never sent either.
            }
            if seq > after {
                chunks.push(Chunk {
                    task,
                    attempt,
                    seq,
                    kind,
                    data: Arc::from(data),
                });
            }
        }
        Ok(chunks)
    }

    pub fn remove(&mut self, task: TaskId, attempt: Attempt) {
        self.open.remove(&(task, attempt));
        let _ = std::fs::remove_file(self.path(task, attempt));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_come_back_in_order_from_the_ack_on() {
        let dir = std::env::temp_dir().join(format!("ccc-spool-{}", std::process::id()));
        let mut spool = Spool::open(&dir).expect("open");
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
        let back = spool.read_after(TaskId(1), Attempt(2), 3).expect("read");
        assert_eq!(back.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(&*back[0].data, &[0xff, 4, b'\n']);
        assert_eq!(back[0].kind, OutputKind::Stderr);
        spool.remove(TaskId(1), Attempt(2));
        assert!(
            spool
                .read_after(TaskId(1), Attempt(2), 0)
                .expect("read")
                .is_empty()
        );
        let again = Spool::open(&dir).expect("reopen");
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

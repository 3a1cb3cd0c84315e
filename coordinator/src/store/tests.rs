use common::ids::AgentId;
use common::time::UnixMillis;

use super::*;
use crate::core::AgentState;

fn record(name: &str, connections: u64) -> AgentRecord {
    AgentRecord {
        id: AgentId::new(name).expect("name"),
        state: AgentState::Connected,
        advert: None,
        first_seen: UnixMillis(1),
        last_seen: UnixMillis(2),
        connections,
        peer_address: "127.0.0.1:9".into(),
        last_disconnect_reason: None,
        revoked_reason: None,
        unhealthy: None,
        drain_reason: None,
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ccc-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn committed_records_survive_reopening() {
    let dir = temp_dir("reopen");
    {
        let store = SledStore::open(&dir).expect("open");
        store
            .commit(&[
                Write::Agent(Box::new(record("a", 1))),
                Write::Agent(Box::new(record("b", 1))),
            ])
            .expect("commit");
        store
            .commit(&[Write::Agent(Box::new(record("a", 2)))])
            .expect("commit");
    }
    let store = SledStore::open(&dir).expect("reopen");
    let loaded = store.load_agents().expect("load");
    assert_eq!(loaded, vec![record("a", 2), record("b", 1)]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_newer_schema_is_refused_and_corrupt_rows_are_named() {
    let dir = temp_dir("schema");
    {
        let store = SledStore::open(&dir).expect("open");
        store
            .db
            .open_tree("meta")
            .expect("meta")
            .insert(b"schema_version", &99u32.to_be_bytes())
            .expect("insert");
        flush(&store.db).expect("flush");
    }
    let err = SledStore::open(&dir).err().expect("refused");
    assert!(err.to_string().contains("schema version 99"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);

    let dir = temp_dir("corrupt");
    let store = SledStore::open(&dir).expect("open");
    store.agents.insert(b"x", b"\x01{not json").expect("insert");
    let err = store.load_agents().expect_err("corrupt");
    assert!(err.to_string().contains("\"x\""), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_output_budget_counts_the_attempts_since_the_last_retry() {
    let chunk = |attempt: u32, seq: u64, kind: OutputKind, data: &[u8]| Write::Output {
        task: TaskId(1),
        attempt: Attempt(attempt),
        seq,
        kind,
        data: Arc::from(data),
    };
    let store = SledStore::temporary().expect("store");
    store
        .commit(&[
            chunk(1, 1, OutputKind::Stdout, b"0123456789"),
            chunk(1, 2, OutputKind::System, TRUNCATION_MARKER),
            chunk(2, 1, OutputKind::Stdout, b"fresh"),
        ])
        .expect("commit");
    let all = store
        .output_position(TaskId(1), Attempt(0), Attempt(2))
        .expect("position");
    assert_eq!((all.last_seq, all.truncated), (1, true));
    let since_retry = store
        .output_position(TaskId(1), Attempt(2), Attempt(2))
        .expect("position");
    assert_eq!(
        since_retry,
        OutputPosition {
            last_seq: 1,
            stored_bytes: 5,
            truncated: false
        }
    );
}

/// A regression check for the use-after-free in sled's flush path (see the
/// module docs): one thread commits and flushes over and over while others
/// write and read the same trees. It passes whatever the timing; it exists
/// so that a run under a sanitizer or a debug allocator catches the bug if
/// the guard in `flush` is ever removed.
#[test]
fn flushes_race_concurrent_writers_and_readers_safely() {
    const ROUNDS: u64 = 3_000;
    let dir = temp_dir("flush-race");
    let store = Arc::new(SledStore::open(&dir).expect("open"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut others = Vec::new();
    for thread in 0..3u64 {
        let store = Arc::clone(&store);
        let stop = Arc::clone(&stop);
        others.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = ((thread << 32) | (n % 512)).to_be_bytes();
                if thread == 0 {
                    let _ = store.output.get(key).expect("read");
                } else {
                    // Large values roll sled's IO buffers often.
                    store
                        .output
                        .insert(key, vec![n as u8; 9_000])
                        .expect("write");
                }
                n += 1;
            }
        }));
    }
    for round in 0..ROUNDS {
        store
            .commit(&[Write::Agent(Box::new(record("flusher", round)))])
            .expect("commit");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in others {
        t.join().expect("a writer or reader panicked");
    }
    let agents = store.load_agents().expect("load");
    assert_eq!(agents, vec![record("flusher", ROUNDS - 1)]);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_opener_is_told_the_store_is_in_use() {
    let dir = temp_dir("locked");
    let _first = SledStore::open(&dir).expect("open");
    let err = SledStore::open(&dir).err().expect("the second open fails");
    assert!(err.is_locked(), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("another coordinator is already using {}", dir.display())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn forgotten_agents_and_admin_revocations_survive_reopening() {
    let dir = temp_dir("forget-admins");
    let alice = AdminRecord {
        name: "alice".into(),
        revoked: true,
        reason: "stolen".into(),
        revoked_at: Some(UnixMillis(5)),
    };
    {
        let store = SledStore::open(&dir).expect("open");
        store
            .commit(&[
                Write::Agent(Box::new(record("a", 1))),
                Write::Agent(Box::new(record("b", 1))),
                Write::Admin(Box::new(alice.clone())),
            ])
            .expect("commit");
        store
            .commit(&[Write::ForgetAgent(AgentId::new("a").expect("name"))])
            .expect("commit");
    }
    let store = SledStore::open(&dir).expect("reopen");
    assert_eq!(store.load_agents().expect("agents"), vec![record("b", 1)]);
    assert_eq!(store.load_admins().expect("admins"), vec![alice]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[allow(clippy::disallowed_methods)] // the origin of the core's simulated time
fn old_output_of_ended_tasks_is_deleted_a_step_at_a_time() {
    use crate::core::{Core, NewTask, Restored, TaskSource, TaskState};
    use common::types::Specialty;

    let mut core = Core::new(
        crate::core::tests::config(),
        Restored::default(),
        std::time::Instant::now(),
        UnixMillis(1),
    );
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let id = core.submit(
            NewTask {
                source: TaskSource::Manual {
                    submitted_by: "root".into(),
                },
                spec: crate::core::task_tests::spec("r", Specialty::Backend),
                priority: 0,
                triage: None,
                needs_info: false,
            },
            std::time::Instant::now(),
            UnixMillis(1),
        );
        tasks.push(core.task(id).expect("task").clone());
    }
    // Ended long ago, ended lately, and not ended.
    let (ended_long_ago, ended_lately, running) = (tasks[0].id, tasks[1].id, tasks[2].id);
    tasks[0].state = TaskState::Succeeded;
    tasks[0].updated_at = UnixMillis(1_000);
    tasks[1].state = TaskState::Failed;
    tasks[1].updated_at = UnixMillis(9_000);
    tasks[2].state = TaskState::Running;
    tasks[2].updated_at = UnixMillis(1_000);
    let chunk = |task: TaskId| Write::Output {
        task,
        attempt: Attempt(1),
        seq: 1,
        kind: OutputKind::Stdout,
        data: Arc::from(&b"some output"[..]),
    };
    let store = SledStore::temporary().expect("store");
    let mut writes: Vec<Write> = tasks
        .into_iter()
        .map(|t| Write::Task(Box::new(t)))
        .collect();
    writes.extend([chunk(ended_long_ago), chunk(ended_lately), chunk(running)]);
    store.commit(&writes).expect("commit");

    let cutoff = UnixMillis(5_000);
    let (cursor, pruned) = store.prune_output(cutoff, None, 2).expect("prune");
    assert_eq!(
        (cursor, pruned),
        (Some(ended_lately), 1),
        "two tasks looked at"
    );
    let (cursor, pruned) = store.prune_output(cutoff, cursor, 2).expect("prune");
    assert_eq!((cursor, pruned), (None, 0), "the round is over");
    let left = |task| {
        store
            .read_output(task, (Attempt(0), 0), 10)
            .expect("read")
            .len()
    };
    assert_eq!(left(ended_long_ago), 0, "deleted");
    assert_eq!(left(ended_lately), 1, "ended within the retention");
    assert_eq!(left(running), 1, "not ended");
    assert_eq!(
        store
            .load_task(ended_long_ago)
            .expect("load")
            .map(|t| t.state),
        Some(TaskState::Succeeded),
        "the task itself is kept"
    );
}

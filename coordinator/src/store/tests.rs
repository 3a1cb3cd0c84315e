use common::ids::AgentId;
use common::protocol::OutputChunk;
use common::time::UnixMillis;
use common::types::Specialty;
use proptest::prelude::*;

use super::*;
use crate::core::{AgentState, TaskState};

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

/// Both stores, empty: a temporary sled store and the model in memory,
/// each with its name for assertion messages.
fn both_stores() -> [(&'static str, Box<dyn Store>); 2] {
    [
        (
            "sled",
            Box::new(SledStore::temporary().expect("a temporary store opens")),
        ),
        ("memory", Box::new(MemoryStore::new())),
    ]
}

/// `n` tasks as the core makes them, numbered from 1.
#[allow(clippy::disallowed_methods)] // the origin of the core's simulated time
fn new_tasks(n: usize) -> Vec<Task> {
    use crate::core::task_tests::{manual, spec};
    use crate::core::{Core, Restored};

    let now = std::time::Instant::now();
    let mut core = Core::new(
        crate::core::tests::config(),
        Restored::default(),
        now,
        UnixMillis(1),
    );
    (0..n)
        .map(|_| {
            let id = core.submit(manual(spec("r", Specialty::Backend)), now, UnixMillis(1));
            core.task(id).expect("task").clone()
        })
        .collect()
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
    store
        .tables
        .agents
        .insert(b"x", b"\x01{not json")
        .expect("insert");
    let err = store.load_agents().expect_err("corrupt");
    assert!(err.to_string().contains("\"x\""), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_output_budget_counts_the_attempts_since_the_last_retry() {
    let chunk = |attempt: u32, seq: u64, kind: OutputKind, data: &[u8]| {
        Write::Output(OutputChunk {
            task: TaskId(1),
            attempt: Attempt(attempt),
            seq,
            kind,
            data: Arc::from(data),
        })
    };
    for (name, store) in both_stores() {
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
        assert_eq!((all.last_seq, all.truncated), (1, true), "{name}");
        let since_retry = store
            .output_position(TaskId(1), Attempt(2), Attempt(2))
            .expect("position");
        assert_eq!(
            since_retry,
            OutputPosition {
                last_seq: 1,
                stored_bytes: 5,
                truncated: false
            },
            "{name}"
        );
    }
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
                    let _ = store.tables.output.get(key).expect("read");
                } else {
                    // Large values roll sled's IO buffers often.
                    store
                        .tables
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
fn the_latest_write_of_a_row_wins_and_deletes_delete() {
    let alice = AdminRecord {
        name: "alice".into(),
        revoked: true,
        reason: "stolen".into(),
        revoked_at: Some(UnixMillis(5)),
    };
    for (name, store) in both_stores() {
        store
            .commit(&[
                Write::Agent(Box::new(record("a", 1))),
                Write::Agent(Box::new(record("b", 1))),
                Write::Agent(Box::new(record("a", 2))),
                Write::Admin(Box::new(alice.clone())),
                Write::Delivery {
                    id: "d1".into(),
                    at: UnixMillis(7),
                },
                Write::Delivery {
                    id: "d2".into(),
                    at: UnixMillis(8),
                },
            ])
            .expect("commit");
        store
            .commit(&[
                Write::ForgetAgent(AgentId::new("b").expect("name")),
                Write::ForgetDelivery("d1".into()),
            ])
            .expect("commit");
        assert_eq!(
            store.load_agents().expect("agents"),
            vec![record("a", 2)],
            "{name}"
        );
        assert_eq!(
            store.load_admins().expect("admins"),
            vec![alice.clone()],
            "{name}"
        );
        assert_eq!(
            store.load_deliveries().expect("deliveries"),
            vec![("d2".to_owned(), UnixMillis(8))],
            "{name}"
        );
    }
}

#[test]
fn old_output_of_ended_tasks_is_deleted_a_step_at_a_time() {
    for (name, store) in both_stores() {
        prunes_step_by_step(name, store.as_ref());
    }
}

fn prunes_step_by_step(name: &str, store: &dyn Store) {
    let mut tasks = new_tasks(3);
    // Ended long ago, ended lately, and not ended.
    let (ended_long_ago, ended_lately, running) = (tasks[0].id, tasks[1].id, tasks[2].id);
    tasks[0].state = TaskState::Succeeded;
    tasks[0].updated_at = UnixMillis(1_000);
    tasks[1].state = TaskState::Failed;
    tasks[1].updated_at = UnixMillis(9_000);
    tasks[2].state = TaskState::Running;
    tasks[2].updated_at = UnixMillis(1_000);
    let chunk = |task: TaskId| {
        Write::Output(OutputChunk {
            task,
            attempt: Attempt(1),
            seq: 1,
            kind: OutputKind::Stdout,
            data: Arc::from(&b"some output"[..]),
        })
    };
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
        "{name}: two tasks looked at"
    );
    let (cursor, pruned) = store.prune_output(cutoff, cursor, 2).expect("prune");
    assert_eq!((cursor, pruned), (None, 0), "{name}: the round is over");
    let left = |task| {
        store
            .read_output(task, (Attempt(0), 0), 10)
            .expect("read")
            .len()
    };
    assert_eq!(left(ended_long_ago), 0, "{name}: deleted");
    assert_eq!(left(ended_lately), 1, "{name}: ended within the retention");
    assert_eq!(left(running), 1, "{name}: not ended");
    assert_eq!(
        store
            .load_task(ended_long_ago)
            .expect("load")
            .map(|t| t.state),
        Some(TaskState::Succeeded),
        "{name}: the task itself is kept"
    );
}

// ---- the model is faithful ----

const TASKS: u64 = 4;

/// One write of a random history, in small numbers so rows meet again.
#[derive(Clone, Debug)]
enum Change {
    Task {
        id: u64,
        terminal: bool,
        updated_at: u64,
        output_since: u32,
    },
    Agent {
        name: u8,
        connections: u64,
    },
    ForgetAgent(u8),
    Admin {
        name: u8,
        revoked: bool,
    },
    Delivery {
        id: u8,
        at: u64,
    },
    ForgetDelivery(u8),
    Outbox {
        task: u64,
        pull: bool,
        version: u64,
    },
    OutboxDone {
        task: u64,
        pull: bool,
    },
    Output {
        task: u64,
        attempt: u32,
        seq: u64,
        kind: usize,
        len: usize,
    },
}

#[derive(Clone, Debug)]
enum Op {
    Commit(Vec<Change>),
    Prune {
        ended_before: u64,
        after: Option<u64>,
        limit: usize,
    },
}

const KINDS: [OutputKind; 4] = [
    OutputKind::Stdout,
    OutputKind::Stderr,
    OutputKind::Event,
    OutputKind::System,
];

fn change() -> impl Strategy<Value = Change> {
    // Task ids from 0 to TASKS: 0 is never a task the core made.
    let task = || 0..=TASKS;
    prop_oneof![
        3 => (1..=TASKS, any::<bool>(), 0..10u64, 0..3u32).prop_map(
            |(id, terminal, updated_at, output_since)| Change::Task { id, terminal, updated_at, output_since }
        ),
        2 => (0..3u8, 0..3u64).prop_map(|(name, connections)| Change::Agent { name, connections }),
        1 => (0..3u8).prop_map(Change::ForgetAgent),
        1 => (0..2u8, any::<bool>()).prop_map(|(name, revoked)| Change::Admin { name, revoked }),
        1 => (0..3u8, 0..5u64).prop_map(|(id, at)| Change::Delivery { id, at }),
        1 => (0..3u8).prop_map(Change::ForgetDelivery),
        1 => (task(), any::<bool>(), 0..3u64)
            .prop_map(|(task, pull, version)| Change::Outbox { task, pull, version }),
        1 => (task(), any::<bool>()).prop_map(|(task, pull)| Change::OutboxDone { task, pull }),
        6 => (task(), 0..3u32, 0..5u64, 0..KINDS.len(), 0..12usize).prop_map(
            |(task, attempt, seq, kind, len)| Change::Output { task, attempt, seq, kind, len }
        ),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop::collection::vec(change(), 0..8).prop_map(Op::Commit),
        1 => (0..12u64, prop::option::of(0..=TASKS), 0..4usize).prop_map(
            |(ended_before, after, limit)| Op::Prune { ended_before, after, limit }
        ),
    ]
}

fn effect(pull: bool) -> Effect {
    if pull {
        Effect::PullRequest
    } else {
        Effect::StatusComment
    }
}

fn write(change: Change, tasks: &[Task]) -> Write {
    match change {
        Change::Task {
            id,
            terminal,
            updated_at,
            output_since,
        } => {
            let mut task = tasks[usize::try_from(id - 1).expect("a few tasks")].clone();
            task.state = if terminal {
                TaskState::Succeeded
            } else {
                TaskState::Queued
            };
            task.updated_at = UnixMillis(updated_at);
            task.output_since = Attempt(output_since);
            Write::Task(Box::new(task))
        }
        Change::Agent { name, connections } => {
            Write::Agent(Box::new(record(&format!("a{name}"), connections)))
        }
        Change::ForgetAgent(name) => {
            Write::ForgetAgent(AgentId::new(format!("a{name}")).expect("name"))
        }
        Change::Admin { name, revoked } => Write::Admin(Box::new(AdminRecord {
            name: format!("admin{name}"),
            revoked,
            reason: "r".into(),
            revoked_at: revoked.then_some(UnixMillis(3)),
        })),
        Change::Delivery { id, at } => Write::Delivery {
            id: format!("d{id}"),
            at: UnixMillis(at),
        },
        Change::ForgetDelivery(id) => Write::ForgetDelivery(format!("d{id}")),
        Change::Outbox {
            task,
            pull,
            version,
        } => Write::Outbox(Box::new(OutboxEntry {
            task: TaskId(task),
            effect: effect(pull),
            version,
            tries: 0,
            not_before: None,
            last_error: None,
        })),
        Change::OutboxDone { task, pull } => Write::OutboxDone(TaskId(task), effect(pull)),
        Change::Output {
            task,
            attempt,
            seq,
            kind,
            len,
        } => {
            let data = if KINDS[kind] == OutputKind::System && len % 2 == 0 {
                TRUNCATION_MARKER.to_vec()
            } else {
                vec![b'x'; len]
            };
            Write::Output(OutputChunk {
                task: TaskId(task),
                attempt: Attempt(attempt),
                seq,
                kind: KINDS[kind],
                data: Arc::from(data),
            })
        }
    }
}

/// Everything a store answers, read through every method but the ones
/// that write.
#[derive(Debug, PartialEq)]
struct Answers {
    agents: Vec<AgentRecord>,
    tasks: Vec<Task>,
    each_task: Vec<Option<Task>>,
    scanned: Vec<Task>,
    admins: Vec<AdminRecord>,
    deliveries: Vec<(String, UnixMillis)>,
    outbox: Vec<OutboxEntry>,
    positions: Vec<OutputPosition>,
    pages: Vec<Vec<StoredChunk>>,
}

fn answers(store: &dyn Store) -> Answers {
    let ids = || (0..=TASKS + 1).map(TaskId);
    let attempts = || (0..4).map(Attempt);
    let mut scanned = Vec::new();
    store.scan_tasks(&mut |t| scanned.push(t)).expect("scan");
    let mut positions = Vec::new();
    let mut pages = Vec::new();
    for task in ids() {
        for since in attempts() {
            for attempt in attempts() {
                positions.push(
                    store
                        .output_position(task, since, attempt)
                        .expect("position"),
                );
            }
            for seq in [0, 2, 4, u64::MAX] {
                for limit in [2, usize::MAX] {
                    pages.push(
                        store
                            .read_output(task, (since, seq), limit)
                            .expect("output"),
                    );
                }
            }
        }
    }
    Answers {
        agents: store.load_agents().expect("agents"),
        tasks: store.load_tasks().expect("tasks"),
        each_task: ids().map(|id| store.load_task(id).expect("task")).collect(),
        scanned,
        admins: store.load_admins().expect("admins"),
        deliveries: store.load_deliveries().expect("deliveries"),
        outbox: store.load_outbox().expect("outbox"),
        positions,
        pages,
    }
}

proptest! {
    // Failures are not persisted: a failing case prints its minimal input.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(64) })]

    /// The memory store is a faithful model of the sled store: the same
    /// history of commits and prunes gives the same answer to every read.
    #[test]
    fn the_memory_store_answers_as_sled_does(ops in prop::collection::vec(op(), 1..16)) {
        let tasks = new_tasks(usize::try_from(TASKS).expect("a few tasks"));
        let sled = SledStore::temporary().expect("a temporary store opens");
        let memory = MemoryStore::new();
        for op in ops {
            match op {
                Op::Commit(changes) => {
                    let writes: Vec<Write> =
                        changes.into_iter().map(|c| write(c, &tasks)).collect();
                    sled.commit(&writes).expect("sled commits");
                    memory.commit(&writes).expect("memory commits");
                }
                Op::Prune { ended_before, after, limit } => {
                    let (ended_before, after) = (UnixMillis(ended_before), after.map(TaskId));
                    prop_assert_eq!(
                        sled.prune_output(ended_before, after, limit).expect("sled prunes"),
                        memory.prune_output(ended_before, after, limit).expect("memory prunes")
                    );
                }
            }
            prop_assert_eq!(answers(&sled), answers(&memory));
        }
    }
}

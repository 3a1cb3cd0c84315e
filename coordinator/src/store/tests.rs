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
        store.db.flush().expect("flush");
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

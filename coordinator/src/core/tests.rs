//! Scripted event sequences through the core, and a property test over random
//! ones. No tokio, no sleeps: time is an argument.

#![allow(clippy::disallowed_methods)] // one real Instant as the origin of simulated time

use std::time::{Duration, Instant};

use common::ids::AgentId;
use common::time::UnixMillis;
use common::types::{AgentAdvert, Specialty};
use proptest::prelude::*;

use super::*;

pub(crate) fn config() -> CoreConfig {
    CoreConfig {
        heartbeat_interval: Duration::from_secs(5),
        heartbeat_timeout: Duration::from_secs(15),
        hello_timeout: Duration::from_secs(10),
        lease_timeout: Duration::from_secs(600),
        accept_timeout: Duration::from_secs(30),
        task_deadline: Duration::from_secs(3600),
        max_attempts: 3,
        retry_backoff_initial: Duration::from_secs(10),
        retry_backoff_max: Duration::from_secs(300),
        general_fallback_after: Duration::from_secs(120),
        output_cap_bytes: 1000,
        rate_limit_cooldown: Duration::from_secs(30),
        rate_limit_cooldown_max: Duration::from_secs(3600),
        delivery_window: Duration::from_secs(3600),
    }
}

fn advert() -> AgentAdvert {
    AgentAdvert {
        agent_version: "0.0.0".into(),
        specialties: vec![Specialty::Backend],
        capacity: 2,
        labels: Default::default(),
        toolchains: vec![],
        hostname: "pc".into(),
        instance_id: "i-1".into(),
    }
}

fn id(name: &str) -> AgentId {
    AgentId::new(name).expect("valid name")
}

fn hello() -> FromAgent {
    FromAgent::Hello {
        advert: advert(),
        running: vec![],
        unhealthy: None,
    }
}

struct Harness {
    core: Core,
    t0: Instant,
}

impl Harness {
    fn new() -> Self {
        let t0 = Instant::now();
        Self {
            core: Core::new(config(), Restored::default(), t0, UnixMillis(1_000_000)),
            t0,
        }
    }

    fn at(&self, secs: u64) -> (Instant, UnixMillis) {
        (
            self.t0 + Duration::from_secs(secs),
            UnixMillis(1_000_000 + secs * 1000),
        )
    }

    fn connect(&mut self, conn: u64, name: &str, secs: u64) {
        let (now, wall) = self.at(secs);
        self.core
            .handle_open(ConnId(conn), id(name), "127.0.0.1:1".into(), now)
            .expect("open accepted");
        self.core.handle_message(ConnId(conn), hello(), now, wall);
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.core.poll_action()).collect()
    }

    fn state(&self, name: &str) -> AgentState {
        self.core
            .agent(&id(name))
            .expect("known agent")
            .record
            .state
    }
}

#[test]
fn hello_is_welcomed_and_persisted() {
    let mut h = Harness::new();
    h.connect(1, "pc-01", 0);
    assert_eq!(
        h.actions(),
        vec![Action::Send {
            conn: ConnId(1),
            msg: ToAgent::Welcome {
                agent_id: id("pc-01"),
                heartbeat_interval: Duration::from_secs(5),
                heartbeat_timeout: Duration::from_secs(15),
                lease_timeout: Duration::from_secs(600),
                held: vec![],
            }
        }]
    );
    let writes = h.core.take_writes();
    let [Write::Agent(record)] = writes.as_slice() else {
        panic!("one agent write expected, got {writes:?}");
    };
    assert_eq!(record.state, AgentState::Connected);
    assert_eq!(record.connections, 1);
    assert_eq!(h.core.agent(&id("pc-01")).map(|v| v.free_slots), Some(2));
}

#[test]
fn anything_before_hello_closes_the_stream() {
    let mut h = Harness::new();
    let (now, wall) = h.at(0);
    h.core
        .handle_open(ConnId(1), id("a"), String::new(), now)
        .expect("open");
    h.core.handle_message(
        ConnId(1),
        FromAgent::Heartbeat {
            free_slots: 1,
            running: vec![],
            unhealthy: None,
        },
        now,
        wall,
    );
    assert!(matches!(
        h.actions().as_slice(),
        [Action::Close {
            conn: ConnId(1),
            reason: CloseReason::Protocol(_)
        }]
    ));
    assert!(h.core.agent(&id("a")).is_none(), "never introduced itself");
}

#[test]
fn a_second_stream_replaces_the_first() {
    let mut h = Harness::new();
    h.connect(1, "a", 0);
    h.actions();
    h.connect(2, "a", 1);
    let actions = h.actions();
    assert!(actions.contains(&Action::Close {
        conn: ConnId(1),
        reason: CloseReason::Replaced
    }));
    // The old stream's end does not disconnect the agent.
    let (now, wall) = h.at(2);
    h.core.handle_closed(ConnId(1), "gone".into(), now, wall);
    assert_eq!(h.state("a"), AgentState::Connected);
    assert_eq!(
        h.core.agent(&id("a")).map(|v| v.record.connections),
        Some(2)
    );
    // A late message on the old stream is dropped.
    h.core.take_writes();
    h.core.handle_message(
        ConnId(1),
        FromAgent::Draining { reason: "x".into() },
        now,
        wall,
    );
    assert_eq!(h.state("a"), AgentState::Connected);
    assert!(h.core.take_writes().is_empty());
}

#[test]
fn silence_closes_the_stream_and_heartbeats_are_sent_meanwhile() {
    let mut h = Harness::new();
    h.connect(1, "a", 0);
    h.actions();
    let (now, wall) = h.at(5);
    assert_eq!(h.core.poll_timeout(), Some(now));
    h.core.handle_timeout(now, wall);
    assert_eq!(
        h.actions(),
        vec![Action::Send {
            conn: ConnId(1),
            msg: ToAgent::Heartbeat { now: wall }
        }]
    );
    let (now, wall) = h.at(15);
    h.core.handle_timeout(now, wall);
    assert!(h.actions().contains(&Action::Close {
        conn: ConnId(1),
        reason: CloseReason::HeartbeatTimeout
    }));
    assert_eq!(h.state("a"), AgentState::Disconnected);
    assert_eq!(h.core.poll_timeout(), None);
}

#[test]
fn heartbeats_due_close_together_go_out_together() {
    let mut h = Harness::new();
    h.connect(1, "a", 0);
    h.connect(2, "b", 1);
    h.connect(3, "c", 2);
    h.actions();
    let (now, wall) = h.at(5);
    assert_eq!(h.core.poll_timeout(), Some(now));
    h.core.handle_timeout(now, wall);
    let beat = |conn| Action::Send {
        conn: ConnId(conn),
        msg: ToAgent::Heartbeat { now: wall },
    };
    // A quarter of the 5 s interval: b (due at 6 s) comes along, c (7 s)
    // does not; from then on a and b share their deadline.
    assert_eq!(h.actions(), vec![beat(1), beat(2)]);
    assert_eq!(h.core.poll_timeout(), h.at(7).0.into());
    let (now, wall) = h.at(7);
    h.core.handle_timeout(now, wall);
    assert_eq!(h.core.poll_timeout(), h.at(10).0.into());
}

#[test]
fn heartbeats_keep_the_stream_alive() {
    let mut h = Harness::new();
    h.connect(1, "a", 0);
    for secs in (4..60).step_by(4) {
        let (now, wall) = h.at(secs);
        h.core.handle_message(
            ConnId(1),
            FromAgent::Heartbeat {
                free_slots: 1,
                running: vec![],
                unhealthy: None,
            },
            now,
            wall,
        );
        h.core.handle_timeout(now, wall);
    }
    assert_eq!(h.state("a"), AgentState::Connected);
    assert_eq!(h.core.agent(&id("a")).map(|v| v.free_slots), Some(2));
}

#[test]
fn a_stream_without_hello_times_out() {
    let mut h = Harness::new();
    let (now, _) = h.at(0);
    h.core
        .handle_open(ConnId(1), id("a"), String::new(), now)
        .expect("open");
    let (now, wall) = h.at(10);
    assert_eq!(h.core.poll_timeout(), Some(now));
    h.core.handle_timeout(now, wall);
    assert_eq!(
        h.actions(),
        vec![Action::Close {
            conn: ConnId(1),
            reason: CloseReason::HelloTimeout
        }]
    );
}

#[test]
fn revoked_agents_are_cut_off_and_refused() {
    let mut h = Harness::new();
    h.connect(1, "a", 0);
    h.actions();
    let (now, wall) = h.at(1);
    let view = h
        .core
        .revoke(&id("a"), "stolen".into(), now, wall)
        .expect("known");
    assert_eq!(view.record.state, AgentState::Revoked);
    assert_eq!(
        h.actions(),
        vec![Action::Close {
            conn: ConnId(1),
            reason: CloseReason::Revoked("stolen".into())
        }]
    );
    // The stream's end keeps the state revoked.
    h.core.handle_closed(ConnId(1), "closed".into(), now, wall);
    assert_eq!(h.state("a"), AgentState::Revoked);
    assert_eq!(
        h.core.handle_open(ConnId(2), id("a"), String::new(), now),
        Err(OpenRejected::Revoked {
            agent: id("a"),
            reason: "stolen".into()
        })
    );
}

#[test]
fn an_agent_never_seen_can_be_revoked_before_it_connects() {
    let mut h = Harness::new();
    let (now, wall) = h.at(1);
    let view = h
        .core
        .revoke(&id("leaked"), "key leaked".into(), now, wall)
        .expect("a name never seen is revoked too");
    assert_eq!(view.record.state, AgentState::Revoked);
    assert_eq!(view.record.connections, 0);
    assert!(
        h.core
            .take_writes()
            .iter()
            .any(|w| matches!(w, Write::Agent(r) if r.id == id("leaked") && r.state == AgentState::Revoked)),
        "the revocation is durable"
    );
    assert_eq!(
        h.core
            .handle_open(ConnId(1), id("leaked"), String::new(), now),
        Err(OpenRejected::Revoked {
            agent: id("leaked"),
            reason: "key leaked".into()
        })
    );
}

#[test]
fn drain_reaches_a_connected_agent_only() {
    let mut h = Harness::new();
    h.connect(1, "a", 0);
    h.actions();
    let (now, wall) = h.at(1);
    h.core
        .drain(&id("a"), "maintenance".into(), wall)
        .expect("drain");
    assert_eq!(
        h.actions(),
        vec![Action::Send {
            conn: ConnId(1),
            msg: ToAgent::Drain {
                reason: "maintenance".into()
            }
        }]
    );
    assert_eq!(h.state("a"), AgentState::Draining);
    h.core.handle_closed(ConnId(1), "bye".into(), now, wall);
    assert_eq!(
        h.core.drain(&id("a"), String::new(), wall).map(|_| ()),
        Err(AdminError::NotConnected(id("a")))
    );
    // Reconnecting starts a fresh session that takes work again.
    h.connect(2, "a", 2);
    assert_eq!(h.state("a"), AgentState::Connected);
}

#[test]
fn a_restarted_core_remembers_agents_as_disconnected() {
    let mut h = Harness::new();
    h.connect(1, "a", 0);
    h.connect(2, "b", 0);
    let (now, wall) = h.at(1);
    h.core
        .revoke(&id("b"), "gone".into(), now, wall)
        .expect("b");
    let records: Vec<AgentRecord> = h.core.agents().into_iter().map(|v| v.record).collect();
    let restored = Restored {
        agents: records,
        ..Restored::default()
    };
    let mut restarted = Core::new(config(), restored, now, wall);
    let states: Vec<(String, AgentState)> = restarted
        .agents()
        .into_iter()
        .map(|v| (v.record.id.to_string(), v.record.state))
        .collect();
    assert_eq!(
        states,
        vec![
            ("a".into(), AgentState::Disconnected),
            ("b".into(), AgentState::Revoked)
        ]
    );
    assert_eq!(restarted.take_writes().len(), 1, "only a changed");
}

#[derive(Clone, Debug)]
enum Step {
    Open(u8, u8),
    Hello(u8),
    Heartbeat(u8),
    Close(u8),
    Advance(u8),
    Revoke(u8),
    Drain(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..6u8, 0..3u8).prop_map(|(c, a)| Step::Open(c, a)),
        (0..6u8).prop_map(Step::Hello),
        (0..6u8).prop_map(Step::Heartbeat),
        (0..6u8).prop_map(Step::Close),
        (1..20u8).prop_map(Step::Advance),
        (0..3u8).prop_map(Step::Revoke),
        (0..3u8).prop_map(Step::Drain),
    ]
}

proptest! {
    /// Whatever happens, an agent has at most one live stream, that stream
    /// maps back to it, nothing is sent to a stream after it was closed, and
    /// a revoked agent stays revoked and disconnected.
    #[test]
    fn stream_invariants_hold(steps in prop::collection::vec(step(), 1..80)) {
        let mut h = Harness::new();
        let mut secs = 0u64;
        let mut conn_seq = 0u64;
        let mut slot_conn = [None::<u64>; 6];
        let mut closed = std::collections::BTreeSet::new();
        let mut revoked = std::collections::BTreeSet::new();
        for step in steps {
            let (now, wall) = h.at(secs);
            match step {
                Step::Open(slot, agent) => {
                    conn_seq += 1;
                    let name = format!("a{agent}");
                    if h.core.handle_open(ConnId(conn_seq), id(&name), String::new(), now).is_ok() {
                        slot_conn[usize::from(slot)] = Some(conn_seq);
                    } else {
                        prop_assert!(revoked.contains(&name));
                    }
                }
                Step::Hello(slot) => if let Some(c) = slot_conn[usize::from(slot)] {
                    h.core.handle_message(ConnId(c), hello(), now, wall);
                }
                Step::Heartbeat(slot) => if let Some(c) = slot_conn[usize::from(slot)] {
                    h.core.handle_message(ConnId(c), FromAgent::Heartbeat { free_slots: 1, running: vec![], unhealthy: None }, now, wall);
                }
                Step::Close(slot) => if let Some(c) = slot_conn[usize::from(slot)].take() {
                    h.core.handle_closed(ConnId(c), "closed".into(), now, wall);
                    closed.insert(c);
                }
                Step::Advance(d) => {
                    secs += u64::from(d);
                    let (now, wall) = h.at(secs);
                    h.core.handle_timeout(now, wall);
                }
                Step::Revoke(a) => {
                    let name = format!("a{a}");
                    if h.core.revoke(&id(&name), "r".into(), now, wall).is_ok() {
                        revoked.insert(name);
                    }
                }
                Step::Drain(a) => { let _ = h.core.drain(&id(&format!("a{a}")), "d".into(), wall); }
            }
            for action in h.actions() {
                match action {
                    Action::Send { conn, .. } => prop_assert!(!closed.contains(&conn.0), "send to closed {conn:?}"),
                    Action::Close { conn, .. } => { closed.insert(conn.0); }
                    Action::Publish(_) => {}
                }
            }
            for view in h.core.agents() {
                let live: Vec<_> = h.core.conn_agent.iter().filter(|(_, a)| **a == view.record.id).collect();
                prop_assert!(live.len() <= 1, "{} has {} live streams", view.record.id, live.len());
                if revoked.contains(view.record.id.as_str()) {
                    prop_assert_eq!(view.record.state, AgentState::Revoked);
                    prop_assert!(live.is_empty());
                }
                let connected = matches!(view.record.state, AgentState::Connected | AgentState::Draining);
                prop_assert_eq!(connected, live.len() == 1, "state {:?} vs live streams", view.record.state);
            }
        }
    }
}

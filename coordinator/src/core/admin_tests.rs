//! Undrain, unrevoke, forget and admin revocations through the core.

#![allow(clippy::disallowed_methods)] // one real Instant as the origin of simulated time

use std::time::{Duration, Instant};

use common::ids::AgentId;
use common::time::UnixMillis;
use common::types::{AgentAdvert, Specialty};

use super::super::tests::config;
use super::super::{
    Action, AdminError, AgentState, CloseReason, ConnId, Core, FromAgent, Restored, Write,
};

fn id(name: &str) -> AgentId {
    AgentId::new(name).expect("valid name")
}

struct H {
    core: Core,
    t0: Instant,
}

impl H {
    fn new() -> Self {
        let t0 = Instant::now();
        Self {
            core: Core::new(config(), Restored::default(), t0, UnixMillis(1_000)),
            t0,
        }
    }

    fn at(&self, secs: u64) -> (Instant, UnixMillis) {
        (
            self.t0 + Duration::from_secs(secs),
            UnixMillis(1_000 + secs * 1000),
        )
    }

    fn connect(&mut self, conn: u64, name: &str) {
        let (now, wall) = self.at(0);
        self.core
            .handle_open(ConnId(conn), id(name), String::new(), now)
            .expect("open");
        let advert = AgentAdvert {
            agent_version: String::new(),
            specialties: vec![Specialty::Backend],
            capacity: 1,
            labels: Default::default(),
            toolchains: vec![],
            hostname: String::new(),
            instance_id: String::new(),
        };
        self.core.handle_message(
            ConnId(conn),
            FromAgent::Hello {
                advert,
                running: vec![],
                unhealthy: None,
            },
            now,
            wall,
        );
        self.drain_outputs();
    }

    fn drain_outputs(&mut self) -> Vec<Action> {
        self.core.take_writes();
        std::iter::from_fn(|| self.core.poll_action()).collect()
    }

    fn state(&self, name: &str) -> Option<AgentState> {
        self.core.agent(&id(name)).map(|v| v.record.state)
    }
}

#[test]
fn undrain_closes_the_drained_stream_so_the_agent_comes_back_fresh() {
    let mut h = H::new();
    h.connect(1, "a");
    let (now, wall) = h.at(1);
    assert_eq!(
        h.core.undrain(&id("a"), now, wall).map(|_| ()),
        Err(AdminError::NotDrained(id("a")))
    );
    h.core.drain(&id("a"), "disk".into(), wall).expect("drain");
    assert_eq!(
        h.core.agent(&id("a")).and_then(|v| v.record.drain_reason),
        Some("disk".into())
    );
    h.drain_outputs();
    let view = h.core.undrain(&id("a"), now, wall).expect("undrain");
    assert_eq!(view.record.drain_reason, None);
    assert_eq!(view.record.state, AgentState::Disconnected);
    assert_eq!(
        h.drain_outputs(),
        vec![Action::Close {
            conn: ConnId(1),
            reason: CloseReason::Undrained
        }]
    );
    h.connect(2, "a");
    assert_eq!(h.state("a"), Some(AgentState::Connected));
}

#[test]
fn an_unrevoked_agent_may_connect_again() {
    let mut h = H::new();
    let (now, wall) = h.at(1);
    assert_eq!(
        h.core.unrevoke(&id("a"), wall).map(|_| ()),
        Err(AdminError::UnknownAgent(id("a")))
    );
    h.core
        .revoke(&id("a"), "leaked".into(), now, wall)
        .expect("revoke");
    assert!(
        h.core
            .handle_open(ConnId(1), id("a"), String::new(), now)
            .is_err()
    );
    let view = h.core.unrevoke(&id("a"), wall).expect("unrevoke");
    assert_eq!(view.record.state, AgentState::Disconnected);
    assert_eq!(view.record.revoked_reason, None);
    assert_eq!(
        h.core.unrevoke(&id("a"), wall).map(|_| ()),
        Err(AdminError::NotRevoked(id("a")))
    );
    h.connect(2, "a");
    assert_eq!(h.state("a"), Some(AgentState::Connected));
}

#[test]
fn forget_is_refused_while_connected_or_revoked_and_deletes_the_record() {
    let mut h = H::new();
    h.connect(1, "a");
    let (now, wall) = h.at(1);
    assert_eq!(h.core.forget(&id("a")), Err(AdminError::Connected(id("a"))));
    h.core.handle_closed(ConnId(1), "bye".into(), now, wall);
    h.core
        .revoke(&id("a"), "x".into(), now, wall)
        .expect("revoke");
    assert_eq!(h.core.forget(&id("a")), Err(AdminError::Revoked(id("a"))));
    h.core.unrevoke(&id("a"), wall).expect("unrevoke");
    h.core.take_writes();
    h.core.forget(&id("a")).expect("forget");
    assert_eq!(h.core.take_writes(), vec![Write::ForgetAgent(id("a"))]);
    assert_eq!(h.state("a"), None);
    assert_eq!(
        h.core.forget(&id("a")),
        Err(AdminError::UnknownAgent(id("a")))
    );
}

#[test]
fn admin_revocations_are_written_and_an_admin_cannot_revoke_itself() {
    let mut h = H::new();
    let (_, wall) = h.at(1);
    assert_eq!(
        h.core.revoke_admin("root", "x".into(), "root", wall),
        Err(AdminError::OwnName("root".into()))
    );
    assert!(matches!(
        h.core.revoke_admin("bad name", "x".into(), "root", wall),
        Err(AdminError::InvalidName(_))
    ));
    let record = h
        .core
        .revoke_admin("alice", "laptop stolen".into(), "root", wall)
        .expect("revoke");
    assert!(record.revoked);
    assert_eq!(
        h.core.take_writes(),
        vec![Write::Admin(Box::new(record.clone()))]
    );
    assert_eq!(
        h.core.revoked_admins().get("alice").map(String::as_str),
        Some("laptop stolen")
    );
    h.core.unrevoke_admin("alice").expect("unrevoke");
    assert!(h.core.revoked_admins().is_empty());
    assert_eq!(h.core.admins().len(), 1, "the record stays, not revoked");
    assert_eq!(
        h.core.unrevoke_admin("alice"),
        Err(AdminError::UnknownAdmin("alice".into()))
    );

    let mut restarted = H::new();
    restarted.core.restore_admins(vec![record]);
    assert!(restarted.core.revoked_admins().contains_key("alice"));
}

//! The core's deadlines, kept in order so that an event costs what is due,
//! not one step per agent or per live attempt.
//!
//! Every deadline the core enforces is filed here under its kind: a stream
//! that has not said Hello yet, a heartbeat to send, a silent stream to
//! close, a cool-down that ends, an assignment not accepted, a lease that
//! runs out. A deadline is filed where the value it comes from changes
//! (Hello, each message heard, a heartbeat sent, a close, a cool-down, an
//! attempt assigned, accepted, renewed or ended), so `poll_timeout` reads
//! the first entry of each kind and `handle_timeout` takes only the entries
//! that are due. The queue keeps its own (retry backoffs, the general
//! fallback). The proptests check the timers against ones rebuilt from the
//! streams and attempts after every event.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::ids::TaskId;

use super::{ConnId, Live};

/// One kind of deadline: who is due when, earliest first.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Deadlines<K>(BTreeSet<(Instant, K)>);

impl<K> Default for Deadlines<K> {
    fn default() -> Self {
        Self(BTreeSet::new())
    }
}

impl<K: Ord + Copy> Deadlines<K> {
    /// Moves `key` from deadline `old` to `new` (`None`: not filed).
    pub(super) fn set(&mut self, key: K, old: Option<Instant>, new: Option<Instant>) {
        if old == new {
            return;
        }
        if let Some(at) = old {
            self.0.remove(&(at, key));
        }
        if let Some(at) = new {
            self.0.insert((at, key));
        }
    }

    /// The earliest deadline.
    fn first(&self) -> Option<Instant> {
        self.0.first().map(|(at, _)| *at)
    }

    /// Takes out the keys due at `now`, earliest first.
    pub(super) fn pop_due(&mut self, now: Instant) -> Vec<K> {
        let mut due = Vec::new();
        while let Some(&(at, key)) = self.0.first() {
            if at > now {
                break;
            }
            self.0.pop_first();
            due.push(key);
        }
        due
    }
}

/// The deadlines of the streams and of the live attempts.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Timers {
    /// Streams that must say Hello by then.
    pub(super) hellos: Deadlines<ConnId>,
    /// Live streams owed a heartbeat then.
    pub(super) heartbeats: Deadlines<ConnId>,
    /// Live streams closed if nothing is heard by then.
    pub(super) silences: Deadlines<ConnId>,
    /// Live streams whose agent's cool-down ends then.
    pub(super) cooldowns: Deadlines<ConnId>,
    /// Assignments that must be accepted by then.
    pub(super) accepts: Deadlines<TaskId>,
    /// Live attempts whose lease runs out then.
    pub(super) leases: Deadlines<TaskId>,
}

impl Timers {
    /// The earliest deadline of any kind.
    pub(super) fn next(&self) -> Option<Instant> {
        [
            self.hellos.first(),
            self.heartbeats.first(),
            self.silences.first(),
            self.cooldowns.first(),
            self.accepts.first(),
            self.leases.first(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Files the deadlines of a live stream (`heartbeat_timeout` after it
    /// was last heard it is silent).
    pub(super) fn file_stream(&mut self, live: &Live, heartbeat_timeout: Duration) {
        self.heartbeats
            .set(live.conn, None, Some(live.next_heartbeat));
        self.silences
            .set(live.conn, None, Some(live.last_heard + heartbeat_timeout));
        self.cooldowns.set(live.conn, None, live.cooldown_until);
    }

    /// Ends an agent's live stream, if it has one: takes it out of `live`
    /// with its deadlines. Every stream that ends goes through here.
    pub(super) fn take_stream(
        &mut self,
        live: &mut Option<Live>,
        heartbeat_timeout: Duration,
    ) -> Option<ConnId> {
        let live = live.take()?;
        self.heartbeats
            .set(live.conn, Some(live.next_heartbeat), None);
        self.silences
            .set(live.conn, Some(live.last_heard + heartbeat_timeout), None);
        self.cooldowns.set(live.conn, live.cooldown_until, None);
        Some(live.conn)
    }
}

#[cfg(test)]
impl super::Core {
    /// The timers as kept, and as rebuilt from the pending streams, the
    /// live streams and the live attempts: the two must be equal.
    pub(super) fn timers_rebuilt(&self) -> (&Timers, Timers) {
        let mut rebuilt = Timers::default();
        for (conn, pending) in &self.pending {
            rebuilt
                .hellos
                .set(*conn, None, Some(pending.hello_deadline));
        }
        for live in self.agents.values().filter_map(|e| e.live.as_ref()) {
            rebuilt.file_stream(live, self.config.heartbeat_timeout);
        }
        for (id, live) in &self.live {
            rebuilt.leases.set(*id, None, Some(live.lease_deadline));
            rebuilt.accepts.set(*id, None, live.accept_deadline);
        }
        (&self.timers, rebuilt)
    }
}

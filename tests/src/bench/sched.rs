//! A scheduling decision in the pure core (`coordinator::core`), with
//! 10,000 queued tasks and 500 agents, time passed in as the core's tests
//! do. Each measured step is one agent reporting its attempt finished: the
//! core ends the attempt and places the next task on the freed slot, which
//! is what a decision costs in the cluster's steady state. The queue is
//! topped up after each step (not timed) so that it stays at 10,000.

use std::time::Duration;

use common::ids::{AgentId, Attempt, TaskId};
use common::time::UnixMillis;
use common::types::{AgentAdvert, FinishedReport, Outcome, Specialty};
use coordinator::core::{
    Action, ConnId, Core, CoreConfig, FromAgent, NewTask, Restored, TaskSource, ToAgent,
};

use super::{Ctx, Figure, Q, Timings, now};

pub fn config() -> CoreConfig {
    CoreConfig {
        heartbeat_interval: Duration::from_secs(5),
        heartbeat_timeout: Duration::from_secs(20),
        hello_timeout: Duration::from_secs(10),
        lease_timeout: Duration::from_secs(600),
        accept_timeout: Duration::from_secs(30),
        task_deadline: Duration::from_secs(3600),
        max_attempts: 3,
        retry_backoff_initial: Duration::from_secs(10),
        retry_backoff_max: Duration::from_secs(600),
        general_fallback_after: Duration::from_secs(600),
        output_cap_bytes: 64 << 20,
        rate_limit_cooldown: Duration::from_secs(60),
        rate_limit_cooldown_max: Duration::from_secs(86_400),
        delivery_window: Duration::from_secs(7 * 86_400),
    }
}

const SPECIALTIES: [Specialty; 4] = [
    Specialty::Backend,
    Specialty::Frontend,
    Specialty::Testing,
    Specialty::Devops,
];

fn task(n: usize) -> NewTask {
    NewTask {
        source: TaskSource::Manual {
            submitted_by: "bench".into(),
        },
        spec: super::spec(
            &format!("https://git.example.com/org/repo-{}.git", n % 50),
            &format!("task {n}"),
            "a change",
            "",
            SPECIALTIES[n % 4],
        ),
        priority: (n % 3) as i32,
        triage: None,
        needs_info: false,
    }
}

pub fn run(ctx: &mut Ctx) {
    let agents = 500;
    let queued = 10_000;
    let steps = ctx.n(20_000, 3_000);
    let mut clock = Clock { t0: now(), ms: 0 };
    let (n0, w0) = clock.tick();
    let mut core = Core::new(config(), Restored::default(), n0, w0);
    for i in 0..agents {
        let (now, wall) = clock.tick();
        let id = AgentId::new(format!("pc-{i:03}")).expect("name");
        core.handle_open(ConnId(i), id, "127.0.0.1:1".into(), now)
            .expect("open");
        let mut specialties = vec![SPECIALTIES[i as usize % 4]];
        if i % 10 == 0 {
            specialties.push(Specialty::General);
        }
        let advert = AgentAdvert {
            agent_version: "bench".into(),
            specialties,
            capacity: 1,
            labels: Default::default(),
            toolchains: vec![],
            hostname: format!("pc-{i}"),
            instance_id: format!("i-{i}"),
        };
        core.handle_message(
            ConnId(i),
            FromAgent::Hello {
                advert,
                running: vec![],
                unhealthy: None,
            },
            now,
            wall,
        );
    }
    let mut next_task = 0;
    for _ in 0..queued + agents as usize {
        let (now, wall) = clock.tick();
        core.submit(task(next_task), now, wall);
        next_task += 1;
    }
    // Every assignment is accepted; (conn, task, attempt) of the live ones.
    let mut live: Vec<(ConnId, TaskId, Attempt)> = Vec::new();
    let accept = |core: &mut Core, live: &mut Vec<_>, clock: &mut Clock| {
        let mut assigned = Vec::new();
        while let Some(a) = core.poll_action() {
            if let Action::Send {
                conn,
                msg: ToAgent::Assign { task, attempt, .. },
            } = a
            {
                assigned.push((conn, task, attempt));
            }
        }
        for (conn, task, attempt) in assigned {
            let (now, wall) = clock.tick();
            core.handle_message(conn, FromAgent::Accepted { task, attempt }, now, wall);
            while core.poll_action().is_some() {}
            live.push((conn, task, attempt));
        }
        core.take_writes();
    };
    accept(&mut core, &mut live, &mut clock);
    let mut times = Vec::with_capacity(steps);
    let mut decisions = 0;
    for _ in 0..steps {
        let (conn, task, attempt) = live.remove(0);
        let (now_, wall) = clock.tick();
        let start = now();
        core.handle_message(
            conn,
            FromAgent::Finished {
                task,
                attempt,
                report: FinishedReport::new(Outcome::Succeeded, "done"),
            },
            now_,
            wall,
        );
        times.push(start.elapsed());
        let before = live.len();
        accept(&mut core, &mut live, &mut clock);
        decisions += live.len() - before;
        let (now_, wall) = clock.tick();
        core.submit(task_n(&mut next_task), now_, wall);
        accept(&mut core, &mut live, &mut clock);
    }
    let t = Timings::new(times);
    let queue = core
        .tasks()
        .filter(|t| t.state == coordinator::core::TaskState::Queued)
        .count();
    ctx.note(format!(
        "scheduling: {steps} steps ({decisions} placements), {queue} tasks queued at the end, \
         p50 {}, max {}",
        Q::time(t.p50()),
        Q::time(t.at(1.0))
    ));
    let limit = Duration::from_micros(50);
    ctx.push(Figure::absolute(
        format!("scheduling decision, {queued} queued, {agents} agents, p99"),
        Q::time(t.p99()),
        format!("<= {}", Q::time(limit)),
        t.p99() <= limit,
    ));
}

/// Simulated time: a millisecond passes at each tick.
struct Clock {
    t0: std::time::Instant,
    ms: u64,
}

impl Clock {
    fn tick(&mut self) -> (std::time::Instant, UnixMillis) {
        self.ms += 1;
        (
            self.t0 + Duration::from_millis(self.ms),
            UnixMillis(1_700_000_000_000 + self.ms),
        )
    }
}

fn task_n(next: &mut usize) -> NewTask {
    *next += 1;
    task(*next - 1)
}

//! The store at scale: a coordinator over 100,000 finished tasks and
//! 1 GiB of stored output (submit latency, memory, the time to be ready
//! after a restart, against a raw sled open and scan of the same files),
//! and the on-disk size after 1,000 tasks with output against the bytes
//! stored.
//!
//! The large store is written with the coordinator's own `SledStore` (its
//! `commit`, as the driver does), from finished tasks shaped as real ones
//! (an attempt with its report, placement and CLI result).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::ids::{AgentId, Attempt, TaskId};
use common::protocol::OutputChunk;
use common::time::UnixMillis;
use common::types::{CliResult, FinishedReport, Outcome, OutputKind, Specialty};
use coordinator::core::{
    AttemptRecord, Core, NewTask, Restored, Task, TaskSource, TaskState, Write,
};
use coordinator::store::{SledStore, Store};

use super::baselines::serial;
use super::coord::{self, Coord, submit_request};
use super::sim::{Behaviour, Fleet};
use super::{Ctx, Figure, Q, now, proc};

/// A finished task shaped as a real one.
fn template() -> Task {
    let t0 = now();
    let mut core = Core::new(
        super::sched_config(),
        Restored::default(),
        t0,
        UnixMillis(1),
    );
    let id = core.submit(
        NewTask {
            source: TaskSource::Manual {
                submitted_by: "root".into(),
            },
            spec: super::spec(
                "https://github.com/bench-org/app.git",
                "Login API returns 500 for an empty password",
                &"POST /api/login answers 500 when the password is empty; it should \
                  answer 400 with a message. Steps to reproduce: ...\n"
                    .repeat(3),
                "",
                Specialty::Backend,
            ),
            priority: 0,
            triage: None,
            needs_info: false,
        },
        t0,
        UnixMillis(1_700_000_000_000),
    );
    let mut task = core.task(id).expect("submitted").clone();
    let mut report = FinishedReport::new(Outcome::Succeeded, "changes committed, tests passed");
    report.branch = "ccc/issue-0-login-api-returns-500".into();
    report.commit = "0123456789abcdef0123456789abcdef01234567".into();
    report.cli = Some(CliResult {
        cost_usd: 0.42,
        turns: 12,
        duration_ms: 184_000,
        session_id: "5f3c2a1e-0000-4000-8000-000000000000".into(),
        result: "Fixed the handler and added a test.".into(),
        ..CliResult::default()
    });
    task.attempts.push(AttemptRecord {
        attempt: Attempt(1),
        agent: AgentId::new("pc-01").expect("name"),
        assigned_at: UnixMillis(1_700_000_001_000),
        accepted_at: Some(UnixMillis(1_700_000_001_050)),
        finished_at: Some(UnixMillis(1_700_000_185_000)),
        outcome: Some(Outcome::Succeeded),
        message: "changes committed, tests passed".into(),
        placement: "specialty backend; idle longest; warm mirror".into(),
        phase: None,
        report: Some(report),
    });
    task.state = TaskState::Succeeded;
    task.state_reason = "attempt 1 succeeded".into();
    task
}

/// Writes `tasks` finished tasks and `output` bytes of their output (in
/// chunks of about 3.5 KiB) into a new store at `dir`, 1,000 tasks a commit.
fn populate(dir: &Path, tasks: u64, output: u64) {
    let store = SledStore::open(dir).expect("open the store");
    let base = template();
    let per_task = 3;
    let chunk = (output / (tasks * per_task)).max(1) as usize;
    let data: Arc<[u8]> = vec![b'o'; chunk].into();
    let mut writes = Vec::new();
    for n in 1..=tasks {
        let mut t = base.clone();
        t.id = TaskId(n);
        t.spec.title = format!("{} ({n})", base.spec.title);
        writes.push(Write::Task(Box::new(t)));
        for seq in 1..=per_task {
            writes.push(Write::Output(OutputChunk {
                task: TaskId(n),
                attempt: Attempt(1),
                seq,
                kind: OutputKind::Stdout,
                data: Arc::clone(&data),
            }));
        }
        if n % 1000 == 0 || n == tasks {
            store.commit(&writes).expect("commit");
            writes.clear();
        }
    }
}

/// Opens the sled files at `dir` and reads every key and value of every
/// tree; the bytes read.
fn raw_scan(dir: &Path) -> u64 {
    let db = sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()
        .expect("open sled");
    let mut bytes = 0;
    for name in db.tree_names() {
        let tree = db.open_tree(&name).expect("tree");
        for row in tree.iter() {
            let (k, v) = row.expect("row");
            bytes += (k.len() + v.len()) as u64;
        }
    }
    bytes
}

/// Serial submit p50 and RSS of a running coordinator.
fn submit_p50(ctx: &Ctx, c: &Coord, runs: usize) -> Duration {
    let repo = ctx.dir.join("cache/app.git").display().to_string();
    ctx.rt.block_on(async {
        let admin = c.admin().await;
        let call = move |i| {
            let mut a = admin.clone();
            let req = submit_request(&repo, i);
            async move {
                a.submit_task(req).await.expect("SubmitTask");
            }
        };
        serial(20, call.clone()).await;
        serial(runs, call).await.p50()
    })
}

pub fn large(ctx: &mut Ctx) {
    let tasks: u64 = ctx.n(100_000, 10_000);
    let output: u64 = ctx.n(1 << 30, 100 << 20);
    let runs = ctx.n(300, 100);

    let empty = Coord::start(ctx, &ctx.scratch("store-empty"), &[]);
    std::thread::sleep(Duration::from_secs(1));
    let empty_p50 = submit_p50(ctx, &empty, runs);
    let empty_rss = proc::rss(empty.pid());
    empty.stop();

    let dir = ctx.scratch("store-large");
    let store_dir = dir.join("data").join("store");
    let started = now();
    populate(&store_dir, tasks, output);
    let wrote = started.elapsed();
    let on_disk = proc::disk_usage(&store_dir);
    // Twice each, the first to warm the page cache: both read warm files.
    raw_scan(&store_dir);
    let started = now();
    let scanned = raw_scan(&store_dir);
    let raw = started.elapsed();
    Coord::start(ctx, &dir, &[]).stop();
    let c = Coord::start(ctx, &dir, &[]);
    let ready = c.ready_after;
    std::thread::sleep(Duration::from_secs(1));
    let rss = proc::rss(c.pid());
    let p50 = submit_p50(ctx, &c, runs);
    c.stop();

    ctx.note(format!(
        "store: {tasks} finished tasks and {} of output written in {:.1} s \
         ({} on disk, {} read by the raw scan)",
        Q::bytes(output as f64),
        wrote.as_secs_f64(),
        Q::bytes(on_disk as f64),
        Q::bytes(scanned as f64),
    ));
    ctx.push(Figure::with(
        format!("submit p50 with {tasks} finished tasks"),
        Q::time(p50),
        ("submit p50, empty store", Q::time(empty_p50)),
        "<= 1.2x baseline",
        p50.as_secs_f64() <= 1.2 * empty_p50.as_secs_f64(),
    ));
    ctx.push(Figure::with(
        format!("coordinator RSS with {tasks} finished tasks"),
        Q::bytes(rss as f64),
        ("RSS, empty store", Q::bytes(empty_rss as f64)),
        "-",
        true,
    ));
    let per_task = rss.saturating_sub(empty_rss) as f64 / tasks as f64;
    ctx.push(Figure::absolute(
        "coordinator RSS per finished task",
        Q::bytes(per_task),
        "<= 2 KiB",
        per_task <= 2048.0,
    ));
    ctx.push(Figure::with(
        format!(
            "restart: ready with {tasks} tasks, {} output",
            Q::bytes(output as f64)
        ),
        Q::time(ready),
        ("raw sled open + scan", Q::time(raw)),
        "<= 2x baseline",
        ready.as_secs_f64() <= 2.0 * raw.as_secs_f64(),
    ));
}

pub fn disk(ctx: &mut Ctx) {
    let tasks = ctx.n(1000, 200);
    let agents = 10;
    let behaviour = Behaviour {
        chunks: 32,
        chunk: 2048,
        window: 64,
        ..Behaviour::default()
    };
    let certs = coord::agent_certs(ctx, agents);
    let dir = ctx.scratch("disk");
    let c = Coord::start(ctx, &dir, &[]);
    let repo = ctx.dir.join("cache/app.git").display().to_string();
    ctx.rt.block_on(async {
        let mut fleet = Fleet::start(&c.url(), &certs, &behaviour, 8).await;
        let admin = c.admin().await;
        super::flow::submit_and_finish(&mut fleet, admin, repo, tasks, 10).await;
        fleet.stop();
    });
    c.stop();
    let store_dir = dir.join("data").join("store");
    let on_disk = proc::disk_usage(&store_dir);
    let logical = raw_scan(&store_dir);
    ctx.note(format!(
        "disk: {tasks} tasks of {} KiB output each, in 2 KiB chunks",
        behaviour.chunks * behaviour.chunk as u64 / 1024
    ));
    ctx.push(Figure::with(
        format!("on-disk size after {tasks} tasks with output"),
        Q::bytes(on_disk as f64),
        (
            "logical bytes stored (keys + values)",
            Q::bytes(logical as f64),
        ),
        "<= 3x baseline",
        (on_disk as f64) <= 3.0 * logical as f64,
    ));
}

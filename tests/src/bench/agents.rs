//! Many connected agents on one coordinator: memory per idle agent (RSS
//! at 0, 100 and 500 simulated agents) and the cost of their heartbeats
//! at 1 Hz (CPU of the coordinator process from `/proc/<pid>/stat`; the
//! flushes it makes, counted with strace, and the bytes it writes to
//! storage, from `/proc/<pid>/io`). A heartbeat writes nothing durable:
//! an agent's `last_seen` is written at most once a minute.

use std::time::Duration;

use super::coord::{self, Coord};
use super::proc;
use super::sim::{Behaviour, Fleet};
use super::{Ctx, Figure, Q};

pub fn run(ctx: &mut Ctx) {
    let total = 500;
    let certs = coord::agent_certs(ctx, total);
    let c = Coord::start(
        ctx,
        &ctx.scratch("agents"),
        &["--heartbeat-interval", "1s", "--heartbeat-timeout", "30s"],
    );
    let pid = c.pid();
    let settle = Duration::from_secs(ctx.n(3, 2));
    let window = Duration::from_secs(ctx.n(30, 10));
    let strace_window = Duration::from_secs(ctx.n(10, 5));
    let behaviour = Behaviour {
        capacity: 2,
        heartbeat: Some(Duration::from_secs(1)),
        ..Behaviour::default()
    };
    std::thread::sleep(settle);
    let rss0 = proc::rss(pid);
    let url = c.url();
    let first = ctx
        .rt
        .block_on(Fleet::start(&url, &certs[..100], &behaviour, 8));
    std::thread::sleep(settle);
    let rss100 = proc::rss(pid);
    let rest = ctx
        .rt
        .block_on(Fleet::start(&url, &certs[100..], &behaviour, 8));
    std::thread::sleep(settle);
    let rss500 = proc::rss(pid);
    let (cpu0, wb0) = (proc::cpu(pid), proc::write_bytes(pid));
    std::thread::sleep(window);
    let (cpu1, wb1) = (proc::cpu(pid), proc::write_bytes(pid));
    let flushes = proc::count_syscalls(pid, "fsync,fdatasync,sync_file_range", strace_window);
    first.stop();
    rest.stop();
    c.stop();

    for (n, rss) in [(0, rss0), (100, rss100), (total, rss500)] {
        ctx.push(Figure::base(
            format!("coordinator RSS, {n} idle agents connected"),
            Q::bytes(rss as f64),
        ));
    }
    let per_agent = rss500.saturating_sub(rss0) as f64 / total as f64;
    ctx.push(Figure::with(
        "memory per connected idle agent",
        Q::bytes(per_agent),
        ("(RSS at 500 - RSS at 0) / 500", Q::bytes(per_agent)),
        "<= 128 KiB",
        per_agent <= 128.0 * 1024.0,
    ));
    let cpu = (cpu1 - cpu0).as_secs_f64() / window.as_secs_f64() * 100.0;
    ctx.push(Figure::absolute(
        format!("{total} agent streams at 1 Hz heartbeats, CPU"),
        Q::pct(cpu),
        "<= 5% of one core",
        cpu <= 5.0,
    ));
    let heartbeats = total as f64 * window.as_secs_f64();
    let written = (wb1 - wb0) as f64;
    ctx.note(format!(
        "heartbeats: {total} streams for {:.0} s (~{heartbeats:.0} heartbeats each way): \
         {} written to storage, {:.1} B per heartbeat",
        window.as_secs_f64(),
        Q::bytes(written),
        written / heartbeats
    ));
    match flushes {
        Some(n) => {
            let per = n as f64 / (total as f64 * strace_window.as_secs_f64());
            ctx.push(Figure::absolute(
                format!("flushes per heartbeat, {total} streams at 1 Hz"),
                Q::fraction(per),
                "no flush per heartbeat (<= 1/60)",
                per <= 1.0 / 60.0,
            ));
            ctx.note(format!(
                "flushes: {n} fsync-family calls in {:.0} s under strace; last_seen is \
                 written at most once a minute per agent",
                strace_window.as_secs_f64()
            ));
        }
        None => ctx.note("flushes: strace is not available here; see the bytes written above"),
    }
}

//! A seeded, deterministic simulation of a whole cluster around the real
//! coordinator core, a real sled store and the real agent sessions.
//!
//! Why: the bugs that hurt a cluster live in interleavings: a result that
//! arrives after a lease expired, a crash between a commit and the message
//! it allows, a duplicate that slips in after a reconnect, a cancel that
//! crosses a result. Scripted tests only find the interleavings somebody
//! thought of. Here each seed draws a cluster (2–5 agents, mixed
//! specialties, 1–3 slots, one of them `general` so every task can run),
//! a workload (4–16 tasks of random specialty, priority and repository,
//! some of which always fail; some seeds give tasks only 1–3 attempts),
//! and faults: slow messages (which reorder streams against each other),
//! duplicated agent messages, dropped streams (which an agent may not
//! notice: its silence timeout must), agent crashes (the process and its
//! runs lost, the spool kept), agents stopped (they hand their attempts
//! back), coordinator crashes before, after or during a batch's effects
//! (rebuilt from the same store), and an admin who cancels, retries,
//! revokes and unrevokes, drains and undrains. Then faults stop, revoked
//! and drained agents are let back, and every task must end and every
//! agent come to rest.
//!
//! How: one thread, simulated time (a fixed origin plus milliseconds), and
//! one queue of events ordered by (time, sequence number), so a seed replays
//! exactly. Each agent is a real `agent::session::Session` driven as the
//! agent's driver does (its timers included); its child processes are
//! simulated runs that produce output and a report over simulated time. The
//! coordinator's driver is modelled as the real one works: inputs of a
//! batch are applied, the writes are committed, and only then are answers
//! and actions performed. Invariants are checked after every step (see
//! `checks`); the store is checked at every restart and at the end. Over a
//! whole run every terminal state (`Succeeded`, `Failed`, `Cancelled`)
//! must be reached.
//!
//! Run: `cargo test -p tests --test it sim`. `SIM_RUNS=<n>` sets the number
//! of seeds (default 1000), `SIM_SEED=<n>` replays one; a core deadline
//! that does not move ahead fails the run (`SIM_STRICT=0` only counts it).

mod agent;
mod checks;
mod trace;
mod world;

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use world::{Stats, World};

/// The first seed of the default run; seeds follow consecutively.
const FIRST_SEED: u64 = 1;
const DEFAULT_RUNS: u64 = 1000;
/// Runs of at least this many seeds must reach every terminal state.
const SEEDS_FOR_EVERY_END: u64 = 100;

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {value:?}")),
    )
}

/// Runs one seed: its counts, or a report of what broke, how to replay it
/// and the last events.
fn run_seed(seed: u64, strict: bool) -> Result<Stats, String> {
    let mut world = World::new(seed, strict);
    let result = catch_unwind(AssertUnwindSafe(|| world.run()));
    let failure = match result {
        Ok(Ok(())) => return Ok(world.stats),
        Ok(Err(why)) => why,
        Err(panic) => common::telemetry::panic_message(&*panic),
    };
    let mut report = vec![
        format!("simulation seed {seed} failed: {failure}"),
        format!("replay: SIM_SEED={seed} cargo test -p tests --test it sim"),
        "last events:".to_owned(),
    ];
    report.extend(
        world
            .trace_lines()
            .into_iter()
            .map(|line| format!("  {line}")),
    );
    Err(report.join("\n"))
}

/// Runs the seeds on every core (each seed is a world of its own, so the
/// order does not matter); stops at the first failure.
fn run_seeds(seeds: Range<u64>, strict: bool) -> Result<Stats, (u64, String)> {
    let next = AtomicU64::new(seeds.start);
    let failed = AtomicBool::new(false);
    let total = Mutex::new(Stats::default());
    let first_failure: Mutex<Option<(u64, String)>> = Mutex::new(None);
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut mine = Stats::default();
                while !failed.load(Ordering::Relaxed) {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= seeds.end {
                        break;
                    }
                    match run_seed(seed, strict) {
                        Ok(stats) => mine.add(&stats),
                        Err(report) => {
                            failed.store(true, Ordering::Relaxed);
                            let mut first = first_failure.lock().expect("no worker panics");
                            if first.as_ref().is_none_or(|(s, _)| seed < *s) {
                                *first = Some((seed, report));
                            }
                        }
                    }
                }
                total.lock().expect("no worker panics").add(&mine);
            });
        }
    });
    match first_failure.into_inner().expect("no worker panics") {
        Some(failure) => Err(failure),
        None => Ok(total.into_inner().expect("no worker panics")),
    }
}

#[test]
fn sim_random_clusters_finish_every_task() {
    // Strict by default: a deadline that does not move ahead fails the run.
    let strict = std::env::var_os("SIM_STRICT").is_none_or(|v| v != "0");
    let seeds = match env_number("SIM_SEED") {
        Some(seed) => seed..seed + 1,
        None => FIRST_SEED..FIRST_SEED + env_number("SIM_RUNS").unwrap_or(DEFAULT_RUNS),
    };
    let n_seeds = seeds.end - seeds.start;
    let total = match run_seeds(seeds, strict) {
        Ok(total) => total,
        Err((seed, report)) => {
            eprintln!("\n{report}");
            panic!("simulation seed {seed} failed (details above); replay with SIM_SEED={seed}");
        }
    };
    eprintln!(
        "simulated {n_seeds} seeds, {:.1} minutes of cluster time, {} steps, {} commits: \
         {} tasks ({} succeeded, {} cancelled, {} failed) in {} attempts; faults: \
         {} coordinator crashes, {} agent crashes, {} agents stopped, {} dropped streams, \
         {} streams found silent, {} duplicates, {} slow messages, {} health checks; \
         admin: {} cancels, {} retries, {} revokes, {} unrevokes, {} drains, {} undrains, \
         {} submissions lost to a crash; stale deadlines: {}",
        total.simulated_ms as f64 / 60_000.0,
        total.steps,
        total.commits,
        total.tasks,
        total.succeeded,
        total.cancelled,
        total.failed,
        total.attempts,
        total.coordinator_crashes,
        total.agent_crashes,
        total.agent_stops,
        total.dropped_streams,
        total.silent_streams,
        total.duplicates,
        total.slow_messages,
        total.health_checks,
        total.admin_cancels,
        total.admin_retries,
        total.revokes,
        total.unrevokes,
        total.drains,
        total.undrains,
        total.lost_submits,
        total.stale_deadlines,
    );
    if n_seeds >= SEEDS_FOR_EVERY_END {
        for (state, count) in [
            ("succeeded", total.succeeded),
            ("failed", total.failed),
            ("cancelled", total.cancelled),
        ] {
            assert!(
                count > 0,
                "no task {state} in {n_seeds} seeds: the simulation no longer reaches that end"
            );
        }
    }
}

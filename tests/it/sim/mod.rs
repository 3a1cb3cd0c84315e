//! A seeded, deterministic simulation of a whole cluster around the real
//! coordinator core and a real sled store.
//!
//! Why: the bugs that hurt a coordinator live in interleavings: a result
//! that arrives after a lease expired, a crash between a commit and the
//! message it allows, a duplicate that slips in after a reconnect. Scripted
//! tests only find the interleavings somebody thought of. Here each seed
//! draws a cluster (2–5 agents, mixed specialties, 1–3 slots, one of them
//! `general` so every task can run), a workload (4–16 tasks of random
//! specialty, priority and repository), and faults: slow messages (which
//! reorder streams against each other), duplicated agent messages, dropped
//! streams, agent crashes (all state lost), coordinator crashes before,
//! after or during a batch's effects (rebuilt from the same store), and
//! admin cancels. Then faults stop and every task must finish.
//!
//! How: one thread, simulated time (a fixed origin plus milliseconds), and
//! one queue of events ordered by (time, sequence number), so a seed replays
//! exactly. The driver is modelled as the real one works: inputs of a batch
//! are applied, the writes are committed, and only then are answers and
//! actions performed. Invariants are checked after every step (see
//! `checks`); the store is checked at every restart and at the end.
//!
//! Run: `cargo test -p tests --test it sim`. `SIM_RUNS=<n>` sets the number
//! of seeds (default 1000), `SIM_SEED=<n>` replays one; a core deadline
//! that does not move ahead fails the run (`SIM_STRICT=0` only counts it).

mod agent;
mod checks;
mod trace;
mod world;

use std::panic::{AssertUnwindSafe, catch_unwind};

use world::{Stats, World};

/// The first seed of the default run; seeds follow consecutively.
const FIRST_SEED: u64 = 1;
const DEFAULT_RUNS: u64 = 1000;

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {value:?}")),
    )
}

/// Runs one seed; on failure prints what broke, how to replay it and the
/// last events, then fails the test.
fn run_seed(seed: u64, strict: bool, total: &mut Stats) {
    let mut world = World::new(seed, strict);
    let result = catch_unwind(AssertUnwindSafe(|| world.run()));
    let failure = match result {
        Ok(Ok(())) => {
            total.add(&world.stats);
            return;
        }
        Ok(Err(why)) => why,
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic".into()),
    };
    eprintln!("\nsimulation seed {seed} failed: {failure}");
    eprintln!("replay: SIM_SEED={seed} cargo test -p tests --test it sim");
    eprintln!("last events:");
    for line in world.trace_lines() {
        eprintln!("  {line}");
    }
    panic!("simulation seed {seed} failed (details above); replay with SIM_SEED={seed}");
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
    let mut total = Stats::default();
    for seed in seeds {
        run_seed(seed, strict, &mut total);
    }
    eprintln!(
        "simulated {n_seeds} seeds, {:.1} minutes of cluster time, {} steps, {} commits: \
         {} tasks ({} succeeded, {} cancelled, {} failed) in {} attempts; faults: \
         {} coordinator crashes, {} agent crashes, {} dropped streams, {} duplicates, \
         {} slow messages, {} admin cancels, {} submissions lost to a crash; \
         stale deadlines: {}",
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
        total.dropped_streams,
        total.duplicates,
        total.slow_messages,
        total.admin_cancels,
        total.lost_submits,
        total.stale_deadlines,
    );
}

//! The workspace for the second task on a repository: the agent's own
//! `Workspaces::prepare` (fetch into its bare mirror, clone the mirror,
//! check out a new branch) on the bench repository of 20,000 files and
//! 2,000 commits served over `git://`, once the first task has made the
//! mirror. Compared with B5: a fresh clone over `git://` (what every task
//! would pay without the mirror) and a local clone (the floor).

use agent::workspace::{SshConfig, Workspaces};
use common::ids::{Attempt, TaskId};
use common::types::Specialty;
use tokio_util::sync::CancellationToken;

use super::{Ctx, Figure, Q, measure};

pub fn run(ctx: &mut Ctx) {
    let git = ctx.git();
    let dir = ctx.scratch("mirror");
    let daemon = crate::git::Daemon::start(git.repo.parent().expect("cache dir"));
    let url = daemon.url(
        git.repo
            .file_name()
            .and_then(|n| n.to_str())
            .expect("repo name"),
    );
    let ws = Workspaces::new(&dir, SshConfig::default());
    let stop = CancellationToken::new();
    let mut n = 0u64;
    let mut prepare = || {
        n += 1;
        let spec = super::spec(
            &url,
            &format!("task {n}"),
            "",
            &format!("ccc/bench-{n}"),
            Specialty::Backend,
        );
        // Workspaces are kept until the next run (see B5 on deleting).
        ws.prepare(TaskId(n), Attempt(1), &spec, None, &stop)
            .expect("workspace prepared")
            .mirror_reused
    };
    let first = measure(1, || assert!(!prepare(), "the first task makes the mirror"));
    let second = measure(ctx.n(5, 2), || assert!(prepare(), "later tasks reuse it"));
    drop(daemon);
    ctx.note(format!(
        "mirror: the first task's workspace (mirror made) took {}",
        Q::time(first.p50())
    ));
    let v = second.p50();
    ctx.push(Figure::with(
        "workspace ready, second task (mirror cache), p50",
        Q::time(v),
        ("B5 fresh clone over git://", Q::time(git.fresh)),
        "<= 0.2x baseline (5x faster)",
        v.as_secs_f64() * 5.0 <= git.fresh.as_secs_f64(),
    ));
    ctx.push(Figure::with(
        "workspace ready, second task (mirror cache), p50",
        Q::time(v),
        ("B5 git clone --local", Q::time(git.local)),
        "<= 1.5x baseline",
        v.as_secs_f64() <= 1.5 * git.local.as_secs_f64(),
    ));
}

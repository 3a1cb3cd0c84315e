//! The invariants the simulation holds the coordinator and the agents to.
//! Each returns a sentence saying what broke, which the runner prints with
//! the seed. (Checked where they arise, in `world`: an agent never starts
//! an attempt of a task it still runs, numbers its output 1, 2, 3, ...
//! without a gap, and sends nothing but Hello before its stream's Welcome;
//! its session's timer never stays in the past.)

use std::collections::BTreeMap;

use common::ids::{AgentId, Attempt, TaskId};
use common::types::{Outcome, OutputKind};
use coordinator::core::task::TRUNCATION_MARKER;
use coordinator::core::{Core, Task, TaskState, ToAgent};
use coordinator::store::{SledStore, Store};

use super::agent::{SimAgent, chunk_data};
use super::world::Ledger;

/// Checked after every step of a run:
/// - an agent never holds more live attempts than its slots;
/// - a task is queued, held by exactly one live attempt (the last one, on
///   the agent whose slot it takes), or terminal; never `Finishing`;
/// - attempts are numbered 1, 2, 3, ... and at most one succeeded;
/// - a committed terminal task never changes again.
pub(super) fn core_invariants(core: &Core, ledger: &Ledger) -> Result<(), String> {
    let mut holder: BTreeMap<TaskId, AgentId> = BTreeMap::new();
    for view in core.agents() {
        let capacity = view.record.advert.as_ref().map_or(0, |a| a.capacity);
        if view.assigned.len() > capacity as usize {
            return Err(format!(
                "{} holds {} live attempts with {capacity} slots: {:?}",
                view.record.id,
                view.assigned.len(),
                view.assigned
            ));
        }
        for task in view.assigned {
            if let Some(other) = holder.insert(task, view.record.id.clone()) {
                return Err(format!(
                    "{task} takes a slot on both {other} and {}",
                    view.record.id
                ));
            }
        }
    }
    for task in core.tasks() {
        task_shape(task, holder.remove(&task.id))?;
        if let Some(done) = ledger.terminal.get(&task.id)
            && done != task
        {
            return Err(format!(
                "terminal task {} changed: {:?} ({}) became {:?} ({})",
                task.id, done.state, done.state_reason, task.state, task.state_reason
            ));
        }
    }
    if let Some((task, agent)) = holder.first_key_value() {
        return Err(format!("{agent} has a slot taken by unknown task {task}"));
    }
    Ok(())
}

/// One task's state agrees with its attempts and with the agent holding it.
fn task_shape(task: &Task, holder: Option<AgentId>) -> Result<(), String> {
    let id = task.id;
    for (i, a) in task.attempts.iter().enumerate() {
        if a.attempt != Attempt(u32::try_from(i + 1).expect("few attempts")) {
            return Err(format!(
                "{id}: attempt number {} at position {}",
                a.attempt,
                i + 1
            ));
        }
    }
    let unfinished: Vec<&Attempt> = task
        .attempts
        .iter()
        .filter(|a| a.finished_at.is_none())
        .map(|a| &a.attempt)
        .collect();
    let succeeded = task
        .attempts
        .iter()
        .filter(|a| a.outcome == Some(Outcome::Succeeded))
        .count();
    if succeeded > 1 {
        return Err(format!("{id} succeeded {succeeded} times"));
    }
    match task.state {
        TaskState::Assigned | TaskState::Running => {
            let current = task.current().expect("a live task has an attempt");
            if unfinished != [&current.attempt] {
                return Err(format!(
                    "{id} is {:?} with unfinished attempts {unfinished:?}",
                    task.state
                ));
            }
            if holder.as_ref() != Some(&current.agent) {
                return Err(format!(
                    "{id} is live on {} but takes a slot on {holder:?}",
                    current.agent
                ));
            }
        }
        TaskState::NeedsInfo
        | TaskState::Queued
        | TaskState::Succeeded
        | TaskState::Failed
        | TaskState::Cancelled => {
            if !unfinished.is_empty() {
                return Err(format!(
                    "{id} is {:?} with unfinished attempts {unfinished:?}",
                    task.state
                ));
            }
            if let Some(agent) = holder {
                return Err(format!(
                    "{id} is {:?} yet takes a slot on {agent}",
                    task.state
                ));
            }
        }
        TaskState::Finishing => return Err(format!("{id} is stuck in Finishing")),
    }
    Ok(())
}

/// Effects after commit, seen from the agent: whatever the coordinator
/// tells an agent rests on committed state. An assignment is stored before
/// the agent hears of it; output is stored before it is acknowledged (the
/// agent then frees it) or named in `Welcome.held`; a result is stored
/// before it is acknowledged (the agent then forgets the attempt).
pub(super) fn promise_is_committed(msg: &ToAgent, ledger: &Ledger) -> Result<(), String> {
    let attempt_of = |task: &TaskId, attempt: &Attempt| {
        ledger
            .committed
            .get(task)
            .and_then(|t| t.attempts.iter().find(|a| a.attempt == *attempt))
    };
    match msg {
        ToAgent::Assign { task, attempt, .. } if attempt_of(task, attempt).is_none() => Err(
            format!("{task}#{attempt} was assigned before the assignment was committed"),
        ),
        ToAgent::OutputAck { task, attempt, seq }
            if !ledger.truncated.contains(task)
                && ledger
                    .stored_seq
                    .get(&(*task, *attempt))
                    .copied()
                    .unwrap_or(0)
                    < *seq =>
        {
            Err(format!(
                "{task}#{attempt} output was acknowledged up to seq {seq} before it was committed"
            ))
        }
        ToAgent::FinishedAck { task, attempt }
            if attempt_of(task, attempt).is_none_or(|a| a.finished_at.is_none()) =>
        {
            Err(format!(
                "{task}#{attempt} result was acknowledged before the attempt's end was committed"
            ))
        }
        ToAgent::Welcome { held, .. } => {
            for (task, attempt, persisted) in held {
                let stored = ledger
                    .stored_seq
                    .get(&(*task, *attempt))
                    .copied()
                    .unwrap_or(0);
                if *persisted != u64::MAX && *persisted > stored && !ledger.truncated.contains(task)
                {
                    return Err(format!(
                        "Welcome says {task}#{attempt} output is stored up to seq {persisted}, \
                         but only {stored} was committed"
                    ));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Checked on every task once the run is quiescent: it ended for a reason
/// the fault model explains.
pub(super) fn final_task(task: &Task, ledger: &Ledger) -> Result<(), String> {
    let id = task.id;
    match task.state {
        TaskState::Succeeded => {
            let last = task.current().and_then(|a| a.outcome);
            if last != Some(Outcome::Succeeded) {
                return Err(format!("{id} succeeded, but its last attempt is {last:?}"));
            }
        }
        TaskState::Cancelled if !ledger.cancel_requested.contains(&id) => {
            return Err(format!("{id} was cancelled though no admin asked"));
        }
        // Agents fail now and then (CliFailed), and faults end attempts
        // too; only running out of attempts fails a task for good.
        TaskState::Failed if task.counted_attempts() < task.max_attempts => {
            return Err(format!(
                "{id} failed after {} of {} attempts: {}",
                task.counted_attempts(),
                task.max_attempts,
                task.state_reason
            ));
        }
        TaskState::Cancelled | TaskState::Failed => {}
        other => return Err(format!("{id} is still {other:?} at the end")),
    }
    Ok(())
}

/// The output in the store: per attempt, seqs 1..n without gap or
/// duplicate, each chunk the bytes the agent produced, nothing after the
/// truncation marker. With `finished`: every attempt whose result the
/// coordinator accepted (but a cancelled one, which owes no output) has
/// every chunk its agent produced, unless the task hit its output cap.
pub(super) fn stored_output(
    store: &SledStore,
    ledger: &Ledger,
    finished: bool,
) -> Result<(), String> {
    for (id, task) in &ledger.committed {
        let chunks = store
            .read_output(*id, (Attempt(0), 0), usize::MAX)
            .expect("the store reads output");
        let mut last_seq: BTreeMap<Attempt, u64> = BTreeMap::new();
        let mut truncated = false;
        for chunk in &chunks {
            let at = format!("{id}#{} seq {}", chunk.attempt, chunk.seq);
            if truncated {
                return Err(format!("{at} was stored after the truncation marker"));
            }
            if chunk.attempt.0 == 0 || chunk.attempt.0 as usize > task.attempts.len() {
                return Err(format!("{at} belongs to no attempt of the task"));
            }
            let last = last_seq.entry(chunk.attempt).or_default();
            if chunk.seq != *last + 1 {
                return Err(format!("{at} follows seq {last}: a gap or a duplicate"));
            }
            *last = chunk.seq;
            if chunk.kind == OutputKind::System && chunk.data.starts_with(TRUNCATION_MARKER) {
                truncated = true;
            } else if chunk.data != chunk_data(*id, chunk.attempt, chunk.seq) {
                return Err(format!("{at} holds bytes the agent never sent"));
            }
        }
        if !finished || ledger.truncated.contains(id) {
            continue;
        }
        for attempt in &task.attempts {
            let Some(report) = &attempt.report else {
                continue; // Ended by the coordinator: lost, fenced, cancelled.
            };
            if attempt.outcome == Some(Outcome::Cancelled) {
                continue;
            }
            let number = attempt.attempt;
            let stored = last_seq.get(&number).copied().unwrap_or(0);
            let produced = ledger.produced.get(&(*id, number)).copied().unwrap_or(0);
            if stored != produced || report.last_output_seq != produced {
                return Err(format!(
                    "{id}#{number} ended {:?} with {stored} chunks stored and {} reported, \
                     but its agent produced {produced}",
                    attempt.outcome, report.last_output_seq
                ));
            }
        }
    }
    Ok(())
}

/// When a Cancel reaches the agent running the attempt it names, the run
/// is being stopped.
pub(super) fn fenced_attempt_is_stopped(
    agent: &SimAgent,
    task: TaskId,
    attempt: Attempt,
) -> Result<(), String> {
    match agent.children.get(&task) {
        Some(child) if child.attempt == attempt && !child.stopping => Err(format!(
            "{} was told to cancel {task}#{attempt} and keeps running it",
            agent.id
        )),
        _ => Ok(()),
    }
}

/// At the end an agent runs nothing, owes nothing, and its spool is empty:
/// every attempt it held was forgotten, with its files.
pub(super) fn agent_at_rest(agent: &SimAgent) -> Result<(), String> {
    if !agent.is_idle() {
        return Err(format!("{} is not idle at the end", agent.id));
    }
    if let Some(((task, attempt), _)) = agent.spool.first_key_value() {
        return Err(format!(
            "{} still spools {task}#{attempt} after the attempt was forgotten",
            agent.id
        ));
    }
    Ok(())
}

/// Describes how two task maps differ: a line per differing task, and the
/// full values of the first one.
pub(super) fn diff_tasks(
    what: &str,
    expected: &BTreeMap<TaskId, Task>,
    actual: &BTreeMap<TaskId, Task>,
) -> String {
    let mut lines = vec![what.to_owned()];
    let mut first = None;
    let ids: std::collections::BTreeSet<&TaskId> = expected.keys().chain(actual.keys()).collect();
    for id in ids {
        let (e, a) = (expected.get(id), actual.get(id));
        if e == a {
            continue;
        }
        lines.push(format!(
            "  {id}: expected {}, found {}",
            e.map_or("nothing".into(), summary),
            a.map_or("nothing".into(), summary)
        ));
        first.get_or_insert((e, a));
    }
    if let Some((e, a)) = first {
        lines.push(format!(
            "  first difference in full:\n    expected {e:?}\n    found    {a:?}"
        ));
    }
    lines.join("\n")
}

/// A task in one line: state, then each attempt as number:agent:outcome.
fn summary(task: &Task) -> String {
    let attempts: Vec<String> = task
        .attempts
        .iter()
        .map(|a| {
            let outcome = a.outcome.map_or("-".into(), |o| o.to_string());
            format!("{}:{}:{outcome}", a.attempt, a.agent)
        })
        .collect();
    format!("{:?} [{}]", task.state, attempts.join(" "))
}

//! How `ccc top` shows its model: the rows of its two tables (shared by the
//! terminal view and the plain-text snapshot), and the terminal view drawn
//! with ratatui.

use common::proto::{AgentInfo, AgentState, Phase, TaskInfo, TaskState};
use common::time::UnixMillis;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table, TableState};

use super::model::{Model, Screen, has_ended, one_line};
use crate::table::{render, specialty_name};
use crate::tasks::state_name;

const AGENT_HEADER: [&str; 6] = [
    "AGENT",
    "STATE",
    "HEALTH",
    "SPECIALTIES",
    "USED/FREE",
    "TOOLCHAINS",
];
const TASK_HEADER: [&str; 8] = [
    "TASK",
    "STATE",
    "AGENT",
    "ELAPSED",
    "TURNS",
    "COST",
    "TITLE",
    "LAST OUTPUT",
];
/// Characters of a title shown in the task table.
const TITLE_WIDTH: usize = 28;

/// `42s`, `3m07s`, `2h05m`.
pub fn short_duration(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

fn agent_state(a: &AgentInfo) -> &'static str {
    match AgentState::try_from(a.state) {
        Ok(AgentState::Connected) => "connected",
        Ok(AgentState::Disconnected) => "disconnected",
        Ok(AgentState::Draining) => "draining",
        Ok(AgentState::Revoked) => "revoked",
        _ => "unknown",
    }
}

/// Toolchains in a few characters each: `rust 1.95, node 22.1`.
fn toolchains_short(a: &AgentInfo) -> String {
    a.toolchains
        .iter()
        .map(|t| {
            let version = t.version.split_whitespace().next().unwrap_or_default();
            let major_minor: Vec<&str> = version.split('.').take(2).collect();
            format!("{} {}", t.name, major_minor.join("."))
                .trim()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn agent_rows(model: &Model) -> Vec<Vec<String>> {
    let mut rows = vec![AGENT_HEADER.map(String::from).to_vec()];
    for a in model.agents.values() {
        let health = if a.unhealthy_reason.is_empty() {
            "ok".to_owned()
        } else {
            format!("unhealthy: {}", a.unhealthy_reason)
        };
        rows.push(
            [
                a.agent_id.clone(),
                agent_state(a).to_owned(),
                health,
                a.specialties
                    .iter()
                    .map(|&s| specialty_name(s))
                    .collect::<Vec<_>>()
                    .join(","),
                format!("{}/{}", a.assigned.len(), a.free_slots),
                toolchains_short(a),
            ]
            .iter()
            .map(|cell| one_line(cell))
            .collect(),
        );
    }
    rows
}

/// The state, with the phase of a live attempt or the outcome of an ended
/// task when it says more: `running/claude`, `succeeded (tests_failed)`.
fn task_state(t: &TaskInfo) -> String {
    let state = state_name(t.state);
    if has_ended(t) {
        return if t.outcome.is_empty() || t.outcome == state {
            state.to_owned()
        } else {
            format!("{state} ({})", t.outcome)
        };
    }
    let phase = t
        .attempts
        .last()
        .filter(|a| a.finished_at.is_none())
        .and_then(|a| match Phase::try_from(a.phase) {
            Ok(Phase::Preparing) => Some("preparing"),
            Ok(Phase::RunningClaude) => Some("claude"),
            Ok(Phase::Testing) => Some("testing"),
            Ok(Phase::Committing) => Some("committing"),
            Ok(Phase::Pushing) => Some("pushing"),
            _ => None,
        });
    match phase {
        Some(phase) if matches!(TaskState::try_from(t.state), Ok(TaskState::Running)) => {
            format!("{state}/{phase}")
        }
        _ => state.to_owned(),
    }
}

fn millis(ts: Option<&prost_types::Timestamp>) -> Option<UnixMillis> {
    ts.map(UnixMillis::from_timestamp)
}

/// How long the task's latest attempt has run (or ran); a queued task's
/// wait since it was submitted.
fn elapsed(t: &TaskInfo, now: UnixMillis) -> String {
    let live = t.attempts.last().filter(|a| a.finished_at.is_none());
    let span = match t.attempts.last() {
        _ if matches!(
            TaskState::try_from(t.state),
            Ok(TaskState::Queued | TaskState::NeedsInfo)
        ) =>
        {
            millis(t.created_at.as_ref()).map(|from| (from, now))
        }
        Some(a) if live.is_some() => millis(a.assigned_at.as_ref()).map(|from| (from, now)),
        Some(a) => millis(a.assigned_at.as_ref()).zip(millis(a.finished_at.as_ref())),
        None => None,
    };
    span.map_or_else(
        || "-".to_owned(),
        |(from, to)| short_duration(to.0.saturating_sub(from.0)),
    )
}

/// Turns and cost come with an attempt's result: a task still running
/// says so.
fn turns_and_cost(t: &TaskInfo) -> (String, String) {
    match t.attempts.last() {
        Some(a) => match &a.cli {
            Some(cli) => (cli.turns.to_string(), format!("${:.4}", cli.cost_usd)),
            None if a.finished_at.is_none() => ("at end".into(), "at end".into()),
            None => ("-".into(), "-".into()),
        },
        None => ("-".into(), "-".into()),
    }
}

pub fn task_rows(model: &Model, now: UnixMillis) -> Vec<Vec<String>> {
    let mut rows = vec![TASK_HEADER.map(String::from).to_vec()];
    for t in model.task_order() {
        let (turns, cost) = turns_and_cost(t);
        let last = match model.lines.get(&t.task_id) {
            Some(line) => line.clone(),
            None if !t.waiting_reason.is_empty() => format!("waiting: {}", t.waiting_reason),
            None => String::new(),
        };
        rows.push(
            [
                t.task_id.clone(),
                task_state(t),
                t.attempts
                    .last()
                    .map_or_else(|| "-".to_owned(), |a| a.agent_id.clone()),
                elapsed(t, now),
                turns,
                cost,
                t.title.chars().take(TITLE_WIDTH).collect(),
                last,
            ]
            .iter()
            .map(|cell| one_line(cell))
            .collect(),
        );
    }
    rows
}

/// The plain-text snapshot: both tables, aligned.
pub fn plain(model: &Model, now: UnixMillis) -> String {
    let agents = if model.agents.is_empty() {
        "no agents yet\n".to_owned()
    } else {
        render(&agent_rows(model))
    };
    let tasks = if model.tasks.is_empty() {
        "no tasks\n".to_owned()
    } else {
        render(&task_rows(model, now))
    };
    format!("AGENTS\n{agents}\nTASKS\n{tasks}")
}

/// Column widths that fit every cell; the last column takes the rest.
fn widths(rows: &[Vec<String>]) -> Vec<Constraint> {
    let n = rows.first().map_or(0, Vec::len);
    (0..n)
        .map(|c| {
            if c + 1 == n {
                return Constraint::Fill(1);
            }
            let widest = rows
                .iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0);
            Constraint::Length(u16::try_from(widest).unwrap_or(u16::MAX))
        })
        .collect()
}

/// A bordered table of `rows` (the first is the header).
fn table<'a>(rows: &'a [Vec<String>], title: &'a str) -> Table<'a> {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let header = Row::new(rows.first().cloned().unwrap_or_default()).style(bold);
    let body = rows.iter().skip(1).map(|r| Row::new(r.clone()));
    Table::new(body, widths(rows))
        .header(header)
        .block(Block::bordered().title(title))
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
}

fn title_line(model: &Model, coordinator: &str) -> String {
    let running = model
        .tasks
        .values()
        .filter(|t| matches!(TaskState::try_from(t.state), Ok(TaskState::Running)))
        .count();
    let queued = model
        .tasks
        .values()
        .filter(|t| matches!(TaskState::try_from(t.state), Ok(TaskState::Queued)))
        .count();
    let mut line = format!(
        "ccc top  {coordinator}  {} agents, {running} running, {queued} queued",
        model.agents.len()
    );
    if let Some(why) = &model.lost {
        line.push_str(&format!(
            "  LOST THE COORDINATOR ({}); reconnecting",
            one_line(why)
        ));
    }
    line
}

fn footer(model: &Model) -> String {
    match &model.screen {
        Screen::Tasks => {
            let keys = "up/down select  enter/l log  c cancel  r retry  q quit";
            if model.status.is_empty() {
                keys.to_owned()
            } else {
                format!("{}  |  {keys}", one_line(&model.status))
            }
        }
        Screen::ConfirmCancel(task) => format!("cancel {task}? y: yes, any other key: no"),
        Screen::Log(_) => "esc/q back to the tasks".to_owned(),
    }
}

/// Draws the whole screen for `now`.
pub fn draw(frame: &mut Frame, model: &Model, now: UnixMillis, coordinator: &str) {
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Fill(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(title_line(model, coordinator)), head);
    match &model.screen {
        Screen::Log(pane) => {
            let state = model
                .tasks
                .get(&pane.task)
                .map(task_state)
                .unwrap_or_default();
            let block = Block::bordered().title(format!(" {} {state} ", pane.task));
            let inner = block.inner(body);
            let shown = usize::from(inner.height);
            let lines: Vec<Line> = pane
                .lines
                .iter()
                .skip(pane.lines.len().saturating_sub(shown))
                .map(|l| Line::raw(l.as_str()))
                .collect();
            frame.render_widget(Paragraph::new(lines).block(block), body);
        }
        Screen::Tasks | Screen::ConfirmCancel(_) => draw_tables(frame, body, model, now),
    }
    frame.render_widget(
        Paragraph::new(footer(model)).style(Style::default().add_modifier(Modifier::BOLD)),
        foot,
    );
}

fn draw_tables(frame: &mut Frame, area: Rect, model: &Model, now: UnixMillis) {
    let agents = agent_rows(model);
    let tasks = task_rows(model, now);
    // Borders and header: 3 lines; the agents take at most a third.
    let wanted = u16::try_from(agents.len() + 2).unwrap_or(u16::MAX);
    let [top, bottom] = Layout::vertical([
        Constraint::Length(wanted.min(area.height / 3).max(4)),
        Constraint::Fill(1),
    ])
    .areas(area);
    frame.render_widget(table(&agents, " agents "), top);
    let mut selection = TableState::default().with_selected(
        model
            .selected()
            .and_then(|id| model.task_order().iter().position(|t| t.task_id == id)),
    );
    frame.render_stateful_widget(table(&tasks, " tasks "), bottom, &mut selection);
}

#[cfg(test)]
mod tests {
    use common::proto::{CliResult, Toolchain};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::super::model::tests::{event_line, snapshot, task};
    use super::super::model::{Key, Msg};
    use super::*;

    fn screen_text(model: &Model, now: UnixMillis) -> String {
        let mut terminal = Terminal::new(TestBackend::new(160, 24)).expect("terminal");
        terminal
            .draw(|frame| draw(frame, model, now, "https://127.0.0.1:7443"))
            .expect("draw");
        let buffer = terminal.backend().buffer();
        let width = usize::from(buffer.area.width);
        buffer
            .content
            .chunks(width)
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn model() -> Model {
        let mut running = task(7, TaskState::Running, 1);
        running.attempts[0].phase = Phase::RunningClaude as i32;
        running.attempts[0].assigned_at = Some(UnixMillis(1_000_000).to_timestamp());
        let mut done = task(3, TaskState::Succeeded, 1);
        done.outcome = "tests_failed".into();
        done.attempts[0].assigned_at = Some(UnixMillis(1_000_000).to_timestamp());
        done.attempts[0].finished_at = Some(UnixMillis(1_200_000).to_timestamp());
        done.attempts[0].cli = Some(CliResult {
            turns: 12,
            cost_usd: 0.5,
            ..CliResult::default()
        });
        let mut model = Model::new(10);
        model.update(snapshot(
            vec![running, done],
            vec![event_line("t-7", "working, step 2 of 9")],
        ));
        if let Some(agent) = model.agents.get_mut("pc-1") {
            agent.state = AgentState::Connected as i32;
            agent.capacity = 2;
            agent.free_slots = 1;
            agent.assigned = vec!["t-7".into()];
            agent.specialties = vec![common::proto::Specialty::Backend as i32];
            agent.toolchains = vec![Toolchain {
                name: "rust".into(),
                version: "1.95.0 (abc 2026-01-01)".into(),
            }];
        }
        model
    }

    #[test]
    fn the_screen_shows_agents_and_tasks_with_phase_time_and_last_line() {
        let model = model();
        let text = screen_text(&model, UnixMillis(1_065_000));
        let row = |needle: &str| {
            text.lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} in\n{text}"))
                .to_owned()
        };
        let agent = row("pc-1  ");
        for cell in ["connected", "ok", "backend", "1/1", "rust 1.95"] {
            assert!(agent.contains(cell), "{cell:?} in {agent}");
        }
        let running = row("t-7");
        for cell in [
            "running/claude",
            "1m05s",
            "at end",
            "task 7",
            "[claude] working, step 2 of 9",
        ] {
            assert!(running.contains(cell), "{cell:?} in {running}");
        }
        let done = row("t-3");
        for cell in ["succeeded (tests_failed)", "3m20s", "12", "$0.5000"] {
            assert!(done.contains(cell), "{cell:?} in {done}");
        }
        assert!(text.contains("1 agents, 1 running, 0 queued"), "{text}");
        assert!(text.contains("c cancel"), "{text}");
    }

    #[test]
    fn the_log_pane_shows_the_latest_lines_of_the_followed_task() {
        let mut model = model();
        model.update(Msg::Key(Key::Enter));
        for i in 1..=100 {
            model.update(Msg::Log {
                task: "t-7".into(),
                line: format!("line {i}"),
            });
        }
        let text = screen_text(&model, UnixMillis(1_065_000));
        assert!(text.contains("t-7 running/claude"), "{text}");
        assert!(text.contains("line 100"), "{text}");
        assert!(!text.contains("line 1 "), "scrolled away:\n{text}");
        assert!(!text.contains("pc-1  "), "the tables are hidden:\n{text}");
    }

    #[test]
    fn the_plain_snapshot_has_both_tables() {
        let text = plain(&model(), UnixMillis(1_065_000));
        assert!(text.starts_with("AGENTS\nAGENT "), "{text}");
        assert!(text.contains("\nTASKS\nTASK "), "{text}");
        assert!(text.contains("[claude] working, step 2 of 9"), "{text}");
        let empty = plain(&Model::new(1), UnixMillis(0));
        assert_eq!(empty, "AGENTS\nno agents yet\n\nTASKS\nno tasks\n");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(999), "0s");
        assert_eq!(short_duration(42_000), "42s");
        assert_eq!(short_duration(187_000), "3m07s");
        assert_eq!(short_duration(7_500_000), "2h05m");
    }
}

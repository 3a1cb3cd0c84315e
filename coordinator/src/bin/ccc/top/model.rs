//! The state of `ccc top`: what the cluster feed said, which task is
//! selected and which screen is up. Messages update it and may ask for an
//! effect (follow a log, cancel, retry, quit); `view` draws it. No I/O.

use std::collections::{BTreeMap, HashMap, VecDeque};

use common::proto::{AgentInfo, OutputKind, TaskInfo, TaskOutput, TaskState, cluster_event};

use crate::tasks::{for_terminal, render_events};

/// Lines a log pane keeps; older ones scroll away.
pub const MAX_LOG_LINES: usize = 5000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Up,
    Down,
    Enter,
    Esc,
    /// Ctrl-C: quits from any screen.
    Interrupt,
    Char(char),
}

#[derive(Debug)]
pub enum Msg {
    Feed(Box<cluster_event::Event>),
    /// The feed was lost; it reconnects (a snapshot follows).
    FeedLost(String),
    Key(Key),
    /// A line of a followed task's output.
    Log {
        task: String,
        line: String,
    },
    /// How an action (cancel, retry) went, in words.
    Done(String),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Stream this task's output into the log pane (instead of any other).
    Follow(String),
    /// Stop streaming into the log pane.
    Unfollow,
    Cancel(String),
    Retry(String),
    Quit,
}

#[derive(Debug, Default, PartialEq)]
pub enum Screen {
    #[default]
    Tasks,
    /// "Cancel this task?" waits for y.
    ConfirmCancel(String),
    Log(LogPane),
}

#[derive(Debug, PartialEq)]
pub struct LogPane {
    pub task: String,
    pub lines: VecDeque<String>,
}

#[derive(Debug, Default)]
pub struct Model {
    pub agents: BTreeMap<String, AgentInfo>,
    pub tasks: HashMap<String, TaskInfo>,
    /// The latest output line of each task, readable.
    pub lines: HashMap<String, String>,
    /// The selected task; when it is gone, the first row is.
    selected: Option<String>,
    pub screen: Screen,
    /// The last action's result.
    pub status: String,
    /// Why the feed is down while it reconnects.
    pub lost: Option<String>,
    /// How many ended tasks are kept (the most recently updated).
    keep_ended: usize,
}

/// The task number of `t-<n>`, for ordering.
fn number(id: &str) -> u64 {
    id.strip_prefix("t-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

pub fn has_ended(task: &TaskInfo) -> bool {
    matches!(
        TaskState::try_from(task.state),
        Ok(TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled)
    )
}

/// Text from agents and issues as one line a terminal shows as it is: no
/// control characters, tabs as spaces, line breaks as spaces.
pub fn one_line(text: &str) -> String {
    for_terminal(text.as_bytes())
        .replace('\t', "    ")
        .replace('\n', " ")
        .trim()
        .to_owned()
}

/// The lines of an output chunk a terminal may show (the CLI's events
/// readable, as `ccc logs` shows them); none for events not worth a line.
pub fn readable_lines(kind: i32, data: &[u8]) -> Vec<String> {
    let text = if kind == OutputKind::Event as i32 {
        match render_events(data) {
            Some(text) => text,
            None => return Vec::new(),
        }
    } else {
        String::from_utf8_lossy(data).into_owned()
    };
    text.lines()
        .map(one_line)
        .filter(|l| !l.is_empty())
        .collect()
}

/// The last readable line of an output chunk.
fn last_line(output: &TaskOutput) -> Option<String> {
    readable_lines(output.kind, &output.data).pop()
}

impl Model {
    pub fn new(keep_ended: usize) -> Self {
        Self {
            keep_ended,
            ..Self::default()
        }
    }

    /// Tasks as listed: those not yet ended, oldest first, then the ended
    /// ones, newest first.
    pub fn task_order(&self) -> Vec<&TaskInfo> {
        let mut tasks: Vec<&TaskInfo> = self.tasks.values().collect();
        tasks.sort_by_key(|t| {
            let n = number(&t.task_id);
            if has_ended(t) {
                (1, u64::MAX - n)
            } else {
                (0, n)
            }
        });
        tasks
    }

    /// The selected task's id: the one chosen, else the first listed.
    pub fn selected(&self) -> Option<&str> {
        self.selected
            .as_deref()
            .filter(|id| self.tasks.contains_key(*id))
            .or_else(|| self.task_order().first().map(|t| t.task_id.as_str()))
    }

    pub fn update(&mut self, msg: Msg) -> Option<Effect> {
        match msg {
            Msg::Feed(event) => {
                self.feed(*event);
                None
            }
            Msg::FeedLost(why) => {
                self.lost = Some(why);
                None
            }
            Msg::Key(key) => self.key(key),
            Msg::Log { task, line } => {
                if let Screen::Log(pane) = &mut self.screen
                    && pane.task == task
                {
                    pane.lines.push_back(line);
                    if pane.lines.len() > MAX_LOG_LINES {
                        pane.lines.pop_front();
                    }
                }
                None
            }
            Msg::Done(text) => {
                self.status = text;
                None
            }
        }
    }

    fn feed(&mut self, event: cluster_event::Event) {
        use cluster_event::Event;
        match event {
            Event::Snapshot(snapshot) => {
                self.lost = None;
                self.agents = snapshot
                    .agents
                    .into_iter()
                    .map(|a| (a.agent_id.clone(), a))
                    .collect();
                self.tasks = snapshot
                    .tasks
                    .into_iter()
                    .map(|t| (t.task_id.clone(), t))
                    .collect();
                self.lines = snapshot
                    .lines
                    .iter()
                    .filter_map(|l| Some((l.task_id.clone(), last_line(l)?)))
                    .collect();
            }
            Event::Agent(agent) => {
                self.agents.insert(agent.agent_id.clone(), agent);
            }
            Event::AgentForgotten(id) => {
                self.agents.remove(&id);
            }
            Event::Task(task) => {
                self.tasks.insert(task.task_id.clone(), task);
            }
            Event::Line(output) => {
                if let Some(line) = last_line(&output) {
                    self.lines.insert(output.task_id, line);
                }
            }
        }
        self.forget_old_ended();
    }

    /// Keeps the `keep_ended` most recently updated ended tasks.
    fn forget_old_ended(&mut self) {
        let mut ended: Vec<(i64, i32, String)> = self
            .tasks
            .values()
            .filter(|t| has_ended(t))
            .map(|t| {
                let at = t.updated_at.unwrap_or_default();
                (at.seconds, at.nanos, t.task_id.clone())
            })
            .collect();
        if ended.len() <= self.keep_ended {
            return;
        }
        ended.sort_unstable_by(|a, b| b.cmp(a));
        for (_, _, id) in ended.drain(self.keep_ended..) {
            self.tasks.remove(&id);
            self.lines.remove(&id);
        }
    }

    fn key(&mut self, key: Key) -> Option<Effect> {
        if key == Key::Interrupt {
            return Some(Effect::Quit);
        }
        match &self.screen {
            Screen::Tasks => self.key_on_tasks(key),
            Screen::ConfirmCancel(task) => {
                let task = task.clone();
                self.screen = Screen::Tasks;
                if key == Key::Char('y') {
                    self.status = format!("cancelling {task}");
                    Some(Effect::Cancel(task))
                } else {
                    self.status = format!("{task} not cancelled");
                    None
                }
            }
            Screen::Log(_) => match key {
                Key::Esc | Key::Char('q') => {
                    self.screen = Screen::Tasks;
                    Some(Effect::Unfollow)
                }
                _ => None,
            },
        }
    }

    fn key_on_tasks(&mut self, key: Key) -> Option<Effect> {
        match key {
            Key::Up | Key::Char('k') => {
                self.move_selection(-1);
                None
            }
            Key::Down | Key::Char('j') => {
                self.move_selection(1);
                None
            }
            Key::Esc | Key::Char('q') => Some(Effect::Quit),
            Key::Enter | Key::Char('l') => {
                let task = self.selected()?.to_owned();
                self.screen = Screen::Log(LogPane {
                    task: task.clone(),
                    lines: VecDeque::new(),
                });
                Some(Effect::Follow(task))
            }
            Key::Char('c') => {
                let task = self.tasks.get(self.selected()?)?;
                if has_ended(task) {
                    self.status = format!("{} has ended: nothing to cancel", task.task_id);
                    return None;
                }
                self.screen = Screen::ConfirmCancel(task.task_id.clone());
                None
            }
            Key::Char('r') => {
                let task = self.selected()?.to_owned();
                self.status = format!("retrying {task}");
                Some(Effect::Retry(task))
            }
            _ => None,
        }
    }

    fn move_selection(&mut self, by: isize) {
        let order: Vec<String> = self
            .task_order()
            .iter()
            .map(|t| t.task_id.clone())
            .collect();
        let Some(last) = order.len().checked_sub(1) else {
            return;
        };
        let at = self
            .selected()
            .and_then(|id| order.iter().position(|t| t == id))
            .unwrap_or(0);
        let to = at.saturating_add_signed(by).min(last);
        self.selected = order.get(to).cloned();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use common::proto::{ClusterSnapshot, TaskAttempt};

    use super::*;

    pub fn task(n: u64, state: TaskState, updated: i64) -> TaskInfo {
        TaskInfo {
            task_id: format!("t-{n}"),
            title: format!("task {n}"),
            state: state as i32,
            updated_at: Some(prost_types::Timestamp {
                seconds: updated,
                nanos: 0,
            }),
            attempts: vec![TaskAttempt {
                attempt: 1,
                agent_id: "pc-1".into(),
                ..TaskAttempt::default()
            }],
            ..TaskInfo::default()
        }
    }

    pub fn event_line(task: &str, text: &str) -> TaskOutput {
        let event = serde_json::json!({
            "type": "assistant",
            "message": {"content": [{"type": "text", "text": text}]},
        });
        TaskOutput {
            task_id: task.into(),
            attempt: 1,
            seq: 1,
            kind: OutputKind::Event as i32,
            data: event.to_string().into_bytes(),
        }
    }

    pub fn snapshot(tasks: Vec<TaskInfo>, lines: Vec<TaskOutput>) -> Msg {
        Msg::Feed(Box::new(cluster_event::Event::Snapshot(ClusterSnapshot {
            agents: vec![AgentInfo {
                agent_id: "pc-1".into(),
                ..AgentInfo::default()
            }],
            tasks,
            lines,
        })))
    }

    #[test]
    fn running_tasks_come_first_then_the_newest_ended_and_old_ended_ones_go() {
        let mut model = Model::new(2);
        model.update(snapshot(
            vec![
                task(1, TaskState::Succeeded, 10),
                task(2, TaskState::Running, 20),
                task(3, TaskState::Failed, 30),
                task(4, TaskState::Queued, 40),
            ],
            Vec::new(),
        ));
        let order = |m: &Model| {
            m.task_order()
                .iter()
                .map(|t| t.task_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&model), ["t-2", "t-4", "t-3", "t-1"]);
        model.update(Msg::Feed(Box::new(cluster_event::Event::Task(task(
            2,
            TaskState::Succeeded,
            50,
        )))));
        assert_eq!(
            order(&model),
            ["t-4", "t-3", "t-2"],
            "t-1 ended longest ago and is forgotten"
        );
    }

    #[test]
    fn a_chunk_becomes_its_last_readable_line() {
        let mut model = Model::new(5);
        model.update(snapshot(
            vec![task(1, TaskState::Running, 1)],
            vec![event_line("t-1", "working, step 1 of 9")],
        ));
        assert_eq!(model.lines["t-1"], "[claude] working, step 1 of 9");
        model.update(Msg::Feed(Box::new(cluster_event::Event::Line(
            TaskOutput {
                task_id: "t-1".into(),
                kind: OutputKind::Stdout as i32,
                data: b"one\n\x1b[2Jtwo\tcols\n\n".to_vec(),
                ..TaskOutput::default()
            },
        ))));
        assert_eq!(
            model.lines["t-1"], "[2Jtwo    cols",
            "no escape reaches the screen"
        );
        model.update(Msg::Feed(Box::new(cluster_event::Event::Line(
            TaskOutput {
                task_id: "t-1".into(),
                kind: OutputKind::Event as i32,
                data: br#"{"type":"user"}"#.to_vec(),
                ..TaskOutput::default()
            },
        ))));
        assert_eq!(
            model.lines["t-1"], "[2Jtwo    cols",
            "an event not worth a line keeps the last one"
        );
    }

    #[test]
    fn keys_select_follow_cancel_with_a_confirm_retry_and_go_back() {
        let mut model = Model::new(5);
        model.update(snapshot(
            vec![
                task(1, TaskState::Running, 1),
                task(2, TaskState::Running, 1),
                task(3, TaskState::Failed, 1),
            ],
            Vec::new(),
        ));
        assert_eq!(model.selected(), Some("t-1"), "the first row at first");
        model.update(Msg::Key(Key::Up));
        assert_eq!(model.selected(), Some("t-1"));
        model.update(Msg::Key(Key::Down));
        assert_eq!(model.selected(), Some("t-2"));

        assert_eq!(model.update(Msg::Key(Key::Char('c'))), None);
        assert_eq!(model.screen, Screen::ConfirmCancel("t-2".into()));
        assert_eq!(model.update(Msg::Key(Key::Char('n'))), None);
        assert_eq!(model.screen, Screen::Tasks);
        model.update(Msg::Key(Key::Char('c')));
        assert_eq!(
            model.update(Msg::Key(Key::Char('y'))),
            Some(Effect::Cancel("t-2".into()))
        );

        assert_eq!(
            model.update(Msg::Key(Key::Enter)),
            Some(Effect::Follow("t-2".into()))
        );
        model.update(Msg::Log {
            task: "t-1".into(),
            line: "from an earlier follow".into(),
        });
        model.update(Msg::Log {
            task: "t-2".into(),
            line: "mine".into(),
        });
        let Screen::Log(pane) = &model.screen else {
            panic!("the log pane is up");
        };
        assert_eq!(pane.lines, ["mine"]);
        assert_eq!(model.update(Msg::Key(Key::Char('r'))), None, "not on a log");
        assert_eq!(model.update(Msg::Key(Key::Esc)), Some(Effect::Unfollow));
        assert_eq!(model.screen, Screen::Tasks);

        model.update(Msg::Key(Key::Down));
        assert_eq!(model.selected(), Some("t-3"));
        assert_eq!(model.update(Msg::Key(Key::Char('c'))), None);
        assert_eq!(
            model.screen,
            Screen::Tasks,
            "an ended task is not cancelled"
        );
        assert_eq!(
            model.update(Msg::Key(Key::Char('r'))),
            Some(Effect::Retry("t-3".into()))
        );
        assert_eq!(model.update(Msg::Key(Key::Char('q'))), Some(Effect::Quit));
        assert_eq!(model.update(Msg::Key(Key::Interrupt)), Some(Effect::Quit));
    }
}

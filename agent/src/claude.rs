//! What the agent knows of the Claude Code CLI, in one place: the arguments
//! of a headless run and of its checks, the stream-json events it prints
//! (typed; unknown events and fields kept), its `result` event, and how an
//! attempt's outcome is read from the exit and the result together. The
//! runner only runs processes; the executor only sequences an attempt.

use std::sync::Mutex;
use std::time::Duration;

use common::types::{CliResult, Outcome};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::config::ClaudeConfig;
use crate::runner::{self, End, LineEvents};

/// `claude --version`: prints e.g. `2.1.332 (Claude Code)`.
pub const VERSION_ARGS: [&str; 1] = ["--version"];
/// `claude auth status --json`: JSON with `loggedIn`.
pub const AUTH_STATUS_ARGS: [&str; 3] = ["auth", "status", "--json"];
/// The longest result text kept on an attempt.
const MAX_RESULT_TEXT: usize = 4096;
/// The longest model name kept.
const MAX_MODEL_NAME: usize = 128;

/// The argument vector of one run: headless, stream-json events (which
/// require --verbose), edits allowed without prompting. The prompt is not
/// among them: it goes on stdin, where `-p` reads it when no prompt
/// argument is given, because one argument is limited to 128 KiB on Linux
/// and cannot be mistaken for an option there.
pub fn run_args(config: &ClaudeConfig) -> Vec<String> {
    let mut args = vec![
        "-p".to_owned(),
        "--output-format".into(),
        "stream-json".into(),
        "--verbose".into(),
        "--permission-mode".into(),
        config.permission_mode.clone(),
        "--max-turns".into(),
        config.max_turns.to_string(),
    ];
    if let Some(budget) = config.max_budget_usd {
        args.extend(["--max-budget-usd".into(), budget.to_string()]);
    }
    if let Some(model) = &config.model {
        args.extend(["--model".into(), model.clone()]);
    }
    if !config.allowed_tools.is_empty() {
        args.extend(["--allowedTools".into(), config.allowed_tools.join(",")]);
    }
    if !config.disallowed_tools.is_empty() {
        args.extend([
            "--disallowedTools".into(),
            config.disallowed_tools.join(","),
        ]);
    }
    if let Some(extra) = &config.append_system_prompt {
        args.extend(["--append-system-prompt".into(), extra.clone()]);
    }
    args.extend(config.extra_args.iter().cloned());
    args
}

/// What `claude auth status --json` says of the login: `None` for output
/// this agent does not understand (a CLI without the command).
pub fn logged_in(auth_status_stdout: &str) -> Option<bool> {
    #[derive(Deserialize)]
    struct AuthStatus {
        #[serde(rename = "loggedIn")]
        logged_in: bool,
    }
    serde_json::from_str::<AuthStatus>(auth_status_stdout.trim())
        .ok()
        .map(|s| s.logged_in)
}

/// One stream-json event: a JSON object on a line with a string `type`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// `system` (`init` names the session, the model and the version).
    System(SystemEvent),
    /// `assistant`: text and tool calls.
    Assistant(MessageEvent),
    /// `user`: tool results.
    User(MessageEvent),
    /// `result`: how the run ended.
    Result(ResultEvent),
    /// A `type` this agent does not know, kept whole.
    Other {
        kind: String,
        fields: Map<String, Value>,
    },
}

impl Event {
    /// The event a stdout line holds, if it is one.
    pub fn parse(line: &[u8]) -> Option<Self> {
        let mut fields: Map<String, Value> = serde_json::from_slice(line).ok()?;
        let kind = fields.get("type")?.as_str()?.to_owned();
        fields.remove("type");
        // Converting the other fields cannot fail: every typed field is
        // lenient, and the rest is kept as it is.
        Some(match kind.as_str() {
            "system" => Self::System(lenient_value(Value::Object(fields))),
            "assistant" => Self::Assistant(lenient_value(Value::Object(fields))),
            "user" => Self::User(lenient_value(Value::Object(fields))),
            "result" => Self::Result(lenient_value(Value::Object(fields))),
            _ => Self::Other { kind, fields },
        })
    }
}

/// `T` from a JSON value, or its default when the value does not fit.
fn lenient_value<T: DeserializeOwned + Default>(value: Value) -> T {
    serde_json::from_value(value).unwrap_or_default()
}

/// A field that takes its default when the CLI sends it with another
/// shape, so one odd field cannot hide the rest of an event.
fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(d: D) -> Result<T, D::Error> {
    Ok(lenient_value(Value::deserialize(d)?))
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct SystemEvent {
    #[serde(default, deserialize_with = "lenient")]
    pub subtype: String,
    #[serde(default, deserialize_with = "lenient")]
    pub session_id: String,
    #[serde(default, deserialize_with = "lenient")]
    pub model: String,
    #[serde(default, deserialize_with = "lenient")]
    pub claude_code_version: String,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct MessageEvent {
    #[serde(default, deserialize_with = "lenient")]
    pub session_id: String,
    /// The API message (`content`: text, tool_use, tool_result blocks).
    #[serde(default)]
    pub message: Value,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// The run's last event: how it ended, what it cost.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct ResultEvent {
    /// `success`, `error_max_turns`, `error_max_budget_usd`,
    /// `error_during_execution`, ...; a failed API call still says
    /// `success` with `is_error`.
    #[serde(default, deserialize_with = "lenient")]
    pub subtype: String,
    #[serde(default, deserialize_with = "lenient")]
    pub is_error: bool,
    #[serde(default, deserialize_with = "lenient")]
    pub num_turns: u64,
    #[serde(default, deserialize_with = "lenient")]
    pub duration_ms: u64,
    #[serde(default, deserialize_with = "lenient")]
    pub total_cost_usd: f64,
    #[serde(default, deserialize_with = "lenient")]
    pub session_id: String,
    /// The final text, or the error ("Not logged in · Please run /login").
    #[serde(default, deserialize_with = "lenient")]
    pub result: String,
    /// The API's HTTP status when a call failed.
    #[serde(default, deserialize_with = "lenient")]
    pub api_error_status: Option<u64>,
    /// Usage by model name.
    #[serde(default, rename = "modelUsage", deserialize_with = "lenient")]
    pub model_usage: Map<String, Value>,
    #[serde(default, deserialize_with = "lenient")]
    pub model: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl ResultEvent {
    /// What an attempt records of the run.
    pub fn summary(&self) -> CliResult {
        CliResult {
            cost_usd: self.total_cost_usd,
            turns: u32::try_from(self.num_turns).unwrap_or(u32::MAX),
            duration_ms: self.duration_ms,
            session_id: self.session_id.clone(),
            is_error: self.is_error,
            subtype: self.subtype.clone(),
            result: self.result.chars().take(MAX_RESULT_TEXT).collect(),
            // The models the run used (`modelUsage`); the first by name.
            model: self
                .model_usage
                .keys()
                .next()
                .or(self.model.as_ref())
                .map(|m| m.chars().take(MAX_MODEL_NAME).collect())
                .unwrap_or_default(),
        }
    }

    /// The reset time of a usage limit, in Unix milliseconds (0 when none is
    /// given): the CLI's message ends with `|<unix seconds>` ("Claude AI
    /// usage limit reached|1700000000").
    pub fn rate_limit_reset_unix_ms(&self) -> u64 {
        self.result
            .rsplit_once('|')
            .and_then(|(_, secs)| secs.trim().parse::<u64>().ok())
            .map_or(0, |secs| secs.saturating_mul(1000))
    }
}

/// Watches a run's stdout: its events are marked as such, and the `result`
/// event is kept for the outcome (also when it spans several chunks).
#[derive(Default)]
pub struct EventWatch {
    result: Mutex<Option<ResultEvent>>,
}

impl EventWatch {
    /// The run's `result` event, if it printed one.
    pub fn take_result(&self) -> Option<ResultEvent> {
        self.result.lock().ok().and_then(|mut r| r.take())
    }
}

impl LineEvents for EventWatch {
    fn observe(&self, line: &[u8]) -> bool {
        match Event::parse(line) {
            Some(Event::Result(result)) => {
                if let Ok(mut kept) = self.result.lock() {
                    *kept = Some(result);
                }
                true
            }
            Some(_) => true,
            None => false,
        }
    }
}

/// How the CLI run went, from its end and its `result` event together.
pub fn outcome(
    end: &End,
    result: Option<&ResultEvent>,
    deadline: Duration,
) -> (Outcome, String, Option<CliResult>) {
    let cli = result.map(ResultEvent::summary);
    let status = match end {
        End::Stopped => return (Outcome::Cancelled, "stopped on request".into(), cli),
        End::TimedOut => {
            return (
                Outcome::TimedOut,
                format!("the CLI did not finish within {}s", deadline.as_secs()),
                cli,
            );
        }
        End::Exited(status) => *status,
    };
    let exit = runner::exit_text(status);
    let exited_0 = status.is_some_and(|s| s.success());
    let (Some(r), Some(c)) = (result, cli.as_ref()) else {
        return if exited_0 {
            (
                Outcome::Succeeded,
                "the CLI exited 0 without a result event".into(),
                cli,
            )
        } else {
            (
                Outcome::CliFailed,
                format!("the CLI crashed (exit {exit}) without a result"),
                cli,
            )
        };
    };
    let api_status = r.api_error_status;
    let text = c.result.to_ascii_lowercase();
    let (outcome, message) = if exited_0 && !c.is_error {
        (
            Outcome::Succeeded,
            format!("the CLI finished in {} turns", c.turns),
        )
    } else if c.subtype == "error_max_turns" {
        (
            Outcome::TurnLimit,
            format!("the CLI stopped at its turn limit after {} turns", c.turns),
        )
    } else if c.subtype.contains("budget") {
        (
            Outcome::BudgetExceeded,
            format!("the CLI stopped at its budget after ${:.4}", c.cost_usd),
        )
    } else if api_status == Some(429) || text.contains("usage limit") || text.contains("rate limit")
    {
        (
            Outcome::RateLimited,
            format!("the API's usage or rate limit was reached: {}", c.result),
        )
    } else if text.contains("not logged in") {
        (
            Outcome::AgentFault,
            format!("the CLI is not logged in on this PC: {}", c.result),
        )
    } else if api_status == Some(401) || text.contains("invalid api key") {
        (
            Outcome::AgentFault,
            format!(
                "the API refused this PC's credentials (HTTP 401; check ANTHROPIC_API_KEY or the login): {}",
                c.result
            ),
        )
    } else if let Some(code) = api_status {
        (
            Outcome::CliFailed,
            format!("the API failed with HTTP {code}: {}", c.result),
        )
    } else {
        (
            Outcome::CliFailed,
            format!("the CLI failed (exit {exit}): {}", c.result),
        )
    };
    (outcome, message, cli)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(json: Value) -> ResultEvent {
        match Event::parse(json.to_string().as_bytes()) {
            Some(Event::Result(r)) => r,
            other => panic!("not a result: {other:?}"),
        }
    }

    fn exit(code: i32) -> End {
        use std::os::unix::process::ExitStatusExt;
        End::Exited(Some(std::process::ExitStatus::from_raw(code << 8)))
    }

    #[test]
    fn outcomes_read_both_the_exit_code_and_the_result_event() {
        let d = Duration::from_secs(60);
        let outcome_of =
            |end: End, json: Option<Value>| outcome(&end, json.map(result).as_ref(), d);
        let ok = serde_json::json!({"type":"result","subtype":"success","is_error":false,"num_turns":3,"result":"done"});
        assert_eq!(outcome_of(exit(0), Some(ok)).0, Outcome::Succeeded);
        let api = serde_json::json!({"type":"result","subtype":"success","is_error":true,"api_error_status":500,"result":"API Error: 500"});
        let (o, m, _) = outcome_of(exit(1), Some(api));
        assert_eq!(o, Outcome::CliFailed);
        assert!(m.contains("HTTP 500"), "{m}");
        let turns = serde_json::json!({"type":"result","subtype":"error_max_turns","is_error":true,"num_turns":2});
        assert_eq!(outcome_of(exit(1), Some(turns)).0, Outcome::TurnLimit);
        let limited = serde_json::json!({"type":"result","subtype":"success","is_error":true,"result":"Claude AI usage limit reached|1700000000"});
        assert_eq!(
            outcome_of(exit(1), Some(limited.clone())).0,
            Outcome::RateLimited
        );
        assert_eq!(
            result(limited).rate_limit_reset_unix_ms(),
            1_700_000_000_000
        );
        let login = serde_json::json!({"type":"result","is_error":true,"result":"Not logged in · Please run /login"});
        let (o, m, _) = outcome_of(exit(1), Some(login));
        assert_eq!(o, Outcome::AgentFault);
        assert!(m.contains("not logged in"), "{m}");
        // What the real CLI 2.1 prints for a key the API refuses.
        let key = serde_json::json!({"type":"result","subtype":"success","is_error":true,"api_error_status":401,"result":"Invalid API key · Fix external API key"});
        let (o, m, _) = outcome_of(exit(1), Some(key));
        assert_eq!(o, Outcome::AgentFault);
        assert!(
            m.contains("HTTP 401") && m.contains("Invalid API key"),
            "{m}"
        );
        assert_eq!(outcome_of(exit(139), None).0, Outcome::CliFailed);
        assert_eq!(outcome_of(End::TimedOut, None).0, Outcome::TimedOut);
        assert_eq!(outcome_of(End::Stopped, None).0, Outcome::Cancelled);
    }

    #[test]
    fn events_are_typed_and_unknown_events_and_fields_are_kept() {
        let init = br#"{"type":"system","subtype":"init","session_id":"s1","model":"claude-x","claude_code_version":"2.1.332","tools":["Edit"]}"#;
        let Some(Event::System(system)) = Event::parse(init) else {
            panic!("not a system event");
        };
        assert_eq!(
            (system.subtype.as_str(), system.model.as_str()),
            ("init", "claude-x")
        );
        assert_eq!(system.other["tools"], serde_json::json!(["Edit"]));
        let future = br#"{"type":"stream_event","event":{"delta":"x"}}"#;
        assert_eq!(
            Event::parse(future),
            Some(Event::Other {
                kind: "stream_event".into(),
                fields: serde_json::from_str(r#"{"event":{"delta":"x"}}"#).expect("json"),
            })
        );
        // Not events: plain text, JSON without a string type.
        assert_eq!(Event::parse(b"plain text"), None);
        assert_eq!(Event::parse(br#"{"type":3}"#), None);
        assert_eq!(Event::parse(b"[1,2]"), None);
    }

    #[test]
    fn an_odd_field_does_not_hide_the_rest_of_a_result() {
        let odd = serde_json::json!({
            "type": "result", "subtype": "success", "is_error": "yes", "num_turns": -4,
            "total_cost_usd": 0.5, "result": null, "modelUsage": {"claude-opus": {}},
            "permission_denials": [],
        });
        let r = result(odd);
        assert_eq!(r.subtype, "success");
        assert!(!r.is_error);
        assert_eq!(r.num_turns, 0);
        assert_eq!(r.result, "");
        assert!((r.total_cost_usd - 0.5).abs() < 1e-9);
        assert_eq!(r.summary().model, "claude-opus");
        assert!(r.other.contains_key("permission_denials"));
    }

    #[test]
    fn login_state_is_read_from_auth_status() {
        assert_eq!(
            logged_in(r#"{"loggedIn": true, "authMethod": "api_key"}"#),
            Some(true)
        );
        assert_eq!(logged_in("  {\"loggedIn\": false}\n"), Some(false));
        assert_eq!(logged_in("unknown command auth"), None);
    }

    #[test]
    fn run_arguments_are_headless_stream_json_with_the_limits() {
        let config = ClaudeConfig {
            program: "claude".into(),
            prompt_template: None,
            permission_mode: "acceptEdits".into(),
            max_turns: 30,
            max_budget_usd: Some(2.5),
            model: Some("sonnet".into()),
            allowed_tools: vec!["Edit".into(), "Bash(git:*)".into()],
            disallowed_tools: Vec::new(),
            append_system_prompt: None,
            extra_args: vec!["--debug".into()],
            env: Vec::new(),
            timeout: Duration::from_secs(60),
            kill_grace: Duration::from_secs(5),
        };
        assert_eq!(
            run_args(&config).join(" "),
            "-p --output-format stream-json --verbose --permission-mode acceptEdits \
             --max-turns 30 --max-budget-usd 2.5 --model sonnet --allowedTools Edit,Bash(git:*) --debug"
        );
    }
}

//! The coordinator's metrics, served on `/metrics` in the Prometheus text
//! format (prometheus-client). Two kinds:
//!
//! - gauges of the state as it is (tasks by state and specialty, the queue,
//!   agents, slots, the outbox), set at scrape time from a [`Snapshot`] the
//!   driver answers without writing anything;
//! - counters and histograms of what happened, recorded where it happens:
//!   the driver after a commit ([`TaskEvents`] turns committed writes into
//!   [`Observation`]s), the webhook handler, the GitHub client and the
//!   outbox worker.
//!
//! Label values come from small closed sets (states, specialties,
//! outcomes, results) or are agent names (few, and certified): never task
//! ids or free text.

mod observe;
mod snapshot;
#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use observe::{Observation, TaskEvents};
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
pub use snapshot::Snapshot;

use crate::core::outbox::Effect;

/// The answer to a webhook delivery, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WebhookResult {
    TaskCreated,
    /// A `/claude` command changed a task.
    CommandApplied,
    /// Seen before (GitHub redelivered it): nothing done.
    Duplicate,
    /// Nothing to do: an event, repository or author that starts no work,
    /// or a command declined.
    Ignored,
    Ping,
    /// No signature, or not the configured secret's.
    BadSignature,
    /// Headers, content type or payload not as GitHub sends them.
    BadRequest,
    TooLarge,
    /// Webhooks are not configured, GitHub could not be asked, or the
    /// coordinator is stopping.
    Unavailable,
}

impl WebhookResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskCreated => "task_created",
            Self::CommandApplied => "command_applied",
            Self::Duplicate => "duplicate",
            Self::Ignored => "ignored",
            Self::Ping => "ping",
            Self::BadSignature => "bad_signature",
            Self::BadRequest => "bad_request",
            Self::TooLarge => "too_large",
            Self::Unavailable => "unavailable",
        }
    }
}

/// How one request to GitHub's API went, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GithubCallResult {
    /// A 2xx answer.
    Success,
    /// GitHub asked to wait (429, or a 403 with the limit spent).
    RateLimited,
    /// Another 4xx.
    ClientError,
    /// A 5xx.
    ServerError,
    /// No answer (network, timeout) or an answer that could not be read.
    Transport,
}

impl GithubCallResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "2xx",
            Self::RateLimited => "rate_limited",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
            Self::Transport => "error",
        }
    }
}

/// The metrics registry and its families; cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TaskLabels {
    state: &'static str,
    specialty: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AgentLabel {
    agent: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EffectLabel {
    effect: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Debug)]
struct Inner {
    registry: Registry,
    /// Held while the gauges are set from a snapshot and encoded, so two
    /// scrapes cannot mix their snapshots.
    scrape: Mutex<()>,
    tasks: Family<TaskLabels, Gauge>,
    queue_depth: Gauge,
    agents: Family<StateLabel, Gauge>,
    agent_slots: Family<AgentLabel, Gauge>,
    agent_slots_free: Family<AgentLabel, Gauge>,
    slots_free: Gauge,
    outbox_depth: Gauge,
    queue_wait: Histogram,
    store_commit: Histogram,
    task_duration: HistogramFamily<StateLabel>,
    attempts: Family<OutcomeLabel, Counter>,
    output_bytes: Counter,
    cli_cost: Counter<f64, AtomicU64>,
    cli_turns: Counter,
    webhooks: Family<ResultLabel, Counter>,
    github_calls: Family<ResultLabel, Counter>,
    github_retries: Family<EffectLabel, Counter>,
}

impl Inner {
    /// Names and explains every family (counters get `_total` when encoded).
    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "ccc_tasks",
            "Tasks by state and specialty",
            self.tasks.clone(),
        );
        r.register(
            "ccc_queue_depth",
            "Tasks waiting for an agent (state queued), a retry backoff included",
            self.queue_depth.clone(),
        );
        r.register("ccc_agents", "Known agents by state", self.agents.clone());
        r.register(
            "ccc_agent_slots",
            "Slots an agent advertised (tasks it runs at once)",
            self.agent_slots.clone(),
        );
        r.register(
            "ccc_agent_slots_free",
            "Slots of an agent the scheduler may fill now (none while it is disconnected, draining, unhealthy or cooling down)",
            self.agent_slots_free.clone(),
        );
        r.register(
            "ccc_slots_free",
            "Slots the scheduler may fill now, over every agent",
            self.slots_free.clone(),
        );
        r.register(
            "ccc_outbox_depth",
            "GitHub writes owed (status comments, pull requests), due or waiting to retry",
            self.outbox_depth.clone(),
        );
        r.register(
            "ccc_task_queue_wait_seconds",
            "Time from a task's submission (or its latest requeue) to its assignment to an agent, per assignment",
            self.queue_wait.clone(),
        );
        r.register(
            "ccc_store_commit_seconds",
            "Time to commit one batch of state changes to the store (its transaction and flush), per batch",
            self.store_commit.clone(),
        );
        r.register(
            "ccc_task_duration_seconds",
            "Time from a task's submission to its terminal state, by that state",
            self.task_duration.clone(),
        );
        r.register(
            "ccc_attempts",
            "Attempts ended, by outcome",
            self.attempts.clone(),
        );
        r.register(
            "ccc_output_stored_bytes",
            "Bytes of task output stored",
            self.output_bytes.clone(),
        );
        r.register(
            "ccc_cli_cost_usd",
            "Cost the Claude Code CLI reported for ended attempts, in US dollars",
            self.cli_cost.clone(),
        );
        r.register(
            "ccc_cli_turns",
            "Turns the Claude Code CLI reported for ended attempts",
            self.cli_turns.clone(),
        );
        r.register(
            "ccc_webhook_deliveries",
            "GitHub webhook deliveries by how they were answered",
            self.webhooks.clone(),
        );
        r.register(
            "ccc_github_api_calls",
            "Requests to GitHub's API by result (2xx, 4xx, 5xx, rate_limited, error)",
            self.github_calls.clone(),
        );
        r.register(
            "ccc_github_retries",
            "GitHub writes of the outbox that failed and will be tried again, by effect",
            self.github_retries.clone(),
        );
    }
}

/// Waits in the queue: 100 ms to about 55 min, doubling.
fn queue_wait_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 16))
}

/// Store commits: 25 us to about 0.8 s, doubling.
fn store_commit_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_025, 2.0, 16))
}

/// Task durations: 1 s to about 9 h, doubling.
fn task_duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut inner = Inner {
            registry: Registry::default(),
            scrape: Mutex::new(()),
            tasks: Family::default(),
            queue_depth: Gauge::default(),
            agents: Family::default(),
            agent_slots: Family::default(),
            agent_slots_free: Family::default(),
            slots_free: Gauge::default(),
            outbox_depth: Gauge::default(),
            queue_wait: queue_wait_buckets(),
            store_commit: store_commit_buckets(),
            task_duration: Family::new_with_constructor(task_duration_buckets),
            attempts: Family::default(),
            output_bytes: Counter::default(),
            cli_cost: Counter::default(),
            cli_turns: Counter::default(),
            webhooks: Family::default(),
            github_calls: Family::default(),
            github_retries: Family::default(),
        };
        inner.register();
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Records what a commit changed.
    pub fn record(&self, observations: &[Observation]) {
        let m = &self.inner;
        for observation in observations {
            match *observation {
                Observation::Assigned { waited } => m.queue_wait.observe(waited.as_secs_f64()),
                Observation::AttemptEnded {
                    outcome,
                    cost_usd,
                    turns,
                } => {
                    m.attempts
                        .get_or_create(&OutcomeLabel {
                            outcome: outcome.as_str(),
                        })
                        .inc();
                    if cost_usd.is_finite() && cost_usd > 0.0 {
                        m.cli_cost.inc_by(cost_usd);
                    }
                    m.cli_turns.inc_by(u64::from(turns));
                }
                Observation::TaskEnded { state, took } => {
                    m.task_duration
                        .get_or_create(&StateLabel {
                            state: state.as_str(),
                        })
                        .observe(took.as_secs_f64());
                }
                Observation::OutputStored { bytes } => {
                    m.output_bytes.inc_by(bytes);
                }
            }
        }
    }

    /// Records how long one commit to the store took.
    pub fn store_commit(&self, took: std::time::Duration) {
        self.inner.store_commit.observe(took.as_secs_f64());
    }

    pub fn webhook_delivery(&self, result: WebhookResult) {
        self.inner
            .webhooks
            .get_or_create(&ResultLabel {
                result: result.as_str(),
            })
            .inc();
    }

    pub fn github_call(&self, result: GithubCallResult) {
        self.inner
            .github_calls
            .get_or_create(&ResultLabel {
                result: result.as_str(),
            })
            .inc();
    }

    pub fn github_retry(&self, effect: Effect) {
        self.inner
            .github_retries
            .get_or_create(&EffectLabel {
                effect: effect.as_str(),
            })
            .inc();
    }

    /// Every family in the Prometheus text format, gauges as of `snapshot`.
    pub fn encode(&self, snapshot: &Snapshot) -> String {
        let m = &self.inner;
        let _scrape = m.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        for ((state, specialty), n) in &snapshot.tasks {
            m.tasks
                .get_or_create(&TaskLabels { state, specialty })
                .set(gauge(*n));
        }
        m.queue_depth.set(gauge(snapshot.queue_depth));
        for (state, n) in &snapshot.agents {
            m.agents.get_or_create(&StateLabel { state }).set(gauge(*n));
        }
        // Agents come and go (an admin forgets one): only those of this
        // snapshot are shown.
        m.agent_slots.clear();
        m.agent_slots_free.clear();
        for slots in &snapshot.slots {
            let label = AgentLabel {
                agent: slots.agent.to_string(),
            };
            m.agent_slots
                .get_or_create(&label)
                .set(i64::from(slots.capacity));
            m.agent_slots_free
                .get_or_create(&label)
                .set(i64::from(slots.free));
        }
        m.slots_free.set(
            snapshot
                .slots
                .iter()
                .map(|s| i64::from(s.free))
                .sum::<i64>(),
        );
        m.outbox_depth.set(gauge(snapshot.outbox_depth));
        let mut text = String::new();
        // Writing into a String cannot fail; the encoder's own errors are
        // formatting errors of the same writer.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &m.registry);
        text
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

//! `bench`: the cluster's performance figures, each printed with a
//! baseline measured in the same run on the same machine, the ratio, the
//! goal and whether it is met. Benchmarks print; a person judges. Tests
//! never time anything.
//!
//! Every scenario starts real components on loopback: the release
//! `ccc-coordinator` and `ccc-agent` binaries (found next to the `bench`
//! binary), a PKI made with `common::pki`, sled on disk in the bench's data
//! directory, and simulated agents (`sim`) that speak the real protocol
//! over mTLS, each with its own certificate. Counts and durations are
//! bounded; `--quick` shrinks them so that a whole run stays under two
//! minutes.
//!
//! Baselines (`baselines`) are measured once, on first use, and reused by
//! every figure of the run that compares against them.

pub mod agents;
pub mod baselines;
pub mod coord;
pub mod flow;
pub mod mirror;
pub mod output;
pub mod proc;
pub mod sched;
pub mod sim;
pub mod store;
pub mod triage;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use sched::config as sched_config;

/// The one clock read of the bench: a benchmark is a driver.
#[allow(clippy::disallowed_methods)] // the bench measures wall-clock time
pub fn now() -> Instant {
    Instant::now()
}

/// How a value is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Secs,
    PerSec,
    /// Bytes per second, shown in MB/s (10^6).
    BytesPerSec,
    Bytes,
    /// Percent of one core.
    Percent,
    /// A plain count.
    Count,
    /// A small number, shown with three decimals.
    Fraction,
}

/// A measured quantity.
#[derive(Clone, Copy, Debug)]
pub struct Q {
    pub v: f64,
    pub unit: Unit,
}

impl Q {
    pub fn time(d: Duration) -> Self {
        Self {
            v: d.as_secs_f64(),
            unit: Unit::Secs,
        }
    }
    pub fn secs(v: f64) -> Self {
        Self {
            v,
            unit: Unit::Secs,
        }
    }
    pub fn rate(v: f64) -> Self {
        Self {
            v,
            unit: Unit::PerSec,
        }
    }
    pub fn bw(v: f64) -> Self {
        Self {
            v,
            unit: Unit::BytesPerSec,
        }
    }
    pub fn bytes(v: f64) -> Self {
        Self {
            v,
            unit: Unit::Bytes,
        }
    }
    pub fn pct(v: f64) -> Self {
        Self {
            v,
            unit: Unit::Percent,
        }
    }
    pub fn fraction(v: f64) -> Self {
        Self {
            v,
            unit: Unit::Fraction,
        }
    }
    pub fn count(v: f64) -> Self {
        Self {
            v,
            unit: Unit::Count,
        }
    }
}

impl std::fmt::Display for Q {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.v;
        match self.unit {
            Unit::Secs => {
                let us = v * 1e6;
                if us < 1000.0 {
                    write!(f, "{us:.1} us")
                } else if us < 1e6 {
                    write!(f, "{:.2} ms", us / 1e3)
                } else {
                    write!(f, "{v:.2} s")
                }
            }
            Unit::PerSec => {
                if v >= 1e4 {
                    write!(f, "{:.1}k/s", v / 1e3)
                } else {
                    write!(f, "{v:.0}/s")
                }
            }
            Unit::BytesPerSec => write!(f, "{:.1} MB/s", v / 1e6),
            Unit::Bytes => {
                if v >= (1u64 << 30) as f64 {
                    write!(f, "{:.2} GiB", v / (1u64 << 30) as f64)
                } else if v >= (1 << 20) as f64 {
                    write!(f, "{:.1} MiB", v / (1 << 20) as f64)
                } else if v >= 1024.0 {
                    write!(f, "{:.1} KiB", v / 1024.0)
                } else {
                    write!(f, "{v:.0} B")
                }
            }
            Unit::Percent => write!(f, "{v:.1} %"),
            Unit::Count => write!(f, "{v:.0}"),
            Unit::Fraction => write!(f, "{v:.3}"),
        }
    }
}

/// One printed row: a baseline (no goal) or a figure with its goal.
#[derive(Clone, Debug)]
pub struct Figure {
    pub name: String,
    pub value: Q,
    /// What the value is compared with, and its value.
    pub baseline: Option<(String, Q)>,
    /// `-` for a baseline row.
    pub goal: String,
    pub met: Option<bool>,
}

impl Figure {
    /// A baseline row.
    pub fn base(name: impl Into<String>, value: Q) -> Self {
        Self {
            name: name.into(),
            value,
            baseline: None,
            goal: "-".into(),
            met: None,
        }
    }

    /// A figure compared with `baseline`; `met` says whether the goal holds.
    pub fn with(
        name: impl Into<String>,
        value: Q,
        baseline: (impl Into<String>, Q),
        goal: impl Into<String>,
        met: bool,
    ) -> Self {
        Self {
            name: name.into(),
            value,
            baseline: Some((baseline.0.into(), baseline.1)),
            goal: goal.into(),
            met: Some(met),
        }
    }

    /// A figure with an absolute goal and no baseline.
    pub fn absolute(name: impl Into<String>, value: Q, goal: impl Into<String>, met: bool) -> Self {
        Self {
            name: name.into(),
            value,
            baseline: None,
            goal: goal.into(),
            met: Some(met),
        }
    }

    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .filter(|(_, b)| b.v != 0.0 && b.unit == self.value.unit)
            .map(|(_, b)| self.value.v / b.v)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    pub quick: bool,
    pub json: bool,
    pub markdown: bool,
    pub filter: Option<String>,
    pub data_dir: Option<PathBuf>,
}

/// What a scenario is: its key (what the filter matches), what it
/// measures and what it runs.
pub struct Scenario {
    pub key: &'static str,
    pub about: &'static str,
    pub run: fn(&mut Ctx),
}

/// Every scenario, baselines first.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            key: "fsync",
            about: "B1 raw fsync of a 4 KiB append, durable write bandwidth",
            run: |c| {
                c.fsync();
            },
        },
        Scenario {
            key: "sled",
            about: "B2 sled insert and flush",
            run: |c| {
                c.sled();
            },
        },
        Scenario {
            key: "stream",
            about: "B3 raw tonic bidi stream over mTLS",
            run: |c| {
                c.stream();
            },
        },
        Scenario {
            key: "unary",
            about: "B4 raw unary round trip, driver read",
            run: |c| {
                c.unary();
            },
        },
        Scenario {
            key: "git",
            about: "B5 git clone --local, git:// clone",
            run: |c| {
                c.git();
            },
        },
        Scenario {
            key: "submit",
            about: "durable submit ack, acks/s with 100 submitters",
            run: flow::submit,
        },
        Scenario {
            key: "webhook",
            about: "signed webhook in to Assign",
            run: flow::webhook,
        },
        Scenario {
            key: "pipeline",
            about: "submit assign accept finish, 500 simulated agents",
            run: flow::pipeline,
        },
        Scenario {
            key: "output",
            about: "agent output into sled at 4 KiB chunks",
            run: output::through_coordinator,
        },
        Scenario {
            key: "real-agent",
            about: "the real agent streaming 50 MB of CLI output",
            run: output::real_agent,
        },
        Scenario {
            key: "schedule",
            about: "scheduling decision in the pure core, 10,000 queued, 500 agents",
            run: sched::run,
        },
        Scenario {
            key: "agents",
            about: "heartbeats of 500 agent streams, memory per idle agent",
            run: agents::run,
        },
        Scenario {
            key: "store",
            about: "100,000 finished tasks: submit, RSS; restart with 1 GiB of output",
            run: store::large,
        },
        Scenario {
            key: "mirror",
            about: "workspace ready for the second task (mirror cache)",
            run: mirror::run,
        },
        Scenario {
            key: "disk",
            about: "on-disk size after 1,000 tasks with output",
            run: store::disk,
        },
        Scenario {
            key: "triage",
            about: "triage of a typical issue and of a 1 MB body",
            run: triage::run,
        },
    ]
}

/// The state of one run: options, the data directory, the runtime, the
/// baselines measured so far and the figures.
pub struct Ctx {
    pub opts: Options,
    pub dir: PathBuf,
    pub rt: tokio::runtime::Runtime,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
    /// Durable acks per second with 100 submitters (the `submit` figure),
    /// which the pipeline figure compares against.
    pub ack_rate: Option<f64>,
    fsync: Option<baselines::Fsync>,
    sled: Option<baselines::Sled>,
    stream: Option<baselines::Stream>,
    unary: Option<baselines::Unary>,
    git: Option<baselines::Git>,
}

impl Ctx {
    pub fn new(opts: Options) -> Self {
        let dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("data/bench"));
        std::fs::create_dir_all(&dir).expect("create the bench's data dir");
        let dir = std::path::absolute(&dir).expect("absolute data dir");
        common::tls::install_crypto_provider();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        Self {
            opts,
            dir,
            rt,
            figures: Vec::new(),
            notes: Vec::new(),
            ack_rate: None,
            fsync: None,
            sled: None,
            stream: None,
            unary: None,
            git: None,
        }
    }

    /// `full` in a full run, `quick` with `--quick`.
    pub fn n<T>(&self, full: T, quick: T) -> T {
        if self.opts.quick { quick } else { full }
    }

    /// Adds a row (and says so on stderr, for a long run).
    pub fn push(&mut self, f: Figure) {
        eprintln!("  {}: {}", f.name, f.value);
        self.figures.push(f);
    }

    /// A line printed under the table (what a figure counted, why it missed).
    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("  note: {text}");
        self.notes.push(text);
    }

    /// A fresh directory for one scenario. What an earlier run left there
    /// is moved aside and deleted only at the end of this run: on ext4,
    /// creating many files right after deleting many is several times
    /// slower (the inode allocator skips recently deleted inodes), which
    /// would bias the clone and workspace figures.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let dir = self.dir.join("run").join(name);
        if dir.exists() {
            let trash = self.dir.join("trash");
            std::fs::create_dir_all(&trash).expect("trash dir");
            let aside = trash.join(format!("{name}-{}", self.dir_seq()));
            std::fs::rename(&dir, &aside).expect("move an old scratch dir aside");
        }
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    fn dir_seq(&self) -> u128 {
        std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos())
    }

    /// Deletes what `scratch` moved aside.
    pub fn empty_trash(&self) {
        let _ = std::fs::remove_dir_all(self.dir.join("trash"));
    }

    pub fn fsync(&mut self) -> baselines::Fsync {
        if self.fsync.is_none() {
            let b = baselines::fsync(self);
            self.fsync = Some(b);
        }
        self.fsync.clone().expect("measured")
    }

    pub fn sled(&mut self) -> baselines::Sled {
        if self.sled.is_none() {
            let b = baselines::sled(self);
            self.sled = Some(b);
        }
        self.sled.clone().expect("measured")
    }

    pub fn stream(&mut self) -> baselines::Stream {
        if self.stream.is_none() {
            let b = baselines::stream(self);
            self.stream = Some(b);
        }
        self.stream.clone().expect("measured")
    }

    pub fn unary(&mut self) -> baselines::Unary {
        if self.unary.is_none() {
            let b = baselines::unary(self);
            self.unary = Some(b);
        }
        self.unary.clone().expect("measured")
    }

    pub fn git(&mut self) -> baselines::Git {
        if self.git.is_none() {
            let b = baselines::git(self);
            self.git = Some(b);
        }
        self.git.clone().expect("measured")
    }
}

/// A task's spec with the given parts, the rest empty.
pub fn spec(
    repo: &str,
    title: &str,
    body: &str,
    branch: &str,
    specialty: common::types::Specialty,
) -> common::types::TaskSpec {
    common::types::TaskSpec {
        repo_url: repo.to_owned(),
        base_branch: String::new(),
        issue_number: 0,
        title: title.to_owned(),
        body: body.to_owned(),
        issue_url: String::new(),
        author: String::new(),
        labels: Vec::new(),
        specialty,
        technologies: Vec::new(),
        branch: branch.to_owned(),
        follow_up: false,
        test_command: String::new(),
    }
}

/// Sorted timings and their percentiles.
#[derive(Clone, Debug)]
pub struct Timings(Vec<Duration>);

impl Timings {
    pub fn new(mut v: Vec<Duration>) -> Self {
        v.sort();
        assert!(!v.is_empty(), "no timings");
        Self(v)
    }

    pub fn at(&self, q: f64) -> Duration {
        self.0[((self.0.len() - 1) as f64 * q).round() as usize]
    }

    pub fn p50(&self) -> Duration {
        self.at(0.5)
    }

    pub fn p99(&self) -> Duration {
        self.at(0.99)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Times `runs` calls of `f`.
pub fn measure(runs: usize, mut f: impl FnMut()) -> Timings {
    Timings::new(
        (0..runs)
            .map(|_| {
                let start = now();
                f();
                start.elapsed()
            })
            .collect(),
    )
}

/// Runs the scenarios the filter selects and prints the table.
pub fn main(opts: Options) -> std::process::ExitCode {
    let started = now();
    let all = scenarios();
    let chosen: Vec<&Scenario> = all
        .iter()
        .filter(|s| opts.filter.as_deref().is_none_or(|f| s.key.contains(f)))
        .collect();
    if chosen.is_empty() {
        let keys: Vec<&str> = all.iter().map(|s| s.key).collect();
        eprintln!("bench: no scenario matches the filter (scenarios: {keys:?})");
        return std::process::ExitCode::from(2);
    }
    let mut ctx = Ctx::new(opts);
    for s in chosen {
        eprintln!("bench: {} ({})", s.key, s.about);
        // Every scenario starts with nothing of the one before still to be
        // written back: a disk busy with an earlier scenario's gigabyte
        // would be measured as this one's.
        settle_disk();
        (s.run)(&mut ctx);
    }
    let took = started.elapsed();
    print(&ctx, took);
    ctx.empty_trash();
    std::process::ExitCode::SUCCESS
}

/// Writes every dirty page back (`sync`) before a scenario.
fn settle_disk() {
    if let Err(e) = std::process::Command::new("sync").status() {
        eprintln!("bench: sync failed ({e}); the disk may still be busy");
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn print(ctx: &Ctx, took: Duration) {
    let figures = &ctx.figures;
    if ctx.opts.json {
        for f in figures {
            println!(
                "{}",
                serde_json::json!({
                    "figure": f.name,
                    "value": f.value.v,
                    "unit": format!("{:?}", f.value.unit).to_lowercase(),
                    "shown": f.value.to_string(),
                    "baseline": f.baseline.as_ref().map(|(n, _)| n),
                    "baseline_value": f.baseline.as_ref().map(|(_, b)| b.v),
                    "ratio": f.ratio(),
                    "goal": f.goal,
                    "met": f.met,
                })
            );
        }
        return;
    }
    let mode = if ctx.opts.quick {
        "quick run"
    } else {
        "full run"
    };
    let met = |f: &Figure| match f.met {
        None => "-",
        Some(true) => "yes",
        Some(false) => "NO",
    };
    let ratio = |f: &Figure| f.ratio().map_or_else(|| "-".to_owned(), show_ratio);
    let base = |f: &Figure| {
        f.baseline
            .as_ref()
            .map_or_else(|| "-".to_owned(), |(n, b)| format!("{n}: {b}"))
    };
    if ctx.opts.markdown {
        println!(
            "Machine: {} cores; {mode}, {:.0} s.\n",
            cores(),
            took.as_secs_f64()
        );
        println!("| figure | value | baseline | ratio | goal | met |");
        println!("| --- | --- | --- | --- | --- | --- |");
        for f in figures {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                f.name,
                f.value,
                base(f),
                ratio(f),
                f.goal,
                met(f)
            );
        }
    } else {
        println!(
            "machine: {} cores; {mode}, {:.0} s",
            cores(),
            took.as_secs_f64()
        );
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<52} {:>12}  {:<46} {:>8}  {:<30} MET",
            "FIGURE", "VALUE", "BASELINE", "RATIO", "GOAL"
        );
        for f in figures {
            let _ = writeln!(
                out,
                "{:<52} {:>12}  {:<46} {:>8}  {:<30} {}",
                f.name,
                f.value.to_string(),
                base(f),
                ratio(f),
                f.goal,
                met(f)
            );
        }
        print!("{out}");
    }
    if !ctx.notes.is_empty() {
        println!();
        for n in &ctx.notes {
            println!("- {n}");
        }
    }
}

fn show_ratio(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 10.0 {
        format!("{r:.1}x")
    } else {
        format!("{r:.2}x")
    }
}

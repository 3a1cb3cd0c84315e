//! `bench`: the cluster's performance figures, each printed with a baseline
//! measured in the same run on the same machine, the ratio, the goal and
//! whether it is met. Benchmarks print; a person judges. Tests never time.
//!
//! `bench [--quick] [--json] [FILTER]`: `--quick` runs fewer rounds,
//! `--json` prints one JSON object per figure, `FILTER` keeps the figures
//! whose name contains it.

use std::hint::black_box;
use std::time::{Duration, Instant};

use coordinator::triage::{Issue, Rules, triage};

/// One printed row.
struct Figure {
    name: &'static str,
    value: Duration,
    baseline_name: &'static str,
    baseline: Duration,
    goal: Goal,
}

/// What a figure must stay under.
enum Goal {
    Absolute(Duration),
}

impl Figure {
    fn met(&self) -> bool {
        match self.goal {
            Goal::Absolute(limit) => self.value <= limit,
        }
    }

    fn goal_text(&self) -> String {
        match self.goal {
            Goal::Absolute(limit) => format!("<= {}", show(limit)),
        }
    }

    fn ratio(&self) -> f64 {
        self.value.as_secs_f64() / self.baseline.as_secs_f64().max(1e-12)
    }
}

fn show(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} us")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

struct Options {
    quick: bool,
    json: bool,
    filter: Option<String>,
}

fn main() -> std::process::ExitCode {
    let mut options = Options {
        quick: false,
        json: false,
        filter: None,
    };
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--json" => options.json = true,
            "-h" | "--help" => {
                println!("usage: bench [--quick] [--json] [FILTER]");
                return std::process::ExitCode::SUCCESS;
            }
            other if other.starts_with('-') => {
                eprintln!(
                    "bench: unknown option {other} (usage: bench [--quick] [--json] [FILTER])"
                );
                return std::process::ExitCode::from(2);
            }
            other => options.filter = Some(other.to_owned()),
        }
    }
    let wanted = |name: &str| options.filter.as_deref().is_none_or(|f| name.contains(f));
    let mut figures = Vec::new();
    if wanted("triage") {
        figures.extend(triage_figures(options.quick));
    }
    if figures.is_empty() {
        eprintln!("bench: no figure matches the filter");
        return std::process::ExitCode::from(2);
    }
    print(&figures, &options);
    std::process::ExitCode::SUCCESS
}

fn print(figures: &[Figure], options: &Options) {
    if options.json {
        for f in figures {
            println!(
                "{}",
                serde_json::json!({
                    "figure": f.name,
                    "value_us": f.value.as_secs_f64() * 1e6,
                    "baseline": f.baseline_name,
                    "baseline_us": f.baseline.as_secs_f64() * 1e6,
                    "ratio": f.ratio(),
                    "goal": f.goal_text(),
                    "met": f.met(),
                })
            );
        }
        return;
    }
    println!(
        "machine: {} cores; {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if options.quick {
            "quick run"
        } else {
            "full run"
        }
    );
    println!(
        "{:<38} {:>11}  {:<34} {:>11} {:>9}  {:<12} MET",
        "FIGURE", "VALUE", "BASELINE", "BASE", "RATIO", "GOAL"
    );
    for f in figures {
        println!(
            "{:<38} {:>11}  {:<34} {:>11} {:>8.1}x  {:<12} {}",
            f.name,
            show(f.value),
            f.baseline_name,
            show(f.baseline),
            f.ratio(),
            f.goal_text(),
            if f.met() { "yes" } else { "NO" }
        );
    }
}

/// The median and the 99th percentile of `runs` timings of `f`.
fn measure(runs: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            #[allow(clippy::disallowed_methods)] // a benchmark reads the clock
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

#[derive(serde::Deserialize)]
struct Corpus {
    issue: Vec<CorpusIssue>,
}

#[derive(serde::Deserialize)]
struct CorpusIssue {
    title: String,
    body: String,
    #[serde(default)]
    labels: Vec<String>,
}

/// Triage of a typical issue (every issue of the corpus, in turn) and of
/// a 1 MB body. The baseline is one pass over the same text (lowercasing
/// it), the least any reading of it costs.
fn triage_figures(quick: bool) -> Vec<Figure> {
    let rules = Rules::defaults();
    let corpus: Corpus = toml::from_str(include_str!(
        "../../../coordinator/src/triage/corpus/tune.toml"
    ))
    .expect("the corpus parses");
    let issues = &corpus.issue;
    let rounds = if quick { 2 } else { 20 };
    let mut next = 0;
    let (typical, typical_p99) = measure(issues.len() * rounds, || {
        let i = &issues[next % issues.len()];
        next += 1;
        black_box(triage(
            &Issue {
                title: &i.title,
                body: &i.body,
                labels: &i.labels,
                languages: &[],
            },
            &rules,
        ));
    });
    next = 0;
    let (typical_scan, typical_scan_p99) = measure(issues.len() * rounds, || {
        let i = &issues[next % issues.len()];
        next += 1;
        black_box(i.title.to_lowercase());
        black_box(i.body.to_lowercase());
    });
    // 1 MB of issue text: prose, code blocks and traces from the corpus.
    let mut big = String::new();
    let mut k = 0;
    while big.len() < 1 << 20 {
        big.push_str(&issues[k % issues.len()].body);
        big.push('\n');
        k += 1;
    }
    let runs = if quick { 5 } else { 30 };
    let (large, _) = measure(runs, || {
        black_box(triage(
            &Issue {
                title: "A pasted log",
                body: &big,
                labels: &[],
                languages: &[],
            },
            &rules,
        ));
    });
    let (large_scan, _) = measure(runs, || {
        black_box(big.to_lowercase());
    });
    vec![
        Figure {
            name: "triage of a typical issue, p50",
            value: typical,
            baseline_name: "one pass over its text, p50",
            baseline: typical_scan,
            goal: Goal::Absolute(Duration::from_millis(1)),
        },
        Figure {
            name: "triage of a typical issue, p99",
            value: typical_p99,
            baseline_name: "one pass over its text, p99",
            baseline: typical_scan_p99,
            goal: Goal::Absolute(Duration::from_millis(1)),
        },
        Figure {
            name: "triage of a 1 MB body, p50",
            value: large,
            baseline_name: "one pass over the 1 MB, p50",
            baseline: large_scan,
            goal: Goal::Absolute(Duration::from_millis(50)),
        },
    ]
}

//! Triage of a typical issue (every issue of the corpus's tuning part, in
//! turn) and of a 1 MB body. The baseline is one pass over the same text
//! (lowercasing it), the least any reading of it costs.

use std::hint::black_box;
use std::time::Duration;

use coordinator::triage::{Issue, Rules, triage};

use super::{Ctx, Figure, Q, measure};

#[derive(serde::Deserialize)]
struct Corpus {
    issue: Vec<CorpusIssue>,
}

#[derive(serde::Deserialize)]
pub(crate) struct CorpusIssue {
    pub title: String,
    pub body: String,
    #[serde(default)]
    pub labels: Vec<String>,
}

/// The triage corpus's tuning part: realistic issues.
pub(crate) fn corpus() -> Vec<CorpusIssue> {
    let corpus: Corpus = toml::from_str(include_str!(
        "../../../coordinator/src/triage/corpus/tune.toml"
    ))
    .expect("the corpus parses");
    corpus.issue
}

pub fn run(ctx: &mut Ctx) {
    let rules = Rules::defaults();
    let issues = corpus();
    let rounds = ctx.n(20, 2);
    let mut next = 0;
    let typical = measure(issues.len() * rounds, || {
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
    let scan = measure(issues.len() * rounds, || {
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
    let runs = ctx.n(30, 5);
    let large = measure(runs, || {
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
    let large_scan = measure(runs, || {
        black_box(big.to_lowercase());
    });
    let ms = Duration::from_millis;
    for (name, value, base_name, base, limit) in [
        (
            "triage of a typical issue, p50",
            typical.p50(),
            "one pass over its text, p50",
            scan.p50(),
            ms(1),
        ),
        (
            "triage of a typical issue, p99",
            typical.p99(),
            "one pass over its text, p99",
            scan.p99(),
            ms(1),
        ),
        (
            "triage of a 1 MB body, p50",
            large.p50(),
            "one pass over the 1 MB, p50",
            large_scan.p50(),
            ms(50),
        ),
    ] {
        ctx.push(Figure::with(
            name,
            Q::time(value),
            (base_name, Q::time(base)),
            format!("<= {}", Q::time(limit)),
            value <= limit,
        ));
    }
}

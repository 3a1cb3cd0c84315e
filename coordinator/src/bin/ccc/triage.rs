//! `ccc triage`: triage one issue offline, exactly as the coordinator would,
//! to see why it would go where it goes, or to try a rules file before
//! deploying it. Needs no coordinator and no certificates.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use common::proto::TriageReport;
use coordinator::core::TaskTriage;
use coordinator::triage::{self, Issue, Rules};
use serde::Deserialize;

use crate::table::specialty_name;
use crate::tasks::say;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    ccc triage --title 'Save button hidden on Safari' --label bug\n  \
    echo '{\"title\": \"CIが落ちる\", \"body\": \"...\"}' | ccc triage - --json\n  \
    ccc triage issue.json --rules my-rules.toml")]
pub struct TriageArgs {
    /// A JSON file with {"title", "body", "labels": [...], "languages": [...]};
    /// "-" reads it from standard input.
    #[arg(conflicts_with_all = ["title", "body", "label", "language"])]
    file: Option<PathBuf>,
    /// The issue's title.
    #[arg(long, required_unless_present = "file")]
    title: Option<String>,
    /// The issue's body.
    #[arg(long)]
    body: Option<String>,
    /// A label of the issue; repeat for more.
    #[arg(long)]
    label: Vec<String>,
    /// A language of the repository, as GitHub names it; repeat for more.
    #[arg(long)]
    language: Vec<String>,
    /// A rules file that extends the built-in rules (or replaces them with
    /// `extends = false`), as the coordinator's --triage-rules does.
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Print JSON: specialty, confidence, scores, complexity, technologies,
    /// keywords, evidence, unclear, missing.
    #[arg(long)]
    json: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueFile {
    title: String,
    #[serde(default)]
    body: String,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    languages: Vec<String>,
}

pub fn run(args: TriageArgs) -> anyhow::Result<()> {
    let rules = Rules::load_or_defaults(args.rules.as_deref())?;
    let issue = match &args.file {
        Some(path) => {
            let (name, text) = if path.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("cannot read the issue from standard input")?;
                ("standard input".to_owned(), text)
            } else {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                (path.display().to_string(), text)
            };
            serde_json::from_str::<IssueFile>(&text)
                .with_context(|| format!("{name} is not an issue as JSON"))?
        }
        None => IssueFile {
            title: args.title.unwrap_or_default(),
            body: args.body.unwrap_or_default(),
            labels: args.label,
            languages: args.language,
        },
    };
    let result = triage::triage(
        &Issue {
            title: &issue.title,
            body: &issue.body,
            labels: &issue.labels,
            languages: &issue.languages,
        },
        &rules,
    );
    if args.json {
        let mut out = serde_json::to_string_pretty(&result)?;
        out.push('\n');
        say(&out)
    } else {
        let report = coordinator::grpc::triage_report(&TaskTriage {
            result,
            specialty_given: false,
        });
        say(&lines(&report))
    }
}

/// A triage for people: the verdict, the scores, and the evidence.
pub fn lines(r: &TriageReport) -> String {
    let mut out = format!(
        "specialty:    {} (confidence {:.2}{})\n",
        specialty_name(r.specialty),
        r.confidence,
        if r.specialty_given {
            "; the submitter named the task's specialty"
        } else {
            ""
        }
    );
    let mut scores: Vec<(&String, &f64)> = r.scores.iter().collect();
    scores.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
    out.push_str(&format!(
        "scores:       {}\n",
        scores
            .iter()
            .map(|(s, v)| format!("{s} {v:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out.push_str(&format!("complexity:   {}\n", r.complexity));
    if !r.technologies.is_empty() {
        out.push_str(&format!("technologies: {}\n", r.technologies.join(", ")));
    }
    if !r.keywords.is_empty() {
        out.push_str(&format!("keywords:     {}\n", r.keywords.join(", ")));
    }
    if r.unclear {
        out.push_str("unclear:      the issue gives nothing to act on; ask for:\n");
        for m in &r.missing {
            out.push_str(&format!("              - {m}\n"));
        }
    }
    if !r.evidence.is_empty() {
        out.push_str("evidence:\n");
        for e in &r.evidence {
            let counts_for = if e.specialty == 0 {
                format!("technology {}", e.technology)
            } else if e.technology.is_empty() {
                specialty_name(e.specialty).to_owned()
            } else {
                format!("{} ({})", specialty_name(e.specialty), e.technology)
            };
            out.push_str(&format!(
                "  {:>+7.2}  {:<8} {:<22} {}\n",
                e.weight, e.source, counts_for, e.signal
            ));
        }
    }
    out
}

/// The triage in `ccc task --json`, in the shape `ccc triage --json` prints.
pub fn json(r: &TriageReport) -> serde_json::Value {
    serde_json::json!({
        "specialty": specialty_name(r.specialty),
        "confidence": r.confidence,
        "scores": r.scores,
        "complexity": r.complexity,
        "technologies": r.technologies,
        "keywords": r.keywords,
        "evidence": r.evidence.iter().map(|e| {
            let mut v = serde_json::json!({
                "signal": e.signal,
                "source": e.source,
                "weight": e.weight,
            });
            if e.specialty != 0 {
                v["specialty"] = specialty_name(e.specialty).into();
            }
            if !e.technology.is_empty() {
                v["technology"] = e.technology.clone().into();
            }
            v
        }).collect::<Vec<_>>(),
        "unclear": r.unclear,
        "missing": r.missing,
        "specialty_given": r.specialty_given,
    })
}

//! Triage: from an issue's text to the specialty that should work on it,
//! the technologies it needs, how large the ask is, and the evidence for
//! each, so that a person can see why.
//!
//! Pure and deterministic: no I/O, no clock, no randomness; the same issue
//! and rules give the same answer, byte for byte in JSON. The rules are data
//! (`rules.rs`, defaults in `default_rules.toml`).
//!
//! How an issue is read: labels first (a `frontend` label is strong, `bug`
//! says nothing), then weighted terms in the title (counting double) and the
//! body, code blocks, stack traces and the files they name (a frame's file
//! says more than a word), and file paths mentioned anywhere. English terms
//! match whole words; Japanese has no spaces, so Japanese terms match as
//! substrings (`テスト`, `CIが落ちる`). Each signal counts once per place,
//! and repeated signals for one specialty in one place count less and less:
//! signals are weighed, not counted. Terms that say what to change
//! ("typo in the README", "flaky test") carry more weight than the technical
//! words an issue merely mentions.

use std::collections::{BTreeMap, BTreeSet};

use common::types::Specialty;
use serde::{Deserialize, Serialize};

pub mod rules;
mod text;

#[cfg(test)]
mod tests;

use rules::Meaning;
pub use rules::{Error, Rules, Source};

/// What triage reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct Issue<'a> {
    pub title: &'a str,
    pub body: &'a str,
    pub labels: &'a [String],
    /// The repository's languages, when known (GitHub issues).
    pub languages: &'a [String],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Complexity {
    Low,
    Medium,
    High,
}

impl Complexity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }
}

/// One signal that counted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The term, label, language or file as found.
    pub signal: String,
    pub source: Source,
    /// What it added to the score, after the place's weight and the
    /// diminishing count of repeated signals.
    pub weight: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specialty: Option<Specialty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub technology: Option<String>,
}

/// The result. Field order is the JSON's (`ccc triage --json`); it is also
/// stored with the task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Triage {
    pub specialty: Specialty,
    /// 0..=1: how clearly the chosen specialty stands out.
    pub confidence: f64,
    pub scores: BTreeMap<Specialty, f64>,
    pub complexity: Complexity,
    pub technologies: Vec<String>,
    pub keywords: Vec<String>,
    pub evidence: Vec<Evidence>,
    /// The issue gives nothing to act on; `missing` says what to ask for.
    pub unclear: bool,
    pub missing: Vec<String>,
}

/// At most this many evidence entries are kept (the strongest).
const MAX_EVIDENCE: usize = 40;
const MAX_KEYWORDS: usize = 20;

/// Triage of one issue. Never fails and never panics: any text, however
/// large or strange, gives an answer (the most of it that is read is
/// bounded, see `text::MAX_READ`).
pub fn triage(issue: &Issue<'_>, rules: &Rules) -> Triage {
    let title = text::normalise(bounded(issue.title));
    let body = text::normalise(bounded(issue.body));
    let parts = text::parts(&body);
    let mut acc = Acc::default();

    for label in issue.labels.iter().take(100) {
        let name = text::normalise(label.trim());
        if let Some((specialty, weight)) = label_rule(rules, &name) {
            acc.add(
                Meaning::Specialty(specialty),
                weight * rules.weights[&Source::Label],
                label.trim(),
                Source::Label,
            );
        }
    }
    for language in issue.languages.iter().take(50) {
        if let Some((specialty, weight)) = rules.languages.get(&language.trim().to_lowercase()) {
            acc.add(
                Meaning::Specialty(*specialty),
                weight * rules.weights[&Source::Language],
                language.trim(),
                Source::Language,
            );
        }
    }
    for (source, text) in [
        (Source::Title, title.as_str()),
        (Source::Body, parts.prose.as_str()),
        (Source::Code, parts.code.as_str()),
        (Source::Trace, parts.trace.as_str()),
    ] {
        acc.terms(rules, source, text);
    }
    let title_paths = text::file_paths(&title);
    for (source, paths) in [
        (Source::Trace, &parts.trace_paths),
        (Source::Path, &parts.paths),
        (Source::Path, &title_paths),
    ] {
        for path in paths {
            acc.path(rules, source, path);
        }
    }
    acc.finish(
        rules,
        &parts.shape,
        parts.paths.len() + parts.trace_paths.len() + title_paths.len(),
    )
}

fn bounded(s: &str) -> &str {
    if s.len() <= text::MAX_READ {
        return s;
    }
    let mut end = text::MAX_READ;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A label's rule: the whole label, else one of its parts (`area/frontend`,
/// `type: docs`).
fn label_rule(rules: &Rules, name: &str) -> Option<(Specialty, f64)> {
    rules.labels.get(name).copied().or_else(|| {
        name.split(['/', ':', ' ', '_', '-', '.'])
            .filter_map(|p| rules.labels.get(p).copied())
            .max_by(|a, b| a.1.total_cmp(&b.1))
    })
}

#[derive(Default)]
struct Acc {
    /// Each (signal, place, meaning) counts once, with its weight.
    seen: BTreeMap<(String, Source, String), (Meaning, f64)>,
    technologies: BTreeSet<String>,
    vague: usize,
    large: usize,
    small: usize,
    detail: usize,
}

impl Acc {
    fn add(&mut self, meaning: Meaning, weight: f64, signal: &str, source: Source) {
        if let Meaning::Technology(name, _) = &meaning {
            self.technologies.insert(name.clone());
        }
        let key = (signal.to_owned(), source, meaning.key());
        if let Some(known) = self.seen.get_mut(&key) {
            // Said again: the strongest reading counts (a word cleared in
            // one sentence and asked for in another is asked for).
            known.1 = known.1.max(weight);
            return;
        }
        match meaning {
            Meaning::Vague => self.vague += 1,
            Meaning::Large => self.large += 1,
            Meaning::Small => self.small += 1,
            Meaning::Detail => self.detail += 1,
            Meaning::Specialty(_) | Meaning::Technology(..) | Meaning::Clears | Meaning::Asks => {}
        }
        self.seen.insert(key, (meaning, weight));
    }

    /// The terms of one place, sentence by sentence: in prose, a sentence
    /// that clears what it names ("the frontend is fine") turns its
    /// specialty words against, one that asks for the change counts them
    /// more. What the issue asks to change decides, not every word it uses.
    fn terms(&mut self, rules: &Rules, source: Source, text: &str) {
        let place = rules.weights[&source];
        // (position, term index) of every whole-word match, in order.
        let found: Vec<(usize, usize)> = rules
            .matcher
            .find_iter(text)
            .filter_map(|m| {
                let term = &rules.terms[m.pattern().as_usize()];
                let before = text[..m.start()].chars().next_back();
                let after = text[m.end()..].chars().next();
                let is_word =
                    |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
                let cut = (term.word_start && is_word(before)) || (term.word_end && is_word(after));
                (!cut).then_some((m.start(), m.pattern().as_usize()))
            })
            .collect();
        let judged = source == Source::Body;
        // Each term once, with the strongest reading of any sentence it is
        // in (a word cleared in one sentence and asked for in another is
        // asked for).
        let mut factors: BTreeMap<usize, f64> = BTreeMap::new();
        let mut next = 0;
        for (_, end) in text::sentences(text) {
            let first = next;
            while next < found.len() && found[next].0 < end {
                next += 1;
            }
            let in_sentence = &found[first..next];
            let has = |wanted: &Meaning| {
                in_sentence
                    .iter()
                    .any(|(_, t)| rules.terms[*t].meanings.iter().any(|(m, _)| m == wanted))
            };
            let factor = if !judged {
                1.0
            } else if has(&Meaning::Clears) {
                rules.clears_factor
            } else if has(&Meaning::Asks) {
                rules.asks_factor
            } else {
                1.0
            };
            for (_, t) in in_sentence {
                let known = factors.entry(*t).or_insert(f64::MIN);
                *known = known.max(factor);
            }
        }
        for (t, factor) in factors {
            let term = &rules.terms[t];
            for (meaning, weight) in &term.meanings {
                let factor = match meaning {
                    Meaning::Specialty(_) | Meaning::Technology(..) => factor,
                    _ => 1.0,
                };
                self.add(meaning.clone(), weight * place * factor, &term.text, source);
            }
        }
    }

    /// A file counts for the specialty of its strongest matching rule (a
    /// `tests/…/Header.test.tsx` is a test before it is a component), and
    /// for every technology its rules name.
    fn path(&mut self, rules: &Rules, source: Source, path: &str) {
        let place = rules.weights[&source];
        let mut best: Option<(Specialty, f64)> = None;
        for m in rules.path_matcher.find_overlapping_iter(path) {
            let rule = &rules.paths[m.pattern().as_usize()];
            if cuts_a_name(path, m.end()) {
                // `.cs` in `style.css`: a pattern ends where a name goes on.
                continue;
            }
            for (meaning, weight) in &rule.meanings {
                match meaning {
                    Meaning::Specialty(s) if best.is_none_or(|(_, w)| *weight > w) => {
                        best = Some((*s, *weight));
                    }
                    Meaning::Technology(name, _) => {
                        self.technologies.insert(name.clone());
                    }
                    _ => {}
                }
            }
        }
        if let Some((specialty, weight)) = best {
            self.add(Meaning::Specialty(specialty), weight * place, path, source);
        }
    }

    fn finish(self, rules: &Rules, shape: &text::Shape, n_paths: usize) -> Triage {
        // Per specialty and place, the strongest signal counts fully, the
        // next half, the next a third...: many weak mentions do not beat
        // one strong signal.
        let mut by_place: BTreeMap<(Specialty, Source), Vec<Counted<'_>>> = BTreeMap::new();
        for ((signal, source, _), (meaning, weight)) in &self.seen {
            let (specialty, technology) = match meaning {
                Meaning::Specialty(s) => (*s, None),
                Meaning::Technology(name, Some(s)) => (*s, Some(name.as_str())),
                _ => continue,
            };
            by_place.entry((specialty, *source)).or_default().push((
                *weight,
                signal.as_str(),
                technology,
            ));
        }
        let mut scores: BTreeMap<Specialty, f64> =
            Specialty::ALL.iter().map(|s| (*s, 0.0)).collect();
        let mut evidence = Vec::new();
        for ((specialty, source), mut signals) in by_place {
            signals.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
            // Signals against count in full; those for, less and less.
            let mut rank = 0.0;
            for (weight, signal, technology) in signals {
                let counted = if weight > 0.0 {
                    rank += 1.0;
                    weight / rank
                } else {
                    weight
                };
                *scores.entry(specialty).or_default() += counted;
                evidence.push(Evidence {
                    signal: signal.to_owned(),
                    source,
                    weight: round(counted),
                    specialty: Some(specialty),
                    technology: technology.map(str::to_owned),
                });
            }
        }
        // Technologies that vote for nothing are evidence too.
        for ((signal, source, _), (meaning, weight)) in &self.seen {
            if let Meaning::Technology(name, None) = meaning {
                evidence.push(Evidence {
                    signal: signal.clone(),
                    source: *source,
                    weight: round(*weight),
                    specialty: None,
                    technology: Some(name.clone()),
                });
            }
        }
        evidence.sort_by(|a, b| {
            b.weight
                .total_cmp(&a.weight)
                .then_with(|| a.source.cmp(&b.source))
                .then_with(|| a.signal.cmp(&b.signal))
        });
        let mut keywords: Vec<String> = Vec::new();
        for e in &evidence {
            if !matches!(e.source, Source::Path | Source::Label | Source::Language)
                && !keywords.contains(&e.signal)
                && keywords.len() < MAX_KEYWORDS
            {
                keywords.push(e.signal.clone());
            }
        }
        evidence.truncate(MAX_EVIDENCE);
        for v in scores.values_mut() {
            *v = round(v.max(0.0));
        }

        let mut ranked: Vec<(Specialty, f64)> = scores.iter().map(|(s, v)| (*s, *v)).collect();
        // Highest first; on a tie the specialist before `general`, then the
        // fixed order of `Specialty::ALL`.
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let (top, top_score) = ranked[0];
        let second = ranked.get(1).map_or(0.0, |r| r.1);
        let specialist_best = ranked
            .iter()
            .filter(|(s, _)| *s != Specialty::General)
            .map(|(_, v)| *v)
            .fold(0.0, f64::max);

        let mut missing = Vec::new();
        let has_place = n_paths > 0 || specialist_best >= rules.min_score;
        if !has_place {
            missing.push(
                "which part of the project is affected (a page, an endpoint, a file, a command)"
                    .to_owned(),
            );
        }
        if shape.trace_lines == 0 && shape.code_blocks == 0 {
            missing.push("the error message or logs".to_owned());
        }
        if self.detail == 0 && shape.list_items == 0 {
            missing.push("steps to reproduce, and what was expected instead".to_owned());
        }
        let unclear = !has_place
            && missing.len() >= 3
            && (self.vague > 0 || shape.prose_chars < 80)
            && top_score < rules.min_score * 3.0;
        let (specialty, confidence) = if unclear || top_score < rules.min_score {
            // Nothing points anywhere: too vague to route to a specialist.
            let sure = if top == Specialty::General {
                top_score
            } else {
                0.0
            };
            (
                Specialty::General,
                round(0.3 + 0.4 * (sure / (sure + rules.min_score))),
            )
        } else {
            let margin = (top_score - second) / top_score;
            let strength = top_score / (top_score + 2.0 * rules.min_score);
            (top, round(0.6 * margin + 0.4 * strength))
        };
        if !unclear {
            missing.clear();
        }

        let complexity = if self.large > 0
            || shape.checklist_items >= 5
            || n_paths >= 6
            || shape.list_items >= 10
        {
            Complexity::High
        } else if self.small > 0
            || (shape.prose_chars < 160 && n_paths <= 1 && shape.trace_lines == 0)
        {
            Complexity::Low
        } else {
            Complexity::Medium
        };

        Triage {
            specialty,
            confidence,
            scores,
            complexity,
            technologies: self.technologies.into_iter().collect(),
            keywords,
            evidence,
            unclear,
            missing,
        }
    }
}

/// Whether a path pattern matched up to `end` stops inside a name: the
/// pattern's last character and the next one are both letters or digits.
fn cuts_a_name(path: &str, end: usize) -> bool {
    let before = path[..end].chars().next_back();
    let after = path[end..].chars().next();
    before.is_some_and(char::is_alphanumeric) && after.is_some_and(char::is_alphanumeric)
}

/// One signal's weight, its text and the technology it names, if any.
type Counted<'a> = (f64, &'a str, Option<&'a str>);

/// Three decimals: stable JSON, no float noise.
fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

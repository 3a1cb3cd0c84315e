//! Triage rules are data: a TOML file, with the defaults built in. A file
//! given with `--rules` extends the defaults (its terms are added, a term
//! it names again takes its weight) unless it says `extends = false`, in
//! which case it replaces them. Every rule is checked when loaded, with the
//! offending entry named.

use std::collections::BTreeMap;
use std::path::Path;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};
use common::types::Specialty;
use serde::Deserialize;

/// The rules this build starts from.
pub const DEFAULT_RULES: &str = include_str!("default_rules.toml");

/// The rules format this build reads.
pub const RULES_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read rules file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("rules file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("rules file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// Where in an issue a signal was found; each place has its own weight.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Title,
    Body,
    /// Inside a fenced code block.
    Code,
    /// A stack trace line, or a file a trace frame names.
    Trace,
    /// A file path mentioned in the text.
    Path,
    Label,
    /// The repository's languages, as GitHub reports them.
    Language,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Title => "title",
            Self::Body => "body",
            Self::Code => "code",
            Self::Trace => "trace",
            Self::Path => "path",
            Self::Label => "label",
            Self::Language => "language",
        }
    }
}

/// What a matched term means.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Meaning {
    /// A vote for a specialty.
    Specialty(Specialty),
    /// A technology (normalised name), with an optional weak vote.
    Technology(String, Option<Specialty>),
    /// Words of a report that says nothing ("not working", "動かない").
    Vague,
    /// Words of a large ask (RFC, migration, rename across the codebase).
    Large,
    /// Words of a small ask (typo, one-line).
    Small,
    /// The issue gives steps, an expectation, or a concrete place.
    Detail,
    /// The sentence clears what it names ("the frontend is fine", "APIは
    /// 正しく返しています"): its specialty words count against.
    Clears,
    /// The sentence asks for the change ("should", "please", "直してください"):
    /// its specialty words count more.
    Asks,
}

impl Meaning {
    /// Two meanings of one term are the same rule when this is equal: a
    /// later rules file replaces its weight.
    pub(super) fn key(&self) -> String {
        match self {
            Self::Specialty(s) => format!("specialty {s}"),
            Self::Technology(name, _) => format!("technology {name}"),
            Self::Vague => "vague".into(),
            Self::Large => "large".into(),
            Self::Small => "small".into(),
            Self::Detail => "detail".into(),
            Self::Clears => "clears".into(),
            Self::Asks => "asks".into(),
        }
    }
}

/// A term and everything it means (`typo` is a vote for `general` and a
/// sign of a small ask).
#[derive(Clone, Debug)]
pub(super) struct Term {
    pub(super) text: String,
    pub(super) meanings: Vec<(Meaning, f64)>,
    /// A term that starts (ends) with an ASCII letter or digit must start
    /// (end) a word: `ci` is not found in "specific", but is in "CIが落ちる".
    /// Japanese has no spaces, so other terms match anywhere.
    pub(super) word_start: bool,
    pub(super) word_end: bool,
}

#[derive(Clone, Debug)]
pub(super) struct PathRule {
    pub(super) pattern: String,
    pub(super) meanings: Vec<(Meaning, f64)>,
}

/// Compiled, validated rules.
#[derive(Clone, Debug)]
pub struct Rules {
    pub(super) weights: BTreeMap<Source, f64>,
    /// Below this, the best specialty is not trusted: `general`.
    pub(super) min_score: f64,
    /// How specialty words count in a sentence that clears them (negative)
    /// and in one that asks for the change.
    pub(super) clears_factor: f64,
    pub(super) asks_factor: f64,
    /// Labels (lowercase) and the specialty each one means.
    pub(super) labels: BTreeMap<String, (Specialty, f64)>,
    pub(super) languages: BTreeMap<String, (Specialty, f64)>,
    pub(super) terms: Vec<Term>,
    pub(super) matcher: AhoCorasick,
    pub(super) paths: Vec<PathRule>,
    pub(super) path_matcher: AhoCorasick,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    version: Option<u32>,
    /// `false`: replace the defaults instead of extending them.
    extends: Option<bool>,
    min_score: Option<f64>,
    clears_factor: Option<f64>,
    asks_factor: Option<f64>,
    #[serde(default)]
    weights: BTreeMap<String, f64>,
    #[serde(default)]
    specialty: Vec<RawSpecialty>,
    #[serde(default)]
    technology: Vec<RawTechnology>,
    #[serde(default)]
    signals: RawSignals,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpecialty {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, f64>,
    #[serde(default)]
    keywords: BTreeMap<String, f64>,
    #[serde(default)]
    paths: BTreeMap<String, f64>,
    #[serde(default)]
    languages: BTreeMap<String, f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTechnology {
    name: String,
    #[serde(default)]
    terms: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    specialty: Option<String>,
    weight: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignals {
    #[serde(default)]
    vague: Vec<String>,
    #[serde(default)]
    large: Vec<String>,
    #[serde(default)]
    small: Vec<String>,
    #[serde(default)]
    detail: Vec<String>,
    #[serde(default)]
    clears: Vec<String>,
    #[serde(default)]
    asks: Vec<String>,
}

impl Rules {
    /// The built-in rules.
    pub fn defaults() -> Self {
        Self::parse("(built-in rules)", DEFAULT_RULES, None)
            .expect("invariant: the built-in rules are valid")
    }

    /// The built-in rules extended (or replaced) by the file at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&shown, DEFAULT_RULES, Some(&text))
    }

    /// The built-in rules, or those extended by `path` when given.
    pub fn load_or_defaults(path: Option<&Path>) -> Result<Self, Error> {
        path.map_or_else(|| Ok(Self::defaults()), Self::load)
    }

    fn parse(shown: &str, defaults: &str, file: Option<&str>) -> Result<Self, Error> {
        let parse = |name: &str, text: &str| {
            toml::from_str::<RawRules>(text).map_err(|e| Error::Parse {
                path: name.to_owned(),
                message: e.to_string(),
            })
        };
        let base = parse("(built-in rules)", defaults)?;
        let mut layers = vec![base];
        if let Some(text) = file {
            let user = parse(shown, text)?;
            if user.extends == Some(false) {
                layers.clear();
            }
            layers.push(user);
        }
        compile(&layers).map_err(|message| Error::Invalid {
            path: shown.to_owned(),
            message,
        })
    }
}

fn specialty(name: &str, what: &str) -> Result<Specialty, String> {
    name.parse::<Specialty>()
        .map_err(|e| format!("{what}: {e}"))
}

fn weight(value: f64, what: &str) -> Result<f64, String> {
    if value.is_finite() && (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{what}: weight {value} is not within 0..=100"))
    }
}

fn term_text(raw: &str, what: &str) -> Result<String, String> {
    let text = super::text::normalise(raw.trim());
    if text.is_empty() {
        return Err(format!("{what}: an empty term"));
    }
    if text.len() > 200 {
        return Err(format!("{what}: term {raw:?} is longer than 200 bytes"));
    }
    Ok(text)
}

/// Later layers override earlier ones: a term named again takes the later
/// weight and meaning.
fn compile(layers: &[RawRules]) -> Result<Rules, String> {
    let mut weights: BTreeMap<Source, f64> = [
        (Source::Title, 2.0),
        (Source::Body, 1.0),
        (Source::Code, 1.0),
        (Source::Trace, 2.0),
        (Source::Path, 2.0),
        (Source::Label, 1.0),
        (Source::Language, 1.0),
    ]
    .into();
    let mut min_score = 1.0;
    let mut clears_factor = -0.5;
    let mut asks_factor = 1.5;
    let mut labels = BTreeMap::new();
    let mut languages = BTreeMap::new();
    let mut terms: BTreeMap<String, BTreeMap<String, (Meaning, f64)>> = BTreeMap::new();
    let mut add_term = |text: String, meaning: Meaning, weight: f64| {
        terms
            .entry(text)
            .or_default()
            .insert(meaning.key(), (meaning, weight));
    };
    let mut paths: BTreeMap<String, BTreeMap<String, (Meaning, f64)>> = BTreeMap::new();
    let mut add_path = |pattern: String, meaning: Meaning, weight: f64| {
        paths
            .entry(pattern)
            .or_default()
            .insert(meaning.key(), (meaning, weight));
    };
    for layer in layers {
        if let Some(v) = layer.version
            && v != RULES_VERSION
        {
            return Err(format!(
                "version {v} is not supported (this build reads version {RULES_VERSION})"
            ));
        }
        if let Some(m) = layer.min_score {
            min_score = weight(m, "min_score")?;
        }
        if let Some(f) = layer.clears_factor {
            if !(-1.0..=1.0).contains(&f) {
                return Err(format!("clears_factor: {f} is not within -1..=1"));
            }
            clears_factor = f;
        }
        if let Some(f) = layer.asks_factor {
            asks_factor = weight(f, "asks_factor")?;
        }
        for (name, w) in &layer.weights {
            let source = [
                Source::Title,
                Source::Body,
                Source::Code,
                Source::Trace,
                Source::Path,
                Source::Label,
                Source::Language,
            ]
            .into_iter()
            .find(|s| s.as_str() == name)
            .ok_or_else(|| {
                format!(
                    "weights: unknown place {name:?} (expected title, body, code, trace, path, label or language)"
                )
            })?;
            weights.insert(source, weight(*w, &format!("weights.{name}"))?);
        }
        for (i, sp) in layer.specialty.iter().enumerate() {
            let what = format!("specialty[{i}] ({})", sp.name);
            let s = specialty(&sp.name, &what)?;
            for (label, w) in &sp.labels {
                let label = label.trim().to_lowercase();
                if label.is_empty() {
                    return Err(format!("{what}: an empty label"));
                }
                labels.insert(label, (s, weight(*w, &what)?));
            }
            for (lang, w) in &sp.languages {
                languages.insert(lang.trim().to_lowercase(), (s, weight(*w, &what)?));
            }
            for (k, w) in &sp.keywords {
                add_term(
                    term_text(k, &what)?,
                    Meaning::Specialty(s),
                    weight(*w, &what)?,
                );
            }
            for (p, w) in &sp.paths {
                add_path(
                    term_text(p, &what)?,
                    Meaning::Specialty(s),
                    weight(*w, &what)?,
                );
            }
        }
        for (i, tech) in layer.technology.iter().enumerate() {
            let what = format!("technology[{i}] ({})", tech.name);
            if tech.name.trim().is_empty() {
                return Err(format!("technology[{i}]: an empty name"));
            }
            if tech.terms.is_empty() && tech.paths.is_empty() {
                return Err(format!("{what}: no terms and no paths"));
            }
            let vote = tech
                .specialty
                .as_deref()
                .map(|s| specialty(s, &what))
                .transpose()?;
            let w = weight(tech.weight.unwrap_or(0.5), &what)?;
            let meaning = Meaning::Technology(tech.name.trim().to_owned(), vote);
            for t in &tech.terms {
                add_term(term_text(t, &what)?, meaning.clone(), w);
            }
            for p in &tech.paths {
                add_path(term_text(p, &what)?, meaning.clone(), w);
            }
        }
        for (list, meaning, name) in [
            (&layer.signals.vague, Meaning::Vague, "signals.vague"),
            (&layer.signals.large, Meaning::Large, "signals.large"),
            (&layer.signals.small, Meaning::Small, "signals.small"),
            (&layer.signals.detail, Meaning::Detail, "signals.detail"),
            (&layer.signals.clears, Meaning::Clears, "signals.clears"),
            (&layer.signals.asks, Meaning::Asks, "signals.asks"),
        ] {
            for t in list {
                add_term(term_text(t, name)?, meaning.clone(), 1.0);
            }
        }
    }
    let terms: Vec<Term> = terms
        .into_iter()
        .map(|(text, meanings)| Term {
            word_start: text
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric()),
            word_end: text
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric()),
            text,
            meanings: meanings.into_values().collect(),
        })
        .collect();
    let paths: Vec<PathRule> = paths
        .into_iter()
        .map(|(pattern, meanings)| PathRule {
            pattern,
            meanings: meanings.into_values().collect(),
        })
        .collect();
    let matcher = automaton(
        terms.iter().map(|t| t.text.as_str()),
        MatchKind::LeftmostLongest,
    )?;
    // Every pattern a path contains counts (`tests/` and `.tsx` alike).
    let path_matcher = automaton(
        paths.iter().map(|p| p.pattern.as_str()),
        MatchKind::Standard,
    )?;
    Ok(Rules {
        weights,
        min_score,
        clears_factor,
        asks_factor,
        labels,
        languages,
        terms,
        matcher,
        paths,
        path_matcher,
    })
}

/// One pass over a text finds every term: the cost of matching does not
/// grow with the number of rules. A DFA (a few hundred KiB for the rules
/// of this size) is the fastest to search with.
fn automaton<'a>(
    patterns: impl Iterator<Item = &'a str>,
    kind: MatchKind,
) -> Result<AhoCorasick, String> {
    AhoCorasickBuilder::new()
        .match_kind(kind)
        .kind(Some(AhoCorasickKind::DFA))
        .build(patterns)
        .map_err(|e| format!("cannot compile the terms: {e}"))
}

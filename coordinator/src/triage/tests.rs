//! Triage on hand-written issues: the rules, the places signals come from,
//! rules files, and inputs nobody would write.

use std::collections::BTreeMap;

use common::types::Specialty;
use proptest::prelude::*;

use super::*;

/// The built-in rules, compiled once for every test.
static DEFAULTS: std::sync::LazyLock<Rules> = std::sync::LazyLock::new(Rules::defaults);

fn run(title: &str, body: &str, labels: &[&str]) -> Triage {
    let labels: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
    triage(
        &Issue {
            title,
            body,
            labels: &labels,
            languages: &[],
        },
        &DEFAULTS,
    )
}

#[test]
fn the_built_in_rules_load() {
    let rules = Rules::defaults();
    assert!(rules.terms.len() > 300, "{}", rules.terms.len());
    assert!(rules.paths.len() > 80);
}

#[test]
fn clear_issues_go_to_their_specialty() {
    for (title, body, labels, expect) in [
        (
            "Login API returns 500 when the password contains a quote",
            "POST /api/v1/login with `pass\"word` gives an internal server error. The SQL query is built by hand.",
            &[][..],
            Specialty::Backend,
        ),
        (
            "Save button overlaps the footer on mobile",
            "On Safari the button is misaligned and hidden behind the footer.",
            &[],
            Specialty::Frontend,
        ),
        (
            "Flaky test: test_checkout_total",
            "tests/test_checkout.py fails intermittently on CI.",
            &[],
            Specialty::Testing,
        ),
        (
            "Docker image build fails on the CI runner",
            "The GitHub Actions workflow .github/workflows/release.yml cannot push the image.",
            &[],
            Specialty::Devops,
        ),
        (
            "Typo in README",
            "\"recieve\" should be \"receive\" in the installation section.",
            &[],
            Specialty::General,
        ),
        (
            "ログイン画面のボタンが表示崩れする",
            "スマホで見るとレイアウトがずれます。",
            &[],
            Specialty::Frontend,
        ),
        (
            "CIが落ちる",
            "mainブランチでビルドが失敗します。",
            &[],
            Specialty::Devops,
        ),
        (
            "E2Eテストが不安定",
            "Playwrightのテストがたまに落ちる。",
            &[],
            Specialty::Testing,
        ),
        ("Something", "", &["frontend"], Specialty::Frontend),
    ] {
        let t = run(title, body, labels);
        assert_eq!(t.specialty, expect, "{title}: {:?}", t.scores);
        assert!(
            t.confidence > 0.0 && t.confidence <= 1.0,
            "{title}: {}",
            t.confidence
        );
    }
}

#[test]
fn a_stack_trace_speaks_through_the_files_its_frames_name() {
    let body = "```\nTraceback (most recent call last):\n  File \"/app/tests/test_orders.py\", line 42, in test_total\n    assert total == 10\nAssertionError\n```";
    let t = run("Failure on main", body, &["bug"]);
    assert_eq!(t.specialty, Specialty::Testing, "{:?}", t.evidence);
    assert!(
        t.evidence
            .iter()
            .any(|e| e.source == Source::Trace && e.signal == "/app/tests/test_orders.py"),
        "{:?}",
        t.evidence
    );
    assert!(
        t.technologies.contains(&"Python".to_owned()),
        "{:?}",
        t.technologies
    );
}

#[test]
fn a_path_pattern_does_not_match_inside_a_longer_name() {
    // `.cs` (C#) is not in `style.css`; `.css` and `.cs` files still count.
    let t = run(
        "Restyle the header",
        "Change web/style.css and web/app.js.",
        &[],
    );
    assert!(
        !t.technologies.iter().any(|t| t == "C#"),
        "{:?}",
        t.technologies
    );
    assert!(
        t.technologies.iter().any(|t| t == "CSS"),
        "{:?}",
        t.technologies
    );
    let t = run(
        "Fix the parser",
        "The bug is in src/Parser.cs, line 10.",
        &[],
    );
    assert!(
        t.technologies.iter().any(|t| t == "C#"),
        "{:?}",
        t.technologies
    );
}

#[test]
fn vague_reports_are_unclear_and_say_what_is_missing() {
    for (title, body) in [
        ("Not working after update", "It's broken. Please fix."),
        ("アップデート後に動かない", "よろしくお願いします"),
    ] {
        let t = run(title, body, &[]);
        assert_eq!(t.specialty, Specialty::General, "{title}");
        assert!(t.unclear, "{title}: {t:?}");
        assert_eq!(t.missing.len(), 3, "{title}: {:?}", t.missing);
    }
    let t = run(
        "Login API returns 500",
        "Steps to reproduce: POST /api/login. Expected 200.",
        &[],
    );
    assert!(!t.unclear && t.missing.is_empty(), "{t:?}");
}

#[test]
fn complexity_follows_the_size_of_the_ask() {
    assert_eq!(run("Fix typo in docs", "", &[]).complexity, Complexity::Low);
    let rfc = run(
        "RFC: migrate the whole API from REST to gRPC",
        "- [ ] a\n- [ ] b\n- [ ] c\n- [ ] d\n- [ ] e\n",
        &[],
    );
    assert_eq!(rfc.complexity, Complexity::High);
    let normal = run(
        "Export to CSV drops the last row",
        "When exporting the orders list to CSV the final row is missing. It happens with more than 100 rows; the paginated query in the export handler seems to stop one page early. Expected: every row. Actual: all but the last.",
        &[],
    );
    assert_eq!(normal.complexity, Complexity::Medium);
}

#[test]
fn english_terms_match_whole_words_and_japanese_anywhere() {
    // "ci" is not in "specific", nor "ui" in "build".
    let t = run("A specific build question", "", &[]);
    assert!(
        !t.keywords.iter().any(|k| k == "ci" || k == "ui"),
        "{:?}",
        t.keywords
    );
    let t = run("ＣＩが落ちる", "", &[]);
    assert_eq!(t.specialty, Specialty::Devops, "{:?}", t.evidence);
}

#[test]
fn json_is_stable() {
    let a = serde_json::to_string(&run(
        "Save button broken on Safari",
        "see src/components/Save.tsx",
        &["ui"],
    ))
    .expect("json");
    let b = serde_json::to_string(&run(
        "Save button broken on Safari",
        "see src/components/Save.tsx",
        &["ui"],
    ))
    .expect("json");
    assert_eq!(a, b);
    let keys: Vec<&str> = [
        "\"specialty\"",
        "\"confidence\"",
        "\"scores\"",
        "\"complexity\"",
        "\"technologies\"",
        "\"keywords\"",
        "\"evidence\"",
        "\"unclear\"",
        "\"missing\"",
    ]
    .to_vec();
    let mut at = 0;
    for key in keys {
        let found = a[at..]
            .find(key)
            .unwrap_or_else(|| panic!("{key} missing or out of order in {a}"));
        at += found;
    }
}

#[test]
fn rules_files_extend_or_replace_the_defaults_and_errors_name_the_entry() {
    let dir = std::env::temp_dir().join(format!("ccc-triage-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let extend = dir.join("extend.toml");
    std::fs::write(
        &extend,
        "[[specialty]]\nname = \"frontend\"\nkeywords = { \"widget\" = 5.0 }\n",
    )
    .expect("write");
    let rules = Rules::load(&extend).expect("load");
    let t = triage(
        &Issue {
            title: "The widget",
            ..Default::default()
        },
        &rules,
    );
    assert_eq!(t.specialty, Specialty::Frontend);
    assert!(rules.terms.len() > 300, "the defaults were dropped");

    let replace = dir.join("replace.toml");
    std::fs::write(
        &replace,
        "extends = false\n[[specialty]]\nname = \"devops\"\nkeywords = { \"widget\" = 5.0 }\n",
    )
    .expect("write");
    let rules = Rules::load(&replace).expect("load");
    assert_eq!(rules.terms.len(), 1);

    for (text, says) in [
        (
            "[[specialty]]\nname = \"design\"\n",
            "specialty[0] (design): unknown specialty",
        ),
        (
            "[[specialty]]\nname = \"backend\"\nkeywords = { \"x\" = -1.0 }\n",
            "weight -1 is not within",
        ),
        (
            "[[specialty]]\nname = \"backend\"\nkeywords = { \"  \" = 1.0 }\n",
            "an empty term",
        ),
        ("version = 9\n", "version 9 is not supported"),
        ("[weights]\nsubject = 2.0\n", "unknown place \"subject\""),
        ("colour = 1\n", "unknown field `colour`"),
        ("[[technology]]\nname = \"X\"\n", "no terms and no paths"),
    ] {
        let file = dir.join("bad.toml");
        std::fs::write(&file, text).expect("write");
        let err = Rules::load(&file).expect_err(text).to_string();
        assert!(
            err.contains(says) && err.contains("bad.toml"),
            "{text}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `text::normalise` by its definition: full-width ASCII folded one char at
/// a time, then lowercase as `str::to_lowercase` does it (a final sigma
/// included).
fn normalise_by_chars(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            '\u{3000}' => ' ',
            _ => c,
        })
        .collect::<String>()
        .to_lowercase()
}

/// `text::sentences` by its definition, one char at a time.
fn sentences_by_chars(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end = i + c.len_utf8();
        let cut = match c {
            '\n' | '。' | '！' | '？' => true,
            '.' | '!' | '?' => chars.peek().is_none_or(|(_, next)| next.is_whitespace()),
            _ => false,
        };
        if cut {
            out.push((start, end));
            start = end;
        }
    }
    if start < text.len() {
        out.push((start, text.len()));
    }
    out
}

/// Text rich in what the two functions above treat specially.
fn tricky_text() -> impl Strategy<Value = String> {
    let special = prop::sample::select(vec![
        '.', '!', '?', '\n', ' ', '\u{3000}', '\u{2003}', '。', '！', '？', '、', 'Ａ', 'ｚ', '～',
        'İ', 'Σ', 'é', 'a', 'Z', '1',
    ]);
    prop::collection::vec(prop_oneof![3 => special, 1 => any::<char>()], 0..300)
        .prop_map(|chars| chars.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_fast_text_passes_agree_with_their_definitions(text in tricky_text()) {
        prop_assert_eq!(text::normalise(&text), normalise_by_chars(&text));
        prop_assert_eq!(text::sentences(&text), sentences_by_chars(&text));
    }

    #[test]
    fn any_text_gives_an_answer(title in ".{0,200}", body in ".{0,2000}", label in ".{0,40}") {
        let t = run(&title, &body, &[&label]);
        prop_assert!((0.0..=1.0).contains(&t.confidence));
        prop_assert!(t.scores.values().all(|v| v.is_finite() && *v >= 0.0));
        let again = run(&title, &body, &[&label]);
        prop_assert_eq!(t, again);
    }

    #[test]
    fn markdown_shaped_text_gives_an_answer(
        lines in prop::collection::vec(
            prop::sample::select(vec![
                "```", "~~~", "  File \"x.py\", line 1", "at foo (/a/b.js:1:2)", "- [ ] x", "1. step",
                "src/components/A.tsx", "<!--", "-->", "テストが落ちる", "goroutine 1 [running]:", "",
            ]),
            0..60,
        )
    ) {
        let body = lines.join("\n");
        let t = run("t", &body, &[]);
        prop_assert!((0.0..=1.0).contains(&t.confidence));
    }
}

#[test]
fn huge_bodies_are_read_up_to_a_bound() {
    let body = "word ".repeat(700_000) + "\nsrc/components/Button.tsx";
    let t = run("x", &body, &[]);
    assert!(t.evidence.len() <= MAX_EVIDENCE);
    let one_line = "a".repeat(3 << 20);
    let t = run("x", &one_line, &[]);
    assert_eq!(t.specialty, Specialty::General);
}

/// One labelled issue of the corpus (`corpus/*.toml`).
#[derive(serde::Deserialize)]
struct Labelled {
    id: String,
    lang: String,
    hard: bool,
    title: String,
    body: String,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    languages: Vec<String>,
    expect: Specialty,
    #[serde(default)]
    unclear: bool,
}

#[derive(serde::Deserialize)]
struct Corpus {
    issue: Vec<Labelled>,
}

/// Right and total, by group.
#[derive(Default)]
struct Tally(BTreeMap<String, (usize, usize)>);

impl Tally {
    fn count(&mut self, group: &str, right: bool) {
        let e = self.0.entry(group.to_owned()).or_default();
        e.0 += usize::from(right);
        e.1 += 1;
    }

    fn share(&self, group: &str) -> f64 {
        self.0
            .get(group)
            .map_or(0.0, |(r, n)| *r as f64 / (*n).max(1) as f64)
    }
}

/// The corpus: about 280 realistic issues in English and Japanese, a third
/// of them hard. The rules are tuned against `tune.toml` only; the issues
/// of `holdout.toml` were written apart and never used for tuning, so its
/// figure is the honest one. Run with `--nocapture` for the report.
#[test]
fn the_corpus_is_routed_as_a_senior_engineer_would() {
    let rules = Rules::defaults();
    let mut tally = Tally::default();
    let mut misses = Vec::new();
    for (split, text) in [
        ("tune", include_str!("corpus/tune.toml")),
        ("holdout", include_str!("corpus/holdout.toml")),
    ] {
        let corpus: Corpus = toml::from_str(text).expect("the corpus parses");
        for issue in corpus.issue {
            let t = triage(
                &Issue {
                    title: &issue.title,
                    body: &issue.body,
                    labels: &issue.labels,
                    languages: &issue.languages,
                },
                &rules,
            );
            let right = t.specialty == issue.expect;
            for group in [
                "overall".to_owned(),
                split.to_owned(),
                format!("{split} {}", issue.lang),
                format!("lang {}", issue.lang),
                format!("expect {}", issue.expect),
            ] {
                tally.count(&group, right);
            }
            if issue.hard {
                tally.count("hard", right);
                tally.count(&format!("{split} hard"), right);
            }
            if issue.unclear {
                tally.count("unclear flagged", t.unclear);
            }
            if !right && split == "tune" {
                misses.push(format!(
                    "{}: expected {}, got {} {:?}",
                    issue.id, issue.expect, t.specialty, t.scores
                ));
            }
        }
    }
    println!("triage accuracy on the corpus:");
    for (group, (right, n)) in &tally.0 {
        println!(
            "  {group:<20} {right:>3}/{n:<3} {:>5.1}%",
            100.0 * *right as f64 / (*n).max(1) as f64
        );
    }
    println!("misrouted in the tuning set:");
    for m in &misses {
        println!("  {m}");
    }
    let overall = tally.share("overall");
    assert!(
        overall >= 0.90,
        "overall accuracy {:.1}% is below 90%",
        overall * 100.0
    );
}

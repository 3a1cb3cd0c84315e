//! Reading an issue's text: normalised (lowercase, full-width ASCII folded
//! to ASCII, as Japanese writers often type `ＣＩ` or `ＡＰＩ`), cut into the
//! places signals come from (prose, fenced code, stack traces), and the file
//! paths it names. Everything here is linear in the input.

use std::sync::LazyLock;

use regex::{Regex, RegexSet};

/// The most of an issue that is read; GitHub itself caps a body at 65,536
/// characters, so this only bounds hostile or pasted-log input.
pub const MAX_READ: usize = 2 << 20;

/// At most this many paths count, so a pasted file listing cannot drown
/// every other signal.
const MAX_PATHS: usize = 64;

/// Lowercase, with full-width ASCII and the ideographic space folded.
pub fn normalise(s: &str) -> String {
    // `to_lowercase` is fast on ASCII runs; full-width letters lowercase to
    // full-width letters, which the fold below then turns into ASCII.
    let lower = s.to_lowercase();
    let full_width = |c: char| matches!(c, '\u{FF01}'..='\u{FF5E}' | '\u{3000}');
    if lower.is_ascii() || !lower.contains(full_width) {
        return lower;
    }
    // Copied in runs between the characters folded.
    let mut folded = String::with_capacity(lower.len());
    let mut rest = lower.as_str();
    while let Some((at, c)) = rest.char_indices().find(|(_, c)| full_width(*c)) {
        folded.push_str(&rest[..at]);
        folded.push(match c {
            '\u{3000}' => ' ',
            _ => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
        });
        rest = &rest[at + c.len_utf8()..];
    }
    folded.push_str(rest);
    folded
}

/// An issue's text, cut by where each part was found.
#[derive(Debug, Default)]
pub struct Parts {
    /// Prose of the body, outside code blocks and traces.
    pub prose: String,
    pub code: String,
    pub trace: String,
    /// Files named by stack-trace frames (library frames left out).
    pub trace_paths: Vec<String>,
    /// Files and directories named anywhere else.
    pub paths: Vec<String>,
    pub shape: Shape,
}

/// The structure of an issue, for complexity and clarity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Shape {
    pub lines: usize,
    pub checklist_items: usize,
    pub list_items: usize,
    pub code_blocks: usize,
    pub trace_lines: usize,
    /// Letters and digits in the prose (a measure of how much was said).
    pub prose_chars: usize,
    pub truncated: bool,
}

/// Lines that belong to a stack trace, with the file a frame names as the
/// `path` group where there is one: one pass of the set tells whether a
/// line is one (most are not), then the first pattern that matches reads
/// the path.
struct TracePatterns {
    any: RegexSet,
    each: Vec<Regex>,
}

static TRACE_LINES: LazyLock<TracePatterns> = LazyLock::new(|| {
    let patterns = [
        // Python
        r#"^\s*traceback \(most recent call last\)"#,
        r#"^\s*file "(?P<path>[^"]+)", line \d+"#,
        // Java, Kotlin, Scala, C#
        r#"^\s*at [\w$.<>\[\]]+\((?P<path>[\w$.-]+\.(?:java|kt|scala|groovy)):\d+\)"#,
        r#"^\s*at [\w$.<>\[\]`]+\(.*\) in (?P<path>[^:]+\.cs):line \d+"#,
        r#"^\s*(?:exception in thread|caused by:)"#,
        // JavaScript, TypeScript
        r#"^\s*at (?:.* \()?(?P<path>(?:webpack://|file://|/|\./|[a-z]:\\)[^\s():]+):\d+:\d+\)?\s*$"#,
        // Go
        r#"^\s*goroutine \d+ \["#,
        r#"^\s*panic: "#,
        r#"^\s*(?P<path>/?[\w./-]+\.go):\d+(?: \+0x[0-9a-f]+)?\s*$"#,
        // Test runners naming the failing file (pytest, jest, vitest, go)
        r#"^\s*(?:failed|fail|error|--- fail:?)\s+(?P<path>[\w./@-]+\.(?:py|[cm]?[jt]sx?|go|rb|java|kt|php|rs))(?:::|\s|$)"#,
        // Rust
        r#"^\s*thread '[^']*' panicked at (?P<path>[^:\s]+\.rs):\d+"#,
        r#"^\s*at (?P<path>[^:\s]+\.rs):\d+:\d+"#,
        // Ruby, PHP
        r#"^\s*(?:from )?(?P<path>[^:\s]+\.rb):\d+:in "#,
        r#"^\s*#\d+ (?P<path>[^\s(]+\.php)\(\d+\)"#,
    ];
    TracePatterns {
        any: RegexSet::new(patterns).expect("invariant: trace patterns compile"),
        each: patterns
            .iter()
            .map(|p| Regex::new(p).expect("invariant: trace patterns compile"))
            .collect(),
    }
});

/// A token that names a file: a known extension, or a path with a slash.
static PATH: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?x)
        (?:^|[\s(\[{<`'\x22=,;])
        (?P<path>
            (?:[a-z0-9_@~.\-]+/)*
            (?:
                [a-z0-9_@\-][a-z0-9_@.\-]*\.
                (?:pyi?|jsx?|mjs|cjs|tsx?|vue|svelte|css|scss|sass|less|html?|go|rs|java|kts?|
                   scala|rb|php|cs|swift|c|h|cc|cpp|hpp|sql|ya?ml|toml|json|tf|tfvars|hcl|sh|
                   bash|ps1|md|mdx|rst|lock|gradle|xml|ini|cfg|conf|proto|graphql|ipynb|erb|
                   snap|dockerfile|storybook|feature)
              | dockerfile|makefile|jenkinsfile|procfile|vagrantfile|codeowners|license|readme
            )
          | (?:[a-z0-9_@~.\-]+/)+[a-z0-9_@.\-]*
        )
        (?::\d+)*
        (?:[\s)\]}>`'\x22,;:.!?]|$)",
    )
    .expect("invariant: the path pattern compiles")
});

static HTML_COMMENT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)<!--.*?-->").expect("invariant: compiles"));

/// Frames of libraries and the runtime say nothing about the project.
fn is_library_path(path: &str) -> bool {
    [
        "site-packages/",
        "dist-packages/",
        "node_modules/",
        "/usr/lib/",
        "/usr/local/lib/",
        "<frozen",
        "node:internal",
        "internal/",
        "/rustc/",
        "/go/src/runtime/",
        "runtime/",
        ".cargo/registry/",
    ]
    .iter()
    .any(|lib| path.contains(lib))
}

/// Cuts a normalised body into its parts.
pub fn parts(body: &str) -> Parts {
    let mut parts = Parts::default();
    let body = if body.len() > MAX_READ {
        parts.shape.truncated = true;
        let mut end = MAX_READ;
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        &body[..end]
    } else {
        body
    };
    let body = HTML_COMMENT.replace_all(body, " ");
    let mut fence: Option<&str> = None;
    for line in body.lines() {
        parts.shape.lines += 1;
        let trimmed = line.trim_start();
        if let Some(open) = fence {
            if trimmed.starts_with(open) {
                fence = None;
                continue;
            }
        } else if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fence = Some(&trimmed[..3]);
            parts.shape.code_blocks += 1;
            continue;
        }
        if let Some(path) = trace_line(line) {
            parts.shape.trace_lines += 1;
            push_line(&mut parts.trace, line);
            if let Some(path) = path
                && !is_library_path(&path)
                && parts.trace_paths.len() < MAX_PATHS
                && !parts.trace_paths.contains(&path)
            {
                parts.trace_paths.push(path);
            }
            continue;
        }
        if fence.is_some() {
            push_line(&mut parts.code, line);
            continue;
        }
        if trimmed.starts_with("- [ ]")
            || trimmed.starts_with("- [x]")
            || trimmed.starts_with("* [ ]")
        {
            parts.shape.checklist_items += 1;
        } else if trimmed.starts_with("- ")
            || trimmed.starts_with("* ")
            || trimmed.starts_with("・")
            || trimmed.split_once(". ").is_some_and(|(n, _)| {
                !n.is_empty() && n.len() <= 3 && n.chars().all(|c| c.is_ascii_digit())
            })
        {
            parts.shape.list_items += 1;
        }
        parts.shape.prose_chars += if line.is_ascii() {
            line.bytes().filter(u8::is_ascii_alphanumeric).count()
        } else {
            line.chars().filter(|c| c.is_alphanumeric()).count()
        };
        push_line(&mut parts.prose, line);
    }
    for text in [&parts.prose, &parts.code] {
        for path in file_paths(text) {
            if parts.paths.len() >= MAX_PATHS {
                break;
            }
            if !is_library_path(&path)
                && !parts.paths.contains(&path)
                && !parts.trace_paths.contains(&path)
            {
                parts.paths.push(path);
            }
        }
    }
    parts
}

/// The files a (normalised) text names, in order.
pub fn file_paths(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for cap in PATH.captures_iter(text) {
        let Some(m) = cap.name("path") else {
            continue;
        };
        let path = m.as_str().trim_end_matches(['.', ':']);
        if path.len() < 3
            || path.chars().all(|c| c == '/' || c == '.')
            || !path.chars().any(|c| c.is_ascii_alphabetic())
        {
            continue;
        }
        // Dates and fractions ("1/2", "2024/01/05") are not paths.
        if path
            .split('/')
            .all(|seg| seg.chars().all(|c| c.is_ascii_digit() || c == '.'))
        {
            continue;
        }
        found.push(path.to_owned());
        if found.len() >= MAX_PATHS {
            break;
        }
    }
    found
}

/// `Some(path)` if `line` is a stack-trace line (`path` when a frame names
/// a file).
fn trace_line(line: &str) -> Option<Option<String>> {
    if line.len() > 1000 {
        return None;
    }
    let first = TRACE_LINES.any.matches(line).into_iter().next()?;
    let cap = TRACE_LINES.each[first].captures(line)?;
    Some(cap.name("path").map(|p| p.as_str().to_owned()))
}

/// The sentences of a text as byte ranges: cut after a line end, a
/// Japanese full stop, or `.`, `!` or `?` followed by white space.
pub fn sentences(text: &str) -> Vec<(usize, usize)> {
    const JAPANESE_STOPS: [&[u8]; 3] = ["。".as_bytes(), "！".as_bytes(), "？".as_bytes()];
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    // Every byte that can end a sentence is ASCII or the lead byte of a
    // Japanese stop, so the text is walked by bytes, not decoded.
    for (i, &b) in bytes.iter().enumerate() {
        let end = match b {
            b'\n' => i + 1,
            b'.' | b'!' | b'?' => {
                let next = text[i + 1..].chars().next();
                if !next.is_none_or(char::is_whitespace) {
                    continue;
                }
                i + 1
            }
            0xE3 | 0xEF => match JAPANESE_STOPS.iter().find(|s| bytes[i..].starts_with(s)) {
                Some(stop) => i + stop.len(),
                None => continue,
            },
            _ => continue,
        };
        out.push((start, end));
        start = end;
    }
    if start < text.len() {
        out.push((start, text.len()));
    }
    out
}

fn push_line(out: &mut String, line: &str) {
    out.push_str(line);
    out.push('\n');
}

//! The prompt the CLI gets for a task. Issue text is untrusted: it is data
//! inside the prompt, passed as one argument vector element, never through a
//! shell.

use common::ids::TaskId;
use common::types::TaskSpec;

/// What the agent tells the CLI beyond the issue itself.
pub fn build(task: TaskId, spec: &TaskSpec) -> String {
    let mut prompt = String::new();
    if spec.issue_number > 0 {
        prompt.push_str(&format!(
            "GitHub issue #{}: {}\n",
            spec.issue_number, spec.title
        ));
    } else {
        prompt.push_str(&format!("Task {task}: {}\n", spec.title));
    }
    if !spec.issue_url.is_empty() {
        prompt.push_str(&format!("URL: {}\n", spec.issue_url));
    }
    prompt.push_str(&format!("Kind of work: {}\n", spec.specialty));
    if !spec.technologies.is_empty() {
        prompt.push_str(&format!("Technologies: {}\n", spec.technologies.join(", ")));
    }
    if !spec.body.trim().is_empty() {
        prompt.push_str("\n--- issue text (from the issue's author) ---\n");
        prompt.push_str(&spec.body);
        prompt.push_str("\n--- end of issue text ---\n");
    }
    prompt.push_str(
        "\nMake the change in this working directory. Do not commit, push or open a pull \
         request: the agent runs the tests, commits and pushes your changes afterwards.\n",
    );
    prompt
}

/// Fills a configured template. Placeholders are replaced in one pass, so
/// issue text that contains `{title}` is not expanded again.
pub fn render(template: &str, task: TaskId, spec: &TaskSpec) -> String {
    let values = [
        ("title", spec.title.clone()),
        ("body", spec.body.clone()),
        ("url", spec.issue_url.clone()),
        ("number", spec.issue_number.to_string()),
        ("task", task.to_string()),
        ("specialty", spec.specialty.to_string()),
        ("technologies", spec.technologies.join(", ")),
        ("branch", spec.branch.clone()),
    ];
    let mut out = String::with_capacity(template.len() + spec.body.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}').map(|close| (&after[..close], close)) {
            Some((name, close)) if values.iter().any(|(k, _)| *k == name) => {
                let value = values
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.as_str());
                out.push_str(value.unwrap_or_default());
                rest = &after[close + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use common::types::Specialty;

    use super::*;

    fn spec(body: &str) -> TaskSpec {
        TaskSpec {
            repo_url: "r".into(),
            base_branch: String::new(),
            issue_number: 7,
            title: "Fix {body} bug".into(),
            body: body.into(),
            issue_url: "https://example.invalid/7".into(),
            author: String::new(),
            labels: vec![],
            specialty: Specialty::Backend,
            technologies: vec!["rust".into()],
            branch: "ccc/issue-7-fix".into(),
            follow_up: false,
            test_command: String::new(),
        }
    }

    #[test]
    fn templates_expand_once_and_keep_unknown_braces() {
        let out = render(
            "#{number} {title} on {branch}: {body} {nope}",
            TaskId(1),
            &spec("x {title}"),
        );
        assert_eq!(
            out,
            "#7 Fix {body} bug on ccc/issue-7-fix: x {title} {nope}"
        );
    }

    #[test]
    fn the_default_prompt_fences_the_issue_text_and_says_what_follows() {
        let out = build(TaskId(1), &spec("please do it"));
        assert!(out.contains("GitHub issue #7"));
        assert!(out.contains("--- issue text"));
        assert!(out.contains("Do not commit, push or open a pull request"));
    }
}

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

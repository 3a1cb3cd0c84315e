//! The operator documentation, tested: every grpcurl recipe of
//! `docs/grpcurl.md` run with the real grpcurl against a real cluster and
//! compared with its sample, every Admin method covered by a recipe, the
//! systemd units of `deploy/systemd` checked by `systemd-analyze verify`,
//! and the example configuration files read by the binaries' own types.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::{Cluster, TestDir, bin, eventually};

/// How long one recipe may take; `WatchTask` waits for its task to end.
const RECIPE_TIMEOUT: Duration = Duration::from_secs(120);

/// The order the recipes run in: each leaves the cluster as the next one's
/// sample expects (the agent is drained so that the submitted task waits,
/// the task is cancelled and retried, the agent undrained so that it runs
/// it while `WatchTask` follows it; a throwaway agent and admin name are
/// revoked and let back in). A recipe missing from this list fails the test.
const RUN_ORDER: &[&str] = &[
    "list",
    "describe",
    "Health/Check",
    "ListAgents",
    "GetAgent",
    "DrainAgent",
    "SubmitTask",
    "ListTasks",
    "GetTask",
    "CancelTask",
    "RetryTask",
    "UndrainAgent",
    "WatchTask",
    "WatchCluster",
    "RevokeAgent",
    "UnrevokeAgent",
    "ForgetAgent",
    "RevokeAdmin",
    "ListAdmins",
    "UnrevokeAdmin",
];

/// The service whose every method must have a recipe.
const ADMIN_SERVICE: &str = "ccc.v1.Admin";

fn repository_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn read_repository_file(relative: &str) -> String {
    let path = repository_file(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A fenced block of the markdown: its info string and its text.
struct Fence {
    info: String,
    text: String,
}

/// One recipe: a `###` heading with a `sh` block and the sample it prints.
struct Recipe {
    name: String,
    command: String,
    sample: Fence,
}

/// What `docs/grpcurl.md` holds: the variables its setup exports, and the
/// recipes in the order written.
struct GrpcurlDoc {
    variables: BTreeSet<String>,
    recipes: Vec<Recipe>,
}

impl GrpcurlDoc {
    /// Reads the setup (the `sh` block under `## Setup`: `export NAME=...`
    /// lines) and every `###` heading's blocks: exactly one `sh` block, the
    /// command, then one `json` or `text` block, what it prints.
    fn parse(markdown: &str) -> Result<Self, String> {
        let mut sections: Vec<(String, Vec<Fence>)> = Vec::new();
        let mut lines = markdown.lines();
        while let Some(line) = lines.next() {
            if let Some(info) = line.strip_prefix("```") {
                let mut text = String::new();
                loop {
                    let inner = lines
                        .next()
                        .ok_or_else(|| format!("a ```{info} block is not closed"))?;
                    if inner.trim_end() == "```" {
                        break;
                    }
                    text.push_str(inner);
                    text.push('\n');
                }
                let Some((_, fences)) = sections.last_mut() else {
                    return Err(format!("a ```{info} block before any heading"));
                };
                fences.push(Fence {
                    info: info.trim().to_owned(),
                    text,
                });
            } else if line.starts_with('#') {
                sections.push((line.to_owned(), Vec::new()));
            }
        }
        let setup = sections
            .iter()
            .find(|(heading, _)| heading == "## Setup")
            .and_then(|(_, fences)| fences.iter().find(|f| f.info == "sh"))
            .ok_or("no ```sh block under `## Setup`")?;
        let variables = setup
            .text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("export "))
            .filter_map(|l| l.split_once('=').map(|(name, _)| name.to_owned()))
            .collect();
        let mut recipes = Vec::new();
        for (heading, fences) in sections {
            let Some(name) = heading.strip_prefix("### ") else {
                continue;
            };
            let [command, sample]: [Fence; 2] = fences.try_into().map_err(|f: Vec<Fence>| {
                format!(
                    "recipe {name:?} has {} blocks; it needs a ```sh block and the sample it prints",
                    f.len()
                )
            })?;
            if command.info != "sh" || !["json", "text"].contains(&sample.info.as_str()) {
                return Err(format!(
                    "recipe {name:?}: expected ```sh then ```json or ```text, found ```{} then ```{}",
                    command.info, sample.info
                ));
            }
            recipes.push(Recipe {
                name: name.trim().to_owned(),
                command: command.text,
                sample,
            });
        }
        Ok(Self { variables, recipes })
    }
}

/// The shell variables a command reads (`$NAME` or `${NAME}`).
fn variables_used(command: &str) -> BTreeSet<String> {
    command
        .split('$')
        .skip(1)
        .map(|rest| {
            rest.trim_start_matches('{')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// What a JSON sample promises: every field path (arrays as `[]`), and
/// every enum-like value (`TASK_STATE_QUEUED`, `SERVING`) at its path.
#[derive(Default)]
struct JsonShape {
    paths: BTreeSet<String>,
    enums: BTreeSet<(String, String)>,
}

impl JsonShape {
    /// The shape of a sequence of JSON values (a stream prints several).
    fn of(text: &str) -> Result<Self, String> {
        let mut shape = Self::default();
        for value in serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>() {
            let value = value.map_err(|e| format!("not JSON: {e}"))?;
            shape.add(&value, "");
        }
        Ok(shape)
    }

    fn add(&mut self, value: &serde_json::Value, path: &str) {
        match value {
            serde_json::Value::Object(fields) => {
                for (key, field) in fields {
                    let path = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    self.paths.insert(path.clone());
                    self.add(field, &path);
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    self.add(item, &format!("{path}[]"));
                }
            }
            serde_json::Value::String(text) if is_enum_like(text) => {
                self.enums.insert((path.to_owned(), text.clone()));
            }
            _ => {}
        }
    }

    /// What the sample shows that the output lacks.
    fn missing_from(&self, actual: &Self) -> Vec<String> {
        let fields = self
            .paths
            .difference(&actual.paths)
            .map(|path| format!("field {path}"));
        let values = self
            .enums
            .difference(&actual.enums)
            .map(|(path, value)| format!("{path} = {value}"));
        fields.chain(values).collect()
    }
}

fn is_enum_like(text: &str) -> bool {
    text.len() >= 3
        && text.starts_with(|c: char| c.is_ascii_uppercase())
        && text
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Whether `printed` shows what the sample says: for JSON, every field and
/// enum value of the sample (other values differ from run to run); for
/// text, every sample line in order (`...` stands for lines left out).
fn check_sample(sample: &Fence, printed: &str) -> Result<(), String> {
    if sample.info == "json" {
        let promised = JsonShape::of(&sample.text).map_err(|e| format!("the sample is {e}"))?;
        let missing = promised.missing_from(&JsonShape::of(printed)?);
        return if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("the output lacks {}", missing.join(", ")))
        };
    }
    let mut printed_lines = printed.lines().map(str::trim_end);
    for line in sample.text.lines().map(str::trim_end) {
        if line == "..." || line.is_empty() {
            continue;
        }
        if !printed_lines.any(|p| p == line) {
            return Err(format!("the output lacks the line {line:?} (in order)"));
        }
    }
    Ok(())
}

/// Runs `command` through bash with the setup's variables bound, in `dir`;
/// returns its stdout, or why it failed.
fn run_recipe(
    command: &str,
    variables: &BTreeMap<String, String>,
    path: &str,
    dir: &Path,
    name: &str,
) -> Result<String, String> {
    let stdout_path = dir.join(format!("recipe-{}.out", name.replace('/', "-")));
    let stderr_path = stdout_path.with_extension("err");
    let open = |p: &Path| fs::File::create(p).expect("recipe output file");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .env("PATH", path)
        .envs(variables)
        .stdin(Stdio::null())
        .stdout(open(&stdout_path))
        .stderr(open(&stderr_path))
        .spawn()
        .map_err(|e| format!("cannot run bash: {e}"))?;
    let status = eventually(RECIPE_TIMEOUT, || {
        child
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "still running".to_owned())
    });
    let status = status.inspect_err(|_| {
        let _ = child.kill();
        let _ = child.wait();
    })?;
    let stdout = fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(format!("exit {status}\n{stdout}{stderr}"))
    }
}

/// A PATH whose `grpcurl` is the one the harness was given (`GRPCURL`,
/// which `make test` sets), else the inherited one.
fn path_with_grpcurl(dir: &Path) -> String {
    let inherited = std::env::var("PATH").unwrap_or_default();
    let Ok(grpcurl) = std::env::var("GRPCURL") else {
        return inherited;
    };
    let bin_dir = dir.join("bin");
    fs::create_dir_all(&bin_dir).expect("bin dir");
    std::os::unix::fs::symlink(&grpcurl, bin_dir.join("grpcurl")).expect("link grpcurl");
    format!("{}:{inherited}", bin_dir.display())
}

#[test]
fn every_grpcurl_recipe_runs_and_prints_its_sample_and_every_admin_method_has_one() {
    let doc = GrpcurlDoc::parse(&read_repository_file("docs/grpcurl.md"))
        .unwrap_or_else(|e| panic!("docs/grpcurl.md: {e}"));

    let mut cluster = Cluster::new("grpcurl-doc");
    cluster.start_coordinator();
    // The CLI stand-in changes a file, so the task succeeds.
    let agent_config = cluster.dir.join("agent.toml");
    fs::write(
        &agent_config,
        "[claude]\nprompt_template = \"{title}\\n\\n{body}\\n\\nFAKE: write=fix.txt\"\n",
    )
    .expect("agent config");
    let agent_config = agent_config.display().to_string();
    cluster.start_agent(
        "pc-01",
        &[
            "--config",
            &agent_config,
            "--specialties",
            "backend",
            "--capacity",
            "2",
            "--labels",
            "room=lab-2",
        ],
    );
    cluster.wait_agents(&["pc-01"], "connected");

    let bound: BTreeMap<String, String> = [
        (
            "CCC_COORDINATOR",
            cluster.grpc_addr.expect("started").to_string(),
        ),
        ("CCC_CA", cluster.pki.path("ca.pem").display().to_string()),
        (
            "CCC_CERT",
            cluster.pki.path("admin-root.pem").display().to_string(),
        ),
        (
            "CCC_KEY",
            cluster.pki.path("admin-root-key.pem").display().to_string(),
        ),
        ("REPO", cluster.repo()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    let bound_names: BTreeSet<String> = bound.keys().cloned().collect();
    assert_eq!(
        doc.variables, bound_names,
        "the setup of docs/grpcurl.md exports other variables than the test binds"
    );
    let path = path_with_grpcurl(cluster.dir.path());

    // Every Admin method, as the coordinator's reflection lists it, has a
    // recipe; every recipe has its place in the run.
    let listed = run_recipe(
        &format!(
            "grpcurl -cacert \"$CCC_CA\" -cert \"$CCC_CERT\" -key \"$CCC_KEY\" \"$CCC_COORDINATOR\" list {ADMIN_SERVICE}"
        ),
        &bound,
        &path,
        cluster.dir.path(),
        "list-admin",
    )
    .unwrap_or_else(|e| panic!("grpcurl list {ADMIN_SERVICE}: {e}"));
    let methods: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{ADMIN_SERVICE}.")))
        .collect();
    assert!(!methods.is_empty(), "no Admin methods listed: {listed}");
    let recipes: BTreeMap<&str, &Recipe> =
        doc.recipes.iter().map(|r| (r.name.as_str(), r)).collect();
    let without_recipe: Vec<&&str> = methods
        .iter()
        .filter(|m| !recipes.contains_key(**m))
        .collect();
    assert!(
        without_recipe.is_empty(),
        "Admin methods without a recipe in docs/grpcurl.md: {without_recipe:?}"
    );
    let unplaced: Vec<&&str> = recipes
        .keys()
        .filter(|name| !RUN_ORDER.contains(name))
        .collect();
    assert!(
        unplaced.is_empty(),
        "recipes without a place in RUN_ORDER: {unplaced:?}"
    );

    for name in RUN_ORDER {
        let recipe = recipes
            .get(name)
            .unwrap_or_else(|| panic!("docs/grpcurl.md has no recipe {name:?}"));
        if methods.contains(name) {
            assert!(
                recipe.command.contains(&format!("{ADMIN_SERVICE}/{name}")),
                "recipe {name:?} does not call {ADMIN_SERVICE}/{name}:\n{}",
                recipe.command
            );
        }
        let undocumented: Vec<String> = variables_used(&recipe.command)
            .difference(&doc.variables)
            .cloned()
            .collect();
        assert!(
            undocumented.is_empty(),
            "recipe {name:?} uses variables the setup does not define: {undocumented:?}"
        );
        let printed = run_recipe(&recipe.command, &bound, &path, cluster.dir.path(), name)
            .unwrap_or_else(|e| panic!("recipe {name:?} failed: {e}\n{}", recipe.command));
        if let Err(why) = check_sample(&recipe.sample, &printed) {
            panic!(
                "recipe {name:?} does not print what docs/grpcurl.md shows: {why}\n--- printed ---\n{printed}"
            );
        }
    }

    // The recipes did what they say.
    let task = cluster.task_json("t-1").expect("the submitted task");
    assert_eq!(task["state"], "succeeded", "{task}");
    let agents = cluster.agents_json().expect("agents");
    assert!(
        !agents.iter().any(|a| a["agent_id"] == "pc-03"),
        "pc-03 was forgotten: {agents:?}"
    );
}

/// The unit files shipped in `deploy/systemd`.
const UNITS: &[&str] = &["ccc-coordinator.service", "ccc-agent.service"];

/// Where the host keeps systemd's own units (targets, `network-online`).
const HOST_UNIT_DIR: &str = "/usr/lib/systemd/system";

/// `Key=value` values of a unit file, in order.
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// The workspace binary and its arguments that a unit's `ExecStart=` runs.
fn exec_start(unit_name: &str, unit: &str) -> (PathBuf, Vec<String>) {
    let [line] = unit_values(unit, "ExecStart")[..] else {
        panic!("{unit_name}: expected one ExecStart=");
    };
    let mut words = line.split_whitespace().map(str::to_owned);
    let program = PathBuf::from(words.next().expect("a program"));
    assert!(
        program.is_absolute(),
        "{unit_name}: ExecStart= runs {} (not absolute)",
        program.display()
    );
    (program, words.collect())
}

#[test]
fn systemd_units_pass_systemd_analyze_verify_with_their_binaries_in_place() {
    // The units' flags exist: clap refuses an unknown one before --help.
    for unit_name in UNITS {
        let unit = read_repository_file(&format!("deploy/systemd/{unit_name}"));
        let (program, args) = exec_start(unit_name, &unit);
        let name = program.file_name().expect("file name").to_string_lossy();
        let out = Command::new(bin(&name))
            .args(&args)
            .arg("--help")
            .output()
            .expect("run the unit's binary");
        assert!(
            out.status.success(),
            "{unit_name}: {name} refuses its ExecStart= arguments {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let version = Command::new("systemd-analyze").arg("--version").output();
    if version.is_err() {
        eprintln!(
            "could not check the units: systemd-analyze is not installed (`make deps` installs systemd)"
        );
        return;
    }
    // A root holding the host's systemd units, ours as they are in the
    // repository, and the built binaries where ExecStart= looks for them.
    let dir = TestDir::new("systemd-verify");
    let root = dir.join("root");
    let system_units = root.join("usr/lib/systemd");
    fs::create_dir_all(&system_units).expect("root");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(HOST_UNIT_DIR)
        .arg(&system_units)
        .status()
        .expect("cp");
    assert!(copied.success(), "cannot copy {HOST_UNIT_DIR}");
    let our_units = root.join("etc/systemd/system");
    fs::create_dir_all(&our_units).expect("unit dir");
    for unit_name in UNITS {
        fs::copy(
            repository_file(&format!("deploy/systemd/{unit_name}")),
            our_units.join(unit_name),
        )
        .expect("install the unit");
        let unit = read_repository_file(&format!("deploy/systemd/{unit_name}"));
        let (program, _) = exec_start(unit_name, &unit);
        let in_root = root.join(program.strip_prefix("/").expect("absolute"));
        fs::create_dir_all(in_root.parent().expect("bin dir")).expect("bin dir");
        let name = program.file_name().expect("file name").to_string_lossy();
        fs::copy(bin(&name), &in_root).expect("install the binary");
    }
    for unit_name in UNITS {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg(unit_name)
            .output()
            .expect("systemd-analyze verify");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let about_ours: Vec<&str> = said
            .lines()
            .filter(|line| UNITS.iter().any(|u| line.contains(u)))
            .collect();
        assert!(
            out.status.success() && about_ours.is_empty(),
            "systemd-analyze verify {unit_name} ({}):\n{said}",
            out.status
        );
        if !said.is_empty() {
            eprintln!("systemd-analyze verify {unit_name}, about other units:\n{said}");
        }
    }
}

#[test]
fn example_configs_are_read_by_the_binaries_types_and_named_by_the_units() {
    let coordinator_file = read_repository_file("deploy/coordinator.toml");
    toml::from_str::<coordinator::config::FileConfig>(&coordinator_file)
        .unwrap_or_else(|e| panic!("deploy/coordinator.toml: {e}"));
    let agent_file = read_repository_file("deploy/agent.toml");
    toml::from_str::<agent::config::FileConfig>(&agent_file)
        .unwrap_or_else(|e| panic!("deploy/agent.toml: {e}"));
    for (unit_name, example) in [
        ("ccc-coordinator.service", "coordinator.toml"),
        ("ccc-agent.service", "agent.toml"),
    ] {
        let unit = read_repository_file(&format!("deploy/systemd/{unit_name}"));
        let (_, args) = exec_start(unit_name, &unit);
        let config = args
            .windows(2)
            .find(|pair| pair[0] == "--config")
            .map(|pair| PathBuf::from(&pair[1]))
            .unwrap_or_else(|| panic!("{unit_name}: no --config"));
        assert_eq!(
            config.file_name().map(|n| n.to_string_lossy().into_owned()),
            Some(example.to_owned()),
            "{unit_name} reads {}, shipped as deploy/{example}",
            config.display()
        );
    }
}

/// The commands of the cluster's binaries in a markdown's code blocks, as
/// words (continued lines joined, pipelines and lists split, comments
/// dropped): those whose first word is `ccc`, `ccc-coordinator` or
/// `ccc-agent`.
fn documented_invocations(markdown: &str) -> Vec<Vec<String>> {
    let mut invocations = Vec::new();
    let mut in_code = false;
    let mut pending = String::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code {
            continue;
        }
        let line = line.split(" #").next().unwrap_or_default();
        if let Some(continued) = line.trim_end().strip_suffix('\\') {
            pending.push_str(continued);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        for part in pending.split(['|', ';', '&']) {
            let words: Vec<String> = part.split_whitespace().map(str::to_owned).collect();
            let program = words
                .first()
                .and_then(|w| w.rsplit('/').next())
                .unwrap_or_default();
            if ["ccc", "ccc-coordinator", "ccc-agent"].contains(&program) {
                invocations.push(words);
            }
        }
        pending.clear();
    }
    invocations
}

#[test]
fn deploy_doc_names_only_flags_and_variables_that_exist() {
    let doc = read_repository_file("docs/deploy.md");
    for words in documented_invocations(&doc) {
        let name = words[0].rsplit('/').next().unwrap_or_default().to_owned();
        // Subcommands and their arguments come before the first flag.
        let leading: Vec<&String> = words[1..]
            .iter()
            .take_while(|w| !w.starts_with('-'))
            .collect();
        let out = Command::new(bin(&name))
            .args(&leading)
            .arg("--help")
            .output()
            .expect("help");
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{words:?}: {help}");
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            let flag = flag.split('=').next().unwrap_or_default();
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "docs/deploy.md: `{}` has no {flag}",
                words.join(" ")
            );
        }
    }
    for (prefix, program) in [
        ("CCC_COORDINATOR_", "ccc-coordinator"),
        ("CCC_AGENT_", "ccc-agent"),
    ] {
        let help = Command::new(bin(program))
            .arg("--help")
            .output()
            .expect("help");
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        for (at, _) in doc.match_indices(prefix) {
            let variable: String = doc[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            assert!(
                help.contains(&format!("[env: {variable}")),
                "docs/deploy.md names {variable}, which {program} does not read"
            );
        }
    }
}

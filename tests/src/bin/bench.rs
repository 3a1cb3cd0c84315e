//! `bench`: the cluster's performance figures (see `tests::bench` and
//! BENCHMARKS.md).
//!
//! `bench [--quick] [--json | --markdown] [--data-dir DIR] [FILTER]`:
//! `--quick` runs smaller counts (the whole run under two minutes),
//! `--json` prints one JSON object per figure, `--markdown` a table for
//! BENCHMARKS.md, `FILTER` runs the scenarios whose name or description
//! contains it. The data directory (default `data/bench`) holds the PKI
//! and the bench repository between runs, and each scenario's files.

use std::path::PathBuf;
use std::process::ExitCode;

use tests::bench::{Options, main as bench, scenarios};

const USAGE: &str = "usage: bench [--quick] [--json | --markdown] [--data-dir DIR] [FILTER]";

fn main() -> ExitCode {
    let mut opts = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--json" => opts.json = true,
            "--markdown" => opts.markdown = true,
            "--data-dir" => match args.next() {
                Some(dir) => opts.data_dir = Some(PathBuf::from(dir)),
                None => {
                    eprintln!("bench: --data-dir needs a directory ({USAGE})");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}\n\nscenarios:");
                for s in scenarios() {
                    println!("  {:<12} {}", s.key, s.about);
                }
                return ExitCode::SUCCESS;
            }
            other if other.starts_with('-') => {
                eprintln!("bench: unknown option {other} ({USAGE})");
                return ExitCode::from(2);
            }
            other => opts.filter = Some(other.to_owned()),
        }
    }
    bench(opts)
}

//! What `/proc` says about a process: resident memory, CPU time, bytes
//! written to storage.

use std::time::Duration;

/// Resident memory of `pid` in bytes (`VmRSS`).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// User plus system CPU time of `pid` (all its threads).
pub fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: fields count from after its ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Bytes `pid` caused to be sent to storage (`write_bytes` of
/// `/proc/<pid>/io`).
pub fn write_bytes(pid: u32) -> u64 {
    io_field(pid, "write_bytes")
}

fn io_field(pid: u32, name: &str) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The size of every file under `dir`, in bytes (what `du` counts as
/// apparent size would differ for sparse files; this is blocks used).
pub fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// Counts the calls of `syscalls` that `pid` makes during `window`, with
/// strace attached (which slows every system call of the process, so
/// nothing else is measured meanwhile). `None` when strace is missing or
/// may not attach.
pub fn count_syscalls(pid: u32, syscalls: &str, window: Duration) -> Option<u64> {
    let out_file = std::env::temp_dir().join(format!("bench-strace-{pid}.txt"));
    let mut child = std::process::Command::new("strace")
        .args(["-f", "-c", "-e", &format!("trace={syscalls}"), "-o"])
        .arg(&out_file)
        .args(["-p", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(window);
    let _ = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().ok()?;
    let text = std::fs::read_to_string(&out_file).ok()?;
    let _ = std::fs::remove_file(&out_file);
    if !text.contains("% time") {
        // strace prints no table when nothing was called, and then ends
        // by the SIGINT itself; it fails with 1 when it may not attach.
        use std::os::unix::process::ExitStatusExt;
        return (status.success() || status.signal() == Some(2)).then_some(0);
    }
    // Per system call: `% time, seconds, usecs/call, calls, [errors], name`.
    let calls = text
        .lines()
        .filter(|l| {
            !l.contains("% time") && !l.starts_with('-') && !l.trim_end().ends_with("total")
        })
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum();
    Some(calls)
}

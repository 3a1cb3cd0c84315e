//! How agents are shown: an aligned table, a detail view, and JSON.

use common::proto::{AgentInfo, AgentState, Specialty};
use common::time::UnixMillis;
use serde_json::json;

fn state_name(info: &AgentInfo) -> &'static str {
    match AgentState::try_from(info.state) {
        Ok(AgentState::Connected) => "connected",
        Ok(AgentState::Disconnected) => "disconnected",
        Ok(AgentState::Draining) => "draining",
        Ok(AgentState::Revoked) => "revoked",
        _ => "unknown",
    }
}

pub fn specialty_name(value: i32) -> &'static str {
    match Specialty::try_from(value) {
        Ok(Specialty::Backend) => "backend",
        Ok(Specialty::Frontend) => "frontend",
        Ok(Specialty::Testing) => "testing",
        Ok(Specialty::Devops) => "devops",
        Ok(Specialty::General) => "general",
        _ => "unknown",
    }
}

fn specialties(info: &AgentInfo) -> Vec<&'static str> {
    info.specialties
        .iter()
        .map(|&s| specialty_name(s))
        .collect()
}

fn toolchains(info: &AgentInfo) -> String {
    info.toolchains
        .iter()
        .map(|t| format!("{} {}", t.name, t.version))
        .collect::<Vec<_>>()
        .join(", ")
}

fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map(|t| UnixMillis::from_timestamp(t).to_rfc3339())
        .unwrap_or_default()
}

/// Rows padded to the widest cell of each column; the last column is free.
pub fn render(rows: &[Vec<String>]) -> String {
    let n_cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n_cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn agents_table(agents: &[AgentInfo]) -> String {
    if agents.is_empty() {
        return "no agents yet: start one with `ccc-agent` and an agent certificate\n".into();
    }
    let mut rows = vec![
        [
            "AGENT",
            "STATE",
            "SPECIALTIES",
            "SLOTS",
            "LAST SEEN",
            "CONNS",
            "TOOLCHAINS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for a in agents {
        rows.push(vec![
            a.agent_id.clone(),
            state_name(a).into(),
            specialties(a).join(","),
            format!("{}/{}", a.free_slots, a.capacity),
            time(a.last_seen.as_ref()),
            a.connections.to_string(),
            toolchains(a),
        ]);
    }
    render(&rows)
}

pub fn agent_detail(a: &AgentInfo) -> String {
    let labels = a
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let running = a
        .running
        .iter()
        .map(|t| format!("{}#{}", t.task_id, t.attempt))
        .collect::<Vec<_>>()
        .join(", ");
    let rows: Vec<Vec<String>> = [
        ("agent", a.agent_id.clone()),
        ("state", state_name(a).into()),
        ("specialties", specialties(a).join(", ")),
        ("slots", format!("{} free of {}", a.free_slots, a.capacity)),
        ("running", running),
        ("labels", labels),
        ("toolchains", toolchains(a)),
        ("version", a.agent_version.clone()),
        ("hostname", a.hostname.clone()),
        ("peer", a.peer_address.clone()),
        ("first seen", time(a.first_seen.as_ref())),
        ("last seen", time(a.last_seen.as_ref())),
        ("connections", a.connections.to_string()),
        ("last disconnect", a.last_disconnect_reason.clone()),
    ]
    .into_iter()
    .map(|(k, v)| vec![format!("{k}:"), v])
    .collect();
    render(&rows)
}

pub fn agent_json(a: &AgentInfo) -> serde_json::Value {
    json!({
        "agent_id": a.agent_id,
        "state": state_name(a),
        "specialties": specialties(a),
        "capacity": a.capacity,
        "free_slots": a.free_slots,
        "labels": a.labels,
        "toolchains": a.toolchains.iter().map(|t| json!({"name": t.name, "version": t.version})).collect::<Vec<_>>(),
        "agent_version": a.agent_version,
        "hostname": a.hostname,
        "peer_address": a.peer_address,
        "first_seen": time(a.first_seen.as_ref()),
        "last_seen": time(a.last_seen.as_ref()),
        "connections": a.connections,
        "running": a.running.iter().map(|t| json!({"task_id": t.task_id, "attempt": t.attempt, "last_output_seq": t.last_output_seq})).collect::<Vec<_>>(),
        "last_disconnect_reason": a.last_disconnect_reason,
    })
}

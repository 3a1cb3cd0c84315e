//! How agents are shown: an aligned table, a detail view, and JSON.

use common::proto::{AdminInfo, AgentInfo, AgentState, Specialty};
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

/// Rows aligned in columns two spaces apart, without borders (comfy-table);
/// no line ends in spaces.
pub fn render(rows: &[Vec<String>]) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .add_rows(rows.iter().cloned());
    let n_cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if i + 1 < n_cols { 2 } else { 0 }));
    }
    if rows.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    for line in table.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Why the agent takes no work, in words; empty when it can.
fn why_no_work(a: &AgentInfo, now: UnixMillis) -> String {
    let mut why = Vec::new();
    match AgentState::try_from(a.state) {
        Ok(AgentState::Revoked) => why.push(format!("revoked: {}", a.revoked_reason)),
        Ok(AgentState::Disconnected) => why.push("disconnected".to_owned()),
        Ok(AgentState::Draining) if a.drain_reason.is_empty() => {
            why.push("draining (the agent is stopping)".to_owned());
        }
        Ok(AgentState::Draining) => why.push(format!("draining: {}", a.drain_reason)),
        _ => {}
    }
    if !a.unhealthy_reason.is_empty() {
        why.push(format!("unhealthy: {}", a.unhealthy_reason));
    }
    if let Some(until) = a.cooldown_until.as_ref() {
        let until = UnixMillis::from_timestamp(until);
        if until > now {
            why.push(format!("cooling down until {}", until.to_rfc3339()));
        }
    }
    why.join("; ")
}

/// The reason shown next to the state in the table.
fn state_reason(a: &AgentInfo) -> String {
    match AgentState::try_from(a.state) {
        Ok(AgentState::Revoked) => a.revoked_reason.clone(),
        Ok(AgentState::Draining) => a.drain_reason.clone(),
        _ if !a.unhealthy_reason.is_empty() => format!("unhealthy: {}", a.unhealthy_reason),
        _ => String::new(),
    }
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
            "REASON",
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
            match state_reason(a) {
                r if r.is_empty() => "-".into(),
                r => r,
            },
            toolchains(a),
        ]);
    }
    render(&rows)
}

/// The slots line: free + assigned = capacity when the agent can work;
/// otherwise 0 free, and why.
fn slots(a: &AgentInfo, now: UnixMillis) -> String {
    let assigned = a.assigned.len();
    let held = if assigned == 0 {
        "none assigned".to_owned()
    } else {
        format!("{assigned} assigned ({})", a.assigned.join(", "))
    };
    let why = why_no_work(a, now);
    if why.is_empty() {
        format!("{} free of {}, {held}", a.free_slots, a.capacity)
    } else {
        format!("0 free of {} ({why}), {held}", a.capacity)
    }
}

pub fn agent_detail(a: &AgentInfo, now: UnixMillis) -> String {
    let labels = a
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let running = if a.running.is_empty() {
        "none reported".to_owned()
    } else {
        a.running
            .iter()
            .map(|t| format!("{} attempt {}", t.task_id, t.attempt))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut rows: Vec<(&str, String)> = vec![
        ("agent", a.agent_id.clone()),
        ("state", state_name(a).into()),
    ];
    if !a.drain_reason.is_empty() {
        rows.push(("drained", a.drain_reason.clone()));
    }
    if !a.revoked_reason.is_empty() {
        rows.push(("revoked", a.revoked_reason.clone()));
    }
    if !a.unhealthy_reason.is_empty() {
        rows.push(("unhealthy", a.unhealthy_reason.clone()));
    }
    rows.extend([
        ("specialties", specialties(a).join(", ")),
        ("slots", slots(a, now)),
        ("running", running),
        ("labels", labels),
        ("toolchains", toolchains(a)),
        ("version", a.agent_version.clone()),
        ("hostname", a.hostname.clone()),
        ("instance", a.instance_id.clone()),
        ("peer", a.peer_address.clone()),
        ("first seen", time(a.first_seen.as_ref())),
        ("last seen", time(a.last_seen.as_ref())),
        ("connections", a.connections.to_string()),
        ("last disconnect", a.last_disconnect_reason.clone()),
    ]);
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(k, v)| vec![format!("{k}:"), v])
        .collect();
    render(&rows)
}

pub fn agent_json(a: &AgentInfo) -> serde_json::Value {
    json!({
        "agent_id": a.agent_id,
        "state": state_name(a),
        "drain_reason": a.drain_reason,
        "revoked_reason": a.revoked_reason,
        "unhealthy_reason": a.unhealthy_reason,
        "specialties": specialties(a),
        "capacity": a.capacity,
        "free_slots": a.free_slots,
        "assigned": a.assigned,
        "cooldown_until": time(a.cooldown_until.as_ref()),
        "labels": a.labels,
        "toolchains": a.toolchains.iter().map(|t| json!({"name": t.name, "version": t.version})).collect::<Vec<_>>(),
        "agent_version": a.agent_version,
        "hostname": a.hostname,
        "instance_id": a.instance_id,
        "peer_address": a.peer_address,
        "first_seen": time(a.first_seen.as_ref()),
        "last_seen": time(a.last_seen.as_ref()),
        "connections": a.connections,
        "running": a.running.iter().map(|t| json!({"task_id": t.task_id, "attempt": t.attempt, "last_output_seq": t.last_output_seq})).collect::<Vec<_>>(),
        "last_disconnect_reason": a.last_disconnect_reason,
    })
}

pub fn admins_table(admins: &[AdminInfo]) -> String {
    if admins.is_empty() {
        return "no admin certificate was ever revoked\n".into();
    }
    let mut rows = vec![
        ["ADMIN", "STATE", "REVOKED AT", "REASON"]
            .map(String::from)
            .to_vec(),
    ];
    for a in admins {
        rows.push(vec![
            a.name.clone(),
            if a.revoked { "revoked" } else { "unrevoked" }.into(),
            time(a.revoked_at.as_ref()),
            a.revoked_reason.clone(),
        ]);
    }
    render(&rows)
}

pub fn admin_json(a: &AdminInfo) -> serde_json::Value {
    json!({
        "name": a.name,
        "revoked": a.revoked,
        "revoked_reason": a.revoked_reason,
        "revoked_at": time(a.revoked_at.as_ref()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(state: AgentState) -> AgentInfo {
        AgentInfo {
            agent_id: "pc-1".into(),
            state: state as i32,
            capacity: 2,
            free_slots: 1,
            assigned: vec!["t-3".into()],
            ..AgentInfo::default()
        }
    }

    #[test]
    fn slots_add_up_or_say_why_none_is_free() {
        let now = UnixMillis(1_000_000);
        assert_eq!(
            slots(&agent(AgentState::Connected), now),
            "1 free of 2, 1 assigned (t-3)"
        );
        let mut sick = agent(AgentState::Connected);
        sick.free_slots = 0;
        sick.unhealthy_reason = "claude is not logged in".into();
        sick.cooldown_until = Some(UnixMillis(1_060_000).to_timestamp());
        assert_eq!(
            slots(&sick, now),
            format!(
                "0 free of 2 (unhealthy: claude is not logged in; cooling down until {}), 1 assigned (t-3)",
                UnixMillis(1_060_000).to_rfc3339()
            )
        );
        let mut rested = agent(AgentState::Connected);
        rested.cooldown_until = Some(UnixMillis(999_000).to_timestamp());
        assert_eq!(slots(&rested, now), "1 free of 2, 1 assigned (t-3)");
        let mut gone = agent(AgentState::Disconnected);
        gone.assigned.clear();
        assert_eq!(
            slots(&gone, now),
            "0 free of 2 (disconnected), none assigned"
        );
    }
}

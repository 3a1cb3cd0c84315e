//! The agent stream driven by a hand-written client, to send what a real
//! agent never would: a false name, a second stream, a hostile Hello.

use std::time::Duration;

use common::proto::{
    self, AgentMessage, CoordinatorMessage, agent_gateway_client::AgentGatewayClient,
    agent_message, coordinator_message,
};
use common::tls::TlsPaths;
use tests::Cluster;
use tests::cluster::READY;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Endpoint;

struct RawAgent {
    tx: mpsc::Sender<AgentMessage>,
    inbound: Streaming<CoordinatorMessage>,
}

fn hello(claimed_name: &str, capacity: u32) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Hello(proto::Hello {
            agent_version: "raw".into(),
            specialties: vec![proto::Specialty::Backend as i32],
            capacity,
            claimed_name: claimed_name.into(),
            ..Default::default()
        })),
    }
}

async fn open(cluster: &Cluster, certs_dir: &std::path::Path, first: AgentMessage) -> RawAgent {
    let tls = TlsPaths::for_client(certs_dir, common::pki::Role::Agent, None, None, None)
        .expect("paths")
        .load()
        .expect("tls");
    let channel = Endpoint::from_shared(cluster.url())
        .expect("url")
        .tls_config(tls.client_config())
        .expect("tls config")
        .connect()
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.expect("send first");
    let inbound = AgentGatewayClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await
        .expect("stream opened")
        .into_inner();
    RawAgent { tx, inbound }
}

async fn next(agent: &mut RawAgent) -> Result<Option<CoordinatorMessage>, tonic::Status> {
    tokio::time::timeout(READY, agent.inbound.message())
        .await
        .expect("an answer in time")
}

fn runtime() -> tokio::runtime::Runtime {
    common::tls::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn the_name_claimed_in_hello_is_ignored_for_the_certificate_cn() {
    let mut cluster = Cluster::new("claimed-name");
    cluster.start_coordinator();
    let certs = cluster.pki.agent_certs("real-cn", &cluster.dir.join("raw"));
    runtime().block_on(async {
        let mut agent = open(&cluster, &certs, hello("impostor", 1)).await;
        let welcome = match next(&mut agent).await {
            Ok(Some(CoordinatorMessage {
                msg: Some(coordinator_message::Msg::Welcome(w)),
            })) => w,
            other => panic!("expected Welcome, got {other:?}"),
        };
        assert_eq!(welcome.agent_id, "real-cn");
        let agents = cluster.wait_agents(&["real-cn"], "connected");
        assert!(
            agents.iter().all(|a| a["agent_id"] != "impostor"),
            "{agents:?}"
        );
        drop(agent.tx);
    });
}

#[test]
fn a_second_stream_with_the_same_certificate_replaces_the_first() {
    let mut cluster = Cluster::new("replace");
    cluster.start_coordinator();
    let certs = cluster.pki.agent_certs("twin", &cluster.dir.join("raw"));
    runtime().block_on(async {
        let mut first = open(&cluster, &certs, hello("twin", 1)).await;
        assert!(matches!(next(&mut first).await, Ok(Some(_))), "welcome");
        let mut second = open(&cluster, &certs, hello("twin", 1)).await;
        assert!(matches!(next(&mut second).await, Ok(Some(_))), "welcome");
        // The first stream ends with ABORTED (heartbeats may come before).
        let status = loop {
            match next(&mut first).await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without a status"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
        assert!(status.message().contains("replaced"), "{status:?}");
        let agents = cluster.wait_agents(&["twin"], "connected");
        assert_eq!(agents[0]["connections"], 2);
        drop(second.tx);
    });
}

#[test]
fn a_second_process_with_the_same_certificate_is_refused_while_the_first_is_connected() {
    let mut cluster = Cluster::new("duplicate");
    cluster.start_coordinator();
    let certs = cluster.pki.agent_certs("pc-02", &cluster.dir.join("raw"));
    let as_instance = |instance: &str| AgentMessage {
        msg: Some(agent_message::Msg::Hello(proto::Hello {
            agent_version: "raw".into(),
            specialties: vec![proto::Specialty::Backend as i32],
            capacity: 1,
            instance_id: instance.into(),
            ..Default::default()
        })),
    };
    runtime().block_on(async {
        let mut first = open(&cluster, &certs, as_instance("first")).await;
        assert!(matches!(next(&mut first).await, Ok(Some(_))), "welcome");
        let mut second = open(&cluster, &certs, as_instance("second")).await;
        let status = next(&mut second).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
        assert!(
            status
                .message()
                .starts_with("agent pc-02 is already connected from 127.0.0.1:"),
            "{status:?}"
        );
        let agents = cluster.wait_agents(&["pc-02"], "connected");
        assert_eq!(agents[0]["connections"], 1, "the first stream was replaced");
        // Once the first process is gone, another may take its place.
        drop(first);
        let third = tokio::time::timeout(READY, async {
            loop {
                let mut third = open(&cluster, &certs, as_instance("third")).await;
                match next(&mut third).await {
                    Ok(Some(_)) => break third,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .expect("the third process was let in after the first left");
        drop(third.tx);
    });
    cluster
        .coordinator()
        .wait_for_log("second agent process refused", Duration::from_secs(5));
}

#[test]
fn a_hostile_hello_closes_the_stream_with_a_clear_status() {
    let mut cluster = Cluster::new("hostile").with_coordinator_args(&["--heartbeat-timeout", "3s"]);
    cluster.start_coordinator();
    let certs = cluster.pki.agent_certs("hostile", &cluster.dir.join("raw"));
    runtime().block_on(async {
        let mut agent = open(&cluster, &certs, hello("hostile", 1_000_000)).await;
        let status = next(&mut agent).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("capacity"), "{status:?}");

        // Silence before Hello: closed after the hello timeout (3s here).
        let mut silent = open(&cluster, &certs, AgentMessage { msg: None }).await;
        let status = next(&mut silent).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        drop((agent.tx, silent.tx));
    });
    cluster
        .coordinator()
        .wait_for_log("malformed message from agent", Duration::from_secs(5));
}

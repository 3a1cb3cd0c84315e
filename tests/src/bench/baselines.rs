//! The baselines, measured before the figures that compare against them:
//! what the machine itself costs, with none of our code in the way.
//!
//! - B1: fsync of a 4 KiB append on the data dir's file system; and its
//!   durable write bandwidth (1 MiB appends, each synced).
//! - B2: sled insert + flush, one writer; batched inserts (100 per flush).
//! - B3: a raw tonic bidi stream over loopback mTLS to a server that does
//!   nothing.
//! - B4: a raw tonic unary round trip over loopback mTLS (gRPC health
//!   `Check` on that server), and a read through the coordinator's driver
//!   (`ListAgents`, which writes nothing), serial and with 100 callers.
//! - B5: `git clone --local` of the bench repository, and a fresh clone of
//!   it over `git://` from a `git daemon` on loopback.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::time::Duration;

use common::proto::{
    self, AgentMessage, CoordinatorMessage,
    agent_gateway_client::AgentGatewayClient,
    agent_gateway_server::{AgentGateway, AgentGatewayServer},
    agent_message, coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::Stream as TokioStream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Channel, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use super::coord::{self, Coord};
use super::{Ctx, Figure, Q, Timings, measure, now};

#[derive(Clone, Debug)]
pub struct Fsync {
    pub p50: Duration,
    pub p99: Duration,
    /// Bytes per second of 1 MiB appends, each followed by `fdatasync`.
    pub write_bw: f64,
}

#[derive(Clone, Debug)]
pub struct Sled {
    pub p50: Duration,
    pub p99: Duration,
    /// Inserts per second, 100 per flush.
    pub batched_rate: f64,
    /// Bytes per second of 4 KiB values, 100 per flush.
    pub batched_bw: f64,
}

#[derive(Clone, Debug)]
pub struct Stream {
    /// (message size, messages/s, bytes/s)
    pub sizes: Vec<(usize, f64, f64)>,
}

impl Stream {
    pub fn bw(&self, size: usize) -> f64 {
        self.sizes
            .iter()
            .find(|(s, _, _)| *s == size)
            .map_or(0.0, |(_, _, bw)| *bw)
    }
}

#[derive(Clone, Debug)]
pub struct Unary {
    pub raw_p50: Duration,
    pub raw_rate_100: f64,
    pub driver_p50: Duration,
    pub driver_rate_100: f64,
    /// One loopback HTTP/1.1 round trip (`/healthz` of the coordinator).
    pub http_p50: Duration,
}

#[derive(Clone, Debug)]
pub struct Git {
    pub repo: PathBuf,
    pub local: Duration,
    pub fresh: Duration,
}

// ---- B1 ----

pub fn fsync(ctx: &mut Ctx) -> Fsync {
    let dir = ctx.scratch("fsync");
    let path = dir.join("append.log");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("open");
    let block = vec![7u8; 4096];
    let t = measure(ctx.n(1000, 200), || {
        file.write_all(&block).expect("write");
        file.sync_all().expect("fsync");
    });
    // What the device takes durably: whatever stores on this file system
    // (sled's log included) writes no faster.
    let path = dir.join("stream.log");
    let mut file = std::fs::File::create(&path).expect("create");
    let block = vec![9u8; 1 << 20];
    let blocks = ctx.n(256, 64);
    let start = now();
    for _ in 0..blocks {
        file.write_all(&block).expect("write");
        file.sync_data().expect("fdatasync");
    }
    let write_bw = (blocks * block.len()) as f64 / (now() - start).as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    let b = Fsync {
        p50: t.p50(),
        p99: t.p99(),
        write_bw,
    };
    ctx.push(Figure::base(
        "B1 fsync of a 4 KiB append, p50",
        Q::time(b.p50),
    ));
    ctx.push(Figure::base(
        "B1 fsync of a 4 KiB append, p99",
        Q::time(b.p99),
    ));
    ctx.push(Figure::base(
        "B1 durable write bandwidth (1 MiB appends, each synced)",
        Q::bw(b.write_bw),
    ));
    b
}

// ---- B2 ----

fn open_sled(dir: &Path) -> sled::Db {
    // As the coordinator's store opens it.
    sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()
        .expect("open sled")
}

fn flush(db: &sled::Db) {
    let _guard = sled::pin();
    db.flush().expect("flush");
}

pub fn sled(ctx: &mut Ctx) -> Sled {
    let dir = ctx.scratch("sled");
    let db = open_sled(&dir);
    let tree = db.open_tree("t").expect("tree");
    let value = vec![1u8; 1024];
    let mut key = 0u64;
    let one = measure(ctx.n(1000, 200), || {
        key += 1;
        tree.insert(key.to_be_bytes(), value.as_slice())
            .expect("insert");
        flush(&db);
    });
    let batches = ctx.n(200, 40);
    let mut batched = |value: &[u8]| {
        let start = now();
        for _ in 0..batches {
            for _ in 0..100 {
                key += 1;
                tree.insert(key.to_be_bytes(), value).expect("insert");
            }
            flush(&db);
        }
        start.elapsed().as_secs_f64()
    };
    let secs = batched(&value);
    let big = vec![2u8; 4096];
    let big_secs = batched(&big);
    // What the coordinator's commit is: one transaction over its trees.
    let trees: Vec<sled::Tree> = (0..6)
        .map(|i| db.open_tree(format!("x{i}")).expect("tree"))
        .collect();
    let tx = measure(ctx.n(1000, 200), || {
        use sled::Transactional;
        key += 1;
        trees[..]
            .transaction(|t| {
                t[1].insert(&key.to_be_bytes(), value.as_slice())?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .expect("transaction");
        flush(&db);
    });
    let b = Sled {
        p50: one.p50(),
        p99: one.p99(),
        batched_rate: (batches * 100) as f64 / secs,
        batched_bw: (batches * 100 * 4096) as f64 / big_secs,
    };
    ctx.push(Figure::base(
        "B2 sled insert 1 KiB + flush, p50",
        Q::time(b.p50),
    ));
    ctx.push(Figure::base(
        "B2 sled insert 1 KiB + flush, p99",
        Q::time(b.p99),
    ));
    ctx.push(Figure::base(
        "B2 sled transaction over 6 trees + flush, p50",
        Q::time(tx.p50()),
    ));
    ctx.push(Figure::base(
        "B2 sled batched inserts (100 per flush)",
        Q::rate(b.batched_rate),
    ));
    ctx.push(Figure::base(
        "B2 sled batched 4 KiB bandwidth",
        Q::bw(b.batched_bw),
    ));
    drop((tree, trees));
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    b
}

// ---- B3 and the raw server of B4 ----

/// A gateway that reads every message and answers nothing until the
/// client is done, then one heartbeat carrying the count.
struct Null;

type Outbound = Pin<Box<dyn TokioStream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentGateway for Null {
    type ConnectStream = Outbound;

    async fn connect(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok(Some(_)) = inbound.message().await {
                n += 1;
            }
            let done = CoordinatorMessage {
                msg: Some(coordinator_message::Msg::Heartbeat(
                    proto::CoordinatorHeartbeat { unix_ms: n },
                )),
            };
            let _ = tx.send(Ok(done)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A raw tonic server over mutual TLS (the bench PKI's coordinator
/// certificate) serving `Null` and gRPC health; its URL.
async fn null_server(certs: &Path) -> String {
    let read = |f: &str| std::fs::read(certs.join(f)).expect("pem");
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read("coordinator.pem"),
            read("coordinator-key.pem"),
        ))
        .client_ca_root(Certificate::from_pem(read("ca.pem")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = Server::builder()
        .tls_config(tls)
        .expect("server tls")
        .add_service(AgentGatewayServer::new(Null))
        .add_service(health);
    tokio::spawn(server.serve_with_incoming(TcpListenerStream::new(listener)));
    format!("https://{addr}")
}

/// Streams `count` messages of `size` bytes; the time until the server has
/// read them all.
pub async fn stream_once(channel: Channel, count: u64, size: usize) -> Duration {
    let (tx, rx) = mpsc::channel::<AgentMessage>(1024);
    let start = now();
    let mut client = AgentGatewayClient::new(channel);
    let sender = tokio::spawn(async move {
        let data = vec![b'x'; size];
        for seq in 1..=count {
            let m = AgentMessage {
                msg: Some(agent_message::Msg::TaskOutput(proto::TaskOutput {
                    task_id: "t-1".into(),
                    attempt: 1,
                    seq,
                    kind: proto::OutputKind::Stdout as i32,
                    data: data.clone(),
                })),
            };
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut inbound = client
        .connect(ReceiverStream::new(rx))
        .await
        .expect("stream opened")
        .into_inner();
    let got = inbound.message().await.expect("the server's answer");
    let elapsed = start.elapsed();
    let _ = sender.await;
    match got.and_then(|m| m.msg) {
        Some(coordinator_message::Msg::Heartbeat(h)) => {
            assert_eq!(h.unix_ms, count, "the server read every message")
        }
        other => panic!("unexpected answer {other:?}"),
    }
    elapsed
}

pub fn stream(ctx: &mut Ctx) -> Stream {
    let certs = coord::pki(ctx);
    let agent = coord::agent_certs(ctx, 1).remove(0).1;
    let budget: u64 = ctx.n(128 << 20, 32 << 20);
    let cap: u64 = ctx.n(200_000, 50_000);
    let sizes = ctx.rt.block_on(async {
        let url = null_server(&certs).await;
        let channel = coord::connect(&url, &agent).await;
        // Warm up the connection.
        stream_once(channel.clone(), 1000, 256).await;
        let mut out = Vec::new();
        for size in [256usize, 4096, 65536] {
            let count = (budget / size as u64).min(cap);
            let secs = stream_once(channel.clone(), count, size)
                .await
                .as_secs_f64();
            out.push((
                size,
                count as f64 / secs,
                (count * size as u64) as f64 / secs,
            ));
        }
        out
    });
    for (size, rate, bw) in &sizes {
        let label = match size {
            256 => "256 B".to_owned(),
            s => format!("{} KiB", s / 1024),
        };
        ctx.push(Figure::base(
            format!("B3 raw mTLS stream, {label} messages"),
            Q::rate(*rate),
        ));
        ctx.push(Figure::base(
            format!("B3 raw mTLS stream, {label} bandwidth"),
            Q::bw(*bw),
        ));
    }
    Stream { sizes }
}

// ---- B4 ----

/// `callers` concurrent callers making `each` calls of `call` on clones of
/// one channel: calls per second.
pub async fn concurrent<F, Fut>(callers: usize, each: usize, call: F) -> f64
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                call(c * each + i).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("caller");
    }
    (callers * each) as f64 / start.elapsed().as_secs_f64()
}

/// Times `runs` awaited calls one after the other.
pub async fn serial<F, Fut>(runs: usize, call: F) -> Timings
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs {
        let start = now();
        call(i).await;
        times.push(start.elapsed());
    }
    Timings::new(times)
}

pub fn unary(ctx: &mut Ctx) -> Unary {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let certs = coord::pki(ctx);
    let agent = coord::agent_certs(ctx, 1).remove(0).1;
    let runs = ctx.n(2000, 300);
    let each = ctx.n(50, 10);
    let coordinator = Coord::start(ctx, &ctx.scratch("unary"), &[]);
    let (raw, raw_rate, driver, driver_rate) = ctx.rt.block_on(async {
        let url = null_server(&certs).await;
        let health = HealthClient::new(coord::connect(&url, &agent).await);
        let check = move |_| {
            let mut h = health.clone();
            async move {
                let _ = h
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
            }
        };
        serial(50, check.clone()).await;
        let raw = serial(runs, check.clone()).await;
        let raw_rate = concurrent(100, each, check).await;
        let admin = coordinator.admin().await;
        let list = move |_| {
            let mut a = admin.clone();
            async move {
                a.list_agents(proto::ListAgentsRequest::default())
                    .await
                    .expect("ListAgents");
            }
        };
        serial(50, list.clone()).await;
        let driver = serial(runs, list.clone()).await;
        let driver_rate = concurrent(100, each, list).await;
        (raw, raw_rate, driver, driver_rate)
    });
    let url = format!("http://{}/healthz", coordinator.http);
    let http = ctx.rt.block_on(serial(ctx.n(300, 60), |_| http_get(&url)));
    coordinator.stop();
    let b = Unary {
        raw_p50: raw.p50(),
        raw_rate_100: raw_rate,
        driver_p50: driver.p50(),
        driver_rate_100: driver_rate,
        http_p50: http.p50(),
    };
    ctx.push(Figure::base(
        "B4 raw unary round trip (mTLS), p50",
        Q::time(b.raw_p50),
    ));
    ctx.push(Figure::base(
        "B4 raw unary, 100 concurrent callers",
        Q::rate(b.raw_rate_100),
    ));
    ctx.push(Figure::base(
        "B4 driver read (ListAgents), p50",
        Q::time(b.driver_p50),
    ));
    ctx.push(Figure::base(
        "B4 driver read, 100 concurrent callers",
        Q::rate(b.driver_rate_100),
    ));
    ctx.push(Figure::base(
        "loopback HTTP round trip (/healthz), p50",
        Q::time(b.http_p50),
    ));
    b
}

/// One HTTP/1.1 GET on a new loopback connection, as a webhook comes.
async fn http_get(url: &str) {
    crate::http::send(
        axum::http::Method::GET,
        url,
        &[],
        Vec::new(),
        Duration::from_secs(10),
    )
    .await
    .expect("GET");
}

// ---- B5 ----

/// The bench repository: 20,000 files and 2,000 commits (made once with
/// `git fast-import`, kept in `<data-dir>/cache`).
pub fn bench_repo(ctx: &Ctx) -> PathBuf {
    let cache = ctx.dir.join("cache");
    let repo = cache.join("bench-20000f-2000c.git");
    if repo.join("bench-complete").exists() {
        return repo;
    }
    eprintln!("  making the bench repository (20,000 files, 2,000 commits; kept)");
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(&repo).expect("mkdir");
    run_git(&repo, &["init", "--bare", "-q"]);
    run_git(&repo, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let mut stream = Vec::new();
    let file = |i: usize, rev: usize| {
        format!(
            "// file {i}, revision {rev}\npub fn f{i}() -> u64 {{\n    {}\n}}\n{}\n",
            i * 31 + rev,
            "// the quick brown fox jumps over the lazy dog\n".repeat(4)
        )
    };
    let path = |i: usize| format!("src/m{:03}/f{:05}.rs", i / 100, i);
    let mut rev = vec![0usize; 20_000];
    for c in 0..2000usize {
        let msg = format!("change {c}\n");
        let _ = write!(
            stream,
            "commit refs/heads/main\nmark :{}\ncommitter Bench <bench@localhost> {} +0000\ndata {}\n{msg}",
            c + 1,
            1_700_000_000 + c * 60,
            msg.len()
        );
        if c > 0 {
            let _ = writeln!(stream, "from :{c}");
        }
        let changed: Vec<usize> = if c == 0 {
            (0..20_000).collect()
        } else {
            (0..10).map(|k| (c * 7919 + k * 104_729) % 20_000).collect()
        };
        for i in changed {
            if c > 0 {
                rev[i] += 1;
            }
            let body = file(i, rev[i]);
            let _ = write!(
                stream,
                "M 100644 inline {}\ndata {}\n{body}\n",
                path(i),
                body.len()
            );
        }
    }
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(&repo)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("git fast-import");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&stream)
        .expect("feed fast-import");
    assert!(child.wait().expect("fast-import").success());
    run_git(&repo, &["repack", "-adq"]);
    std::fs::write(repo.join("bench-complete"), "").expect("marker");
    repo
}

pub fn run_git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn git(ctx: &mut Ctx) -> Git {
    let repo = bench_repo(ctx);
    let dir = ctx.scratch("git");
    let runs = ctx.n(3, 1);
    let daemon = crate::git::Daemon::start(repo.parent().expect("cache dir"));
    let url = daemon.url(
        repo.file_name()
            .and_then(|n| n.to_str())
            .expect("repo name"),
    );
    let mut k = 0;
    let mut clone = |src: &str, extra: &[&str]| {
        k += 1;
        let dst = dir.join(format!("clone-{k}"));
        let mut args = vec!["clone", "-q"];
        args.extend_from_slice(extra);
        args.extend([src, dst.to_str().expect("utf-8")]);
        run_git(&dir, &args);
        // Kept until the next run: creating 20,000 files right after
        // deleting 20,000 is several times slower on ext4 (its inode
        // allocator skips recently deleted inodes), which would bias
        // whichever clone came later.
    };
    let src = repo.to_str().expect("utf-8").to_owned();
    let local = measure(runs, || clone(&src, &["--local"]));
    let fresh = measure(runs, || clone(&url, &[]));
    drop(daemon);
    let b = Git {
        repo,
        local: local.p50(),
        fresh: fresh.p50(),
    };
    ctx.push(Figure::base(
        "B5 git clone --local (20,000 files, 2,000 commits)",
        Q::time(b.local),
    ));
    ctx.push(Figure::base(
        "B5 fresh git clone over git://",
        Q::time(b.fresh),
    ));
    b
}

//! The GitHub fakes checked through the real pieces: octocrab against the
//! fake REST server behind Prism's validating proxy (GitHub's own OpenAPI
//! description), an App installation token from a JWT, the scripted
//! faults as a raw client sees them, GitHub's example deliveries signed
//! and verified in both content types, and a delivery through the real
//! smee-client.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::post;
use octocrab::Octocrab;
use octocrab::models::{AppId, CommentId, InstallationId};
use serde_json::{Value, json};
use tests::github::{AppConfig, FakeGitHub, Fault, GitHubConfig, NewIssue, User};
use tests::http::{self, Answer};
use tests::npm::{self, Prism};
use tests::smee::{SmeeChannel, SmeeClient};
use tests::webhooks::{self, Delivery, Encoding, UserKind};
use tests::{TestDir, eventually};

const TOKEN: &str = "ghp_faketoken0000000000000000000000000";
const REPO: &str = "acme/widgets";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn octocrab_at(base: &str) -> Octocrab {
    Octocrab::builder()
        .base_uri(base)
        .expect("a base URI")
        .personal_token(TOKEN.to_owned())
        // Prism cannot negotiate `application/vnd.github+json`.
        .add_header(axum::http::header::ACCEPT, "application/json".to_owned())
        .build()
        .expect("octocrab")
}

#[test]
fn fakes_octocrab_through_prism_finds_no_violation() {
    let dir = TestDir::new("fakes-prism");
    let github = FakeGitHub::start(GitHubConfig::with_token(TOKEN));
    github.create_repo(REPO);
    for n in 0..5 {
        github.create_issue(
            REPO,
            NewIssue::new(&format!("Bug {n}"))
                .body("It crashes.")
                .labels(&["ccc", "bug"])
                .user(User::person("alice"))
                .author_association("MEMBER"),
        );
    }
    github.create_issue(
        REPO,
        NewIssue::new("Not for us").user(User::bot("dependabot[bot]")),
    );
    let prism = Prism::start(dir.path(), &github.url());
    github.set_public_url(&prism.url());
    // octocrab's client spawns its worker on the runtime it is built in.
    let rt = runtime();
    let _enter = rt.enter();
    let octo = octocrab_at(&prism.url());

    rt.block_on(async {
        // Issues by label, two a page, every page followed through Prism.
        let first = octo
            .issues("acme", "widgets")
            .list()
            .labels(&["ccc".to_owned()])
            .per_page(2)
            .send()
            .await
            .expect("list issues");
        assert_eq!(first.items.len(), 2);
        assert!(first.next.is_some(), "a Link to the next page");
        let all = octo.all_pages(first).await.expect("every page");
        let mut numbers: Vec<u64> = all.iter().map(|i| i.number).collect();
        numbers.sort_unstable();
        assert_eq!(numbers, vec![1, 2, 3, 4, 5]);
        assert!(
            all.iter()
                .all(|i| i.user.login == "alice" && i.labels.len() == 2)
        );

        // A comment, created then edited (PATCH, as the description has it).
        let comment = octo
            .issues("acme", "widgets")
            .create_comment(3, "Working on it.")
            .await
            .expect("create a comment");
        let edited: octocrab::models::issues::Comment = octo
            .patch(
                format!("/repos/acme/widgets/issues/comments/{}", comment.id),
                Some(&json!({"body": "Done."})),
            )
            .await
            .expect("edit the comment");
        assert_eq!(edited.body.as_deref(), Some("Done."));

        // A pull request; a second for the same head and base is a 422;
        // the first is found by its head.
        github.add_branch(REPO, "ccc/t-1");
        let pr = octo
            .pulls("acme", "widgets")
            .create("Fix bug 3", "ccc/t-1", "main")
            .body("Closes #3")
            .send()
            .await
            .expect("open a pull request");
        let again = octo
            .pulls("acme", "widgets")
            .create("Fix bug 3", "ccc/t-1", "main")
            .send()
            .await;
        match again {
            Err(octocrab::Error::GitHub { source, .. }) => {
                assert_eq!(source.status_code.as_u16(), 422);
                assert_eq!(source.message, "Validation Failed");
                let errors = source.errors.unwrap_or_default();
                assert_eq!(
                    errors[0]["message"],
                    "A pull request already exists for acme:ccc/t-1."
                );
            }
            other => panic!("expected GitHub's 422, got {other:?}"),
        }
        let found = octo
            .pulls("acme", "widgets")
            .list()
            .state(octocrab::params::State::Open)
            .head("acme:ccc/t-1")
            .base("main")
            .send()
            .await
            .expect("pulls by head");
        assert_eq!(found.items.len(), 1);
        assert_eq!(found.items[0].number, pr.number);
        let got = octo
            .pulls("acme", "widgets")
            .get(pr.number)
            .await
            .expect("get the pull request");
        assert_eq!(got.head.ref_field, "ccc/t-1");
    });

    assert_eq!(
        prism.violations(),
        Vec::<String>::new(),
        "{}",
        prism.log_text()
    );
    let requests = github.requests();
    assert!(
        requests.iter().all(
            |r| r.header("authorization") == Some(&format!("Bearer {TOKEN}")) && r.status < 500
        ),
        "{requests:#?}"
    );
    assert_eq!(github.comments(REPO, 3)[0].body, "Done.");
    assert_eq!(github.pulls(REPO).len(), 1);

    // octocrab's `update_comment` sends POST: the fake (like GitHub)
    // accepts it; GitHub's description has no POST there, so Prism
    // refuses it as a violation without forwarding it.
    let direct = octocrab_at(&github.url());
    let via_prism = rt.block_on(async {
        let updated = direct
            .issues("acme", "widgets")
            .update_comment(CommentId(github.comments(REPO, 3)[0].id), "Done, again.")
            .await
            .expect("update_comment against the fake");
        assert_eq!(updated.body.as_deref(), Some("Done, again."));
        http::send(
            Method::POST,
            &format!(
                "{}/repos/acme/widgets/issues/comments/{}",
                prism.url(),
                updated.id
            ),
            &[
                ("authorization", &format!("Bearer {TOKEN}")),
                ("accept", "application/json"),
                ("content-type", "application/json"),
            ],
            br#"{"body":"x"}"#.to_vec(),
            Duration::from_secs(30),
        )
        .await
        .expect("an answer")
    });
    assert!(
        npm::is_violation(&via_prism),
        "{via_prism:?} {}",
        via_prism.text()
    );
    // A request that breaks the description: Prism's own 422 report.
    let bad = rt
        .block_on(http::send(
            Method::POST,
            &format!("{}/repos/acme/widgets/pulls", prism.url()),
            &[
                ("authorization", &format!("Bearer {TOKEN}")),
                ("accept", "application/json"),
                ("content-type", "application/json"),
            ],
            br#"{"title":"no head"}"#.to_vec(),
            Duration::from_secs(30),
        ))
        .expect("an answer");
    assert_eq!(
        bad.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        bad.text()
    );
    assert!(npm::is_violation(&bad), "{bad:?} {}", bad.text());
    assert_eq!(via_prism.status, StatusCode::METHOD_NOT_ALLOWED);

    // An answer that breaks the description (a status it does not list for
    // this operation) is passed on and logged as a violation.
    github.inject(Fault::bad_gateway());
    let broken = rt
        .block_on(http::send(
            Method::GET,
            &format!("{}/repos/acme/widgets", prism.url()),
            &[
                ("authorization", &format!("Bearer {TOKEN}")),
                ("accept", "application/json"),
            ],
            Vec::new(),
            Duration::from_secs(30),
        ))
        .expect("an answer");
    eprintln!(
        "prism on a broken answer: {} {:?} {}\n{:?}",
        broken.status,
        broken.headers,
        broken.text(),
        prism.violations()
    );
    assert_eq!(broken.status, StatusCode::BAD_GATEWAY);
    assert!(npm::is_violation(&broken));
    assert!(!prism.violations().is_empty());
}

/// An RSA key pair: (private PKCS#1 PEM, public PKCS#1 PEM).
pub(crate) fn rsa_key_pair() -> (String, String) {
    use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey, LineEnding};
    let mut rng = rsa::rand_core::OsRng;
    let private = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("an RSA key");
    let public = private.to_public_key();
    (
        private
            .to_pkcs1_pem(LineEnding::LF)
            .expect("private PEM")
            .to_string(),
        public.to_pkcs1_pem(LineEnding::LF).expect("public PEM"),
    )
}

#[allow(clippy::disallowed_methods)]
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

fn jwt(private_pem: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("key"),
    )
    .expect("a JWT")
}

#[test]
fn fakes_app_installation_token_from_a_jwt() {
    const APP_ID: u64 = 123_456;
    let (private_pem, public_pem) = rsa_key_pair();
    let github = FakeGitHub::start(GitHubConfig {
        tokens: Vec::new(),
        app: Some(AppConfig {
            app_id: APP_ID,
            public_key_pem: public_pem,
        }),
    });
    github.create_repo(REPO);
    let number = github.create_issue(REPO, NewIssue::new("Crash"));
    let installation = github.installation_id(REPO);

    let rt = runtime();
    let _enter = rt.enter();
    let app = Octocrab::builder()
        .base_uri(github.url())
        .expect("a base URI")
        .app(
            AppId(APP_ID),
            jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("key"),
        )
        .build()
        .expect("octocrab");
    rt.block_on(async {
        let found = app
            .apps()
            .get_repository_installation("acme", "widgets")
            .await
            .expect("the repository's installation, with the App's JWT");
        assert_eq!(found.id, InstallationId(installation));
        let client = app
            .installation(InstallationId(installation))
            .expect("an installation client");
        let issue = client
            .issues("acme", "widgets")
            .get(number)
            .await
            .expect("the issue, with a minted installation token");
        assert_eq!(issue.title, "Crash");
        let comment = client
            .issues("acme", "widgets")
            .create_comment(number, "On it.")
            .await
            .expect("comment as the App");
        assert_eq!(comment.user.r#type, "Bot");
    });
    let minted = github.minted_tokens();
    assert_eq!(minted.len(), 1, "one token, cached by octocrab");
    let requests = github.requests();
    let token_request = requests
        .iter()
        .find(|r| r.path.ends_with("/access_tokens"))
        .expect("a token request");
    assert_eq!(token_request.status, 201);
    assert!(requests.iter().all(|r| r.status < 400), "{requests:#?}");

    // The minted token works for a raw client; JWTs that GitHub refuses
    // are refused.
    let issue_url = format!("{}/repos/{REPO}/issues/{number}", github.url());
    let with = |auth: &str| http::get(&issue_url, &[("authorization", auth)]).expect("answer");
    assert_eq!(with(&format!("token {}", minted[0])).status, 200);
    let tokens_url = format!(
        "{}/app/installations/{installation}/access_tokens",
        github.url()
    );
    let mint = |jwt: &str| {
        http::send_blocking(
            Method::POST,
            &tokens_url,
            &[("authorization", &format!("Bearer {jwt}"))],
            Vec::new(),
            Duration::from_secs(30),
        )
        .expect("answer")
    };
    let now = unix_now();
    let good = mint(&jwt(
        &private_pem,
        json!({"iat": now - 60, "exp": now + 540, "iss": APP_ID.to_string()}),
    ));
    assert_eq!(good.status, 201, "{}", good.text());
    let expires_at = good.json()["expires_at"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        (0..=5).any(|d| tests::github::rfc3339(now + 3600 + d) == expires_at),
        "expires in an hour: {expires_at}"
    );
    let too_long = mint(&jwt(
        &private_pem,
        json!({"iat": now, "exp": now + 3600, "iss": APP_ID}),
    ));
    assert_eq!(too_long.status, 401);
    assert!(
        too_long.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("too far in the future")
    );
    let expired = mint(&jwt(
        &private_pem,
        json!({"iat": now - 700, "exp": now - 100, "iss": APP_ID}),
    ));
    assert_eq!(expired.status, 401);
    let other_app = mint(&jwt(
        &private_pem,
        json!({"iat": now, "exp": now + 300, "iss": 999}),
    ));
    assert_eq!(other_app.status, 401);
    let (other_key, _) = rsa_key_pair();
    let forged = mint(&jwt(
        &other_key,
        json!({"iat": now, "exp": now + 300, "iss": APP_ID}),
    ));
    assert_eq!(forged.status, 401);
    assert_eq!(
        forged.json()["message"],
        "A JSON web token could not be decoded"
    );
}

#[test]
fn fakes_faults_as_a_client_sees_them() {
    let github = FakeGitHub::start(GitHubConfig::with_token(TOKEN));
    github.create_repo(REPO);
    github.create_issue(REPO, NewIssue::new("One"));
    let auth = format!("token {TOKEN}");
    let get = |path: &str| {
        http::get(
            &format!("{}{path}", github.url()),
            &[("authorization", &auth)],
        )
        .expect("an answer")
    };
    let rate = |a: &Answer, name: &str| -> u64 {
        a.header(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {:?}", a.headers))
    };

    // Every answer carries the rate limit; each request uses one.
    let a = get("/repos/acme/widgets");
    assert_eq!(a.status, 200);
    let b = get("/repos/acme/widgets/issues");
    assert_eq!(rate(&a, "x-ratelimit-limit"), 5000);
    assert_eq!(
        rate(&b, "x-ratelimit-remaining"),
        rate(&a, "x-ratelimit-remaining") - 1
    );
    assert_eq!(rate(&b, "x-ratelimit-used"), 2);
    assert!(rate(&b, "x-ratelimit-reset") > unix_now());
    assert_eq!(b.header("x-ratelimit-resource"), Some("core"));

    // Credentials are checked on every request.
    let anonymous =
        http::get(&format!("{}/repos/acme/widgets", github.url()), &[]).expect("answer");
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.json()["message"], "Bad credentials");
    assert!(anonymous.json()["documentation_url"].is_string());
    let wrong = http::get(
        &format!("{}/repos/acme/widgets", github.url()),
        &[("authorization", "Bearer nope")],
    )
    .expect("answer");
    assert_eq!(wrong.status, 401);

    // 502 for the next two matching requests only; others pass.
    github.inject(
        Fault::bad_gateway()
            .times(2)
            .matching("GET", "/repos/acme/widgets/issues"),
    );
    assert_eq!(get("/repos/acme/widgets").status, 200);
    assert_eq!(get("/repos/acme/widgets/issues").status, 502);
    assert_eq!(get("/repos/acme/widgets/issues/1").status, 502);
    assert_eq!(get("/repos/acme/widgets/issues").status, 200);

    // A secondary rate limit: 403 with Retry-After, requests remain.
    github.inject(Fault::secondary_rate_limit(61));
    let limited = get("/repos/acme/widgets/issues");
    assert_eq!(limited.status, 403);
    assert_eq!(limited.header("retry-after"), Some("61"));
    assert!(rate(&limited, "x-ratelimit-remaining") > 0);
    let message = limited.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with("You have exceeded a secondary rate limit"),
        "{message}"
    );

    // The primary rate limit: 403, none remaining, the reset time.
    github.inject(Fault::primary_rate_limit(120));
    let exhausted = get("/repos/acme/widgets/issues");
    assert_eq!(exhausted.status, 403);
    assert_eq!(rate(&exhausted, "x-ratelimit-remaining"), 0);
    let reset = rate(&exhausted, "x-ratelimit-reset");
    assert!(
        (unix_now() + 100..=unix_now() + 120).contains(&reset),
        "{reset}"
    );
    let message = exhausted.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with("API rate limit exceeded for "),
        "{message}"
    );
    assert_eq!(get("/repos/acme/widgets/issues").status, 200);

    // Everything was recorded, faults included.
    let statuses: Vec<u16> = github.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        vec![200, 200, 401, 401, 200, 502, 502, 200, 403, 403, 200]
    );
}

/// A local webhook receiver: records each POST (headers, body) and
/// answers 202 when its signature verifies with `secret`, else 401.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<(HeaderMap, Bytes, bool)>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    fn start(secret: &'static [u8]) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let got: Arc<Mutex<Vec<(HeaderMap, Bytes, bool)>>> = Arc::default();
        let seen = Arc::clone(&got);
        let app = Router::new().route(
            "/webhook",
            post(move |headers: HeaderMap, body: Bytes| {
                let seen = Arc::clone(&seen);
                async move {
                    let signature = headers
                        .get("x-hub-signature-256")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    let valid = webhooks::verify(secret, &body, signature);
                    seen.lock().expect("lock").push((headers, body, valid));
                    if valid {
                        (StatusCode::ACCEPTED, "accepted")
                    } else {
                        (StatusCode::UNAUTHORIZED, "bad signature")
                    }
                }
            }),
        );
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            got,
            _runtime: runtime,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/webhook", self.addr)
    }

    fn received(&self) -> Vec<(HeaderMap, Bytes, bool)> {
        self.got.lock().expect("lock").clone()
    }
}

#[test]
fn fakes_signed_deliveries_verify_in_both_content_types() {
    const SECRET: &[u8] = b"It's a Secret to Everybody";
    // GitHub's own test vector for X-Hub-Signature-256.
    assert_eq!(
        webhooks::signature(SECRET, b"Hello, World!"),
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );

    // Unedited, the body is byte for byte what JSON.stringify writes for
    // the example (GitHub's key order, compact).
    let example = Delivery::example("issues", Some("labeled"));
    let script = format!(
        "const d=JSON.parse(require('fs').readFileSync({:?},'utf8'));\
         const e=d.find(x=>x.name==='issues').examples.find(x=>x.action==='labeled');\
         process.stdout.write(JSON.stringify(e))",
        webhooks::examples_path()
    );
    let node = Command::new("node")
        .args(["-e", &script])
        .output()
        .expect("node");
    assert!(
        node.status.success(),
        "{}",
        String::from_utf8_lossy(&node.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&example.body()),
        String::from_utf8_lossy(&node.stdout)
    );
    assert_eq!(
        Delivery::new("x", json!({"n": 5.0, "s": "é\u{1}"})).body(),
        r#"{"n":5,"s":"é\u0001"}"#.as_bytes()
    );

    let delivery = example
        .repository(REPO)
        .issue_number(42)
        .labels(&["bug", "ccc"])
        .issue_author("alice", UserKind::User, "CONTRIBUTOR")
        .sender("alice", UserKind::User);
    assert_eq!(delivery.payload["label"]["name"], "ccc");
    let receiver = Receiver::start(SECRET);
    for encoding in [Encoding::Json, Encoding::Form] {
        let signed = delivery.sign(SECRET, encoding);
        assert!(
            signed
                .header("user-agent")
                .is_some_and(|u| u.starts_with("GitHub-Hookshot/"))
        );
        let answer = webhooks::post(&receiver.url(), &signed).expect("posted");
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "{encoding:?}: {}",
            answer.text()
        );
    }
    let got = receiver.received();
    assert_eq!(got.len(), 2);
    for (headers, _, valid) in &got {
        assert!(valid);
        assert_eq!(headers["x-github-event"], "issues");
        assert_eq!(headers["x-github-delivery"], delivery.id.as_str());
    }
    assert_eq!(got[0].0["content-type"], "application/json");
    assert_eq!(
        got[1].0["content-type"],
        "application/x-www-form-urlencoded"
    );
    let payload: Value = serde_json::from_slice(&got[0].1).expect("JSON");
    assert_eq!(payload["repository"]["full_name"], REPO);
    assert_eq!(payload["issue"]["number"], 42);
    assert_eq!(payload["issue"]["author_association"], "CONTRIBUTOR");
    let form: String = form_urlencoded_payload(&got[1].1);
    assert_eq!(
        form.as_bytes(),
        &got[0].1[..],
        "the form carries the same JSON"
    );

    // A body changed in transit no longer verifies.
    let mut tampered = delivery.sign(SECRET, Encoding::Json);
    tampered.body.push(b' ');
    let answer = webhooks::post(&receiver.url(), &tampered).expect("posted");
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
}

fn form_urlencoded_payload(body: &[u8]) -> String {
    let body = String::from_utf8_lossy(body);
    let encoded = body.strip_prefix("payload=").expect("payload=");
    let decoded: Vec<u8> = encoded
        .replace('+', " ")
        .split('%')
        .enumerate()
        .flat_map(|(idx, part)| {
            if idx == 0 {
                part.as_bytes().to_vec()
            } else {
                let mut bytes = vec![u8::from_str_radix(&part[..2], 16).expect("hex")];
                bytes.extend_from_slice(&part.as_bytes()[2..]);
                bytes
            }
        })
        .collect();
    String::from_utf8(decoded).expect("UTF-8")
}

#[test]
fn fakes_delivery_through_the_real_smee_client_still_verifies() {
    const SECRET: &[u8] = b"relay secret";
    let dir = TestDir::new("fakes-smee");
    let receiver = Receiver::start(SECRET);
    let channel = SmeeChannel::start();
    let _client = SmeeClient::start(dir.path(), &channel, &receiver.url());
    let deliveries = [
        Delivery::example("issues", Some("labeled"))
            .repository(REPO)
            .labels(&["ccc"]),
        Delivery::example("issue_comment", Some("created"))
            .repository(REPO)
            .comment(
                "@ccc please retry — ünïcode \"quoted\"\n",
                "bob",
                UserKind::User,
                "MEMBER",
            ),
        Delivery::example("ping", None),
    ];
    for delivery in &deliveries {
        assert_eq!(channel.push(&delivery.sign(SECRET, Encoding::Json)), 1);
    }
    let got = eventually(Duration::from_secs(60), || {
        let got = receiver.received();
        (got.len() == deliveries.len())
            .then_some(got)
            .ok_or_else(|| {
                format!(
                    "{} of {} relayed",
                    receiver.received().len(),
                    deliveries.len()
                )
            })
    })
    .unwrap_or_else(|e| panic!("{e}\n--- smee log ---\n{}", _client.log_text()));
    for (delivery, (headers, body, valid)) in deliveries.iter().zip(&got) {
        assert!(valid, "the signature verifies after the relay");
        assert_eq!(&body[..], &delivery.body()[..]);
        assert_eq!(headers["x-github-event"], delivery.event.as_str());
        assert_eq!(headers["x-github-delivery"], delivery.id.as_str());
        assert_eq!(headers["content-type"], "application/json");
        assert!(!headers.contains_key("host") || headers["host"] != "smee.io");
    }
}

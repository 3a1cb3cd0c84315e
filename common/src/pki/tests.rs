use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::tls::PeerIdentity;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ccc-pki-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

#[test]
fn issues_files_with_roles_and_private_keys() {
    let dir = temp_dir("files");
    let pki = PkiDir::new(&dir);
    let validity = Validity::days_from_now(30);
    pki.init(validity, false).expect("init");
    pki.issue_server(&["127.0.0.1".into(), "localhost".into()], validity, false)
        .expect("server");
    let files = pki
        .issue_client(Role::Agent, "pc-01", validity, false)
        .expect("agent");
    assert_eq!(files[0], dir.join("agent-pc-01.pem"));
    pki.issue_client(Role::Admin, "alice", validity, false)
        .expect("admin");

    for key in [
        "ca-key.pem",
        "coordinator-key.pem",
        "agent-pc-01-key.pem",
        "admin-alice-key.pem",
    ] {
        let mode = fs::metadata(dir.join(key))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }

    let agent_pem = fs::read(dir.join("agent-pc-01.pem")).expect("read");
    let identity = PeerIdentity::from_pem(&agent_pem).expect("identity");
    assert_eq!(
        (identity.role, identity.name.as_str()),
        (Role::Agent, "pc-01")
    );
    let admin_pem = fs::read(dir.join("admin-alice.pem")).expect("read");
    let identity = PeerIdentity::from_pem(&admin_pem).expect("identity");
    assert_eq!(
        (identity.role, identity.name.as_str()),
        (Role::Admin, "alice")
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn existing_files_need_force() {
    let dir = temp_dir("force");
    let pki = PkiDir::new(&dir);
    let validity = Validity::days_from_now(1);
    pki.init(validity, false).expect("init");
    let err = pki.init(validity, false).expect_err("second init");
    assert!(
        err.to_string().contains("already exists (use --force"),
        "{err}"
    );
    let before = fs::read_to_string(dir.join("ca.pem")).expect("read");
    pki.init(validity, true).expect("forced");
    assert_ne!(
        before,
        fs::read_to_string(dir.join("ca.pem")).expect("read")
    );

    pki.issue_client(Role::Agent, "a", validity, false)
        .expect("agent");
    let err = pki
        .issue_client(Role::Agent, "a", validity, false)
        .expect_err("again");
    assert!(matches!(err, Error::Exists(_)), "{err}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn clear_errors_without_a_ca_or_with_a_bad_name() {
    let dir = temp_dir("noca");
    let pki = PkiDir::new(&dir);
    let err = pki
        .issue_client(Role::Agent, "a", Validity::days_from_now(1), false)
        .expect_err("no ca");
    assert!(err.to_string().contains("ccc certs init"), "{err}");
    let err = pki
        .issue_client(Role::Agent, "../evil", Validity::days_from_now(1), false)
        .expect_err("bad name");
    assert!(matches!(err, Error::InvalidName(_)), "{err}");
}

#[test]
fn a_client_can_tell_why_its_certificate_would_be_refused() {
    use crate::tls::TlsMaterial;
    let validity = Validity::days_from_now(1);
    let ours = CertificateAuthority::generate(validity).expect("ca");
    let theirs = CertificateAuthority::generate(validity).expect("ca");
    let material = |ca: &CertificateAuthority, pair: &PemPair| TlsMaterial {
        ca_pem: ca.cert_pem().as_bytes().to_vec(),
        cert_pem: pair.cert_pem.as_bytes().to_vec(),
        key_pem: pair.key_pem.as_bytes().to_vec(),
    };
    let now = time::OffsetDateTime::now_utc();
    let good = ours
        .issue_client(Role::Admin, "a", validity)
        .expect("issue");
    assert_eq!(material(&ours, &good).diagnose(now.unix_timestamp()), None);

    let foreign = theirs
        .issue_client(Role::Admin, "a", validity)
        .expect("issue");
    let why = material(&ours, &foreign).diagnose(now.unix_timestamp());
    assert!(why.is_some_and(|w| w.contains("another CA")));

    let old = ours
        .issue_client(
            Role::Admin,
            "a",
            Validity {
                not_before: now - Duration::from_secs(7200),
                not_after: now - Duration::from_secs(3600),
            },
        )
        .expect("issue");
    let why = material(&ours, &old).diagnose(now.unix_timestamp());
    assert!(why.is_some_and(|w| w.contains("expired")));
}

//! Security: TLS verification, the SSRF guard, no proxies, hostile receivers,
//! signatures checked by the official Standard Webhooks library.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use postbox::delivery::NetworkPolicy;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use uuid::Uuid;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "postbox test CA");
        Ca {
            cert: params.self_signed(&key).unwrap(),
            key,
        }
    }

    /// A leaf certificate for `host`, optionally already expired.
    fn leaf(&self, host: &str, expired: bool) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![host.to_owned()]).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }
}

/// An HTTPS receiver on 127.0.0.1 answering 200; counts the requests that got through TLS.
async fn https_receiver(cert_der: Vec<u8>, key_der: Vec<u8>) -> (u16, Arc<AtomicUsize>) {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |_req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new()))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, hits)
}

/// A certificate from a trusted extra CA is accepted; untrusted, wrong-host and expired ones fail as `tls` and nothing is delivered.
#[tokio::test]
async fn tls_certificates_are_verified() {
    let db = TestDb::new().await;
    let ca = Ca::new();
    let cases = [
        ("trusted", ca.leaf("localhost", false), None),
        ("wrong host", ca.leaf("other.example", false), Some("tls")),
        ("expired", ca.leaf("localhost", true), Some("tls")),
    ];
    let mut expectations = Vec::new();
    for (name, (cert, key), want) in cases {
        let (port, hits) = https_receiver(cert, key).await;
        let id = enqueue_bulk(&db.pool, &format!("https://localhost:{port}/hook"), 1, None).await[0];
        expectations.push((name, id, hits, want));
    }
    // Self-signed: a leaf that is its own issuer, from no trusted CA.
    let own = Ca::new();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (port, hits) = https_receiver(cert.der().to_vec(), key.serialize_der()).await;
    let id = enqueue_bulk(&db.pool, &format!("https://localhost:{port}/hook"), 1, None).await[0];
    expectations.push(("self-signed", id, hits, Some("tls")));
    // Signed by a CA that is not trusted.
    let (cert, key) = own.leaf("localhost", false);
    let (port, hits) = https_receiver(cert, key).await;
    let id = enqueue_bulk(&db.pool, &format!("https://localhost:{port}/hook"), 1, None).await[0];
    expectations.push(("unknown CA", id, hits, Some("tls")));

    let mut cfg = config();
    cfg.client.allow_http = false;
    cfg.client.extra_roots_pem = Some(ca.cert.pem().into_bytes());
    cfg.retry.schedule = vec![Duration::from_secs(60)];
    drain(&db.pool, cfg).await;
    for (name, id, hits, want) in expectations {
        let log = attempts_of(&db.pool, id).await;
        assert_eq!(log[0].2.as_deref(), want, "{name}: {log:?}");
        let expected_hits = usize::from(want.is_none());
        assert_eq!(hits.load(Ordering::SeqCst), expected_hits, "{name}");
    }
}

/// Every spelling of a loopback destination is refused, and a sentinel listener there sees no connection at all.
#[tokio::test]
async fn ssrf_guard_refuses_every_spelling_of_loopback() {
    let db = TestDb::new().await;
    let sentinel = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = sentinel.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let c = connections.clone();
    tokio::spawn(async move {
        loop {
            let _ = sentinel.accept().await;
            c.fetch_add(1, Ordering::SeqCst);
        }
    });
    // (URL, refused at enqueue): numeric spellings other than dotted IPv4
    // are refused by postbox.check_callback_url; the guard must still block
    // them when written into postbox.endpoints by hand.
    let urls = [
        (format!("http://127.0.0.1:{port}/"), false),
        (format!("http://localhost:{port}/"), false),
        (format!("http://2130706433:{port}/"), true),
        (format!("http://0x7f000001:{port}/"), true),
        (format!("http://0177.0.0.1:{port}/"), true),
        (format!("http://127.1:{port}/"), true),
        (format!("http://[::ffff:127.0.0.1]:{port}/"), false),
        (format!("http://[::1]:{port}/"), false),
    ];
    let mut ids = Vec::new();
    for (i, (u, refused)) in urls.iter().enumerate() {
        if !refused {
            ids.push(enqueue_bulk(&db.pool, u, 1, None).await[0]);
            continue;
        }
        let mut tx = db.pool.begin().await.unwrap();
        let err = postbox::enqueue(&mut tx, u, &event("x")).await.unwrap_err();
        assert!(err.to_string().contains("invalid callback_url"), "{u}: {err}");
        drop(tx);
        let placeholder = format!("https://placeholder-{i}.example/");
        ids.push(enqueue_bulk(&db.pool, &placeholder, 1, None).await[0]);
        sqlx::query("UPDATE postbox.endpoints SET url = $1 WHERE url = $2")
            .bind(u)
            .bind(&placeholder)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let mut cfg = config();
    cfg.client.network = NetworkPolicy::default();
    let stats = drain(&db.pool, cfg).await;
    assert_eq!(stats.failed, urls.len() as u64, "blocked destinations fail at once");
    for ((u, _), id) in urls.iter().zip(ids) {
        let log = attempts_of(&db.pool, id).await;
        assert_eq!(log.len(), 1, "{u}");
        assert_eq!(log[0].2.as_deref(), Some("blocked"), "{u}: {log:?}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "nothing connected to the blocked address"
    );
    // An explicit allow-list opens exactly that network.
    let receiver = Receiver::ok().await;
    let id = enqueue_bulk(&db.pool, &receiver.url, 1, None).await[0];
    let mut cfg = config();
    cfg.client.network = NetworkPolicy {
        allow_private: false,
        allow: vec!["127.0.0.0/8".parse().unwrap()],
    };
    drain(&db.pool, cfg).await;
    assert_eq!(row(&db.pool, id).await.0, "delivered");
}

/// Environment proxies are ignored: the webhook goes straight to the receiver.
#[tokio::test]
async fn environment_proxies_are_ignored() {
    let db = TestDb::new().await;
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let _ = proxy.accept().await;
            s.fetch_add(1, Ordering::SeqCst);
        }
    });
    let receiver = Receiver::ok().await;
    enqueue_bulk(&db.pool, &receiver.url, 1, None).await;
    let mut c = worker_cmd(&db.url);
    c.arg("--until-empty");
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        c.env(var, &proxy_url);
    }
    assert!(run_async(c).await.status.success());
    assert_eq!(receiver.count(), 1);
    assert_eq!(seen.load(Ordering::SeqCst), 0, "the proxy saw nothing");
}

/// A raw TCP receiver that writes `head` then `body_chunks`, one per `pace`.
async fn raw_receiver(head: Vec<u8>, body: Vec<u8>, pace: Option<Duration>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let (head, body) = (head.clone(), body.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp.write_all(&head).await;
                match pace {
                    None => {
                        let _ = tcp.write_all(&body).await;
                    }
                    Some(p) => {
                        for b in body {
                            if tcp.write_all(&[b]).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(p).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    format!("http://{addr}/hook")
}

/// Hostile receivers: a slow drip, huge headers, a compressed bomb and silence are each cut off and recorded.
#[tokio::test]
async fn hostile_receivers_are_cut_off() {
    let db = TestDb::new().await;
    let drip = raw_receiver(
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 1000\r\n\r\n".to_vec(),
        vec![b'x'; 1000],
        Some(Duration::from_millis(500)),
    )
    .await;
    // The same drip after a 2xx: cut off at the deadline too, and the status
    // alone decides (SPEC §6), so the event is delivered.
    let drip_ok = raw_receiver(
        b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_vec(),
        vec![b'x'; 1000],
        Some(Duration::from_millis(500)),
    )
    .await;
    let mut big = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 2 << 20));
    big.extend(b"\r\ncontent-length: 0\r\n\r\n");
    let huge_headers = raw_receiver(big, vec![], None).await;
    // Gzip-encoded per its headers; postbox never decompresses, so it reads the raw bytes only.
    let mut bomb = vec![0x1f, 0x8b, 0x08, 0x00];
    bomb.extend(std::iter::repeat_n(0u8, 30_000));
    let bomb_head = format!(
        "HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\n\r\n",
        bomb.len()
    )
    .into_bytes();
    let gzip = raw_receiver(bomb_head, bomb, None).await;
    let silent = raw_receiver(vec![], vec![], None).await;
    let ids: Vec<Uuid> = {
        let mut v = Vec::new();
        for u in [&drip, &huge_headers, &gzip, &silent, &drip_ok] {
            v.push(enqueue_bulk(&db.pool, u, 1, None).await[0]);
        }
        v
    };
    let mut cfg = config();
    cfg.client.request_timeout = Duration::from_secs(2);
    cfg.lease = Duration::from_secs(7);
    cfg.retry.schedule = vec![Duration::from_secs(60)];
    let started = std::time::Instant::now();
    drain(&db.pool, cfg).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "every attempt ended by its deadline"
    );
    let kinds: Vec<Option<String>> = {
        let mut v = Vec::new();
        for id in &ids {
            v.push(attempts_of(&db.pool, *id).await[0].2.clone());
        }
        v
    };
    assert_eq!(kinds[0].as_deref(), Some("timeout"), "slow drip");
    assert!(
        matches!(kinds[1].as_deref(), Some("other") | Some("connect")),
        "huge headers: {:?}",
        kinds[1]
    );
    assert_eq!(kinds[2], None, "the compressed body is not inflated: {:?}", kinds[2]);
    assert_eq!(kinds[3].as_deref(), Some("timeout"), "never answers");
    assert_eq!(kinds[4], None, "a 2xx whose body drips is delivered");
    let status: String = sqlx::query_scalar("SELECT status FROM postbox.outbox WHERE id = $1")
        .bind(ids[4])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(status, "delivered");
    let stored: Option<i32> =
        sqlx::query_scalar("SELECT length(response_body) FROM postbox.attempts WHERE outbox_id = $1")
            .bind(ids[2])
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(stored.unwrap_or(0) <= 4096);
}

/// Signatures verify with the official `standardwebhooks` Python library (pip install standardwebhooks).
#[tokio::test]
async fn signatures_verify_with_the_official_library() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    enqueue_bulk(&db.pool, &receiver.url, 1, None).await;
    let rotated = "whsec_bmV3LXNlY3JldC1rZXktMTIzNDU2Nzg5MA==";
    let second = enqueue_bulk(&db.pool, &format!("{}?rotated", receiver.url), 1, None).await[0];
    sqlx::query("UPDATE postbox.endpoints SET secret = $1 WHERE url LIKE '%?rotated'")
        .bind(format!("whsec_b2xkLXNlY3JldC1rZXktMTIzNDU2Nzg5MA== {rotated}"))
        .execute(&db.pool)
        .await
        .unwrap();
    drain(&db.pool, config()).await;
    let pythonpath = standardwebhooks_path();
    for hit in receiver.hits() {
        let secret = if hit.id() == second { rotated } else { SECRET };
        let headers = serde_json::json!({
            "webhook-id": hit.header("webhook-id"),
            "webhook-timestamp": hit.header("webhook-timestamp"),
            "webhook-signature": hit.header("webhook-signature"),
        });
        let (ok, stderr) = official_verify(&pythonpath, secret, &headers, &hit.body);
        assert!(ok, "the official verifier rejected it: {stderr}");
        // Tampering is detected by the same verifier.
        let mut tampered = hit.body.to_vec();
        tampered[10] ^= 1;
        assert!(!official_verify(&pythonpath, secret, &headers, &tampered).0);
    }
    assert_eq!(receiver.count(), 2);
}

/// A PYTHONPATH under which `import standardwebhooks` works: the system's if
/// it has the package, else a copy installed from PyPI into the target dir.
fn standardwebhooks_path() -> String {
    let has = |path: &str| {
        std::process::Command::new("python3")
            .args(["-c", "import standardwebhooks"])
            .env("PYTHONPATH", path)
            .status()
            .is_ok_and(|s| s.success())
    };
    if has("") {
        return String::new();
    }
    let dir = concat!(env!("CARGO_TARGET_TMPDIR"), "/pydeps");
    if !has(dir) {
        let ok = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--target", dir, "standardwebhooks"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "could not install the standardwebhooks verifier from PyPI");
    }
    dir.to_owned()
}

/// Runs the official Python verifier on one webhook: (verified, its stderr).
fn official_verify(pythonpath: &str, secret: &str, headers: &serde_json::Value, body: &[u8]) -> (bool, String) {
    use std::io::Write;
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
secret, headers, body = sys.argv[1], json.loads(sys.argv[2]), sys.stdin.buffer.read()
Webhook(secret).verify(body, headers)
print("verified")
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, secret, &headers.to_string()])
        .env("PYTHONPATH", pythonpath)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with standardwebhooks (pip install standardwebhooks)");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).contains("verified"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

//! One callback-URL rule: `postbox.check_callback_url` decides for every
//! entry point (the SQL function `postbox.enqueue`, the Rust API, the CLI),
//! and every URL it accepts reaches the worker's HTTP client as the same
//! host it checked.

mod common;

use common::*;
use postbox::EnqueueError;
use sqlx::PgPool;

/// Each URL, and the host the HTTP client must see when it is accepted
/// (`None` = refused; the expected text is part of the error).
const TABLE: &[(&str, Result<&str, &str>)] = &[
    ("https://example.com/hook", Ok("example.com")),
    ("https://Example.COM:8443/hook?a=1#frag", Ok("example.com")),
    ("https://api.example.com./hook", Ok("api.example.com.")),
    (
        "https://my_service.internal.example.com/hook",
        Ok("my_service.internal.example.com"),
    ),
    ("https://-edge-.example.com/", Ok("-edge-.example.com")),
    ("https://xn--bcher-kva.example/hook", Ok("xn--bcher-kva.example")),
    ("https://203.0.113.7/hook", Ok("203.0.113.7")),
    ("https://203.0.113.7./hook", Ok("203.0.113.7")),
    ("https://[2001:db8::1]:443/hook", Ok("[2001:db8::1]")),
    ("https://[::ffff:203.0.113.7]/hook", Ok("[::ffff:203.0.113.7]")),
    ("https://example.com:1/", Ok("example.com")),
    ("https://example.com:65535/", Ok("example.com")),
    ("http://example.com/hook", Ok("example.com")),
    ("", Err("is required")),
    ("example.com/hook", Err("absolute https://")),
    ("ftp://example.com/", Err("absolute https://")),
    ("https://", Err("has no host")),
    ("https:///hook", Err("has no host")),
    ("https://user:pw@example.com/", Err("credentials")),
    ("https://@example.com/", Err("credentials")),
    ("https://example.com/a b", Err("white space")),
    ("https://example.com/\u{7}", Err("control")),
    ("https://example.com\\@evil.com/", Err("backslash")),
    ("https://example.com\\hook", Err("backslash")),
    ("https://bücher.example/hook", Err("xn--")),
    ("https://ex%61mple.com/", Err("percent-encoded")),
    ("https://%31%32%37.0.0.1/", Err("percent-encoded")),
    ("https://example~1.com/", Err("percent-encoded")),
    ("https://0x7f.1/", Err("numeric host")),
    ("https://2130706433/", Err("numeric host")),
    ("https://127.1/", Err("numeric host")),
    ("https://0177.0.0.1/", Err("numeric host")),
    ("https://256.1.1.1/", Err("numeric host")),
    ("https://01.2.3.4/", Err("numeric host")),
    ("https://example.0x10/", Err("numeric host")),
    ("https://a..b.com/", Err("malformed host name")),
    ("https://.example.com/", Err("malformed host name")),
    ("https://exa*mple.com/", Err("malformed host name")),
    ("https://exa!mple.com/", Err("malformed host name")),
    ("https://[fe80::1%25eth0]/", Err("IPv6")),
    ("https://[2001:db8::zz]/", Err("IPv6")),
    ("https://[1.2.3.4]/", Err("IPv6")),
    ("https://[::1/", Err("malformed host or port")),
    ("https://example.com:0/", Err("port outside")),
    ("https://example.com:65536/", Err("port outside")),
    ("https://example.com:99999999/", Err("port outside")),
    ("https://example.com:/", Err("port outside")),
    ("https://example.com:80:80/", Err("malformed host or port")),
    ("https://example.com:8a/", Err("port outside")),
];

/// The SQL function's verdict (with postbox.allow_http on, as in TestDb).
async fn sql_verdict(pool: &PgPool, url: &str) -> Result<(), String> {
    sqlx::query("SELECT postbox.check_callback_url($1)")
        .bind(url)
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The Rust API's verdict, through a rolled-back transaction.
async fn rust_verdict(pool: &PgPool, url: &str) -> Result<(), String> {
    let mut tx = pool.begin().await.unwrap();
    let r = postbox::enqueue(&mut tx, url, &event("url rule")).await;
    tx.rollback().await.unwrap();
    match r {
        Ok(_) => Ok(()),
        Err(EnqueueError::Invalid { field, problem }) => {
            assert_eq!(field, "callback_url", "{url}: the error names the field");
            Err(problem)
        }
        Err(e) => panic!("{url}: not a validation error: {e}"),
    }
}

/// The host reqwest sends to, in URL form (IPv6 in brackets).
fn client_host(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    Some(match u.host()? {
        url::Host::Domain(d) => d.to_string(),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => format!("[{ip}]"),
    })
}

#[tokio::test]
async fn one_rule_for_sql_rust_and_the_client() {
    let db = TestDb::new().await;
    for (url, want) in TABLE {
        let sql = sql_verdict(&db.pool, url).await;
        let rust = rust_verdict(&db.pool, url).await;
        match want {
            Ok(host) => {
                assert!(sql.is_ok(), "{url:?}: SQL refused: {sql:?}");
                assert!(rust.is_ok(), "{url:?}: Rust API refused: {rust:?}");
                assert_eq!(client_host(url).as_deref(), Some(*host), "{url:?}: the client's host");
            }
            Err(text) => {
                let sql = sql.expect_err(&format!("{url:?}: SQL accepted it"));
                let rust = rust.expect_err(&format!("{url:?}: Rust API accepted it"));
                assert!(sql.contains(text), "{url:?}: SQL said {sql:?}, expected {text:?}");
                assert!(rust.contains(text), "{url:?}: Rust said {rust:?}, expected {text:?}");
            }
        }
    }
}

/// Plain http:// follows postbox.allow_http, in SQL and so in Rust.
#[tokio::test]
async fn plain_http_needs_the_setting() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("SET postbox.allow_http = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let err = postbox::enqueue(&mut conn, "http://example.com/hook", &event("x"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("postbox.allow_http"), "{err}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.outbox")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing written");
}

/// Many generated URL-like strings: whatever SQL accepts, the HTTP client
/// parses, to the host SQL saw (case aside), with no credentials and an
/// http(s) scheme.
#[tokio::test]
async fn every_accepted_url_parses_to_the_same_host() {
    let db = TestDb::new().await;
    let pieces_host = [
        "example.com",
        "EXAMPLE.com",
        "a_b.example",
        "xn--bcher-kva.example",
        "1.2.3.4",
        "0x7f.1",
        "127.1",
        "1.2.3",
        "[::1]",
        "[::ffff:1.2.3.4]",
        "a..b",
        "%41.com",
        "ex~ample.com",
        "a.b.",
        "255.255.255.255",
        "999.1.1.1",
        "0.0.0.0",
        "a-.b",
        "_",
        "a.0x",
        "a.08",
        "[fe80::1%eth0]",
        "example.com\\",
        "u@h",
        "",
    ];
    let pieces_port = ["", ":443", ":0", ":65536", ":", ":08080", ":x"];
    let pieces_rest = ["", "/", "/hook?x=1", "#f", "/%zz", "/a/../b", "?@evil.com", "/\\evil"];
    let mut urls = Vec::new();
    for scheme in ["https://", "http://", "HTTPS://", "ftp://"] {
        for h in pieces_host {
            for p in pieces_port {
                for r in pieces_rest {
                    urls.push(format!("{scheme}{h}{p}{r}"));
                }
            }
        }
    }
    let mut n_ok = 0;
    for url in &urls {
        if sql_verdict(&db.pool, url).await.is_err() {
            continue;
        }
        n_ok += 1;
        let parsed = reqwest::Url::parse(url).unwrap_or_else(|e| panic!("{url:?}: accepted by SQL, client says {e}"));
        assert!(matches!(parsed.scheme(), "http" | "https"), "{url:?}");
        assert!(parsed.username().is_empty() && parsed.password().is_none(), "{url:?}");
        let authority = url.split_once("://").unwrap().1.split(['/', '?', '#']).next().unwrap();
        let sql_host = match authority.strip_prefix('[') {
            Some(v6) => v6
                .split(']')
                .next()
                .unwrap()
                .parse::<std::net::Ipv6Addr>()
                .map(|ip| format!("[{ip}]"))
                .unwrap(),
            None => {
                let h = authority.split(':').next().unwrap().to_ascii_lowercase();
                match h.trim_end_matches('.').parse::<std::net::Ipv4Addr>() {
                    Ok(ip) => ip.to_string(),
                    Err(_) => h,
                }
            }
        };
        assert_eq!(client_host(url), Some(sql_host), "{url:?}: the client sends elsewhere");
    }
    assert!(n_ok > 50, "the generator makes acceptable URLs too ({n_ok})");
}

/// A URL edited into postbox.endpoints by hand that the client cannot
/// parse fails at once as `blocked`: retrying cannot fix it.
#[tokio::test]
async fn an_unparsable_url_fails_without_retries() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    let id = enqueue_many(&db.pool, &receiver.url, 1).await[0];
    sqlx::query("UPDATE postbox.endpoints SET url = 'https://exa mple.com/hook'")
        .execute(&db.pool)
        .await
        .unwrap();
    drain(&db.pool, config()).await;
    assert_eq!(row(&db.pool, id).await, ("failed".to_string(), 1));
    let kind: Option<String> = sqlx::query_scalar("SELECT error_kind FROM postbox.attempts WHERE outbox_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(kind.as_deref(), Some("blocked"));
    assert_eq!(receiver.count(), 0);
}

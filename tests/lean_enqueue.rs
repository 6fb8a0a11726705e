//! The quick tests in front of enqueue's checks (migration 0007):
//! `postbox.message_is_plain` and `postbox.url_is_plain` may only accept
//! what the full checks (`check_message_in_full`, `check_callback_url_in_full`)
//! accept and return unchanged, and they must accept the usual shapes, or
//! enqueue would be slow for nothing.

mod common;

use common::*;
use serde_json::{json, Value};
use sqlx::PgPool;

fn message(overrides: Value) -> Value {
    let mut m = json!({
        "id": "0193f1b2-7c4e-7d2a-9b1e-3f5a6c7d8e9f",
        "content": "Hello",
        "content_type": "TEXT",
        "type": "USER_INPUT",
        "channel": "API",
        "status": "RECEIVED",
        "created_by": "user123",
        "updated_by": "user123",
        "created_at": "2024-03-21T10:00:00Z",
        "updated_at": "2024-03-21T10:00:00Z"
    });
    for (k, v) in overrides.as_object().expect("an object of overrides") {
        if v == &json!("<absent>") {
            m.as_object_mut().unwrap().remove(k);
        } else {
            m[k] = v.clone();
        }
    }
    m
}

/// `SELECT postbox.<function>($1)`: its value, or the error it raised.
async fn call<A, T>(pool: &PgPool, function: &str, arg: A) -> Result<T, String>
where
    A: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let sql = format!("SELECT postbox.{function}($1)");
    sqlx::query_scalar(&sql)
        .bind(arg)
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())
}

async fn message_is_plain(pool: &PgPool, m: &Value) -> bool {
    call(pool, "message_is_plain", m).await.unwrap()
}

/// Asserts the rule for one message and returns whether it was plain.
async fn same_verdict(pool: &PgPool, m: &Value) -> bool {
    let plain = message_is_plain(pool, m).await;
    // The full check's verdict: the message it returns, or its error.
    let full: Result<Value, String> = call(pool, "check_message_in_full", m).await;
    if plain {
        assert_eq!(
            full.as_ref(),
            Ok(m),
            "quick test accepted {m}, the full check did not return it unchanged"
        );
    }
    // What enqueue calls: the quick test, then the full check.
    assert_eq!(
        call(pool, "check_message", m).await,
        full,
        "check_message differs from the full check for {m}"
    );
    plain
}

#[tokio::test]
async fn the_quick_message_test_accepts_only_what_the_full_check_returns_unchanged() {
    let db = TestDb::new().await;
    let plain = [
        json!({}),
        json!({"filename": "a.pdf", "metadata": {"k": [1, 2]}}),
        json!({"content": ""}),
        json!({"created_at": "2024-02-29T23:59:59.123456789+14:59", "updated_at": "2000-02-29t00:00:00z"}),
        json!({"created_at": "1999-12-31T23:59:59-08:00", "updated_at": "0001-01-01T00:00:00Z"}),
        json!({"content_type": "AUDIO", "type": "BOT", "channel": "SMS", "status": "FAILED"}),
    ];
    for o in plain {
        let m = message(o);
        assert!(same_verdict(&db.pool, &m).await, "{m} should take the quick path");
    }
    // Valid, but the full check changes them (so they may not be plain), or
    // invalid (the full check names the field).
    let not_plain = [
        json!({"id": "0193F1B2-7C4E-7D2A-9B1E-3F5A6C7D8E9F"}),
        json!({"id": "0193f1b27c4e7d2a9b1e3f5a6c7d8e9f"}),
        json!({"id": "not-a-uuid"}),
        json!({"id": 5}),
        json!({"id": "<absent>"}),
        json!({"created_at": "2024-03-21T10:00:00"}),
        json!({"created_at": "2024-03-21 10:00:00Z"}),
        json!({"created_at": "2100-02-29T00:00:00Z"}),
        json!({"created_at": "2023-02-29T00:00:00Z"}),
        json!({"created_at": "2024-02-30T00:00:00Z"}),
        json!({"created_at": "2024-04-31T00:00:00Z"}),
        json!({"created_at": "2024-13-01T00:00:00Z"}),
        json!({"created_at": "0000-01-01T00:00:00Z"}),
        json!({"created_at": "2024-01-01T24:00:00Z"}),
        json!({"created_at": "2024-01-01T23:60:00Z"}),
        json!({"created_at": "2024-01-01T23:59:60Z"}),
        json!({"created_at": "2024-01-01T00:00:00+15:00"}),
        json!({"created_at": "2024-01-01T00:00:00+16:00"}),
        json!({"created_at": "2024-01-01T00:00:00.1234567890Z"}),
        json!({"updated_at": 1_700_000_000}),
        json!({"updated_at": null}),
        json!({"filename": null}),
        json!({"filename": 7}),
        json!({"metadata": null}),
        json!({"metadata": [1]}),
        json!({"content": null}),
        json!({"content": 1}),
        json!({"created_by": ""}),
        json!({"updated_by": "<absent>"}),
        json!({"content_type": "text"}),
        json!({"type": null}),
        json!({"channel": "EMAIL"}),
        json!({"status": ["RECEIVED"]}),
        json!({"colour": "blue"}),
    ];
    for o in not_plain {
        let m = message(o);
        assert!(!same_verdict(&db.pool, &m).await, "{m} should take the full check");
    }
    for m in [json!([1]), json!("text"), json!(5), json!(null)] {
        assert!(!same_verdict(&db.pool, &m).await, "{m} should take the full check");
    }
}

/// Every calendar day 28-31 of every month, in leap and common years and
/// century years: the quick test accepts exactly the days that exist.
#[tokio::test]
async fn the_quick_message_test_knows_the_calendar() {
    let db = TestDb::new().await;
    for year in [1900, 2000, 2023, 2024, 2100] {
        for month in 1..=12 {
            for day in 28..=31 {
                let at = format!("{year:04}-{month:02}-{day:02}T12:00:00Z");
                let m = message(json!({ "created_at": at }));
                let exists = chrono::NaiveDate::from_ymd_opt(year, month, day).is_some();
                assert_eq!(same_verdict(&db.pool, &m).await, exists, "{at}");
            }
        }
    }
}

async fn url_is_plain(pool: &PgPool, url: &str) -> bool {
    call(pool, "url_is_plain", url).await.unwrap()
}

#[tokio::test]
async fn the_quick_url_test_accepts_only_what_the_full_check_accepts() {
    let db = TestDb::new().await;
    let plain = [
        "https://example.com/hook",
        "http://127.0.0.1:18399/hook",
        "https://Example.COM:8443/hook?a=1#frag",
        "https://example.com",
        "https://example.com?x=1",
        "https://example.com#top",
        "https://my_service.internal.example.com/hook",
        "https://-edge-.example.com/",
        "https://xn--bcher-kva.example/hook",
        "https://1.2.3.example/hook",
        "https://203.0.113.7/hook",
        "https://0.0.0.0/",
        "https://255.255.255.255:1/",
        "https://example.com:65535/",
        "https://example.com:080/",
        "https://example.com/a%20b/@x:y",
    ];
    let not_plain = [
        "https://api.example.com./hook",
        "https://203.0.113.7./hook",
        "https://[2001:db8::1]:443/hook",
        "",
        "example.com/hook",
        "ftp://example.com/",
        "https://",
        "https:///hook",
        "https://user:pw@example.com/",
        "https://example.com/a b",
        "https://example.com/\u{7}",
        "https://example.com\\hook",
        "https://bücher.example/hook",
        "https://ex%61mple.com/",
        "https://example~1.com/",
        "https://0x7f.1/",
        "https://2130706433/",
        "https://127.1/",
        "https://0177.0.0.1/",
        "https://256.1.1.1/",
        "https://1.2.3.256/",
        "https://1.2.3.299/",
        "https://01.2.3.4/",
        "https://example.0x10/",
        "https://example.1a/",
        "https://a..b.com/",
        "https://.example.com/",
        "https://exa*mple.com/",
        "https://example.com:0/",
        "https://example.com:65536/",
        "https://example.com:99999/",
        "https://example.com:/",
        "https://example.com:80:80/",
    ];
    let long_label = format!("https://{}.example.com/", "a".repeat(64));
    let longest_label = format!("https://{}.example.com/", "a".repeat(63));
    let long_host = format!("https://{}example.com/", "abcdefghi.".repeat(25));
    let long_url = format!("https://example.com/{}", "p".repeat(2048));
    for url in plain.iter().copied().chain([longest_label.as_str()]) {
        assert!(url_is_plain(&db.pool, url).await, "{url:?} should take the quick path");
        assert_eq!(
            call::<_, String>(&db.pool, "check_callback_url_in_full", url)
                .await
                .as_deref(),
            Ok(url),
            "{url:?}"
        );
    }
    for url in not_plain
        .iter()
        .copied()
        .chain([long_label.as_str(), long_host.as_str(), long_url.as_str()])
    {
        assert!(!url_is_plain(&db.pool, url).await, "{url:?} should take the full check");
    }
    // Plain http:// follows the setting, as in the full check.
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("SET postbox.allow_http = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let plain: bool = sqlx::query_scalar("SELECT postbox.url_is_plain('http://example.com/hook')")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(!plain, "http:// without postbox.allow_http must take the full check");
    let https: bool = sqlx::query_scalar("SELECT postbox.url_is_plain('https://example.com/hook')")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(https);
}

/// What the Rust API sends is plain, so its enqueues take the quick path.
#[tokio::test]
async fn the_rust_api_sends_plain_messages() {
    let db = TestDb::new().await;
    for ev in [event("plain"), event("")] {
        let sent = serde_json::to_value(&ev.message).unwrap();
        assert!(message_is_plain(&db.pool, &sent).await, "{sent}");
    }
    assert!(url_is_plain(&db.pool, "https://example.com/hook").await);
}

//! Enqueueing: transactional visibility and validation that names the field.

mod common;

use common::*;
use postbox::EnqueueError;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

fn valid_data() -> serde_json::Value {
    json!({
        "id": Uuid::now_v7(),
        "content": "Message content",
        "content_type": "TEXT",
        "filename": "document.pdf",
        "type": "USER_INPUT",
        "channel": "API",
        "status": "RECEIVED",
        "metadata": {"k": "v"},
        "created_by": "user123",
        "updated_by": "user123",
        "created_at": "2024-03-21T10:00:00Z",
        "updated_at": "2024-03-21T10:00:00Z"
    })
}

/// Calls the SQL function and returns the error message, or the event id.
async fn sql_enqueue(pool: &PgPool, url: &str, data: serde_json::Value) -> Result<Uuid, String> {
    sqlx::query_scalar("SELECT postbox.enqueue($1, $2, $3)")
        .bind(url)
        .bind(Uuid::now_v7())
        .bind(data)
        .fetch_one(pool)
        .await
        .map_err(|e| {
            e.as_database_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| e.to_string())
        })
}

async fn outbox_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM postbox.outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Every invalid field is rejected by the SQL function with a message naming it, and nothing is written.
#[tokio::test]
async fn sql_function_names_the_invalid_field() {
    let db = TestDb::new().await;
    let url = "https://example.com/hook";
    type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "data.id",
            Box::new(|d| d.as_object_mut().unwrap().remove("id").map(|_| ()).unwrap()),
        ),
        ("data.id", Box::new(|d| d["id"] = json!("not-a-uuid"))),
        (
            "data.content",
            Box::new(|d| d.as_object_mut().unwrap().remove("content").map(|_| ()).unwrap()),
        ),
        ("data.content", Box::new(|d| d["content"] = json!(42))),
        ("data.content_type", Box::new(|d| d["content_type"] = json!("GIF"))),
        (
            "data.content_type",
            Box::new(|d| d.as_object_mut().unwrap().remove("content_type").map(|_| ()).unwrap()),
        ),
        ("data.type", Box::new(|d| d["type"] = json!("HUMAN"))),
        ("data.channel", Box::new(|d| d["channel"] = json!("EMAIL"))),
        ("data.status", Box::new(|d| d["status"] = json!("DONE"))),
        ("data.status", Box::new(|d| d["status"] = json!("received"))),
        (
            "data.created_by",
            Box::new(|d| d.as_object_mut().unwrap().remove("created_by").map(|_| ()).unwrap()),
        ),
        ("data.updated_by", Box::new(|d| d["updated_by"] = json!(""))),
        ("data.created_at", Box::new(|d| d["created_at"] = json!("yesterday"))),
        (
            "data.updated_at",
            Box::new(|d| d["updated_at"] = json!("2024-13-45T10:00:00Z")),
        ),
        ("data.metadata", Box::new(|d| d["metadata"] = json!([1, 2]))),
        ("data.filename", Box::new(|d| d["filename"] = json!(7))),
        ("data.colour", Box::new(|d| d["colour"] = json!("blue"))),
    ];
    for (field, mutate) in cases {
        let mut data = valid_data();
        mutate(&mut data);
        let err = sql_enqueue(&db.pool, url, data.clone())
            .await
            .expect_err(&format!("{data} accepted"));
        assert!(err.contains(field), "error for {field} does not name it: {err}");
    }
    let err = sql_enqueue(&db.pool, url, json!("text")).await.unwrap_err();
    assert!(err.contains("data"), "{err}");
    let err = sqlx::query_scalar::<_, Uuid>("SELECT postbox.enqueue($1, NULL, $2)")
        .bind(url)
        .bind(valid_data())
        .fetch_one(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("conversation_id"), "{err}");
    assert_eq!(outbox_count(&db.pool).await, 0, "nothing is half-written");
    assert!(
        sql_enqueue(&db.pool, url, valid_data()).await.is_ok(),
        "the valid payload is accepted"
    );
}

/// URLs must be absolute https (http only where postbox.allow_http is on), without credentials.
#[tokio::test]
async fn sql_function_checks_the_callback_url() {
    let db = TestDb::new().await;
    sqlx::query(&format!("ALTER DATABASE {} SET postbox.allow_http = off", db.name))
        .execute(&db.pool)
        .await
        .unwrap();
    let pool = pool(&db.url, 2).await;
    for bad in [
        "",
        "example.com/hook",
        "/relative",
        "ftp://example.com/hook",
        "http://example.com/hook",
        "https://user:pass@example.com/hook",
        "https:///nohost",
        "https://exa mple.com/",
        "https://example.com:99999/",
    ] {
        let err = sql_enqueue(&pool, bad, valid_data())
            .await
            .expect_err(&format!("{bad:?} accepted"));
        assert!(err.contains("callback_url"), "{bad:?}: {err}");
    }
    assert_eq!(outbox_count(&pool).await, 0);
    // Allowed for one transaction with the setting on.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL postbox.allow_http = on")
        .execute(&mut *tx)
        .await
        .unwrap();
    let id: Uuid = sqlx::query_scalar("SELECT postbox.enqueue('http://example.com/hook', $1, $2)")
        .bind(Uuid::now_v7())
        .bind(valid_data())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(id.get_version_num(), 7, "event ids are UUIDv7");
}

/// Payloads over the limit (256 KiB by default, postbox.max_payload_bytes) are refused.
#[tokio::test]
async fn oversized_payload_is_refused() {
    let db = TestDb::new().await;
    let mut data = valid_data();
    data["content"] = json!("x".repeat(300 * 1024));
    let err = sql_enqueue(&db.pool, "https://example.com/h", data).await.unwrap_err();
    assert!(err.contains("data") && err.contains("262144"), "{err}");
    let mut data = valid_data();
    data["content"] = json!("x".repeat(200 * 1024));
    assert!(sql_enqueue(&db.pool, "https://example.com/h", data).await.is_ok());
    assert_eq!(outbox_count(&db.pool).await, 1);
}

/// An ordering key longer than 256 characters is refused with an error naming the field, not a raw index error.
#[tokio::test]
async fn long_ordering_key_is_refused() {
    let db = TestDb::new().await;
    let enqueue = |key: String| {
        sqlx::query_scalar::<_, Uuid>("SELECT postbox.enqueue('https://example.com/h', gen_random_uuid(), $1, $2)")
            .bind(valid_data())
            .bind(key)
            .fetch_one(&db.pool)
    };
    let err = enqueue("k".repeat(5000)).await.unwrap_err().to_string();
    assert!(err.contains("invalid ordering_key") && err.contains("256"), "{err}");
    assert_eq!(outbox_count(&db.pool).await, 0);
    assert!(enqueue("k".repeat(256)).await.is_ok());
}

/// The stored row copies ids from the payload and builds the seed's body.
#[tokio::test]
async fn row_and_payload_follow_the_seed() {
    let db = TestDb::new().await;
    let data = valid_data();
    let conversation = Uuid::now_v7();
    let id: Uuid = sqlx::query_scalar("SELECT postbox.enqueue('https://example.com/h', $1, $2, 'key-1')")
        .bind(conversation)
        .bind(&data)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let (conv, msg, payload, status, attempts, max, key): (
        Uuid,
        Uuid,
        serde_json::Value,
        String,
        i32,
        i32,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT conversation_id, message_id, payload, status, attempts, max_attempts, ordering_key
             FROM postbox.outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(conv, conversation);
    assert_eq!(msg.to_string(), data["id"].as_str().unwrap());
    assert_eq!(
        (status.as_str(), attempts, max, key.as_deref()),
        ("pending", 0, 4, Some("key-1"))
    );
    assert_eq!(payload["conversation_id"], json!(conversation));
    assert_eq!(payload["data"], data);
    let ts = payload["timestamp"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
        "timestamp {ts} is RFC 3339"
    );
    // Offset-less times are read as UTC and sent in RFC 3339 form.
    let mut naive = valid_data();
    naive["created_at"] = json!("2024-03-21T10:00:00.123456");
    let id = sql_enqueue(&db.pool, "https://example.com/h", naive).await.unwrap();
    let created: String =
        sqlx::query_scalar("SELECT payload #>> '{data,created_at}' FROM postbox.outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(created, "2024-03-21T10:00:00.123456Z");
    let endpoints: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.endpoints")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(endpoints, 1, "one endpoint row per distinct URL");
}

/// The Rust API rejects a bad URL before any SQL, and maps SQL validation errors to the field.
#[tokio::test]
async fn rust_api_errors_name_the_field() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    match postbox::enqueue(&mut conn, "https://u:p@example.com/", &event("x")).await {
        Err(EnqueueError::Invalid { field, .. }) => assert_eq!(field, "callback_url"),
        other => panic!("{other:?}"),
    }
    let mut e = event("x");
    e.message.created_by = String::new();
    match postbox::enqueue(&mut conn, "https://example.com/", &e).await {
        Err(EnqueueError::Invalid { field, .. }) => assert_eq!(field, "data.created_by"),
        other => panic!("{other:?}"),
    }
    // A field only the database checks: the size limit.
    sqlx::query("SET postbox.max_payload_bytes = 100")
        .execute(&mut *conn)
        .await
        .unwrap();
    match postbox::enqueue(&mut conn, "https://example.com/", &event("x")).await {
        Err(EnqueueError::Invalid { field, problem }) => {
            assert_eq!(field, "data");
            assert!(problem.contains("limit"), "{problem}");
        }
        other => panic!("{other:?}"),
    }
    drop(conn);
    assert_eq!(outbox_count(&db.pool).await, 0);
}

/// An event is invisible to workers until its transaction commits, and gone if it rolls back.
#[tokio::test]
async fn visible_only_after_commit() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    let mut tx = db.pool.begin().await.unwrap();
    let id = postbox::enqueue(&mut tx, &receiver.url, &event("pending commit"))
        .await
        .unwrap();
    // A claim from another connection sees nothing while the transaction is open.
    let claimed = common::protocol::claim(&db.pool, "probe", 10, std::time::Duration::from_secs(10))
        .await
        .unwrap();
    assert!(claimed.is_empty());
    tx.rollback().await.unwrap();
    assert_eq!(outbox_count(&db.pool).await, 0);
    let stats = drain(&db.pool, config()).await;
    assert_eq!(stats.attempts, 0);
    assert_eq!(receiver.count(), 0, "a rolled-back event is never delivered");
    let _ = id;
}

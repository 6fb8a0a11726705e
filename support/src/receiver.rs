//! A real HTTP receiver on loopback that records every request and answers
//! by script: what the tests deliver to.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Hit {
    /// Its headers (lower-case names).
    pub headers: HashMap<String, String>,
    /// Its body.
    pub body: Bytes,
    /// When it arrived.
    pub at: Instant,
}

impl Hit {
    /// A header's value, or "" when absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    /// The `webhook-id` header as a UUID.
    pub fn id(&self) -> Uuid {
        self.header("webhook-id").parse().expect("webhook-id is a UUID")
    }
}

/// How the receiver answers the `n`th request (1-based) it gets.
pub type Script = Arc<dyn Fn(usize, &Hit) -> Reply + Send + Sync>;

/// An answer: a status, optional headers and body, after an optional delay.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status answered.
    pub status: u16,
    /// How long to wait before answering.
    pub delay: Duration,
    /// Extra response headers.
    pub headers: Vec<(&'static str, String)>,
    /// The response body.
    pub body: String,
}

impl Reply {
    /// Answers `status` at once, with no body.
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            delay: Duration::ZERO,
            headers: vec![],
            body: String::new(),
        }
    }

    /// Waits `d` first.
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }

    /// Adds a response header.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    /// Sets the response body.
    pub fn body(mut self, body: impl Into<String>) -> Reply {
        self.body = body.into();
        self
    }
}

/// A real HTTP receiver on 127.0.0.1, recording every request.
#[derive(Clone)]
pub struct Receiver {
    /// `http://127.0.0.1:PORT/webhook`.
    pub url: String,
    /// The address it listens on.
    pub addr: std::net::SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    in_flight: Arc<Mutex<(usize, usize)>>,
    answers: Answers,
}

/// For each request (by arrival order): the status answered and when the
/// handler finished (or was dropped, then status 0).
type Answers = Arc<Mutex<HashMap<usize, (u16, Instant)>>>;

#[derive(Clone)]
struct RState {
    hits: Arc<Mutex<Vec<Hit>>>,
    script: Script,
    in_flight: Arc<Mutex<(usize, usize)>>,
    answers: Answers,
}

/// Counts a request out of the in-flight tally and records its end, also
/// when the server drops the handler (the client went away).
struct Finish {
    n: usize,
    status: u16,
    in_flight: Arc<Mutex<(usize, usize)>>,
    answers: Answers,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.in_flight.lock().unwrap().0 -= 1;
        self.answers
            .lock()
            .unwrap()
            .insert(self.n, (self.status, Instant::now()));
    }
}

async fn handle(State(s): State<RState>, headers: HeaderMap, body: Bytes) -> Response {
    let hit = Hit {
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        body,
        at: Instant::now(),
    };
    let n = {
        let mut hits = s.hits.lock().unwrap();
        hits.push(hit.clone());
        hits.len()
    };
    {
        let mut f = s.in_flight.lock().unwrap();
        f.0 += 1;
        f.1 = f.1.max(f.0);
    }
    let mut finish = Finish {
        n,
        status: 0,
        in_flight: s.in_flight.clone(),
        answers: s.answers.clone(),
    };
    let reply = (s.script)(n, &hit);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    finish.status = reply.status;
    drop(finish);
    let mut resp = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (k, v) in reply.headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

impl Receiver {
    /// A receiver answering 200 to everything.
    pub async fn ok() -> Receiver {
        Self::start(Arc::new(|_, _| Reply::status(200))).await
    }

    /// A receiver answering by `script`.
    pub async fn start(script: Script) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(Mutex::new((0, 0)));
        let answers = Answers::default();
        let state = RState {
            hits: hits.clone(),
            script,
            in_flight: in_flight.clone(),
            answers: answers.clone(),
        };
        let app = axum::Router::new().fallback(handle).with_state(state);
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            url: format!("http://{addr}/webhook"),
            addr,
            hits,
            in_flight,
            answers,
        }
    }

    /// Every request so far with the status it was answered (0 while it
    /// runs, or when the client left first) and when its handler ended.
    pub fn requests(&self) -> Vec<(Hit, u16, Option<Instant>)> {
        let answers = self.answers.lock().unwrap().clone();
        self.hits()
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                let a = answers.get(&(i + 1));
                (h, a.map_or(0, |a| a.0), a.map(|a| a.1))
            })
            .collect()
    }

    /// Every request so far, in arrival order.
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// How many requests so far.
    pub fn count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    /// Most requests it had open at once.
    pub fn max_concurrent(&self) -> usize {
        self.in_flight.lock().unwrap().1
    }

    /// Waits until it has seen `n` requests (or panics after `limit`).
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Hit> {
        let start = Instant::now();
        loop {
            let hits = self.hits();
            if hits.len() >= n {
                return hits;
            }
            assert!(
                start.elapsed() < limit,
                "receiver saw {} of {n} requests within {limit:?}",
                hits.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

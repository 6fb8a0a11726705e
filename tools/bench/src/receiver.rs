//! The receiver process: answers every POST and journals its arrival.

use crate::Failure;
use crate::{bench::*, verify::*, workers::*};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::serve::ListenerExt;
use axum::Router;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use uuid::Uuid;

pub(crate) fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The bench's handle on a the receiver process process.
pub(crate) struct Receiver {
    pub(crate) child: Child,
    pub(crate) pid: u32,
    pub(crate) addr: SocketAddr,
    pub(crate) journal: PathBuf,
}

impl Receiver {
    /// Starts the receiver and reads the address it bound.
    pub(crate) async fn start(delay_ms: u64) -> Result<Receiver, Failure> {
        let journal = std::env::temp_dir().join(format!("postbox-bench-{}.txt", Uuid::new_v4().simple()));
        let mut child = Command::new(current_exe()?)
            .args(["receiver", "--addr", "127.0.0.1:0", "--delay-ms"])
            .arg(delay_ms.to_string())
            .arg("--out")
            .arg(&journal)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Failure::Runtime(format!("cannot start the receiver: {e}")))?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let mut stdout = tokio::io::BufReader::new(stdout);
        let _ = tokio::time::timeout(Duration::from_secs(10), stdout.read_line(&mut line)).await;
        let addr = line
            .trim()
            .parse()
            .map_err(|_| Failure::Runtime(format!("the receiver did not report its address (got {line:?})")))?;
        Ok(Receiver {
            child,
            pid,
            addr,
            journal,
        })
    }

    /// `http://127.0.0.1:PORT/webhook/`; endpoint `k` appends `k`.
    pub(crate) fn url_prefix(&self) -> String {
        format!("http://{}/webhook/", self.addr)
    }

    /// Closes its stdin (it flushes its journal and exits) and reads the journal.
    pub(crate) async fn stop(mut self) -> Result<Arrivals, Failure> {
        drop(self.child.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .map_err(|_| Failure::Runtime("the receiver did not exit".into()))?
            .map_err(|e| Failure::Runtime(format!("waiting for the receiver: {e}")))?;
        if !status.success() {
            return Err(Failure::Runtime(format!("the receiver exited with {status}")));
        }
        let text = tokio::fs::read_to_string(&self.journal)
            .await
            .map_err(|e| Failure::Runtime(format!("cannot read the receiver's journal: {e}")))?;
        Ok(Arrivals::parse(&text))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.journal);
    }
}

/// The receiver's journal: one line per request, written before answering,
/// so every request answered 2xx is in the file once it is closed.
pub(crate) struct Journal {
    pub(crate) file: Mutex<Option<std::io::BufWriter<std::fs::File>>>,
    pub(crate) delay: Duration,
    pub(crate) write_failed: AtomicBool,
}

impl Journal {
    /// Appends a line; false once the journal is closed or broken.
    pub(crate) fn record(&self, id: &str, micros: i64) -> bool {
        let mut file = self.file.lock().expect("journal lock");
        let Some(w) = file.as_mut() else {
            return false;
        };
        if writeln!(w, "{id} {micros}").is_err() {
            self.write_failed.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Flushes and closes; later requests are answered 503 (never 2xx).
    pub(crate) fn close(&self) -> std::io::Result<()> {
        let taken = self.file.lock().expect("journal lock").take();
        if let Some(mut w) = taken {
            w.flush()?;
        }
        if self.write_failed.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("a journal write failed"));
        }
        Ok(())
    }
}

pub(crate) async fn arrive(State(journal): State<Arc<Journal>>, headers: HeaderMap, _body: Bytes) -> StatusCode {
    let micros = unix_micros();
    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
    if !journal.record(id, micros) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if !journal.delay.is_zero() {
        tokio::time::sleep(journal.delay).await;
    }
    StatusCode::NO_CONTENT
}

/// Resolves when stdin reaches end of file (the bench closed it or died) or
/// on SIGTERM/SIGINT.
pub(crate) async fn stop_requested() {
    use tokio::signal::unix::{signal, SignalKind};
    let (eof_tx, eof) = tokio::sync::oneshot::channel();
    // A plain thread: a blocked tokio stdin read would hold up runtime shutdown.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = eof_tx.send(());
    });
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = eof => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// the receiver process: answers 204 to every POST (after `--delay-ms`)
/// and journals `webhook-id` with the arrival time.
pub async fn receiver(a: ReceiverArgs) -> Result<(), Failure> {
    let file = std::fs::File::create(&a.out)
        .map_err(|e| Failure::Runtime(format!("cannot create {}: {e}", a.out.display())))?;
    let journal = Arc::new(Journal {
        file: Mutex::new(Some(std::io::BufWriter::with_capacity(1 << 16, file))),
        delay: Duration::from_millis(a.delay_ms),
        write_failed: AtomicBool::new(false),
    });
    let listener = tokio::net::TcpListener::bind(a.addr)
        .await
        .map_err(|e| Failure::Runtime(format!("cannot listen on {}: {e}", a.addr)))?;
    let addr = listener.local_addr().map_err(|e| Failure::Runtime(e.to_string()))?;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new().fallback(post(arrive)).with_state(journal.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    println!("{addr}");
    stop_requested().await;
    server.abort();
    journal
        .close()
        .map_err(|e| Failure::Runtime(format!("journal {}: {e}", a.out.display())))
}

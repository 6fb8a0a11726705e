//! Worker processes: started, watched (peak RSS, CPU) and stopped.

use crate::Failure;
use crate::{bench::*, procfs::*};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

/// A worker process as the bench saw it.
#[derive(Debug)]
pub(crate) struct WorkerRun {
    pub(crate) status: ExitStatus,
    /// Highest `VmHWM` seen, in kB.
    pub(crate) peak_rss_kb: u64,
    /// User + system CPU at the last sample, in clock ticks.
    pub(crate) cpu_ticks: u64,
}

/// Starts `postbox worker` (this same binary) on the database at `url`.
pub(crate) fn spawn_worker(
    url: &str,
    concurrency: usize,
    batch_size: usize,
    until_empty: bool,
) -> Result<Child, Failure> {
    let mut cmd = Command::new(postbox_bin()?);
    cmd.arg("worker");
    if until_empty {
        cmd.arg("--until-empty");
    }
    cmd.env("DATABASE_URL", url)
        .env("POSTBOX_ALLOW_HTTP", "true")
        .env("POSTBOX_ALLOW_PRIVATE_NETWORKS", "true")
        .env("POSTBOX_SIGNING_SECRET", SIGNING_SECRET)
        .env("POSTBOX_CONCURRENCY", concurrency.to_string())
        .env("POSTBOX_BATCH_SIZE", batch_size.to_string())
        // Warnings only; sqlx's slow-statement warnings quote whole statements
        // and would bury the results (they are counted in the CPU split anyway).
        .env("RUST_LOG", "warn,sqlx::query=error")
        // Several workers on one host must not fight over one metrics port.
        .env_remove("POSTBOX_METRICS_ADDR")
        .env_remove("POSTBOX_WORKER_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd.spawn()
        .map_err(|e| Failure::Runtime(format!("cannot start a worker: {e}")))
}

/// Waits for a worker to exit, sampling its peak RSS and CPU meanwhile.
pub(crate) async fn watch(mut child: Child) -> std::io::Result<WorkerRun> {
    let pid = child.id();
    let (mut peak_rss_kb, mut cpu_ticks) = (0, 0);
    loop {
        if let Some(pid) = pid {
            // A process that has exited but is not yet reaped has no VmHWM.
            if let Some(kb) = read_kb(&format!("/proc/{pid}/status"), "VmHWM:") {
                peak_rss_kb = peak_rss_kb.max(kb);
            }
            if let Some(ticks) = process_ticks(pid) {
                cpu_ticks = cpu_ticks.max(ticks);
            }
        }
        tokio::select! {
            status = child.wait() => {
                return Ok(WorkerRun { status: status?, peak_rss_kb, cpu_ticks });
            }
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

/// Waits for every watched worker; any that failed fails the scenario.
pub(crate) async fn collect_runs(mut set: JoinSet<std::io::Result<WorkerRun>>) -> Result<Vec<WorkerRun>, Failure> {
    let mut runs = Vec::new();
    while let Some(joined) = set.join_next().await {
        let run = joined
            .expect("worker watch task")
            .map_err(|e| Failure::Runtime(format!("waiting for a worker: {e}")))?;
        if !run.status.success() {
            return Err(Failure::Runtime(format!("a worker exited with {}", run.status)));
        }
        runs.push(run);
    }
    Ok(runs)
}

/// Sends SIGTERM with `kill` (this crate forbids the unsafe of libc).
pub(crate) fn terminate(pid: u32) -> Result<(), Failure> {
    let status = std::process::Command::new("kill")
        .args(["-s", "TERM", &pid.to_string()])
        .status()
        .map_err(|e| Failure::Runtime(format!("cannot run kill: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure::Runtime(format!("kill -s TERM {pid} failed")))
    }
}

pub(crate) fn current_exe() -> Result<PathBuf, Failure> {
    std::env::current_exe().map_err(|e| Failure::Runtime(format!("cannot find this program: {e}")))
}

/// The `postbox` binary the workers run: `POSTBOX_BIN`, or the one built
/// next to this program (`cargo build --release --workspace`).
pub(crate) fn postbox_bin() -> Result<PathBuf, Failure> {
    if let Some(bin) = std::env::var_os("POSTBOX_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let bin = current_exe()?.with_file_name("postbox");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(Failure::Usage(format!(
            "{} not found: build it with `cargo build --release --workspace`, or set POSTBOX_BIN",
            bin.display()
        )))
    }
}

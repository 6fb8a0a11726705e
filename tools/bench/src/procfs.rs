//! CPU and memory from /proc.

use crate::bench::*;

/// The number in kB on the line starting with `key` of a /proc file.
pub(crate) fn read_kb(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix(key))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Fields of `/proc/<pid>/stat` after the command name, from field 3 (state) on.
pub(crate) fn stat_fields(pid: u32) -> Option<(String, Vec<u64>)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = text.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    // Field 3 (state) is a letter; parse it as 0 to keep the indices.
    let fields = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    Some((comm, fields))
}

/// utime + stime of a process, in ticks.
pub(crate) fn process_ticks(pid: u32) -> Option<u64> {
    let (_, f) = stat_fields(pid)?;
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after field 3.
    Some(f.get(11)? + f.get(12)?)
}

/// CPU of every local `postgres` process, counting the children that the
/// postmaster has reaped (cutime + cstime), so that backends which come and
/// go between two snapshots are still counted.
pub(crate) fn postgres_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat_fields)
        .filter(|(comm, _)| comm == "postgres")
        .map(|(_, f)| f.get(11..15).map_or(0, |t| t.iter().sum::<u64>()))
        .sum()
}

/// Busy ticks of the whole machine (all CPUs) from `/proc/stat`.
pub(crate) fn machine_busy_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find_map(|l| l.strip_prefix("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    v.iter().take(8).sum::<u64>() - v.get(3).unwrap_or(&0) - v.get(4).unwrap_or(&0)
}

/// CPU counters (ticks) read at the start and the end of a measurement.
pub(crate) struct CpuSnapshot {
    pub(crate) machine: u64,
    pub(crate) postgres: u64,
    pub(crate) receiver: u64,
    /// This process (the bench: enqueueing, sampling).
    pub(crate) bench: u64,
    /// The workers, as sampled by [`watch`] or read here.
    pub(crate) workers: u64,
}

impl CpuSnapshot {
    pub(crate) fn take(receiver_pid: u32, workers: u64) -> CpuSnapshot {
        CpuSnapshot {
            machine: machine_busy_ticks(),
            postgres: postgres_ticks(),
            receiver: process_ticks(receiver_pid).unwrap_or(0),
            bench: process_ticks(std::process::id()).unwrap_or(0),
            workers,
        }
    }
}

/// Where the CPU went, in % of one CPU (so up to nproc × 100). `other` is
/// everything else on the machine: another program's load shows up there and
/// makes the figures suspect.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSplit {
    pub(crate) workers: f64,
    pub(crate) postgres: f64,
    pub(crate) receiver: f64,
    pub(crate) bench: f64,
    pub(crate) other: f64,
}

impl CpuSplit {
    pub(crate) fn between(before: &CpuSnapshot, after: &CpuSnapshot, seconds: f64) -> CpuSplit {
        let pct = |a: u64, b: u64| a.saturating_sub(b) as f64 / CLOCK_TICKS / seconds * 100.0;
        let workers = pct(after.workers, before.workers);
        let postgres = pct(after.postgres, before.postgres);
        let receiver = pct(after.receiver, before.receiver);
        let bench = pct(after.bench, before.bench);
        let machine = pct(after.machine, before.machine);
        CpuSplit {
            workers,
            postgres,
            receiver,
            bench,
            other: (machine - workers - postgres - receiver - bench).max(0.0),
        }
    }

    /// `worker 45% · postgres 80% · receiver 15% · bench 2% · other 3%`.
    pub(crate) fn columns(&self) -> String {
        format!(
            "{:>5.0}% {:>5.0}% {:>5.0}% {:>5.0}% {:>5.0}%",
            self.workers, self.postgres, self.receiver, self.bench, self.other
        )
    }
}

//! Results: the reports and how they are printed.

use crate::{bench::*, procfs::*, verify::*};

/// One drain's figures.
pub(crate) struct DrainReport {
    pub(crate) label: String,
    pub(crate) drain: Drain,
    pub(crate) events: u64,
    pub(crate) seconds: f64,
    /// The highest peak RSS of its workers, in kB.
    pub(crate) peak_rss_kb: u64,
    pub(crate) cpu: CpuSplit,
    pub(crate) check: Check,
}

impl DrainReport {
    pub(crate) fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

/// The latency scenario's figures.
pub(crate) struct LatencyReport {
    pub(crate) events: usize,
    /// The rate actually offered (events ÷ enqueueing time).
    pub(crate) offered_rate: f64,
    /// p50, p90, p99 and max, in ms.
    pub(crate) percentiles: [f64; 4],
    pub(crate) peak_rss_kb: u64,
    pub(crate) cpu: CpuSplit,
    pub(crate) check: Check,
}

/// The `p` quantile (nearest rank) of sorted microseconds, in ms.
pub(crate) fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

pub(crate) fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Above this much foreign CPU (% of one CPU) the figures are flagged.
pub(crate) const BUSY_MACHINE: f64 = 20.0;

/// The drain table.
pub(crate) fn print_drains(drains: &[DrainReport]) {
    if drains.is_empty() {
        return;
    }
    println!("\nscenario               workers  conc  events  seconds  events/s  RSS MB  dups | worker     pg   recv  bench  other | pg µs/event");
    for d in drains {
        println!(
            "{:<22} {:>7} {:>5} {:>7} {:>8.2} {:>9.0} {:>7.1} {:>5} | {} | {:>6.0}",
            d.label,
            d.drain.workers,
            d.drain.concurrency,
            d.events,
            d.seconds,
            d.rate(),
            mb(d.peak_rss_kb),
            d.check.duplicates,
            d.cpu.columns(),
            d.cpu.postgres / 100.0 * d.seconds / d.events as f64 * 1e6
        );
    }
    println!("RSS: the highest VmHWM of the workers. CPU in % of one CPU: the workers together, postgres, receiver,");
    println!("this bench process, and everything else on the machine. pg µs/event: PostgreSQL CPU time (all its");
    println!("processes) per delivered event.");
}

pub(crate) fn print_results(drains: &[DrainReport], latency: Option<&LatencyReport>) {
    print_drains(drains);
    let mut busy = drains.iter().map(|d| d.cpu.other).collect::<Vec<_>>();
    if let Some(l) = latency {
        let [p50, p90, p99, max] = l.percentiles;
        println!(
            "\nlatency (receiver arrival − COMMIT returned): {} events at {:.0} events/s, one per transaction, 1 worker",
            l.events, l.offered_rate
        );
        println!("  p50 {p50:.2} ms   p90 {p90:.2} ms   p99 {p99:.2} ms   max {max:.2} ms");
        println!(
            "  worker peak RSS {:.1} MB, {} dups; CPU worker/pg/recv/bench/other: {}",
            mb(l.peak_rss_kb),
            l.check.duplicates,
            l.cpu.columns()
        );
        busy.push(l.cpu.other);
    }
    if busy.iter().any(|&o| o > BUSY_MACHINE) {
        println!("\nwarning: other programs used over {BUSY_MACHINE:.0}% of a CPU during a measurement; rerun on a quiet machine.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<i64> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7000], 0.5), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}

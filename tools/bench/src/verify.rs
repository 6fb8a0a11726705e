//! Verification: every enqueued event arrived, and every row is delivered.

use crate::Failure;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// What the receiver saw, read from its journal.
#[derive(Debug, Default)]
pub(crate) struct Arrivals {
    /// First arrival (unix micros) of each event id.
    pub(crate) first: HashMap<Uuid, i64>,
    /// Requests with a readable id, duplicates included.
    pub(crate) requests: u64,
    /// Requests without a readable `webhook-id`.
    pub(crate) unreadable: u64,
}

impl Arrivals {
    pub(crate) fn parse(journal: &str) -> Arrivals {
        let mut a = Arrivals::default();
        for line in journal.lines() {
            let mut fields = line.split(' ');
            let id = fields.next().and_then(|s| Uuid::parse_str(s).ok());
            let micros = fields.next().and_then(|s| s.parse::<i64>().ok());
            match (id, micros) {
                (Some(id), Some(micros)) => {
                    a.requests += 1;
                    let first = a.first.entry(id).or_insert(micros);
                    *first = (*first).min(micros);
                }
                _ => a.unreadable += 1,
            }
        }
        a
    }

    pub(crate) fn duplicates(&self) -> u64 {
        self.requests - self.first.len() as u64
    }
}

/// The outcome of comparing what was enqueued with the receiver's journal.
#[derive(Debug)]
pub(crate) struct Check {
    /// Events the scenario enqueued.
    pub(crate) expected: u64,
    /// Of those, rows found in the outbox.
    pub(crate) rows: u64,
    /// Enqueued or outbox ids the receiver never saw.
    pub(crate) missing: u64,
    /// Ids the receiver saw that were never enqueued, plus unreadable requests.
    pub(crate) unknown: u64,
    /// Deliveries beyond the first of an id (allowed: at least once).
    pub(crate) duplicates: u64,
    /// Rows whose status is not `delivered`.
    pub(crate) undelivered: i64,
}

impl Check {
    /// Why the run failed, if it did.
    pub(crate) fn problem(&self) -> Option<String> {
        let mut p = Vec::new();
        if self.rows != self.expected {
            p.push(format!("{} rows in the outbox, expected {}", self.rows, self.expected));
        }
        if self.missing > 0 {
            p.push(format!("{} events never reached the receiver", self.missing));
        }
        if self.unknown > 0 {
            p.push(format!("{} requests with unknown ids", self.unknown));
        }
        if self.undelivered > 0 {
            p.push(format!("{} rows not delivered", self.undelivered));
        }
        (!p.is_empty()).then(|| p.join(", "))
    }
}

/// Compares the ids `postbox.enqueue` returned, and every id in the outbox,
/// with what the receiver saw; counts the rows that are not `delivered`.
pub(crate) async fn verify(pool: &PgPool, arrivals: &Arrivals, enqueued: &[Uuid]) -> Result<Check, Failure> {
    let outbox: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM postbox.outbox")
        .fetch_all(pool)
        .await?;
    let undelivered: i64 = sqlx::query_scalar("SELECT count(*) FROM postbox.outbox WHERE status <> 'delivered'")
        .fetch_one(pool)
        .await?;
    let expected: HashSet<Uuid> = enqueued.iter().copied().collect();
    let ids: HashSet<Uuid> = expected.iter().chain(&outbox).copied().collect();
    Ok(Check {
        expected: expected.len() as u64,
        rows: outbox.iter().filter(|id| expected.contains(id)).count() as u64,
        missing: ids.iter().filter(|id| !arrivals.first.contains_key(id)).count() as u64,
        unknown: arrivals.first.keys().filter(|id| !ids.contains(id)).count() as u64 + arrivals.unreadable,
        duplicates: arrivals.duplicates(),
        undelivered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_keeps_first_arrivals_and_counts_duplicates() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        let journal = format!("{a} 30\n{b} 10\n{a} 20\n- 5\n");
        let arrivals = Arrivals::parse(&journal);
        assert_eq!(arrivals.first[&a], 20);
        assert_eq!(arrivals.first[&b], 10);
        assert_eq!(arrivals.duplicates(), 1);
        assert_eq!(arrivals.unreadable, 1);
    }
}

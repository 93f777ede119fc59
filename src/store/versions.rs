//! Counters that move whenever the ledger changes, so a replica may keep answers it built from
//! the ledger (`GET /images`, `GET /digests`) until they do.
//!
//! Writes through this store move them once they are committed. On PostgreSQL, every commit that
//! touches the ledger's tables, from any replica or any other client, also sends a notification
//! (row triggers, migrations/postgres/0009), and the LISTEN task moves them when it arrives.
//! While that connection is down, changes elsewhere could go unheard: the counters then answer
//! `None`, and nothing may be kept.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The ledger's change counters.
#[derive(Debug)]
pub struct LedgerVersions {
    /// Any change to a record or to drift.
    any: AtomicU64,
    /// Changes to drift only (whether any is open).
    drift: AtomicU64,
    /// Whether every change is heard: always on SQLite (one process owns the file); on
    /// PostgreSQL, while the LISTEN connection is up.
    heard: AtomicBool,
}

impl LedgerVersions {
    /// Counters for a store that hears every change from the start (SQLite) or not until its
    /// LISTEN connection is up (PostgreSQL).
    pub fn new(heard: bool) -> LedgerVersions {
        LedgerVersions {
            any: AtomicU64::new(0),
            drift: AtomicU64::new(0),
            heard: AtomicBool::new(heard),
        }
    }

    /// The version of the whole ledger, or `None` while changes could go unheard.
    pub fn ledger(&self) -> Option<u64> {
        // The version is read after `heard`: a reconnect moves it after setting `heard`, so an
        // answer built from a version read before the reconnect is never taken as current.
        self.heard
            .load(Ordering::SeqCst)
            .then(|| self.any.load(Ordering::SeqCst))
    }

    /// The version of drift alone, or `None` while changes could go unheard.
    pub fn drift(&self) -> Option<u64> {
        self.heard
            .load(Ordering::SeqCst)
            .then(|| self.drift.load(Ordering::SeqCst))
    }

    /// A record changed (committed).
    pub fn record_changed(&self) {
        self.any.fetch_add(1, Ordering::SeqCst);
    }

    /// Drift changed (committed).
    pub fn drift_changed(&self) {
        self.drift.fetch_add(1, Ordering::SeqCst);
        self.any.fetch_add(1, Ordering::SeqCst);
    }

    /// Changes elsewhere may go unheard from now on (the LISTEN connection dropped).
    pub fn deaf(&self) {
        self.heard.store(false, Ordering::SeqCst);
    }

    /// Every change is heard again; whatever changed meanwhile is unknown, so both move.
    pub fn hearing(&self) {
        self.heard.store(true, Ordering::SeqCst);
        self.drift_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_moves_the_versions_it_touches() {
        let v = LedgerVersions::new(true);
        let (l, d) = (v.ledger().unwrap(), v.drift().unwrap());
        v.record_changed();
        assert_ne!(v.ledger(), Some(l));
        assert_eq!(v.drift(), Some(d), "a record is not drift");
        let l = v.ledger().unwrap();
        v.drift_changed();
        assert_ne!(v.ledger(), Some(l), "drift is part of the ledger's answers");
        assert_ne!(v.drift(), Some(d));
    }

    #[test]
    fn nothing_is_current_while_changes_could_go_unheard_nor_after_until_it_moved() {
        let v = LedgerVersions::new(false);
        assert_eq!(v.ledger(), None);
        v.hearing();
        let before = v.ledger().unwrap();
        v.deaf();
        assert_eq!((v.ledger(), v.drift()), (None, None));
        v.hearing();
        assert_ne!(
            v.ledger(),
            Some(before),
            "what changed while deaf is unknown"
        );
    }
}

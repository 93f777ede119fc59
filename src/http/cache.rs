//! The answers of the ledger's lookups (`GET /images/{name}`, `GET /digests/{digest}`), kept
//! as the bytes sent while the ledger stays at the version they were built at.
//!
//! The ledger changes seldom and is read often, the same names over and over (CI jobs asking for
//! the digest to pin). An answer is kept until the ledger moves — a record or drift written here,
//! or on PostgreSQL anywhere, as its notification says ([`crate::store::LedgerVersions`]) — or
//! until it is `max_age` old, whichever comes first; nothing is kept while changes could go
//! unheard. The whole cache holds at most `max_bytes`; when full, it starts over.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;

/// Kept answers, by lookup.
#[derive(Debug)]
pub struct ReadCache {
    inner: Mutex<Inner>,
    max_bytes: usize,
    max_age: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    /// The ledger version every kept answer was built at.
    version: u64,
    entries: HashMap<String, (Instant, Bytes)>,
    bytes: usize,
}

impl ReadCache {
    /// A cache of at most `max_bytes` of answers (0: keeps none), each at most `max_age` old.
    pub fn new(max_bytes: usize, max_age: Duration) -> ReadCache {
        ReadCache {
            inner: Mutex::default(),
            max_bytes,
            max_age,
        }
    }

    /// The answer to `key` kept at ledger version `version` (the current one), if any.
    pub fn get(&self, key: &str, version: Option<u64>) -> Option<Bytes> {
        let version = version?;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.version != version {
            return None;
        }
        match inner.entries.get(key) {
            Some((at, body)) if at.elapsed() <= self.max_age => Some(body.clone()),
            Some(_) => {
                let (_, body) = inner.entries.remove(key)?;
                inner.bytes -= key.len() + body.len();
                None
            }
            None => None,
        }
    }

    /// Keeps `body` as the answer to `key`, built from the ledger at `version` (read before the
    /// ledger was). An answer from an older version than the newest seen is not kept.
    pub fn put(&self, key: &str, version: Option<u64>, body: Bytes) {
        let Some(version) = version else { return };
        let size = key.len() + body.len();
        if size > self.max_bytes {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if version < inner.version {
            return;
        }
        if version > inner.version || inner.bytes + size > self.max_bytes {
            inner.entries.clear();
            inner.bytes = 0;
            inner.version = version;
        }
        if let Some((_, old)) = inner
            .entries
            .insert(key.to_string(), (Instant::now(), body))
        {
            inner.bytes -= key.len() + old.len();
        }
        inner.bytes += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> ReadCache {
        ReadCache::new(100, Duration::from_secs(60))
    }

    #[test]
    fn an_answer_is_kept_while_the_ledger_stays_at_its_version() {
        let c = cache();
        c.put("a", Some(3), Bytes::from_static(b"one"));
        assert_eq!(c.get("a", Some(3)).as_deref(), Some(&b"one"[..]));
        assert_eq!(c.get("a", Some(4)), None, "the ledger moved");
        assert_eq!(c.get("a", None), None, "changes could go unheard");
        assert_eq!(c.get("b", Some(3)), None);
    }

    #[test]
    fn an_answer_built_before_the_ledger_moved_is_not_kept() {
        let c = cache();
        c.put("a", Some(4), Bytes::from_static(b"new"));
        // A lookup that read version 3, then the ledger, finishes after one that read 4.
        c.put("b", Some(3), Bytes::from_static(b"old"));
        assert_eq!(c.get("b", Some(4)), None);
        assert_eq!(c.get("b", Some(3)), None);
        c.put("c", None, Bytes::from_static(b"unheard"));
        assert_eq!(c.get("c", Some(4)), None);
        assert!(c.get("a", Some(4)).is_some());
    }

    #[test]
    fn answers_expire_and_the_cache_stays_within_its_bytes() {
        let c = ReadCache::new(100, Duration::ZERO);
        c.put("a", Some(1), Bytes::from_static(b"x"));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(c.get("a", Some(1)), None, "older than max_age");

        let c = cache();
        c.put("big", Some(1), Bytes::from(vec![0; 200]));
        assert_eq!(c.get("big", Some(1)), None, "larger than the whole cache");
        for i in 0..30 {
            c.put(&format!("k{i}"), Some(1), Bytes::from(vec![0; 10]));
            let inner = c.inner.lock().unwrap();
            assert!(inner.bytes <= 100, "{} bytes kept", inner.bytes);
            let counted: usize = inner
                .entries
                .iter()
                .map(|(k, (_, b))| k.len() + b.len())
                .sum();
            assert_eq!(inner.bytes, counted);
        }
        assert!(c.get("k29", Some(1)).is_some(), "the newest is kept");
    }
}

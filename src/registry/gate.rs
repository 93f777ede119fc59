//! A counting gate that lets the largest waiter through first: the copy's byte-stream limit, so
//! the blobs that take longest start first and the small ones fill in around them.

use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// At most `n` holders at once; when one leaves, the waiter with the largest weight (ties: the
/// first to come) goes next.
pub struct Gate {
    inner: Arc<Mutex<State>>,
}

struct State {
    free: usize,
    next: u64,
    waiting: BinaryHeap<Waiter>,
}

struct Waiter {
    weight: u64,
    /// Arrival order: earlier first among equal weights.
    seq: u64,
    tx: oneshot::Sender<Pass>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        (self.weight, self.seq) == (other.weight, other.seq)
    }
}

impl Eq for Waiter {}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.weight
            .cmp(&other.weight)
            .then(other.seq.cmp(&self.seq))
    }
}

/// A place in the gate, given back when dropped (to the largest waiter, if any).
pub struct Pass {
    /// `None` for a pass that never reached its waiter (it holds no place).
    inner: Option<Arc<Mutex<State>>>,
}

impl Gate {
    /// A gate for `n` holders at once (at least one).
    pub fn new(n: usize) -> Gate {
        Gate {
            inner: Arc::new(Mutex::new(State {
                free: n.max(1),
                next: 0,
                waiting: BinaryHeap::new(),
            })),
        }
    }

    /// Waits for a place; among waiters, the largest `weight` is let through first.
    pub async fn acquire(&self, weight: u64) -> Pass {
        let rx = {
            let mut s = self.inner.lock().expect("gate poisoned");
            if s.free > 0 && s.waiting.is_empty() {
                s.free -= 1;
                return Pass {
                    inner: Some(self.inner.clone()),
                };
            }
            let (tx, rx) = oneshot::channel();
            let seq = s.next;
            s.next += 1;
            s.waiting.push(Waiter { weight, seq, tx });
            rx
        };
        // A pass sent to a waiter that has gone is dropped with the channel, and so moves on.
        rx.await.expect("a gate's waiter is always answered")
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let mut s = inner.lock().expect("gate poisoned");
        while let Some(w) = s.waiting.pop() {
            let pass = Pass {
                inner: Some(inner.clone()),
            };
            match w.tx.send(pass) {
                Ok(()) => return,
                // The waiter went away: the place goes on to the next one.
                Err(mut pass) => pass.inner = None,
            }
        }
        s.free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_largest_waiter_goes_first_and_places_are_never_lost() {
        let gate = Arc::new(Gate::new(1));
        let first = gate.acquire(1).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for w in [3u64, 10, 7, 10] {
            let (g, order) = (gate.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = g.acquire(w).await;
                order.lock().unwrap().push(w);
            }));
            // Each waiter queues before the next one comes.
            while gate.inner.lock().unwrap().waiting.len() < tasks.len() {
                tokio::task::yield_now().await;
            }
        }
        // A waiter that gives up does not take a place with it.
        let gone = tokio::spawn({
            let gate = gate.clone();
            async move { gate.acquire(100).await }
        });
        while gate.inner.lock().unwrap().waiting.len() < 5 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![10, 10, 7, 3]);
        let s = gate.inner.lock().unwrap();
        assert_eq!((s.free, s.waiting.len()), (1, 0));
    }
}

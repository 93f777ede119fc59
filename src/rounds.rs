//! Rounds that run in the background: a drift-watch round or a mirror-list sync is asked for (by
//! its schedule or by `POST`), waits behind the running one, runs one at a time, and stops at
//! shutdown. The HTTP answer never waits for a round.

use std::future::Future;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::store::now_ms;

/// Where a round is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoundState {
    /// Waiting for the running round to end.
    Queued,
    Running,
}

/// Who asked for a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The service's start (the mirror list syncs once at start).
    Start,
    /// The interval.
    Schedule,
    /// `POST /drift/check` or `POST /sync`.
    Request,
}

/// A round that has not finished: what `POST` answers and `GET` shows.
#[derive(Debug, Clone, Serialize)]
pub struct RoundStatus {
    /// Counts up from 1 in each process; the finished round's report carries it too.
    pub id: u64,
    pub state: RoundState,
    pub trigger: Trigger,
    /// RFC 3339.
    pub requested_at: String,
    /// RFC 3339; set once running.
    pub started_at: Option<String>,
}

#[derive(Default)]
struct Slots {
    next_id: u64,
    running: Option<RoundStatus>,
    queued: Option<RoundStatus>,
}

/// One kind of round (drift, or sync): at most one running and one queued.
#[derive(Clone)]
pub struct Rounds {
    slots: Arc<Mutex<Slots>>,
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
    stop: CancellationToken,
}

impl Default for Rounds {
    fn default() -> Self {
        Rounds {
            slots: Arc::default(),
            one_at_a_time: Arc::default(),
            stop: CancellationToken::new(),
        }
    }
}

impl Rounds {
    /// Stops the running round and drops the queued one (at shutdown); later requests are not run.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// The round running now, if any.
    pub fn running(&self) -> Option<RoundStatus> {
        self.slots().running.clone()
    }

    /// The round waiting behind it, if any.
    pub fn queued(&self) -> Option<RoundStatus> {
        self.slots().queued.clone()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().expect("round state poisoned")
    }

    /// Asks for a round and returns at once. A round already queued is the answer (asking twice
    /// while one runs queues one more round, not two); else a new one is queued behind the running
    /// one and `run(id)` runs in the background when its turn comes. The handle ends with the
    /// round (`None` when the queued one was joined).
    pub fn request<F, Fut>(
        &self,
        trigger: Trigger,
        run: F,
    ) -> (RoundStatus, Option<tokio::task::JoinHandle<()>>)
    where
        F: FnOnce(u64) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut slots = self.slots();
        if let Some(queued) = &slots.queued {
            return (queued.clone(), None);
        }
        slots.next_id += 1;
        let status = RoundStatus {
            id: slots.next_id,
            state: RoundState::Queued,
            trigger,
            requested_at: crate::http::rfc3339(now_ms()),
            started_at: None,
        };
        slots.queued = Some(status.clone());
        drop(slots);
        let this = self.clone();
        let id = status.id;
        let handle = tokio::spawn(async move { this.run_queued(id, run).await });
        (status, Some(handle))
    }

    async fn run_queued<F, Fut>(&self, id: u64, run: F)
    where
        F: FnOnce(u64) -> Fut,
        Fut: Future<Output = ()>,
    {
        let turn = tokio::select! {
            t = self.one_at_a_time.lock() => t,
            _ = self.stop.cancelled() => {
                self.slots().queued.take_if(|q| q.id == id);
                return;
            }
        };
        {
            let mut slots = self.slots();
            let mut status = slots.queued.take_if(|q| q.id == id).unwrap_or(RoundStatus {
                id,
                state: RoundState::Queued,
                trigger: Trigger::Request,
                requested_at: crate::http::rfc3339(now_ms()),
                started_at: None,
            });
            status.state = RoundState::Running;
            status.started_at = Some(crate::http::rfc3339(now_ms()));
            slots.running = Some(status);
        }
        tokio::select! {
            _ = run(id) => {}
            _ = self.stop.cancelled() => tracing::info!(round.id = id, "round {id} stopped: shutting down"),
        }
        self.slots().running = None;
        drop(turn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn requests_queue_behind_the_running_round_and_coalesce() {
        let rounds = Rounds::default();
        let go = Arc::new(tokio::sync::Notify::new());
        let g = go.clone();
        let (first, h1) = rounds.request(Trigger::Request, move |_| async move {
            g.notified().await;
        });
        while rounds.running().is_none() {
            tokio::task::yield_now().await;
        }
        let (second, h2) = rounds.request(Trigger::Request, |_| async {});
        let (third, h3) = rounds.request(Trigger::Schedule, |_| async {});
        assert_eq!((first.id, second.id, third.id), (1, 2, 2));
        assert!(h2.is_some() && h3.is_none(), "the queued round is joined");
        assert_eq!(rounds.running().unwrap().id, 1);
        assert_eq!(rounds.queued().unwrap().state, RoundState::Queued);
        go.notify_one();
        h1.unwrap().await.unwrap();
        h2.unwrap().await.unwrap();
        assert!(rounds.running().is_none() && rounds.queued().is_none());
    }

    #[tokio::test]
    async fn shutdown_stops_the_running_round() {
        let rounds = Rounds::default();
        let (_, h) = rounds.request(Trigger::Request, |_| std::future::pending::<()>());
        while rounds.running().is_none() {
            tokio::task::yield_now().await;
        }
        rounds.shutdown();
        tokio::time::timeout(Duration::from_secs(1), h.unwrap())
            .await
            .expect("stopped at once")
            .unwrap();
        assert!(rounds.running().is_none());
    }
}

//! In-process single flight: identical concurrent requests on one replica share one Redis read
//! ([`SharedReads`]) and, after a miss, one fetch ([`Flights`]).
//!
//! The first request for a key starts the fetch as its own task and is the [`Role::Leader`];
//! later ones join as [`Role::Follower`]s. The fetch runs to completion even if every caller
//! goes away (the upstream call is already paid for, and its result fills the caches), and if
//! it panics the waiters are released with `None` rather than left hanging.
//!
//! A read is cheaper than a task: the first caller reads inline and hands its result to those
//! who joined meanwhile. If that caller goes away first (its client hung up), they read for
//! themselves.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use shared::keys::CacheKey;
use tokio::sync::watch;

/// Whether this caller started the fetch or joined one already under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

type Slot<T> = watch::Receiver<Option<T>>;

/// What is under way, by key: the receiving end of each one's outcome. Shared by [`Flights`]
/// and [`SharedReads`].
#[derive(Debug)]
struct InFlight<T>(Mutex<HashMap<CacheKey, Slot<T>>>);

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        InFlight(Mutex::new(HashMap::new()))
    }
}

impl<T> InFlight<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Slot<T>>> {
        // A panic while holding this lock cannot leave the map inconsistent: keep going.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Joins what is under way for `key` (`Err` with its receiver), or registers a new one and
    /// returns the sender of its outcome.
    fn join(&self, key: CacheKey) -> Result<watch::Sender<Option<T>>, Slot<T>> {
        let mut in_flight = self.lock();
        if let Some(receiver) = in_flight.get(&key) {
            return Err(receiver.clone());
        }
        let (sender, receiver) = watch::channel(None);
        in_flight.insert(key, receiver);
        Ok(sender)
    }

    fn remove(&self, key: &CacheKey) {
        self.lock().remove(key);
    }

    /// Whether nothing is under way.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// Fetches under way, by key.
#[derive(Debug)]
pub struct Flights<T> {
    in_flight: InFlight<T>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights { in_flight: InFlight::default() }
    }
}

/// A joined flight: await [`Flight::outcome`].
#[derive(Debug)]
pub struct Flight<T> {
    pub role: Role,
    receiver: Slot<T>,
}

impl<T: Clone> Flight<T> {
    /// The fetch's outcome, or `None` if the fetch task died without one.
    pub async fn outcome(mut self) -> Option<T> {
        self.receiver.wait_for(Option::is_some).await.ok().and_then(|v| v.clone())
    }
}

/// Removes the flight from the map when the fetch task ends, however it ends.
struct Landing<T> {
    flights: Arc<Flights<T>>,
    key: CacheKey,
}

impl<T> Drop for Landing<T> {
    fn drop(&mut self) {
        self.flights.in_flight.remove(&self.key);
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// Joins the flight for `key`, starting it with `fetch` if none is under way.
    pub fn join<F>(self: &Arc<Self>, key: CacheKey, fetch: impl FnOnce() -> F) -> Flight<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let sender = match self.in_flight.join(key) {
            Ok(sender) => sender,
            Err(receiver) => return Flight { role: Role::Follower, receiver },
        };
        let receiver = sender.subscribe();
        let landing = Landing { flights: Arc::clone(self), key };
        let fetch = fetch();
        tokio::spawn(async move {
            let outcome = fetch.await;
            // Leave the map first: whoever arrives from now on finds the result in the cache
            // (or, after an error, starts a fresh attempt) instead of this finished flight.
            drop(landing);
            let _ = sender.send(Some(outcome));
        });
        Flight { role: Role::Leader, receiver }
    }
}

/// Reads under way, by key: identical concurrent reads share one.
#[derive(Debug)]
pub struct SharedReads<T> {
    in_flight: InFlight<T>,
}

impl<T> Default for SharedReads<T> {
    fn default() -> Self {
        SharedReads { in_flight: InFlight::default() }
    }
}

/// The first caller's read, on the map until it is finished or dropped unfinished (its
/// caller went away); then the waiters, woken by the sender's end, read for themselves.
struct Reading<'a, T> {
    reads: &'a SharedReads<T>,
    key: CacheKey,
    sender: watch::Sender<Option<T>>,
    finished: bool,
}

impl<T> Reading<'_, T> {
    fn finish(mut self, value: T) {
        // Off the map before the waiters wake: a read from now on is a new one.
        self.reads.in_flight.remove(&self.key);
        self.finished = true;
        self.sender.send_replace(Some(value));
    }
}

impl<T> Drop for Reading<'_, T> {
    fn drop(&mut self) {
        // Unfinished, the entry is still ours: nobody else removes it.
        if !self.finished {
            self.reads.in_flight.remove(&self.key);
        }
    }
}

impl<T: Clone> SharedReads<T> {
    /// `read`'s result for `key`: this caller's own, or that of an identical read under way.
    pub async fn read<F: Future<Output = T>>(&self, key: CacheKey, read: impl FnOnce() -> F) -> T {
        match self.in_flight.join(key) {
            Ok(sender) => {
                let reading = Reading { reads: self, key, sender, finished: false };
                let value = read().await;
                reading.finish(value.clone());
                value
            }
            Err(mut receiver) => {
                let shared = receiver.wait_for(Option::is_some).await.ok().and_then(|value| value.clone());
                match shared {
                    Some(value) => value,
                    // The first caller went away without a result.
                    None => read().await,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_joins_share_one_fetch() {
        let flights = Arc::new(Flights::<u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let key = CacheKey::from_bytes([1; 32]);
        let mut joined = Vec::new();
        for _ in 0..50 {
            let runs = runs.clone();
            joined.push(flights.join(key, move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                7
            }));
        }
        let leaders = joined.iter().filter(|f| f.role == Role::Leader).count();
        assert_eq!(leaders, 1);
        for flight in joined {
            assert_eq!(flight.outcome().await, Some(7));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(flights.in_flight.is_empty());
    }

    #[tokio::test]
    async fn a_finished_flight_is_not_joined_again() {
        let flights = Arc::new(Flights::<u32>::default());
        let key = CacheKey::from_bytes([2; 32]);
        assert_eq!(flights.join(key, || async { 1 }).outcome().await, Some(1));
        let second = flights.join(key, || async { 2 });
        assert_eq!(second.role, Role::Leader);
        assert_eq!(second.outcome().await, Some(2));
    }

    #[tokio::test]
    async fn a_panicking_fetch_releases_its_waiters() {
        let flights = Arc::new(Flights::<u32>::default());
        let key = CacheKey::from_bytes([3; 32]);
        let flight = flights.join(key, || async { panic!("fetch failed") });
        assert_eq!(flight.outcome().await, None);
        assert!(flights.in_flight.is_empty());
    }

    #[tokio::test]
    async fn concurrent_reads_share_one() {
        let reads = Arc::new(SharedReads::<u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let key = CacheKey::from_bytes([5; 32]);
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let (reads, runs) = (Arc::clone(&reads), Arc::clone(&runs));
                tokio::spawn(async move {
                    reads
                        .read(key, || async {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            9
                        })
                        .await
                })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap(), 9);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(reads.in_flight.is_empty());
        // Finished: the next read is a new one.
        assert_eq!(reads.read(key, || async { 10 }).await, 10);
    }

    #[tokio::test]
    async fn when_the_first_reader_leaves_the_others_read_for_themselves() {
        let reads = Arc::new(SharedReads::<u32>::default());
        let key = CacheKey::from_bytes([6; 32]);
        let first = {
            let reads = Arc::clone(&reads);
            tokio::spawn(async move { reads.read(key, std::future::pending::<u32>).await })
        };
        tokio::task::yield_now().await;
        while reads.in_flight.is_empty() {
            tokio::task::yield_now().await;
        }
        let waiting = {
            let reads = Arc::clone(&reads);
            tokio::spawn(async move { reads.read(key, || async { 3 }).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Its own read would have finished at once: it is waiting for the first one.
        assert!(!waiting.is_finished(), "it waits for the first read");
        first.abort();
        assert_eq!(waiting.await.unwrap(), 3);
        assert!(reads.in_flight.is_empty());
    }

    #[tokio::test]
    async fn the_fetch_completes_when_its_callers_leave() {
        let flights = Arc::new(Flights::<u32>::default());
        let done = Arc::new(AtomicUsize::new(0));
        let key = CacheKey::from_bytes([4; 32]);
        let d = done.clone();
        drop(flights.join(key, move || async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            d.fetch_add(1, Ordering::SeqCst);
            1
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }
}

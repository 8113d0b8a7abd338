//! The followers on this replica, by key: each replica holds one subscription to
//! [`CHANNEL`] (opened by the store) and routes each announcement to the waiters of its key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use shared::keys::CacheKey;
use tokio::sync::{broadcast, mpsc};

use crate::store::{CHANNEL, bytes_of};

/// Routes each announcement (`cache key ‖ sealed message`) to the waiters of its key on this
/// replica, if any, until the registry is gone.
pub(super) async fn route(mut messages: broadcast::Receiver<fred::types::Message>, waiters: Weak<Waiters>) {
    loop {
        let message = match messages.recv().await {
            Ok(message) if &*message.channel == CHANNEL => message,
            Ok(_) => continue,
            // Messages were dropped for a slow reader: the followers' periodic look covers it.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(waiters) = waiters.upgrade() else { return };
        let Some(payload) = bytes_of(message.value) else { continue };
        if payload.len() < 32 {
            continue;
        }
        let key = CacheKey::from_bytes(payload[..32].try_into().expect("32 bytes"));
        waiters.deliver(&key, payload.slice(32..));
    }
}

/// The senders of one key's local waiters, each with its id.
type KeyWaiters = Vec<(u64, mpsc::Sender<Bytes>)>;

/// The local waiters, by key.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    by_key: Mutex<HashMap<CacheKey, KeyWaiters>>,
    next_id: AtomicU64,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, KeyWaiters>> {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn register(self: &Arc<Self>, key: CacheKey) -> Waiter {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel(4);
        self.lock().entry(key).or_default().push((id, sender));
        Waiter { key, id, receiver, waiters: Arc::clone(self) }
    }

    fn deliver(&self, key: &CacheKey, payload: Bytes) {
        if let Some(senders) = self.lock().get(key) {
            for (_, sender) in senders {
                let _ = sender.try_send(payload.clone());
            }
        }
    }

    fn remove(&self, key: &CacheKey, id: u64) {
        let mut by_key = self.lock();
        if let Some(senders) = by_key.get_mut(key) {
            senders.retain(|(i, _)| *i != id);
            if senders.is_empty() {
                by_key.remove(key);
            }
        }
    }
}

/// Receives the outcome messages of one key until dropped.
#[derive(Debug)]
pub struct Waiter {
    key: CacheKey,
    id: u64,
    receiver: mpsc::Receiver<Bytes>,
    waiters: Arc<Waiters>,
}

impl Waiter {
    /// The next message, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Bytes> {
        tokio::time::timeout(timeout, self.receiver.recv()).await.ok().flatten()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.waiters.remove(&self.key, self.id);
    }
}

//! Hyperline's `Idempotency-Key` rules, which are what make the worker's
//! retries safe: a successful answer is cached for 24 hours (the fault
//! setting `replay_ttl_secs`) and replayed for the same key and request; a second request with the key while the first is
//! still running gets `409`; reusing a key for a different method, URL or body
//! gets `417`; failures are not cached, so the key is free again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;

use super::state::Shared;

/// What identifies "the same request" for a key: method, URL and the exact
/// body bytes, as the real API compares them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) body: Bytes,
}

/// A successful answer kept for replay, byte for byte.
#[derive(Clone, Debug)]
pub(crate) struct CachedResponse {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
}

/// The outcome of presenting a key.
pub(crate) enum Claim {
    /// Unknown key: the caller now owns it (see [`InProgressGuard`]).
    Fresh(u64),
    /// Same key and request succeeded before: answer the cached response.
    Replay(CachedResponse),
    /// Same key and request still running: `409`.
    InProgress,
    /// Same key, different request: `417`.
    Mismatch,
}

enum Slot {
    InProgress {
        fingerprint: Fingerprint,
        token: u64,
    },
    Done {
        fingerprint: Fingerprint,
        response: CachedResponse,
        expires: Instant,
    },
}

/// Keys seen, each either in progress or with its cached success.
#[derive(Default)]
pub(crate) struct IdempotencyStore {
    slots: HashMap<String, Slot>,
    next_token: u64,
}

impl IdempotencyStore {
    /// Looks the key up and, when it is unknown (or its cache expired),
    /// marks it in progress for this request.
    pub(crate) fn claim(&mut self, key: &str, fingerprint: &Fingerprint, now: Instant) -> Claim {
        match self.slots.get(key) {
            Some(Slot::Done {
                fingerprint: seen,
                response,
                expires,
            }) if *expires > now => {
                if seen == fingerprint {
                    Claim::Replay(response.clone())
                } else {
                    Claim::Mismatch
                }
            }
            Some(Slot::InProgress {
                fingerprint: seen, ..
            }) => {
                if seen == fingerprint {
                    Claim::InProgress
                } else {
                    Claim::Mismatch
                }
            }
            _ => {
                self.next_token += 1;
                let token = self.next_token;
                self.slots.insert(
                    key.to_owned(),
                    Slot::InProgress {
                        fingerprint: fingerprint.clone(),
                        token,
                    },
                );
                Claim::Fresh(token)
            }
        }
    }

    /// Replaces this request's in-progress mark with its cached success,
    /// replayed for `ttl` from `now`.
    fn complete(
        &mut self,
        key: &str,
        token: u64,
        response: CachedResponse,
        now: Instant,
        ttl: Duration,
    ) {
        if let Some(slot) = self.slots.get_mut(key)
            && let Slot::InProgress {
                fingerprint,
                token: owner,
            } = slot
            && *owner == token
        {
            *slot = Slot::Done {
                fingerprint: fingerprint.clone(),
                response,
                expires: now + ttl,
            };
        }
    }

    /// Removes this request's in-progress mark, freeing the key.
    fn release(&mut self, key: &str, token: u64) {
        if matches!(self.slots.get(key), Some(Slot::InProgress { token: owner, .. }) if *owner == token)
        {
            self.slots.remove(key);
        }
    }
}

/// Owns a key's in-progress mark for the life of one request. If the request
/// ends without success, including when its handler future is dropped because
/// the client disconnected or the simulator shut down, the mark is removed so
/// a retry is processed instead of meeting `409` forever.
pub(crate) struct InProgressGuard {
    shared: Arc<Shared>,
    key: String,
    token: u64,
    completed: bool,
}

impl InProgressGuard {
    pub(crate) fn new(shared: Arc<Shared>, key: String, token: u64) -> InProgressGuard {
        InProgressGuard {
            shared,
            key,
            token,
            completed: false,
        }
    }

    /// Stores the success for replay; the key stays taken for the
    /// `replay_ttl_secs` in force now (24 hours unless a test shortened it).
    pub(crate) fn complete(mut self, response: CachedResponse) {
        let mut inner = self.shared.lock();
        let ttl = Duration::from_secs(inner.faults.replay_ttl_secs);
        inner
            .idempotency
            .complete(&self.key, self.token, response, Instant::now(), ttl);
        drop(inner);
        self.completed = true;
    }
}

impl Drop for InProgressGuard {
    fn drop(&mut self) {
        if !self.completed {
            self.shared
                .lock()
                .idempotency
                .release(&self.key, self.token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::faults::Faults;

    fn fingerprint(body: &'static str) -> Fingerprint {
        Fingerprint {
            method: "POST".to_owned(),
            path: "/v1/customers/c/credits/p/purchase".to_owned(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    fn claim(shared: &Shared, body: &'static str, at: Instant) -> Claim {
        shared
            .lock()
            .idempotency
            .claim("key-0000000000000001", &fingerprint(body), at)
    }

    fn take(shared: &Arc<Shared>, body: &'static str) -> InProgressGuard {
        match claim(shared, body, Instant::now()) {
            Claim::Fresh(token) => {
                InProgressGuard::new(Arc::clone(shared), "key-0000000000000001".to_owned(), token)
            }
            _ => panic!("the key should be free"),
        }
    }

    #[test]
    fn a_dropped_guard_frees_the_key_and_a_completed_one_replays_for_24_hours() {
        let ttl = Duration::from_secs(Faults::default().replay_ttl_secs);
        assert_eq!(ttl, Duration::from_secs(24 * 60 * 60), "Hyperline's window");
        let shared = Arc::new(Shared::new("k".to_owned(), Faults::default(), Some(1)));
        let now = Instant::now();

        let abandoned = take(&shared, "a");
        assert!(matches!(claim(&shared, "a", now), Claim::InProgress));
        assert!(matches!(claim(&shared, "b", now), Claim::Mismatch));
        drop(abandoned);

        let answer = Bytes::from_static(b"{}");
        take(&shared, "a").complete(CachedResponse {
            status: StatusCode::CREATED,
            body: answer.clone(),
        });
        assert!(matches!(claim(&shared, "a", now), Claim::Replay(r) if r.body == answer));
        assert!(matches!(claim(&shared, "b", now), Claim::Mismatch));
        let later = Instant::now() + ttl + Duration::from_secs(1);
        assert!(matches!(claim(&shared, "b", later), Claim::Fresh(_)));
    }
}

//! The simulator's memory: the ledger of charges (the evidence that no command
//! was charged twice), the log of requests (what the worker actually sent:
//! keys, auth, trace context), credit balances, the idempotency store, the
//! rate-limit window and the random source for fault rolls. All of it sits
//! behind one std mutex that is only held for short, non-async sections.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::faults::Faults;
use super::idempotency::IdempotencyStore;

/// Everything the simulator charged and counted since it started.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ledger {
    pub charges: Vec<Charge>,
    /// Every purchase request, whatever its answer.
    pub requests: u64,
    /// Successful answers replayed from the idempotency cache.
    pub replayed: u64,
    /// `409`s given because the same key was still in progress.
    pub conflicts: u64,
    /// `429`s given by the rate limit.
    pub rate_limited: u64,
    /// Injected 5xx answers, hangs and dropped connections.
    pub faults: u64,
    /// Requests to the credit-transactions route, whatever their answer.
    #[serde(default)]
    pub reads: u64,
}

impl Ledger {
    /// How many charges were made under this idempotency key; a correct
    /// worker never makes this exceed 1.
    pub fn charges_for(&self, key: &str) -> usize {
        self.charges
            .iter()
            .filter(|charge| charge.idempotency_key.as_deref() == Some(key))
            .count()
    }
}

/// One purchase the simulator carried out.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Charge {
    pub idempotency_key: Option<String>,
    pub customer_id: String,
    pub product_id: String,
    pub credit_count: u64,
    pub amount_excluding_tax: Option<u64>,
    pub price_id: Option<String>,
    pub invoice_id: String,
    pub new_credit_balance: u64,
}

/// One credit transaction, as Hyperline lists it under
/// `GET /v1/customers/{id}/credits/{productId}/transactions`: every charge
/// the simulator makes is a `topup` from the `api`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Transaction {
    /// `cdt_…`.
    pub id: String,
    pub customer_id: String,
    pub product_id: String,
    /// The invoice of the purchase.
    pub invoice_id: String,
    pub credit_count: u64,
    /// The amount sent with the purchase; null for a purchase by price (the
    /// simulator has no price catalogue to compute it from).
    pub amount_excluding_tax: Option<u64>,
    /// The price a purchase by price used; null for a purchase by amount.
    pub price: Option<TransactionPrice>,
    /// Always `topup` here (Hyperline also lists consumptions, expiries...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Always `api` here.
    pub source: String,
    /// The customer's balance of this product right after the transaction.
    pub balance_after: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// `price` of a transaction. The simulator knows a price only by its id, so
/// `amount` and `pack_size` are null.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransactionPrice {
    pub id: String,
    pub amount: Option<u64>,
    pub pack_size: Option<u64>,
}

/// What arrived on the purchase route, so tests can check the worker's
/// headers (key reuse across retries, auth, trace propagation). The
/// Authorization value itself is never kept, only whether it was right.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    pub authorization_ok: bool,
    pub traceparent: Option<String>,
    /// `None` while unanswered, and for good when the request hung, its
    /// connection was dropped, or the client went away first.
    pub status: Option<u16>,
}

/// The state shared by all connections.
pub(crate) struct Shared {
    pub(crate) api_key: String,
    inner: Mutex<Inner>,
}

pub(crate) struct Inner {
    pub(crate) faults: Faults,
    pub(crate) ledger: Ledger,
    pub(crate) requests: Vec<RequestRecord>,
    pub(crate) balances: HashMap<(String, String), u64>,
    /// Every charge as a credit transaction, in order of `created_at`.
    pub(crate) transactions: Vec<Transaction>,
    pub(crate) idempotency: IdempotencyStore,
    /// The write budget (purchases).
    pub(crate) window: RateWindow,
    /// The read budget (transaction listings), counted apart as Hyperline does.
    pub(crate) read_window: RateWindow,
    pub(crate) rng: StdRng,
}

impl Shared {
    pub(crate) fn new(api_key: String, faults: Faults, seed: Option<u64>) -> Shared {
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Shared {
            api_key,
            inner: Mutex::new(Inner {
                faults,
                ledger: Ledger {
                    charges: Vec::new(),
                    requests: 0,
                    replayed: 0,
                    conflicts: 0,
                    rate_limited: 0,
                    faults: 0,
                    reads: 0,
                },
                requests: Vec::new(),
                balances: HashMap::new(),
                transactions: Vec::new(),
                idempotency: IdempotencyStore::default(),
                window: RateWindow::new(Instant::now()),
                read_window: RateWindow::new(Instant::now()),
                rng,
            }),
        }
    }

    /// Locks the state. A panic while the lock was held cannot leave it
    /// half-updated in a way that matters to a test double, so a poisoned
    /// lock is simply taken over.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    /// A fresh invoice id drawn from the simulator's random source, so a
    /// seeded run produces the same ids every time.
    pub(crate) fn invoice_id(&mut self) -> String {
        let bytes: [u8; 16] = self.rng.random();
        format!(
            "inv_{}",
            uuid::Builder::from_random_bytes(bytes).into_uuid().simple()
        )
    }

    /// A fresh credit-transaction id, from the same seeded source.
    pub(crate) fn transaction_id(&mut self) -> String {
        let bytes: [u8; 16] = self.rng.random();
        format!(
            "cdt_{}",
            uuid::Builder::from_random_bytes(bytes).into_uuid().simple()
        )
    }
}

/// The answer of the rate limiter for one request.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RateDecision {
    /// The limit is turned off: no headers, no throttling.
    Off,
    /// The request may proceed (or, for a peek, would have been counted).
    Allowed {
        limit: u32,
        remaining: u32,
        reset_in: Duration,
    },
    /// Over the limit: `429` with `Retry-After`.
    Limited { limit: u32, reset_in: Duration },
}

/// A fixed window, like Hyperline's "50 writes per 10 seconds" (or "200
/// reads"): it starts at the first request after the previous one ended and
/// admits `limit` requests.
pub(crate) struct RateWindow {
    started: Instant,
    used: u32,
}

impl RateWindow {
    fn new(now: Instant) -> RateWindow {
        RateWindow {
            started: now,
            used: 0,
        }
    }

    /// Counts one write if the budget allows it. A refused write does not
    /// consume budget, so a client that keeps retrying is not punished twice.
    pub(crate) fn admit(&mut self, faults: &Faults, now: Instant) -> RateDecision {
        self.decide(faults.rate_limit, faults, now, true)
    }

    /// The window's state without counting anything, for the headers of
    /// answers given before the limit is applied (scripted ones).
    pub(crate) fn peek(&mut self, faults: &Faults, now: Instant) -> RateDecision {
        self.decide(faults.rate_limit, faults, now, false)
    }

    /// [`RateWindow::admit`] for a read, against `read_rate_limit`.
    pub(crate) fn admit_read(&mut self, faults: &Faults, now: Instant) -> RateDecision {
        self.decide(faults.read_rate_limit, faults, now, true)
    }

    fn decide(&mut self, limit: u32, faults: &Faults, now: Instant, count: bool) -> RateDecision {
        if limit == 0 {
            return RateDecision::Off;
        }
        let window = Duration::from_millis(faults.rate_limit_window_ms);
        if now.duration_since(self.started) >= window {
            *self = RateWindow::new(now);
        }
        let reset_in = (self.started + window).saturating_duration_since(now);
        if self.used >= limit {
            return RateDecision::Limited { limit, reset_in };
        }
        if count {
            self.used += 1;
        }
        RateDecision::Allowed {
            limit,
            remaining: limit - self.used,
            reset_in,
        }
    }
}

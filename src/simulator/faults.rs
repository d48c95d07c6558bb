//! The simulator's knobs: latency, injected failures, the rate limit, the
//! credential switch and scripted answers. They exist so that every failure
//! mode the worker must survive (slow calls, 5xx, answers lost after the charge,
//! throttling, a revoked key, odd status codes) can be produced on demand,
//! reproducibly, and changed while the simulator runs (`POST /_sim/faults`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Current fault settings. Rates are probabilities from 0 to 1, rolled once
/// per request that passes authentication, scripting and the rate limit.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Faults {
    /// Added before the charge while the request is marked in progress, so a
    /// retry of the same key meets Hyperline's `409` ("can take a few seconds").
    pub latency_ms: u64,
    /// Uniform extra latency in `0..=latency_jitter_ms`, to spread response
    /// times the way a real backend does (benchmarks, timeout tuning).
    pub latency_jitter_ms: u64,
    /// Chance of a 500/502/503 answered before anything is processed: nothing
    /// is charged and the idempotency key stays free, as with a failed gateway.
    pub fail_rate: f64,
    /// Chance that the charge is made and then no answer ever comes: the
    /// client times out without knowing the outcome and must retry the key.
    pub hang_rate: f64,
    /// Chance that the charge is made and then the TCP connection is closed
    /// without a response: the same uncertainty as a hang, but immediate.
    pub drop_rate: f64,
    /// How long a hung request stays silent before its connection is closed.
    pub hang_secs: u64,
    /// Writes allowed per window (Hyperline: 50 per 10 s); `0` turns it off.
    pub rate_limit: u32,
    /// Reads allowed per window (Hyperline: 200 per 10 s), counted apart
    /// from writes; `0` turns it off.
    pub read_rate_limit: u32,
    /// Window length of both limits; tests shorten it to see a reset quickly.
    pub rate_limit_window_ms: u64,
    /// Answer `401` to every purchase, as when the API key has been revoked,
    /// so the worker's credential-fault handling can be exercised.
    pub reject_auth: bool,
    /// Canned answers for statuses the simulator never produces by itself
    /// (403, 422, a malformed 2xx, an HTML error page...).
    pub scripted: Vec<ScriptedResponse>,
    /// Canned answers given *after* a matching purchase is charged (and its
    /// real answer cached for replay), in place of that answer: a 201 whose
    /// body was mangled on the way, the case that leaves the worker unsure
    /// whether the customer was charged (`unexpected_response`).
    pub after_charge: Vec<ScriptedResponse>,
    /// How long a success is replayed for its key (Hyperline: 24 hours),
    /// fixed when the success is cached. A short one lets a test show what
    /// happens once Hyperline has forgotten a key: the same request is a new
    /// purchase.
    pub replay_ttl_secs: u64,
    /// List credit transactions without their `invoice_id`, as a Hyperline
    /// answer missing a field would: a possible charge the reconciliation
    /// must not take for "not charged".
    pub listing_omits_invoices: bool,
    /// Fields set on every listed credit transaction (`null` removes a
    /// value), as an API whose shapes drifted would list them: `{"source":
    /// "API"}`, or a `price` in place of `amount_excluding_tax`. A charge
    /// listed so must never read as "not charged".
    pub listing_patch: serde_json::Map<String, serde_json::Value>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency_ms: 0,
            latency_jitter_ms: 0,
            fail_rate: 0.0,
            hang_rate: 0.0,
            drop_rate: 0.0,
            hang_secs: 3600,
            rate_limit: 50,
            read_rate_limit: 200,
            rate_limit_window_ms: 10_000,
            reject_auth: false,
            scripted: Vec::new(),
            after_charge: Vec::new(),
            replay_ttl_secs: 24 * 60 * 60,
            listing_omits_invoices: false,
            listing_patch: serde_json::Map::new(),
        }
    }
}

/// A canned answer given instead of processing a matching purchase request
/// (in `scripted`: nothing is charged and nothing is cached for replay), or
/// instead of the answer of a charge (in `after_charge`).
///
/// A `body` that is a JSON string is sent verbatim (as `text/plain` unless
/// `headers` say otherwise), so a test can script a non-JSON answer such as a
/// proxy's HTML error page; any other value is sent as JSON.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ScriptedResponse {
    /// Only requests for this customer match; `None` matches every request.
    pub customer_id: Option<String>,
    pub status: u16,
    pub body: serde_json::Value,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How many requests this answers before it is used up; `None` = forever.
    pub times: Option<u32>,
}

/// A partial update of [`Faults`]: only the fields given change (`scripted`,
/// when given, replaces the whole list). This is the body of
/// `POST /_sim/faults`, so a test or an operator can turn one fault on without
/// restating the others.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct FaultsPatch {
    pub latency_ms: Option<u64>,
    pub latency_jitter_ms: Option<u64>,
    pub fail_rate: Option<f64>,
    pub hang_rate: Option<f64>,
    pub drop_rate: Option<f64>,
    pub hang_secs: Option<u64>,
    pub rate_limit: Option<u32>,
    pub read_rate_limit: Option<u32>,
    pub rate_limit_window_ms: Option<u64>,
    pub reject_auth: Option<bool>,
    pub scripted: Option<Vec<ScriptedResponse>>,
    pub after_charge: Option<Vec<ScriptedResponse>>,
    pub replay_ttl_secs: Option<u64>,
    pub listing_omits_invoices: Option<bool>,
    pub listing_patch: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Faults {
    /// Overwrites the fields the patch gives and leaves the others alone.
    pub fn apply(&mut self, patch: FaultsPatch) {
        let FaultsPatch {
            latency_ms,
            latency_jitter_ms,
            fail_rate,
            hang_rate,
            drop_rate,
            hang_secs,
            rate_limit,
            read_rate_limit,
            rate_limit_window_ms,
            reject_auth,
            scripted,
            after_charge,
            replay_ttl_secs,
            listing_omits_invoices,
            listing_patch,
        } = patch;
        set(&mut self.latency_ms, latency_ms);
        set(&mut self.latency_jitter_ms, latency_jitter_ms);
        set(&mut self.fail_rate, fail_rate);
        set(&mut self.hang_rate, hang_rate);
        set(&mut self.drop_rate, drop_rate);
        set(&mut self.hang_secs, hang_secs);
        set(&mut self.rate_limit, rate_limit);
        set(&mut self.read_rate_limit, read_rate_limit);
        set(&mut self.rate_limit_window_ms, rate_limit_window_ms);
        set(&mut self.reject_auth, reject_auth);
        set(&mut self.scripted, scripted);
        set(&mut self.after_charge, after_charge);
        set(&mut self.replay_ttl_secs, replay_ttl_secs);
        set(&mut self.listing_omits_invoices, listing_omits_invoices);
        set(&mut self.listing_patch, listing_patch);
    }

    /// Checks that every rate is a probability, so a typo in a `POST
    /// /_sim/faults` body is refused instead of silently meaning "always" or
    /// "never".
    pub(crate) fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("fail_rate", self.fail_rate),
            ("hang_rate", self.hang_rate),
            ("drop_rate", self.drop_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        Ok(())
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

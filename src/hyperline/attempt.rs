//! One attempt of a delivery, as [`backon`] retries it: admitted by the
//! replica's key, the command's window, the delivery's deadline and the
//! gate; sent with its span, tally and metrics; its answer's quota taken in
//! by the gate. A 429 goes round inside the attempt, not through backon:
//! waiting on the rate limit is Hyperline asking to wait, not a failed
//! attempt, so it never uses one up (nor, past the deadline, a delay step:
//! see [`Tally::out_of_time`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::account::Account;
use super::admission::Place;
use super::gate::{Gate, Permit};
use super::verdict::{Attempted, Bounds, Retry, RetryReason, Step, Verdict, step, window_open};
use super::{PurchaseResponse, Quota};
use crate::clock::now_ms;
use crate::configuration::RetrySettings;
use crate::contract::Command;
use crate::operations::Metrics;
use crate::operations::metrics::ReasonLabel;
use crate::telemetry;

/// Shared by the retry loop of every command of a replica.
pub struct RetryContext<'a> {
    /// The account: client, write gate, credentials.
    pub account: &'a Account,
    /// The command's place in the lines in front of the write gate.
    pub place: Place<'a>,
    pub settings: &'a RetrySettings,
    /// The total deadline of one request.
    pub request_timeout: Duration,
    /// Requests, retries and rate-limit waits are counted here.
    pub metrics: &'a Metrics,
    /// Cancelled when the replica stops.
    pub cancel: &'a CancellationToken,
}

/// The attempts of one delivery: what they share and what they learned.
pub(super) struct Attempt<'a> {
    ctx: &'a RetryContext<'a>,
    command: &'a Command,
    traceparent: Option<&'a str>,
    bounds: Bounds,
    /// No request starts after this: it could end after the deadline.
    latest_start: Instant,
    /// The backoff's floor, and the wait of a 429 that names none.
    floor: Duration,
    /// The longest rate-limit wait a delivery is held in process.
    max_rate_wait: Duration,
    /// The wait after a 409.
    conflict_delay: Duration,
    tally: Tally,
}

/// A request allowed to go: its gate permit and, while the key is on
/// trial, the trial's turn, both held until its answer is taken in.
pub(super) struct Admitted<'a> {
    permit: Permit<'a>,
    _trial: Option<tokio::sync::MutexGuard<'a, ()>>,
}

impl<'a> Attempt<'a> {
    /// The attempts of `command` within `bounds`.
    pub(super) fn new(
        ctx: &'a RetryContext<'a>,
        command: &'a Command,
        traceparent: Option<&'a str>,
        bounds: Bounds,
    ) -> Self {
        let settings = ctx.settings;
        Attempt {
            ctx,
            command,
            traceparent,
            bounds,
            latest_start: bounds
                .deadline
                .checked_sub(ctx.request_timeout)
                .unwrap_or(bounds.deadline),
            floor: settings.initial_backoff(),
            max_rate_wait: settings.max_rate_limit_wait(),
            conflict_delay: settings.conflict_delay(),
            tally: Tally::default(),
        }
    }

    /// The backoff's floor.
    pub(super) fn floor(&self) -> Duration {
        self.floor
    }

    /// One attempt as backon sees it: requests until an answer that is not
    /// a 429 waited on in process.
    pub(super) async fn run(&self) -> Result<Verdict, Retry> {
        loop {
            let admitted = match self.admit().await {
                Ok(admitted) => admitted,
                Err(verdict) => return Ok(verdict),
            };
            let response = self.send().await;
            self.absorb_quota(admitted.permit, &response);
            match step(response.answer, self.conflict_delay) {
                Step::Done(verdict) => return Ok(verdict),
                Step::Retry(retry) if retry.reason == RetryReason::RateLimited => {
                    if let Some(verdict) = self.hold_back(&retry) {
                        return Ok(verdict);
                    }
                }
                Step::Retry(retry) => return Err(self.failed(retry)),
            }
        }
    }

    /// Whether a request may go now: the key, the command's window and the
    /// delivery's deadline are checked before the trial and the gate, and
    /// the key and the deadline again after them (both may have changed
    /// while it waited).
    async fn admit(&self) -> Result<Admitted<'a>, Verdict> {
        let (credentials, gate) = (&self.ctx.account.credentials, &self.ctx.account.writes);
        if credentials.is_faulted() {
            return Err(Verdict::CredentialFault);
        }
        if let Some(first) = self
            .bounds
            .first_attempt_ms
            .or_else(|| self.tally.first_sent())
            && !window_open(
                first,
                now_ms(),
                self.bounds.window,
                self.ctx.request_timeout,
            )
        {
            return Err(Verdict::WindowClosed {
                first_attempt_ms: first,
            });
        }
        if Instant::now() >= self.latest_start {
            return Err(self.tally.out_of_time(gate));
        }
        // After a refused key came back, one request proves it first.
        let Ok(trial) = tokio::time::timeout_at(self.latest_start, credentials.trial()).await
        else {
            return Err(self.tally.out_of_time(gate));
        };
        // The turn is held until the gate admits: the gate's order is the
        // lanes'. The slot, once open, goes to whoever's turn comes first
        // then (see `admission`).
        let admission = async {
            let turn = self.ctx.place.turn().await.at_open_slot(gate).await;
            let permit = gate.admit().await;
            turn.admitted();
            permit
        };
        let Ok(permit) = tokio::time::timeout_at(self.latest_start, admission).await else {
            return Err(self.tally.out_of_time(gate));
        };
        if credentials.is_faulted() {
            return Err(Verdict::CredentialFault);
        }
        // A gate open at once is admitted even past the instant: look again.
        if Instant::now() > self.latest_start {
            return Err(self.tally.out_of_time(gate));
        }
        Ok(Admitted {
            permit,
            _trial: trial,
        })
    }

    /// One request, on its client span, counted in the tally and the
    /// metrics; its status told to the replica's credentials.
    async fn send(&self) -> PurchaseResponse {
        let attempt = self.tally.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let sent_ms = now_ms();
        let sent = std::time::Instant::now();
        // Counted as the window's start before the request leaves: if the
        // replica stops while it is out, it may have charged.
        let opens_window = self.tally.open_window(sent_ms);
        let span = client_span(attempt);
        let exported = telemetry::exported_traceparent(&span);
        let response = self
            .ctx
            .account
            .client
            .purchase(self.command, exported.as_deref().or(self.traceparent))
            .instrument(span.clone())
            .await;
        record_answer(&span, &response);
        let exemplar = exported.as_deref().and_then(telemetry::sampled_trace_id);
        self.ctx
            .metrics
            .hyperline_request(response.status_class(), sent.elapsed(), exemplar);
        *Tally::lock(&self.tally.last) = (Some(sent_ms), response.status);
        if opens_window && !response.may_have_charged() {
            *Tally::lock(&self.tally.first_sent_ms) = None;
        }
        self.ctx.account.credentials.heard(&response);
        response
    }

    /// What the answer's rate-limit headers announced paces the replica's
    /// next requests (never for longer than a rate-limit wait may last in
    /// process). An answer without them says the API announces none,
    /// unless it may not come from the API itself (a gateway's 5xx, an
    /// authentication failure, a 429).
    fn absorb_quota(&self, permit: Permit<'_>, response: &PurchaseResponse) {
        match (response.status, response.quota) {
            (Some(_), Some(quota)) => permit.answered(Some(Quota {
                reset_after: quota.reset_after.min(self.max_rate_wait),
                ..quota
            })),
            (Some(_), None) if response.speaks_for_the_api() => permit.answered(None),
            _ => drop(permit),
        }
        if let Some(quota) = response.quota.filter(|q| q.remaining == 0) {
            // The window is spent: wait for its reset instead of collecting 429s.
            let _ = self.pause(quota.reset_after.min(self.max_rate_wait));
        }
    }

    /// A 429. The quota is the account's: every request of the replica
    /// holds back for as long as the answer asks, up to the gate's longest
    /// pause, paused here and nowhere else. A wait too long to hold the
    /// delivery (RabbitMQ's consumer timeout would close the channel) ends
    /// the attempts: a delay queue waits instead, chosen by the capped wait
    /// (an absurd `Retry-After` parks the command no longer than a sane
    /// long one). Otherwise the gate holds the next request until the wait
    /// is over.
    fn hold_back(&self, retry: &Retry) -> Option<Verdict> {
        self.tally.rate_limited.store(true, Ordering::Relaxed);
        let wait = self.pause(retry.wait.unwrap_or(self.floor));
        if wait > self.max_rate_wait {
            return Some(Verdict::RateLimited { wait });
        }
        note_retry(self.ctx, retry);
        None
    }

    /// Holds every request of the replica for `wait` (at most the gate's
    /// longest pause), counted; the pause made.
    fn pause(&self, wait: Duration) -> Duration {
        let paused = self.ctx.account.writes.pause_for(wait);
        self.ctx.metrics.rate_limit_wait(paused);
        paused
    }

    /// A failed attempt, remembered as the delivery's last failure.
    fn failed(&self, retry: Retry) -> Retry {
        self.tally.rate_limited.store(false, Ordering::Relaxed);
        *Tally::lock(&self.tally.last_failure) = Some((retry.status, retry.detail.clone()));
        retry
    }

    /// What the attempts learned, with how they ended.
    pub(super) fn finish(&self, verdict: Verdict) -> Attempted {
        let (last_sent_ms, last_status) = *Tally::lock(&self.tally.last);
        Attempted {
            verdict,
            requests: self.tally.requests.load(Ordering::Relaxed),
            first_sent_ms: self.tally.first_sent(),
            last_sent_ms,
            last_status,
        }
    }
}

/// What the attempts learned, kept outside the retried future so that an
/// interrupted delivery still reports it.
#[derive(Default)]
struct Tally {
    requests: AtomicU32,
    first_sent_ms: Mutex<Option<u64>>,
    last: Mutex<(Option<u64>, Option<u16>)>,
    last_failure: Mutex<Option<(Option<u16>, String)>>,
    /// The latest answer was a 429.
    rate_limited: AtomicBool,
}

impl Tally {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        // Plain values, each written whole: a poisoned lock is still usable.
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn first_sent(&self) -> Option<u64> {
        *Self::lock(&self.first_sent_ms)
    }

    /// Takes `sent_ms` as the window's start if none is known yet; whether
    /// it did.
    fn open_window(&self, sent_ms: u64) -> bool {
        let mut first = Self::lock(&self.first_sent_ms);
        let opens = first.is_none();
        if opens {
            *first = Some(sent_ms);
        }
        opens
    }

    /// The verdict of a delivery whose deadline came before its next
    /// request. Waiting on a 429 is not a failure: such a delivery waits in
    /// the broker without using a step.
    fn out_of_time(&self, gate: &Gate) -> Verdict {
        if self.rate_limited.load(Ordering::Relaxed) {
            return Verdict::Held {
                paused_for: gate.paused_for(),
            };
        }
        match Self::lock(&self.last_failure).clone() {
            Some((last_status, last_error)) => Verdict::Exhausted {
                last_status,
                last_error: format!("{last_error} (the delivery's deadline came)"),
            },
            None => Verdict::Held {
                paused_for: gate.paused_for(),
            },
        }
    }
}

/// The client span of one HTTP attempt (`attempt` is 1-based), disabled
/// unless spans are exported; the client records the URL on it.
fn client_span(attempt: u32) -> tracing::Span {
    tracing::info_span!(
        target: telemetry::SPANS,
        "POST",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = "POST",
        http.request.resend_count = attempt.checked_sub(1).filter(|n| *n > 0),
        attempt,
        url.full = tracing::field::Empty,
        server.address = tracing::field::Empty,
        server.port = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// The answer of an attempt, on its client span: the status, and what went
/// wrong (the status for a 4xx/5xx, the cause when no answer came).
fn record_answer(span: &tracing::Span, response: &PurchaseResponse) {
    if span.is_disabled() {
        return;
    }
    if let Some(status) = response.status {
        span.record("http.response.status_code", status);
    }
    let error = match response.status {
        Some(status @ 400..) => Some(status.to_string()),
        Some(_) => None,
        None => Some(response.status_class().to_owned()),
    };
    if let Some(error) = error {
        span.record("error.type", error);
        span.record("otel.status_code", "error");
    }
}

/// One line and one count per retry.
pub(super) fn note_retry(ctx: &RetryContext<'_>, retry: &Retry) {
    let reason = retry.reason.as_str();
    tracing::info!(reason, detail = %retry.detail, "retrying the purchase");
    ctx.metrics
        .retries
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::configuration::{ApiKey, Settings};
    use crate::hyperline::{HyperlineClient, PurchaseAnswer};
    use crate::operations::Metrics;

    const BODY: &[u8] = br#"{"command_id":"cmd_attempt_unit_test","customer_id":"cus_Typ0px2W0aiEtl","product_id":"itm_3kXODDF42QXtnL","credit_count":32,"amount_excluding_tax":24000}"#;

    /// The pause a 429 asks for is the attempt's to make: the whole replica
    /// holds back, and a wait too long for the delivery ends its attempts.
    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_pauses_the_replica_and_a_long_one_ends_the_attempts() {
        let settings = Settings::load_from(None, []).expect("defaults");
        let client = HyperlineClient::new(&settings.hyperline, ApiKey::new("unit-test-key"))
            .expect("client");
        let metrics = Metrics::new();
        let account = Account::new(client, &settings, &metrics);
        let gate = &account.writes;
        let cancel = CancellationToken::new();
        let ctx = RetryContext {
            account: &account,
            place: Place {
                admission: &account.admission,
                lane: 0,
                since_secs: 0,
            },
            settings: &settings.retry,
            request_timeout: Duration::from_secs(30),
            metrics: &metrics,
            cancel: &cancel,
        };
        let command = Command::parse(BODY, None).expect("a valid command");
        let bounds = Bounds {
            deadline: Instant::now() + Duration::from_secs(600),
            first_attempt_ms: None,
            window: Duration::from_secs(24 * 3600),
        };
        let attempt = Attempt::new(&ctx, &command, None, bounds);
        let retry_for = |wait| match step(
            PurchaseAnswer::RateLimited { wait: Some(wait) },
            attempt.conflict_delay,
        ) {
            Step::Retry(retry) => retry,
            Step::Done(verdict) => panic!("a 429 ended the attempts: {verdict:?}"),
        };
        let short = Duration::from_secs(2);
        assert_eq!(
            attempt.hold_back(&retry_for(short)),
            None,
            "waited in process"
        );
        assert_eq!(gate.paused_for(), short);
        let long = attempt.max_rate_wait + Duration::from_secs(10);
        assert_eq!(
            attempt.hold_back(&retry_for(long)),
            Some(Verdict::RateLimited { wait: long })
        );
        assert_eq!(gate.paused_for(), long, "the replica is paused as asked");
        let longest = settings.longest_rate_limit_pause();
        assert_eq!(
            attempt.hold_back(&retry_for(Duration::from_secs(u64::MAX))),
            Some(Verdict::RateLimited { wait: longest }),
            "an absurd wait parks the command as the longest pause would"
        );
        assert_eq!(
            gate.paused_for(),
            longest,
            "and pauses the replica no longer"
        );
        assert_eq!(metrics.rate_limit_waits.get(), 3);
    }
}

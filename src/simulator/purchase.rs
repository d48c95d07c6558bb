//! `POST /v1/customers/{customer_id}/credits/{product_id}/purchase`, processed
//! in the order a real gateway and API would: record, authenticate, scripted
//! answer, rate limit, injected 5xx, validation, idempotency, latency, charge
//! (with its credit transaction), and finally the answer, a scripted answer in
//! its place, a hang or a dropped connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use rand::Rng;

use super::faults::ScriptedResponse;
use super::idempotency::{CachedResponse, Claim, Fingerprint, InProgressGuard};
use super::reply;
use super::server::DropConnection;
use super::state::{
    Charge, Inner, RateDecision, RequestRecord, Shared, Transaction, TransactionPrice,
};
use super::validation::{Purchase, parse_purchase, valid_id};

/// Bodies are a few dozen bytes; anything near this is not a purchase.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Hyperline refuses shorter idempotency keys.
const MIN_KEY_CHARS: usize = 16;

/// What happens after a charge, decided by the fault roll before it.
enum AfterCharge {
    Answer,
    /// An `after_charge` script answers instead of the real answer.
    Scripted(ScriptedResponse),
    Hang(Duration),
    Drop,
}

/// A request that passed auth, scripting, the rate limit and the 5xx roll.
struct Admitted {
    rate: RateDecision,
    latency: Duration,
    after: AfterCharge,
}

/// The outcome of the synchronous gate in front of the processing.
enum Gate {
    Admitted(Admitted),
    Answered(Response),
}

/// The route handler: records the request, processes it and notes the status
/// it was answered with (none when hung or dropped).
pub(crate) async fn purchase(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let key = header(&parts.headers, "idempotency-key");
    let expected = format!("Bearer {}", shared.api_key);
    let authorization_ok = parts
        .headers
        .get(AUTHORIZATION)
        .is_some_and(|value| value.as_bytes() == expected.as_bytes());
    let index = {
        let mut inner = shared.lock();
        inner.ledger.requests += 1;
        inner.requests.push(RequestRecord {
            method: parts.method.to_string(),
            path: path.clone(),
            idempotency_key: key.clone(),
            authorization_ok,
            traceparent: header(&parts.headers, "traceparent"),
            status: None,
        });
        inner.requests.len() - 1
    };

    let response = match admit(&shared, &path, authorization_ok) {
        Gate::Admitted(admitted) => process(&shared, admitted, &parts, key.clone(), body).await,
        Gate::Answered(response) => response,
    };

    let hung_up = response.extensions().get::<DropConnection>().is_some();
    let status = (!hung_up).then(|| response.status().as_u16());
    if let Some(record) = shared.lock().requests.get_mut(index) {
        record.status = status;
    }
    tracing::debug!(%path, ?key, ?status, "purchase handled");
    response
}

/// The synchronous gate: 401, scripted answers, 429 and the injected 5xx.
fn admit(shared: &Shared, path: &str, authorization_ok: bool) -> Gate {
    let now = Instant::now();
    let mut guard = shared.lock();
    let inner: &mut Inner = &mut guard;
    if !authorization_ok || inner.faults.reject_auth {
        return Gate::Answered(reply::message(
            StatusCode::UNAUTHORIZED,
            "invalid or missing API key",
            RateDecision::Off,
        ));
    }
    let customer_id = segment(path, 3);
    if let Some(script) = take_script(&mut inner.faults.scripted, customer_id) {
        let rate = inner.window.peek(&inner.faults, now);
        return Gate::Answered(reply::scripted(&script, rate));
    }
    let rate = inner.window.admit(&inner.faults, now);
    if let RateDecision::Limited { .. } = rate {
        inner.ledger.rate_limited += 1;
        return Gate::Answered(reply::message(
            StatusCode::TOO_MANY_REQUESTS,
            "rate limit exceeded, retry after the window resets",
            rate,
        ));
    }
    let scripted_after = take_script(&mut inner.faults.after_charge, customer_id);
    let faults = &inner.faults;
    let rng = &mut inner.rng;
    if rng.random::<f64>() < faults.fail_rate {
        inner.ledger.faults += 1;
        let statuses = [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
        ];
        let status = statuses[rng.random_range(0..statuses.len())];
        return Gate::Answered(reply::message(status, "simulated server error", rate));
    }
    let after = if let Some(script) = scripted_after {
        AfterCharge::Scripted(script)
    } else if rng.random::<f64>() < faults.hang_rate {
        AfterCharge::Hang(Duration::from_secs(faults.hang_secs))
    } else if rng.random::<f64>() < faults.drop_rate {
        AfterCharge::Drop
    } else {
        AfterCharge::Answer
    };
    let jitter = rng.random_range(0..=faults.latency_jitter_ms);
    let latency = Duration::from_millis(faults.latency_ms.saturating_add(jitter));
    Gate::Admitted(Admitted {
        rate,
        latency,
        after,
    })
}

/// The first script of `scripts` that matches the customer and is not used
/// up, counted as used once (and removed when that was its last use).
fn take_script(scripts: &mut Vec<ScriptedResponse>, customer_id: &str) -> Option<ScriptedResponse> {
    let position = scripts.iter().position(|script| {
        script.times != Some(0)
            && script
                .customer_id
                .as_deref()
                .is_none_or(|c| c == customer_id)
    })?;
    let script = &mut scripts[position];
    let taken = script.clone();
    if let Some(times) = &mut script.times {
        *times -= 1;
        if *times == 0 {
            scripts.remove(position);
        }
    }
    Some(taken)
}

/// Validation, idempotency, latency, the charge and the answer.
async fn process(
    shared: &Arc<Shared>,
    admitted: Admitted,
    parts: &Parts,
    key: Option<String>,
    body: Body,
) -> Response {
    let rate = admitted.rate;
    let path = parts.uri.path();
    let (customer_id, product_id) = (segment(path, 3), segment(path, 5));
    let (purchase, fingerprint) = match validate(parts, key.as_deref(), body).await {
        Ok(valid) => valid,
        Err((status, text)) => return reply::message(status, &text, rate),
    };
    let guard = match claim(shared, key.as_deref(), &fingerprint, rate) {
        Claimed::Held(guard) => guard,
        Claimed::Answered(response) => return response,
    };
    // Like a real server, the purchase runs to its end even when the client
    // hangs up (a timeout): the charge happens and the success is stored for
    // replay. This is the case that makes a worker's retry dangerous without
    // the Idempotency-Key, so the simulator must not spare it.
    let charge = {
        let shared = Arc::clone(shared);
        let order = Order {
            customer_id: customer_id.to_owned(),
            product_id: product_id.to_owned(),
            purchase,
            key,
        };
        let latency = admitted.latency;
        let faulted = !matches!(admitted.after, AfterCharge::Answer);
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            let answer = charge(&mut shared.lock(), order, faulted);
            if let Some(guard) = guard {
                guard.complete(CachedResponse {
                    status: StatusCode::CREATED,
                    body: answer.clone(),
                });
            }
            answer
        })
    };
    let Ok(answer) = charge.await else {
        return reply::message(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the purchase task failed",
            rate,
        );
    };
    match admitted.after {
        AfterCharge::Answer => reply::json(StatusCode::CREATED, answer, rate),
        AfterCharge::Scripted(script) => reply::scripted(&script, rate),
        AfterCharge::Hang(duration) => {
            tokio::time::sleep(duration).await;
            reply::hang_up()
        }
        AfterCharge::Drop => reply::hang_up(),
    }
}

/// The ids, the body and the key, checked in the order Hyperline checks
/// them; the purchase and what its key must keep matching, or the 4xx.
async fn validate(
    parts: &Parts,
    key: Option<&str>,
    body: Body,
) -> Result<(Purchase, Fingerprint), (StatusCode, String)> {
    let bad = |status, text: &str| Err((status, text.to_owned()));
    let path = parts.uri.path();
    if !valid_id(segment(path, 3)) {
        return bad(StatusCode::NOT_FOUND, "customer not found");
    }
    if !valid_id(segment(path, 5)) {
        return bad(StatusCode::NOT_FOUND, "product not found");
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return bad(
            StatusCode::BAD_REQUEST,
            "request body is unreadable or too large",
        );
    };
    let purchase = parse_purchase(&bytes).map_err(|text| (StatusCode::BAD_REQUEST, text))?;
    if key.is_some_and(|k| k.chars().count() < MIN_KEY_CHARS) {
        return bad(
            StatusCode::BAD_REQUEST,
            "Idempotency-Key must be at least 16 characters",
        );
    }
    let fingerprint = Fingerprint {
        method: parts.method.to_string(),
        path: parts.uri.to_string(),
        body: bytes,
    };
    Ok((purchase, fingerprint))
}

/// What the request's key allows.
enum Claimed {
    /// Go on: a fresh key is held in progress until its charge completes
    /// (`None` without a key).
    Held(Option<InProgressGuard>),
    /// A used key: its replay, a 409 or a 417.
    Answered(Response),
}

/// The key's claim.
fn claim(
    shared: &Arc<Shared>,
    key: Option<&str>,
    fingerprint: &Fingerprint,
    rate: RateDecision,
) -> Claimed {
    let Some(key) = key else {
        return Claimed::Held(None);
    };
    let mut inner = shared.lock();
    match inner.idempotency.claim(key, fingerprint, Instant::now()) {
        Claim::Fresh(token) => Claimed::Held(Some(InProgressGuard::new(
            Arc::clone(shared),
            key.to_owned(),
            token,
        ))),
        Claim::Replay(cached) => {
            inner.ledger.replayed += 1;
            Claimed::Answered(reply::json(cached.status, cached.body, rate))
        }
        Claim::InProgress => {
            inner.ledger.conflicts += 1;
            Claimed::Answered(reply::message(
                StatusCode::CONFLICT,
                "a request with this Idempotency-Key is still in progress",
                rate,
            ))
        }
        Claim::Mismatch => Claimed::Answered(reply::message(
            StatusCode::EXPECTATION_FAILED,
            "this Idempotency-Key was already used with a different method, URL or body",
            rate,
        )),
    }
}

/// What a valid purchase asks to be charged.
struct Order {
    customer_id: String,
    product_id: String,
    purchase: Purchase,
    key: Option<String>,
}

/// The charge: the balance, the invoice, the credit transaction and the
/// ledger's record (a fault counted when the answer will not arrive as is);
/// the answer's body.
fn charge(inner: &mut Inner, order: Order, faulted: bool) -> Bytes {
    let Order {
        customer_id,
        product_id,
        purchase,
        key,
    } = order;
    let balance = inner
        .balances
        .entry((customer_id.clone(), product_id.clone()))
        .or_insert(0);
    *balance = balance.saturating_add(purchase.credit_count);
    let new_credit_balance = *balance;
    let invoice_id = inner.invoice_id();
    let answer = serde_json::json!({
        "invoice_id": invoice_id,
        "new_credit_balance": new_credit_balance,
    });
    let now = time::OffsetDateTime::now_utc();
    let transaction = Transaction {
        id: inner.transaction_id(),
        customer_id: customer_id.clone(),
        product_id: product_id.clone(),
        invoice_id: invoice_id.clone(),
        credit_count: purchase.credit_count,
        amount_excluding_tax: purchase.amount_excluding_tax,
        price: purchase.price_id.clone().map(|id| TransactionPrice {
            id,
            amount: None,
            pack_size: None,
        }),
        kind: "topup".to_owned(),
        source: "api".to_owned(),
        balance_after: new_credit_balance,
        created_at: now,
        updated_at: now,
    };
    inner.transactions.push(transaction);
    inner.ledger.charges.push(Charge {
        idempotency_key: key,
        customer_id,
        product_id,
        credit_count: purchase.credit_count,
        amount_excluding_tax: purchase.amount_excluding_tax,
        price_id: purchase.price_id,
        invoice_id,
        new_credit_balance,
    });
    if faulted {
        inner.ledger.faults += 1;
    }
    Bytes::from(answer.to_string())
}

/// The `n`th `/`-separated segment of the raw path (`""` when absent).
fn segment(path: &str, n: usize) -> &str {
    path.split('/').nth(n).unwrap_or("")
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

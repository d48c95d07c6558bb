//! `GET /v1/customers/{customer_id}/credits/{product_id}/transactions`, as
//! Hyperline documents it: the customer's credit transactions for a product,
//! oldest first, paginated with `take` (0 to 100) and `skip`, under a `meta`
//! of `total`, `taken` and `skipped`. Authentication and the `404` for an id
//! that cannot exist work as on the purchase route; the request counts
//! against the read limit (200 per 10 s), not the write limit.
//!
//! It is what lets `dead-letters reconcile` and the worker's check at the
//! 24-hour window learn whether an uncertain command was charged.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Serialize;

use super::reply;
use super::state::{RateDecision, Shared, Transaction};
use super::validation::valid_id;

/// Hyperline's largest page.
const MAX_TAKE: u64 = 100;

/// Without `take`, a page this long.
const DEFAULT_TAKE: u64 = 50;

#[derive(Serialize)]
struct Meta {
    total: usize,
    taken: usize,
    skipped: u64,
}

#[derive(Serialize)]
struct Page<'a> {
    meta: Meta,
    data: &'a [&'a Transaction],
}

/// The route handler.
pub(crate) async fn transactions(
    State(shared): State<Arc<Shared>>,
    Path((customer_id, product_id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let expected = format!("Bearer {}", shared.api_key);
    let authorization_ok = headers
        .get(AUTHORIZATION)
        .is_some_and(|value| value.as_bytes() == expected.as_bytes());
    let mut inner = shared.lock();
    inner.ledger.reads += 1;
    if !authorization_ok || inner.faults.reject_auth {
        return reply::message(
            StatusCode::UNAUTHORIZED,
            "invalid or missing API key",
            RateDecision::Off,
        );
    }
    let rate = {
        let faults = inner.faults.clone();
        inner.read_window.admit_read(&faults, Instant::now())
    };
    if let RateDecision::Limited { .. } = rate {
        inner.ledger.rate_limited += 1;
        return reply::message(
            StatusCode::TOO_MANY_REQUESTS,
            "rate limit exceeded, retry after the window resets",
            rate,
        );
    }
    if !valid_id(&customer_id) {
        return reply::message(StatusCode::NOT_FOUND, "customer not found", rate);
    }
    if !valid_id(&product_id) {
        return reply::message(StatusCode::NOT_FOUND, "product not found", rate);
    }
    let (take, skip) = match paging(query.as_deref().unwrap_or("")) {
        Ok(paging) => paging,
        Err(text) => return reply::message(StatusCode::BAD_REQUEST, &text, rate),
    };
    let matching: Vec<&Transaction> = inner
        .transactions
        .iter()
        .filter(|t| t.customer_id == customer_id && t.product_id == product_id)
        .collect();
    let start = usize::try_from(skip)
        .unwrap_or(usize::MAX)
        .min(matching.len());
    let end = start
        .saturating_add(usize::try_from(take).unwrap_or(usize::MAX))
        .min(matching.len());
    let data = &matching[start..end];
    let page = Page {
        meta: Meta {
            total: matching.len(),
            taken: data.len(),
            skipped: skip,
        },
        data,
    };
    let mut body = serde_json::to_value(&page).unwrap_or_default();
    if inner.faults.listing_omits_invoices
        && let Some(listed) = body["data"].as_array_mut()
    {
        for t in listed {
            t["invoice_id"] = serde_json::Value::Null;
        }
    }
    if let Some(listed) = body["data"].as_array_mut() {
        for t in listed {
            for (field, value) in &inner.faults.listing_patch {
                t[field.as_str()] = value.clone();
            }
        }
    }
    let body = serde_json::to_vec(&body).unwrap_or_default();
    reply::json(StatusCode::OK, Bytes::from(body), rate)
}

/// `take` and `skip` from the query string: whole numbers, `take` at most
/// [`MAX_TAKE`]; anything else is a `400` naming the parameter.
fn paging(query: &str) -> Result<(u64, u64), String> {
    let (mut take, mut skip) = (DEFAULT_TAKE, 0);
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{name} must be a whole number, got {value:?}"))
        };
        match name.as_ref() {
            "take" => take = number()?,
            "skip" => skip = number()?,
            _ => {}
        }
    }
    if take > MAX_TAKE {
        return Err(format!("take must be at most {MAX_TAKE}, got {take}"));
    }
    Ok((take, skip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_reads_take_and_skip_and_refuses_the_rest() {
        assert_eq!(paging(""), Ok((DEFAULT_TAKE, 0)));
        assert_eq!(paging("take=100&skip=7"), Ok((100, 7)));
        assert!(paging("take=101").is_err());
        assert!(paging("skip=-1").is_err());
        assert!(paging("take=ten").is_err());
    }
}

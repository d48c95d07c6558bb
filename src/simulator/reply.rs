//! How the simulator's answers are shaped: JSON bodies, Hyperline's
//! `{"message": ...}` errors, the rate-limit headers every purchase answer
//! carries (the worker paces itself on them), scripted answers, and the marker
//! that makes the connection layer hang up instead of answering.

use axum::body::{Body, Bytes};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::faults::ScriptedResponse;
use super::server::DropConnection;
use super::state::RateDecision;

/// A JSON answer with the rate-limit headers of `rate`.
pub(crate) fn json(status: StatusCode, body: Bytes, rate: RateDecision) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    rate_headers(headers, rate);
    response
}

/// A Hyperline-style error: `{"message": "..."}`.
pub(crate) fn message(status: StatusCode, message: &str, rate: RateDecision) -> Response {
    let body = serde_json::json!({ "message": message }).to_string();
    json(status, Bytes::from(body), rate)
}

/// No answer at all: the connection layer sees the marker and closes the
/// connection, which is how a charge whose answer was lost looks to a client.
pub(crate) fn hang_up() -> Response {
    let mut response = Response::new(Body::empty());
    response.extensions_mut().insert(DropConnection);
    response
}

/// A scripted answer. Its own headers win over the rate-limit headers, so a
/// script can fake a `429` with any `Retry-After`.
pub(crate) fn scripted(script: &ScriptedResponse, rate: RateDecision) -> Response {
    let status = StatusCode::from_u16(script.status).unwrap_or_else(|_| {
        tracing::debug!(
            status = script.status,
            "scripted status is invalid, using 500"
        );
        StatusCode::INTERNAL_SERVER_ERROR
    });
    let mut response = match &script.body {
        serde_json::Value::String(text) => {
            let mut response = Response::new(Body::from(text.clone()));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            rate_headers(response.headers_mut(), rate);
            response
        }
        body => json(status, Bytes::from(body.to_string()), rate),
    };
    *response.status_mut() = status;
    for (name, value) in &script.headers {
        match (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            (Ok(name), Ok(value)) => {
                response.headers_mut().insert(name, value);
            }
            _ => tracing::debug!(header = %name, "scripted header is invalid, skipped"),
        }
    }
    response
}

/// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (the
/// RFC 3339 date-time at which the window resets) and, on refusal,
/// `Retry-After` in whole seconds rounded up, so that a client waiting exactly
/// that long is never refused again by the same window.
fn rate_headers(headers: &mut HeaderMap, rate: RateDecision) {
    let (limit, remaining, reset_in) = match rate {
        RateDecision::Off => return,
        RateDecision::Allowed {
            limit,
            remaining,
            reset_in,
        } => (limit, remaining, reset_in),
        RateDecision::Limited { limit, reset_in } => {
            let seconds = reset_in.as_millis().div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::try_from(seconds.to_string()) {
                headers.insert(RETRY_AFTER, value);
            }
            (limit, 0, reset_in)
        }
    };
    headers.insert("x-ratelimit-limit", HeaderValue::from(limit));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
    let reset = (OffsetDateTime::now_utc() + reset_in).format(&Rfc3339);
    if let Ok(Ok(value)) = reset.map(HeaderValue::try_from) {
        headers.insert("x-ratelimit-reset", value);
    }
}

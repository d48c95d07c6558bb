//! The routes: the purchase and credit-transactions endpoints plus the simulator's own control plane
//! under `/_sim/`, through which tests, the demo and benchmarks read the
//! ledger (to prove nothing was charged twice) and change faults while the
//! worker runs. The control plane needs no API key: it is not Hyperline's.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::faults::{Faults, FaultsPatch};
use super::purchase::purchase;
use super::reply;
use super::state::{Ledger, RateDecision, RequestRecord, Shared};
use super::transactions::transactions;

/// The simulator's whole HTTP surface.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/v1/customers/{customer_id}/credits/{product_id}/purchase",
            post(purchase),
        )
        .route(
            "/v1/customers/{customer_id}/credits/{product_id}/transactions",
            get(transactions),
        )
        .route("/_sim/ledger", get(ledger))
        .route("/_sim/requests", get(requests))
        .route("/_sim/faults", get(faults).post(set_faults))
        .route("/healthz", get(healthz))
        .with_state(shared)
}

async fn ledger(State(shared): State<Arc<Shared>>) -> Json<Ledger> {
    Json(shared.lock().ledger.clone())
}

async fn requests(State(shared): State<Arc<Shared>>) -> Json<Vec<RequestRecord>> {
    Json(shared.lock().requests.clone())
}

async fn faults(State(shared): State<Arc<Shared>>) -> Json<Faults> {
    Json(shared.lock().faults.clone())
}

/// Applies a [`FaultsPatch`] and answers the resulting settings; a body that
/// is not a patch, or a rate outside 0..=1, is refused and changes nothing.
async fn set_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let refuse = |text: &str| reply::message(StatusCode::BAD_REQUEST, text, RateDecision::Off);
    let patch: FaultsPatch = match serde_json::from_slice(&body) {
        Ok(patch) => patch,
        Err(error) => return refuse(&format!("body is not a faults patch: {error}")),
    };
    let mut inner = shared.lock();
    let mut updated = inner.faults.clone();
    updated.apply(patch);
    if let Err(text) = updated.validate() {
        return refuse(&text);
    }
    inner.faults = updated.clone();
    drop(inner);
    tracing::debug!(faults = ?updated, "simulator faults changed");
    Json(updated).into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

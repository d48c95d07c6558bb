//! The Hyperline purchase call and the meaning of its answers.
//!
//! [`client`] makes the request; [`answer`] turns whatever came back (a status
//! and body, or a network error) into a [`PurchaseAnswer`] that names one row
//! of the contract's outcome table. The retry loop never looks at a status
//! code: it only matches on the answer.

mod answer;
mod client;

pub use answer::{PurchaseAnswer, Quota, Receipt, TransientCause, classify, rate_limit_wait};
pub use client::{ClientError, HyperlineClient, ProbeResult, PurchaseResponse, purchase_path};

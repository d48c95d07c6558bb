//! The Hyperline side: the purchase call, the meaning of its answers, and the
//! policy that paces and repeats it.
//!
//! - [`client`] makes one request; [`answer`] turns whatever came back (a
//!   status and body, or a network error) into a [`PurchaseAnswer`] that names
//!   one row of the contract's outcome table;
//! - [`retry`] repeats a purchase within a delivery's bounds, one attempt
//!   at a time (admitted, sent, its quota taken in), until a [`verdict`]
//!   (the types the loop and the attempt share), [`gate`] paces
//!   every request of the replica by the quota the API announces, and
//!   [`credentials`] pauses the replica while its key is refused;
//! - [`HyperlineClient::transactions`] reads a customer's credit transactions,
//!   to learn whether an uncertain purchase charged.
//!
//! The retry loop never looks at a status code: it only matches on the answer.

pub mod account;
pub mod admission;
mod answer;
mod attempt;
mod client;
pub mod credentials;
pub mod evidence;
pub mod gate;
pub mod matching;
pub mod retry;
mod transactions;
pub mod verdict;

pub use answer::{
    FinalAnswer, PurchaseAnswer, Quota, Receipt, TransientCause, classify, rate_limit_wait,
};
pub use attempt::RetryContext;
pub use client::{ClientError, HyperlineClient, ProbeResult, PurchaseResponse, purchase_path};
pub use transactions::{
    CreditTransaction, MAX_PAGES, PAGE_SIZE, READS_PER_SECOND, ReadBounds, TransactionPrice,
    TransactionsError,
};

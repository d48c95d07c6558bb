//! Hyperline's credit transactions of one customer and product
//! (`GET /v1/customers/{id}/credits/{productId}/transactions`): the only way
//! to learn, after the fact, whether a purchase whose answer was lost or
//! garbled charged the customer. `dead-letters reconcile` and the worker's
//! check at the 24-hour window read them through [`HyperlineClient::transactions`].
//!
//! The reads obey the same rules as purchases: the client's key (never in an
//! error), its deadlines, no redirect followed, a 429 waited out as its
//! `Retry-After` says (the caller's read gate pauses too), 5xx and network
//! failures retried with exponential backoff and jitter. A listing is bounded:
//! past `max_pages` pages it gives up rather than reading without end.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::Deserialize;
use time::OffsetDateTime;

use super::answer::{message_of, quota, rate_limit_wait};
use super::client::{HyperlineClient, error_chain};
use super::gate::Gate;
use crate::configuration::RetrySettings;
use crate::contract::{CustomerId, ProductId};

/// Hyperline's largest page.
pub const PAGE_SIZE: u64 = 100;

/// Hyperline's read limit (200 per 10 s) as a steady pace: a gate at this
/// rate never spends a window's budget before the window ends.
pub const READS_PER_SECOND: u32 = 20;

/// Pages read at most per customer and product (10 000 transactions): past
/// that, a listing says so instead of reading on.
pub const MAX_PAGES: u32 = 100;

/// One credit transaction. Only what matching a command needs is read, and
/// leniently: a consumption or an expiry has no invoice and may have a
/// negative count, and must not make a listing unreadable.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct CreditTransaction {
    /// `cdt_…`.
    pub id: String,
    /// The invoice, for a paid top-up.
    #[serde(default)]
    pub invoice_id: Option<String>,
    /// Credits added (negative: taken away).
    pub credit_count: i64,
    /// The amount paid, for a purchase by amount.
    #[serde(default)]
    pub amount_excluding_tax: Option<i64>,
    /// The price, for a purchase by price.
    #[serde(default)]
    pub price: Option<TransactionPrice>,
    /// `topup` for a purchase.
    #[serde(rename = "type")]
    pub kind: String,
    /// `api` for a purchase made through the API.
    pub source: String,
    /// The balance right after it.
    #[serde(default)]
    pub balance_after: Option<i64>,
    /// When Hyperline recorded it.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// `price` of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct TransactionPrice {
    /// The price id.
    #[serde(default)]
    pub id: Option<String>,
}

#[derive(Deserialize)]
struct Page {
    meta: Meta,
    data: Vec<CreditTransaction>,
}

#[derive(Deserialize)]
struct Meta {
    total: u64,
}

/// The bounds of one listing.
#[derive(Clone, Copy, Debug)]
pub struct ReadBounds {
    /// Tries per page (at least 1).
    pub attempts: u32,
    /// Lower bound of the backoff between tries.
    pub initial_backoff: Duration,
    /// Upper bound of the backoff between tries.
    pub max_backoff: Duration,
    /// Pages read at most; a customer with more transactions is reported,
    /// not read to the end.
    pub max_pages: u32,
}

impl ReadBounds {
    /// A listing reads under the retry settings' tries and backoff, so the
    /// worker's check at the window and `reconcile` read the same way.
    pub fn from_retry(retry: &RetrySettings) -> ReadBounds {
        ReadBounds {
            attempts: retry.attempts.max(1),
            initial_backoff: retry.initial_backoff(),
            max_backoff: retry.max_backoff(),
            max_pages: MAX_PAGES,
        }
    }
}

/// Why a listing could not be read. Never carries the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransactionsError {
    /// A final answer: 400, 401, 403, 404 or another undocumented status.
    #[error("Hyperline answered {status}: {message}")]
    Refused {
        status: u16,
        /// Hyperline's message.
        message: String,
    },
    /// 429, 5xx or network failures outlasted the tries.
    #[error("no answer after {attempts} tries; last: {last}")]
    Exhausted {
        /// The tries made for the page.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// A 2xx whose body is not a page of transactions.
    #[error("a listing that is not the documented shape: {0}")]
    Malformed(String),
    /// More transactions than the bound allows reading.
    #[error("more than {pages} pages of transactions ({total} in all): not read to the end")]
    TooMany {
        pages: u32,
        /// Hyperline's `meta.total`.
        total: u64,
    },
}

/// One try of one page.
enum Try {
    /// Worth another try, after `wait` when the answer said.
    Again {
        detail: String,
        wait: Option<Duration>,
    },
    /// Final.
    Stop(TransactionsError),
}

impl HyperlineClient {
    /// Every credit transaction of `customer` for `product`, oldest first,
    /// read page by page through `gate` (the caller's read budget).
    pub async fn transactions(
        &self,
        customer: &CustomerId,
        product: &ProductId,
        gate: &Gate,
        bounds: ReadBounds,
    ) -> Result<Vec<CreditTransaction>, TransactionsError> {
        let path = format!(
            "/v1/customers/{}/credits/{}/transactions",
            customer.as_str(),
            product.as_str()
        );
        let mut all = Vec::new();
        for _ in 0..bounds.max_pages {
            let skip = u64::try_from(all.len()).unwrap_or(u64::MAX);
            let page = self.page(&path, skip, gate, bounds).await?;
            let done = page.data.is_empty()
                || skip.saturating_add(page.data.len() as u64) >= page.meta.total;
            all.extend(page.data);
            if done {
                return Ok(all);
            }
        }
        let total = self
            .page(
                &path,
                0,
                gate,
                ReadBounds {
                    max_pages: 1,
                    ..bounds
                },
            )
            .await
            .map_or(0, |p| p.meta.total);
        Err(TransactionsError::TooMany {
            pages: bounds.max_pages,
            total,
        })
    }

    /// One page, tried up to `bounds.attempts` times.
    async fn page(
        &self,
        path: &str,
        skip: u64,
        gate: &Gate,
        bounds: ReadBounds,
    ) -> Result<Page, TransactionsError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(bounds.initial_backoff)
            .with_max_delay(bounds.max_backoff)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(bounds.attempts.saturating_sub(1) as usize);
        let result = (|| self.try_page(path, skip, gate))
            .retry(backoff)
            .when(|e| matches!(e, Try::Again { .. }))
            .adjust(|e, next| match e {
                // A 429's wait replaces the backoff, but never adds a try.
                Try::Again {
                    wait: Some(wait), ..
                } => next.map(|_| *wait),
                _ => next,
            })
            .await;
        result.map_err(|e| match e {
            Try::Stop(e) => e,
            Try::Again { detail, .. } => TransactionsError::Exhausted {
                attempts: bounds.attempts.max(1),
                last: detail,
            },
        })
    }

    async fn try_page(&self, path: &str, skip: u64, gate: &Gate) -> Result<Page, Try> {
        let permit = gate.admit().await;
        let sent = self
            .get(path, &[("take", PAGE_SIZE), ("skip", skip)])
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                return Err(Try::Again {
                    detail: self.redact(&error_chain(&e)),
                    wait: None,
                });
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let now = OffsetDateTime::now_utc();
        permit.answered(quota(&headers, now));
        let body = response.bytes().await.map_err(|e| Try::Again {
            detail: self.redact(&error_chain(&e)),
            wait: None,
        })?;
        match status {
            200..=299 => serde_json::from_slice::<Page>(&body)
                .map_err(|e| Try::Stop(TransactionsError::Malformed(self.redact(&e.to_string())))),
            429 => {
                // Waited as long as the gate pauses, never longer.
                let wait = rate_limit_wait(&headers, now).map(|wait| gate.pause_for(wait));
                Err(Try::Again {
                    detail: "HTTP 429: rate limited".into(),
                    wait,
                })
            }
            408 | 500..=599 => Err(Try::Again {
                detail: format!("HTTP {status}"),
                wait: None,
            }),
            _ => Err(Try::Stop(TransactionsError::Refused {
                status,
                message: self.redact(&message_of(&body)),
            })),
        }
    }
}

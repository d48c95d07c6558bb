//! The message contract of docs/contract.md sections 2 and 3, as types.
//!
//! Publishers in other languages write the commands and downstream teams read
//! the events, so this is the one place where their shapes live: a command is
//! parsed once into a [`Command`] whose fields are valid by construction, and
//! every event is built from a [`ResultEvent`].

mod command;
mod event;
mod ids;
mod pending;

pub use command::{Command, InvalidCommand, InvalidReason, MAX_BODY_BYTES, Pricing, RawIds};
pub use event::{
    ErrorCode, EventError, EventKind, LANE_HEADER, OutcomeFacts, PUBLISHED_HEADER, ResultEvent,
    SCHEMA_VERSION,
};
pub use ids::{CommandId, CreditCount, CustomerId, IdError, MAX_JSON_INTEGER, PriceId, ProductId};
pub use pending::{PENDING_TYPE, PendingRecord};

/// How the operator tools print a time: RFC 3339 in UTC with three digits of
/// milliseconds, always (`…51.180Z`, never `…51.18Z`), so the times of one
/// listing line up and sort as text.
pub const RFC3339_MILLIS: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
);

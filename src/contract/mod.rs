//! The message contract of docs/contract.md sections 2 and 3, as types.
//!
//! Publishers in other languages write the commands and downstream teams read
//! the events, so this is the one place where their shapes live: a command is
//! parsed once into a [`Command`] whose fields are valid by construction, and
//! every event is built from a [`ResultEvent`].

mod command;
mod event;
mod ids;

pub use command::{Command, InvalidCommand, InvalidReason, MAX_BODY_BYTES, Pricing, RawIds};
pub use event::{ErrorCode, EventError, EventKind, OutcomeFacts, ResultEvent, SCHEMA_VERSION};
pub use ids::{CommandId, CreditCount, CustomerId, IdError, MAX_JSON_INTEGER, PriceId, ProductId};

//! `credit-purchase-worker`: buys Hyperline credits for commands taken from
//! RabbitMQ, exactly once per command, and answers every command with an event.
//!
//! The data path reads top to bottom through these modules:
//! delivery ([`broker`]) → command ([`contract`]) → purchase ([`hyperline`])
//! → outcome ([`pipeline`]) → event ([`contract`]) → ack ([`pipeline`]).

pub mod admin;
pub mod broker;
pub mod budget;
pub mod cli;
pub mod clock;
pub mod configuration;
pub mod contract;
pub mod hyperline;
pub mod operations;
pub mod pipeline;
pub mod simulator;
pub mod startup;
pub mod telemetry;

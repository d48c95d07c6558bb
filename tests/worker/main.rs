//! Integration tests of the worker against the real broker and the simulator.

mod chaos;
mod helpers;
mod hostile;
mod invalid;
mod leak;
mod operations;
mod outcomes;
mod redelivery;
mod redirects;
mod repeated_delays;
mod resilience;

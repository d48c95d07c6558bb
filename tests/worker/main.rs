//! Integration tests of the worker against the real broker and the simulator.

mod alerts;
mod blocked;
mod broker_refusals;
mod chaos;
mod cluster;
mod cluster_chaos;
mod crash_loop;
mod credentials;
mod examples;
mod held_acks;
mod hostile;
mod invalid;
mod leak;
mod logs;
mod operations;
mod outcomes;
mod reconcile_at_window;
mod redelivery;
mod redirects;
mod repeated_delays;
mod resilience;
mod time_bounds;
mod topology_upgrade;
mod traces;
mod trust;

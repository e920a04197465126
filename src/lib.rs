//! apim: a sovereign API management appliance in one binary. See docs/ARCHITECTURE.md.

pub mod admin;
pub mod audit;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod gateway;
pub mod model;
pub mod node;
pub mod pki;
pub mod secrets;
pub mod state;
pub mod store;
pub mod telemetry;

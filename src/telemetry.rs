//! Logging: JSON lines (or text) on stderr, which journald collects under systemd.
//!
//! Architecture invariant: logs never carry a secret (tokens, keys, passwords); audit events
//! are not log lines, they go through `state` and `audit`.

use crate::config::LogConfig;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` overrides the configured level.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if cfg.format == "text" {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    };
    if result.is_err() {
        // already installed (tests start several nodes in one process)
    }
}

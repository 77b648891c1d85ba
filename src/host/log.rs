//! Envoy's log level, asked once every so many lines rather than per line,
//! so that a debug line costs nothing unless Envoy's level lets it through.

use std::cell::Cell;

use super::abi::{self, LogLevel};
use crate::host_api::Level;

/// Envoy's level is asked again after this many checks, so a level changed
/// through the admin API takes effect without a host call per line.
const LEVEL_REFRESH: u32 = 128;

thread_local! {
    static LEVEL: Cell<(LogLevel, u32)> = const { Cell::new((LogLevel::Info, 0)) };
}

pub fn abi_level(level: Level) -> LogLevel {
    match level {
        Level::Debug => LogLevel::Debug,
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
    }
}

pub fn enabled(level: Level) -> bool {
    let (mut current, mut remaining) = LEVEL.get();
    if remaining == 0 {
        current = abi::log_level();
        remaining = LEVEL_REFRESH;
    }
    LEVEL.set((current, remaining - 1));
    abi_level(level) >= current
}

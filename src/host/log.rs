//! Log lines through Envoy (component `wasm`). Callers pass `format_args!`,
//! so a debug line costs nothing unless Envoy's level lets it through.
//! Never pass a key, a token or a body.

use std::cell::Cell;
use std::fmt::Arguments;

use super::abi::{self, LogLevel};

/// Envoy's level is asked again after this many log calls, so a level
/// changed through the admin API takes effect without a host call per line.
const LEVEL_REFRESH: u32 = 128;

thread_local! {
    static LEVEL: Cell<(LogLevel, u32)> = const { Cell::new((LogLevel::Info, 0)) };
}

fn enabled(level: LogLevel) -> bool {
    let (mut current, mut remaining) = LEVEL.get();
    if remaining == 0 {
        current = abi::log_level();
        remaining = LEVEL_REFRESH;
    }
    LEVEL.set((current, remaining - 1));
    level >= current
}

pub fn log(level: LogLevel, args: Arguments<'_>) {
    if enabled(level) {
        abi::log(level, &args.to_string());
    }
}

pub fn debug(args: Arguments<'_>) {
    log(LogLevel::Debug, args);
}

pub fn info(args: Arguments<'_>) {
    log(LogLevel::Info, args);
}

pub fn warn(args: Arguments<'_>) {
    log(LogLevel::Warn, args);
}

pub fn error(args: Arguments<'_>) {
    log(LogLevel::Error, args);
}

//! How the log lines look: which filter applies (the flag, then
//! MESHLANE_LOG, then RUST_LOG, then `info`), text or JSON lines, and
//! colour only on a terminal.
use std::io::IsTerminal;

use anyhow::{Context, Result};
use serde::Serialize;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, message and the
    /// event's fields at the top level (what log collectors parse).
    Json,
}

/// The filter to use and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub directives: String,
    pub from: &'static str,
}

/// The filter when none is given anywhere.
pub const DEFAULT_FILTER: &str = "info";

/// Picks the filter: `--log-level` (clap already prefers it over
/// MESHLANE_LOG, so `flag` is either), then RUST_LOG, then `info`. An empty
/// value counts as unset, as a chart's `env: [{name: RUST_LOG, value: ""}]`
/// means.
pub fn choose(flag: Option<&str>, rust_log: Option<&str>) -> Filter {
    fn set(v: Option<&str>) -> Option<&str> {
        v.map(str::trim).filter(|v| !v.is_empty())
    }
    if let Some(v) = set(flag) {
        return Filter {
            directives: v.to_string(),
            from: "--log-level or MESHLANE_LOG",
        };
    }
    if let Some(v) = set(rust_log) {
        return Filter {
            directives: v.to_string(),
            from: "RUST_LOG",
        };
    }
    Filter {
        directives: DEFAULT_FILTER.to_string(),
        from: "the default",
    }
}

/// Colour only for a person: stderr is a terminal and NO_COLOR
/// (no-color.org) is unset or empty.
pub fn want_ansi(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

/// Installs the global subscriber writing to stderr.
pub fn init(filter: &Filter, format: Format) -> Result<()> {
    let env_filter = EnvFilter::try_new(&filter.directives)
        .with_context(|| format!("log filter {:?} from {}", filter.directives, filter.from))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    match format {
        Format::Text => builder
            .with_ansi(want_ansi(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            ))
            .init(),
        Format::Json => builder.with_ansi(false).json().flatten_event(true).init(),
    }
    let format = match format {
        Format::Text => "text",
        Format::Json => "json",
    };
    tracing::debug!(filter = %filter.directives, from = filter.from, format, "logging");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn flag_then_rust_log_then_info() {
        let f = choose(Some("debug"), Some("trace"));
        assert_eq!(f.directives, "debug");
        assert_eq!(f.from, "--log-level or MESHLANE_LOG");
        assert_eq!(choose(None, Some("meshlane=debug")).from, "RUST_LOG");
        assert_eq!(choose(Some(" "), Some("warn")).directives, "warn");
        assert_eq!(choose(None, Some("")).directives, DEFAULT_FILTER);
        assert_eq!(choose(None, None).from, "the default");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(want_ansi(true, None));
        assert!(want_ansi(true, Some(OsStr::new(""))));
        assert!(!want_ansi(true, Some(OsStr::new("1"))));
        assert!(!want_ansi(false, None));
    }
}

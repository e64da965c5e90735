//! `-o text|json|yaml` for every command that prints. JSON and YAML carry
//! the same document, whose first field `schema` names its shape and
//! version (`meshlane/status/v1`): within a version fields are only added,
//! never renamed, removed or retyped.
use std::io::Write;

use anyhow::Result;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For people; may change between releases.
    #[default]
    Text,
    /// One pretty-printed JSON document.
    Json,
    /// The same document as YAML.
    Yaml,
}

/// The `-o` flag of a command that prints.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct Args {
    /// Output format: text for people, or a JSON or YAML document with a
    /// stable schema (its `schema` field names it).
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub format: Format,
}

/// Writes `doc` to stdout as `format` says; `text` prints the text form.
pub fn emit<T: Serialize>(format: Format, doc: &T, text: impl FnOnce(&T)) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Text => {
            drop(out);
            text(doc);
        }
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(doc)?)?,
        Format::Yaml => write!(out, "{}", serde_yaml_ng::to_string(doc)?)?,
    }
    Ok(())
}

//! Errors of experiment configurations: each names the file, the key or the override at fault.

use std::path::PathBuf;

use crate::device::DeviceError;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML that does not parse or does not fit the schema; `line` is 1-based where TOML
    /// says where.
    #[error("invalid config {}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    /// A file that parses but breaks a rule; the rule follows in the chain.
    #[error("invalid config {}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("unknown preset `{name}`; presets: {}", presets.join(", "))]
    UnknownPreset {
        name: String,
        presets: Vec<&'static str>,
    },
    #[error("override `{item}` is not of the form key=value")]
    NotAnOverride { item: String },
    #[error("unknown key `{key}`")]
    UnknownKey { key: String },
    #[error("empty key in override")]
    EmptyKey,
    /// An override whose value does not fit its key's type.
    #[error("`{key}`: {message}")]
    BadValue { key: String, message: String },
    /// A value of the right type that breaks a rule, such as `model.heads` not dividing
    /// `model.embedding`.
    #[error("`{key}` {rule}")]
    Invalid {
        key: &'static str,
        rule: &'static str,
    },
    /// A setting a run needs that is not set; `hint` says how to give it.
    #[error("`{key}` is not set: {hint}")]
    Unset { key: &'static str, hint: String },
    #[error(
        "`data.validation_fraction` = {fraction} leaves too few of the {classes} training classes"
    )]
    ValidationFraction { fraction: f64, classes: usize },
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// The 1-based line of byte `offset` in `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

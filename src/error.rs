//! The crate's error for the layers that combine areas (the run loop, evaluation, the demo,
//! verification, benchmarks). Each area has its own enum; this one only gathers them, so a
//! caller can still match on the area's variant underneath.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::data::DataError;
use crate::device::DeviceError;
use crate::io::{IoError, WeightsError};
use crate::train::checkpoint::CheckpointError;
use crate::train::run_dir::RunDirError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    File(#[from] IoError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Embeddings(#[from] crate::eval::metrics::EmbeddingsError),
    #[error(transparent)]
    Reference(#[from] crate::verify::reference::ReferenceError),
    #[error(transparent)]
    Plot(#[from] crate::train::plots::PlotError),
    #[error(transparent)]
    Name(#[from] UnknownName),
    #[error(transparent)]
    Distributed(#[from] crate::distributed::DistributedError),
    /// `weights` is the file named by `model.weights`, or the embedded asset.
    #[error("the pretrained weights {weights} do not fit the configured {backbone} backbone")]
    Pretrained {
        weights: String,
        backbone: crate::backbones::BackboneKind,
        #[source]
        source: WeightsError,
    },
    /// A JSON file (or value) that does not read or write; `what` says what it should be.
    #[error("{} is not {what}", path.display())]
    NotJson {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the model has no classification head")]
    NoHead,
    #[error(transparent)]
    BackboneCheck(#[from] crate::verify::backbone::BackboneCheckError),
    #[error(
        "{loss} became {value} at epoch {epoch} step {step}; lower the learning rates, or check the loss and optimiser settings"
    )]
    Diverged {
        loss: &'static str,
        value: f64,
        epoch: usize,
        step: usize,
    },
    /// An operating-system call on `path` that failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something that happened while working on `what`; the cause follows in the chain.
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// Wraps the error in what it happened while doing.
    pub fn context(self, what: impl Into<String>) -> Self {
        Self::Context {
            what: what.into(),
            source: Box::new(self),
        }
    }
}

/// A name that is none of the ones an enum accepts (`--kind`, `model.pooling`, ...).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{given}`: expected one of {}", expected.join(", "))]
pub struct UnknownName {
    pub what: &'static str,
    pub given: String,
    pub expected: Vec<String>,
}

/// The text of another crate's error whose `Display` already repeats its own sources
/// (`safetensors`, `pytorch-reader`, `toml`): kept as text without a source of its own, so
/// that a printed chain states the cause once.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Cause(pub String);

impl Cause {
    pub fn of(e: &dyn std::error::Error) -> Self {
        Self(e.to_string())
    }
}

/// `error: cause: cause ...`, for the places that report an error as a note rather than
/// returning it.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

//! The run folder: `config.toml`, `metrics.jsonl`, `last.safetensors`, `best.safetensors`,
//! `summary.json` and the plots.

use std::path::{Path, PathBuf};

use super::{EpochRecord, RunSummary};
use crate::io::IoError;
use crate::io::atomic::write_atomic;

/// A run folder that cannot be started, resumed or written.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("{} already holds a run; continue it with --resume {} or choose another --out", root.display(), root.display())]
    Occupied { root: PathBuf },
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has no last.safetensors to resume from", root.display())]
    NothingToResume { root: PathBuf },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the configuration differs from the one {} was started with; resume with the run's own config.toml", root.display())]
    ConfigDiffers { root: PathBuf },
    #[error("cannot encode {}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Write(#[from] IoError),
}

pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: &Path) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// The latest state, with everything needed to resume.
    pub fn last(&self) -> PathBuf {
        self.root.join("last.safetensors")
    }

    /// The model of the best epoch on the selection split.
    pub fn best(&self) -> PathBuf {
        self.root.join("best.safetensors")
    }

    pub fn summary(&self) -> PathBuf {
        self.root.join("summary.json")
    }

    /// Prefix of the embeddings of the final evaluation (`.npy`, `.labels.npy`,
    /// `.paths.txt`): the test set, or In-Shop's gallery.
    pub fn test_embeddings(&self) -> crate::io::embedding_files::EmbeddingFiles {
        crate::io::embedding_files::EmbeddingFiles::new(self.root.join("test-embeddings"))
    }

    pub fn losses_plot(&self) -> PathBuf {
        self.root.join("losses.svg")
    }

    pub fn recall_plot(&self) -> PathBuf {
        self.root.join("recall.svg")
    }

    /// Refuses a folder that already holds a run, so that nothing is overwritten by accident.
    pub fn check_fresh(&self) -> Result<(), RunDirError> {
        if self.last().exists() || self.summary().exists() {
            return Err(RunDirError::Occupied {
                root: self.root.clone(),
            });
        }
        Ok(())
    }

    /// Makes the folder.
    pub fn create(&self) -> Result<(), RunDirError> {
        std::fs::create_dir_all(&self.root).map_err(|source| RunDirError::Create {
            path: self.root.clone(),
            source,
        })
    }

    /// Checks that the folder holds a run that can be resumed with this configuration.
    pub fn check_resumable(&self, config_toml: &str) -> Result<(), RunDirError> {
        if !self.last().exists() {
            return Err(RunDirError::NothingToResume {
                root: self.root.clone(),
            });
        }
        let saved = std::fs::read_to_string(self.config()).map_err(|source| RunDirError::Read {
            path: self.config(),
            source,
        })?;
        if saved != config_toml {
            return Err(RunDirError::ConfigDiffers {
                root: self.root.clone(),
            });
        }
        Ok(())
    }

    pub fn write_config(&self, toml: &str) -> Result<(), RunDirError> {
        Ok(write_atomic(&self.config(), toml.as_bytes())?)
    }

    /// One JSON line per epoch record, the whole file rewritten so that a resumed run never
    /// repeats a line.
    pub fn write_records(&self, records: &[EpochRecord]) -> Result<(), RunDirError> {
        let path = self.metrics();
        let mut text = String::new();
        for r in records {
            text.push_str(
                &serde_json::to_string(r).map_err(|source| RunDirError::Json {
                    path: path.clone(),
                    source,
                })?,
            );
            text.push('\n');
        }
        Ok(write_atomic(&path, text.as_bytes())?)
    }

    pub fn write_summary(&self, summary: &RunSummary) -> Result<(), RunDirError> {
        let path = self.summary();
        let json = serde_json::to_string_pretty(summary).map_err(|source| RunDirError::Json {
            path: path.clone(),
            source,
        })?;
        Ok(write_atomic(&path, json.as_bytes())?)
    }
}

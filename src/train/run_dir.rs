//! The run folder: `config.toml`, `metrics.jsonl`, `last.safetensors`, `best.safetensors`,
//! `summary.json` and the plots.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::{EpochRecord, RunSummary};
use crate::io::atomic::write_atomic;

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
    pub fn check_fresh(&self) -> Result<()> {
        if self.last().exists() || self.summary().exists() {
            bail!(
                "{} already holds a run; continue it with --resume {} or choose another --out",
                self.root.display(),
                self.root.display()
            );
        }
        Ok(())
    }

    /// Makes the folder.
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))
    }

    /// Checks that the folder holds a run that can be resumed with this configuration.
    pub fn check_resumable(&self, config_toml: &str) -> Result<()> {
        if !self.last().exists() {
            bail!(
                "{} has no last.safetensors to resume from",
                self.root.display()
            );
        }
        let saved = std::fs::read_to_string(self.config())
            .with_context(|| format!("cannot read {}", self.config().display()))?;
        if saved != config_toml {
            bail!(
                "the configuration differs from the one {} was started with; resume with the run's own config.toml",
                self.root.display()
            );
        }
        Ok(())
    }

    pub fn write_config(&self, toml: &str) -> Result<()> {
        write_atomic(&self.config(), toml.as_bytes())
    }

    /// One JSON line per epoch record, the whole file rewritten so that a resumed run never
    /// repeats a line.
    pub fn write_records(&self, records: &[EpochRecord]) -> Result<()> {
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        write_atomic(&self.metrics(), text.as_bytes())
    }

    pub fn write_summary(&self, summary: &RunSummary) -> Result<()> {
        write_atomic(
            &self.summary(),
            serde_json::to_string_pretty(summary)?.as_bytes(),
        )
    }
}

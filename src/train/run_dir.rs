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
    /// The folder holds a file of the name a run writes, but no run to resume.
    #[error("{} exists and a run would overwrite it; choose another --out or move the file", path.display())]
    WouldOverwrite { path: PathBuf },
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
    /// `keys` lists the settings that differ (at most ten, then a count).
    #[error("the configuration differs from the one {} was started with (in {keys}); resume with the run's own config.toml and no flags that change it", root.display())]
    ConfigDiffers { root: PathBuf, keys: String },
    #[error("cannot encode {}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Write(#[from] IoError),
    /// Another process holds the folder's lock: two writers would mix their files.
    #[error("{} is in use by process {}; wait for it to end or choose another --out", root.display(), pid.map_or_else(|| "(unknown pid)".to_string(), |p| p.to_string()))]
    Locked { root: PathBuf, pid: Option<u32> },
    #[error("cannot lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The advisory lock (`flock`) on a run folder's `.lock` file, held while the process works
/// in the folder and released when it is dropped or the process ends, however it ends. The
/// file holds the owner's pid so that a refused second writer can name it.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
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

    pub fn lock_file(&self) -> PathBuf {
        self.root.join(".lock")
    }

    /// Takes the folder's lock without waiting; a folder held by another process is refused
    /// with that process's pid.
    pub fn lock(&self) -> Result<RunLock, RunDirError> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let path = self.lock_file();
        let lock_err = |source| RunDirError::Lock {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_err)?;
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(RunDirError::Locked {
                    root: self.root.clone(),
                    pid: text.trim().parse().ok(),
                });
            }
            return Err(lock_err(e));
        }
        file.set_len(0).map_err(lock_err)?;
        file.rewind().map_err(lock_err)?;
        writeln!(file, "{}", std::process::id()).map_err(lock_err)?;
        file.flush().map_err(lock_err)?;
        Ok(RunLock { _file: file })
    }

    /// Refuses a folder that already holds a run, or any file of a name a run writes, so that
    /// nothing is overwritten by accident (`train --config config.toml --out .` would replace
    /// the user's own `config.toml`).
    pub fn check_fresh(&self) -> Result<(), RunDirError> {
        if self.last().exists()
            || super::checkpoint::previous_path(&self.last()).exists()
            || self.summary().exists()
        {
            return Err(RunDirError::Occupied {
                root: self.root.clone(),
            });
        }
        let embeddings = self.test_embeddings();
        let written = [
            self.config(),
            self.metrics(),
            self.best(),
            self.losses_plot(),
            self.recall_plot(),
        ];
        match written
            .into_iter()
            .chain(embeddings.all())
            .find(|p| p.symlink_metadata().is_ok())
        {
            Some(path) => Err(RunDirError::WouldOverwrite { path }),
            None => Ok(()),
        }
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
        if !self.last().exists() && !super::checkpoint::previous_path(&self.last()).exists() {
            return Err(RunDirError::NothingToResume {
                root: self.root.clone(),
            });
        }
        let saved = crate::io::regular::read_to_string(&self.config()).map_err(|source| {
            RunDirError::Read {
                path: self.config(),
                source,
            }
        })?;
        // Compared as settings rather than text, so that a folder written before a setting
        // existed (and so without its key) still resumes with that setting's default.
        let same = saved == config_toml
            || matches!(
                (
                    toml::from_str::<crate::config::ExperimentConfig>(&saved),
                    toml::from_str::<crate::config::ExperimentConfig>(config_toml),
                ),
                (Ok(a), Ok(b)) if a == b
            );
        if !same {
            return Err(RunDirError::ConfigDiffers {
                root: self.root.clone(),
                keys: crate::io::error::short_list(&differing_keys(&saved, config_toml)),
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

/// The dotted keys whose values differ between two TOML texts (a key present in one only
/// counts); a text that does not parse counts as empty.
fn differing_keys(a: &str, b: &str) -> Vec<String> {
    fn flatten(
        prefix: &str,
        value: &toml::Value,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let parse = |text: &str| {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(t) = text.parse::<toml::Table>() {
            flatten("", &toml::Value::Table(t), &mut out);
        }
        out
    };
    let (a, b) = (parse(a), parse(b));
    let mut keys: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(b.keys().filter(|k| !a.contains_key(*k)).cloned())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

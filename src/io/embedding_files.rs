//! Embedding files: what `embed` writes and `search`, `metrics` and training read.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::ImageSource;
use crate::io::{IoError, npy};
use crate::nn::precision::Precision;

/// The largest `PREFIX.model.json` read: far above any record's size.
const MODEL_RECORD_MAX_BYTES: u64 = 64 * 1024;

/// Which model made a set of embeddings. Scores between embeddings of two different models
/// mean nothing and look like any others, so the record travels with the embeddings
/// (`PREFIX.model.json`) and into index files built from them, and `search` and `serve`
/// compare it with the model they embed queries with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// The model's tensors' fingerprint (`checkpoint::model_fingerprint`): equal for every
    /// checkpoint holding the same model, whatever its file name.
    pub fingerprint: String,
    /// The checkpoint it was read from or is saved as, as given: for messages only.
    pub checkpoint: String,
    /// The arithmetic the images were embedded in.
    pub precision: Precision,
}

/// The files of one embedded set: `PREFIX.npy` (`[n, d]` float32), `PREFIX.paths.txt` (one
/// image per line), `PREFIX.model.json` (the [`ModelRecord`]) and, for a labelled split,
/// `PREFIX.labels.npy`.
pub struct EmbeddingFiles {
    pub prefix: PathBuf,
}

impl EmbeddingFiles {
    pub fn new(prefix: impl Into<PathBuf>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    fn with_suffix(&self, suffix: &str) -> PathBuf {
        let mut name = self.prefix.file_name().unwrap_or_default().to_os_string();
        name.push(suffix);
        self.prefix.with_file_name(name)
    }

    pub fn embeddings(&self) -> PathBuf {
        self.with_suffix(".npy")
    }

    pub fn labels(&self) -> PathBuf {
        self.with_suffix(".labels.npy")
    }

    pub fn paths(&self) -> PathBuf {
        self.with_suffix(".paths.txt")
    }

    pub fn model(&self) -> PathBuf {
        self.with_suffix(".model.json")
    }

    /// Every file a set may have, for checks that nothing is overwritten.
    pub fn all(&self) -> [PathBuf; 4] {
        [self.embeddings(), self.paths(), self.labels(), self.model()]
    }

    /// Writes a set; `labels` only for a labelled split. A labels file left by an earlier set
    /// under this prefix is removed when `labels` is `None`: read with the new rows it would
    /// label them wrongly (or be refused for its length), with nothing to tell.
    pub fn write(
        &self,
        values: &[f32],
        dim: usize,
        sources: &[ImageSource],
        labels: Option<&[i64]>,
        model: &ModelRecord,
    ) -> Result<(), IoError> {
        if let Some(dir) = self.prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| IoError::Create {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        // A pipe under one of the names would block the write, a device would swallow it.
        for path in self.all() {
            super::atomic::check_replaceable(&path)?;
        }
        // The record goes first and comes back last, so that a write cut short never leaves
        // an older model's record beside new rows.
        remove_if_present(&self.model())?;
        npy::write_matrix(&self.embeddings(), sources.len(), dim, values)?;
        let text: String = sources
            .iter()
            .map(|s| format!("{}\n", source_line(s)))
            .collect();
        std::fs::write(self.paths(), text).map_err(|source| IoError::Write {
            path: self.paths(),
            source,
        })?;
        match labels {
            Some(labels) => npy::write_labels(&self.labels(), labels)?,
            None => remove_if_present(&self.labels())?,
        }
        let json = serde_json::to_string_pretty(model).expect("plain data serialises");
        std::fs::write(self.model(), json + "\n").map_err(|source| IoError::Write {
            path: self.model(),
            source,
        })
    }

    /// The record of the model that made the set; `None` for sets written before records were
    /// kept, or by other tools.
    pub fn read_model(&self) -> Result<Option<ModelRecord>, IoError> {
        use std::io::Read;
        let path = self.model();
        let file = match super::regular::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IoError::Read { path, source }),
        };
        // A record is a few hundred bytes: read at most a bound's worth of whatever file holds
        // its name.
        let mut text = String::new();
        file.take(MODEL_RECORD_MAX_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|source| IoError::Read {
                path: path.clone(),
                source,
            })?;
        if text.len() as u64 > MODEL_RECORD_MAX_BYTES {
            return Err(IoError::ModelRecordSize {
                path,
                limit: MODEL_RECORD_MAX_BYTES,
            });
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| IoError::ModelRecord { path, source })
    }

    /// Reads a set written by [`write`](Self::write).
    pub fn read(&self) -> Result<(npy::Matrix, Vec<ImageSource>), IoError> {
        let matrix = npy::read_matrix(&self.embeddings())?;
        let path = self.paths();
        let text = super::regular::read_to_string(&path).map_err(|source| IoError::Read {
            path: path.clone(),
            source,
        })?;
        let sources: Vec<ImageSource> = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                parse_source_line(l).ok_or_else(|| IoError::SourceLine {
                    path: path.clone(),
                    line: i + 1,
                    text: l.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        if sources.len() != matrix.rows {
            return Err(IoError::RowMismatch {
                paths: path,
                listed: sources.len(),
                embeddings: self.embeddings(),
                rows: matrix.rows,
            });
        }
        Ok((matrix, sources))
    }
}

fn remove_if_present(path: &std::path::Path) -> Result<(), IoError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(IoError::Write {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// How an image is written in a paths file: its path, or `emoji:CLASS:ICON` for an icon of the
/// embedded emoji set.
pub fn source_line(source: &ImageSource) -> String {
    match source {
        ImageSource::File(p) => p.display().to_string(),
        ImageSource::Emoji { class, icon } => format!("emoji:{class}:{icon}"),
    }
}

pub fn parse_source_line(line: &str) -> Option<ImageSource> {
    if let Some(rest) = line.strip_prefix("emoji:") {
        let (c, i) = rest.split_once(':')?;
        return Some(ImageSource::Emoji {
            class: c.parse().ok()?,
            icon: i.parse().ok()?,
        });
    }
    (!line.is_empty()).then(|| ImageSource::File(line.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_files_round_trip_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = EmbeddingFiles::new(dir.path().join("sub/gallery"));
        let sources = vec![
            ImageSource::File("/x/a b.jpg".into()),
            ImageSource::Emoji { class: 3, icon: 1 },
        ];
        let model = ModelRecord {
            fingerprint: "fnv1a64:0123456789abcdef".into(),
            checkpoint: "runs/x/last.safetensors".into(),
            precision: Precision::F16,
        };
        assert_eq!(files.read_model().unwrap(), None);
        files
            .write(&[1.0, 2.0, 3.0, 4.0], 2, &sources, Some(&[7, 8]), &model)
            .unwrap();
        let (m, back) = files.read().unwrap();
        assert_eq!((m.rows, m.cols), (2, 2));
        assert_eq!(back, sources);
        assert_eq!(npy::read_labels(&files.labels()).unwrap(), vec![7, 8]);
        assert_eq!(files.read_model().unwrap(), Some(model.clone()));
        // An unlabelled set written over a labelled one takes its labels away with it.
        files
            .write(&[1.0, 2.0], 2, &sources[..1], None, &model)
            .unwrap();
        assert!(!files.labels().exists());
        std::fs::write(files.model(), "{\"fingerprint\": 3}").unwrap();
        let err = files.read_model().unwrap_err();
        assert!(
            matches!(&err, IoError::ModelRecord { path, .. } if *path == files.model()),
            "{err}"
        );
        // A record larger than any record is refused after a bounded read, and a device under
        // its name is refused before reading.
        std::fs::write(files.model(), " ".repeat(100_000)).unwrap();
        let err = files.read_model().unwrap_err();
        assert!(
            matches!(&err, IoError::ModelRecordSize { path, .. } if *path == files.model()),
            "{err}"
        );
        std::fs::remove_file(files.model()).unwrap();
        // A pipe under a name the set writes is refused before anything is written.
        assert!(
            std::process::Command::new("mkfifo")
                .arg(files.model())
                .status()
                .unwrap()
                .success()
        );
        let err = files
            .write(&[1.0, 2.0, 3.0, 4.0], 2, &sources, Some(&[7, 8]), &model)
            .unwrap_err();
        assert!(
            matches!(&err, IoError::NotReplaceable { path } if *path == files.model()),
            "{err}"
        );
        assert_eq!(npy::read_matrix(&files.embeddings()).unwrap().rows, 1);
        assert!(!files.labels().exists(), "nothing was written");
        std::fs::remove_file(files.model()).unwrap();
        std::os::unix::fs::symlink("/dev/zero", files.model()).unwrap();
        let err = files.read_model().unwrap_err();
        assert!(
            matches!(&err, IoError::Read { path, .. } if *path == files.model())
                && crate::error::chain(&err).contains("device"),
            "{err}"
        );
        files
            .write(&[1.0, 2.0, 3.0, 4.0], 2, &sources, Some(&[7, 8]), &model)
            .unwrap();
        std::fs::write(files.paths(), "/x/a.jpg\nemoji:1\n").unwrap();
        let err = files.read().err().unwrap();
        assert!(
            matches!(&err, IoError::SourceLine { path, line: 2, .. } if *path == files.paths()),
            "{err}"
        );
    }
}

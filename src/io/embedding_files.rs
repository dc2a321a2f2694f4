//! Embedding files: what `embed` writes and `search`, `metrics` and training read.

use std::path::PathBuf;

use crate::data::ImageSource;
use crate::io::{IoError, npy};

/// The files of one embedded set: `PREFIX.npy` (`[n, d]` float32), `PREFIX.paths.txt` (one
/// image per line) and, for a labelled split, `PREFIX.labels.npy`.
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

    /// Writes a set; `labels` only for a labelled split.
    pub fn write(
        &self,
        values: &[f32],
        dim: usize,
        sources: &[ImageSource],
        labels: Option<&[i64]>,
    ) -> Result<(), IoError> {
        if let Some(dir) = self.prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| IoError::Create {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        npy::write_matrix(&self.embeddings(), sources.len(), dim, values)?;
        let text: String = sources
            .iter()
            .map(|s| format!("{}\n", source_line(s)))
            .collect();
        std::fs::write(self.paths(), text).map_err(|source| IoError::Write {
            path: self.paths(),
            source,
        })?;
        if let Some(labels) = labels {
            npy::write_labels(&self.labels(), labels)?;
        }
        Ok(())
    }

    /// Reads a set written by [`write`](Self::write).
    pub fn read(&self) -> Result<(npy::Matrix, Vec<ImageSource>), IoError> {
        let matrix = npy::read_matrix(&self.embeddings())?;
        let path = self.paths();
        let text = std::fs::read_to_string(&path).map_err(|source| IoError::Read {
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
        files
            .write(&[1.0, 2.0, 3.0, 4.0], 2, &sources, Some(&[7, 8]))
            .unwrap();
        let (m, back) = files.read().unwrap();
        assert_eq!((m.rows, m.cols), (2, 2));
        assert_eq!(back, sources);
        assert_eq!(npy::read_labels(&files.labels()).unwrap(), vec![7, 8]);
        std::fs::write(files.paths(), "/x/a.jpg\nemoji:1\n").unwrap();
        let err = files.read().err().unwrap();
        assert!(
            matches!(&err, IoError::SourceLine { path, line: 2, .. } if *path == files.paths()),
            "{err}"
        );
    }
}

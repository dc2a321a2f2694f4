//! Retrieval with saved embeddings: the embedding files `embed` writes, exact cosine nearest
//! neighbours of query embeddings in a gallery, and a picture of the results.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::{Rgb, RgbImage};
use rayon::prelude::*;

use crate::data::ImageSource;
use crate::data::loader::ImageStore;
use crate::npy;

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
    ) -> Result<()> {
        if let Some(dir) = self.prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        npy::write_matrix(&self.embeddings(), sources.len(), dim, values)?;
        let text: String = sources
            .iter()
            .map(|s| format!("{}\n", source_line(s)))
            .collect();
        std::fs::write(self.paths(), text)
            .with_context(|| format!("cannot write {}", self.paths().display()))?;
        if let Some(labels) = labels {
            npy::write_labels(&self.labels(), labels)?;
        }
        Ok(())
    }

    /// Reads a set written by [`write`](Self::write).
    pub fn read(&self) -> Result<(npy::Matrix, Vec<ImageSource>)> {
        let matrix = npy::read_matrix(&self.embeddings())?;
        let path = self.paths();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let sources: Vec<ImageSource> = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                parse_source_line(l)
                    .with_context(|| format!("{}:{}: `{l}` is not an image", path.display(), i + 1))
            })
            .collect::<Result<_>>()?;
        if sources.len() != matrix.rows {
            bail!(
                "{} lists {} images but {} has {} rows",
                path.display(),
                sources.len(),
                self.embeddings().display(),
                matrix.rows
            );
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

/// Image files given on a command line: files as they are, folders expanded to the image
/// files inside them (recursively, sorted), and `emoji:CLASS:ICON` for embedded icons.
pub fn collect_images(args: &[PathBuf]) -> Result<Vec<ImageSource>> {
    const EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff"];
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read folder {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for arg in args {
        let text = arg.to_string_lossy();
        if text.starts_with("emoji:") {
            out.push(
                parse_source_line(&text)
                    .with_context(|| format!("`{text}` is not of the form emoji:CLASS:ICON"))?,
            );
        } else if arg.is_dir() {
            let mut files = Vec::new();
            walk(arg, &mut files)?;
            if files.is_empty() {
                bail!("{} holds no image files", arg.display());
            }
            out.extend(files.into_iter().map(ImageSource::File));
        } else if arg.is_file() {
            out.push(ImageSource::File(arg.clone()));
        } else {
            bail!("{} does not exist", arg.display());
        }
    }
    Ok(out)
}

/// Rows scaled to unit length (zero rows stay zero).
pub fn normalise_rows(values: &[f32], dim: usize) -> Vec<f32> {
    let mut out = values.to_vec();
    for row in out.chunks_mut(dim.max(1)) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            row.iter_mut().for_each(|v| *v /= n);
        }
    }
    out
}

/// The `k` gallery rows most cosine-similar to each query row, best first: `(row, score)`.
/// Exact, one pass over the gallery per query, queries in parallel.
pub fn nearest(queries: &[f32], gallery: &[f32], dim: usize, k: usize) -> Vec<Vec<(usize, f32)>> {
    let q = normalise_rows(queries, dim);
    let g = normalise_rows(gallery, dim);
    q.par_chunks(dim)
        .map(|query| {
            let mut scored: Vec<(usize, f32)> = g
                .chunks(dim)
                .enumerate()
                .map(|(i, row)| (i, row.iter().zip(query).map(|(a, b)| a * b).sum()))
                .collect();
            let k = k.min(scored.len());
            if k == 0 {
                return Vec::new();
            }
            scored.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            scored.truncate(k);
            scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            scored
        })
        .collect()
}

/// One row of a results picture: the query and its results, each result marked right
/// (green), wrong (red) or unknown (grey) when labels are not known.
pub struct GridRow {
    pub query: ImageSource,
    pub results: Vec<(ImageSource, Option<bool>)>,
}

/// Draws each query (blue frame) followed by its results, one row per query, `cell` pixels a
/// tile.
pub fn result_grid(store: &ImageStore, rows: &[GridRow], cell: u32) -> Result<RgbImage> {
    let border = 4;
    let gap = 6;
    let cols = rows.iter().map(|r| r.results.len() + 1).max().unwrap_or(1) as u32;
    let tile = cell + 2 * border;
    let width = gap + cols * (tile + gap) + gap;
    let height = gap + rows.len() as u32 * (tile + gap);
    let mut out = RgbImage::from_pixel(width, height.max(1), Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        let y = gap + r as u32 * (tile + gap);
        let mut items = vec![(&row.query, Rgb([40, 90, 220]))];
        for (source, right) in &row.results {
            let colour = match right {
                Some(true) => Rgb([40, 170, 60]),
                Some(false) => Rgb([220, 50, 40]),
                None => Rgb([160, 160, 160]),
            };
            items.push((source, colour));
        }
        for (c, (source, colour)) in items.into_iter().enumerate() {
            // The query gets an extra gap after it.
            let x = gap + c as u32 * (tile + gap) + if c > 0 { gap } else { 0 };
            let img = store
                .load(source)
                .with_context(|| format!("cannot load {source}"))?;
            let thumb = image::imageops::resize(
                img.as_ref(),
                cell,
                cell,
                image::imageops::FilterType::Triangle,
            );
            let framed = {
                let mut f = RgbImage::from_pixel(tile, tile, colour);
                image::imageops::replace(&mut f, &thumb, border as i64, border as i64);
                f
            };
            if x + tile <= out.width() {
                image::imageops::replace(&mut out, &framed, x as i64, y as i64);
            }
        }
    }
    Ok(out)
}

/// Writes a PNG, naming the file in errors.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    img.save(path)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_ranks_by_cosine_and_breaks_ties_by_index() {
        let gallery = [1.0, 0.0, 0.0, 1.0, 2.0, 0.1, 1.0, 0.0];
        let queries = [3.0, 0.0, 0.0, -1.0];
        let r = nearest(&queries, &gallery, 2, 3);
        assert_eq!(r[0].iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 3, 2]);
        assert!((r[0][0].1 - 1.0).abs() < 1e-6);
        // (0, -1) is orthogonal to rows 0 and 3 (a tie, broken by index) and opposed to row 1.
        assert_eq!(r[1].iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 3, 2]);
        assert_eq!(nearest(&queries, &gallery, 2, 10)[0].len(), 4);
    }

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
        let err = format!("{:#}", files.read().err().unwrap());
        assert!(err.contains("gallery.paths.txt:2"), "{err}");
    }
}

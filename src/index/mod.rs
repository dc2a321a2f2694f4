//! Retrieval over a gallery: exact (every row scored) or through an approximate HNSW index
//! file, behind one [`Gallery`] interface that `search` and `serve` use.
//!
//! An index file is self-contained: a small JSON header with the options, the gallery's
//! image lines and labels, followed by usearch's serialised HNSW graph and vectors. Opening
//! it memory-maps the file and lets usearch view the graph in place, so a large index costs
//! page cache rather than process memory and opens without reading it all.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::ImageSource;
use crate::eval::topk::{normalise_rows, top_k};
use crate::io::embedding_files::{ModelRecord, parse_source_line, source_line};

/// How two embeddings are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// Cosine similarity (what training optimises and `search` ranks by).
    Cosine,
    /// Raw inner product, for embeddings whose length carries meaning.
    InnerProduct,
}

/// How the index stores each vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Quantisation {
    F32,
    F16,
    /// One byte per value, each row scaled to use the whole range (cosine only).
    I8,
}

crate::string_forms_from_value_enum!(Metric: "metric", Quantisation: "quantisation");

/// Below this many rows, [`SearchMode::Auto`] scores every row: it is then about as fast as
/// the graph and has no recall loss.
pub const EXACT_BELOW: usize = 20_000;

/// How a query is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchMode {
    /// Exact for small galleries ([`EXACT_BELOW`]), the graph otherwise.
    Auto,
    /// Every row scored.
    Exact,
    /// The graph, whatever the size.
    Approximate,
}

/// Options of [`build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildOptions {
    pub metric: Metric,
    pub quantisation: Quantisation,
    /// Graph edges per node (HNSW's M).
    pub connectivity: usize,
    /// Candidate list while inserting (efConstruction).
    pub expansion_add: usize,
    /// Candidate list while searching (ef), stored in the file as the default.
    pub expansion_search: usize,
}

impl BuildOptions {
    /// Largest graph degree (M) accepted: HNSW gains nothing past a few dozen, and memory grows
    /// with it per row.
    pub const MAX_CONNECTIVITY: usize = 256;
    /// Largest candidate list (efConstruction, ef) accepted.
    pub const MAX_EXPANSION: usize = 65_536;

    /// Refuses settings out of range before anything is allocated from them.
    pub fn check(&self) -> Result<(), IndexError> {
        let bad = |setting: &'static str, value: usize, min: usize, max: usize| {
            (!(min..=max).contains(&value)).then_some(IndexError::Setting {
                setting,
                value,
                min,
                max,
            })
        };
        match bad("connectivity", self.connectivity, 2, Self::MAX_CONNECTIVITY)
            .or_else(|| bad("expansion_add", self.expansion_add, 1, Self::MAX_EXPANSION))
            .or_else(|| {
                bad(
                    "expansion_search",
                    self.expansion_search,
                    1,
                    Self::MAX_EXPANSION,
                )
            }) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            metric: Metric::Cosine,
            quantisation: Quantisation::F32,
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] crate::io::IoError),
    #[error("{} is not a gca-hng index file ({why})", path.display())]
    NotAnIndex { path: PathBuf, why: String },
    #[error("the index library failed while {what}: {message}")]
    Library { what: &'static str, message: String },
    #[error("the gallery is empty")]
    Empty,
    #[error("{rows} rows of {dim} values need {} numbers, but {given} were given", rows * dim)]
    Shape {
        rows: usize,
        dim: usize,
        given: usize,
    },
    #[error("{listed} labels for {rows} rows")]
    Labels { listed: usize, rows: usize },
    #[error(
        "row {row} is not finite (NaN, infinite, or beyond float32's range); the model that embedded it may have diverged"
    )]
    NotFinite { row: usize },
    /// A query given as numbers, not embedded by the model: the numbers themselves are wrong.
    #[error(
        "the query's value {position} is not finite as float32 (NaN, infinite, or beyond float32's range of about 3.4e38)"
    )]
    QueryNotFinite { position: usize },
    #[error(
        "int8 storage is for the cosine metric (each row is scaled to its codes' range, which inner products would not survive); use --quantisation f16 with --metric inner-product"
    )]
    Int8NeedsCosine,
    #[error("the query has {given} values but the gallery's embeddings have {dim}")]
    QueryDim { given: usize, dim: usize },
    #[error("the gallery has no row {row} (it has {rows})")]
    NoRow { row: usize, rows: usize },
    #[error("the index's {setting} must be between {min} and {max} (it is {value})")]
    Setting {
        setting: &'static str,
        value: usize,
        min: usize,
        max: usize,
    },
}

fn library<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> IndexError {
    move |e| IndexError::Library {
        what,
        message: e.to_string(),
    }
}

/// One result: a gallery row and its similarity (cosine or inner product; higher is closer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub row: usize,
    pub score: f32,
}

/// What retrieval needs of a gallery, exact or indexed.
pub trait Gallery: Send + Sync {
    fn rows(&self) -> usize;
    fn dim(&self) -> usize;
    fn metric(&self) -> Metric;
    fn source(&self, row: usize) -> &ImageSource;
    fn label(&self, row: usize) -> Option<i64>;
    /// The stored embedding of a row, as stored: for cosine scaled (unit length, or to the
    /// int8 range) and rounded when the index quantises.
    fn vector(&self, row: usize) -> Result<Vec<f32>, IndexError>;
    /// The `k` closest rows to `query`, best first.
    fn search(&self, query: &[f32], k: usize, mode: SearchMode) -> Result<Vec<Hit>, IndexError>;
    /// Words for logs: "exact, 1200 rows" or "hnsw f16 cosine, 1000000 rows".
    fn describe(&self) -> String;
    /// The model that embedded the rows, when recorded.
    fn model(&self) -> Option<&ModelRecord>;
}

/// Scores every row: the embeddings held in memory, unit length.
pub struct ExactGallery {
    values: Vec<f32>,
    dim: usize,
    sources: Vec<ImageSource>,
    labels: Option<Vec<i64>>,
    model: Option<ModelRecord>,
}

impl ExactGallery {
    /// `values` is `[rows, dim]` row-major (any length; rows are normalised here).
    pub fn new(
        values: &[f32],
        dim: usize,
        sources: Vec<ImageSource>,
        labels: Option<Vec<i64>>,
    ) -> Result<Self, IndexError> {
        check_rows(values, dim, sources.len(), labels.as_deref())?;
        Ok(Self {
            values: normalise_rows(values, dim),
            dim,
            sources,
            labels,
            model: None,
        })
    }

    /// Records the model that embedded the rows.
    pub fn with_model(self, model: Option<ModelRecord>) -> Self {
        Self { model, ..self }
    }
}

fn check_rows(
    values: &[f32],
    dim: usize,
    rows: usize,
    labels: Option<&[i64]>,
) -> Result<(), IndexError> {
    if rows == 0 || dim == 0 {
        return Err(IndexError::Empty);
    }
    if values.len() != rows * dim {
        return Err(IndexError::Shape {
            rows,
            dim,
            given: values.len(),
        });
    }
    if let Some(l) = labels
        && l.len() != rows
    {
        return Err(IndexError::Labels {
            listed: l.len(),
            rows,
        });
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(IndexError::NotFinite { row: i / dim });
    }
    Ok(())
}

fn check_query(query: &[f32], dim: usize) -> Result<(), IndexError> {
    if query.len() != dim {
        return Err(IndexError::QueryDim {
            given: query.len(),
            dim,
        });
    }
    if let Some(position) = query.iter().position(|v| !v.is_finite()) {
        return Err(IndexError::QueryNotFinite { position });
    }
    Ok(())
}

impl Gallery for ExactGallery {
    fn rows(&self) -> usize {
        self.sources.len()
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn metric(&self) -> Metric {
        Metric::Cosine
    }
    fn source(&self, row: usize) -> &ImageSource {
        &self.sources[row]
    }
    fn label(&self, row: usize) -> Option<i64> {
        self.labels.as_ref().map(|l| l[row])
    }
    fn vector(&self, row: usize) -> Result<Vec<f32>, IndexError> {
        if row >= self.rows() {
            return Err(IndexError::NoRow {
                row,
                rows: self.rows(),
            });
        }
        Ok(self.values[row * self.dim..(row + 1) * self.dim].to_vec())
    }
    fn search(&self, query: &[f32], k: usize, _mode: SearchMode) -> Result<Vec<Hit>, IndexError> {
        check_query(query, self.dim)?;
        let q = normalise_rows(query, self.dim);
        let scores: Vec<f32> = self
            .values
            .par_chunks(self.dim)
            .map(|row| row.iter().zip(&q).map(|(a, b)| a * b).sum())
            .collect();
        Ok(top_k(&scores, (0..scores.len()).collect(), k)
            .into_iter()
            .map(|row| Hit {
                row,
                score: scores[row],
            })
            .collect())
    }
    fn describe(&self) -> String {
        format!("exact cosine, {} rows of {}", self.rows(), self.dim)
    }
    fn model(&self) -> Option<&ModelRecord> {
        self.model.as_ref()
    }
}

const MAGIC: &[u8; 8] = b"GCAHNGIX";
const FORMAT_VERSION: u32 = 1;
/// usearch reads its vectors in place; an aligned start keeps those reads aligned.
const ALIGN: usize = 64;

/// The JSON header of an index file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Header {
    version: u32,
    metric: Metric,
    quantisation: Quantisation,
    dim: usize,
    rows: usize,
    connectivity: usize,
    expansion_add: usize,
    expansion_search: usize,
    /// Byte range of usearch's blob in the file.
    blob_offset: usize,
    blob_len: usize,
    /// One line per row, as in `PREFIX.paths.txt`.
    sources: Vec<String>,
    labels: Option<Vec<i64>>,
    /// CRC-32 of the graph's bytes and of the image list and labels (see
    /// [`Header::lists_crc32`]): a flipped bit in either would otherwise change search results
    /// without a word.
    /// Absent in files written before they were recorded, which open unchecked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    graph_crc32: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lists_crc32: Option<u32>,
    /// The model that embedded the rows: absent when unknown, and in files written before it
    /// was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model: Option<ModelRecord>,
}

impl Header {
    /// The bytes `lists_crc32` covers: the image list and the labels, as JSON.
    fn lists_crc32(&self) -> u32 {
        let bytes =
            serde_json::to_vec(&(&self.sources, &self.labels)).expect("plain data serialises");
        crc32fast::hash(&bytes)
    }
}

fn usearch_options(h: &Header) -> usearch::IndexOptions {
    usearch::IndexOptions {
        dimensions: h.dim,
        metric: match h.metric {
            Metric::Cosine => usearch::MetricKind::Cos,
            Metric::InnerProduct => usearch::MetricKind::IP,
        },
        quantization: match h.quantisation {
            Quantisation::F32 => usearch::ScalarKind::F32,
            Quantisation::F16 => usearch::ScalarKind::F16,
            Quantisation::I8 => usearch::ScalarKind::I8,
        },
        connectivity: h.connectivity,
        expansion_add: h.expansion_add,
        expansion_search: h.expansion_search,
        multi: false,
    }
}

/// int8 codes of a row for a cosine index. Cosine ignores a row's length, so each row is
/// scaled to a largest magnitude of 127 before rounding: every row then uses the whole code
/// range. (usearch's own conversion scales rows to unit length first, which leaves a row of a
/// few hundred values with a handful of distinct codes; BENCHMARKS.md has the recall it cost.)
fn int8_codes(row: &[f32]) -> Vec<i8> {
    let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if m > 0.0 { 127.0 / m } else { 0.0 };
    row.iter()
        .map(|v| (v * scale).round().clamp(-127.0, 127.0) as i8)
        .collect()
}

/// Rows added between two progress calls.
const PROGRESS_CHUNK: usize = 4096;

/// What an index file records of its rows besides their vectors.
#[derive(Clone, Copy, Debug)]
pub struct RowRecords<'a> {
    /// One image per row.
    pub sources: &'a [ImageSource],
    pub labels: Option<&'a [i64]>,
    /// The model that embedded the rows, when known.
    pub model: Option<&'a ModelRecord>,
}

impl<'a> RowRecords<'a> {
    /// Rows of an unknown model.
    pub fn new(sources: &'a [ImageSource], labels: Option<&'a [i64]>) -> Self {
        Self {
            sources,
            labels,
            model: None,
        }
    }
}

/// Builds an index of `values` (`[rows, dim]`) and writes it to `path` (atomically: a
/// temporary file renamed into place). `progress(done, total)` follows the insertion.
pub fn build(
    values: &[f32],
    dim: usize,
    records: &RowRecords,
    options: &BuildOptions,
    path: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(), IndexError> {
    // Before the work, not only at the final rename.
    crate::io::atomic::check_replaceable(path)?;
    let RowRecords {
        sources,
        labels,
        model,
    } = *records;
    options.check()?;
    let rows = sources.len();
    check_rows(values, dim, rows, labels)?;
    if options.quantisation == Quantisation::I8 && options.metric != Metric::Cosine {
        return Err(IndexError::Int8NeedsCosine);
    }
    let stored = match options.metric {
        // Unit rows keep f16 well scaled (int8 rows are scaled in `int8_codes`).
        Metric::Cosine => normalise_rows(values, dim),
        Metric::InnerProduct => values.to_vec(),
    };
    let mut header = Header {
        version: FORMAT_VERSION,
        metric: options.metric,
        quantisation: options.quantisation,
        dim,
        rows,
        connectivity: options.connectivity,
        expansion_add: options.expansion_add,
        expansion_search: options.expansion_search,
        blob_offset: 0,
        blob_len: 0,
        sources: sources.iter().map(source_line).collect(),
        labels: labels.map(<[i64]>::to_vec),
        graph_crc32: None,
        lists_crc32: None,
        model: model.cloned(),
    };
    header.lists_crc32 = Some(header.lists_crc32());
    let index = usearch::Index::new(&usearch_options(&header)).map_err(library("creating"))?;
    index
        .reserve_capacity_and_threads(rows, rayon::current_num_threads())
        .map_err(library("reserving memory"))?;
    let mut done = 0;
    for chunk in stored.chunks(PROGRESS_CHUNK * dim) {
        let first = done;
        chunk
            .par_chunks(dim)
            .enumerate()
            .try_for_each(|(i, row)| {
                let key = (first + i) as u64;
                match options.quantisation {
                    Quantisation::I8 => index.add(key, &int8_codes(row)),
                    _ => index.add(key, row),
                }
            })
            .map_err(library("adding rows"))?;
        done += chunk.len() / dim;
        progress(done, rows);
    }
    drop(stored);
    let tmp = crate::io::atomic::temporary_path(path);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| IndexError::Io {
            action: "create",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    // usearch writes its part to a file of its own, copied in after the header below: no
    // second copy of the whole index in memory.
    let mut blob_path = tmp.clone().into_os_string();
    blob_path.push(".graph");
    let blob_path = PathBuf::from(blob_path);
    let saved = blob_path
        .to_str()
        .ok_or_else(|| IndexError::Io {
            action: "write",
            path: blob_path.clone(),
            source: std::io::Error::other("usearch needs a UTF-8 path"),
        })
        .and_then(|p| index.save(p).map_err(library("writing the graph")));
    drop(index);
    let written = saved.and_then(|()| write_index_file(&mut header, &blob_path, &tmp));
    let _ = std::fs::remove_file(&blob_path);
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    Ok(crate::io::atomic::finish_atomic(&tmp, path)?)
}

/// Writes `tmp`: the signature, the header and the graph file at `blob_path`.
fn write_index_file(header: &mut Header, blob_path: &Path, tmp: &Path) -> Result<(), IndexError> {
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| IndexError::Io {
            action,
            path: path.clone(),
            source,
        }
    };
    let mut blob = File::open(blob_path).map_err(io("open", blob_path))?;
    header.blob_len = blob.metadata().map_err(io("read", blob_path))?.len() as usize;
    // A first pass for the checksum that the header carries; the file is in the page cache
    // for the copy below.
    let mut crc = crc32fast::Hasher::new();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, &mut blob);
    loop {
        let buf = std::io::BufRead::fill_buf(&mut reader).map_err(io("read", blob_path))?;
        if buf.is_empty() {
            break;
        }
        crc.update(buf);
        let n = buf.len();
        std::io::BufRead::consume(&mut reader, n);
    }
    drop(reader);
    header.graph_crc32 = Some(crc.finalize());
    std::io::Seek::rewind(&mut blob).map_err(io("read", blob_path))?;
    // The header's length depends on the offset it records; settle it by iterating (the
    // offset's digits change at most a couple of times).
    let mut json = serde_json::to_vec(&header).expect("plain data serialises");
    loop {
        let offset = (MAGIC.len() + 8 + json.len()).next_multiple_of(ALIGN);
        if offset == header.blob_offset {
            break;
        }
        header.blob_offset = offset;
        json = serde_json::to_vec(&header).expect("plain data serialises");
    }
    let write = io("write", tmp);
    let mut out = BufWriter::new(File::create(tmp).map_err(io("create", tmp))?);
    out.write_all(MAGIC).map_err(&write)?;
    out.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(&write)?;
    out.write_all(&json).map_err(&write)?;
    let pad = header.blob_offset - (MAGIC.len() + 8 + json.len());
    out.write_all(&vec![0u8; pad]).map_err(&write)?;
    std::io::copy(&mut blob, &mut out).map_err(&write)?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .map_err(&write)
}

/// An opened index file.
pub struct IndexFile {
    path: PathBuf,
    header: Header,
    sources: Vec<ImageSource>,
    // Declared before `_map`: usearch holds pointers into the mapping, so it must go first.
    index: usearch::Index,
    _map: memmap2::Mmap,
}

impl IndexFile {
    /// Opens and checks `path`; the graph is viewed in place, not copied.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let not = |why: String| IndexError::NotAnIndex {
            path: path.to_path_buf(),
            why,
        };
        let file = crate::io::regular::open(path).map_err(|source| IndexError::Io {
            action: "open",
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the mapping is read-only; a file changed underneath by another process
        // is outside what any reader can guard against, as with every memory-mapped file.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| IndexError::Io {
            action: "map",
            path: path.to_path_buf(),
            source,
        })?;
        if map.len() < MAGIC.len() + 8 || &map[..MAGIC.len()] != MAGIC {
            return Err(not("it does not start with the index signature".into()));
        }
        let json_len = u64::from_le_bytes(map[8..16].try_into().expect("8 bytes")) as usize;
        let json = map
            .get(16..16usize.saturating_add(json_len))
            .ok_or_else(|| not("it is shorter than its header says".into()))?;
        let header: Header = serde_json::from_slice(json)
            .map_err(|e| not(format!("its header does not read: {e}")))?;
        if header.version != FORMAT_VERSION {
            return Err(not(format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                header.version
            )));
        }
        let end = header.blob_offset.checked_add(header.blob_len);
        if header.blob_offset < 16 + json_len || end != Some(map.len()) {
            return Err(not(format!(
                "it is {} bytes long but its header describes {} (truncated or appended to)",
                map.len(),
                end.map_or("more".into(), |e| e.to_string())
            )));
        }
        if header.sources.len() != header.rows
            || header
                .labels
                .as_ref()
                .is_some_and(|l| l.len() != header.rows)
        {
            return Err(not("its image list and rows disagree".into()));
        }
        if header
            .lists_crc32
            .is_some_and(|c| c != header.lists_crc32())
        {
            return Err(not(
                "its image list or labels do not match their checksum (the file is damaged)".into(),
            ));
        }
        let sources = header
            .sources
            .iter()
            .enumerate()
            .map(|(i, l)| {
                parse_source_line(l).ok_or_else(|| not(format!("image line {} is empty", i + 1)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let blob = &map[header.blob_offset..];
        if header
            .graph_crc32
            .is_some_and(|c| c != crc32fast::hash(blob))
        {
            return Err(not(
                "its graph does not match its checksum (the file is damaged)".into(),
            ));
        }
        let meta = usearch::Index::metadata_from_buffer(blob)
            .map_err(|e| not(format!("its graph does not read: {e}")))?;
        let options = usearch_options(&header);
        if meta.dimensions as usize != header.dim
            || meta.count_present as usize != header.rows
            || meta.metric != options.metric
            || meta.quantization != options.quantization
        {
            return Err(not(format!(
                "its graph ({} rows of {}, {:?}, {:?}) and its header ({} rows of {}, {}, {}) disagree",
                meta.count_present,
                meta.dimensions,
                meta.metric,
                meta.quantization,
                header.rows,
                header.dim,
                header.metric,
                header.quantisation
            )));
        }
        let index = usearch::Index::new(&options).map_err(library("creating"))?;
        // SAFETY: `blob` points into `map`, which `IndexFile` owns and drops after `index`.
        unsafe { index.view_from_buffer(blob) }.map_err(library("viewing the graph"))?;
        Ok(Self {
            path: path.to_path_buf(),
            header,
            sources,
            index,
            _map: map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn quantisation(&self) -> Quantisation {
        self.header.quantisation
    }

    /// Sets the search candidate list (ef); higher is slower and closer to exact.
    pub fn set_expansion_search(&self, ef: usize) {
        self.index.change_expansion_search(ef.max(1));
    }

    /// Process memory the library reports for the index (the viewed file not included).
    pub fn memory_usage(&self) -> usize {
        self.index.memory_usage()
    }
}

impl Gallery for IndexFile {
    fn rows(&self) -> usize {
        self.header.rows
    }
    fn dim(&self) -> usize {
        self.header.dim
    }
    fn metric(&self) -> Metric {
        self.header.metric
    }
    fn source(&self, row: usize) -> &ImageSource {
        &self.sources[row]
    }
    fn label(&self, row: usize) -> Option<i64> {
        self.header.labels.as_ref().map(|l| l[row])
    }
    fn vector(&self, row: usize) -> Result<Vec<f32>, IndexError> {
        if row >= self.rows() {
            return Err(IndexError::NoRow {
                row,
                rows: self.rows(),
            });
        }
        let mut out = vec![0f32; self.header.dim];
        self.index
            .get(row as u64, &mut out)
            .map_err(library("reading a row"))?;
        Ok(out)
    }
    fn search(&self, query: &[f32], k: usize, mode: SearchMode) -> Result<Vec<Hit>, IndexError> {
        check_query(query, self.header.dim)?;
        if k == 0 {
            return Ok(Vec::new());
        }
        let exact = match mode {
            SearchMode::Exact => true,
            SearchMode::Approximate => false,
            SearchMode::Auto => self.rows() < EXACT_BELOW,
        };
        let m = match (self.header.quantisation, exact) {
            (Quantisation::I8, true) => self.index.exact_search(&int8_codes(query), k),
            (Quantisation::I8, false) => self.index.search(&int8_codes(query), k),
            (_, true) => self.index.exact_search(query, k),
            (_, false) => self.index.search(query, k),
        }
        .map_err(library("searching"))?;
        let mut hits: Vec<Hit> = m
            .keys
            .iter()
            .zip(&m.distances)
            .map(|(&key, &d)| Hit {
                row: key as usize,
                // usearch's distances are 1 - similarity for both metrics.
                score: 1.0 - d,
            })
            .collect();
        // One order everywhere: higher score first, ties to the lower row.
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));
        Ok(hits)
    }
    fn describe(&self) -> String {
        format!(
            "hnsw {} {}, {} rows of {} ({})",
            self.header.quantisation,
            self.header.metric,
            self.header.rows,
            self.header.dim,
            self.path.display()
        )
    }
    fn model(&self) -> Option<&ModelRecord> {
        self.header.model.as_ref()
    }
}

/// Recall of `found` against `truth` at `k`: the share of the true `k` nearest rows that
/// were found among the first `k`, averaged over queries.
pub fn recall_at(truth: &[Vec<Hit>], found: &[Vec<Hit>], k: usize) -> f64 {
    let mut sum = 0.0;
    for (t, f) in truth.iter().zip(found) {
        let t: Vec<usize> = t.iter().take(k).map(|h| h.row).collect();
        if t.is_empty() {
            continue;
        }
        let hit = f.iter().take(k).filter(|h| t.contains(&h.row)).count();
        sum += hit as f64 / t.len() as f64;
    }
    sum / truth.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows around a few well-separated centres, so that nearest neighbours are unambiguous.
    fn clustered(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let centres: Vec<f32> = (0..8 * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        (0..rows)
            .flat_map(|r| {
                let c = (r % 8) * dim;
                let noise: Vec<f32> = (0..dim)
                    .map(|j| centres[c + j] + rng.random_range(-0.3f32..0.3))
                    .collect();
                noise
            })
            .collect()
    }

    fn sources(rows: usize) -> Vec<ImageSource> {
        (0..rows)
            .map(|i| ImageSource::File(format!("g/{i}.jpg").into()))
            .collect()
    }

    #[test]
    fn an_index_file_round_trips_and_matches_exact_search() {
        let (rows, dim) = (600, 24);
        let values = clustered(rows, dim, 1);
        let labels: Vec<i64> = (0..rows as i64).map(|i| i % 8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/g.index");
        let mut calls = Vec::new();
        build(
            &values,
            dim,
            &RowRecords::new(&sources(rows), Some(&labels)),
            &BuildOptions::default(),
            &path,
            &mut |d, t| calls.push((d, t)),
        )
        .unwrap();
        assert_eq!(calls.last(), Some(&(rows, rows)));
        // Nothing but the index is left beside it (no partial file, no graph file).
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("g.index")]);
        let index = IndexFile::open(&path).unwrap();
        assert_eq!((index.rows(), index.dim()), (rows, dim));
        assert_eq!(index.source(7), &ImageSource::File("g/7.jpg".into()));
        assert_eq!(index.label(9), Some(1));
        let exact = ExactGallery::new(&values, dim, sources(rows), None).unwrap();
        let queries = clustered(20, dim, 2);
        let mut truth = Vec::new();
        let mut found = Vec::new();
        for q in queries.chunks(dim) {
            let t = exact.search(q, 10, SearchMode::Exact).unwrap();
            let e = index.search(q, 10, SearchMode::Exact).unwrap();
            // Exact search through the index agrees with the in-memory one.
            assert_eq!(
                t.iter().map(|h| h.row).collect::<Vec<_>>(),
                e.iter().map(|h| h.row).collect::<Vec<_>>()
            );
            for (a, b) in t.iter().zip(&e) {
                assert!((a.score - b.score).abs() < 1e-4, "{a:?} {b:?}");
            }
            truth.push(t);
            found.push(index.search(q, 10, SearchMode::Approximate).unwrap());
        }
        assert!(recall_at(&truth, &found, 10) > 0.9);
        // A stored row finds itself first.
        let v = index.vector(42).unwrap();
        assert_eq!(
            index.search(&v, 1, SearchMode::Approximate).unwrap()[0].row,
            42
        );
    }

    #[test]
    fn quantised_indexes_keep_the_nearest_row() {
        let (rows, dim) = (300, 32);
        let values = clustered(rows, dim, 3);
        let dir = tempfile::tempdir().unwrap();
        for q in [Quantisation::F16, Quantisation::I8] {
            let path = dir.path().join(format!("{q}.index"));
            let options = BuildOptions {
                quantisation: q,
                ..Default::default()
            };
            build(
                &values,
                dim,
                &RowRecords::new(&sources(rows), None),
                &options,
                &path,
                &mut |_, _| {},
            )
            .unwrap();
            let index = IndexFile::open(&path).unwrap();
            assert_eq!(index.quantisation(), q);
            for row in [0, 17, 299] {
                let query = &values[row * dim..(row + 1) * dim];
                // Scored exactly on the quantised rows, the row itself stays first.
                let hits = index.search(query, 1, SearchMode::Exact).unwrap();
                assert_eq!(hits[0].row, row, "{q}, exact");
                // Through the graph, it is among the first few: the graph is built on
                // several threads, so which near neighbour it ranks first may vary from build
                // to build (once, local CI saw row 107 of the same cluster ahead of row 299).
                let hits = index.search(query, 5, SearchMode::Approximate).unwrap();
                assert!(
                    hits.iter().any(|h| h.row == row),
                    "{q}, approximate: {hits:?}"
                );
            }
        }
    }

    #[test]
    fn int8_cosine_keeps_the_ranking_of_wide_embeddings() {
        // Unit rows of 256 values have entries of a few hundredths: stored as they are,
        // int8 would leave them a handful of codes. Compared exactly (no graph), the int8
        // ranking must stay close to the f32 one.
        let (rows, dim) = (400, 256);
        let values = clustered(rows, dim, 5);
        let exact = ExactGallery::new(&values, dim, sources(rows), None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i8.index");
        let options = BuildOptions {
            quantisation: Quantisation::I8,
            ..Default::default()
        };
        build(
            &values,
            dim,
            &RowRecords::new(&sources(rows), None),
            &options,
            &path,
            &mut |_, _| {},
        )
        .unwrap();
        let index = IndexFile::open(&path).unwrap();
        let queries = clustered(30, dim, 6);
        let (truth, found): (Vec<_>, Vec<_>) = queries
            .chunks(dim)
            .map(|q| {
                (
                    exact.search(q, 10, SearchMode::Exact).unwrap(),
                    index.search(q, 10, SearchMode::Exact).unwrap(),
                )
            })
            .unzip();
        let r = recall_at(&truth, &found, 10);
        assert!(r > 0.9, "int8 recall@10 {r}");
    }

    #[test]
    fn inner_product_int8_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let options = BuildOptions {
            metric: Metric::InnerProduct,
            quantisation: Quantisation::I8,
            ..Default::default()
        };
        let err = build(
            &[0.5, 0.2, 3.0, 0.1],
            2,
            &RowRecords::new(&sources(2), None),
            &options,
            &dir.path().join("x"),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(err, IndexError::Int8NeedsCosine), "{err}");
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn damaged_files_are_refused_with_a_reason() {
        let (rows, dim) = (50, 8);
        let values = clustered(rows, dim, 4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.index");
        build(
            &values,
            dim,
            &RowRecords::new(&sources(rows), None),
            &BuildOptions::default(),
            &path,
            &mut |_, _| {},
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let bad = dir.path().join("bad.index");
        for (what, content) in [
            ("truncated", bytes[..bytes.len() - 100].to_vec()),
            ("not an index", b"hello world, not an index".to_vec()),
            ("cut in the header", bytes[..40].to_vec()),
            ("empty", Vec::new()),
        ] {
            std::fs::write(&bad, &content).unwrap();
            let err = IndexFile::open(&bad).err().unwrap();
            assert!(
                matches!(&err, IndexError::NotAnIndex { path, .. } if *path == bad),
                "{what}: {err}"
            );
        }
        // One flipped bit in the graph, in a label, or a header that names another storage
        // type: each is refused, where each would otherwise change results silently.
        let offset = {
            let json_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
            let header: Header = serde_json::from_slice(&bytes[16..16 + json_len]).unwrap();
            assert!(header.graph_crc32.is_some() && header.lists_crc32.is_some());
            header.blob_offset
        };
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[(offset + last) / 2] ^= 1;
        std::fs::write(&bad, &flipped).unwrap();
        let err = IndexFile::open(&bad).err().unwrap().to_string();
        assert!(err.contains("graph does not match its checksum"), "{err}");
        // The header with `from` replaced by `to` (same length), as `open` reports it.
        let text = String::from_utf8_lossy(&bytes[..offset]).into_owned();
        let open_edited = |from: &str, to: &str| {
            let edited = text.replacen(from, to, 1);
            assert_ne!(edited, text, "{from} is not in the header");
            let mut changed = edited.into_bytes();
            changed.extend_from_slice(&bytes[offset..]);
            std::fs::write(&bad, &changed).unwrap();
            IndexFile::open(&bad).err().unwrap().to_string()
        };
        let err = open_edited("g/1.jpg", "g/7.jpg");
        assert!(err.contains("image list or labels do not match"), "{err}");
        let err = open_edited("\"quantisation\":\"f32\"", "\"quantisation\":\"f16\"");
        assert!(err.contains("disagree"), "{err}");

        let index = IndexFile::open(&path).unwrap();
        assert!(matches!(
            index.search(&[1.0; 3], 1, SearchMode::Auto),
            Err(IndexError::QueryDim { given: 3, dim: 8 })
        ));
        assert!(matches!(
            index.vector(50),
            Err(IndexError::NoRow { row: 50, rows: 50 })
        ));
    }

    #[test]
    fn recall_counts_the_share_of_true_neighbours_found() {
        let h = |rows: &[usize]| -> Vec<Hit> {
            rows.iter().map(|&row| Hit { row, score: 0.0 }).collect()
        };
        let truth = vec![h(&[1, 2, 3]), h(&[4, 5, 6])];
        let found = vec![h(&[3, 9, 1]), h(&[4, 5, 6])];
        assert!((recall_at(&truth, &found, 3) - (2.0 / 3.0 + 1.0) / 2.0).abs() < 1e-12);
        assert!((recall_at(&truth, &found, 1) - 0.5).abs() < 1e-12);
    }
}

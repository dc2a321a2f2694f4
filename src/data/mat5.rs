//! A reader for MATLAB level-5 MAT-files (the v5/v6/v7 formats, with or without zlib
//! compression; not v7.3, which is HDF5), limited to what dataset annotations use: numeric,
//! char, struct and cell arrays.
//!
//! Hand-written because no crate reads these files as MATLAB writes them: `matfile` 0.5
//! reads neither struct nor char arrays, and `matrw` 0.1.4 reads struct arrays but rejects
//! (and panics on) char arrays stored as miUINT16, the encoding MATLAB uses for text.

use std::cell::Cell;
use std::io::Read;
use std::sync::Arc;

/// A decoded array (column-major, as MATLAB stores it).
#[derive(Clone, Debug, PartialEq)]
pub enum MatValue {
    /// Any numeric or logical class, converted to f64.
    Numeric {
        dims: Vec<usize>,
        data: Vec<f64>,
    },
    Char {
        dims: Vec<usize>,
        text: String,
    },
    /// `elements[i]` holds the values of element i, in `fields` order.
    Struct {
        dims: Vec<usize>,
        fields: Vec<String>,
        elements: Vec<Vec<MatValue>>,
    },
    Cell {
        dims: Vec<usize>,
        items: Vec<MatValue>,
    },
    /// Sparse arrays, objects, function handles, empty placeholders.
    Unsupported,
}

impl MatValue {
    /// Field `name` of struct element `index`.
    pub fn field(&self, index: usize, name: &str) -> Option<&MatValue> {
        match self {
            MatValue::Struct {
                fields, elements, ..
            } => {
                let f = fields.iter().position(|n| n == name)?;
                elements.get(index)?.get(f)
            }
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match self {
            MatValue::Char { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The value of a 1-element numeric array.
    pub fn as_scalar(&self) -> Option<f64> {
        match self {
            MatValue::Numeric { data, .. } if data.len() == 1 => Some(data[0]),
            _ => None,
        }
    }
}

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;

const MX_CELL: u8 = 1;
const MX_STRUCT: u8 = 2;
const MX_CHAR: u8 = 4;

/// Nesting deeper than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 64;
/// A compressed variable may not inflate beyond this (annotation files are megabytes).
const MAX_INFLATED: u64 = 1 << 28;
/// Arrays (including every struct field and cell item) a file may hold: decoded, each takes
/// far more memory than its 8-byte tag in the file, so a small file could otherwise ask for
/// gigabytes. Cars196's annotations hold about a hundred thousand.
pub const MAX_ARRAYS: usize = 1 << 21;
/// Bytes of numeric data a file may hold (each value is widened to an 8-byte f64).
pub const MAX_NUMBERS: usize = 1 << 26;

/// Why a MAT-file does not parse; byte offsets count from the start of the file or of the
/// inflated variable they are in.
#[derive(Clone, Debug, thiserror::Error)]
pub enum MatError {
    #[error("too short for a MAT-file header")]
    NoHeader,
    #[error("MAT-file v7.3 (HDF5) is not supported; save with -v7")]
    Hdf5,
    #[error("not a MAT-file (no endian indicator at byte 126)")]
    NoEndian,
    #[error("truncated at byte {at}")]
    Truncated { at: usize },
    #[error("bad small element at byte {at}")]
    SmallElement { at: usize },
    #[error("element at byte {at} runs past the end ({size} bytes)")]
    PastEnd { at: usize, size: usize },
    #[error("arrays nested too deeply")]
    TooDeep,
    #[error("bad compressed variable")]
    Inflate(#[source] Arc<std::io::Error>),
    #[error("unexpected element type {ty} where an array was expected")]
    NotAnArray { ty: u32 },
    #[error("array flags too short")]
    Flags,
    #[error("bad struct field names")]
    FieldNames,
    #[error("char array `{name}` has more than one row")]
    CharRows { name: String },
    #[error("array `{name}` holds {values} values, its dimensions say {count}")]
    Count {
        name: String,
        values: usize,
        count: usize,
    },
    #[error("array `{name}` declares {count} elements but the bytes left hold at most {room}")]
    Declared {
        name: String,
        count: usize,
        room: usize,
    },
    #[error("holds more than {limit} {what}, beyond what an annotation file needs")]
    TooLarge { what: &'static str, limit: usize },
    #[error("unsupported numeric data type {ty}")]
    NumericType { ty: u32 },
    #[error("char data is not {encoding}")]
    Encoding { encoding: &'static str },
    /// A structural fault named by what was being read.
    #[error("{0}")]
    Malformed(&'static str),
    #[error("unsupported char data type {ty}")]
    CharType { ty: u32 },
}

/// Parses a whole file into its named variables, in file order.
pub fn parse(bytes: &[u8]) -> Result<Vec<(String, MatValue)>, MatError> {
    if bytes.len() < 128 {
        return Err(MatError::NoHeader);
    }
    if bytes.starts_with(b"MATLAB 7.3") {
        return Err(MatError::Hdf5);
    }
    let big = match &bytes[126..128] {
        b"IM" => false,
        b"MI" => true,
        _ => return Err(MatError::NoEndian),
    };
    let r = Reader {
        big,
        arrays: Cell::new(0),
        numbers: Cell::new(0),
    };
    let mut vars = Vec::new();
    let mut at = 128;
    while at < bytes.len() {
        let (ty, data, next) = r.element(bytes, at)?;
        at = next;
        vars.push(r.variable(ty, data, 0)?);
    }
    Ok(vars)
}

struct Reader {
    big: bool,
    /// Arrays and numbers decoded so far, against [`MAX_ARRAYS`] and [`MAX_NUMBERS`].
    arrays: Cell<usize>,
    numbers: Cell<usize>,
}

impl Reader {
    fn u32_at(&self, b: &[u8], at: usize) -> Result<u32, MatError> {
        let s: [u8; 4] = b
            .get(at..at + 4)
            .ok_or(MatError::Truncated { at })?
            .try_into()
            .expect("4 bytes");
        Ok(if self.big {
            u32::from_be_bytes(s)
        } else {
            u32::from_le_bytes(s)
        })
    }

    /// The data element at `at`: `(type, data, offset of the next element)`.
    fn element<'a>(&self, b: &'a [u8], at: usize) -> Result<(u32, &'a [u8], usize), MatError> {
        let first = self.u32_at(b, at)?;
        if first >> 16 != 0 {
            // Small data element: type and size share the first word, data in the second.
            let (ty, size) = (first & 0xffff, (first >> 16) as usize);
            if size > 4 {
                return Err(MatError::SmallElement { at });
            }
            let data = b
                .get(at + 4..at + 4 + size)
                .ok_or(MatError::Truncated { at })?;
            return Ok((ty, data, at + 8));
        }
        let size = self.u32_at(b, at + 4)? as usize;
        let start = at + 8;
        let data = b
            .get(
                start
                    ..start
                        .checked_add(size)
                        .ok_or(MatError::Malformed("size overflow"))?,
            )
            .ok_or(MatError::PastEnd { at, size })?;
        // Compressed elements are not padded; all others are padded to 8 bytes.
        let next = if first == MI_COMPRESSED {
            start + size
        } else {
            start + size.div_ceil(8) * 8
        };
        Ok((first, data, next))
    }

    /// A top-level or nested variable: `(name, value)`.
    fn variable(&self, ty: u32, data: &[u8], depth: usize) -> Result<(String, MatValue), MatError> {
        if depth > MAX_DEPTH {
            return Err(MatError::TooDeep);
        }
        self.arrays.set(self.arrays.get() + 1);
        if self.arrays.get() > MAX_ARRAYS {
            return Err(MatError::TooLarge {
                what: "arrays",
                limit: MAX_ARRAYS,
            });
        }
        match ty {
            MI_COMPRESSED => {
                let mut inflated = Vec::new();
                flate2::read::ZlibDecoder::new(data)
                    .take(MAX_INFLATED)
                    .read_to_end(&mut inflated)
                    .map_err(|e| MatError::Inflate(Arc::new(e)))?;
                let (ty, inner, _) = self.element(&inflated, 0)?;
                self.variable(ty, inner, depth + 1)
            }
            MI_MATRIX => self.matrix(data, depth),
            other => Err(MatError::NotAnArray { ty: other }),
        }
    }

    fn matrix(&self, b: &[u8], depth: usize) -> Result<(String, MatValue), MatError> {
        if b.is_empty() {
            return Ok((String::new(), MatValue::Unsupported));
        }
        let (_, flags, at) = self.element(b, 0)?;
        let class = if flags.len() >= 4 {
            // The class is the low byte of the first flags word.
            if self.big { flags[3] } else { flags[0] }
        } else {
            return Err(MatError::Flags);
        };
        let (_, dims_raw, at) = self.element(b, at)?;
        let dims: Vec<usize> = self
            .numbers(MI_INT32, dims_raw)?
            .into_iter()
            .map(|d| if d >= 0.0 { d as usize } else { 0 })
            .collect();
        let count = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or(MatError::Malformed("array dimensions overflow"))?;
        let (_, name_raw, mut at) = self.element(b, at)?;
        let name = String::from_utf8_lossy(name_raw).into_owned();
        // Every cell item and struct field is an element of at least one 8-byte tag, so the
        // bytes left bound how many the array can hold, whatever its dimensions declare.
        let room = (b.len().saturating_sub(at)) / 8;
        let value = match class {
            MX_CELL => {
                if count > room {
                    return Err(MatError::Declared { name, count, room });
                }
                let mut items = Vec::new();
                for _ in 0..count {
                    let (ty, d, next) = self.element(b, at)?;
                    at = next;
                    items.push(self.variable(ty, d, depth + 1)?.1);
                }
                MatValue::Cell { dims, items }
            }
            MX_STRUCT => {
                let (_, len_raw, next) = self.element(b, at)?;
                let len = *self
                    .numbers(MI_INT32, len_raw)?
                    .first()
                    .ok_or(MatError::Malformed("no field name length"))?
                    as usize;
                let (_, names_raw, next) = self.element(b, next)?;
                at = next;
                if len == 0 || names_raw.len() % len != 0 {
                    return Err(MatError::FieldNames);
                }
                let fields: Vec<String> = names_raw
                    .chunks(len)
                    .map(|c| {
                        let end = c.iter().position(|&x| x == 0).unwrap_or(c.len());
                        String::from_utf8_lossy(&c[..end]).into_owned()
                    })
                    .collect();
                let room = (b.len().saturating_sub(at)) / 8;
                if !fields.is_empty() && count.saturating_mul(fields.len()) > room {
                    return Err(MatError::Declared { name, count, room });
                }
                // Elements without fields hold nothing: none are kept, however many are
                // declared.
                let count = if fields.is_empty() { 0 } else { count };
                let mut elements = Vec::new();
                for _ in 0..count {
                    let mut values = Vec::with_capacity(fields.len());
                    for _ in 0..fields.len() {
                        let (ty, d, next) = self.element(b, at)?;
                        at = next;
                        values.push(self.variable(ty, d, depth + 1)?.1);
                    }
                    elements.push(values);
                }
                MatValue::Struct {
                    dims,
                    fields,
                    elements,
                }
            }
            MX_CHAR => {
                let (ty, d, _) = self.element(b, at)?;
                let text = self.text(ty, d)?;
                if dims.first().copied().unwrap_or(0) > 1 {
                    return Err(MatError::CharRows { name });
                }
                MatValue::Char { dims, text }
            }
            6..=15 => {
                let (ty, d, _) = self.element(b, at)?;
                let data = self.numbers(ty, d)?;
                if data.len() != count {
                    return Err(MatError::Count {
                        name,
                        values: data.len(),
                        count,
                    });
                }
                MatValue::Numeric { dims, data }
            }
            _ => MatValue::Unsupported,
        };
        Ok((name, value))
    }

    fn numbers(&self, ty: u32, d: &[u8]) -> Result<Vec<f64>, MatError> {
        self.numbers.set(self.numbers.get().saturating_add(d.len()));
        if self.numbers.get() > MAX_NUMBERS {
            return Err(MatError::TooLarge {
                what: "bytes of numbers",
                limit: MAX_NUMBERS,
            });
        }
        macro_rules! conv {
            ($t:ty, $n:expr) => {
                d.chunks_exact($n)
                    .map(|c| {
                        let a: [u8; $n] = c.try_into().expect("chunk");
                        (if self.big {
                            <$t>::from_be_bytes(a)
                        } else {
                            <$t>::from_le_bytes(a)
                        }) as f64
                    })
                    .collect()
            };
        }
        Ok(match ty {
            MI_INT8 => d.iter().map(|&x| x as i8 as f64).collect(),
            MI_UINT8 | MI_UTF8 => d.iter().map(|&x| x as f64).collect(),
            MI_INT16 => conv!(i16, 2),
            MI_UINT16 | MI_UTF16 => conv!(u16, 2),
            MI_INT32 => conv!(i32, 4),
            MI_UINT32 => conv!(u32, 4),
            MI_SINGLE => conv!(f32, 4),
            MI_DOUBLE => conv!(f64, 8),
            MI_INT64 => conv!(i64, 8),
            MI_UINT64 => conv!(u64, 8),
            other => return Err(MatError::NumericType { ty: other }),
        })
    }

    fn text(&self, ty: u32, d: &[u8]) -> Result<String, MatError> {
        match ty {
            MI_UTF8 | MI_UINT8 | MI_INT8 => {
                String::from_utf8(d.to_vec()).map_err(|_| MatError::Encoding { encoding: "UTF-8" })
            }
            MI_UINT16 | MI_UTF16 => {
                let units: Vec<u16> = self
                    .numbers(MI_UINT16, d)?
                    .iter()
                    .map(|&u| u as u16)
                    .collect();
                String::from_utf16(&units).map_err(|_| MatError::Encoding { encoding: "UTF-16" })
            }
            other => Err(MatError::CharType { ty: other }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(ty: u32, data: &[u8]) -> Vec<u8> {
        let mut out = ty.to_le_bytes().to_vec();
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(8) * 8, 0);
        out
    }

    /// A variable of `class` whose dimensions declare `n` elements, followed by `body`.
    fn declaring(class: u8, n: i32, body: &[u8]) -> Vec<u8> {
        let mut sub = element(MI_UINT32, &[class, 0, 0, 0, 0, 0, 0, 0]);
        let dims: Vec<u8> = [1i32, n].iter().flat_map(|d| d.to_le_bytes()).collect();
        sub.extend(element(MI_INT32, &dims));
        sub.extend(element(MI_INT8, b"x"));
        sub.extend_from_slice(body);
        let mut file = b"MATLAB 5.0 MAT-file".to_vec();
        file.resize(126, b' ');
        file.extend_from_slice(b"IM");
        file.extend(element(MI_MATRIX, &sub));
        file
    }

    /// Issue 11: a small file declaring 40 M struct elements aborted on allocation.
    #[test]
    fn declared_counts_beyond_the_bytes_are_refused_without_allocating() {
        let mut fields = (5u32 | (4 << 16)).to_le_bytes().to_vec();
        fields.extend_from_slice(&8i32.to_le_bytes());
        let mut one = fields.clone();
        one.extend(element(MI_INT8, b"a\0\0\0\0\0\0\0"));
        let e = parse(&declaring(MX_STRUCT, 40_000_000, &one)).unwrap_err();
        assert!(
            matches!(
                e,
                MatError::Declared {
                    count: 40_000_000,
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(&declaring(MX_CELL, 40_000_000, &[])).unwrap_err();
        assert!(matches!(e, MatError::Declared { .. }), "{e}");
        // Elements without fields hold nothing and are not kept.
        let mut none = fields;
        none.extend(element(MI_INT8, b""));
        let vars = parse(&declaring(MX_STRUCT, 40_000_000, &none)).unwrap_or_default();
        assert!(vars.iter().all(|(_, v)| match v {
            MatValue::Struct { elements, .. } => elements.is_empty(),
            _ => true,
        }));
    }

    #[test]
    fn a_flood_of_small_arrays_stops_at_the_limit() {
        // Cells of empty cells: 8 bytes each in the file.
        let body = element(MI_MATRIX, &[]).repeat(MAX_ARRAYS + 1);
        let e = parse(&declaring(MX_CELL, (MAX_ARRAYS + 1) as i32, &body)).unwrap_err();
        assert!(matches!(e, MatError::TooLarge { .. }), "{e}");
    }
}

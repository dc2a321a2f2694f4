//! Reading weight files into a [`StateDict`]: PyTorch `.pth`/`.pt` checkpoints (both
//! `torch.save` containers) and safetensors.
//!
//! The pickle inside a checkpoint refers to its storages through torch's persistent ids, which
//! general pickle crates (`serde-pickle`) reject; `pytorch-reader` (the reader behind
//! burn-store) resolves them for the zip archive and the legacy pre-1.6 stream alike, so it
//! does the parsing and this module only widens the values and names the file in errors.

use std::path::Path;

use pytorch_reader::PytorchReader;

use crate::error::Cause;
use crate::io::WeightsError;
use crate::io::host::{ByteOrder, decode};
use crate::io::state_dict::{HostTensor, StateDict};

/// The container a weight file uses, told by its first bytes rather than its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// A `torch.save` file: zip archive (PyTorch >= 1.6) or legacy pickle stream.
    Torch,
    Safetensors,
}

/// Recognises a weight file by its magic bytes.
pub fn sniff_format(path: &Path) -> Result<WeightFormat, WeightsError> {
    use std::io::Read;
    let mut head = [0u8; 10];
    let read = |source| WeightsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = super::regular::open(path).map_err(read)?;
    let n = file.read(&mut head).map_err(read)?;
    let head = &head[..n];
    // safetensors: an 8-byte little-endian header length, then a JSON object. Checked first:
    // the length's first byte may well be 0x80. (Byte 8 of a legacy stream is inside torch's
    // magic number, never `{`.)
    if n >= 9 && head[8] == b'{' {
        return Ok(WeightFormat::Safetensors);
    }
    // Zip local header, or a pickle PROTO opcode (0x80) opening the legacy stream.
    if head.starts_with(b"PK\x03\x04") || head.first() == Some(&0x80) {
        return Ok(WeightFormat::Torch);
    }
    Err(WeightsError::UnknownFormat {
        path: path.to_path_buf(),
    })
}

/// Reads any supported weight file.
pub fn read_weights(path: &Path) -> Result<StateDict, WeightsError> {
    match sniff_format(path)? {
        WeightFormat::Torch => read_pth(path),
        WeightFormat::Safetensors => StateDict::read_safetensors(path),
    }
}

/// One tensor's description: for `weights inspect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

/// Names, shapes and stored dtypes of every tensor in a weight file, sorted by name, without
/// reading the values of a checkpoint.
pub fn inspect_weights(path: &Path) -> Result<Vec<TensorInfo>, WeightsError> {
    let mut out = match sniff_format(path)? {
        WeightFormat::Torch => open_pth(path)?
            .tensors()
            .values()
            .map(|t| TensorInfo {
                name: t.name.clone(),
                shape: t.shape().to_vec(),
                dtype: format!("{:?}", t.dtype()).to_lowercase(),
            })
            .collect::<Vec<_>>(),
        WeightFormat::Safetensors => {
            let bytes = super::regular::read(path).map_err(|source| WeightsError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
                WeightsError::NotSafetensors {
                    path: path.to_path_buf(),
                    source: Box::new(WeightsError::Safetensors(Cause::of(&e))),
                }
            })?;
            st.tensors()
                .into_iter()
                .map(|(name, v)| TensorInfo {
                    name,
                    shape: v.shape().to_vec(),
                    dtype: format!("{:?}", v.dtype()).to_lowercase(),
                })
                .collect()
        }
    };
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn open_pth(path: &Path) -> Result<PytorchReader, WeightsError> {
    PytorchReader::new(path).map_err(|e| WeightsError::NotTorch {
        path: path.to_path_buf(),
        source: Cause::of(&e),
    })
}

/// Reads a `torch.save`d state dict. Float16, bfloat16 and float64 values are converted on
/// load (to f64 host values, which hold each of them exactly).
pub fn read_pth(path: &Path) -> Result<StateDict, WeightsError> {
    let reader = open_pth(path)?;
    let mut dict = StateDict::default();
    for tensor in reader.tensors().values() {
        let bytes = tensor.read().map_err(|source| WeightsError::TensorRead {
            path: path.to_path_buf(),
            tensor: tensor.name.clone(),
            source,
        })?;
        let data = decode(tensor.dtype(), &bytes, ByteOrder::Native).map_err(|e| {
            WeightsError::TensorInFile {
                path: path.to_path_buf(),
                tensor: tensor.name.clone(),
                source: Box::new(e),
            }
        })?;
        dict.insert(
            tensor.name.clone(),
            HostTensor::new(tensor.shape().to_vec(), data),
        );
    }
    if dict.tensors.is_empty() {
        return Err(WeightsError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(dict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A pickle protocol-2 state dict `{"a.weight": tensor(f16 [2,3]), "a.bias": tensor(f32 [3])}`
    /// laid out as `torch.save` writes it (persistent ids naming storages `0` and `1`).
    fn state_dict_pickle() -> Vec<u8> {
        let mut p: Vec<u8> = vec![0x80, 2]; // PROTO 2
        p.extend(b"ccollections\nOrderedDict\n)R"); // GLOBAL, EMPTY_TUPLE, REDUCE
        p.push(b'('); // MARK for SETITEMS
        for (key, storage, kind, numel, shape) in [
            ("a.weight", "0", "HalfStorage", 6u8, &[2u8, 3][..]),
            ("a.bias", "1", "FloatStorage", 3u8, &[3u8][..]),
        ] {
            p.push(b'X');
            p.extend((key.len() as u32).to_le_bytes());
            p.extend(key.as_bytes());
            p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n");
            p.push(b'('); // MARK for the argument tuple
            // persistent id tuple ('storage', torch.XStorage, key, 'cpu', numel)
            p.push(b'(');
            p.extend(b"X\x07\x00\x00\x00storage");
            p.extend(format!("ctorch\n{kind}\n").as_bytes());
            p.push(b'X');
            p.extend((storage.len() as u32).to_le_bytes());
            p.extend(storage.as_bytes());
            p.extend(b"X\x03\x00\x00\x00cpu");
            p.extend([b'K', numel]);
            p.push(b't'); // TUPLE
            p.push(b'Q'); // BINPERSID
            p.extend([b'K', 0]); // storage offset
            p.push(b'(');
            for &d in shape {
                p.extend([b'K', d]);
            }
            p.push(b't'); // size
            p.push(b'(');
            let mut stride = 1u8;
            let mut strides = Vec::new();
            for &d in shape.iter().rev() {
                strides.push(stride);
                stride *= d;
            }
            for s in strides.iter().rev() {
                p.extend([b'K', *s]);
            }
            p.push(b't'); // stride
            p.push(0x89); // NEWFALSE (requires_grad)
            p.extend(b"ccollections\nOrderedDict\n)R"); // backward hooks
            p.push(b't');
            p.push(b'R');
        }
        p.push(b'u'); // SETITEMS
        p.push(b'.');
        p
    }

    fn weight_bytes() -> Vec<u8> {
        [0.5f32, -1.0, 2.0, 0.25, 3.0, -0.125]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect()
    }

    fn bias_bytes() -> Vec<u8> {
        [1.5f32, -2.5, 0.1]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    fn write_zip_checkpoint(path: &Path, pickle: &[u8]) {
        // The zip crate is a dependency of pytorch-reader, not ours; the archive is simple
        // enough (stored entries) to write by hand with crc32 from the same family.
        let entries: Vec<(String, Vec<u8>)> = vec![
            ("archive/data.pkl".into(), pickle.to_vec()),
            ("archive/data/0".into(), weight_bytes()),
            ("archive/data/1".into(), bias_bytes()),
            ("archive/version".into(), b"3\n".to_vec()),
        ];
        std::fs::write(path, stored_zip(&entries)).unwrap();
    }

    /// A zip archive with every entry stored uncompressed.
    fn stored_zip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in entries {
            let offset = out.len() as u32;
            let crc = crc32(data);
            let header = |sig: u32, central: bool| {
                let mut h = Vec::new();
                h.extend(sig.to_le_bytes());
                if central {
                    h.extend(20u16.to_le_bytes()); // made by
                }
                h.extend(20u16.to_le_bytes()); // version needed
                h.extend(0u16.to_le_bytes()); // flags
                h.extend(0u16.to_le_bytes()); // stored
                h.extend(0u32.to_le_bytes()); // time, date
                h.extend(crc.to_le_bytes());
                h.extend((data.len() as u32).to_le_bytes());
                h.extend((data.len() as u32).to_le_bytes());
                h.extend((name.len() as u16).to_le_bytes());
                h.extend(0u16.to_le_bytes()); // extra
                if central {
                    h.extend([0u8; 6]); // comment len, disk, internal attrs
                    h.extend(0u32.to_le_bytes()); // external attrs
                    h.extend(offset.to_le_bytes());
                }
                h.extend(name.as_bytes());
                h
            };
            out.extend(header(0x04034b50, false));
            out.extend(data);
            central.extend(header(0x02014b50, true));
        }
        let cd_offset = out.len() as u32;
        out.extend(&central);
        out.extend(0x06054b50u32.to_le_bytes());
        out.extend([0u8; 4]);
        out.extend((entries.len() as u16).to_le_bytes());
        out.extend((entries.len() as u16).to_le_bytes());
        out.extend((central.len() as u32).to_le_bytes());
        out.extend(cd_offset.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// The legacy stream: magic number, protocol version, sys info, the state dict, the
    /// storage keys, then each storage as an 8-byte element count and its bytes.
    fn write_legacy_checkpoint(path: &Path) {
        let mut f = std::fs::File::create(path).unwrap();
        let magic = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";
        f.write_all(magic).unwrap();
        f.write_all(b"\x80\x02M\xe9\x03.").unwrap(); // protocol version 1001
        f.write_all(
            b"\x80\x02}q\x00(X\x10\x00\x00\x00protocol_versionq\x01M\xe9\x03X\x0d\x00\x00\x00little_endianq\x02\x88X\x0a\x00\x00\x00type_sizesq\x03}q\x04(X\x05\x00\x00\x00shortq\x05K\x02X\x03\x00\x00\x00intq\x06K\x04X\x04\x00\x00\x00longq\x07K\x04uu.",
        )
        .unwrap();
        f.write_all(&state_dict_pickle()).unwrap();
        f.write_all(b"\x80\x02]q\x00(X\x01\x00\x00\x000X\x01\x00\x00\x001e.")
            .unwrap();
        f.write_all(&6u64.to_le_bytes()).unwrap();
        f.write_all(&weight_bytes()).unwrap();
        f.write_all(&3u64.to_le_bytes()).unwrap();
        f.write_all(&bias_bytes()).unwrap();
    }

    fn check_dict(dict: &StateDict) {
        let w = dict.get("a.weight").expect("a.weight");
        assert_eq!(w.shape, vec![2, 3]);
        assert_eq!(w.data, vec![0.5, -1.0, 2.0, 0.25, 3.0, -0.125]);
        let b = dict.get("a.bias").expect("a.bias");
        assert_eq!(b.shape, vec![3]);
        assert_eq!(b.to_f32(), vec![1.5, -2.5, 0.1]);
        assert_eq!(dict.tensors.len(), 2);
    }

    #[test]
    fn reads_a_zip_checkpoint_with_f16_and_f32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.pth");
        write_zip_checkpoint(&path, &state_dict_pickle());
        assert_eq!(sniff_format(&path).unwrap(), WeightFormat::Torch);
        check_dict(&read_weights(&path).unwrap());
        let info = inspect_weights(&path).unwrap();
        assert_eq!(info[0].name, "a.bias");
        assert_eq!(info[1].dtype, "f16");
    }

    #[test]
    fn reads_a_legacy_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("legacy.pth");
        write_legacy_checkpoint(&path);
        check_dict(&read_weights(&path).unwrap());
    }

    #[test]
    fn truncated_and_foreign_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("legacy.pth");
        write_legacy_checkpoint(&legacy);
        let bytes = std::fs::read(&legacy).unwrap();
        let cut = dir.path().join("cut.pth");
        std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
        let err = read_weights(&cut).unwrap_err();
        assert!(
            matches!(&err, WeightsError::NotTorch { path, .. }
                | WeightsError::TensorRead { path, .. } if *path == cut),
            "{err}"
        );

        let text = dir.path().join("notes.pth");
        std::fs::write(&text, "hello, world").unwrap();
        let err = read_weights(&text).unwrap_err();
        assert!(
            matches!(&err, WeightsError::UnknownFormat { path } if *path == text),
            "{err}"
        );

        let zip = dir.path().join("bad.pth");
        write_zip_checkpoint(&zip, b"\x80\x02garbage");
        let err = read_weights(&zip).unwrap_err();
        assert!(
            matches!(&err, WeightsError::NotTorch { path, .. } if *path == zip),
            "{err}"
        );
        let missing = dir.path().join("missing.pth");
        let err = read_weights(&missing).unwrap_err();
        assert!(
            matches!(&err, WeightsError::Read { path, .. } if *path == missing),
            "{err}"
        );
    }

    #[test]
    fn converts_to_f16_safetensors_rounding_to_nearest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("w.pth");
        write_zip_checkpoint(&src, &state_dict_pickle());
        let out = dir.path().join("w16.safetensors");
        read_weights(&src)
            .unwrap()
            .write_safetensors_as(&out, crate::io::state_dict::StoredDtype::F16)
            .unwrap();
        assert_eq!(sniff_format(&out).unwrap(), WeightFormat::Safetensors);
        assert!(
            inspect_weights(&out)
                .unwrap()
                .iter()
                .all(|t| t.dtype == "f16")
        );
        let back = read_weights(&out).unwrap();
        assert_eq!(
            back.get("a.weight").unwrap().data,
            vec![0.5, -1.0, 2.0, 0.25, 3.0, -0.125]
        );
        // 0.1 is not a float16 value: it comes back as the nearest one.
        let bias = &back.get("a.bias").unwrap().data;
        assert_eq!(bias[2], half::f16::from_f32(0.1).to_f64());
        assert_ne!(bias[2], 0.1f32 as f64);
    }

    /// Issue 11: mutated `torch.save` files (zip and legacy) neither panic nor give an error
    /// that does not name the file.
    #[test]
    fn mutated_pth_files_give_errors_naming_the_file() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngSeed, TestRunner};
        let dir = tempfile::tempdir().unwrap();
        let zip = dir.path().join("z.pth");
        write_zip_checkpoint(&zip, &state_dict_pickle());
        let legacy = dir.path().join("l.pth");
        write_legacy_checkpoint(&legacy);
        let mut runner = TestRunner::new(Config {
            cases: 48,
            rng_seed: RngSeed::Fixed(11),
            failure_persistence: None,
            ..Config::default()
        });
        for path in [zip, legacy] {
            let good = std::fs::read(&path).unwrap();
            let edits = (
                prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
                prop::option::of(any::<usize>()),
            );
            runner
                .run(&edits, |(writes, cut)| {
                    let mut b = good.clone();
                    for (at, v) in writes {
                        let n = b.len();
                        b[at % n] = v;
                    }
                    if let Some(cut) = cut {
                        b.truncate(cut % (b.len() + 1));
                    }
                    let bad = path.with_extension("bad.pth");
                    std::fs::write(&bad, &b).unwrap();
                    let result = std::panic::catch_unwind(|| read_weights(&bad));
                    prop_assert!(result.is_ok(), "the reader panicked");
                    if let Ok(Err(e)) = result {
                        let text = crate::error::chain(&e);
                        prop_assert!(text.contains("bad.pth"), "{}", text);
                    }
                    Ok(())
                })
                .unwrap();
        }
    }
}

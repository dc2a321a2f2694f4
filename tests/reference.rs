//! Parity with the authors' release, on the `tiny` dump copied into the repository and on every
//! dump in `../shared/fixtures/reference` (ignored by default; `--include-ignored` runs it, and it
//! fails when that folder is missing or holds no dump).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use gca_hng::io::state_dict::StateDict;
use gca_hng::verify::reference::verify_reference;

fn repo_dump() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny.safetensors")
}

fn assert_passes(path: &Path) {
    let report = verify_reference(path, &Device::flex()).expect("the dump is readable");
    let failures: Vec<String> = report
        .rows
        .iter()
        .filter(|r| !r.ok)
        .map(|r| format!("{} (max abs err {:.3e}) {:?}", r.name, r.max_abs, r.note))
        .collect();
    assert!(failures.is_empty(), "{}: {failures:#?}", path.display());
    assert!(
        report.unchecked.is_empty(),
        "not compared: {:?}",
        report.unchecked
    );
    assert!(
        report.rows.len() > 250,
        "only {} tensors compared",
        report.rows.len()
    );
}

#[test]
fn tiny_dump_matches_the_release() {
    assert_passes(&repo_dump());
}

#[test]
#[ignore = "needs ../shared fixtures"]
fn shared_dumps_match_the_release() {
    let dir = std::env::var_os("GCA_HNG_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/reference")
        });
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; this test needs the reference dumps of ../shared/fixtures \
             (or GCA_HNG_REFERENCE_DIR pointing at them)",
            dir.display()
        )
    });
    let mut checked = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            assert_passes(&path);
            checked += 1;
        }
    }
    assert!(checked > 0, "no .safetensors dump in {}", dir.display());
}

/// A wrong initial weight must show as failures, not pass silently.
#[test]
fn a_corrupted_dump_fails() {
    let mut dict = StateDict::read_safetensors(&repo_dump()).unwrap();
    let t = dict
        .tensors
        .get_mut("init.gnn.gnn.1.edge_model.linear.3.weight")
        .unwrap();
    t.data[0] += 0.05;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.safetensors");
    dict.write_safetensors(&path).unwrap();
    let report = verify_reference(&path, &Device::flex()).unwrap();
    let failed: Vec<&str> = report
        .rows
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.name.as_str())
        .collect();
    assert!(failed.contains(&"fwd.gnn.edge_coeff"), "{failed:?}");
    assert!(!report.passed());
}

/// A dump with an extra tensor nobody compares must not pass.
#[test]
fn an_unknown_tensor_is_reported() {
    let mut dict = StateDict::read_safetensors(&repo_dump()).unwrap();
    dict.insert(
        "fwd.something_new",
        gca_hng::io::state_dict::HostTensor::new(vec![1], vec![1.0]),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("extra.safetensors");
    dict.write_safetensors(&path).unwrap();
    let report = verify_reference(&path, &Device::flex()).unwrap();
    assert_eq!(report.unchecked, vec!["fwd.something_new".to_string()]);
    assert!(!report.passed());
}

/// Strict loading names the offending keys.
#[test]
fn missing_and_unexpected_weights_are_named() {
    let mut dict = StateDict::read_safetensors(&repo_dump()).unwrap();
    dict.tensors.remove("init.gnn.dim_red.bias");
    dict.insert(
        "init.gnn.extra",
        gca_hng::io::state_dict::HostTensor::new(vec![1], vec![0.0]),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    dict.write_safetensors(&path).unwrap();
    let err = verify_reference(&path, &Device::flex()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("init.gnn.dim_red.bias"), "{msg}");
    assert!(msg.contains("init.gnn.extra"), "{msg}");
}

#[test]
fn a_file_that_is_not_a_dump_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.safetensors");
    std::fs::write(&path, b"not a safetensors file").unwrap();
    let err = verify_reference(&path, &Device::flex()).unwrap_err();
    assert!(format!("{err:#}").contains("junk.safetensors"));
}

//! Every parser fed random and mutated input (issue 11): none may panic, hang or allocate from
//! a declared size, and every error names the input it is about. The cases are few and the
//! seed fixed, so that the suite runs in bounded time and fails the same way twice.

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use gca_hng::config::{DatasetKind, ExperimentConfig};
use gca_hng::data::Dataset;
use gca_hng::data::mat5;
use gca_hng::error::chain;
use gca_hng::io::npy;
use gca_hng::io::state_dict::StateDict;
use gca_hng::io::weights::read_weights;

fn config() -> Config {
    Config {
        cases: 48,
        rng_seed: RngSeed::Fixed(11),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Edits to a valid input: bytes overwritten at positions (taken modulo the length), bytes
/// inserted, and a cut.
#[derive(Clone, Debug)]
struct Mutation {
    writes: Vec<(usize, u8)>,
    inserts: Vec<(usize, Vec<u8>)>,
    cut: Option<usize>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        prop::collection::vec(
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..6)),
            0..2,
        ),
        prop::option::of(any::<usize>()),
    )
        .prop_map(|(writes, inserts, cut)| Mutation {
            writes,
            inserts,
            cut,
        })
}

impl Mutation {
    fn apply(&self, good: &[u8]) -> Vec<u8> {
        let mut b = good.to_vec();
        if b.is_empty() {
            return b;
        }
        for &(at, v) in &self.writes {
            let n = b.len();
            b[at % n] = v;
        }
        for (at, bytes) in &self.inserts {
            let at = at % (b.len() + 1);
            b.splice(at..at, bytes.iter().copied());
        }
        if let Some(cut) = self.cut {
            b.truncate(cut % (b.len() + 1));
        }
        b
    }
}

/// Random bytes, or a valid input mutated.
fn input(good: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        mutation().prop_map(move |m| m.apply(&good)),
    ]
}

/// An error of a parser of `path` must name it.
fn assert_named<E: std::error::Error>(result: Result<impl Sized, E>, path: &Path) {
    if let Err(e) = result {
        let text = chain(&e);
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(text.contains(&*name), "{text} does not name {name}");
        assert!(text.lines().count() <= 12, "too long: {text}");
    }
}

fn cub_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "images.txt",
            b"1 001.Albatross/a.jpg\n2 001.Albatross/b.jpg\n3 150.Thrasher/c.jpg\n".to_vec(),
        ),
        ("image_class_labels.txt", b"1 1\n2 1\n3 150\n".to_vec()),
    ]
}

fn sop_files() -> Vec<(&'static str, Vec<u8>)> {
    let header = "image_id class_id super_class_id path\n";
    vec![
        (
            "Ebay_train.txt",
            format!("{header}1 1 1 bicycle_final/1.JPG\n2 1 1 bicycle_final/2.JPG\n").into_bytes(),
        ),
        (
            "Ebay_test.txt",
            format!("{header}3 2 1 bicycle_final/3.JPG\n4 2 1 bicycle_final/4.JPG\n").into_bytes(),
        ),
    ]
}

fn inshop_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![(
        "list_eval_partition.txt",
        b"3\nimage_name item_id evaluation_status\nimg/a/1.jpg id_00000001 train\n\
          img/b/1.jpg id_00000002 query\nimg/b/2.jpg id_00000002 gallery\n"
            .to_vec(),
    )]
}

fn cars_files() -> Vec<(&'static str, Vec<u8>)> {
    let mat =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/cars_annos_scipy.mat");
    vec![("cars_annos.mat", std::fs::read(mat).unwrap())]
}

/// Writes the annotation files of a layout, one of them replaced by `bad`, and opens it.
fn open_with(kind: DatasetKind, files: &[(&str, Vec<u8>)], which: usize, bad: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    for (i, (name, good)) in files.iter().enumerate() {
        let bytes = if i == which % files.len() { bad } else { good };
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    if let Err(e) = Dataset::open(kind, dir.path()) {
        let text = chain(&e);
        assert!(
            text.contains(&*dir.path().to_string_lossy()),
            "{text} does not name a file of {}",
            dir.path().display()
        );
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn cub_annotations(which in 0usize..2, bad in input(cub_files()[0].1.clone())) {
        open_with(DatasetKind::Cub, &cub_files(), which, &bad);
    }

    #[test]
    fn cub_labels(bad in input(cub_files()[1].1.clone())) {
        open_with(DatasetKind::Cub, &cub_files(), 1, &bad);
    }

    #[test]
    fn sop_annotations(which in 0usize..2, bad in input(sop_files()[0].1.clone())) {
        open_with(DatasetKind::Sop, &sop_files(), which, &bad);
    }

    #[test]
    fn inshop_annotations(bad in input(inshop_files()[0].1.clone())) {
        open_with(DatasetKind::Inshop, &inshop_files(), 0, &bad);
    }

    #[test]
    fn cars_annotations(bad in input(cars_files()[0].1.clone())) {
        open_with(DatasetKind::Cars, &cars_files(), 0, &bad);
    }

    #[test]
    fn mat_files(bad in input(cars_files()[0].1.clone())) {
        let _ = mat5::parse(&bad);
    }

    #[test]
    fn npy_arrays(m in mutation(), random in prop::collection::vec(any::<u8>(), 0..200)) {
        let dir = tempfile::tempdir().unwrap();
        let e = dir.path().join("e.npy");
        let l = dir.path().join("l.npy");
        npy::write_matrix(&e, 2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        npy::write_labels(&l, &[4, 5]).unwrap();
        for path in [&e, &l] {
            let good = std::fs::read(path).unwrap();
            for bytes in [m.apply(&good), random.clone()] {
                std::fs::write(path, bytes).unwrap();
                assert_named(npy::read_matrix(path), path);
                assert_named(npy::read_labels(path), path);
            }
        }
    }

    #[test]
    fn safetensors_files(m in mutation(), random in prop::collection::vec(any::<u8>(), 0..200)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let mut dict = StateDict::default();
        dict.insert(
            "a.weight",
            gca_hng::io::host::HostTensor::new(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
        );
        dict.metadata.insert("k".into(), "v".into());
        dict.write_safetensors(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        for bytes in [m.apply(&good), random.clone()] {
            std::fs::write(&path, bytes).unwrap();
            assert_named(StateDict::read_safetensors(&path), &path);
            assert_named(read_weights(&path), &path);
        }
    }

    #[test]
    fn config_files(m in mutation()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let good = ExperimentConfig::demo().to_toml().into_bytes();
        std::fs::write(&path, m.apply(&good)).unwrap();
        assert_named(ExperimentConfig::from_file(&path), &path);
    }

    #[test]
    fn set_values(
        key in prop::sample::select(vec![
            "data.image_size", "data.resize", "data.classes_per_batch", "data.per_class",
            "data.crop_scale", "data.workers", "model.embedding_dim", "model.heads",
            "model.gnn_layers", "optim.lr", "train.epochs", "train.max_steps_per_epoch",
            "train.eval_class_limit", "loss.base", "nope.key", "data",
        ]),
        value in prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| v.to_string()),
            "[a-z0-9\\[\\]., =\"]{0,12}",
        ],
    ) {
        let item = format!("{key}={value}");
        if let Err(e) = ExperimentConfig::demo().with_overrides(std::slice::from_ref(&item)) {
            let text = chain(&e);
            // The key at fault, or one the value broke a rule of.
            assert!(text.contains('`'), "{item}: {text}");
            assert!(text.lines().count() <= 3, "{item}: {text}");
        }
    }
}

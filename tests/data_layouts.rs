//! Miniature trees of every dataset layout, written to temporary folders: splits, counts,
//! labels, and an error naming the file (and line) for each kind of bad input.

use std::path::{Path, PathBuf};

use gca_hng::data::inspect::{SplitCounts, counts_json, inspect};
use gca_hng::data::mat5::MatError;
use gca_hng::data::{DataError, Dataset, DatasetKind, ImageSource, Split};
use image::{Rgb, RgbImage};

fn write_jpeg(path: &Path, colour: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(12, 9, Rgb(colour)).save(path).unwrap();
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn counts(ds: &Dataset) -> Vec<(String, usize, usize)> {
    inspect(ds)
        .unwrap()
        .into_iter()
        .map(
            |SplitCounts {
                 name,
                 classes,
                 images,
             }| (name, classes, images),
        )
        .collect()
}

fn file_of(split: &Split, i: usize) -> PathBuf {
    match &split.samples[i].source {
        ImageSource::File(p) => p.clone(),
        other => panic!("not a file: {other:?}"),
    }
}

fn open_err(kind: DatasetKind, root: &Path) -> DataError {
    Dataset::open(kind, root).expect_err("bad input must be an error")
}

/// Whether `e` is about line `line` of `file`.
fn at_line(e: &DataError, file: &Path, line: usize) -> bool {
    matches!(e, DataError::Parse { path, line: l, .. } if path == file && *l == line)
}

// ---------------------------------------------------------------------------------------
// CUB-200-2011

fn cub_tree(dir: &Path) -> PathBuf {
    let root = dir.join("CUB_200_2011");
    // Classes 1, 2 (train) and 101, 150 (test); ids deliberately not in class order.
    let rows = [
        (1, "001.Black_footed_Albatross/a.jpg", 1),
        (2, "002.Laysan_Albatross/b.jpg", 2),
        (3, "150.Sage_Thrasher/c.jpg", 150),
        (4, "001.Black_footed_Albatross/d.jpg", 1),
        (5, "101.White_Pelican/e.jpg", 101),
    ];
    let mut images = String::new();
    let mut labels = String::new();
    for (id, path, class) in rows {
        images += &format!("{id} {path}\n");
        labels += &format!("{id} {class}\n");
        write_jpeg(&root.join("images").join(path), [10, 20, 30]);
    }
    write(&root.join("images.txt"), &images);
    write(&root.join("image_class_labels.txt"), &labels);
    root
}

#[test]
fn cub_splits_counts_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    cub_tree(dir.path());
    // The folder holding CUB_200_2011 works as root too.
    let ds = Dataset::open(DatasetKind::Cub, dir.path()).unwrap();
    assert_eq!(
        counts(&ds),
        vec![("train".into(), 2, 3), ("test".into(), 2, 2)]
    );
    let train = ds.split("train").unwrap();
    assert_eq!(train.labels(), vec![0, 1, 0]);
    assert_eq!(train.classes[0].original_id, "1");
    assert_eq!(
        train.classes[0].name.as_deref(),
        Some("Black_footed_Albatross")
    );
    assert!(file_of(train, 2).ends_with("001.Black_footed_Albatross/d.jpg"));
    let test = ds.split("test").unwrap();
    // 150 listed before 101, labels sorted by original id.
    assert_eq!(test.labels(), vec![1, 0]);
    assert_eq!(test.classes[1].original_id, "150");
    assert_eq!(
        counts_json(&inspect(&ds).unwrap()),
        r#"{"splits": {"train": {"classes": 2, "images": 3}, "test": {"classes": 2, "images": 2}}}"#
    );
}

#[test]
fn cub_bad_inputs_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = cub_tree(dir.path());
    let images = root.join("images.txt");

    write(&images, "1 001.Black_footed_Albatross/a.jpg\n2\n");
    let e = open_err(DatasetKind::Cub, &root);
    assert!(at_line(&e, &images, 2), "{e}");

    write(
        &images,
        "1 001.Black_footed_Albatross/a.jpg\nx 002.Laysan_Albatross/b.jpg\n",
    );
    let e = open_err(DatasetKind::Cub, &root);
    assert!(at_line(&e, &images, 2), "{e}");
    assert!(
        e.to_string().contains("`x`"),
        "the message quotes the field: {e}"
    );

    // Image paths stay inside the data set's folder.
    for (path, why) in [
        ("/etc/hostname", "is absolute"),
        ("../../outside.jpg", "climbs out"),
    ] {
        write(
            &images,
            &format!("1 001.Black_footed_Albatross/a.jpg\n2 {path}\n"),
        );
        let e = open_err(DatasetKind::Cub, &root);
        assert!(
            at_line(&e, &images, 2) && e.to_string().contains(why),
            "{e}"
        );
    }

    // An image without a class.
    write(
        &images,
        "1 001.Black_footed_Albatross/a.jpg\n9 002.Laysan_Albatross/b.jpg\n",
    );
    let e = open_err(DatasetKind::Cub, &root);
    assert!(at_line(&e, &images, 2), "{e}");

    // A missing annotation file.
    let labels = root.join("image_class_labels.txt");
    std::fs::remove_file(&labels).unwrap();
    let e = open_err(DatasetKind::Cub, &root);
    assert!(
        matches!(&e, DataError::Read { path, .. } if *path == labels),
        "{e}"
    );

    // Not UTF-8: the offset of the first bad byte.
    write(&labels, "1 1\n");
    std::fs::write(&images, b"1 \xff.jpg\n").unwrap();
    let e = open_err(DatasetKind::Cub, &root);
    assert!(
        matches!(&e, DataError::NotUtf8 { path, at: 2 } if *path == images),
        "{e}"
    );
}

#[test]
fn cub_missing_image_and_empty_split() {
    let dir = tempfile::tempdir().unwrap();
    let root = cub_tree(dir.path());
    std::fs::remove_file(root.join("images/150.Sage_Thrasher/c.jpg")).unwrap();
    let ds = Dataset::open(DatasetKind::Cub, &root).unwrap();
    let e = inspect(&ds).unwrap_err();
    assert!(
        matches!(&e, DataError::MissingImages { count: 1, shown, .. }
            if shown.len() == 1 && shown[0].ends_with("150.Sage_Thrasher/c.jpg")),
        "{e}"
    );

    // Only training classes: the test split is empty.
    write(
        &root.join("images.txt"),
        "1 001.Black_footed_Albatross/a.jpg\n",
    );
    write(&root.join("image_class_labels.txt"), "1 1\n");
    let e = open_err(DatasetKind::Cub, &root);
    assert!(
        matches!(&e, DataError::EmptySplit { annotation, split }
            if *annotation == root.join("images.txt") && split == "test"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// Cars196: a MAT-file written the way MATLAB writes v5 files.

/// A minimal MAT-file level 5 writer (little-endian, uncompressed), enough for struct
/// arrays of char and numeric fields and cell arrays of chars. Hand-written because no
/// crate's writer is independent of the reader under test.
mod mat5 {
    pub enum Value {
        Char(String),
        U8(u8),
        U16(u16),
        F64(f64),
        /// 1 x n struct array: field names, then one row of values per element.
        Struct(Vec<&'static str>, Vec<Vec<Value>>),
        /// 1 x n cell array.
        Cell(Vec<Value>),
    }

    fn element(ty: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        while out.len() % 8 != 0 {
            out.push(0);
        }
        out
    }

    fn matrix(class: u32, dims: [i32; 2], name: &str, body: Vec<u8>) -> Vec<u8> {
        let mut sub = Vec::new();
        let mut flags = Vec::new();
        flags.extend_from_slice(&class.to_le_bytes());
        flags.extend_from_slice(&0u32.to_le_bytes());
        sub.extend(element(6, &flags)); // miUINT32 array flags
        let d: Vec<u8> = dims.iter().flat_map(|x| x.to_le_bytes()).collect();
        sub.extend(element(5, &d)); // miINT32 dimensions
        sub.extend(element(1, name.as_bytes())); // miINT8 name
        sub.extend(body);
        element(14, &sub) // miMATRIX
    }

    pub fn encode(name: &str, v: &Value) -> Vec<u8> {
        match v {
            Value::Char(s) => {
                let units: Vec<u16> = s.encode_utf16().collect();
                let data: Vec<u8> = units.iter().flat_map(|u| u.to_le_bytes()).collect();
                matrix(4, [1, units.len() as i32], name, element(4, &data))
            }
            Value::U8(x) => matrix(9, [1, 1], name, element(2, &[*x])),
            Value::U16(x) => matrix(11, [1, 1], name, element(4, &x.to_le_bytes())),
            Value::F64(x) => matrix(6, [1, 1], name, element(9, &x.to_le_bytes())),
            Value::Cell(items) => {
                let body = items.iter().flat_map(|i| encode("", i)).collect();
                matrix(1, [1, items.len() as i32], name, body)
            }
            Value::Struct(fields, rows) => {
                let mut body = Vec::new();
                // Field name length as a small data element: miINT32, 4 bytes, value 32.
                body.extend_from_slice(&(5u32 | (4 << 16)).to_le_bytes());
                body.extend_from_slice(&32i32.to_le_bytes());
                let mut names = Vec::new();
                for f in fields {
                    let mut n = f.as_bytes().to_vec();
                    n.resize(32, 0);
                    names.extend(n);
                }
                body.extend(element(1, &names));
                for row in rows {
                    for v in row {
                        body.extend(encode("", v));
                    }
                }
                matrix(2, [1, rows.len() as i32], name, body)
            }
        }
    }

    /// The variable wrapped in a miCOMPRESSED element, as MATLAB's default `-v7` saves.
    pub fn compressed(name: &str, v: &Value) -> Vec<u8> {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&encode(name, v)).unwrap();
        let data = z.finish().unwrap();
        let mut out = 15u32.to_le_bytes().to_vec();
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend(data);
        out
    }

    pub fn file(vars: &[(&str, Value)]) -> Vec<u8> {
        file_with(vars, false)
    }

    pub fn file_with(vars: &[(&str, Value)], compress: bool) -> Vec<u8> {
        let mut text =
            b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 2015"
                .to_vec();
        text.resize(116, b' ');
        text.extend_from_slice(&[0; 8]); // no subsystem data
        text.extend_from_slice(&0x0100u16.to_le_bytes());
        text.extend_from_slice(b"IM");
        for (n, v) in vars {
            text.extend(if compress {
                compressed(n, v)
            } else {
                encode(n, v)
            });
        }
        text
    }
}

fn cars_tree(dir: &Path, class_as_double: bool, compress: bool) -> PathBuf {
    use mat5::Value;
    let root = dir.join("cars");
    let rows: Vec<(String, u8)> = vec![
        ("car_ims/000001.jpg".into(), 1),
        ("car_ims/000002.jpg".into(), 98),
        ("car_ims/000003.jpg".into(), 99),
        ("car_ims/000004.jpg".into(), 196),
        ("car_ims/000005.jpg".into(), 1),
    ];
    let fields = vec![
        "relative_im_path",
        "bbox_x1",
        "bbox_y1",
        "bbox_x2",
        "bbox_y2",
        "class",
        "test",
    ];
    let structs = rows
        .iter()
        .enumerate()
        .map(|(i, (p, c))| {
            write_jpeg(&root.join(p), [0, 0, 0]);
            let class = if class_as_double {
                Value::F64(*c as f64)
            } else {
                Value::U8(*c)
            };
            vec![
                Value::Char(p.clone()),
                Value::U16(1),
                Value::U16(2),
                Value::U16(300),
                Value::U16(200),
                class,
                // The `test` flag disagrees with the class split on purpose: it is ignored.
                Value::U8((i % 2) as u8),
            ]
        })
        .collect();
    let names = (1..=196)
        .map(|i| Value::Char(format!("Maker Model {i}")))
        .collect();
    let bytes = mat5::file_with(
        &[
            ("annotations", Value::Struct(fields, structs)),
            ("class_names", Value::Cell(names)),
        ],
        compress,
    );
    std::fs::write(root.join("cars_annos.mat"), bytes).unwrap();
    root
}

#[test]
fn cars_reads_a_v5_mat_file() {
    for (as_double, compress) in [(false, false), (true, false), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        let root = cars_tree(dir.path(), as_double, compress);
        let ds = Dataset::open(DatasetKind::Cars, &root).unwrap();
        assert_eq!(
            counts(&ds),
            vec![("train".into(), 2, 3), ("test".into(), 2, 2)]
        );
        let train = ds.split("train").unwrap();
        assert_eq!(train.labels(), vec![0, 1, 0]);
        assert_eq!(train.classes[1].original_id, "98");
        assert_eq!(train.classes[1].name.as_deref(), Some("Maker Model 98"));
        assert!(file_of(train, 1).ends_with("car_ims/000002.jpg"));
        let test = ds.split("test").unwrap();
        assert_eq!(test.classes[0].original_id, "99");
        assert_eq!(test.classes[1].name.as_deref(), Some("Maker Model 196"));
    }
}

#[test]
fn cars_bad_mat_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = cars_tree(dir.path(), false, true);
    let mat = root.join("cars_annos.mat");
    let good = std::fs::read(&mat).unwrap();

    for cut in [10, 200, good.len() - 3] {
        std::fs::write(&mat, &good[..cut]).unwrap();
        let e = open_err(DatasetKind::Cars, &root);
        assert!(
            matches!(&e, DataError::Mat { path, .. } if *path == mat),
            "cut at {cut}: {e}"
        );
    }

    // A struct without `class`.
    use mat5::Value;
    let bytes = mat5::file(&[(
        "annotations",
        Value::Struct(
            vec!["relative_im_path"],
            vec![vec![Value::Char("car_ims/000001.jpg".into())]],
        ),
    )]);
    std::fs::write(&mat, bytes).unwrap();
    let e = open_err(DatasetKind::Cars, &root);
    assert!(
        matches!(&e, DataError::Invalid { path, message }
            if *path == mat && message.starts_with("annotations(1): field `class`")),
        "{e}"
    );

    // No `annotations` at all.
    std::fs::write(&mat, mat5::file(&[("other", Value::U8(1))])).unwrap();
    let e = open_err(DatasetKind::Cars, &root);
    assert!(
        matches!(&e, DataError::Invalid { path, .. } if *path == mat),
        "{e}"
    );

    // Not a MAT-file at all.
    std::fs::write(&mat, vec![b'x'; 200]).unwrap();
    let e = open_err(DatasetKind::Cars, &root);
    assert!(
        matches!(&e, DataError::Mat { path, source: MatError::NoEndian } if *path == mat),
        "{e}"
    );

    std::fs::remove_file(&mat).unwrap();
    let e = open_err(DatasetKind::Cars, &root);
    assert!(
        matches!(&e, DataError::Read { path, .. } if *path == mat),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// Stanford Online Products

fn sop_tree(dir: &Path) -> PathBuf {
    let root = dir.join("Stanford_Online_Products");
    let header = "image_id class_id super_class_id path\n";
    let train = [
        (1, 1, 1, "bicycle_final/1_0.JPG"),
        (2, 1, 1, "bicycle_final/1_1.JPG"),
        (3, 7, 2, "cabinet_final/7_0.JPG"),
    ];
    let test = [
        (4, 11319, 1, "bicycle_final/11319_0.JPG"),
        (5, 11400, 3, "chair_final/11400_0.JPG"),
    ];
    for (file, rows) in [("Ebay_train.txt", &train[..]), ("Ebay_test.txt", &test[..])] {
        let mut text = header.to_string();
        for (i, c, s, p) in rows {
            text += &format!("{i} {c} {s} {p}\n");
            write_jpeg(&root.join(p), [1, 2, 3]);
        }
        write(&root.join(file), &text);
    }
    root
}

#[test]
fn sop_splits() {
    let dir = tempfile::tempdir().unwrap();
    sop_tree(dir.path());
    let ds = Dataset::open(DatasetKind::Sop, dir.path()).unwrap();
    assert_eq!(
        counts(&ds),
        vec![("train".into(), 2, 3), ("test".into(), 2, 2)]
    );
    assert_eq!(ds.split("train").unwrap().labels(), vec![0, 0, 1]);
    assert_eq!(ds.split("test").unwrap().classes[1].original_id, "11400");
}

#[test]
fn sop_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let root = sop_tree(dir.path());
    let f = root.join("Ebay_train.txt");
    write(
        &f,
        "image_id class_id super_class_id path\n1 1 1 a.JPG\n2 one 1 b.JPG\n",
    );
    let e = open_err(DatasetKind::Sop, &root);
    assert!(at_line(&e, &f, 3), "{e}");
    write(&f, "1 1 1 a.JPG\n");
    let e = open_err(DatasetKind::Sop, &root);
    assert!(at_line(&e, &f, 1), "{e}");
    write(
        &f,
        "image_id class_id super_class_id path\n1 1 1 a.JPG\n2 1 1 /root/b.JPG\n",
    );
    let e = open_err(DatasetKind::Sop, &root);
    assert!(
        at_line(&e, &f, 3) && e.to_string().contains("absolute"),
        "{e}"
    );
    write(&f, "image_id class_id super_class_id path\n");
    let e = open_err(DatasetKind::Sop, &root);
    assert!(
        matches!(&e, DataError::EmptySplit { annotation, split }
            if *annotation == f && split == "train"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// In-Shop

fn inshop_tree(dir: &Path, rows: &[(&str, &str, &str)], declared: Option<usize>) -> PathBuf {
    let root = dir.join("inshop");
    let mut text = format!(
        "{}\nimage_name item_id evaluation_status\n",
        declared.unwrap_or(rows.len())
    );
    for (p, item, status) in rows {
        text += &format!("{p} {item} {status}\n");
        write_jpeg(&root.join(p), [9, 9, 9]);
    }
    write(&root.join("list_eval_partition.txt"), &text);
    root
}

const INSHOP_ROWS: [(&str, &str, &str); 6] = [
    (
        "img/WOMEN/Dresses/id_00000002/02_1_front.jpg",
        "id_00000002",
        "train",
    ),
    (
        "img/WOMEN/Dresses/id_00000002/02_2_side.jpg",
        "id_00000002",
        "train",
    ),
    (
        "img/MEN/Denim/id_00000080/01_1_front.jpg",
        "id_00000080",
        "query",
    ),
    (
        "img/MEN/Denim/id_00000080/01_2_side.jpg",
        "id_00000080",
        "gallery",
    ),
    (
        "img/MEN/Denim/id_00000007/01_1_front.jpg",
        "id_00000007",
        "gallery",
    ),
    (
        "img/WOMEN/Tees/id_00000001/01_1_front.jpg",
        "id_00000001",
        "train",
    ),
];

#[test]
fn inshop_query_and_gallery_share_labels() {
    let dir = tempfile::tempdir().unwrap();
    let root = inshop_tree(dir.path(), &INSHOP_ROWS, None);
    let ds = Dataset::open(DatasetKind::Inshop, &root).unwrap();
    assert_eq!(
        counts(&ds),
        vec![
            ("train".into(), 2, 3),
            ("query".into(), 1, 1),
            ("gallery".into(), 2, 2)
        ]
    );
    assert_eq!(ds.split("train").unwrap().labels(), vec![1, 1, 0]);
    let query = ds.split("query").unwrap();
    let gallery = ds.split("gallery").unwrap();
    // id 7 < id 80 in the shared mapping: the query's item is label 1 in both.
    assert_eq!(query.labels(), vec![1]);
    assert_eq!(gallery.labels(), vec![1, 0]);
    assert_eq!(gallery.classes[1].original_id, "id_00000080");
}

#[test]
fn inshop_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let root = inshop_tree(dir.path(), &INSHOP_ROWS, Some(7));
    let list = root.join("list_eval_partition.txt");
    let e = open_err(DatasetKind::Inshop, &root);
    assert!(at_line(&e, &list, 1), "{e}");

    let mut rows = INSHOP_ROWS.to_vec();
    rows[3].2 = "validation";
    let root = inshop_tree(dir.path(), &rows, None);
    let e = open_err(DatasetKind::Inshop, &root);
    assert!(at_line(&e, &root.join("list_eval_partition.txt"), 6), "{e}");

    let mut rows = INSHOP_ROWS.to_vec();
    rows[1].0 = "img/../../secret.jpg";
    let root = inshop_tree(dir.path(), &rows, None);
    let e = open_err(DatasetKind::Inshop, &root);
    assert!(
        at_line(&e, &root.join("list_eval_partition.txt"), 4) && e.to_string().contains(".."),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// Folder

#[test]
fn folder_tree_as_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_jpeg(&root.join("train/b_class/1.jpg"), [0, 0, 0]);
    write_jpeg(&root.join("train/a_class/2.JPG"), [0, 0, 0]);
    write_jpeg(&root.join("train/a_class/1.png"), [0, 0, 0]);
    write(&root.join("train/a_class/notes.txt"), "not an image");
    write_jpeg(&root.join("test/z/1.jpeg"), [0, 0, 0]);
    let ds = Dataset::open(DatasetKind::Folder, root).unwrap();
    assert_eq!(
        counts(&ds),
        vec![("train".into(), 2, 3), ("test".into(), 1, 1)]
    );
    let train = ds.split("train").unwrap();
    assert_eq!(train.labels(), vec![0, 0, 1]);
    assert!(file_of(train, 0).ends_with("a_class/1.png"));
    assert_eq!(train.classes[1].name.as_deref(), Some("b_class"));

    std::fs::remove_dir_all(root.join("test")).unwrap();
    let e = open_err(DatasetKind::Folder, root);
    assert!(
        matches!(&e, DataError::List { path, .. } if *path == root.join("test")),
        "{e}"
    );
}

/// Issue 11: a UTF-8 byte-order mark spoiled the header; an id too large for its type was
/// called "not a non-negative integer"; a listed folder or dangling link "did not exist".
#[test]
fn byte_order_marks_large_ids_and_odd_listed_paths() {
    let dir = tempfile::tempdir().unwrap();
    let root = sop_tree(dir.path());
    let train = root.join("Ebay_train.txt");
    let text = std::fs::read_to_string(&train).unwrap();
    std::fs::write(&train, format!("\u{feff}{text}")).unwrap();
    Dataset::open(DatasetKind::Sop, &root).unwrap();

    std::fs::write(
        &train,
        format!("{text}99999999999999999999999 1 1 bicycle_final/x.JPG\n"),
    )
    .unwrap();
    let e = open_err(DatasetKind::Sop, &root).to_string();
    assert!(e.contains("is larger than the largest image id"), "{e}");

    let root = cub_tree(dir.path());
    let listed = root.join("images/150.Sage_Thrasher/c.jpg");
    std::fs::remove_file(&listed).unwrap();
    std::fs::create_dir(&listed).unwrap();
    let gone = root.join("images/001.Black_footed_Albatross/a.jpg");
    std::fs::remove_file(&gone).unwrap();
    std::os::unix::fs::symlink(root.join("nowhere.jpg"), &gone).unwrap();
    let e = inspect(&Dataset::open(DatasetKind::Cub, &root).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.jpg (is a folder)"), "{e}");
    assert!(e.contains("a.jpg (is a link to nothing)"), "{e}");
}

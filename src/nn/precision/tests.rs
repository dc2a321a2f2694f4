use super::*;
use crate::backbones::layers::ConvBnConfig;
use crate::backbones::{BackboneConfig, BatchNormMode, VitConfig};
use burn::tensor::{Device, TensorData};

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    crate::io::host::host_values(t)
}

/// Largest `|a - b|` relative to the largest `|b|`.
fn relative_gap(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn precision_names_round_trip() {
    for (text, p) in [
        ("f32", Precision::F32),
        ("f16", Precision::F16),
        ("bf16", Precision::Bf16),
    ] {
        assert_eq!(text.parse::<Precision>().unwrap(), p);
        assert_eq!(p.to_string(), text);
    }
    assert!("fp8".parse::<Precision>().is_err());
    assert_eq!(Precision::default(), Precision::F32);
    assert!(Precision::F16.scales_loss() && !Precision::Bf16.scales_loss());
}

#[test]
fn scale_gradient_keeps_the_value_and_scales_the_gradient() {
    let device = Device::flex().autodiff();
    let values = vec![0.1f32, -3.7, 1e-7, 12345.678];
    let x = Tensor::<1>::from_data(TensorData::new(values.clone(), [4]), &device).require_grad();
    let y = scale_gradient(x.clone(), 65536.0);
    assert_eq!(host(y.clone()), values, "the value must be exactly x");
    let grads = y.mul_scalar(2.0).sum().backward();
    let g = host(x.grad(&grads).unwrap());
    assert!(g.iter().all(|&v| v == 2.0 * 65536.0), "{g:?}");
}

#[test]
fn the_loss_scaler_backs_off_on_overflow_and_grows_after_clean_steps() {
    let mut s = LossScaler {
        growth_interval: 3,
        ..LossScaler::default()
    };
    assert!(!s.update(false));
    assert_eq!((s.scale, s.skipped), (32768.0, 1));
    for _ in 0..2 {
        assert!(s.update(true));
    }
    assert_eq!(s.scale, 32768.0);
    assert!(s.update(true));
    assert_eq!(s.scale, 65536.0);
    // An overflow resets the count of clean steps.
    s.update(true);
    s.update(false);
    s.update(true);
    s.update(true);
    assert_eq!(s.scale, 32768.0);
    // The scale stays at least 1.
    for _ in 0..40 {
        s.update(false);
    }
    assert_eq!(s.scale, 1.0);
}

/// Deterministic pseudo-random values (tests run in parallel and share the device's seed,
/// so the device's generator would give each pass other numbers).
fn values<const D: usize>(shape: [usize; D], salt: usize, device: &Device) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|k| (((k * 7919 + salt * 104_729) % 2003) as f32 / 1001.5 - 1.0) * 1.7)
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Forward and backward of a conv + BatchNorm unit in `precision`, returning the output, the
/// weight's gradient (always f32) and the BatchNorm running mean.
fn conv_bn_pass(precision: Precision) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let device = Device::flex().autodiff();
    let mut unit = ConvBnConfig::new(3, 8, 3)
        .with_padding(Some(1))
        .init(&BatchNormMode::Train, &device);
    unit.conv.weight =
        burn::module::Param::from_tensor(values([8, 3, 3, 3], 1, &device).mul_scalar(0.3));
    let x = values([2, 3, 6, 6], 2, &device);
    // A fixed projection of the output: a loss of the normalised output alone (its sum of
    // squares, say) hardly depends on the weight, and its gradient would be noise.
    let w = values([2, 8, 6, 6], 3, &device);
    let y = to_f32(unit.forward(precision.enter(x)));
    assert_eq!(y.dtype(), DType::F32);
    let grads = (y.clone() * w).sum().backward();
    let g = unit.conv.weight.grad(&grads).expect("a weight gradient");
    assert_eq!(
        g.dtype(),
        DType::F32,
        "the f32 master weight gets an f32 gradient"
    );
    (host(y), host(g), host(unit.bn.running_mean.value()))
}

#[test]
fn reduced_precision_conv_and_batch_norm_follow_f32() {
    let (y32, g32, mean32) = conv_bn_pass(Precision::F32);
    for (precision, tolerance) in [(Precision::F16, 5e-3), (Precision::Bf16, 4e-2)] {
        let (y, g, mean) = conv_bn_pass(precision);
        let (dy, dg, dm) = (
            relative_gap(&y, &y32),
            relative_gap(&g, &g32),
            relative_gap(&mean, &mean32),
        );
        assert!(
            dy < tolerance && dg < tolerance && dm < tolerance,
            "{precision}: output {dy}, gradient {dg}, running mean {dm}"
        );
    }
}

#[test]
fn a_reduced_precision_vit_runs_and_follows_f32() {
    let device = Device::flex().autodiff();
    device.seed(5);
    let config = BackboneConfig::Vit(
        VitConfig::new()
            .with_dim(16)
            .with_depth(1)
            .with_num_heads(2)
            .with_patch_size(4)
            .with_image_size(8),
    );
    let vit = config.init(&device);
    let x = values([2, 3, 8, 8], 4, &device);
    let f32_out = host(vit.forward_in(x.clone(), Precision::F32));
    let bf16 = vit.forward_in(x, Precision::Bf16);
    assert_eq!(bf16.dtype(), DType::F32);
    let gap = relative_gap(&host(bf16), &f32_out);
    assert!(gap < 5e-2, "bf16 ViT off by {gap}");
}

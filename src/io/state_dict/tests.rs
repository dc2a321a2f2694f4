use super::*;
use crate::method::embedder::{EmbeddingHead, EmbeddingHeadConfig};
use burn::nn::LinearConfig;

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// `[N, in]` rows through a Linear.
fn apply(linear: &Linear, rows: Vec<f32>, d_in: usize, device: &Device) -> Vec<f32> {
    let n = rows.len() / d_in;
    host(linear.forward(Tensor::<2>::from_data(
        TensorData::new(rows, [n, d_in]),
        device,
    )))
}

/// A head (BatchNorm1d + Linear) with non-default buffers, so that every kind of tensor
/// has a value of its own.
fn trained_head(device: &Device) -> EmbeddingHead {
    let train = device.clone().autodiff();
    let head = EmbeddingHeadConfig::new(4, 3).init(&train);
    let x = Tensor::<2>::from_data(
        TensorData::new((0..12).map(|k| (k * k % 7) as f32).collect(), [3, 4]),
        &train,
    );
    let _ = head.forward(x);
    let dict = export_torch(&head, "");
    load_torch(
        EmbeddingHeadConfig::new(4, 3).init(device),
        &dict,
        "",
        device,
    )
    .unwrap()
}

#[test]
fn export_then_load_into_a_fresh_module_gives_equal_tensors() {
    let device = Device::flex();
    let head = trained_head(&device);
    let dict = export_torch(&head, "fc");
    let keys: Vec<&str> = dict.tensors.keys().map(|k| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "fc.0.bias",
            "fc.0.num_batches_tracked",
            "fc.0.running_mean",
            "fc.0.running_var",
            "fc.0.weight",
            "fc.1.bias",
            "fc.1.weight",
        ]
    );
    assert_eq!(dict.get("fc.0.num_batches_tracked").unwrap().data, [1.0]);
    assert!(
        dict.get("fc.0.num_batches_tracked")
            .unwrap()
            .shape
            .is_empty()
    );

    let fresh = EmbeddingHeadConfig::new(4, 3).init(&device);
    assert_ne!(
        host(fresh.linear.weight.val()),
        host(head.linear.weight.val())
    );
    let loaded = load_torch(fresh, &dict, "fc.", &device).unwrap();
    let again = export_torch(&loaded, "fc");
    assert_eq!(again.tensors, dict.tensors);
    assert_eq!(
        host(loaded.linear.weight.val()),
        host(head.linear.weight.val())
    );
    assert_eq!(
        host(loaded.norm.running_var.value()),
        host(head.norm.running_var.value())
    );
}

#[test]
fn a_linear_weight_is_transposed_exactly_once() {
    let device = Device::flex();
    // PyTorch: weight [out = 2, in = 3], y = x W^T + b.
    let torch_weight = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let mut dict = StateDict::default();
    dict.insert("weight", HostTensor::new(vec![2, 3], torch_weight.clone()));
    dict.insert("bias", HostTensor::new(vec![2], vec![0.5, -0.5]));
    let linear = load_torch(LinearConfig::new(3, 2).init(&device), &dict, "", &device).unwrap();
    assert_eq!(linear.weight.val().dims(), [3, 2]);
    // x = e_0 picks column 0 of W: [W[0][0], W[1][0]] + b; x = e_2 column 2.
    let y = apply(&linear, vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0], 3, &device);
    assert_eq!(y, [1.5, 3.5, 3.5, 5.5]);
    // Exported back in PyTorch's layout, unchanged.
    let out = export_torch(&linear, "");
    assert_eq!(out.get("weight").unwrap().shape, [2, 3]);
    assert_eq!(out.get("weight").unwrap().data, torch_weight);
    // A weight given in burn's layout does not fit.
    dict.insert("weight", HostTensor::new(vec![3, 2], torch_weight));
    let err = load_torch(LinearConfig::new(3, 2).init(&device), &dict, "", &device).unwrap_err();
    // Both shapes in PyTorch's layout: what the file holds against `[out, in]`.
    let WeightsError::Mismatch { shapes, .. } = &err else {
        panic!("not a mismatch: {err}");
    };
    assert_eq!(
        shapes,
        &[ShapeMismatch {
            tensor: "weight".into(),
            expected: vec![2, 3],
            found: vec![3, 2],
        }]
    );
}

#[test]
fn missing_and_unexpected_keys_are_errors_that_name_them() {
    let device = Device::flex();
    let mut dict = export_torch(&trained_head(&device), "m");
    let load = |dict: &StateDict| {
        load_torch(
            EmbeddingHeadConfig::new(4, 3).init(&device),
            dict,
            "m.",
            &device,
        )
        .map(|_| ())
    };
    let names = |e: WeightsError| match e {
        WeightsError::Mismatch {
            missing,
            unexpected,
            ..
        } => (missing, unexpected),
        other => panic!("not a mismatch: {other}"),
    };
    // Tensors outside the prefix are not this module's business.
    dict.insert("other.thing", HostTensor::new(vec![1], vec![0.0]));
    load(&dict).unwrap();

    let mut missing = dict.clone();
    missing.tensors.remove("m.1.bias");
    let (missing, unexpected) = names(load(&missing).unwrap_err());
    assert_eq!(
        (missing, unexpected),
        (vec!["m.1.bias".to_string()], vec![])
    );

    let mut extra = dict.clone();
    extra.insert("m.1.scale", HostTensor::new(vec![3], vec![1.0; 3]));
    let (missing, unexpected) = names(load(&extra).unwrap_err());
    assert_eq!(
        (missing, unexpected),
        (vec![], vec!["m.1.scale".to_string()])
    );
}

#[test]
fn safetensors_round_trip_in_f32_and_f16() {
    let dir = tempfile::tempdir().unwrap();
    let mut dict = StateDict::default();
    dict.insert(
        "a.weight",
        HostTensor::new(vec![2, 3], vec![1.0, -2.5, 0.125, 3.0, 1e-3, -7.0]),
    );
    dict.insert("a.count", HostTensor::new(vec![], vec![42.0]));
    dict.insert("b", HostTensor::new(vec![1], vec![0.1]));
    dict.metadata.insert("format".into(), "pt".into());

    let path = dir.path().join("x.safetensors");
    dict.write_safetensors(&path).unwrap();
    let back = StateDict::read_safetensors(&path).unwrap();
    assert_eq!(back.metadata, dict.metadata);
    assert_eq!(back.tensors.len(), 3);
    for (name, t) in &dict.tensors {
        let b = &back.tensors[name];
        assert_eq!(b.shape, t.shape, "{name}");
        let want: Vec<f64> = t.data.iter().map(|&v| v as f32 as f64).collect();
        assert_eq!(b.data, want, "{name}");
    }

    let half_path = dir.path().join("h.safetensors");
    dict.write_safetensors_as(&half_path, StoredDtype::F16)
        .unwrap();
    let back = StateDict::read_safetensors(&half_path).unwrap();
    for (name, t) in &dict.tensors {
        let want: Vec<f64> = t
            .data
            .iter()
            .map(|&v| half::f16::from_f64(v).to_f64())
            .collect();
        assert_eq!(back.tensors[name].data, want, "{name}");
    }
    // 0.1 is not an f16 value: the file really holds half precision.
    assert_ne!(back.tensors["b"].data[0], 0.1f32 as f64);
}

#[test]
fn a_value_beyond_the_output_type_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let mut dict = StateDict::default();
    dict.insert("fine", HostTensor::new(vec![2], vec![65504.0, -1.0]));
    // BatchNorm's counter is written as int64, as PyTorch keeps it: exact past f16's range.
    dict.insert(
        "bn.num_batches_tracked",
        HostTensor::new(vec![], vec![100001.0]),
    );
    let path = dir.path().join("h.safetensors");
    dict.write_safetensors_as(&path, StoredDtype::F16).unwrap();
    let back = StateDict::read_safetensors(&path).unwrap();
    assert_eq!(back.tensors["bn.num_batches_tracked"].data, [100001.0]);
    assert_eq!(back.tensors["fine"].data, [65504.0, -1.0]);
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        file.tensor("bn.num_batches_tracked").unwrap().dtype(),
        safetensors::Dtype::I64
    );
    assert_eq!(
        file.tensor("fine").unwrap().dtype(),
        safetensors::Dtype::F16
    );
    drop(file);
    std::fs::remove_file(&path).unwrap();

    dict.insert("bn.running_var", HostTensor::new(vec![1], vec![100000.0]));
    let err = dict
        .write_safetensors_as(&path, StoredDtype::F16)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bn.running_var") && err.contains("100000") && err.contains("float16"),
        "{err}"
    );
    assert!(!path.exists());
    dict.tensors.remove("bn.running_var");
    // Infinities and NaN are carried as they are; only finite values that would become
    // infinite are refused. float32 holds 100000.
    dict.insert("inf", HostTensor::new(vec![1], vec![f64::INFINITY]));
    dict.write_safetensors(&path).unwrap();
    dict.insert("huge", HostTensor::new(vec![1], vec![1e300]));
    let err = dict.write_safetensors(&path).unwrap_err().to_string();
    assert!(err.contains("`huge`") && err.contains("float32"), "{err}");
}

#[test]
fn replacing_a_file_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let mut dict = StateDict::default();
    dict.insert("a", HostTensor::new(vec![2], vec![1.0, 2.0]));
    dict.replace_safetensors_as(&path, StoredDtype::F32)
        .unwrap();
    let before = std::fs::read(&path).unwrap();
    let partial = crate::io::atomic::temporary_path(&path);
    assert!(!partial.exists());

    // Refused before writing: the old file stays, nothing is left beside it, and the error
    // names the file asked for.
    dict.insert("big", HostTensor::new(vec![1], vec![1e6]));
    let err = dict
        .replace_safetensors_as(&path, StoredDtype::F16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("w.safetensors was not written"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert!(partial.symlink_metadata().is_err());

    // A full disk (writes to /dev/full fail with ENOSPC) likewise.
    std::os::unix::fs::symlink("/dev/full", &partial).unwrap();
    let err = dict
        .replace_safetensors_as(&path, StoredDtype::F32)
        .unwrap_err();
    assert!(
        matches!(&err, WeightsError::NoSpace { path: p } if *p == path),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert!(partial.symlink_metadata().is_err());

    // And a success replaces it whole.
    dict.replace_safetensors_as(&path, StoredDtype::F32)
        .unwrap();
    assert_ne!(std::fs::read(&path).unwrap(), before);
}

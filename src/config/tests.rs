use super::*;

#[test]
fn every_preset_is_valid_and_round_trips_through_toml() {
    for name in PRESETS {
        let c = ExperimentConfig::preset(name).unwrap();
        c.validate().unwrap();
        let back: ExperimentConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c, "{name}");
    }
}

#[test]
fn presets_follow_the_release_table() {
    let c = ExperimentConfig::preset("cub-resnet50").unwrap();
    assert_eq!((c.data.classes_per_batch, c.data.per_class), (27, 3));
    assert_eq!(
        (c.loss.diversity_weight, c.loss.hardness_weight),
        (60.0, 20.0)
    );
    assert_eq!(c.model.batch_norm, BatchNormMode::Frozen);
    assert_eq!(c.optim.warm_up_epochs, 2);
    let c = ExperimentConfig::preset("inshop-googlenet").unwrap();
    assert_eq!((c.model.gnn_layers, c.model.heads), (1, 2));
    assert_eq!((c.loss.hardness_alpha, c.train.epochs), (2.0, 200));
    let c = ExperimentConfig::preset("sop-dino").unwrap();
    assert_eq!((c.model.embedding_dim, c.optim.lr), (384, 1.5e-5));
}

#[test]
fn overrides_set_values_and_name_bad_keys() {
    let c = ExperimentConfig::preset("cub-resnet50").unwrap();
    let c = c
        .with_overrides(&[
            "optim.lr=3e-4".into(),
            "loss.masking=release".into(),
            "data.root=/x".into(),
        ])
        .unwrap();
    assert_eq!(c.optim.lr, 3e-4);
    assert_eq!(c.loss.masking, HardnessMasking::Release);
    assert_eq!(c.data.root.as_deref(), Some("/x"));
    let old_names = ExperimentConfig::preset("cub-resnet50")
        .unwrap()
        .with_overrides(&["loss.dot_weight=7".into(), "model.embedding=256".into()])
        .unwrap();
    assert_eq!(old_names.loss.hardness_weight, 7.0);
    assert_eq!(old_names.model.embedding_dim, 256);
    let old_file = ExperimentConfig::preset("cub-resnet50")
        .unwrap()
        .to_toml()
        .replace("hardness_alpha =", "alpha =")
        .replace("embedding_dim =", "embedding =");
    let back: ExperimentConfig = toml::from_str(&old_file).unwrap();
    assert_eq!(back, ExperimentConfig::preset("cub-resnet50").unwrap());
    let base = ExperimentConfig::preset("cub-resnet50").unwrap();
    let err = base
        .clone()
        .with_overrides(&["optim.lrr=1".into()])
        .unwrap_err();
    assert!(
        matches!(&err, ConfigError::UnknownKey { key } if key == "optim.lrr"),
        "{err}"
    );
    let err = base
        .clone()
        .with_overrides(&["model.heads=3".into()])
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Invalid {
                key: "model.heads",
                ..
            }
        ),
        "{err}"
    );
    let err = base
        .clone()
        .with_overrides(&["optim.lr=fast".into()])
        .unwrap_err();
    assert!(
        matches!(&err, ConfigError::BadValue { key, .. } if key == "optim.lr"),
        "{err}"
    );
    let err = base.with_overrides(&["nonsense".into()]).unwrap_err();
    assert!(
        matches!(&err, ConfigError::NotAnOverride { item } if item == "nonsense"),
        "{err}"
    );
    let err = ExperimentConfig::demo()
        .with_overrides(&["train.device=tpu".into()])
        .unwrap_err();
    assert!(
        matches!(
            &err,
            ConfigError::Device(crate::device::DeviceError::Setting {
                key: "train.device",
                ..
            })
        ),
        "{err}"
    );
}

#[test]
fn a_file_with_an_unknown_key_names_it_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.toml");
    let text = ExperimentConfig::demo()
        .to_toml()
        .replace("[loss]", "[loss]\ntypo = 1");
    std::fs::write(&path, text).unwrap();
    let err = ExperimentConfig::from_file(&path).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Parse { path: p, line: Some(_), message }
            if *p == path && message.contains("typo")),
        "{err}"
    );
    let err = ExperimentConfig::from_file(&dir.path().join("none.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
}

/// Config files and the command line spell every variant alike.
#[test]
fn serde_and_display_agree_on_every_enum() {
    fn check<T>()
    where
        T: clap::ValueEnum + Serialize + std::fmt::Display + std::str::FromStr + PartialEq,
        <T as std::str::FromStr>::Err: std::fmt::Debug,
    {
        for v in T::value_variants() {
            let json = serde_json::to_value(v).unwrap();
            assert_eq!(json.as_str(), Some(v.to_string().as_str()));
            assert!(v.to_string().parse::<T>().unwrap() == *v);
        }
    }
    check::<DatasetKind>();
    check::<BaseLoss>();
    check::<HardnessMasking>();
    check::<SelectOn>();
    check::<BackboneKind>();
    check::<BatchNormMode>();
    use crate::io::state_dict::StoredDtype;
    assert_eq!("float16".parse::<StoredDtype>(), Ok(StoredDtype::F16));
    assert_eq!(StoredDtype::F32.to_string(), "f32");
    let err = "imagenet".parse::<DatasetKind>().unwrap_err();
    assert_eq!((err.what, err.given.as_str()), ("dataset kind", "imagenet"));
    assert!(err.expected.iter().any(|k| k == "inshop"), "{err}");
}

#[test]
fn schedules_match_pytorch() {
    let c = ExperimentConfig::preset("cub-resnet50").unwrap();
    let lr0 = c.learning_rates(0);
    assert_eq!(lr0.backbone, 1.5e-4);
    assert_eq!(lr0.gnn, 1.5e-4);
    // StepLR(step 10, gamma 0.5): epoch 25 -> 0.25x.
    assert!((c.learning_rates(25).backbone - 1.5e-4 * 0.25).abs() < 1e-15);
    // Cosine over 100 epochs: half-way -> half.
    assert!((c.learning_rates(50).gnn - 0.75e-4).abs() < 1e-12);
    assert_eq!(c.learning_rates(99).classifier, 1e-3);
}

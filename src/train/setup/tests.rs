use super::*;
use crate::data::{ClassInfo, ImageSource, Sample};

fn split(classes: usize, per: usize) -> Split {
    Split {
        name: "train".into(),
        samples: (0..classes * per)
            .map(|i| Sample {
                source: ImageSource::File(format!("{i}.jpg").into()),
                label: i / per,
            })
            .collect(),
        classes: (0..classes)
            .map(|c| ClassInfo {
                original_id: c.to_string(),
                name: None,
            })
            .collect(),
    }
}

#[test]
fn validation_takes_whole_classes_and_relabels_both_parts() {
    let s = split(20, 3);
    let (train, val) = carve_validation(&s, 0.25, 7).unwrap();
    assert_eq!((train.classes.len(), val.classes.len()), (15, 5));
    assert_eq!((train.samples.len(), val.samples.len()), (45, 15));
    let ids =
        |s: &Split| -> Vec<String> { s.classes.iter().map(|c| c.original_id.clone()).collect() };
    assert!(ids(&train).iter().all(|c| !ids(&val).contains(c)));
    assert!(train.samples.iter().all(|x| x.label < 15));
    assert!(val.samples.iter().all(|x| x.label < 5));
    // Same seed, same classes; another seed, (here) other classes.
    assert_eq!(ids(&carve_validation(&s, 0.25, 7).unwrap().1), ids(&val));
    assert_ne!(ids(&carve_validation(&s, 0.25, 8).unwrap().1), ids(&val));
    assert!(matches!(
        carve_validation(&split(3, 2), 0.5, 0),
        Err(ConfigError::ValidationFraction { classes: 3, .. })
    ));
}

#[test]
fn split_samples_are_the_dataset_split_and_a_missing_split_names_the_others() {
    let config = ExperimentConfig::demo();
    let test = split_samples(&config, None, "test").unwrap();
    let dataset = Dataset::open(DatasetKind::Emoji, Path::new("")).unwrap();
    assert_eq!(test, dataset.split("test").unwrap().samples);
    let err = split_samples(&config, None, "query").unwrap_err();
    assert!(
        matches!(&err, Error::Data(crate::data::DataError::NoSplit { split, available, .. })
            if split == "query" && *available == ["train", "test"]),
        "{err}"
    );
}

#[test]
fn heads_are_dropped_and_the_rest_must_fit() {
    assert!(is_classifier_head(BackboneKind::Resnet50, "fc.weight"));
    assert!(!is_classifier_head(
        BackboneKind::Resnet50,
        "layer1.0.conv1.weight"
    ));
    assert!(is_classifier_head(
        BackboneKind::Googlenet,
        "aux2.fc1.weight"
    ));
    let mut config = ExperimentConfig::preset("cub-resnet50").unwrap();
    let err = pretrained_weights(&config).unwrap_err();
    assert!(
        matches!(&err, Error::Config(ConfigError::Unset { key: "model.weights", hint })
            if hint.contains("resnet50")),
        "{err}"
    );
    config.model.weights = Some("/nonexistent/w.pth".into());
    let err = pretrained_weights(&config).unwrap_err();
    assert!(
        matches!(&err, Error::Weights(crate::io::WeightsError::Read { path, .. })
            if path.ends_with("w.pth")),
        "{err}"
    );
}

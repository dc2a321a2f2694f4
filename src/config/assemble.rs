//! A run's configuration from its starting point (a preset or a file), the settings a run
//! most often changes, and free `key=value` overrides.

use std::path::{Path, PathBuf};

use super::{ConfigError, ExperimentConfig, SelectOn};
use crate::device::DeviceSpec;

/// Where a configuration starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigBase {
    /// A name from [`super::PRESETS`].
    Preset(String),
    /// A TOML experiment file.
    File(PathBuf),
}

impl ConfigBase {
    pub fn load(&self) -> Result<ExperimentConfig, ConfigError> {
        match self {
            ConfigBase::Preset(name) => ExperimentConfig::preset(name),
            ConfigBase::File(path) => ExperimentConfig::from_file(path),
        }
    }
}

/// The settings a run most often changes, typed; `None` keeps the base's value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunSettings {
    /// `model.weights`.
    pub weights: Option<PathBuf>,
    /// `data.root`.
    pub data_root: Option<PathBuf>,
    /// `train.out`.
    pub out: Option<PathBuf>,
    /// `train.select_on`.
    pub select_on: Option<SelectOn>,
    /// `loss.generation`; `false` trains the plain baseline.
    pub generation: Option<bool>,
    /// `train.device`.
    pub device: Option<DeviceSpec>,
    /// `train.precision`.
    pub precision: Option<crate::nn::precision::Precision>,
}

impl ExperimentConfig {
    /// `base` with `settings` and then `overrides` applied: an explicit `key=value` has the
    /// last word even over a typed setting, as a later flag does on a command line.
    pub fn assemble(
        base: &ConfigBase,
        settings: &RunSettings,
        overrides: &[String],
    ) -> Result<ExperimentConfig, ConfigError> {
        let mut c = base.load()?;
        let text = |p: &Path| p.display().to_string();
        if let Some(w) = &settings.weights {
            c.model.weights = Some(text(w));
        }
        if let Some(r) = &settings.data_root {
            c.data.root = Some(text(r));
        }
        if let Some(o) = &settings.out {
            c.train.out = text(o);
        }
        if let Some(s) = settings.select_on {
            c.train.select_on = s;
        }
        if let Some(g) = settings.generation {
            c.loss.generation = g;
        }
        if let Some(d) = settings.device {
            c.train.device = d.to_string();
        }
        if let Some(p) = settings.precision {
            c.train.precision = p;
        }
        // Also validates the whole, so a typed setting that breaks a rule is reported too.
        c.with_overrides(overrides)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset() -> ConfigBase {
        ConfigBase::Preset("cub-resnet50".into())
    }

    #[test]
    fn typed_settings_replace_the_base_values() {
        let settings = RunSettings {
            weights: Some("w/resnet 50.pth".into()),
            data_root: Some("/data/cub".into()),
            out: Some("runs/x".into()),
            select_on: Some(SelectOn::Test),
            generation: Some(false),
            device: Some(DeviceSpec::Cuda(1)),
            precision: Some(crate::nn::precision::Precision::Bf16),
        };
        let c = ExperimentConfig::assemble(&preset(), &settings, &[]).unwrap();
        assert_eq!(c.train.precision, crate::nn::precision::Precision::Bf16);
        assert_eq!(c.model.weights.as_deref(), Some("w/resnet 50.pth"));
        assert_eq!(c.data.root.as_deref(), Some("/data/cub"));
        assert_eq!(c.train.out, "runs/x");
        assert_eq!(c.train.select_on, SelectOn::Test);
        assert!(!c.loss.generation);
        assert_eq!(c.train.device, "cuda:1");
        // Everything else is the preset's.
        let mut expected = preset().load().unwrap();
        expected.model.weights = c.model.weights.clone();
        expected.data.root = c.data.root.clone();
        expected.train.out = c.train.out.clone();
        expected.train.select_on = SelectOn::Test;
        expected.loss.generation = false;
        expected.train.device = "cuda:1".into();
        expected.train.precision = crate::nn::precision::Precision::Bf16;
        assert_eq!(c, expected);
    }

    #[test]
    fn no_settings_give_the_base() {
        let c = ExperimentConfig::assemble(&preset(), &RunSettings::default(), &[]).unwrap();
        assert_eq!(c, preset().load().unwrap());
    }

    #[test]
    fn overrides_win_over_typed_settings() {
        let settings = RunSettings {
            select_on: Some(SelectOn::Test),
            out: Some("runs/typed".into()),
            ..RunSettings::default()
        };
        let overrides = [
            "train.select_on=validation".to_string(),
            "train.out=runs/set".into(),
        ];
        let c = ExperimentConfig::assemble(&preset(), &settings, &overrides).unwrap();
        assert_eq!(c.train.select_on, SelectOn::Validation);
        assert_eq!(c.train.out, "runs/set");
    }

    #[test]
    fn bad_bases_and_overrides_are_errors() {
        let none = RunSettings::default();
        let err =
            ExperimentConfig::assemble(&ConfigBase::Preset("nope".into()), &none, &[]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownPreset { name, .. } if name == "nope"),
            "{err}"
        );
        let err =
            ExperimentConfig::assemble(&preset(), &none, &["optim.lrr=1".into()]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { key } if key == "optim.lrr"),
            "{err}"
        );
        let err =
            ExperimentConfig::assemble(&ConfigBase::File("/nonexistent/c.toml".into()), &none, &[])
                .unwrap_err();
        assert!(
            matches!(&err, ConfigError::Read { path, .. } if path.ends_with("c.toml")),
            "{err}"
        );
    }
}

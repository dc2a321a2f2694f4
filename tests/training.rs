//! Training runs end to end on the embedded emoji set at smoke size: the run folder, resume
//! after an interruption, Proxy-Anchor, the baseline, and the commands that use a trained model.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use gca_hng::config::{BaseLoss, BatchNormMode, ExperimentConfig, SelectOn};
use gca_hng::error::Error;
use gca_hng::io::state_dict::StateDict;
use gca_hng::train::checkpoint::model_fingerprint;
use gca_hng::train::run_dir::RunDirError;
use gca_hng::train::step::StepMetrics;
use gca_hng::train::{Observer, RunOptions, RunOutcome, train};

/// Training draws dropout masks from the backend's global generator, seeded per step; runs in
/// parallel threads of this process would interleave their draws.
static SERIAL: Mutex<()> = Mutex::new(());

fn tiny_config() -> ExperimentConfig {
    let mut c = ExperimentConfig::demo();
    c.data.image_size = 32;
    c.data.resize = 32;
    c.data.classes_per_batch = 4;
    c.data.per_class = 2;
    c.data.workers = 1;
    c.model.embedding_dim = 16;
    c.train.epochs = 2;
    c.train.eval_every = 1;
    c.train.select_on = SelectOn::Test;
    c
}

fn tiny_options(out: &Path) -> RunOptions {
    let mut o = RunOptions::new(out);
    o.max_steps_per_epoch = Some(3);
    o.eval_class_limit = Some(6);
    o
}

/// Sets the stop flag after `after` steps, as Ctrl-C would.
struct StopAfter {
    after: usize,
    seen: usize,
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Observer for StopAfter {
    fn step_done(&mut self, _m: &StepMetrics, _images: usize) {
        self.seen += 1;
        if self.seen == self.after {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Runs a command and returns its standard output; the test fails with its standard error.
fn succeed(command: &mut Command) -> Vec<u8> {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn model_tensors(path: &Path) -> StateDict {
    StateDict::read_safetensors(path).unwrap()
}

/// Retrieval metrics as percentages: every value in [0, 100], Recall@k non-decreasing in k,
/// MAP@R at most R-Precision (it weighs each hit in the top R by a precision of at most one).
fn assert_metrics_valid(what: &str, m: &serde_json::Value) {
    let recall = m["recall"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no recall in {m}"));
    assert!(!recall.is_empty(), "{what}: {m}");
    let mut by_k: Vec<(usize, f64)> = recall
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.as_f64().unwrap()))
        .collect();
    by_k.sort_by_key(|(k, _)| *k);
    for (k, v) in &by_k {
        assert!((0.0..=100.0).contains(v), "{what}: R@{k} = {v}");
    }
    assert!(
        by_k.windows(2).all(|w| w[0].1 <= w[1].1),
        "{what}: recall decreases with k: {by_k:?}"
    );
    let map = m["map_at_r"].as_f64().unwrap();
    let rp = m["r_precision"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&map), "{what}: MAP@R {map}");
    assert!((0.0..=100.0).contains(&rp), "{what}: RP {rp}");
    assert!(map <= rp + 1e-9, "{what}: MAP@R {map} above RP {rp}");
    if let Some(nmi) = m["nmi"].as_f64() {
        assert!((0.0..=100.0).contains(&nmi), "{what}: NMI {nmi}");
    }
}

fn metrics_records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A record without its wall-clock fields.
fn without_timings(mut record: serde_json::Value) -> serde_json::Value {
    let fields = record.as_object_mut().unwrap();
    for timing in ["train_seconds", "images_per_second", "eval_seconds"] {
        assert!(fields.remove(timing).is_some(), "{timing} missing");
    }
    record
}

/// The two runs ended with the same model, optimiser state and records.
fn assert_same_run(whole: &Path, split: &Path) {
    let a = model_tensors(&whole.join("last.safetensors"));
    let b = model_tensors(&split.join("last.safetensors"));
    assert_eq!(a.tensors.len(), b.tensors.len());
    let mut compared = 0;
    for (name, ta) in &a.tensors {
        let tb = &b.tensors[name];
        assert_eq!(ta.shape, tb.shape, "{name}");
        for (x, y) in ta.data.iter().zip(&tb.data) {
            assert!(
                (x - y).abs() <= 1e-6 * (1.0 + x.abs()),
                "{name}: {x} vs {y}"
            );
        }
        compared += 1;
    }
    assert!(
        compared > 100,
        "model and optimiser tensors compared: {compared}"
    );
    let (la, lb) = (metrics_records(whole), metrics_records(split));
    assert_eq!(la.len(), 2);
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x["losses"], y["losses"]);
        assert_eq!(x["test"], y["test"]);
    }
}

#[test]
fn an_interrupted_run_resumes_to_the_same_result() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // BatchNorm on batch statistics, so that every backbone forward (the frozen warm-up's
    // included) advances the running statistics the checkpoints hold.
    let mut config = tiny_config();
    config.model.batch_norm = BatchNormMode::Train;

    let whole = dir.path().join("whole");
    let outcome = train(&config, &tiny_options(&whole), &mut gca_hng::train::Silent).unwrap();
    assert!(matches!(outcome, RunOutcome::Finished(_)));

    // Stopped inside the warm-up epoch (after step 2 of 3: the next batch's backbone forward
    // may have run beside that step already, and must leave no trace), and inside the second
    // epoch (after its step 1 of 3); each then resumed.
    assert_eq!(config.optim.warm_up_epochs, 1);
    for (after, at) in [(2, (0, 2)), (4, (1, 1))] {
        let split = dir.path().join(format!("split-{after}"));
        let opts = tiny_options(&split);
        let mut stopper = StopAfter {
            after,
            seen: 0,
            flag: opts.stop.clone(),
        };
        match train(&config, &opts, &mut stopper).unwrap() {
            RunOutcome::Interrupted { epoch, step } => assert_eq!((epoch, step), at),
            RunOutcome::Finished(_) => panic!("the run should have stopped"),
        }
        let mut resumed = tiny_options(&split);
        resumed.resume = true;
        let RunOutcome::Finished(summary) =
            train(&config, &resumed, &mut gca_hng::train::Silent).unwrap()
        else {
            panic!("the resumed run should finish")
        };
        assert_eq!(summary.epochs, 2);
        assert_same_run(&whole, &split);
    }
    let split = dir.path().join("split-4");
    // A fresh run into a folder that holds one is refused.
    let err = train(&config, &tiny_options(&whole), &mut gca_hng::train::Silent)
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::RunDir(RunDirError::Occupied { root }) if root.ends_with("whole")),
        "{err}"
    );
    // Resuming with another configuration is refused.
    let mut other = config.clone();
    other.optim.lr = 1.0;
    let mut again = tiny_options(&split);
    again.resume = true;
    let err = train(&other, &again, &mut gca_hng::train::Silent)
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::RunDir(RunDirError::ConfigDiffers { root, keys })
            if root.ends_with("split-4") && keys == "optim.lr"),
        "{err}"
    );
}

#[test]
fn a_fixed_seed_lowers_the_metric_loss_and_a_second_run_repeats_it_exactly() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // Batches of 8 classes and a learning rate of 1e-3 (the demo's is 1e-4), 3 epochs of 16
    // steps: the mean J_m falls from about 2.03 in the first epoch (the warm-up) to 1.70-1.93
    // in the last, whichever CPU kernels run (GCA_CONV=burn|lowered or our depthwise kernel,
    // our fused BatchNorm or burn's). With 8 steps per epoch the last epoch's mean moved by
    // +-0.05 with the rounding of those kernels alone, as much as it fell.
    let mut config = tiny_config();
    config.data.classes_per_batch = 8;
    config.optim.lr = 1e-3;
    config.train.epochs = 3;
    config.train.eval_every = 3;
    let steps = 16;
    let opts = |name: &str| {
        let mut o = tiny_options(&dir.path().join(name));
        o.max_steps_per_epoch = Some(steps);
        o
    };
    for name in ["a", "b"] {
        let outcome = train(&config, &opts(name), &mut gca_hng::train::Silent).unwrap();
        assert!(matches!(outcome, RunOutcome::Finished(_)));
    }
    let a = metrics_records(&dir.path().join("a"));
    let b = metrics_records(&dir.path().join("b"));
    assert_eq!(a.len(), config.train.epochs);
    let j_m: Vec<f64> = a
        .iter()
        .map(|r| r["losses"]["J_m"].as_f64().unwrap())
        .collect();
    assert!(
        j_m[j_m.len() - 1] < j_m[0],
        "mean J_m of the last epoch is not below the first: {j_m:?}"
    );
    for r in &a {
        assert_eq!(r["steps"], steps);
        for (name, v) in r["losses"].as_object().unwrap() {
            assert!(v.as_f64().unwrap().is_finite(), "{name} = {v}");
        }
        assert!(r["losses"]["J_gen"].as_f64().unwrap() > 0.0, "{r}");
    }
    let last = a.len() - 1;
    assert!(a[..last].iter().all(|r| r["test"].is_null()));
    assert_metrics_valid("final test", &a[last]["test"]);
    // Same seed, same everything but the clock.
    let (a, b): (Vec<_>, Vec<_>) = (
        a.into_iter().map(without_timings).collect(),
        b.into_iter().map(without_timings).collect(),
    );
    assert_eq!(a, b);
    let ta = model_tensors(&dir.path().join("a/last.safetensors"));
    let tb = model_tensors(&dir.path().join("b/last.safetensors"));
    assert_eq!(ta.tensors, tb.tensors);
}

#[test]
fn proxy_anchor_with_warm_up_writes_a_complete_run_folder_and_the_commands_use_it() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config();
    config.loss.base = BaseLoss::ProxyAnchor;
    config.data.validation_fraction = 0.05;
    config.train.select_on = SelectOn::Validation;
    let run = dir.path().join("pa");
    let mut opts = tiny_options(&run);
    opts.evaluate_untrained = true;
    let RunOutcome::Finished(summary) = train(&config, &opts, &mut gca_hng::train::Silent).unwrap()
    else {
        panic!("should finish")
    };
    assert_eq!(summary.selected_on, SelectOn::Validation);
    assert!(summary.best_epoch >= 1);
    assert!(summary.test_at_best.is_some());
    for f in [
        "config.toml",
        "metrics.jsonl",
        "last.safetensors",
        "best.safetensors",
        "summary.json",
        "losses.svg",
        "recall.svg",
        "test-embeddings.npy",
        "test-embeddings.paths.txt",
        "test-embeddings.labels.npy",
        "test-embeddings.model.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let records = metrics_records(&run);
    assert_eq!(records.len(), 3, "untrained + 2 epochs");
    for (epoch, r) in records.iter().enumerate() {
        assert_eq!(r["epoch"], epoch);
        assert_metrics_valid(&format!("epoch {epoch} test"), &r["test"]);
        assert_metrics_valid(&format!("epoch {epoch} validation"), &r["validation"]);
    }
    // The summary reports the selected epoch's test metrics and the last epoch's.
    let on_disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let best = summary.best_epoch;
    assert_eq!(on_disk["test_at_best"], records[best]["test"]);
    assert_eq!(on_disk["final_test"], records[2]["test"]);
    let best_r1 = records[best]["validation"]["recall"]["1"].as_f64().unwrap();
    assert_eq!(summary.best_selection_recall_at_1, best_r1);
    for r in &records[1..] {
        assert!(r["validation"]["recall"]["1"].as_f64().unwrap() <= best_r1);
    }
    // Epoch 1 is the warm-up: the backbone is frozen.
    assert_eq!(records[1]["backbone_trained"], false);
    assert_eq!(records[2]["backbone_trained"], true);
    assert!(records[1]["validation"]["recall"]["1"].is_number());
    let j_syn = records[2]["losses"]["J_syn"].as_f64().unwrap();
    assert!(j_syn > 0.0, "Proxy-Anchor's J_syn should be active");
    // The proxies are in the checkpoint.
    let best = StateDict::read_safetensors(&run.join("best.safetensors")).unwrap();
    assert!(best.get("model.criterion.proxies").is_some());

    let bin = env!("CARGO_BIN_EXE_gca-hng");
    let out = succeed(
        Command::new(bin)
            .args(["eval", "--run"])
            .arg(&run)
            .arg("--no-nmi"),
    );
    let metrics: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(metrics["recall"]["8"].is_number(), "{metrics}");
    assert_metrics_valid("eval --run", &metrics);
    // The held-out validation classes can be evaluated too.
    let out = succeed(
        Command::new(bin)
            .args(["eval", "--which", "last", "--split", "validation", "--run"])
            .arg(&run),
    );
    let metrics: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(metrics["nmi"].is_number(), "{metrics}");
    assert_metrics_valid("eval --split validation", &metrics);

    // Embed two icons, then search the run's test embeddings with them.
    let prefix = dir.path().join("q/icons");
    succeed(
        Command::new(bin)
            .args(["embed", "emoji:600:0", "emoji:601:1", "--run"])
            .arg(&run)
            .arg("--out")
            .arg(&prefix),
    );
    let m = gca_hng::io::npy::read_matrix(&dir.path().join("q/icons.npy")).unwrap();
    assert_eq!((m.rows, m.cols), (2, 16));
    let grid = dir.path().join("grid.png");
    let out = succeed(
        Command::new(bin)
            .args([
                "search",
                "emoji:600:0",
                "--top",
                "3",
                "--json",
                "--which",
                "last",
            ])
            .arg("--run")
            .arg(&run)
            .arg("--gallery")
            .arg(run.join("test-embeddings"))
            .arg("--grid")
            .arg(&grid),
    );
    let hits: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let results = hits[0]["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    let scores: Vec<f64> = results
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");

    // Every set of embeddings records the model that made it: the run's test embeddings
    // `last`, `embed --run` the run's best.
    let record = |prefix: &Path| -> serde_json::Value {
        let path = format!("{}.model.json", prefix.display());
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let fingerprint = |file: &str| model_fingerprint(&model_tensors(&run.join(file)));
    let (best_model, last_model) = (
        fingerprint("best.safetensors"),
        fingerprint("last.safetensors"),
    );
    let gallery = run.join("test-embeddings");
    let kept = record(&gallery);
    assert_eq!(kept["fingerprint"], last_model.as_str(), "{kept}");
    assert!(
        kept["checkpoint"]
            .as_str()
            .unwrap()
            .ends_with("last.safetensors")
    );
    assert_eq!(kept["precision"], "f32");
    let icons = record(&prefix);
    assert_eq!(icons["fingerprint"], best_model.as_str(), "{icons}");
    assert!(
        icons["checkpoint"]
            .as_str()
            .unwrap()
            .ends_with("best.safetensors")
    );

    let search = |which: &str, extra: &[&str]| {
        Command::new(bin)
            .args(["search", "emoji:600:0", "--top", "1", "--which", which])
            .args(extra)
            .arg("--run")
            .arg(&run)
            .arg("--gallery")
            .arg(&gallery)
            .output()
            .unwrap()
    };
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    // `--which best` searches the run's test embeddings exactly when best is the last model.
    let best = search("best", &[]);
    if best_model == last_model {
        assert!(best.status.success(), "{}", stderr(&best));
    } else {
        let err = stderr(&best);
        assert!(
            !best.status.success() && err.contains("--which last"),
            "{err}"
        );
    }
    // A gallery another model made is refused, naming both and the way out; with
    // --allow-other-model it is searched, with a note.
    let record_path = run.join("test-embeddings.model.json");
    let original_record = std::fs::read_to_string(&record_path).unwrap();
    let mut other = kept.clone();
    other["fingerprint"] = "fnv1a64:0123456789abcdef".into();
    other["checkpoint"] = "elsewhere/model.safetensors".into();
    std::fs::write(&record_path, other.to_string()).unwrap();
    let refused = search("last", &[]);
    let err = stderr(&refused);
    assert!(
        !refused.status.success()
            && err.contains("elsewhere/model.safetensors")
            && err.contains("--allow-other-model")
            && err.contains("test-embeddings"),
        "{err}"
    );
    let allowed = search("last", &["--allow-other-model"]);
    assert!(
        allowed.status.success() && stderr(&allowed).contains("another model"),
        "{}",
        stderr(&allowed)
    );
    // Another precision only differs by rounding: searched, with a note.
    let mut rounded = kept.clone();
    rounded["precision"] = "f16".into();
    std::fs::write(&record_path, rounded.to_string()).unwrap();
    let noted = search("last", &[]);
    assert!(
        noted.status.success() && stderr(&noted).contains("f16"),
        "{}",
        stderr(&noted)
    );
    // A record that does not parse is an error naming its file, not a silent pass.
    std::fs::write(&record_path, "{\"fingerprint\": 3}").unwrap();
    let damaged = search("last", &[]);
    assert!(
        !damaged.status.success() && stderr(&damaged).contains("test-embeddings.model.json"),
        "{}",
        stderr(&damaged)
    );
    // Without a record (a gallery from an older build), the run's summary decides: with a best
    // epoch other than the last, `--which best` against its test embeddings is refused.
    std::fs::remove_file(&record_path).unwrap();
    let summary_path = run.join("summary.json");
    let original = std::fs::read_to_string(&summary_path).unwrap();
    let mut summary: serde_json::Value = serde_json::from_str(&original).unwrap();
    let epochs = summary["epochs"].as_u64().unwrap();
    summary["best_epoch"] = (epochs + 1).into();
    std::fs::write(&summary_path, summary.to_string()).unwrap();
    let refused = search("best", &[]);
    let err = stderr(&refused);
    assert!(
        !refused.status.success()
            && err.contains("--which last")
            && err.contains("last.safetensors"),
        "{err}"
    );
    assert!(search("last", &[]).status.success());
    std::fs::write(&summary_path, original).unwrap();
    std::fs::write(&record_path, original_record).unwrap();
    let img = image::open(&grid).unwrap();
    assert!(img.width() > img.height());
}

#[test]
fn the_baseline_trains_without_graph_losses() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config();
    config.loss.generation = false;
    config.train.epochs = 1;
    let run = dir.path().join("base");
    let RunOutcome::Finished(s) =
        train(&config, &tiny_options(&run), &mut gca_hng::train::Silent).unwrap()
    else {
        panic!("should finish")
    };
    let losses = &s.records[0].losses;
    assert!(losses["J_m"] > 0.0);
    assert_eq!(losses["J_metric"], losses["J_m"]);
    for graph_loss in ["J_gnnce", "J_syn", "J_softce", "J_div", "J_gence", "J_gen"] {
        assert_eq!(losses[graph_loss], 0.0, "{graph_loss}");
    }
    let test = serde_json::to_value(s.records[0].test.as_ref().unwrap()).unwrap();
    assert_metrics_valid("baseline test", &test);
}

#[test]
fn command_line_errors_name_what_is_wrong() {
    let bin = env!("CARGO_BIN_EXE_gca-hng");
    let run = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(run(&["train", "--preset", "nope"]).contains("unknown preset `nope`"));
    assert!(run(&["train", "--preset", "demo", "--set", "optim.lrr=1"]).contains("optim.lrr"));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never");
    let err = run(&[
        "train",
        "--preset",
        "cub-resnet50",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("model.weights"), "{err}");
    assert!(!out.exists(), "a run that cannot start leaves no folder");
    let err = run(&[
        "train",
        "--preset",
        "demo",
        "--set",
        "data.kind=cub",
        "--data-root",
        "/nonexistent/cub",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("/nonexistent/cub"), "{err}");
    assert!(
        run(&["train", "--resume", "/nonexistent/run"]).contains("/nonexistent/run/config.toml")
    );
    assert!(
        run(&["eval", "--checkpoint", "/nonexistent/c.safetensors"])
            .contains("/nonexistent/c.safetensors")
    );
    let bogus = dir.path().join("b.safetensors");
    StateDict::default().write_safetensors(&bogus).unwrap();
    assert!(
        run(&["eval", "--checkpoint", bogus.to_str().unwrap()])
            .contains("not a gca-hng checkpoint")
    );
    assert!(
        run(&[
            "search",
            "--checkpoint",
            bogus.to_str().unwrap(),
            "--gallery",
            "g",
            "x.jpg"
        ])
        .contains("not a gca-hng checkpoint")
    );

    // A folder holding a file a run writes (here the user's own config) is refused, and the
    // file is left as it was.
    let mine = dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("config.toml"), "# my notes\n").unwrap();
    let err = run(&[
        "train",
        "--preset",
        "demo",
        "--max-steps-per-epoch",
        "1",
        "--out",
        mine.to_str().unwrap(),
    ]);
    assert!(
        err.contains("config.toml") && err.contains("overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(mine.join("config.toml")).unwrap(),
        "# my notes\n"
    );

    // Settings that make no sense are refused naming the key, before anything runs.
    for (set, key) in [
        ("loss.proxy_margin=-1e30", "loss.proxy_margin"),
        (
            "optim.classifier_weight_decay=nan",
            "optim.classifier_weight_decay",
        ),
        (
            "loss.classification_weight=inf",
            "loss.classification_weight",
        ),
        ("optim.metric_gamma=0", "optim.metric_gamma"),
        ("train.out=''", "train.out"),
    ] {
        let err = run(&["config", "show", "demo", "--set", set]);
        assert!(err.contains(key), "{set}: {err}");
    }

    // Benchmarks take the limits configs do, so a typo is an error, not an abort.
    for (args, flag) in [
        (
            &["bench", "step", "--dim", "0", "--heads", "1"][..],
            "--dim",
        ),
        (&["bench", "step", "--layers", "0"][..], "--layers"),
        (
            &[
                "bench",
                "step",
                "--classes",
                "100000",
                "--per-class",
                "100000",
            ][..],
            "batch of",
        ),
        (&["bench", "backbone", "--size", "100000"][..], "--size"),
        (
            &[
                "bench",
                "index",
                "--synthetic",
                "100000000000",
                "--dim",
                "1000",
            ][..],
            "16 GiB",
        ),
        (
            &["serve", "--header-timeout-s", "18446744073709551615"][..],
            "--header-timeout-s",
        ),
        (
            &["serve", "--max-body-mib", "17592186044416"][..],
            "--max-body-mib",
        ),
        (&["serve", "--workers", "0"][..], "--workers"),
    ] {
        let err = run(args);
        assert!(err.contains(flag), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn the_quick_demo_compares_both_methods_and_writes_its_report() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let bin = env!("CARGO_BIN_EXE_gca-hng");
    let o = Command::new(bin)
        .args(["demo", "--quick", "--seeds", "0,1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("GCA-HNG") && stdout.contains("baseline (N-pair)"),
        "{stdout}"
    );
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let s = read(&out.join("summary.json"));
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + a.abs());
    let r1 = |m: &serde_json::Value| m["recall"]["1"].as_f64().unwrap();
    let mut spreads = Vec::new();
    for method in ["gca_hng", "baseline"] {
        let entry = &s[method];
        assert_metrics_valid(method, entry);
        let per_seed = entry["per_seed"].as_object().unwrap();
        assert_eq!(per_seed.keys().collect::<Vec<_>>(), ["0", "1"], "{method}");
        for (seed, m) in per_seed {
            assert_metrics_valid(&format!("{method} seed {seed}"), m);
            // Each seed's record is that run's final test metrics.
            let run = read(&out.join(format!("seed-{seed}/{method}/summary.json")));
            assert_eq!(&run["final_test"], m, "{method} seed {seed}");
            // Its curve: untrained, then each epoch, ending at the final R@1.
            let curve = entry["curves"][seed.as_str()].as_array().unwrap();
            let epochs: Vec<f64> = curve.iter().map(|p| p[0].as_f64().unwrap()).collect();
            assert_eq!(epochs, [0.0, 1.0, 2.0], "{method} seed {seed}");
            assert_eq!(curve[2][1].as_f64().unwrap(), r1(m), "{method} seed {seed}");
        }
        // The top level is the mean over seeds.
        let seeds: Vec<&serde_json::Value> = per_seed.values().collect();
        for k in entry["recall"].as_object().unwrap().keys() {
            let mean = seeds
                .iter()
                .map(|m| m["recall"][k].as_f64().unwrap())
                .sum::<f64>()
                / 2.0;
            assert!(
                close(entry["recall"][k].as_f64().unwrap(), mean),
                "{method} R@{k}"
            );
        }
        for key in ["map_at_r", "r_precision"] {
            let mean = seeds.iter().map(|m| m[key].as_f64().unwrap()).sum::<f64>() / 2.0;
            assert!(close(entry[key].as_f64().unwrap(), mean), "{method} {key}");
        }
        let spread = (r1(seeds[0]) - r1(seeds[1])).abs();
        assert!(
            close(entry["spread_r_at_1"].as_f64().unwrap(), spread),
            "{method}"
        );
        spreads.push(spread);
    }
    assert!(close(
        s["seed_spread_r_at_1"].as_f64().unwrap(),
        spreads[0].max(spreads[1])
    ));
    assert!(close(
        s["margin_r_at_1"].as_f64().unwrap(),
        r1(&s["gca_hng"]) - r1(&s["baseline"])
    ));
    assert_metrics_valid("pretrained features", &s["pretrained_features"]);
    assert_eq!(s["seeds"], serde_json::json!([0, 1]));
    assert_eq!(s["epochs"], 2);
    assert!(s["test_images"].as_u64().unwrap() > 0, "{s}");
    assert!(
        s["verdict"].as_str().unwrap().starts_with("after 2 epochs"),
        "{s}"
    );
    assert!(out.join("gallery.png").exists());
    assert!(out.join("learning-curves.svg").exists());
}

/// Lines a child prints, as they come, on a channel (so that waiting for one can time out).
fn line_channel(stream: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Starts `train` on the tiny setting in `dir/run`: `epochs` epochs of `steps` steps,
/// evaluated at the end only, standard output piped, standard error as `stderr` says.
fn spawn_tiny_run(
    dir: &Path,
    epochs: usize,
    steps: usize,
    stderr: std::process::Stdio,
) -> (PathBuf, std::process::Child) {
    let run = dir.join("run");
    let mut config = tiny_config();
    config.train.epochs = epochs;
    config.train.eval_every = 100;
    config.train.out = run.display().to_string();
    let file = dir.join("tiny.toml");
    std::fs::write(&file, config.to_toml()).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_gca-hng"))
        .arg("train")
        .args(["--max-steps-per-epoch", &steps.to_string()])
        .args(["--eval-class-limit", "4", "--config"])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    (run, child)
}

#[test]
fn sigterm_stops_with_a_checkpoint_that_resumes() {
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::{Duration, Instant};
    // Generous: the whole test takes seconds; this only keeps a hung child from hanging CI.
    const PATIENCE: Duration = Duration::from_secs(600);
    let dir = tempfile::tempdir().unwrap();
    // Many short epochs, evaluated only at the end: after the first epoch's line the run has
    // far more left to do than a signal takes to arrive.
    let (run, mut child) = spawn_tiny_run(dir.path(), 12, 3, std::process::Stdio::piped());
    let stdout = line_channel(child.stdout.take().unwrap());
    let stderr = line_channel(child.stderr.take().unwrap());
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    let fail = |child: &mut std::process::Child, seen: &[String], why: &str| -> ! {
        let _ = child.kill();
        let _ = child.wait();
        let err: Vec<String> = stderr.try_iter().collect();
        panic!("{why}\nstdout: {seen:#?}\nstderr: {err:#?}");
    };
    // The first line is printed once the signal handler is in place; the epoch line once
    // training steps have run.
    loop {
        match stdout.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let started = line.starts_with("epoch 1/12:");
                seen.push(line);
                if started {
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout) => fail(&mut child, &seen, "no epoch line in time"),
            Err(RecvTimeoutError::Disconnected) => fail(
                &mut child,
                &seen,
                "the run ended before its first epoch line",
            ),
        }
    }
    assert!(seen[0].starts_with("training emoji"), "{seen:?}");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    loop {
        match stdout.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => seen.push(line),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                fail(&mut child, &seen, "the run did not stop after SIGTERM")
            }
        }
    }
    let status = child.wait().unwrap();
    let err: Vec<String> = stderr.try_iter().collect();
    assert_eq!(status.code(), Some(130), "{seen:?} {err:?}");
    assert!(
        err.iter().any(|l| l.contains("stopping after this step")),
        "{err:?}"
    );
    let stopped = seen.last().unwrap();
    assert!(
        stopped.starts_with("stopped in epoch ")
            && stopped.contains("continue with: gca-hng train --resume"),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.starts_with("epoch 12/12")),
        "{seen:?}"
    );
    assert!(run.join("last.safetensors").exists());
    assert!(!run.join("summary.json").exists());
    // The smoke settings were saved with the run: the resume repeats none of them.
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(saved.contains("max_steps_per_epoch = 3"), "{saved}");
    succeed(
        Command::new(env!("CARGO_BIN_EXE_gca-hng"))
            .args(["train", "--resume"])
            .arg(&run),
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["epochs"], 12);
    let records = metrics_records(&run);
    assert_eq!(records.len(), 12);
    assert!(records.iter().all(|r| r["steps"] == 3), "{records:?}");
}

/// Issue 11: two runs into one folder both finished and mixed their files; a live run could
/// be resumed beside itself.
#[test]
fn a_run_folder_has_one_writer() {
    use gca_hng::train::run_dir::RunDir;
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    let held = RunDir::new(&out).lock().unwrap();
    let pid = std::process::id();
    let err = train(
        &tiny_config(),
        &tiny_options(&out),
        &mut gca_hng::train::Silent,
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, Error::RunDir(RunDirError::Locked { pid: Some(p), .. }) if *p == pid),
        "{err}"
    );
    assert!(err.to_string().contains(&pid.to_string()), "{err}");
    assert!(!out.join("config.toml").exists());
    let mut resume = tiny_options(&out);
    resume.resume = true;
    let err = train(&tiny_config(), &resume, &mut gca_hng::train::Silent)
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::RunDir(RunDirError::Locked { .. })),
        "{err}"
    );
    drop(held);
    // Released with its holder: the folder can be taken again.
    drop(RunDir::new(&out).lock().unwrap());
}

/// Issue 11: `--eval-class-limit 0` trained, then failed, leaving a half-made folder;
/// `--max-steps-per-epoch 0` ran one step.
#[test]
fn settings_that_cannot_work_are_refused_before_the_folder_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    for (steps, classes, key) in [
        (Some(0), None, "train.max_steps_per_epoch"),
        (None, Some(0), "train.eval_class_limit"),
    ] {
        let mut opts = RunOptions::new(&out);
        opts.max_steps_per_epoch = steps;
        opts.eval_class_limit = classes;
        let err = train(&tiny_config(), &opts, &mut gca_hng::train::Silent)
            .err()
            .unwrap();
        assert!(err.to_string().contains(key), "{err}");
        assert!(!out.exists());
    }
    let mut c = tiny_config();
    c.data.image_size = 100_000;
    c.data.resize = 100_000;
    let err = train(&c, &RunOptions::new(&out), &mut gca_hng::train::Silent)
        .err()
        .unwrap();
    assert!(err.to_string().contains("data.image_size"), "{err}");
    assert!(!out.exists());
}

/// Keeps every note a run makes.
#[derive(Default)]
struct Notes(Vec<String>);

impl Observer for Notes {
    fn note(&mut self, message: &str) {
        self.0.push(message.to_string());
    }
}

/// Issue 11: a full disk left `last.safetensors.partial` behind and said its cause twice; a
/// damaged `last` could not be resumed from.
#[test]
fn checkpoints_survive_a_full_disk_and_a_damaged_last() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config();

    // Writes through this link land on /dev/full: ENOSPC, as on a full disk.
    let full = dir.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    let partial = full.join("last.safetensors.partial");
    std::os::unix::fs::symlink("/dev/full", &partial).unwrap();
    let err = train(&config, &tiny_options(&full), &mut gca_hng::train::Silent)
        .err()
        .unwrap();
    let text = gca_hng::error::chain(&err);
    assert!(text.contains("no space left"), "{text}");
    assert!(text.contains(full.to_str().unwrap()), "{text}");
    assert_eq!(text.matches("space").count(), 1, "{text}");
    assert!(
        partial.symlink_metadata().is_err(),
        "the .partial is removed"
    );

    // Stopped in the second epoch: `last` (mid-epoch 2) and its predecessor (end of epoch 1).
    let run = dir.path().join("run");
    let opts = tiny_options(&run);
    let mut stopper = StopAfter {
        after: 4,
        seen: 0,
        flag: opts.stop.clone(),
    };
    assert!(matches!(
        train(&config, &opts, &mut stopper).unwrap(),
        RunOutcome::Interrupted { .. }
    ));
    let last = run.join("last.safetensors");
    let previous = run.join("last.previous.safetensors");
    assert!(previous.exists());
    // One flipped bit in the values: the file still parses, only its checksum tells.
    let mut bytes = std::fs::read(&last).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x10;
    std::fs::write(&last, &bytes).unwrap();
    let mut resumed = tiny_options(&run);
    resumed.resume = true;
    let mut notes = Notes::default();
    let outcome = train(&config, &resumed, &mut notes).unwrap();
    assert!(matches!(outcome, RunOutcome::Finished(_)));
    assert!(
        notes.0.iter().any(|n| n.contains("cannot be resumed from")
            && n.contains("does not hold what was written")
            && n.contains("last.previous")),
        "{:?}",
        notes.0
    );
    assert!(
        notes.0.iter().any(|n| n.contains("at epoch 2 step 0")),
        "{:?}",
        notes.0
    );
}

/// Issue 11: with `--skip-bad-images`, a zero-byte test image was left out of the evaluation
/// and nothing said so.
#[test]
fn images_left_out_are_reported_in_every_phase_and_the_summary() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    for split in ["train", "test"] {
        for class in ["a", "b", "c"] {
            for i in 0..2 {
                let path = root.join(split).join(class).join(format!("{i}.png"));
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                let shade = (i * 90 + class.as_bytes()[0] as usize) as u8;
                image::RgbImage::from_pixel(40, 40, image::Rgb([shade, 255 - shade, 0]))
                    .save(&path)
                    .unwrap();
            }
        }
    }
    let empty = root.join("test/b/1.png");
    std::fs::write(&empty, b"").unwrap();
    let mut config = tiny_config();
    config.data.kind = gca_hng::config::DatasetKind::Folder;
    config.data.root = Some(root.display().to_string());
    config.data.validation_fraction = 0.0;
    config.data.classes_per_batch = 2;
    config.train.epochs = 1;
    config.train.skip_bad_images = true;
    let out = dir.path().join("run");
    let mut opts = RunOptions::new(&out);
    opts.max_steps_per_epoch = Some(1);
    let mut notes = Notes::default();
    let RunOutcome::Finished(summary) = train(&config, &opts, &mut notes).unwrap() else {
        panic!("the run should finish")
    };
    assert_eq!(
        summary.skipped_images.len(),
        1,
        "{:?}",
        summary.skipped_images
    );
    let line = &summary.skipped_images[0];
    assert!(
        line.starts_with("test: ") && line.contains("1.png"),
        "{line}"
    );
    assert!(notes.0.contains(line), "{:?}", notes.0);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(written["skipped_images"][0], line.as_str());
    assert_eq!(written["records"][0]["skipped_images"][0], line.as_str());
}

/// A run killed outright (SIGKILL: no handler, no checkpoint of its own) leaves its lock to
/// the kernel and its last complete checkpoint; `--resume` alone finishes it.
#[test]
fn a_killed_run_resumes_from_its_last_checkpoint() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let (run, mut child) = spawn_tiny_run(dir.path(), 6, 2, std::process::Stdio::null());
    let stdout = line_channel(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(600);
    // The second epoch's line comes after the first epoch's checkpoint.
    loop {
        match stdout.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.starts_with("epoch 2/6:") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("no second epoch line: {e:?}");
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(run.join("last.safetensors").exists());
    succeed(
        Command::new(env!("CARGO_BIN_EXE_gca-hng"))
            .args(["train", "--resume"])
            .arg(&run),
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["epochs"], 6);
    assert!(!run.join("last.safetensors.partial").exists());
}

/// Issue 11: two `train --out SAME` started together both exited 0 with their files mixed.
#[test]
fn two_trainings_into_one_folder_leave_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut config = tiny_config();
    config.train.epochs = 1;
    config.train.out = run.display().to_string();
    let file = dir.path().join("tiny.toml");
    std::fs::write(&file, config.to_toml()).unwrap();
    let bin = env!("CARGO_BIN_EXE_gca-hng");
    let start = || {
        Command::new(bin)
            .args([
                "train",
                "--max-steps-per-epoch",
                "2",
                "--eval-class-limit",
                "4",
            ])
            .arg("--config")
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(), start());
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let ok = outs.iter().filter(|o| o.status.success()).count();
    let errors: Vec<String> = outs
        .iter()
        .filter(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
        .collect();
    assert_eq!(ok, 1, "{errors:?}");
    // Refused while the other ran (naming its pid), or after it finished.
    assert!(
        errors[0].contains("is in use by process") || errors[0].contains("already holds a run"),
        "{errors:?}"
    );
    assert_eq!(metrics_records(&run).len(), 1);
}

/// A version 1.0 `.npy` file with `header` (the dict) and raw little-endian f32 `values`.
fn npy_f32(path: &Path, header: &str, values: &[f32]) {
    let mut h = header.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(path, out).unwrap();
}

/// Issue 11: `metrics` read Fortran order as C order; a NaN row ranked first in `search`
/// (both read embeddings through the same reader); flags that did nothing were accepted;
/// NaN pretrained weights were reported as a diverged loss.
#[test]
fn embeddings_in_fortran_order_or_with_nan_and_flags_that_do_nothing() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bin = env!("CARGO_BIN_EXE_gca-hng");
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("l.npy");
    gca_hng::io::npy::write_labels(&labels, &[0, 0, 1, 1]).unwrap();
    // Rows (1, 0), (1, 0.1), (0, 1), (0.1, 1): each row's nearest has its label.
    let rows = [1.0f32, 0.0, 1.0, 0.1, 0.0, 1.0, 0.1, 1.0];
    let c = dir.path().join("c.npy");
    gca_hng::io::npy::write_matrix(&c, 4, 2, &rows).unwrap();
    let f = dir.path().join("f.npy");
    let columns = [1.0f32, 1.0, 0.0, 0.1, 0.0, 0.1, 1.0, 1.0];
    npy_f32(
        &f,
        "{'descr': '<f4', 'fortran_order': True, 'shape': (4, 2), }",
        &columns,
    );
    let metrics = |e: &Path| {
        Command::new(bin)
            .args(["metrics", "--no-nmi", "--labels"])
            .arg(&labels)
            .arg("--embeddings")
            .arg(e)
            .output()
            .unwrap()
    };
    let (from_c, from_f) = (metrics(&c), metrics(&f));
    assert!(from_f.status.success(), "{from_f:?}");
    assert_eq!(from_c.stdout, from_f.stdout);
    let m: serde_json::Value = serde_json::from_slice(&from_f.stdout).unwrap();
    assert_eq!(m["recall"]["1"], 100.0);
    let mut with_nan = rows;
    with_nan[5] = f32::NAN;
    gca_hng::io::npy::write_matrix(&c, 4, 2, &with_nan).unwrap();
    let out = metrics(&c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("c.npy: value [2, 1] is not finite"),
        "{err}"
    );

    // Queries and gallery of different widths: the message names both files.
    let wide = dir.path().join("wide.npy");
    gca_hng::io::npy::write_matrix(&wide, 2, 4, &[1.0; 8]).unwrap();
    let two = dir.path().join("two.npy");
    gca_hng::io::npy::write_labels(&two, &[0, 1]).unwrap();
    let out = Command::new(bin)
        .args(["metrics", "--query-embeddings"])
        .arg(&f)
        .arg("--query-labels")
        .arg(&labels)
        .arg("--gallery-embeddings")
        .arg(&wide)
        .arg("--gallery-labels")
        .arg(&two)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("f.npy have width 2")
            && err.contains("wide.npy have width 4"),
        "{err}"
    );

    let out = Command::new(bin)
        .args(["data", "inspect", "--kind", "emoji", "--skip-bad-images"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--decode"));

    let weights = dir.path().join("nan.safetensors");
    let mut dict = StateDict::default();
    dict.insert(
        "_conv_stem.weight",
        gca_hng::io::host::HostTensor::new(vec![2], vec![1.0, f64::NAN]),
    );
    dict.write_safetensors(&weights).unwrap();
    let mut config = tiny_config();
    config.model.weights = Some(weights.display().to_string());
    let err = train(
        &config,
        &tiny_options(&dir.path().join("run")),
        &mut gca_hng::train::Silent,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("nan.safetensors") && err.contains("_conv_stem.weight"),
        "{err}"
    );
}

#[test]
fn bench_train_reports_its_steps_and_the_cores_they_kept_busy() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bin = env!("CARGO_BIN_EXE_gca-hng");
    let out = succeed(Command::new(bin).args([
        "bench", "train", "--preset", "demo", "--steps", "2", "--warmup", "1", "--json",
    ]));
    let r: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(r["steps"], 2, "{r}");
    assert_eq!(r["images_per_step"], 32, "{r}");
    let median = r["median_s"].as_f64().unwrap();
    assert!(
        median > 0.0 && r["min_s"].as_f64().unwrap() <= median,
        "{r}"
    );
    // Every step trains a backbone, so the process works on at least one core for most of
    // it, and never on more cores than it has threads to run.
    let cores = r["cores"].as_f64().unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    assert!(cores > 0.3 && cores < threads + 0.5, "{r}");
}

/// bf16 on a device that lacks it (WGSL has none): `train` refuses it before the run folder
/// is made, and `eval` of a run trained in bf16 names the run's `train.precision`, where
/// cubecl's WGSL compiler used to panic in a server thread. `embed` follows the run's precision
/// too unless given `--precision`.
#[cfg(feature = "wgpu")]
#[test]
#[ignore = "needs a Vulkan driver with a CPU adapter (Mesa's llvmpipe; CI installs it)"]
fn bf16_is_refused_by_a_device_without_it_naming_the_setting() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config();
    config.train.precision = gca_hng::nn::precision::Precision::Bf16;
    config.train.epochs = 1;

    config.train.device = "wgpu:cpu".into();
    let refused = dir.path().join("refused");
    let err = train(
        &config,
        &tiny_options(&refused),
        &mut gca_hng::train::Silent,
    )
    .err()
    .unwrap();
    let text = gca_hng::error::chain(&err);
    assert!(text.contains("wgpu:cpu") && text.contains("bf16"), "{text}");
    assert!(!refused.exists());

    // Trained in bf16 on the CPU, which converts every type; evaluated on llvmpipe.
    config.train.device = "cpu".into();
    let run = dir.path().join("bf16");
    let RunOutcome::Finished(_) =
        train(&config, &tiny_options(&run), &mut gca_hng::train::Silent).unwrap()
    else {
        panic!("should finish")
    };
    let out = Command::new(env!("CARGO_BIN_EXE_gca-hng"))
        .args(["--device", "wgpu:cpu", "eval", "--no-nmi", "--run"])
        .arg(&run)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("train.precision = \"bf16\"")
            && stderr.contains("cannot compute in bf16")
            && (stderr.contains("WGSL has no bf16") || cfg!(feature = "vulkan")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // `embed` embeds in the run's precision unless told otherwise, as `eval` does: on the CPU
    // its default output is the bf16 one, and on llvmpipe it is refused naming the setting.
    let embed = |device: &str, extra: &[&str], out: &str| {
        Command::new(env!("CARGO_BIN_EXE_gca-hng"))
            .args([
                "--device",
                device,
                "embed",
                "emoji:600:0",
                "emoji:601:1",
                "--run",
            ])
            .arg(&run)
            .arg("--out")
            .arg(dir.path().join(out))
            .args(extra)
            .output()
            .unwrap()
    };
    for (extra, out) in [
        (&[][..], "default"),
        (&["--precision", "bf16"][..], "bf16"),
        (&["--precision", "f32"][..], "f32"),
    ] {
        let o = embed("cpu", extra, out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let values = |out: &str| {
        gca_hng::io::npy::read_matrix(&dir.path().join(format!("{out}.npy")))
            .unwrap()
            .values
    };
    assert_eq!(values("default"), values("bf16"));
    assert_ne!(values("default"), values("f32"));
    let o = embed("wgpu:cpu", &[], "refused");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("train.precision = \"bf16\"") && stderr.contains("embed"),
        "{stderr}"
    );
    assert!(!dir.path().join("refused.npy").exists());
}

//! Training runs end to end on the embedded emoji set at smoke size: the run folder, resume
//! after an interruption, Proxy-Anchor, the baseline, and the commands that use a trained model.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use gca_hng::config::{BaseLoss, ExperimentConfig, SelectOn};
use gca_hng::io::state_dict::StateDict;
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

#[test]
fn an_interrupted_run_resumes_to_the_same_result() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config();

    let whole = dir.path().join("whole");
    let outcome = train(&config, &tiny_options(&whole), &mut gca_hng::train::Silent).unwrap();
    assert!(matches!(outcome, RunOutcome::Finished(_)));

    // Stopped inside the second epoch (after step 1 of 3), then resumed.
    let split = dir.path().join("split");
    let opts = tiny_options(&split);
    let mut stopper = StopAfter {
        after: 4,
        seen: 0,
        flag: opts.stop.clone(),
    };
    match train(&config, &opts, &mut stopper).unwrap() {
        RunOutcome::Interrupted { epoch, step } => assert_eq!((epoch, step), (1, 1)),
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
    let lines = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (la, lb) = (lines(&whole), lines(&split));
    assert_eq!(la.len(), 2);
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x["losses"], y["losses"]);
        assert_eq!(x["test"], y["test"]);
    }
    // A fresh run into a folder that holds one is refused.
    let err = train(&config, &tiny_options(&whole), &mut gca_hng::train::Silent)
        .err()
        .unwrap();
    assert!(err.to_string().contains("--resume"), "{err}");
    // Resuming with another configuration is refused.
    let mut other = config.clone();
    other.optim.lr = 1.0;
    let mut again = tiny_options(&split);
    again.resume = true;
    let err = train(&other, &again, &mut gca_hng::train::Silent)
        .err()
        .unwrap();
    assert!(err.to_string().contains("configuration differs"), "{err}");
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
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let records: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3, "untrained + 2 epochs");
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
    // The held-out validation classes can be evaluated too.
    let out = succeed(
        Command::new(bin)
            .args(["eval", "--which", "last", "--split", "validation", "--run"])
            .arg(&run),
    );
    let metrics: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(metrics["nmi"].is_number(), "{metrics}");

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
            .args(["search", "emoji:600:0", "--top", "3", "--json", "--run"])
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
    assert_eq!(losses["J_syn"], 0.0);
    assert_eq!(losses["J_gen"], 0.0);
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
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for method in ["gca_hng", "baseline"] {
        assert!(s[method]["recall"]["1"].is_number(), "{s}");
        assert!(s[method]["map_at_r"].is_number());
        assert!(s[method]["r_precision"].is_number());
        assert_eq!(s[method]["curves"]["1"].as_array().unwrap().len(), 3);
    }
    assert!(s["seed_spread_r_at_1"].is_number());
    assert!(s["verdict"].is_string());
    assert!(out.join("gallery.png").exists());
    assert!(out.join("learning-curves.svg").exists());
    assert!(out.join("seed-1/baseline/summary.json").exists());
}

#[test]
fn sigterm_stops_with_a_checkpoint_that_resumes() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut config = tiny_config();
    config.train.epochs = 1;
    config.train.out = run.display().to_string();
    let file = dir.path().join("tiny.toml");
    std::fs::write(&file, config.to_toml()).unwrap();
    let bin = env!("CARGO_BIN_EXE_gca-hng");
    let mut child = Command::new(bin)
        .args([
            "train",
            "--max-steps-per-epoch",
            "400",
            "--eval-class-limit",
            "4",
            "--config",
        ])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The first line is printed once the signal handler is in place.
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("training emoji"), "{first}");
    std::thread::sleep(std::time::Duration::from_secs(3));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("continue with: gca-hng train --resume")),
        "{rest:?}"
    );
    assert!(run.join("last.safetensors").exists());
    assert!(!run.join("summary.json").exists());
    succeed(
        Command::new(bin)
            .args([
                "train",
                "--max-steps-per-epoch",
                "2",
                "--eval-class-limit",
                "4",
                "--resume",
            ])
            .arg(&run),
    );
    assert!(run.join("summary.json").exists());
}

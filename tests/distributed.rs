//! Data-parallel training over MPI (`train --distributed` under `mpirun`), against one process
//! training on the same global batch, and its behaviour when a process dies or hangs.
//!
//! Needs the `distributed` feature and Open MPI's `mpirun` (`.ci/run` installs it); a plain
//! `cargo test` builds none of this.
#![cfg(feature = "distributed")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gca_hng::io::state_dict::{HostTensor, StateDict};
use gca_hng::verify::compare::{Report, Row, Tolerance, compare, compare_with_slack};
use gca_hng::verify::reference::{GPU_GRADIENT, PARAMETER, ParameterRule};

/// How long a job may take before the test calls it hung (not a timing assertion: the jobs
/// take seconds to a minute on CI's two cores).
const HUNG: Duration = Duration::from_secs(600);

/// The jobs run one at a time, whatever `--test-threads` says: each already keeps both of CI's
/// cores busy with up to four ranks, and the timing of the kill and hang tests assumes no
/// other job beside them.
static ONE_JOB_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The lock of [`ONE_JOB_AT_A_TIME`]; a test that failed while holding it leaves nothing the
/// next one depends on, so a poisoned lock is taken as it is.
fn one_job_at_a_time() -> MutexGuard<'static, ()> {
    ONE_JOB_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_gca-hng")
}

/// EfficientNet-Lite0 at 32 px, 8 classes x 2 images, the backbone training from the first
/// step (no warm-up), so that backbone gradients cross processes.
fn small(epochs: usize, steps: usize) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--preset", "demo"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for set in [
        "data.image_size=32".to_string(),
        "data.resize=32".into(),
        "data.classes_per_batch=8".into(),
        "data.per_class=2".into(),
        "data.workers=1".into(),
        "model.embedding_dim=16".into(),
        "optim.warm_up_epochs=0".into(),
        "train.eval_every=1".into(),
        format!("train.epochs={epochs}"),
    ] {
        args.push("--set".into());
        args.push(set);
    }
    args.extend([
        "--max-steps-per-epoch".to_string(),
        steps.to_string(),
        "--eval-class-limit".into(),
        "6".into(),
    ]);
    args
}

/// `mpirun -n ranks` of this binary, oversubscribed (CI has two cores), as root where CI
/// runs as root.
fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    // SAFETY: a plain getter.
    if unsafe { libc::geteuid() } == 0 {
        c.arg("--allow-run-as-root");
    }
    c.args(["--oversubscribe", "-n", &ranks.to_string(), bin()]);
    // Containers often forbid the cross-memory attach of Open MPI's shared-memory transport.
    c.env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    c
}

/// Runs `command` to its end (or fails the test when it hangs); stdout and stderr go to files
/// under `dir` named `name`, returned with the status.
fn finish(mut command: Command, dir: &Path, name: &str) -> (ExitStatus, String) {
    let (out, err) = (
        dir.join(format!("{name}.stdout")),
        dir.join(format!("{name}.stderr")),
    );
    let mut child = command
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("mpirun (Open MPI) and the binary start");
    let status = wait_or_fail(&mut child, name);
    let text = format!(
        "{}\n{}",
        std::fs::read_to_string(&out).unwrap_or_default(),
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    (status, text)
}

fn wait_or_fail(child: &mut Child, name: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > HUNG {
            let _ = child.kill();
            panic!("{name} still running after {} s: hung", HUNG.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn succeed(command: Command, dir: &Path, name: &str) -> String {
    let (status, text) = finish(command, dir, name);
    assert!(status.success(), "{name} failed ({status}):\n{text}");
    text
}

/// Every step's losses, keyed by (epoch, step) and loss name.
fn step_losses(path: &Path) -> BTreeMap<(u64, u64), BTreeMap<String, f64>> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let losses = v["losses"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, x)| (k.clone(), x.as_f64().unwrap()))
                .collect();
            (
                (v["epoch"].as_u64().unwrap(), v["step"].as_u64().unwrap()),
                losses,
            )
        })
        .collect()
}

/// Every loss of every step of `ours` within `1e-5` relative of the reference's.
fn compare_losses(ours: &Path, reference: &Path) -> Report {
    let (ours, reference) = (step_losses(ours), step_losses(reference));
    let mut report = Report::default();
    for (key, losses) in &reference {
        for (name, &r) in losses {
            let row_name = format!("epoch {} step {} {name}", key.0, key.1);
            match ours.get(key).and_then(|l| l.get(name)) {
                Some(&o) => report.rows.push(compare(
                    &row_name,
                    &HostTensor::new(vec![], vec![o]),
                    &HostTensor::new(vec![], vec![r]),
                    Tolerance::Relative(1e-5),
                )),
                None => report
                    .rows
                    .push(Row::failed(row_name, "rel 1e-5", "step missing")),
            }
        }
    }
    report
}

/// The parameters, buffers and optimiser state of the `last` checkpoints, tensor by tensor,
/// under the noise-aware rule of the GPU comparison (`ParameterRule::Determined`):
/// parameters at `PARAMETER` (abs 5e-5) plus the AdamW slack where the first moment is within
/// the rounding noise of the gradients; BatchNorm running statistics at the rule's buffer
/// tolerance; AdamW moments at the GPU gradient tolerance (they are averages of gradients);
/// step counts exactly.
fn compare_checkpoints(ours: &Path, reference: &Path, slack: &StateDict) -> Report {
    let ours = StateDict::read_safetensors(ours).unwrap();
    let reference = StateDict::read_safetensors(reference).unwrap();
    let rule = ParameterRule::Determined;
    let mut report = Report::default();
    for (name, r) in &reference.tensors {
        let Some(o) = ours.get(name) else {
            report.rows.push(Row::failed(name, "-", "missing"));
            continue;
        };
        let row = if name.starts_with("optim.") {
            if name.ends_with(".step") {
                compare(name, o, r, Tolerance::Exact)
            } else {
                compare(name, o, r, GPU_GRADIENT)
            }
        } else if name.ends_with("running_mean")
            || name.ends_with("running_var")
            || name.ends_with("num_batches_tracked")
        {
            compare(name, o, r, rule.running_statistics())
        } else {
            match slack.get(name) {
                Some(s) => compare_with_slack(name, o, r, PARAMETER, &s.data),
                None => compare(name, o, r, PARAMETER),
            }
        };
        report.rows.push(row);
    }
    report.unchecked = ours
        .tensors
        .keys()
        .filter(|k| reference.get(k).is_none())
        .cloned()
        .collect();
    report
}

/// The largest error of the rows under `prefix`, relative to the tensor's largest reference
/// value, with that row's absolute error and name.
fn worst(report: &Report, prefix: &str) -> String {
    let row = report
        .rows
        .iter()
        .filter(|r| r.name.starts_with(prefix))
        .max_by(|a, b| a.relative.total_cmp(&b.relative));
    match row {
        Some(r) => format!(
            "{:.2e} relative, {:.2e} absolute ({})",
            r.relative, r.max_abs, r.name
        ),
        None => "none".into(),
    }
}

struct Reference {
    dir: PathBuf,
    steps: PathBuf,
    slack: StateDict,
}

fn reference(tmp: &Path) -> Reference {
    let dir = tmp.join("one");
    let steps = tmp.join("one.steps.jsonl");
    let slack = tmp.join("one.slack.safetensors");
    let mut c = Command::new(bin());
    c.args(small(1, 2))
        .arg("--out")
        .arg(&dir)
        .arg("--step-log")
        .arg(&steps)
        .arg("--adamw-slack")
        .arg(&slack);
    succeed(c, tmp, "one");
    Reference {
        dir,
        steps,
        slack: StateDict::read_safetensors(&slack).unwrap(),
    }
}

/// One data-parallel run of the small setting on `ranks` processes; `extra` flags appended.
fn parallel(tmp: &Path, ranks: usize, name: &str, extra: &[&str]) -> (ExitStatus, PathBuf, String) {
    let dir = tmp.join(name);
    let steps = tmp.join(format!("{name}.steps.jsonl"));
    let mut c = mpirun(ranks);
    c.args(small(1, 2))
        .arg("--out")
        .arg(&dir)
        .arg("--step-log")
        .arg(&steps)
        .arg("--distributed")
        .args(extra);
    let (status, text) = finish(c, tmp, name);
    (status, dir, text)
}

/// Two steps: the first compares the exchange on identical parameters, the second one update
/// later (the GNN then takes two AdamW steps per batch). A third step is not compared: the
/// rank-grouped backbone gradient sums round differently from one process's, AdamW turns the
/// elements whose gradient is rounding noise into full ±lr moves (and the edge update's key
/// bias, whose gradient is zero up to rounding, moves that way every step), and two updates of
/// that put the third step's losses 1.2e-5 to 1.2e-4 apart and some backbone moments 0.6-1%
/// apart (measured with the CPU kernels of `src/backends/`), beyond the tolerances below,
/// without any error in the exchange.
#[test]
fn data_parallel_training_matches_one_process_on_the_global_batch() {
    let _serial = one_job_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let one = reference(tmp);
    for ranks in [1, 2, 4] {
        let name = format!("k{ranks}");
        let (status, dir, text) = parallel(tmp, ranks, &name, &[]);
        assert!(status.success(), "{ranks} processes failed:\n{text}");
        let losses = compare_losses(&tmp.join(format!("{name}.steps.jsonl")), &one.steps);
        let state = compare_checkpoints(
            &dir.join("last.safetensors"),
            &one.dir.join("last.safetensors"),
            &one.slack,
        );
        let worst_loss = losses
            .rows
            .iter()
            .map(|r| r.relative)
            .fold(0.0f64, f64::max);
        let slack_needed: Vec<&str> = state
            .rows
            .iter()
            .filter_map(|r| r.note.as_deref())
            .filter(|n| !n.contains(" 0 needed") && !n.contains("none needed"))
            .collect();
        println!(
            "K = {ranks}: {} losses, worst {worst_loss:.2e} relative; {} tensors: parameters and buffers worst {}, optimiser state worst {}; rows that needed AdamW slack: {}",
            losses.rows.len(),
            state.rows.len(),
            worst(&state, "model."),
            worst(&state, "optim."),
            slack_needed.len()
        );
        assert!(
            losses.passed(),
            "K = {ranks} losses:\n{}",
            losses.table(true)
        );
        assert!(state.passed(), "K = {ranks} state:\n{}", state.table(true));
        // Rank 0 alone writes the run folder.
        assert!(dir.join("summary.json").exists());
    }

    // The deliberately wrong variant: each process builds its graph from its own share only
    // (the graph, the N-pair candidates and the head's batch statistics of C/K classes), with
    // averaged gradients, as a plain data-parallel wrapper would do it.
    let (status, _, text) = parallel(tmp, 2, "wrong", &["--local-graph-for-tests"]);
    let losses = compare_losses(&tmp.join("wrong.steps.jsonl"), &one.steps);
    println!(
        "local-graph variant: {} of {} losses out of tolerance; the run {}",
        losses.failures(),
        losses.rows.len(),
        if status.success() {
            "finished".to_string()
        } else {
            format!("stopped ({status}): {}", last_error(&text))
        }
    );
    assert!(
        !losses.passed(),
        "the local-graph variant must not match one process:\n{}",
        losses.table(false)
    );
}

/// A warm-up epoch: the backbone is frozen, so each process's features are exactly one
/// process's rows, and the head, graph and losses run on the same gathered batch; the next
/// batch's backbone forward runs beside each step (on a worker, while the collectives stay on
/// the main thread). The losses equal one process's, bit for bit.
#[test]
fn a_warm_up_epoch_matches_one_process_exactly() {
    let _serial = one_job_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let args = |name: &str| {
        let mut args = small(1, 4);
        args.extend(["--set".into(), "optim.warm_up_epochs=1".into()]);
        args.extend(["--out".into(), tmp.join(name).display().to_string()]);
        let log = tmp.join(format!("{name}.steps.jsonl"));
        args.extend(["--step-log".into(), log.display().to_string()]);
        args
    };
    let mut c = Command::new(bin());
    c.args(args("one"));
    let text = succeed(c, tmp, "one");
    assert!(text.contains("warm-up"), "{text}");
    let one = step_losses(&tmp.join("one.steps.jsonl"));
    assert_eq!(one.len(), 4);
    for ranks in [2, 4] {
        let name = format!("k{ranks}");
        let mut c = mpirun(ranks);
        c.args(args(&name)).arg("--distributed");
        succeed(c, tmp, &name);
        assert_eq!(
            step_losses(&tmp.join(format!("{name}.steps.jsonl"))),
            one,
            "{ranks} processes"
        );
    }
}

fn last_error(text: &str) -> &str {
    text.lines()
        .find(|l| l.starts_with("error: rank"))
        .unwrap_or("(no error line)")
}

/// The pids of the processes `mpirun` (pid `parent`) started, by rank.
fn ranks_of(parent: u32) -> BTreeMap<usize, u32> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent pid is the second field after the parenthesised command name.
        let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid != parent {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        for var in env.split(|&b| b == 0) {
            if let Some(rank) = var.strip_prefix(b"OMPI_COMM_WORLD_RANK=") {
                let rank = String::from_utf8_lossy(rank).parse().unwrap();
                out.insert(rank, pid);
            }
        }
    }
    out
}

fn wait_for_file(path: &Path, child: &mut Child, what: &str) {
    let start = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} ended ({status}) before {} appeared", path.display());
        }
        assert!(start.elapsed() < HUNG, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether process `pid` has exited (or is a zombie) within `grace`.
fn gone_within(pid: u32, grace: Duration) -> bool {
    let start = Instant::now();
    loop {
        let gone = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, after)| after.trim_start().starts_with('Z')),
        };
        if gone {
            return true;
        }
        if start.elapsed() > grace {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn summary_epochs(run: &Path) -> u64 {
    let text = std::fs::read_to_string(run.join("summary.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["epochs"].as_u64().unwrap()
}

#[test]
fn a_killed_rank_stops_the_job_and_the_checkpoint_resumes_on_another_process_count() {
    let _serial = one_job_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();

    // Two processes; one is killed once rank 0 has written its first checkpoint.
    let run = tmp.join("two");
    let mut c = mpirun(2);
    c.args(small(3, 12))
        .arg("--out")
        .arg(&run)
        .arg("--distributed")
        .stdout(std::fs::File::create(tmp.join("two.stdout")).unwrap())
        .stderr(std::fs::File::create(tmp.join("two.stderr")).unwrap());
    let mut job = c.spawn().expect("mpirun starts");
    wait_for_file(&run.join("last.safetensors"), &mut job, "the 2-process run");
    let pids = ranks_of(job.id());
    let victim = *pids.get(&1).expect("rank 1 is a child of mpirun");
    // SAFETY: signalling a process this test started (through mpirun).
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let status = wait_or_fail(&mut job, "the job after a rank was killed");
    assert!(!status.success(), "the job must fail when a rank dies");
    // mpirun may return while its SIGTERM/SIGKILL to the surviving rank is still being
    // delivered, so rank 0 gets a grace period to go, not an instant.
    let rank0 = pids[&0];
    assert!(
        gone_within(rank0, Duration::from_secs(30)),
        "rank 0 must be gone with the job, 30 s after mpirun ended; its state: {:?}",
        std::fs::read_to_string(format!("/proc/{rank0}/stat"))
    );
    // ... and its checkpoint resumes on one process.
    let mut c = Command::new(bin());
    c.args(["train", "--resume"]).arg(&run);
    let text = succeed(c, tmp, "two-resumed-on-one");
    assert!(text.contains("resuming"), "{text}");
    assert_eq!(summary_epochs(&run), 3);

    // One process killed after its first checkpoint resumes on two.
    let run = tmp.join("one");
    let mut c = Command::new(bin());
    c.args(small(2, 6))
        .arg("--out")
        .arg(&run)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut single = c.spawn().unwrap();
    wait_for_file(
        &run.join("last.safetensors"),
        &mut single,
        "the 1-process run",
    );
    let _ = single.kill();
    let _ = single.wait();
    // Whether it died mid-epoch or had just finished: a checkpoint exists, and resuming it
    // on two processes finishes the run.
    if !run.join("summary.json").exists() {
        let mut c = mpirun(2);
        c.args(["train", "--resume"]).arg(&run).arg("--distributed");
        succeed(c, tmp, "one-resumed-on-two");
    }
    assert_eq!(summary_epochs(&run), 2);
}

#[test]
fn a_hanging_rank_is_stopped_by_the_collective_timeout() {
    let _serial = one_job_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let mut c = mpirun(2);
    c.args(small(1, 6))
        .arg("--out")
        .arg(tmp.join("run"))
        .args(["--distributed", "--collective-timeout", "5"])
        // Test hook: rank 1 stops answering after its second step.
        .env("GCA_HNG_TEST_HANG_RANK", "1");
    let (status, text) = finish(c, tmp, "hang");
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("has waited more than 5 s"),
        "rank 0 names the collective it gave up on:\n{text}"
    );
}

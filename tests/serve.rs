//! `gca-hng serve` as a client sees it: the binary on a loopback port with a small trained
//! model, driven over raw HTTP/1.1 (so that malformed, truncated and slow requests can be
//! sent), under load, through SIGTERM, and through its page in headless Chromium.
//!
//! Every test here trains a model first and the browser test needs `chromium` and
//! `chromedriver`, so they are ignored by a plain `cargo test`; `.ci/run` runs them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gca_hng::data::ImageSource;
use gca_hng::data::loader::ImageStore;
use gca_hng::index::{Gallery, IndexFile};
use gca_hng::io::embedding_files::EmbeddingFiles;

const BIN: &str = env!("CARGO_BIN_EXE_gca-hng");

/// One server at a time: the load test saturates the cores, and the other tests hold
/// requests to deadlines of a few seconds.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A small run trained once per test binary (32 px emoji, 16-d embeddings), or the run that
/// `GCA_HNG_SERVE_TEST_RUN` names (to measure the load test on a real model; its gallery must
/// be the embedded emoji set, as `train --preset demo` writes it).
fn trained_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        if let Some(run) = std::env::var_os("GCA_HNG_SERVE_TEST_RUN") {
            return PathBuf::from(run);
        }
        // One folder, replaced by each run of this test binary.
        let run = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-test-run");
        let _ = std::fs::remove_dir_all(&run);
        let out = Command::new(BIN)
            .args(["train", "--preset", "demo", "--out"])
            .arg(&run)
            .args([
                "--max-steps-per-epoch",
                "4",
                "--eval-class-limit",
                "24",
                "--set",
                "train.epochs=1",
                "--set",
                "data.workers=1",
                "--set",
                "data.image_size=32",
                "--set",
                "data.resize=32",
                "--set",
                "model.embedding_dim=16",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "training failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        run
    })
}

/// Runs a command and returns its standard output; the test fails with its standard error.
fn succeed(command: &mut Command) -> Vec<u8> {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        command.get_program().to_string_lossy(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn gallery_prefix() -> PathBuf {
    trained_run().join("test-embeddings")
}

/// The gallery's image lines.
fn gallery_lines() -> Vec<String> {
    std::fs::read_to_string(gallery_prefix().with_extension("paths.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// An emoji of the gallery as PNG bytes, rendered as the service's store renders it.
fn emoji_png(line: &str) -> Vec<u8> {
    let source = gca_hng::io::embedding_files::parse_source_line(line).unwrap();
    assert!(matches!(source, ImageSource::Emoji { .. }), "{line}");
    let img = ImageStore::with_emoji(emoji_size(), None)
        .unwrap()
        .load(&source)
        .unwrap();
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

/// The size at which the run's store renders emoji (`data.resize`), so that a query is the
/// very image the gallery row was embedded from.
fn emoji_size() -> u32 {
    run_setting("data", "resize") as u32
}

fn run_setting(table: &str, key: &str) -> i64 {
    let text = std::fs::read_to_string(trained_run().join("config.toml")).unwrap();
    let config: toml::Value = toml::from_str(&text).unwrap();
    config[table][key].as_integer().unwrap()
}

/// `emoji:CLASS` of `emoji:CLASS:ICON`: the concept.
fn concept(line: &str) -> &str {
    line.rsplit_once(':').map_or(line, |(c, _)| c)
}

/// A running `serve`, stopped (SIGKILL) when dropped unless already waited for.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// `serve` on the trained run's test embeddings.
    fn start(extra: &[&str]) -> Server {
        let prefix = gallery_prefix();
        let mut args: Vec<&std::ffi::OsStr> = vec!["--gallery".as_ref(), prefix.as_os_str()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        Server::start_with(&args)
    }

    /// `serve` on the trained run with `args` (which name the gallery).
    fn start_with(args: &[&std::ffi::OsStr]) -> Server {
        // `last`: the model that embedded the run's test embeddings.
        let mut child = Command::new(BIN)
            .args(["serve", "--which", "last", "--run"])
            .arg(trained_run())
            .args(["--addr", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("serve exited before listening")
                .unwrap();
            if let Some(a) = line.strip_prefix("listening on http://") {
                break a.parse().unwrap();
            }
        };
        // Keep reading so that the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr }
    }

    /// SIGTERM, then the exit status must be success.
    fn stop(&mut self) {
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGTERM) }, 0);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status:?}");
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status (0 when the connection closed without one), headers, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends raw bytes and reads one response: its declared length, or until the connection
/// closes (some servers, chromedriver among them, keep it open despite `connection: close`).
fn raw(addr: SocketAddr, bytes: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|n| out.len() >= end + 4 + n) {
                break;
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    parse_answer(&out)
}

fn parse_answer(out: &[u8]) -> Answer {
    let Some(split) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Answer {
            status: 0,
            head: String::from_utf8_lossy(out).into_owned(),
            body: Vec::new(),
        };
    };
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Answer {
        status,
        head,
        body: out[split + 4..].to_vec(),
    }
}

fn request(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &[u8]) -> Answer {
    let mut bytes = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes)
}

fn get(addr: SocketAddr, path: &str) -> Answer {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes(),
    )
}

fn search_image(addr: SocketAddr, png: &[u8]) -> Answer {
    request(addr, "POST", "/search?k=5", "image/png", png)
}

#[test]
#[ignore = "trains a model; run by .ci/run"]
fn serve_answers_every_endpoint_and_refuses_bad_input_with_a_reason() {
    let _serial = serial();
    let server = Server::start(&[
        "--workers",
        "2",
        "--max-body-mib",
        "1",
        "--timeout-s",
        "2",
        "--header-timeout-s",
        "1",
    ]);
    let addr = server.addr;
    let lines = gallery_lines();

    let health = get(addr, "/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["rows"], lines.len());
    let dim = run_setting("model", "embedding_dim");
    assert_eq!(health.json()["dim"], dim);
    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(page.head.to_ascii_lowercase().contains("text/html"));
    assert!(page.text().contains("id=\"file\""));

    // An emoji of the gallery finds itself first, by image, by embedding and by row.
    let line = &lines[lines.len() / 2];
    let png = emoji_png(line);
    let by_image = search_image(addr, &png);
    assert_eq!(by_image.status, 200, "{}", by_image.text());
    let results = by_image.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 5);
    assert_eq!(results[0]["path"], line.as_str());
    let scores: Vec<f64> = results
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    let row = results[0]["row"].as_u64().unwrap();
    let embedded = request(addr, "POST", "/embed", "application/octet-stream", &png);
    assert_eq!(embedded.status, 200);
    let embedding = embedded.json()["embedding"].clone();
    assert_eq!(embedding.as_array().unwrap().len() as i64, dim);
    let body = serde_json::json!({ "embedding": embedding, "k": 3 }).to_string();
    let by_embedding = request(addr, "POST", "/search", "application/json", body.as_bytes());
    assert_eq!(by_embedding.json()["results"][0]["row"], row);
    assert_eq!(by_embedding.json()["results"].as_array().unwrap().len(), 3);
    let body = serde_json::json!({ "gallery_row": row }).to_string();
    let by_row = request(addr, "POST", "/search", "application/json", body.as_bytes());
    assert_eq!(by_row.json()["results"][0]["row"], row);

    // Its thumbnail is served; nothing outside the gallery is.
    let image_url = results[0]["image"].as_str().unwrap();
    let thumb = get(addr, image_url);
    assert_eq!(thumb.status, 200);
    assert!(image::load_from_memory(&thumb.body).is_ok());
    for path in [
        "/images/../../../../etc/passwd",
        "/images/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/images/emoji/..%2F..%2Fetc/passwd",
    ] {
        let a = get(addr, path);
        assert!(a.status == 403 || a.status == 404, "{path}: {a:?}");
        assert!(!a.text().contains("root:"), "{path}");
    }
    assert_eq!(get(addr, "/images/%2e%2e/x").status, 403);
    assert_eq!(get(addr, "/images/emoji/9999/1").status, 404);

    // Bad input: a 4xx with a message, never a crash.
    let cases: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        ("text", b"hello".to_vec(), "image/png", 400, "not an image"),
        ("empty", Vec::new(), "image/png", 400, "empty"),
        (
            "truncated",
            png[..png.len() / 2].to_vec(),
            "image/png",
            400,
            "does not decode",
        ),
        (
            "bad json",
            b"{\"embedding\": [1,".to_vec(),
            "application/json",
            400,
            "JSON body",
        ),
        (
            "wrong width",
            b"{\"embedding\": [1, 2, 3]}".to_vec(),
            "application/json",
            400,
            "3 values",
        ),
        (
            "beyond float32",
            format!(
                "{{\"embedding\": [1e39{}]}}",
                ", 0".repeat(dim as usize - 1)
            )
            .into_bytes(),
            "application/json",
            400,
            "the query's value 0 is not finite",
        ),
        (
            "both",
            b"{\"embedding\": [1], \"gallery_row\": 1}".to_vec(),
            "application/json",
            400,
            "exactly one",
        ),
        (
            "no row",
            b"{\"gallery_row\": 99999999}".to_vec(),
            "application/json",
            400,
            "no row",
        ),
    ];
    for (what, body, ct, status, message) in cases {
        let a = request(addr, "POST", "/search", ct, &body);
        assert_eq!(a.status, status, "{what}: {}", a.text());
        assert!(a.text().contains(message), "{what}: {}", a.text());
    }
    // A body over the limit is refused from its declared length, before it is sent.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"POST /search HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: 3145728\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = vec![0u8; 4096];
    let n = s.read(&mut out).unwrap();
    assert_eq!(
        parse_answer(&out[..n]).status,
        413,
        "{:?}",
        String::from_utf8_lossy(&out[..n])
    );
    drop(s);
    let a = request(addr, "POST", "/search?k=0", "image/png", &png);
    assert_eq!(a.status, 400, "{}", a.text());
    // axum's own refusals come as JSON too: a malformed query string, a chunked body past the
    // limit (no declared length to refuse it by), an unknown route, a wrong method.
    let a = request(addr, "POST", "/search?k=abc", "image/png", &png);
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(
        a.json()["error"].as_str().unwrap().contains('k'),
        "{}",
        a.text()
    );
    let chunk = vec![b'x'; 1 << 20];
    let mut chunked = b"POST /search HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: image/png\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let a = raw(addr, &chunked);
    assert_eq!(a.status, 413, "{a:?}");
    assert!(a.json()["error"].is_string(), "{}", a.text());
    let a = get(addr, "/no-such-page");
    assert_eq!(a.status, 404, "{}", a.text());
    assert!(a.json()["error"].is_string(), "{}", a.text());
    let a = get(addr, "/search");
    assert_eq!(a.status, 405, "{}", a.text());
    assert!(a.json()["error"].is_string(), "{}", a.text());
    assert!(a.head.to_ascii_lowercase().contains("allow:"), "{}", a.head);
    // A body that never arrives in full meets the request deadline.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"POST /search HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: 100000\r\n\r\n")
        .unwrap();
    s.write_all(&png[..10]).unwrap();
    let mut out = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.read_to_end(&mut out);
    assert_eq!(
        parse_answer(&out).status,
        408,
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    // Headers that never end are cut off.
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the connection stayed open"
    );
    // Garbage is not HTTP.
    let a = raw(addr, b"\x16\x03\x01 definitely not http\r\n\r\n");
    assert!(a.status == 400 || a.status == 0, "{a:?}");

    // Still up, and it counted all of that.
    assert_eq!(get(addr, "/health").status, 200);
    let metrics = get(addr, "/metrics").text();
    assert!(metrics.contains("gca_hng_requests_total{route=\"/search\",status=\"200\"}"));
    assert!(metrics.contains("gca_hng_requests_total{route=\"/search\",status=\"400\"}"));
    assert!(metrics.contains("gca_hng_queue_capacity"));
}

#[test]
#[ignore = "trains a model; run by .ci/run"]
fn an_index_of_an_inshop_style_folder_serves_searches_and_thumbnails() {
    let _serial = serial();
    // In-Shop's layout: img/GROUP/CATEGORY/id_N/NN_V_view.jpg, one folder per item.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("inshop/img");
    let lines = gallery_lines();
    let mut files = Vec::new();
    for (i, line) in lines
        .iter()
        .step_by((lines.len() / 12).max(1))
        .take(12)
        .enumerate()
    {
        let group = if i % 2 == 0 { "WOMEN" } else { "MEN" };
        let item = root.join(format!("{group}/Tees_Tanks/id_{i:08}"));
        std::fs::create_dir_all(&item).unwrap();
        let file = item.join(format!("0{}_1 front.png", i % 4 + 1));
        std::fs::write(&file, emoji_png(line)).unwrap();
        files.push(file);
    }
    let prefix = dir.path().join("gallery");
    // `--which last`, the model the server below runs.
    succeed(
        Command::new(BIN)
            .args(["embed", "--which", "last", "--run"])
            .arg(trained_run())
            .arg(&root)
            .arg("--out")
            .arg(&prefix),
    );
    let index = dir.path().join("gallery.index");
    for q in ["f32", "i8"] {
        succeed(
            Command::new(BIN)
                .args(["index", "build", "--gallery"])
                .arg(&prefix)
                .arg("--out")
                .arg(&index)
                .args(["--quantisation", q]),
        );
    }
    // The index carries the record of the model that embedded its rows.
    let record = EmbeddingFiles::new(&prefix).read_model().unwrap().unwrap();
    let opened = IndexFile::open(&index).unwrap();
    assert_eq!(opened.model(), Some(&record));
    drop(opened);
    // `search --index`, through the graph and exact, finds the query file itself.
    for exact in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.args(["search", "--which", "last", "--run"])
            .arg(trained_run())
            .arg("--index")
            .arg(&index)
            .arg(&files[5])
            .args(["--json", "--top", "3"]);
        if exact {
            cmd.arg("--exact");
        }
        let v: serde_json::Value = serde_json::from_slice(&succeed(&mut cmd)).unwrap();
        assert_eq!(
            v[0]["results"][0]["path"],
            files[5].display().to_string(),
            "exact {exact}: {v}"
        );
    }
    // An index of another model's rows is refused by `search` and `serve`, unless allowed.
    let other = dir.path().join("other");
    for suffix in [".npy", ".paths.txt"] {
        std::fs::copy(
            format!("{}{suffix}", prefix.display()),
            format!("{}{suffix}", other.display()),
        )
        .unwrap();
    }
    let mut foreign = record.clone();
    foreign.fingerprint = "fnv1a64:0123456789abcdef".into();
    foreign.checkpoint = "elsewhere/model.safetensors".into();
    std::fs::write(
        format!("{}.model.json", other.display()),
        serde_json::to_string(&foreign).unwrap(),
    )
    .unwrap();
    let other_index = dir.path().join("other.index");
    succeed(
        Command::new(BIN)
            .args(["index", "build", "--gallery"])
            .arg(&other)
            .arg("--out")
            .arg(&other_index),
    );
    for command in ["search", "serve"] {
        let mut cmd = Command::new(BIN);
        cmd.args([command, "--which", "last", "--run"])
            .arg(trained_run())
            .arg("--index")
            .arg(&other_index)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if command == "search" {
            cmd.arg(&files[5]);
        } else {
            cmd.args(["--addr", "127.0.0.1:0"]);
        }
        // A server that wrongly accepted the index would listen forever.
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("elsewhere/model.safetensors")
                && err.contains("--allow-other-model"),
            "{command}: {err}"
        );
    }
    succeed(
        Command::new(BIN)
            .args(["search", "--which", "last", "--allow-other-model", "--run"])
            .arg(trained_run())
            .arg("--index")
            .arg(&other_index)
            .arg(&files[5]),
    );
    let mut server = Server::start_with(&[
        "--index".as_ref(),
        index.as_os_str(),
        "--workers".as_ref(),
        "1".as_ref(),
    ]);
    let addr = server.addr;
    let health = get(addr, "/health").json();
    assert!(
        health["gallery"].as_str().unwrap().contains("hnsw i8"),
        "{health}"
    );
    let a = search_image(addr, &std::fs::read(&files[7]).unwrap());
    assert_eq!(a.status, 200, "{}", a.text());
    let first = &a.json()["results"][0];
    assert_eq!(first["path"], files[7].display().to_string());
    let url = first["image"].as_str().unwrap();
    assert!(
        url.starts_with("/images/MEN/Tees_Tanks/id_00000007/"),
        "{url}"
    );
    assert!(url.ends_with("_1%20front.png"), "{url}");
    assert_eq!(get(addr, url).status, 200);
    // A file beside the gallery folder is not served, however it is named.
    std::fs::write(dir.path().join("inshop/secret.png"), emoji_png(&lines[0])).unwrap();
    assert_eq!(get(addr, "/images/..%2Fsecret.png").status, 403);
    assert_eq!(get(addr, "/images/MEN/Tees_Tanks/secret.png").status, 404);
    server.stop();
}

/// Percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Clients sending emoji searches in a loop until `until` or `per_client` requests; every
/// answer is checked: 200 with the emoji itself first, or 503.
fn load(
    addr: SocketAddr,
    clients: usize,
    per_client: usize,
    until: Instant,
) -> (Vec<f64>, usize, usize, Vec<String>) {
    let lines = gallery_lines();
    let queries: Vec<(String, Vec<u8>)> = lines
        .iter()
        .step_by((lines.len() / 16).max(1))
        .map(|l| (l.clone(), emoji_png(l)))
        .collect();
    let queries = std::sync::Arc::new(queries);
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let queries = queries.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let (mut ok, mut busy) = (0, 0);
                let mut wrong = Vec::new();
                for i in 0..per_client {
                    if Instant::now() >= until {
                        break;
                    }
                    let (line, png) = &queries[(c + i) % queries.len()];
                    let started = Instant::now();
                    let a = search_image(addr, png);
                    let took = started.elapsed().as_secs_f64();
                    match a.status {
                        200 if a.json()["results"][0]["path"] == line.as_str() => {
                            ok += 1;
                            latencies.push(took);
                        }
                        503 => busy += 1,
                        _ => wrong.push(format!("{line}: {} {}", a.status, a.text())),
                    }
                }
                (latencies, ok, busy, wrong)
            })
        })
        .collect();
    let mut all = (Vec::new(), 0, 0, Vec::new());
    for h in handles {
        let (l, ok, busy, wrong) = h.join().unwrap();
        all.0.extend(l);
        all.1 += ok;
        all.2 += busy;
        all.3.extend(wrong);
    }
    all.0.sort_by(f64::total_cmp);
    all
}

#[test]
#[ignore = "trains a model; run by .ci/run"]
fn under_load_every_answer_is_right_or_503_and_memory_stays_bounded() {
    let _serial = serial();
    // Two workers taking two images each and a queue of four: capacity is eight images at
    // once.
    let server = Server::start(&["--workers", "2", "--batch", "2", "--queue", "4"]);
    let addr = server.addr;
    assert_eq!(get(addr, "/health").status, 200);
    let baseline = server.rss_kib();
    let mut peak = baseline;
    let until = Instant::now() + Duration::from_secs(60);
    for clients in [4, 8, 32] {
        let started = Instant::now();
        let sampler_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (latencies, ok, busy, wrong) = std::thread::scope(|scope| {
            let stop = sampler_stop.clone();
            let pid = server.pid();
            let sampler = scope.spawn(move || {
                let mut peak = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                        .unwrap_or_default()
                        .lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    peak = peak.max(rss);
                    std::thread::sleep(Duration::from_millis(20));
                }
                peak
            });
            let r = load(addr, clients, 40, until);
            sampler_stop.store(true, std::sync::atomic::Ordering::SeqCst);
            peak = peak.max(sampler.join().unwrap());
            r
        });
        let secs = started.elapsed().as_secs_f64();
        println!(
            "load: {clients} clients: {ok} ok, {busy} 503, {:.1} ok/s, p50 {:.1} ms, p99 {:.1} ms",
            ok as f64 / secs,
            percentile(&latencies, 0.5) * 1e3,
            percentile(&latencies, 0.99) * 1e3
        );
        assert!(wrong.is_empty(), "{clients} clients: {wrong:?}");
        assert!(ok > 0, "{clients} clients: nothing answered");
        if clients > 8 {
            // Beyond capacity the bound shows as refusals, not as a growing queue.
            assert!(busy > 0, "{clients} clients: no request was refused");
        }
    }
    println!(
        "load: server RSS {} MiB before, {} MiB at peak",
        baseline / 1024,
        peak / 1024
    );
    // Bounded: the queue holds at most four images of at most 16 MiB each.
    assert!(
        peak < baseline + 512 * 1024,
        "RSS grew from {baseline} KiB to {peak} KiB"
    );
    assert_eq!(get(addr, "/health").status, 200);
    let metrics = get(addr, "/metrics").text();
    let rejected: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gca_hng_rejected_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(rejected > 0.0, "{metrics}");
}

#[test]
#[ignore = "trains a model; run by .ci/run"]
fn sigterm_during_load_finishes_what_was_accepted_and_exits_cleanly() {
    let _serial = serial();
    let mut server = Server::start(&["--workers", "2", "--queue", "8"]);
    let addr = server.addr;
    let until = Instant::now() + Duration::from_secs(60);
    let load = std::thread::spawn(move || {
        // Each client keeps going until connections are refused.
        let lines = gallery_lines();
        let png = emoji_png(&lines[0]);
        let clients: Vec<_> = (0..6)
            .map(|_| {
                let png = png.clone();
                let line = lines[0].clone();
                std::thread::spawn(move || {
                    let (mut ok, mut busy, mut refused) = (0, 0, 0);
                    let mut bad = Vec::new();
                    while Instant::now() < until {
                        let Ok(mut s) = TcpStream::connect(addr) else {
                            refused += 1;
                            break;
                        };
                        let head = format!(
                            "POST /search HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: image/png\r\ncontent-length: {}\r\n\r\n",
                            png.len()
                        );
                        if s.write_all(head.as_bytes()).and_then(|()| s.write_all(&png)).is_err() {
                            refused += 1;
                            break;
                        }
                        let mut out = Vec::new();
                        let _ = s.read_to_end(&mut out);
                        let a = parse_answer(&out);
                        match a.status {
                            200 if a.json()["results"][0]["path"] == line.as_str() => ok += 1,
                            503 => busy += 1,
                            // Closed before a request was read: the listener was shutting.
                            0 if out.is_empty() => {
                                refused += 1;
                                break;
                            }
                            _ => bad.push(format!("{} {:?}", a.status, a.text())),
                        }
                    }
                    (ok, busy, refused, bad)
                })
            })
            .collect();
        clients
            .into_iter()
            .map(|c| c.join().unwrap())
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGTERM) }, 0);
    let signalled = Instant::now();
    let status = server.child.wait().unwrap();
    println!(
        "sigterm: exited {:?} {:.2} s after the signal",
        status.code(),
        signalled.elapsed().as_secs_f64()
    );
    assert!(status.success(), "{status:?}");
    let results = load.join().unwrap();
    let ok: usize = results.iter().map(|r| r.0).sum();
    println!("sigterm: {ok} answered before the signal took effect; {results:?}");
    assert!(ok > 0);
    for (_, _, _, bad) in &results {
        assert!(bad.is_empty(), "an accepted request was cut off: {bad:?}");
    }
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening after exit"
    );
}

/// A free loopback port.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A WebDriver session on chromedriver, deleted (and the driver killed) when dropped.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

impl Browser {
    fn start(profile: &Path) -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (apt-get install chromium chromium-driver)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut b = Browser {
            driver,
            port,
            session: String::new(),
        };
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1200,900",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let r = b.call("POST", "/session", Some(caps));
        b.session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {r}"))
            .to_string();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let a = request(addr, method, path, "application/json", body.as_bytes());
        serde_json::from_slice(&a.body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {}", a.text()))
    }

    fn session_call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let r = self.call(method, &format!("/session/{}{path}", self.session), body);
        assert!(r["value"].get("error").is_none(), "{method} {path}: {r}");
        r["value"].clone()
    }

    fn script(&self, js: &str) -> serde_json::Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(serde_json::json!({"script": js, "args": []})),
        )
    }

    fn find(&self, css: &str) -> String {
        let v = self.session_call(
            "POST",
            "/element",
            Some(serde_json::json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|v| v.as_str())
            .unwrap()
            .to_string()
    }

    /// Waits for the page's results (other than a first result marked stale with
    /// `window.stale`), returning the first one's `[row, path]`, or panics with the page's
    /// status line.
    fn first_result(&self, after: &str) -> (u64, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.script(
                "let r = document.querySelector('#results .result');
                 if (r && r === window.stale) r = null;
                 const s = document.getElementById('status');
                 return [r ? Number(r.dataset.row) : null, r ? r.dataset.path : null,
                         s.textContent, s.className];",
            );
            if let (Some(row), Some(path)) = (v[0].as_u64(), v[1].as_str()) {
                return (row, path.to_string());
            }
            assert!(v[3] != "error", "{after}: the page says {}", v[2]);
            assert!(
                Instant::now() < deadline,
                "{after}: no results; status {}",
                v[2]
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
#[ignore = "needs chromium and chromedriver; run by .ci/run"]
fn the_page_in_headless_chromium_finds_the_same_emoji_and_searches_by_a_result() {
    let _serial = serial();
    let server = Server::start(&["--workers", "2"]);
    let dir = tempfile::tempdir().unwrap();
    let lines = gallery_lines();
    let line = &lines[lines.len() / 3];
    let file = dir.path().join("query.png");
    std::fs::write(&file, emoji_png(line)).unwrap();
    let browser = Browser::start(&dir.path().join("profile"));
    browser.session_call(
        "POST",
        "/url",
        Some(serde_json::json!({"url": format!("http://{}/", server.addr)})),
    );
    let input = browser.find("#file");
    browser.session_call(
        "POST",
        &format!("/element/{input}/value"),
        Some(serde_json::json!({"text": file.display().to_string()})),
    );
    let (row, path) = browser.first_result("upload");
    assert_eq!(concept(&path), concept(line), "{path} for {line}");
    // Thumbnails loaded: the first result's image has pixels.
    let deadline = Instant::now() + Duration::from_secs(30);
    while browser.script(
        "const i = document.querySelector('#results .result img'); return i.complete && i.naturalWidth;",
    ) == 0
    {
        assert!(Instant::now() < deadline, "the thumbnail did not load");
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Ok(shot) = std::env::var("GCA_HNG_SCREENSHOT") {
        let png = browser.session_call("GET", "/screenshot", None);
        let bytes = base64_decode(png.as_str().unwrap());
        std::fs::write(shot, bytes).unwrap();
    }
    // Clicking the second result searches with it: it comes back first.
    browser.script("window.stale = document.querySelector('#results .result');");
    let second = browser.find("#results .result:nth-child(2)");
    let second_row = browser
        .script("return Number(document.querySelectorAll('#results .result')[1].dataset.row);");
    browser.session_call(
        "POST",
        &format!("/element/{second}/click"),
        Some(serde_json::json!({})),
    );
    let (clicked_row, _) = browser.first_result("click");
    assert_eq!(serde_json::json!(clicked_row), second_row);
    assert_ne!(clicked_row, row);
}

/// Standard base64 (WebDriver screenshots).
fn base64_decode(s: &str) -> Vec<u8> {
    let table = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(table) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

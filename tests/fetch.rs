//! `data::fetch` against a tiny HTTP server on 127.0.0.1 (std::net only; nothing here touches the internet):
//! download, md5 check, resume with `Range` after a cut connection or from an earlier `.part`, extraction of a
//! tar.gz, the no-op second fetch, and the error messages for a bad md5, an HTTP error and an unreachable server.
//! Also `info` on synthetic data.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Result};
use common::{check_contains, err_text};
use md5::{Digest, Md5};
use sdp::data::cifar;
use sdp::data::fetch::{self, Source};
use sdp::data::remote::RemoteFile;

// ---------------------------------------------------------------- test server

#[derive(Clone, Debug, PartialEq)]
struct Request {
    path: String,
    /// Start of a `Range: bytes=N-` header, if sent.
    range: Option<u64>,
}

#[derive(Clone, Default)]
struct Behaviour {
    files: HashMap<String, Vec<u8>>,
    /// Close the first connection after this many body bytes (having announced the full length).
    cut_first_at: Option<usize>,
    /// Answer `Range` requests with 206 (true) or ignore them and send the whole file with 200 (false).
    honor_range: bool,
}

struct Server {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// Serves the one file `name` with `body`, answering `Range` requests if `honor_range`.
fn serve_one(name: &str, body: &[u8], honor_range: bool) -> Result<Server> {
    serve(Behaviour { files: HashMap::from([(name.into(), body.to_vec())]), honor_range, ..Default::default() })
}

/// Serves `b` on an ephemeral port from a background thread, one connection at a time.
fn serve(b: Behaviour) -> Result<Server> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { continue };
            let _ = handle(stream, &b, i == 0, &log);
        }
    });
    Ok(Server { addr, requests })
}

fn handle(mut stream: TcpStream, b: &Behaviour, first: bool, log: &Mutex<Vec<Request>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range:") {
            range = v.trim().strip_prefix("bytes=").and_then(|v| v.trim_end_matches('-').parse().ok());
        }
    }
    log.lock().map(|mut l| l.push(Request { path: path.clone(), range })).ok();
    let Some(body) = b.files.get(&path) else {
        return stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    };
    let total = body.len();
    let (status, start) = match range {
        Some(s) if b.honor_range && s as usize >= total => {
            let head = format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return stream.write_all(head.as_bytes());
        }
        Some(s) if b.honor_range => (206, s as usize),
        _ => (200, 0),
    };
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        if status == 206 { "Partial Content" } else { "OK" },
        total - start
    );
    if status == 206 {
        head += &format!("Content-Range: bytes {start}-{}/{total}\r\n", total - 1);
    }
    head += "\r\n";
    stream.write_all(head.as_bytes())?;
    let send = match b.cut_first_at {
        Some(cut) if first => &body[start..cut],
        _ => &body[start..],
    };
    stream.write_all(send)?;
    stream.flush()?;
    stream.shutdown(Shutdown::Both)
}

// ---------------------------------------------------------------- helpers

fn md5_hex(bytes: &[u8]) -> String {
    format!("{:x}", Md5::digest(bytes))
}

/// Incompressible-looking bytes, so a cut is in the middle of real data.
fn payload(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn plain_source(server: &Server, name: &str, md5: &str) -> Source {
    Source {
        name: "test".into(),
        files: vec![RemoteFile { url: server.url(name), md5: md5.into(), dir: PathBuf::from("sub"), extracts: vec![] }],
    }
}

/// A CIFAR-10 tree (2 train records per batch, 3 test records) packed as `cifar-10-binary.tar.gz` bytes.
fn cifar10_archive() -> Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut add = |name: &str, labels: &[u8]| -> Result<()> {
        let mut data = Vec::new();
        for (i, &l) in labels.iter().enumerate() {
            data.push(l);
            data.extend(payload(3072, i as u32 + 1));
        }
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("cifar-10-batches-bin/{name}"), &data[..])?;
        Ok(())
    };
    for i in 1..=5 {
        add(&format!("data_batch_{i}.bin"), &[i as u8, 9])?;
    }
    add("test_batch.bin", &[0, 1, 2])?;
    Ok(tar.into_inner()?.finish()?)
}

/// Places `files` (name, bytes) in the destination's `sub/` folder, fetches `f.mat` (whose content is
/// `body`) from `server` into `dir`, and checks the result.
fn place_and_fetch(server: &Server, dir: &Path, body: &[u8], files: &[(&str, &[u8])]) -> Result<()> {
    std::fs::create_dir_all(dir.join("sub"))?;
    for (name, bytes) in files {
        std::fs::write(dir.join("sub").join(name), bytes)?;
    }
    fetch::fetch_from(&plain_source(server, "f.mat", &md5_hex(body)), dir)?;
    ensure!(std::fs::read(dir.join("sub/f.mat"))? == body, "fetched file differs");
    Ok(())
}

// ---------------------------------------------------------------- tests

#[test]
fn fetch_downloads_checks_md5_and_places_file() -> Result<()> {
    let body = payload(100_000, 1);
    let server = serve_one("f.mat", &body, true)?;
    let dir = tempfile::tempdir()?;
    let src = plain_source(&server, "f.mat", &md5_hex(&body));
    fetch::fetch_from(&src, dir.path())?;
    ensure!(std::fs::read(dir.path().join("sub/f.mat"))? == body);
    ensure!(!dir.path().join("sub/f.mat.part").exists(), ".part left behind");
    ensure!(server.requests() == [Request { path: "f.mat".into(), range: None }]);
    // Present with the right md5: nothing to do, no request.
    fetch::fetch_from(&src, dir.path())?;
    ensure!(server.requests().len() == 1, "second fetch downloaded again: {:?}", server.requests());
    Ok(())
}

#[test]
fn fetch_resumes_after_a_cut_connection() -> Result<()> {
    let body = payload(300_000, 2);
    let cut = 123_457;
    let server = serve(Behaviour {
        files: HashMap::from([("f.mat".into(), body.clone())]),
        cut_first_at: Some(cut),
        honor_range: true,
    })?;
    let dir = tempfile::tempdir()?;
    fetch::fetch_from(&plain_source(&server, "f.mat", &md5_hex(&body)), dir.path())?;
    ensure!(std::fs::read(dir.path().join("sub/f.mat"))? == body, "resumed file differs");
    let reqs = server.requests();
    ensure!(reqs.len() == 2, "expected the cut request and one resume, got {reqs:?}");
    ensure!(reqs[0].range.is_none() && reqs[1].range == Some(cut as u64), "requests {reqs:?}");
    Ok(())
}

#[test]
fn fetch_resumes_a_part_file_left_by_an_earlier_run() -> Result<()> {
    let body = payload(50_000, 3);
    let server = serve_one("f.mat", &body, true)?;
    let dir = tempfile::tempdir()?;
    place_and_fetch(&server, dir.path(), &body, &[("f.mat.part", &body[..20_000])])?;
    ensure!(server.requests()[0].range == Some(20_000), "requests {:?}", server.requests());

    // A complete .part (crash between download and rename): the server answers 416 and the file is kept.
    std::fs::remove_file(dir.path().join("sub/f.mat"))?;
    place_and_fetch(&server, dir.path(), &body, &[("f.mat.part", &body)])?;
    ensure!(server.requests().last().map(|r| r.range) == Some(Some(50_000)));
    Ok(())
}

#[test]
fn fetch_restarts_when_the_server_ignores_range() -> Result<()> {
    let body = payload(40_000, 4);
    let server = serve_one("f.mat", &body, false)?;
    let dir = tempfile::tempdir()?;
    // Wrong bytes in the .part: they must be overwritten.
    place_and_fetch(&server, dir.path(), &body, &[("f.mat.part", &payload(10_000, 99))])?;
    Ok(())
}

#[test]
fn fetch_md5_mismatch_names_file_and_both_sums_and_deletes_download() -> Result<()> {
    let body = payload(30_000, 5);
    let server = serve_one("f.mat", &body, true)?;
    let dir = tempfile::tempdir()?;
    let wrong = "0123456789abcdef0123456789abcdef";
    let msg = err_text(fetch::fetch_from(&plain_source(&server, "f.mat", wrong), dir.path()));
    let dest = dir.path().join("sub/f.mat");
    check_contains(&msg, &["md5 mismatch", &dest.display().to_string(), &md5_hex(&body), wrong, &server.url("f.mat")])?;
    ensure!(!dest.exists() && !dir.path().join("sub/f.mat.part").exists(), "bad download kept");
    Ok(())
}

#[test]
fn fetch_replaces_a_present_file_with_wrong_md5() -> Result<()> {
    let body = payload(30_000, 6);
    let server = serve_one("f.mat", &body, true)?;
    let dir = tempfile::tempdir()?;
    place_and_fetch(&server, dir.path(), &body, &[("f.mat", b"stale")])?;
    Ok(())
}

#[test]
fn fetch_http_error_and_unreachable_server_name_the_url_and_manual_path() -> Result<()> {
    let server = serve(Behaviour { honor_range: true, ..Default::default() })?;
    let dir = tempfile::tempdir()?;
    let src = plain_source(&server, "missing.mat", "00");
    let msg = err_text(fetch::fetch_from(&src, dir.path()));
    let dest = dir.path().join("sub/missing.mat").display().to_string();
    check_contains(&msg, &[&server.url("missing.mat"), "HTTP 404", "place the file at", &dest])?;

    // A port nobody listens on (bound, then released).
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}/x.tar.gz");
    let src = Source {
        name: "cifar10".into(),
        files: vec![RemoteFile { url: url.clone(), md5: "abc".into(), dir: PathBuf::new(), extracts: vec![] }],
    };
    let msg = err_text(fetch::fetch_from(&src, dir.path()));
    let dest = dir.path().join("x.tar.gz").display().to_string();
    check_contains(
        &msg,
        &[&url, "offline", "place the file at", &dest, "md5 abc", "sdp data fetch cifar10", "could not connect"],
    )?;
    ensure!(!dir.path().join("x.tar.gz.part").exists());
    Ok(())
}

#[test]
fn fetch_extracts_cifar_archive_that_then_loads() -> Result<()> {
    let archive = cifar10_archive()?;
    let server = serve_one("cifar-10-binary.tar.gz", &archive, true)?;
    let dir = tempfile::tempdir()?;
    let src = Source {
        name: "cifar10".into(),
        files: vec![RemoteFile {
            url: server.url("cifar-10-binary.tar.gz"),
            md5: md5_hex(&archive),
            dir: PathBuf::new(),
            extracts: cifar::cifar10_files(Path::new("")),
        }],
    };
    fetch::fetch_from(&src, dir.path())?;
    let ds = cifar::load_cifar10(dir.path())?;
    ensure!(ds.train.len() == 10 && ds.test.len() == 3 && ds.test.labels == [0, 1, 2]);
    ensure!(ds.train.labels == [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]);
    ensure!(dir.path().join("cifar-10-binary.tar.gz").is_file(), "archive not kept");
    ensure!(!dir.path().join(".cifar-10-binary.tar.gz.extracting").exists(), "extraction temp dir left");

    // Removed extracted files come back from the kept archive without a download.
    std::fs::remove_file(dir.path().join("cifar-10-batches-bin/test_batch.bin"))?;
    fetch::fetch_from(&src, dir.path())?;
    ensure!(server.requests().len() == 1, "downloaded again: {:?}", server.requests());
    ensure!(cifar::load_cifar10(dir.path())?.test.len() == 3);

    // `info` with the official sums: this archive is not the official one.
    let report = fetch::info("cifar10", dir.path())?;
    ensure!(report.loadable);
    let report = report.text;
    check_contains(
        &report,
        &[
            "cifar-10-binary.tar.gz: mismatch",
            "expected c32a1d4ab5d03f1284b67883e8d87530",
            "train: 10 images, test: 3 images, 32x32x3 (HxWxC), 10 classes",
            "airplane",
            "1 / 1",
            "cache: none",
        ],
    )?;
    let report = fetch::info("svhn", dir.path())?;
    ensure!(!report.loadable, "a missing dataset must make `sdp data info` fail");
    let report = report.text;
    check_contains(
        &report,
        &["train_32x32.mat: missing", "test_32x32.mat: missing", "not loadable", "sdp data fetch svhn"],
    )?;
    Ok(())
}

#[test]
fn info_reports_folder_datasets_and_rejects_unknown_names() -> Result<()> {
    let dir = tempfile::tempdir()?;
    common::image_tree(dir.path(), &[("train", 3), ("test", 1)], &["cat", "dog"], 4)?;
    let report = fetch::info(&format!("folder:{}", dir.path().display()), Path::new("unused"))?.text;
    check_contains(&report, &["train: 6 images, test: 2 images, 4x4x3", "cat", "3 / 1", ".sdp-cache-v1.bin ("])?;
    check_contains(
        &err_text(fetch::info("mnist", dir.path())),
        &["unknown dataset `mnist`", "shapes, cifar10, cifar100, svhn, folder:<path>"],
    )?;
    let shapes = fetch::info("shapes", dir.path())?;
    ensure!(shapes.loadable);
    check_contains(
        &shapes.text,
        &["shapes: generated", "train: 10000 images, test: 2000 images, 32x32x3", "10 classes"],
    )?;
    check_contains(&err_text(fetch::fetch("mnist", dir.path())), &["unknown dataset `mnist`"])?;
    let official = fetch::official("svhn")?;
    ensure!(
        official.files.len() == 2 && official.files[0].url == "http://ufldl.stanford.edu/housenumbers/train_32x32.mat"
    );
    ensure!(official.files[1].md5 == "eb5a983be6a315427106f1b164d9cef3");
    let c100 = fetch::official("cifar100")?;
    ensure!(c100.files[0].url == "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz");
    ensure!(c100.files[0].md5 == "03b5dce01913d631647c71ecec9e9cb8");
    Ok(())
}

//! The SSE transport in a real browser: headless Chromium opens a page served from another
//! origin whose plain `EventSource` follows a history channel; herald drops the stream twice
//! while publications go on, and the browser, reconnecting by itself with `Last-Event-ID`,
//! must end up with every publication exactly once, in order.
//!
//! Uses Debian's Chromium (`/usr/bin/chromium`, or `HERALD_CHROMIUM`) driven by
//! `tests/browser/sse_check.js` through playwright-core, which this test installs with npm
//! into `tests/browser/node_modules` when it is missing. Without Chromium the test is skipped
//! with a message, unless `HERALD_REQUIRE_BROWSER` is set (as `scripts/test` does), in which
//! case it fails.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Server;
use serde_json::{json, Value};

const CONFIG: &str = "[namespaces.hist]\nhistory_size = 1000\n";
const CHANNEL: &str = "hist:b";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("browser")
}

/// Chromium's path: `HERALD_CHROMIUM`, or the first of the usual names found.
fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HERALD_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let names = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"];
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Installs playwright-core from the committed lock file when it is missing.
fn ensure_playwright(dir: &Path) {
    if dir.join("node_modules").join("playwright-core").join("package.json").is_file() {
        return;
    }
    eprintln!("sse_browser: installing playwright-core into {}", dir.display());
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        // playwright-core downloads no browser, but make sure nothing tries to.
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .status()
        .unwrap_or_else(|e| panic!("npm is needed for the browser test: {e}"));
    assert!(status.success(), "npm ci in {} failed: {status}", dir.display());
}

/// Serves `page` for every GET of `/sse_page.html` (404 otherwise) on a free loopback port,
/// from a thread that lives as long as the test process.
fn serve_page(page: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind page server");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let page = page.clone();
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head);
                let path = line.split_whitespace().nth(1).unwrap_or("");
                let (status, ctype, body) = if path.starts_with("/sse_page.html") {
                    ("200 OK", "text/html; charset=utf-8", page)
                } else {
                    ("404 Not Found", "text/plain", b"not found".to_vec())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\
                     cache-control: no-store\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            });
        }
    });
    addr
}

/// Runs the node script, at most `limit`; its stdout's last line as JSON, and its stderr.
fn run_check(dir: &Path, args: &[String], limit: Duration) -> (Value, String) {
    let child = Command::new("node")
        .arg(dir.join("sse_check.js"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("node is needed for the browser test: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(limit) {
        Ok(output) => output.expect("node ran"),
        Err(_) => {
            // SIGTERM lets playwright close the browser it started.
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            let output = rx.recv_timeout(Duration::from_secs(10));
            panic!("sse_check.js did not finish within {limit:?}: {output:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let report: Value = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "sse_check.js printed no JSON ({e}); status {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        )
    });
    (report, stderr)
}

#[test]
fn browser_event_source_resumes_without_loss_or_duplicates() {
    let Some(chromium) = find_chromium() else {
        if std::env::var_os("HERALD_REQUIRE_BROWSER").is_some() {
            panic!("HERALD_REQUIRE_BROWSER is set but no Chromium was found (apt-get install chromium, or set HERALD_CHROMIUM)");
        }
        eprintln!(
            "SKIPPED sse_browser: no Chromium found (install Debian's `chromium`, or set \
             HERALD_CHROMIUM; set HERALD_REQUIRE_BROWSER to make this a failure)"
        );
        return;
    };
    let dir = browser_dir();
    ensure_playwright(&dir);
    let page = std::fs::read(dir.join("sse_page.html")).expect("sse_page.html");
    let page_addr = serve_page(page);
    let server = Server::start(CONFIG, &[]);
    let herald = server.http_base();
    let page_url = format!("http://{page_addr}/sse_page.html?herald={herald}&channel={CHANNEL}");
    let args = [chromium.display().to_string(), herald.clone(), page_url, CHANNEL.to_string()];
    let (report, stderr) = run_check(&dir, &args, Duration::from_secs(120));
    let context = || {
        format!(
            "report: {report:#}\nnode stderr:\n{stderr}\nherald log (tail):\n{}",
            tail(&server.log(), 40)
        )
    };
    assert_eq!(report["ok"], json!(true), "{}", context());

    let state = &report["state"];
    let total = report["total"].as_u64().expect("total");
    assert!(total >= 50, "{}", context());
    assert_ne!(state["origin"].as_str(), Some(herald.as_str()), "the page is on another origin");

    // Every publication exactly once, in order, with offsets 1..=total.
    let received = state["received"].as_array().expect("received");
    let ns: Vec<u64> = received.iter().map(|p| p["data"]["n"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (0..total).collect();
    assert!(ns == want, "received n {ns:?}\n{}", context());
    for (i, p) in received.iter().enumerate() {
        assert_eq!(p["channel"], json!(CHANNEL));
        assert_eq!(p["offset"], json!(i as u64 + 1), "{p}");
        // The browser's lastEventId is the stream's position after this publication: `~`, then
        // the channel's 8-character epoch tag and its offset (the compact id format).
        let id = p["id"].as_str().unwrap();
        assert!(id.starts_with('~') && id.len() > 9, "{id}");
        assert_eq!(&id[9..], (i + 1).to_string(), "{id}");
    }
    let epochs: std::collections::BTreeSet<&str> =
        received.iter().map(|p| &p["id"].as_str().unwrap()[1..9]).collect();
    assert_eq!(epochs.len(), 1, "one epoch: {epochs:?}");

    // It really was dropped and resumed.
    let cycles = report["cycles"].as_array().expect("cycles");
    assert_eq!(cycles.len(), 2);
    for c in cycles {
        assert_eq!(c["dropped"], json!(1), "herald dropped the browser's stream: {c}");
        assert_eq!(
            c["publishedWhileDisconnected"],
            json!(true),
            "the batch was published while the browser waited to reconnect: {c}\n{}",
            context()
        );
    }
    assert!(state["opens"].as_u64().unwrap() >= 3, "{}", context());
    assert!(state["errors"].as_u64().unwrap() >= 2, "{}", context());
    assert_eq!(state["disconnects"].as_array().unwrap().len(), 2, "{}", context());
    assert_eq!(state["resets"], json!([]), "{}", context());
    assert_eq!(state["other"], json!([]), "{}", context());
    eprintln!(
        "sse_browser: {total} publications received once each over {} opens, {} errors, cycles {}",
        state["opens"], state["errors"], report["cycles"]
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

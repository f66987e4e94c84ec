//! The log filter (`log_level`, `RUST_LOG`) at start-up: a filter the parser cannot take is a
//! configuration error naming where it came from (exit 2), never a panic (exit 101), and a
//! filter with field values starts at once (values are matched literally, never compiled as
//! regular expressions, which once took 41 s and 2.2 GB).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_addr, herald_bin, run_herald};

#[test]
fn bad_log_filters_stop_startup_naming_the_source() {
    for filter in [" \u{e9}=info", "\u{e9}", "herald=loud", "[{}]", "a\u{7}=info"] {
        let (code, out) = run_herald(&["--log-level", filter], &[]);
        assert_eq!(code, Some(2), "--log-level {filter:?}:\n{out}");
        assert!(out.contains("log_level"), "--log-level {filter:?}:\n{out}");
        assert!(!out.contains("panicked"), "{out}");

        let (code, out) = run_herald(&[], &[("HERALD_LOG_LEVEL", filter)]);
        assert_eq!(code, Some(2), "HERALD_LOG_LEVEL={filter:?}:\n{out}");
        assert!(out.contains("log_level"), "{out}");

        let (code, out) = run_herald(&[], &[("RUST_LOG", filter)]);
        assert_eq!(code, Some(2), "RUST_LOG={filter:?}:\n{out}");
        assert!(out.contains("RUST_LOG"), "RUST_LOG={filter:?}:\n{out}");
        assert!(!out.contains("panicked"), "{out}");
    }
}

/// A running herald started with `args` and `env`, killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts herald and waits, at most 20 s, until `/healthz` answers.
fn start(args: &[&str], env: &[(&str, &str)]) -> Result<Running, String> {
    let addr = free_addr();
    let mut cmd = Command::new(herald_bin());
    cmd.args(args).arg("--listen").arg(addr.to_string());
    cmd.env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = Running(cmd.spawn().map_err(|e| e.to_string())?);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(status)) = child.0.try_wait() {
            return Err(format!("exited with {status}"));
        }
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut head = [0u8; 12];
            if s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200") {
                return Ok(child);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("not serving within 20 s".into())
}

#[test]
fn field_filters_start_without_compiling_regexes() {
    let filter = "[{a=x....................}]";
    start(&["--log-level", filter], &[]).expect("log_level with a field filter");
    start(&[], &[("RUST_LOG", filter)]).expect("RUST_LOG with a field filter");
    // An ordinary filter with spaces around directives is accepted as written.
    start(&["--log-level", " herald=debug , info "], &[]).expect("spaced filter");
}

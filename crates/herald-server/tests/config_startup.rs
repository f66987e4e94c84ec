//! Start-up: flags, `--help`, `--version`, and configuration errors that stop the binary with a
//! message naming the key.

mod common;

use common::run_herald;

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    std::io::Write::write_all(&mut f, text.as_bytes()).expect("write config");
    f
}

#[test]
fn help_documents_every_flag_and_version_prints() {
    let (code, out) = run_herald(&["--help"], &[]);
    assert_eq!(code, Some(0), "{out}");
    for flag in [
        "--config",
        "--listen",
        "--api-key",
        "--broker",
        "--log-level",
        "--ping-interval-secs",
        "--node-id",
        "--set",
    ] {
        assert!(out.contains(flag), "--help does not mention {flag}:\n{out}");
    }
    let (code, out) = run_herald(&["--version"], &[]);
    assert_eq!(code, Some(0));
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
}

#[test]
fn bad_config_files_stop_startup_naming_the_key() {
    let cases = [
        ("surprise = 1", "surprise"),
        ("[limits]\nmax_queue_bytes = \"big\"", "limits.max_queue_bytes"),
        ("ping_interval_secs = 0", "ping_interval_secs"),
        ("[namespaces.market]\nhistory_size = -1", "namespaces.market.history_size"),
        ("[auth]\nallow_anonymous = \"yes\"", "auth.allow_anonymous"),
        ("broker = \"kafka://localhost\"", "broker"),
        ("[channel_defaults]\nconflate = 3", "channel_defaults.conflate"),
        ("listen = \"0.0.0.0:8080\"", "listen"),
    ];
    for (text, key) in cases {
        let file = write_config(text);
        let path = file.path().to_str().expect("utf-8 path");
        let (code, out) = run_herald(&["--config", path], &[]);
        assert_eq!(code, Some(2), "{text:?} should stop start-up:\n{out}");
        assert!(out.contains(key), "{text:?}: message does not name `{key}`:\n{out}");
    }
}

#[test]
fn bad_env_and_flags_stop_startup_naming_the_key() {
    let (code, out) = run_herald(&[], &[("HERALD_LIMITS__MAX_BODY_BYTES", "many")]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("limits.max_body_bytes"), "{out}");

    let (code, out) = run_herald(&["--set", "limits.unknown=1"], &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("limits.unknown"), "{out}");

    let (code, out) = run_herald(&["--listen", "not-an-address"], &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("listen"), "{out}");

    let (code, out) = run_herald(&["--config", "/nonexistent/herald.toml"], &[]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("/nonexistent/herald.toml"), "{out}");
}

#[tokio::test]
async fn env_and_flags_override_the_file() {
    // The file says 3 s pings, the environment 4 s, the flag 5 s: the flag wins.
    let server = {
        let mut cmd_flags = vec!["--ping-interval-secs", "5"];
        cmd_flags.push("--node-id");
        cmd_flags.push("node-under-test");
        std::env::set_var("HERALD_PING_INTERVAL_SECS", "4");
        let s = common::Server::start("ping_interval_secs = 3\n", &cmd_flags);
        std::env::remove_var("HERALD_PING_INTERVAL_SECS");
        s
    };
    let (_client, _events, info) =
        herald_client::Client::connect(&server.ws_url(), herald_client::ConnectOptions::default())
            .await
            .expect("connect");
    let info = info.expect("connect reply");
    assert_eq!(info.ping_interval_ms, 5000);
    assert!(info.client.starts_with("node-under-test"), "{}", info.client);
}

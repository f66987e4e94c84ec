//! Loads arbitrary text as the configuration file, as the `log_level` key and as `RUST_LOG`,
//! and its lines as `KEY=VALUE` settings (`--set` flags and `HERALD_*` variables): never a
//! panic, and a log filter always answers quickly (run with `-timeout=5`); a log filter that a
//! source accepts is one the binary can build, and a configuration that loads is one whose
//! namespaces the engine can use.
#![no_main]

use herald_server::config::{log_filter, Config, Sources};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // The text as a TOML file.
    let from_file = Config::load(&Sources { file: Some(text.to_owned()), ..Default::default() });
    // The text as a log filter, from each source.
    let _ = log_filter(text);
    let from_flag = Config::load(&Sources {
        flags: vec![("log_level".into(), text.to_owned())],
        ..Default::default()
    });
    let from_env = Config::load(&Sources {
        env: vec![("RUST_LOG".into(), text.to_owned())],
        ..Default::default()
    });
    // What one source accepts is a filter the binary can build.
    for config in [&from_flag, &from_env].into_iter().flatten() {
        assert!(log_filter(&config.log_filter).is_ok(), "{:?}", config.log_filter);
    }
    // Each line `KEY=VALUE` as a `--set` flag (dotted key) and as a variable `HERALD_KEY`
    // (`__` between levels).
    let settings: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let from_flags = Config::load(&Sources { flags: settings.clone(), ..Default::default() });
    let env = settings
        .into_iter()
        .map(|(k, v)| (format!("HERALD_{}", k.replace('.', "__").to_ascii_uppercase()), v))
        .collect();
    let from_vars = Config::load(&Sources { env, ..Default::default() });
    for config in [from_file, from_flag, from_env, from_flags, from_vars].into_iter().flatten() {
        assert!(log_filter(&config.log_filter).is_ok(), "{:?}", config.log_filter);
        let _ = config.namespace_options();
    }
});

//! Loads arbitrary text as the configuration file, as the `log_level` key and as `RUST_LOG`:
//! never a panic, and a log filter always answers quickly (run with `-timeout=5`); a log
//! filter that a source accepts is one the binary can build.
#![no_main]

use herald_server::config::{log_filter, Config, Sources};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // The text as a TOML file.
    let _ = Config::load(&Sources { file: Some(text.to_owned()), ..Default::default() });
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
    for config in [from_flag, from_env].into_iter().flatten() {
        assert!(log_filter(&config.log_filter).is_ok(), "{:?}", config.log_filter);
    }
});

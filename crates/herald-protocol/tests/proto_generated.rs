//! The checked-in Rust code of `proto/herald.proto` (`src/pb/herald.v1.rs`) is exactly what
//! prost-build generates from the schema: CI fails when the schema changed and the code was not
//! regenerated. Regenerate with `HERALD_REGENERATE_PROTO=1 cargo test -p herald-protocol --test
//! proto_generated`. The schema is parsed by protox (no `protoc` needed).
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;

#[test]
fn generated_code_matches_the_schema() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let proto_dir = root.join("proto");
    let descriptors = protox::compile([proto_dir.join("herald.proto")], [&proto_dir]).unwrap();
    let out = tempfile::tempdir().unwrap();
    prost_build::Config::new().out_dir(out.path()).bytes(["."]).compile_fds(descriptors).unwrap();
    let generated = std::fs::read_to_string(out.path().join("herald.v1.rs")).unwrap();
    let checked_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/pb/herald.v1.rs");
    if std::env::var_os("HERALD_REGENERATE_PROTO").is_some() {
        std::fs::write(&checked_in, &generated).unwrap();
    }
    let current = std::fs::read_to_string(&checked_in).unwrap_or_default();
    assert!(
        current == generated,
        "src/pb/herald.v1.rs is not what proto/herald.proto generates: run \
         HERALD_REGENERATE_PROTO=1 cargo test -p herald-protocol --test proto_generated"
    );
}

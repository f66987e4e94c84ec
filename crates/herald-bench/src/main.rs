//! Herald's load generator: idle, fanout, spread and ingest scenarios.
fn main() {}

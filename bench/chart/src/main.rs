//! Draws benchmark charts (PNG) from herald-bench JSON results.
fn main() {}

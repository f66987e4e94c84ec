//! The reference fan-out server: the simplest server writing one pre-encoded frame to every socket with vectored writes; the ceiling Herald is measured against.
fn main() {}

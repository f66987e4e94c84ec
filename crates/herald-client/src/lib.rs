//! Herald client (in progress).

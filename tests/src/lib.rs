//! End-to-end tests of tether and the fixtures they run against.

pub mod fixture;
pub mod harness;

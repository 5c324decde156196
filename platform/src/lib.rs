//! Whole-system tools: the local platform runner and the helpers integration tests share.

pub mod testing;

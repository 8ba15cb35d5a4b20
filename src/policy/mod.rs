//! Per-request policies, one tower `Layer` per file.

pub mod metrics;

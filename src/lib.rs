//! Outrigger: a sidecar service-mesh proxy. See DESIGN.md for the map.
#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod body;
pub mod check;
pub mod clock;
pub mod config;
pub mod context;
pub mod control_plane;
pub mod demo;
pub mod error;
pub mod feed;
pub mod http_util;
pub mod inject;
pub mod intercept;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod run;
pub mod snapshot;
pub mod tap_cli;
pub mod telemetry;
pub mod tls;
pub mod wheel;

//! Loyalty and retention engine: points, gifts and repeat-purchase status for a merchant's
//! customers, served over gRPC.
//!
//! Data flows one way: [`grpc`] (thin handlers) → [`service`] (use cases) → [`domain`] (pure
//! rules) and [`storage`] (Postgres, Redis). See `README.md` and `../shared/DESIGN.md`.

pub mod app;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod pb;
pub mod service;
pub mod shutdown;
pub mod storage;
pub mod telemetry;

pub use error::Error;

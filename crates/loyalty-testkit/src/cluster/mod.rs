//! The rig of the fault-injection scenarios (`tests/reliability.rs`): a throwaway PostgreSQL
//! cluster that can be crashed with `pg_ctl -m immediate`, a Redis that can be stopped and
//! started again on its port, the real `loyalty serve` binary as a process that can be
//! SIGKILLed and restarted on its port, a workload driver whose clients retry the identical
//! request as a till does, and the audit every scenario ends with.
//!
//! Loopback only, and nothing here touches the shared PostgreSQL or Redis: every scenario gets
//! its own cluster, Redis and server, all removed when they are dropped.
//!
//! Split in three: `processes` (the cluster, Redis and server processes), `workload` (the
//! clients and what they saw acknowledged) and `audit` (what every scenario checks at the end).

mod audit;
mod processes;
mod workload;

pub use audit::*;
pub use processes::*;
pub use workload::*;

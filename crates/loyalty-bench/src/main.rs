//! `loyalty-bench`: the load generator of the loyalty service.
//!
//! It preloads a bench merchant per scale into a bench database, starts `loyalty serve` child
//! processes (one with the Redis cache, one without), drives them with tonic clients in a
//! closed loop and at a fixed arrival rate (open loop, latency from the intended send time),
//! runs pgbench with the very SQL of one RecordPurchase (`pgbench`) and of one ReservePoints
//! with its CommitReservation (`redeem_pgbench`) as the database ceilings, and prints a table,
//! JSON lines (`--json`) and a verdict on the performance targets.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/loyalty-bench --customers 10000,1000000 --concurrency 32 --seconds 10
//! ```

mod args;
mod cache;
mod cpu;
mod load;
mod pgbench;
mod report;
mod run;
mod servers;
mod setup;
mod stats;
mod watch;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = args::Args::parse();
    match run::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

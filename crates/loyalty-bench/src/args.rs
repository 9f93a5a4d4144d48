//! Command line of `loyalty-bench`. Every flag has a `LOYALTY_BENCH_*` environment fallback;
//! the bench deliberately does not read the server's own `DATABASE_URL`, so it can never
//! preload a million customers into a real database by accident.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Parser, ValueEnum};

use crate::pgbench::Ceiling;

#[derive(Debug, Parser)]
#[command(
    name = "loyalty-bench",
    version,
    about = "Load generator for the loyalty gRPC server, with a pgbench database ceiling"
)]
pub struct Args {
    /// The bench database (created if missing, migrated, reused across runs).
    #[arg(
        long,
        env = "LOYALTY_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/loyalty_bench"
    )]
    pub database_url: String,

    /// Redis for the cached server; keys get a prefix unique to this run and are removed at
    /// the end.
    #[arg(
        long,
        env = "LOYALTY_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Customers of the bench merchant; a list (`10000,1000000`) runs every scenario per scale
    /// and compares the scales.
    #[arg(
        long,
        env = "LOYALTY_BENCH_CUSTOMERS",
        value_delimiter = ',',
        default_value = "10000",
        value_parser = clap::value_parser!(u64).range(1..=100_000_000)
    )]
    pub customers: Vec<u64>,

    /// Closed-loop workers; also the server's pool size and pgbench's client count.
    #[arg(
        long,
        env = "LOYALTY_BENCH_CONCURRENCY",
        default_value_t = 32,
        value_parser = clap::value_parser!(u32).range(1..=1024)
    )]
    pub concurrency: u32,

    /// Measured seconds per scenario and mode.
    #[arg(
        long,
        env = "LOYALTY_BENCH_SECONDS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub seconds: u64,

    /// Unmeasured seconds before each measurement and mode (connections, pools, caches settle;
    /// the server is never measured cold).
    #[arg(long, env = "LOYALTY_BENCH_WARMUP_SECONDS", default_value_t = 2)]
    pub warmup_seconds: u64,

    /// Scenarios to run (always in the order health, balance, balance_cold, pgbench,
    /// checkout_no_outbox, checkout, watch, redeem_pgbench, redeem, mixed, so that each
    /// ceiling and its scenario meet the same database).
    #[arg(
        long,
        env = "LOYALTY_BENCH_SCENARIOS",
        value_delimiter = ',',
        default_value = "health,balance,balance_cold,checkout,checkout_no_outbox,watch,mixed,pgbench,redeem,redeem_pgbench"
    )]
    pub scenarios: Vec<Scenario>,

    /// `watch`: WatchEvents streams (each on its own connection, with a scheduler key) that
    /// follow the merchant's events while the checkout load runs.
    #[arg(
        long,
        env = "LOYALTY_BENCH_WATCHERS",
        default_value_t = 8,
        value_parser = clap::value_parser!(u32).range(1..=256)
    )]
    pub watchers: u32,

    /// JSON lines (`--json` output) of a run of another build, e.g. the commit before the
    /// outbox: this run's closed-loop `checkout` is compared with that run's at each scale
    /// (verdict: checkout >= 0.9 x baseline).
    #[arg(long, env = "LOYALTY_BENCH_BASELINE", value_name = "JSONL")]
    pub baseline: Option<PathBuf>,

    /// Requests per second of the open-loop run of each scenario: `auto` (70 % of that
    /// scenario's closed-loop rate), `off`, or a number.
    #[arg(long, env = "LOYALTY_BENCH_OPEN_RATE", default_value = "auto")]
    pub open_rate: OpenRate,

    /// Open loop: most requests in flight at once; a request due while this many are still
    /// running is not sent and counts as an error (CLIENT_OVERLOAD).
    #[arg(
        long,
        env = "LOYALTY_BENCH_OPEN_MAX_IN_FLIGHT",
        default_value_t = 2048,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub open_max_in_flight: u32,

    /// One JSON object per line and scenario on stdout (the table then goes to stderr).
    #[arg(long, env = "LOYALTY_BENCH_JSON")]
    pub json: bool,

    /// The `loyalty` server binary; default: the one next to this executable.
    #[arg(long, env = "LOYALTY_BENCH_SERVER_BIN")]
    pub server_bin: Option<PathBuf>,

    /// pgbench; default: `pgbench` on PATH, else /usr/lib/postgresql/*/bin/pgbench.
    #[arg(long, env = "LOYALTY_BENCH_PGBENCH")]
    pub pgbench: Option<PathBuf>,

    /// Seed of the request generators (customer choice, baskets, the mixed scenario's ops).
    #[arg(long, env = "LOYALTY_BENCH_SEED", default_value_t = 42)]
    pub seed: u64,

    /// Print the pgbench script of a database ceiling (generated from the service's SQL) and
    /// exit: `checkout` (the default, scenario `pgbench`) or `redeem` (`redeem_pgbench`).
    #[arg(
        long,
        value_name = "CEILING",
        num_args = 0..=1,
        default_missing_value = "checkout"
    )]
    pub print_pgbench_script: Option<Ceiling>,

    /// Customers inserted per preload statement.
    #[arg(
        long,
        env = "LOYALTY_BENCH_PRELOAD_BATCH",
        default_value_t = 50_000,
        value_parser = clap::value_parser!(u64).range(1..=1_000_000)
    )]
    pub preload_batch: u64,
}

impl Args {
    /// The scenarios asked for, deduplicated, in run order.
    pub fn scenarios_in_order(&self) -> Vec<Scenario> {
        Scenario::RUN_ORDER
            .into_iter()
            .filter(|s| self.scenarios.contains(s))
            .collect()
    }

    /// The scales asked for, deduplicated, smallest first.
    pub fn scales(&self) -> Vec<u64> {
        let mut scales = self.customers.clone();
        scales.sort_unstable();
        scales.dedup();
        scales
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// grpc.health.v1 Check: the gRPC ceiling of this server.
    Health,
    /// GetBalance with every customer in the cache.
    Balance,
    /// GetBalance on a server without a cache (Postgres on every read).
    #[value(name = "balance_cold")]
    BalanceCold,
    /// RecordPurchase: fresh purchase ids, random customers.
    Checkout,
    /// `checkout`'s load on a server of its own with the event outbox off
    /// (`LOYALTY_EVENTS_OUTBOX=off`): what checkout costs without the outbox, same build, same
    /// database, right before `checkout`.
    #[value(name = "checkout_no_outbox")]
    CheckoutNoOutbox,
    /// `checkout`'s load while `--watchers` WatchEvents streams follow the merchant's events:
    /// events delivered per second, the delay from commit to delivery, and every
    /// purchase_recorded event received exactly once by every watcher.
    Watch,
    /// 80 % GetBalance, 20 % RecordPurchase.
    Mixed,
    /// pgbench running the statements of one RecordPurchase: the database ceiling.
    Pgbench,
    /// ReservePoints then CommitReservation of that hold (one op: both OK), random customers.
    Redeem,
    /// pgbench running the statements of one ReservePoints and its CommitReservation: the
    /// database ceiling of `redeem`.
    #[value(name = "redeem_pgbench")]
    RedeemPgbench,
}

impl Scenario {
    /// Each ceiling right before its scenario (pgbench before checkout, redeem_pgbench before
    /// redeem): the two meet the same database (size, bloat, WAL).
    pub const RUN_ORDER: [Scenario; 10] = [
        Scenario::Health,
        Scenario::Balance,
        Scenario::BalanceCold,
        Scenario::Pgbench,
        Scenario::CheckoutNoOutbox,
        Scenario::Checkout,
        Scenario::Watch,
        Scenario::RedeemPgbench,
        Scenario::Redeem,
        Scenario::Mixed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Health => "health",
            Scenario::Balance => "balance",
            Scenario::BalanceCold => "balance_cold",
            Scenario::Checkout => "checkout",
            Scenario::CheckoutNoOutbox => "checkout_no_outbox",
            Scenario::Watch => "watch",
            Scenario::Mixed => "mixed",
            Scenario::Pgbench => "pgbench",
            Scenario::Redeem => "redeem",
            Scenario::RedeemPgbench => "redeem_pgbench",
        }
    }

    /// The pgbench ceiling this scenario runs, if it is one.
    pub fn ceiling(self) -> Option<Ceiling> {
        match self {
            Scenario::Pgbench => Some(Ceiling::Checkout),
            Scenario::RedeemPgbench => Some(Ceiling::Redeem),
            _ => None,
        }
    }

    /// Spends the bench customers' points (they are topped up before).
    pub fn spends(self) -> bool {
        matches!(self, Scenario::Redeem | Scenario::RedeemPgbench)
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OpenRate {
    /// A share of the scenario's own closed-loop rate.
    Auto,
    Off,
    Fixed(f64),
}

impl OpenRate {
    /// Below capacity, so the open loop shows latency under a realistic load rather than
    /// an ever-growing queue.
    pub const AUTO_SHARE: f64 = 0.7;

    /// The open-loop rate for a scenario whose closed loop reached `closed_rps`.
    pub fn rate_for(self, closed_rps: f64) -> Option<f64> {
        match self {
            OpenRate::Off => None,
            OpenRate::Fixed(rate) => Some(rate),
            OpenRate::Auto => Some(closed_rps * Self::AUTO_SHARE).filter(|r| *r >= 1.0),
        }
    }
}

impl FromStr for OpenRate {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim() {
            "auto" => Ok(OpenRate::Auto),
            "off" | "0" => Ok(OpenRate::Off),
            number => match number.parse::<f64>() {
                Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(OpenRate::Fixed(rate)),
                _ => Err(format!(
                    "{value:?}: expected `auto`, `off` or a positive number of requests per second"
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let args = Args::try_parse_from(["loyalty-bench"]).unwrap();
        assert_eq!(args.concurrency, 32);
        assert_eq!(
            args.scenarios_in_order(),
            Scenario::RUN_ORDER.to_vec(),
            "every scenario runs by default"
        );
    }

    #[test]
    fn lists_and_rates_parse() {
        let args = Args::try_parse_from([
            "loyalty-bench",
            "--customers",
            "1000000,10000,10000",
            "--scenarios",
            "checkout,balance_cold",
            "--open-rate",
            "1500",
        ])
        .unwrap();
        assert_eq!(args.scales(), vec![10_000, 1_000_000]);
        assert_eq!(
            args.scenarios_in_order(),
            vec![Scenario::BalanceCold, Scenario::Checkout]
        );
        assert_eq!(args.open_rate, OpenRate::Fixed(1500.0));
        assert_eq!(args.watchers, 8);
        assert_eq!(args.baseline, None);
        let watch = Args::try_parse_from([
            "loyalty-bench",
            "--scenarios",
            "watch,checkout",
            "--watchers",
            "3",
            "--baseline",
            "before.jsonl",
        ])
        .unwrap();
        assert_eq!(
            watch.scenarios_in_order(),
            vec![Scenario::Checkout, Scenario::Watch],
            "watch runs right after checkout, on the same database"
        );
        assert_eq!(watch.watchers, 3);
        assert_eq!(watch.baseline, Some(PathBuf::from("before.jsonl")));
        assert!(Args::try_parse_from(["loyalty-bench", "--watchers", "0"]).is_err());
        let redeem =
            Args::try_parse_from(["loyalty-bench", "--scenarios", "redeem,redeem_pgbench"])
                .unwrap();
        assert_eq!(
            redeem.scenarios_in_order(),
            vec![Scenario::RedeemPgbench, Scenario::Redeem],
            "the ceiling runs right before its scenario"
        );
        assert!(Args::try_parse_from(["loyalty-bench", "--open-rate", "-3"]).is_err());
        assert!(Args::try_parse_from(["loyalty-bench", "--customers", "0"]).is_err());
    }

    #[test]
    fn the_script_to_print_is_chosen() {
        let parse = |argv: &[&str]| Args::try_parse_from(argv).unwrap().print_pgbench_script;
        assert_eq!(parse(&["loyalty-bench"]), None);
        assert_eq!(
            parse(&["loyalty-bench", "--print-pgbench-script"]),
            Some(Ceiling::Checkout)
        );
        assert_eq!(
            parse(&["loyalty-bench", "--print-pgbench-script", "redeem"]),
            Some(Ceiling::Redeem)
        );
        assert_eq!(
            parse(&["loyalty-bench", "--print-pgbench-script=checkout"]),
            Some(Ceiling::Checkout)
        );
        assert!(Args::try_parse_from(["loyalty-bench", "--print-pgbench-script", "x"]).is_err());
    }

    #[test]
    fn open_rate_follows_the_closed_loop() {
        assert_eq!(OpenRate::Auto.rate_for(1000.0), Some(700.0));
        assert_eq!(OpenRate::Auto.rate_for(0.5), None);
        assert_eq!(OpenRate::Off.rate_for(1000.0), None);
        assert_eq!(OpenRate::Fixed(10.0).rate_for(1000.0), Some(10.0));
    }
}

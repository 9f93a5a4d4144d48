//! The results: one row per scenario and mode, the ceiling and scale comparisons, and the
//! verdict on the issue's targets; a table for people, JSON lines (`--json`) for tools.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::args::Scenario;
use crate::cpu::CpuUse;
use crate::stats::{Summary, ratio, round3};
use crate::watch::Figures;

/// The issue's targets.
pub const BALANCE_VS_HEALTH: f64 = 0.6;
pub const CHECKOUT_VS_PGBENCH: f64 = 0.8;
pub const CHECKOUT_P99_VS_PGBENCH: f64 = 2.0;
/// Redeeming (a hold and its commit) against its own ceiling, as checkout against its.
pub const REDEEM_VS_PGBENCH: f64 = 0.8;
pub const REDEEM_P99_VS_PGBENCH: f64 = 2.0;
pub const BIG_VS_SMALL: f64 = 0.8;
pub const MAX_RSS_MB: f64 = 150.0;
/// Checkout with the outbox against checkout without it: this run's `checkout_no_outbox`
/// (the same build with `LOYALTY_EVENTS_OUTBOX=off`), or another build's run (`--baseline`).
pub const CHECKOUT_VS_BASELINE: f64 = 0.9;
/// The concurrency the targets are defined at.
pub const TARGET_CONCURRENCY: u32 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Closed,
    Open,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Closed => "closed",
            Mode::Open => "open",
        }
    }
}

/// One measurement. Serialised as one JSON line; every key is always present (null when it
/// does not apply), so consumers need no special cases.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `"run"`: tells these lines apart from the machine, scale and verdict lines.
    pub kind: &'static str,
    pub scenario: &'static str,
    pub mode: Mode,
    pub customers: u64,
    pub concurrency: u32,
    pub seconds: u64,
    pub ok: u64,
    pub errors: u64,
    pub error_codes: BTreeMap<String, u64>,
    /// Successful requests (transactions for pgbench) per second.
    pub rps: f64,
    /// Open loop: the offered rate.
    pub target_rps: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// The server's largest RSS during the run (not for pgbench).
    pub server_rss_mb: Option<f64>,
    /// CPU of the server and of this load generator, % of one core (warm-up included).
    pub server_cpu_pct: Option<f64>,
    pub client_cpu_pct: Option<f64>,
    /// The whole machine, % of all cores: near 100 means the box, not the code, is the limit.
    pub machine_cpu_pct: Option<f64>,
    /// Share of the server's balance reads answered by Redis (warm-up included); null when
    /// the scenario reads no balances or the server has no cache.
    pub cache_hit_ratio: Option<f64>,
    pub ceiling: Option<&'static str>,
    pub ceiling_rps: Option<f64>,
    pub ratio: Option<f64>,
    pub ceiling_p99_ms: Option<f64>,
    pub p99_ratio: Option<f64>,
    /// pgbench only: its own tps figure over the whole run, to cross-check ours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgbench_reported_tps: Option<f64>,
    /// `watch` only (null elsewhere): the WatchEvents streams beside the checkout load.
    pub watchers: Option<u32>,
    /// Events of any type delivered within the measured window, summed over the watchers,
    /// and per second (summed, per watcher on average, the slowest watcher's).
    pub events_delivered: Option<u64>,
    pub events_per_sec: Option<f64>,
    pub events_per_sec_per_watcher: Option<f64>,
    pub events_per_sec_min_watcher: Option<f64>,
    /// From an event's `occurred_at` (set in its writing transaction) to its arrival at a
    /// watcher, over the events that occurred within the measured window.
    pub delivery_p50_ms: Option<f64>,
    pub delivery_p99_ms: Option<f64>,
    pub delivery_max_ms: Option<f64>,
    /// (watcher, purchase) pairs of an OK checkout whose purchase_recorded event never came.
    pub events_missing: Option<u64>,
    /// Events of one purchase beyond the first, at one watcher.
    pub events_duplicated: Option<u64>,
    /// Purchases of this run that no checkout was sent for.
    pub events_unexpected: Option<u64>,
    /// Failed checkouts whose event came (they committed after all; allowed once).
    pub events_of_failed_checkouts: Option<u64>,
    /// Streams that ended with an error (each watcher then resumed from its last cursor).
    pub stream_errors: Option<BTreeMap<String, u64>>,
    /// How long after the load the last watcher had every acknowledged purchase.
    pub drain_ms: Option<f64>,
    /// The bench merchant's purchases per customer when this scale began: checkout reads each
    /// customer's purchases of the look-back, so its figures hold for this much history (the
    /// bench adds about rps x seconds purchases per checkout run and never removes any).
    pub purchases_per_customer: Option<f64>,
}

impl Row {
    pub fn new(
        scenario: Scenario,
        mode: Mode,
        customers: u64,
        concurrency: u32,
        seconds: u64,
        summary: &Summary,
    ) -> Row {
        let r = |v: Option<f64>| v.map(round3);
        Row {
            kind: "run",
            scenario: scenario.name(),
            mode,
            customers,
            concurrency,
            seconds,
            ok: summary.ok,
            errors: summary.errors,
            error_codes: summary.error_codes.clone(),
            rps: round3(summary.rps),
            target_rps: None,
            p50_ms: r(summary.p50_ms),
            p99_ms: r(summary.p99_ms),
            p999_ms: r(summary.p999_ms),
            max_ms: r(summary.max_ms),
            server_rss_mb: None,
            server_cpu_pct: None,
            client_cpu_pct: None,
            machine_cpu_pct: None,
            cache_hit_ratio: None,
            ceiling: None,
            ceiling_rps: None,
            ratio: None,
            ceiling_p99_ms: None,
            p99_ratio: None,
            pgbench_reported_tps: None,
            watchers: None,
            events_delivered: None,
            events_per_sec: None,
            events_per_sec_per_watcher: None,
            events_per_sec_min_watcher: None,
            delivery_p50_ms: None,
            delivery_p99_ms: None,
            delivery_max_ms: None,
            events_missing: None,
            events_duplicated: None,
            events_unexpected: None,
            events_of_failed_checkouts: None,
            stream_errors: None,
            drain_ms: None,
            purchases_per_customer: None,
        }
    }

    pub fn with_watch(mut self, figures: &Figures) -> Row {
        self.watchers = Some(figures.watchers);
        self.events_delivered = Some(figures.events);
        self.events_per_sec = Some(figures.events_per_sec);
        self.events_per_sec_per_watcher = Some(figures.events_per_sec_per_watcher);
        self.events_per_sec_min_watcher = Some(figures.events_per_sec_min_watcher);
        self.delivery_p50_ms = figures.delivery_p50_ms;
        self.delivery_p99_ms = figures.delivery_p99_ms;
        self.delivery_max_ms = figures.delivery_max_ms;
        let e = &figures.exactness;
        self.events_missing = Some(e.missing);
        self.events_duplicated = Some(e.duplicated);
        self.events_unexpected = Some(e.unexpected);
        self.events_of_failed_checkouts = Some(e.committed_unanswered);
        self.stream_errors = Some(figures.stream_errors.clone());
        self.drain_ms = Some(figures.drain_ms);
        self
    }

    /// `watch`: every watcher received every acknowledged purchase exactly once (`None`: not
    /// a watch row).
    pub fn watch_exact(&self) -> Option<bool> {
        Some(
            self.events_missing? == 0
                && self.events_duplicated? == 0
                && self.events_unexpected? == 0,
        )
    }

    pub fn with_rss(mut self, bytes: Option<u64>) -> Row {
        self.server_rss_mb = bytes.map(|b| round3(b as f64 / (1024.0 * 1024.0)));
        self
    }

    pub fn with_cpu(mut self, cpu: CpuUse) -> Row {
        let r = |v: Option<f64>| v.map(|v| (v * 10.0).round() / 10.0);
        self.server_cpu_pct = r(cpu.server_pct);
        self.client_cpu_pct = r(cpu.client_pct);
        self.machine_cpu_pct = r(cpu.machine_pct);
        self
    }

    pub fn with_cache_hit_ratio(mut self, ratio: Option<f64>) -> Row {
        self.cache_hit_ratio = ratio.map(round3);
        self
    }

    pub fn with_target_rps(mut self, rate: f64) -> Row {
        self.target_rps = Some(round3(rate));
        self
    }

    /// One line for the progress log.
    pub fn progress(&self) -> String {
        format!(
            "  {:<14} {:<6} {:>10.1} rps  p50 {} ms  p99 {} ms  p99.9 {} ms  errors {}{}  \
             cpu: server {}% client {}% machine {}%{}",
            self.scenario,
            self.mode.name(),
            self.rps,
            ms(self.p50_ms),
            ms(self.p99_ms),
            ms(self.p999_ms),
            self.errors,
            self.server_rss_mb
                .map(|mb| format!("  rss {mb:.1} MB"))
                .unwrap_or_default(),
            pct(self.server_cpu_pct),
            pct(self.client_cpu_pct),
            pct(self.machine_cpu_pct),
            self.cache_hit_ratio
                .map(|r| format!("  cache hits {:.1}%", r * 100.0))
                .unwrap_or_default(),
        )
    }

    /// The watch figures' progress line (`None` for other rows).
    pub fn watch_progress(&self) -> Option<String> {
        Some(format!(
            "  {:<14} {} watchers: {:.1} events/s ({:.1} per watcher, slowest {:.1})  \
             delivery p50 {} ms  p99 {} ms  max {} ms  missing {}  duplicated {}  \
             unexpected {}  stream errors {}",
            "",
            self.watchers?,
            self.events_per_sec?,
            self.events_per_sec_per_watcher?,
            self.events_per_sec_min_watcher?,
            ms(self.delivery_p50_ms),
            ms(self.delivery_p99_ms),
            ms(self.delivery_max_ms),
            self.events_missing?,
            self.events_duplicated?,
            self.events_unexpected?,
            self.stream_errors.as_ref()?.values().sum::<u64>(),
        ))
    }

    fn is(&self, scenario: &str, mode: Mode) -> bool {
        self.scenario == scenario && self.mode == mode
    }
}

fn closed<'a>(rows: &'a [Row], scenario: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.is(scenario, Mode::Closed))
}

/// Fills the ceiling comparisons of one scale's rows (closed loop only: an open loop's rate is
/// chosen, not achieved): balance (and balance_cold) against health, checkout against pgbench,
/// redeem against redeem_pgbench, watch (checkout with watchers) against checkout.
pub fn compare_with_ceilings(rows: &mut [Row]) {
    let health = closed(rows, "health").map(|r| r.rps);
    let checkout = closed(rows, "checkout").map(|r| (r.rps, r.p99_ms));
    let pgbench = |name: &str| closed(rows, name).map(|r| (r.rps, r.p99_ms));
    let (checkout_ceiling, redeem_ceiling) = (pgbench("pgbench"), pgbench("redeem_pgbench"));
    for row in rows.iter_mut().filter(|r| r.mode == Mode::Closed) {
        let database = match row.scenario {
            "checkout" => checkout_ceiling.map(|c| ("pgbench", c)),
            "redeem" => redeem_ceiling.map(|c| ("redeem_pgbench", c)),
            "watch" => checkout.map(|c| ("checkout", c)),
            _ => None,
        };
        match (row.scenario, health, database) {
            ("balance" | "balance_cold", Some(health), _) => {
                row.ceiling = Some("health");
                row.ceiling_rps = Some(health);
                row.ratio = ratio(Some(row.rps), Some(health)).map(round3);
            }
            (_, _, Some((name, (rps, p99)))) => {
                row.ceiling = Some(name);
                row.ceiling_rps = Some(rps);
                row.ratio = ratio(Some(row.rps), Some(rps)).map(round3);
                row.ceiling_p99_ms = p99;
                row.p99_ratio = ratio(row.p99_ms, p99).map(round3);
            }
            _ => {}
        }
    }
}

/// A scenario at a larger scale against the smallest one.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    /// `"scale"`.
    pub kind: &'static str,
    pub scenario: &'static str,
    pub mode: Mode,
    pub customers: u64,
    pub baseline_customers: u64,
    pub rps: f64,
    pub baseline_rps: f64,
    pub ratio: Option<f64>,
    pub p99_ms: Option<f64>,
    pub baseline_p99_ms: Option<f64>,
}

/// Every closed-loop scenario at each larger scale against the smallest scale.
pub fn compare_scales(rows: &[Row], scales: &[u64]) -> Vec<ScaleRow> {
    let Some((&small, bigger)) = scales.split_first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for &big in bigger {
        for scenario in Scenario::RUN_ORDER {
            let at = |customers: u64| {
                rows.iter()
                    .find(|r| r.customers == customers && r.is(scenario.name(), Mode::Closed))
            };
            if let (Some(base), Some(row)) = (at(small), at(big)) {
                out.push(ScaleRow {
                    kind: "scale",
                    scenario: scenario.name(),
                    mode: Mode::Closed,
                    customers: big,
                    baseline_customers: small,
                    rps: row.rps,
                    baseline_rps: base.rps,
                    ratio: ratio(Some(row.rps), Some(base.rps)).map(round3),
                    p99_ms: row.p99_ms,
                    baseline_p99_ms: base.p99_ms,
                });
            }
        }
    }
    out
}

/// One target of the issue and how this run did.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `"verdict"`.
    pub kind: &'static str,
    pub target: String,
    pub measured: String,
    /// `None`: not measured in this run.
    pub pass: Option<bool>,
}

fn check(target: String, measured: String, pass: Option<bool>) -> Check {
    Check {
        kind: "verdict",
        target,
        measured,
        pass,
    }
}

/// The closed-loop checkout of another build's run (`--baseline`), per scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    /// Where it was read from (named in the verdict).
    pub source: String,
    /// customers → (rps, concurrency) of its closed-loop checkout.
    pub checkout: BTreeMap<u64, (f64, u32)>,
}

impl Baseline {
    /// Reads the JSON lines a `--json` run printed (of this bench or of an older build of it:
    /// only the keys `kind`, `scenario`, `mode`, `customers`, `concurrency` and `rps` of its
    /// rows are read). A line that is not JSON, or a run without a closed-loop checkout, is an
    /// error that names it.
    pub fn parse(source: &str, text: &str) -> Result<Baseline, String> {
        let mut checkout = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                format!(
                    "{source}:{}: not a JSON line of `loyalty-bench --json`: {e}",
                    n + 1
                )
            })?;
            let text = |key: &str| value.get(key).and_then(|v| v.as_str());
            if text("kind") != Some("run")
                || text("scenario") != Some("checkout")
                || text("mode") != Some("closed")
            {
                continue;
            }
            let number = |key: &str| value.get(key).and_then(|v| v.as_f64());
            match (
                value.get("customers").and_then(|v| v.as_u64()),
                number("rps"),
                value.get("concurrency").and_then(|v| v.as_u64()),
            ) {
                (Some(customers), Some(rps), Some(concurrency)) => {
                    checkout.insert(customers, (rps, concurrency as u32));
                }
                _ => {
                    return Err(format!(
                        "{source}:{}: a checkout row without customers, rps or concurrency",
                        n + 1
                    ));
                }
            }
        }
        if checkout.is_empty() {
            return Err(format!(
                "{source}: no closed-loop checkout row (run the baseline with --json and the \
                 checkout scenario)"
            ));
        }
        Ok(Baseline {
            source: source.to_string(),
            checkout,
        })
    }
}

pub fn verdict(
    rows: &[Row],
    scales: &[ScaleRow],
    concurrency: u32,
    baseline: Option<&Baseline>,
) -> Vec<Check> {
    let at = if concurrency == TARGET_CONCURRENCY {
        String::new()
    } else {
        format!(" [targets are set at concurrency {TARGET_CONCURRENCY}; ran at {concurrency}]")
    };
    let mut customers: Vec<u64> = rows.iter().map(|r| r.customers).collect();
    customers.dedup();
    let mut checks = Vec::new();
    for n in customers {
        let of_scale: Vec<Row> = rows.iter().filter(|r| r.customers == n).cloned().collect();
        if let Some(balance) = closed(&of_scale, "balance") {
            checks.push(check(
                format!("balance >= {BALANCE_VS_HEALTH} x health rps @ {n} customers{at}"),
                match (balance.ratio, balance.ceiling_rps) {
                    (Some(r), Some(h)) => format!("{r:.3} ({:.0} / {h:.0} rps)", balance.rps),
                    _ => "health not measured".into(),
                },
                balance.ratio.map(|r| r >= BALANCE_VS_HEALTH),
            ));
        }
        let against_database = [
            (
                "checkout",
                "pgbench",
                CHECKOUT_VS_PGBENCH,
                CHECKOUT_P99_VS_PGBENCH,
            ),
            (
                "redeem",
                "redeem_pgbench",
                REDEEM_VS_PGBENCH,
                REDEEM_P99_VS_PGBENCH,
            ),
        ];
        for (scenario, ceiling, min_ratio, max_p99) in against_database {
            let Some(row) = closed(&of_scale, scenario) else {
                continue;
            };
            checks.push(check(
                format!("{scenario} >= {min_ratio} x {ceiling} rps @ {n} customers{at}"),
                match (row.ratio, row.ceiling_rps) {
                    (Some(r), Some(p)) => format!("{r:.3} ({:.0} / {p:.0} rps)", row.rps),
                    _ => format!("{ceiling} not measured"),
                },
                row.ratio.map(|r| r >= min_ratio),
            ));
            checks.push(check(
                format!("{scenario} p99 <= {max_p99} x {ceiling} p99 @ {n} customers{at}"),
                match (row.p99_ratio, row.p99_ms, row.ceiling_p99_ms) {
                    (Some(r), Some(c), Some(p)) => format!("{r:.3} ({c:.3} / {p:.3} ms)"),
                    _ => format!("{ceiling} not measured"),
                },
                row.p99_ratio.map(|r| r <= max_p99),
            ));
        }
        if let (Some(row), Some(without)) = (
            closed(&of_scale, "checkout"),
            closed(&of_scale, "checkout_no_outbox"),
        ) {
            let r = ratio(Some(row.rps), Some(without.rps)).map(round3);
            checks.push(check(
                format!(
                    "checkout >= {CHECKOUT_VS_BASELINE} x checkout_no_outbox rps @ {n} \
                     customers{at}"
                ),
                match r {
                    Some(r) => format!("{r:.3} ({:.0} / {:.0} rps)", row.rps, without.rps),
                    None => "checkout_no_outbox measured 0 rps".into(),
                },
                r.map(|r| r >= CHECKOUT_VS_BASELINE),
            ));
        }
        if let (Some(row), Some(baseline)) = (closed(&of_scale, "checkout"), baseline) {
            let target = format!(
                "checkout >= {CHECKOUT_VS_BASELINE} x baseline checkout rps @ {n} customers \
                 (baseline {})",
                baseline.source
            );
            checks.push(match baseline.checkout.get(&n) {
                Some(&(rps, at)) if at == row.concurrency => {
                    let r = ratio(Some(row.rps), Some(rps)).map(round3);
                    check(
                        target,
                        match r {
                            Some(r) => format!("{r:.3} ({:.0} / {rps:.0} rps)", row.rps),
                            None => "the baseline measured 0 rps".into(),
                        },
                        r.map(|r| r >= CHECKOUT_VS_BASELINE),
                    )
                }
                Some(&(_, at)) => check(
                    target,
                    format!(
                        "not comparable: the baseline ran at concurrency {at}, this run at {}",
                        row.concurrency
                    ),
                    None,
                ),
                None => check(target, format!("the baseline has no checkout at {n}"), None),
            });
        }
        if let Some(watch) = closed(&of_scale, "watch") {
            checks.push(check(
                format!(
                    "watch: each of {} watchers got every acknowledged purchase_recorded \
                     exactly once @ {n} customers",
                    watch.watchers.unwrap_or(0)
                ),
                format!(
                    "missing {}, duplicated {}, unexpected {} (every checkout of the run, \
                     warm-up included)",
                    watch.events_missing.unwrap_or(0),
                    watch.events_duplicated.unwrap_or(0),
                    watch.events_unexpected.unwrap_or(0)
                ),
                watch.watch_exact(),
            ));
        }
    }
    for scale in scales
        .iter()
        .filter(|s| s.scenario == "balance" || s.scenario == "checkout")
    {
        checks.push(check(
            format!(
                "{} @ {} >= {BIG_VS_SMALL} x {} @ {} customers",
                scale.scenario, scale.customers, scale.scenario, scale.baseline_customers
            ),
            match scale.ratio {
                Some(r) => format!("{r:.3} ({:.0} / {:.0} rps)", scale.rps, scale.baseline_rps),
                None => "no baseline".into(),
            },
            scale.ratio.map(|r| r >= BIG_VS_SMALL),
        ));
    }
    let rss = rows
        .iter()
        .filter_map(|r| r.server_rss_mb.map(|mb| (mb, r)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    checks.push(match rss {
        Some((mb, row)) => check(
            format!("server RSS <= {MAX_RSS_MB} MB"),
            format!(
                "max {mb:.1} MB ({} {} @ {} customers)",
                row.scenario,
                row.mode.name(),
                row.customers
            ),
            Some(mb <= MAX_RSS_MB),
        ),
        None => check(
            format!("server RSS <= {MAX_RSS_MB} MB"),
            "not measured".into(),
            None,
        ),
    });
    checks
}

fn pct(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

/// The table of all rows, then the error codes of the rows that had errors.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<16} {:>9} {:>5} {:>5} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>7} {:>5} {:>5} {:>5} {:<14} {:>6} {:>6}",
        "scenario",
        "mode",
        "customers",
        "conc",
        "secs",
        "ok",
        "errors",
        "rps",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "rss MB",
        "srv%",
        "cli%",
        "cpu%",
        "ceiling",
        "ratio",
        "p99 x"
    );
    for row in rows {
        let mode = match row.target_rps {
            Some(rate) => format!("open@{rate:.0}/s"),
            None => row.mode.name().to_string(),
        };
        let opt = |v: Option<f64>, decimals: usize| {
            v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
        };
        let _ = writeln!(
            out,
            "{:<14} {:<16} {:>9} {:>5} {:>5} {:>9} {:>7} {:>10.1} {:>8} {:>8} {:>8} {:>7} {:>5} {:>5} {:>5} {:<14} {:>6} {:>6}",
            row.scenario,
            mode,
            row.customers,
            row.concurrency,
            row.seconds,
            row.ok,
            row.errors,
            row.rps,
            ms(row.p50_ms),
            ms(row.p99_ms),
            ms(row.p999_ms),
            opt(row.server_rss_mb, 1),
            pct(row.server_cpu_pct),
            pct(row.client_cpu_pct),
            pct(row.machine_cpu_pct),
            row.ceiling.unwrap_or("-"),
            opt(row.ratio, 2),
            opt(row.p99_ratio, 2),
        );
    }
    for row in rows.iter().filter(|r| r.errors > 0) {
        let codes: Vec<String> = row
            .error_codes
            .iter()
            .map(|(code, n)| format!("{code}={n}"))
            .collect();
        let _ = writeln!(
            out,
            "errors of {} {} @ {}: {}",
            row.scenario,
            row.mode.name(),
            row.customers,
            codes.join(", ")
        );
    }
    out
}

pub fn scale_table(scales: &[ScaleRow]) -> String {
    let mut out = String::new();
    for s in scales {
        let _ = writeln!(
            out,
            "{:<14} @ {} vs @ {}: {:.1} / {:.1} rps = {}   p99 {} / {} ms",
            s.scenario,
            s.customers,
            s.baseline_customers,
            s.rps,
            s.baseline_rps,
            s.ratio.map_or_else(|| "-".into(), |r| format!("{r:.3}")),
            ms(s.p99_ms),
            ms(s.baseline_p99_ms),
        );
    }
    out
}

/// The `watch` rows' own figures: the delivered events, the delivery delay and the exactness.
pub fn watch_table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<9} {:>8} {:>12} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>7} {:>5} {:>5} {:>7}",
        "customers",
        "watchers",
        "checkout rps",
        "events/s",
        "per watch",
        "slowest",
        "p50 ms",
        "p99 ms",
        "max ms",
        "missing",
        "dups",
        "unexp",
        "stream!"
    );
    for row in rows.iter().filter(|r| r.watchers.is_some()) {
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        let count = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        let _ = writeln!(
            out,
            "{:<9} {:>8} {:>12.1} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>7} {:>5} {:>5} {:>7}",
            row.customers,
            row.watchers.unwrap_or(0),
            row.rps,
            opt(row.events_per_sec),
            opt(row.events_per_sec_per_watcher),
            opt(row.events_per_sec_min_watcher),
            ms(row.delivery_p50_ms),
            ms(row.delivery_p99_ms),
            ms(row.delivery_max_ms),
            count(row.events_missing),
            count(row.events_duplicated),
            count(row.events_unexpected),
            count(row.stream_errors.as_ref().map(|e| e.values().sum())),
        );
    }
    out
}

pub fn verdict_text(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let mark = match c.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a ",
        };
        let _ = writeln!(out, "{mark}  {}: {}", c.target, c.measured);
    }
    out
}

/// The machine the figures come from (they mean nothing without it).
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `"machine"`.
    pub kind: &'static str,
    pub nproc: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgres: Option<String>,
    pub pgbench: Option<String>,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            kind: "machine",
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            memory_gib: field(&meminfo, "MemTotal")
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .map_or(0.0, |kib| round3(kib / (1024.0 * 1024.0))),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            postgres: None,
            pgbench: None,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "machine: {} CPUs ({}), {:.1} GiB RAM, Linux {}; PostgreSQL {}; {}",
            self.nproc,
            self.cpu,
            self.memory_gib,
            self.kernel,
            self.postgres.as_deref().unwrap_or("?"),
            self.pgbench.as_deref().unwrap_or("pgbench not used"),
        )
    }
}

/// The value of `key: value` in a /proc text file.
fn field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// Where people's text and the JSON lines go: with `--json`, stdout carries only JSON.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    pub fn human(&self, text: &str) {
        if self.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }

    pub fn json_line(&self, value: &impl Serialize) {
        if self.json {
            match serde_json::to_string(value) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("warning: cannot encode a result as JSON: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(scenario: Scenario, mode: Mode, customers: u64, rps: f64, p99: f64) -> Row {
        let summary = Summary {
            ok: (rps * 10.0) as u64,
            rps,
            p50_ms: Some(p99 / 2.0),
            p99_ms: Some(p99),
            p999_ms: Some(p99 * 1.5),
            max_ms: Some(p99 * 2.0),
            ..Summary::default()
        };
        Row::new(scenario, mode, customers, 32, 10, &summary)
    }

    fn scale(customers: u64, balance: f64, checkout: f64) -> Vec<Row> {
        let mut rows = vec![
            row(Scenario::Health, Mode::Closed, customers, 10_000.0, 5.0),
            row(Scenario::Balance, Mode::Closed, customers, balance, 6.0),
            row(Scenario::Balance, Mode::Open, customers, balance * 0.7, 3.0)
                .with_target_rps(balance * 0.7),
            row(Scenario::Pgbench, Mode::Closed, customers, 2_000.0, 20.0),
            row(Scenario::Checkout, Mode::Closed, customers, checkout, 50.0)
                .with_rss(Some(40 * 1024 * 1024)),
            row(
                Scenario::RedeemPgbench,
                Mode::Closed,
                customers,
                1_000.0,
                30.0,
            ),
            row(Scenario::Redeem, Mode::Closed, customers, 750.0, 45.0),
            row(Scenario::Redeem, Mode::Open, customers, 525.0, 20.0).with_target_rps(525.0),
        ];
        compare_with_ceilings(&mut rows);
        rows
    }

    #[test]
    fn ceilings_are_compared_in_the_closed_loop_only() {
        let rows = scale(10_000, 7_000.0, 1_700.0);
        let balance = closed(&rows, "balance").unwrap();
        assert_eq!(
            (balance.ceiling, balance.ceiling_rps, balance.ratio),
            (Some("health"), Some(10_000.0), Some(0.7))
        );
        let open = rows.iter().find(|r| r.is("balance", Mode::Open)).unwrap();
        assert_eq!(open.ratio, None);
        let checkout = closed(&rows, "checkout").unwrap();
        assert_eq!(checkout.ratio, Some(0.85));
        assert_eq!(checkout.p99_ratio, Some(2.5));
        assert_eq!(checkout.ceiling_p99_ms, Some(20.0));
        assert_eq!(closed(&rows, "health").unwrap().ratio, None);
        // Redeeming is compared with its own ceiling, not checkout's.
        let redeem = closed(&rows, "redeem").unwrap();
        assert_eq!(
            (redeem.ceiling, redeem.ceiling_rps, redeem.ratio),
            (Some("redeem_pgbench"), Some(1_000.0), Some(0.75))
        );
        assert_eq!(redeem.p99_ratio, Some(1.5));
        let open = rows.iter().find(|r| r.is("redeem", Mode::Open)).unwrap();
        assert_eq!(open.ratio, None);
        assert_eq!(closed(&rows, "redeem_pgbench").unwrap().ratio, None);
    }

    #[test]
    fn the_verdict_applies_the_targets() {
        let mut rows = scale(10_000, 7_000.0, 1_700.0);
        rows.extend(scale(1_000_000, 5_000.0, 1_500.0));
        let scales = compare_scales(&rows, &[10_000, 1_000_000]);
        let balance = scales.iter().find(|s| s.scenario == "balance").unwrap();
        assert_eq!(balance.ratio, Some(round3(5_000.0 / 7_000.0)));
        let checks = verdict(&rows, &scales, 32, None);
        let find = |prefix: &str| {
            checks
                .iter()
                .find(|c| c.target.starts_with(prefix))
                .unwrap_or_else(|| panic!("no check {prefix}: {checks:?}"))
                .pass
        };
        assert_eq!(find("balance >= 0.6 x health rps @ 10000"), Some(true));
        assert_eq!(find("checkout >= 0.8 x pgbench rps @ 10000"), Some(true));
        assert_eq!(find("checkout p99 <= 2 x pgbench p99 @ 10000"), Some(false));
        assert_eq!(
            find("redeem >= 0.8 x redeem_pgbench rps @ 10000"),
            Some(false)
        );
        assert_eq!(
            find("redeem p99 <= 2 x redeem_pgbench p99 @ 10000"),
            Some(true)
        );
        assert_eq!(find("balance @ 1000000 >= 0.8"), Some(false));
        assert_eq!(find("checkout @ 1000000 >= 0.8"), Some(true));
        assert_eq!(find("server RSS"), Some(true));
        assert!(checks.iter().all(|c| !c.target.contains("targets are set")));
        let at_8 = verdict(&rows, &scales, 8, None);
        assert!(at_8[0].target.contains("ran at 8"));
    }

    #[test]
    fn checkout_is_judged_against_checkout_without_the_outbox_of_the_same_run() {
        let with = |without: f64| {
            let rows = vec![
                row(Scenario::Checkout, Mode::Closed, 10, 900.0, 1.0),
                row(Scenario::CheckoutNoOutbox, Mode::Closed, 10, without, 1.0),
            ];
            verdict(&rows, &[], 32, None)
                .into_iter()
                .find(|c| {
                    c.target
                        .starts_with("checkout >= 0.9 x checkout_no_outbox rps @ 10")
                })
                .map(|c| (c.pass, c.measured))
        };
        assert_eq!(
            with(1_000.0),
            Some((Some(true), "0.900 (900 / 1000 rps)".into()))
        );
        assert_eq!(with(1_001.0).unwrap().0, Some(false));
        assert_eq!(with(0.0).unwrap().0, None, "nothing to compare with");
        let alone = vec![row(Scenario::Checkout, Mode::Closed, 10, 900.0, 1.0)];
        assert!(
            verdict(&alone, &[], 32, None)
                .iter()
                .all(|c| !c.target.contains("checkout_no_outbox")),
            "no verdict without the scenario"
        );
    }

    #[test]
    fn missing_ceilings_are_not_guessed() {
        let mut rows = vec![row(Scenario::Checkout, Mode::Closed, 10, 100.0, 1.0)];
        compare_with_ceilings(&mut rows);
        assert_eq!(rows[0].ratio, None);
        let checks = verdict(&rows, &[], 32, None);
        assert!(checks.iter().all(|c| c.pass.is_none()), "{checks:?}");
    }

    #[test]
    fn json_lines_carry_the_required_keys() {
        let rows = scale(10_000, 7_000.0, 1_700.0);
        let value = serde_json::to_value(closed(&rows, "checkout").unwrap()).unwrap();
        for key in [
            "scenario",
            "concurrency",
            "seconds",
            "ok",
            "errors",
            "rps",
            "p50_ms",
            "p99_ms",
            "p999_ms",
            "server_rss_mb",
            "ceiling",
            "ceiling_rps",
            "ratio",
            "p99_ratio",
            "mode",
            "customers",
        ] {
            assert!(value.get(key).is_some(), "missing {key}: {value}");
        }
        assert_eq!(value["mode"], "closed");
        assert_eq!(value["server_rss_mb"], 40.0);
        // Every row has the same keys, nulls included.
        let health = serde_json::to_value(closed(&rows, "health").unwrap()).unwrap();
        assert!(health["ceiling"].is_null() && health.get("ratio").is_some());
    }

    fn watch_row(customers: u64, rps: f64, exactness: crate::watch::Exactness) -> Row {
        let figures = Figures {
            watchers: 8,
            events: 8 * 15_000,
            events_per_sec: 12_000.0,
            events_per_sec_per_watcher: 1_500.0,
            events_per_sec_min_watcher: 1_480.0,
            delivery_p50_ms: Some(21.0),
            delivery_p99_ms: Some(48.0),
            delivery_max_ms: Some(70.0),
            exactness,
            ..Figures::default()
        };
        row(Scenario::Watch, Mode::Closed, customers, rps, 60.0).with_watch(&figures)
    }

    #[test]
    fn watch_is_compared_with_checkout_and_judged_on_exactness() {
        let mut rows = scale(10_000, 7_000.0, 1_700.0);
        rows.push(watch_row(10_000, 1_530.0, Default::default()));
        compare_with_ceilings(&mut rows);
        let watch = closed(&rows, "watch").unwrap();
        assert_eq!(
            (watch.ceiling, watch.ratio),
            (Some("checkout"), Some(0.9)),
            "the watchers' cost on checkout"
        );
        assert_eq!(watch.watch_exact(), Some(true));
        assert_eq!(closed(&rows, "checkout").unwrap().watch_exact(), None);
        let value = serde_json::to_value(watch).unwrap();
        assert_eq!(value["events_per_sec"], 12_000.0);
        assert_eq!(value["delivery_p99_ms"], 48.0);
        assert_eq!(value["events_missing"], 0);
        let checkout = serde_json::to_value(closed(&rows, "checkout").unwrap()).unwrap();
        assert!(checkout["watchers"].is_null() && checkout.get("delivery_p99_ms").is_some());
        let checks = verdict(&rows, &[], 32, None);
        let exact = checks
            .iter()
            .find(|c| c.target.starts_with("watch: each of 8 watchers"))
            .unwrap();
        assert_eq!(exact.pass, Some(true));
        assert!(watch.watch_progress().unwrap().contains("12000.0 events/s"));
        assert!(watch_table(&rows).contains("12000.0"));

        let lost = crate::watch::Exactness {
            missing: 3,
            ..Default::default()
        };
        let rows = vec![watch_row(10, 100.0, lost)];
        let checks = verdict(&rows, &[], 32, None);
        assert_eq!(checks[0].pass, Some(false), "{checks:?}");
        assert!(checks[0].measured.contains("missing 3"));
    }

    #[test]
    fn a_baseline_run_is_read_and_compared() {
        let text = [
            r#"{"kind":"machine","nproc":2}"#,
            r#"{"kind":"run","scenario":"pgbench","mode":"closed","customers":10000,"concurrency":32,"rps":4000.0}"#,
            r#"{"kind":"run","scenario":"checkout","mode":"open","customers":10000,"concurrency":32,"rps":1400.0}"#,
            r#"{"kind":"run","scenario":"checkout","mode":"closed","customers":10000,"concurrency":32,"rps":2000.0}"#,
            "",
            r#"{"kind":"run","scenario":"checkout","mode":"closed","customers":1000000,"concurrency":16,"rps":1900.0}"#,
            r#"{"kind":"verdict","target":"x","measured":"y","pass":true}"#,
        ]
        .join("\n");
        let baseline = Baseline::parse("before.jsonl", &text).unwrap();
        assert_eq!(
            baseline.checkout.get(&10_000),
            Some(&(2000.0, 32)),
            "the closed loop, not the open one"
        );
        let mut rows = scale(10_000, 7_000.0, 1_700.0);
        rows.extend(scale(1_000_000, 5_000.0, 1_900.0));
        rows.extend(scale(50, 5_000.0, 1_900.0));
        let checks = verdict(&rows, &[], 32, Some(&baseline));
        let against: Vec<&Check> = checks
            .iter()
            .filter(|c| c.target.contains("x baseline checkout"))
            .collect();
        assert_eq!(against.len(), 3, "{checks:?}");
        assert_eq!(against[0].pass, Some(false), "1700 / 2000 = 0.85 < 0.9");
        assert!(against[0].measured.starts_with("0.850"));
        assert!(against[0].target.contains("before.jsonl"));
        assert_eq!(against[1].pass, None, "other concurrency: not comparable");
        assert!(against[1].measured.contains("concurrency 16"));
        assert_eq!(against[2].pass, None, "no baseline at that scale");
        assert!(
            verdict(&rows, &[], 32, None)
                .iter()
                .all(|c| !c.target.contains("baseline")),
            "no baseline, no check"
        );

        assert!(
            Baseline::parse("b", "warming the cache...")
                .unwrap_err()
                .contains("b:1")
        );
        assert!(
            Baseline::parse(
                "b",
                r#"{"kind":"run","scenario":"balance","mode":"closed"}"#
            )
            .unwrap_err()
            .contains("no closed-loop checkout")
        );
        assert!(
            Baseline::parse(
                "b",
                r#"{"kind":"run","scenario":"checkout","mode":"closed"}"#
            )
            .is_err()
        );
    }

    #[test]
    fn proc_fields_are_read() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n";
        assert_eq!(
            field(cpuinfo, "model name").as_deref(),
            Some("AMD EPYC 7B13")
        );
        assert_eq!(field(cpuinfo, "cache size"), None);
    }
}

//! One benchmark run: per scale, the bench merchant, fresh keys, the servers and every
//! scenario; then the comparisons, the report and the clean-up.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use loyalty::Store;

use crate::args::{Args, Scenario};
use crate::cpu::{self, CpuMeter};
use crate::load::{self, PurchaseLog, Target, WORKERS_PER_CHANNEL, Window, Workload};
use crate::pgbench::{self, PgbenchRun};
use crate::report::{self, Baseline, Machine, Mode, Output, Row};
use crate::servers::{self, CacheReads, RssSampler, Server, ServerSettings};
use crate::setup::{self, BenchMerchant, Keys};
use crate::watch::{self, WallWindow, Watchers};
use crate::{cache, stats};

/// Machine CPU use, with the bench idle, above which the figures cannot be trusted.
const BACKGROUND_BUSY_WARNING_PCT: f64 = 15.0;

/// Everything the scenarios of a run share.
struct Bench {
    args: Args,
    store: Store,
    server_bin: Option<PathBuf>,
    pgbench_bin: Option<PathBuf>,
    /// Unique per run: in Redis key prefixes, purchase ids and the work directory.
    run_id: String,
    redis_prefix: String,
    /// Server logs, the pgbench script, its logs and output.
    dir: PathBuf,
    window: Window,
    /// API keys of this run, revoked in the clean-up (also after an error or Ctrl-C).
    issued_keys: Mutex<Vec<Keys>>,
    /// Scenarios whose correctness check failed (a watcher missed or repeated an event): the
    /// run reports everything, then fails.
    failed_checks: Mutex<Vec<String>>,
}

pub async fn run(args: Args) -> Result<()> {
    if let Some(ceiling) = args.print_pgbench_script {
        print!("{}", ceiling.script()?);
        return Ok(());
    }
    let out = Output { json: args.json };
    let baseline = match &args.baseline {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the baseline {}", path.display()))?;
            Some(Baseline::parse(&path.display().to_string(), &text).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    let scenarios = args.scenarios_in_order();
    let grpc = scenarios.iter().any(|s| s.ceiling().is_none());
    let server_bin = if grpc {
        Some(servers::locate_server(args.server_bin.clone())?)
    } else {
        None
    };
    let pgbench_bin = if scenarios.iter().any(|s| s.ceiling().is_some()) {
        Some(pgbench::locate(args.pgbench.clone())?)
    } else {
        None
    };
    let store = setup::prepare_database(&args.database_url).await?;

    let mut machine = Machine::detect();
    machine.postgres = setup::server_version(&store).await.ok();
    if let Some(bin) = &pgbench_bin {
        machine.pgbench = Some(version_of(bin).await);
    }
    out.human(&machine.describe());
    out.json_line(&machine);

    // Two pools of `concurrency` (a server and pgbench, or two servers) must fit.
    let (max_connections, used) = setup::connection_budget(&store).await?;
    let needed = 2 * i64::from(args.concurrency) + 10;
    if max_connections - used < needed {
        eprintln!(
            "warning: PostgreSQL allows {max_connections} connections, {used} are in use, and \
             this run may need {needed}; expect UNAVAILABLE errors"
        );
    }

    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let run_id = format!("{}-{started}", std::process::id());
    let dir = std::env::temp_dir().join(format!("loyalty-bench-{run_id}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bench = Bench {
        window: Window {
            warmup: Duration::from_secs(args.warmup_seconds),
            measure: Duration::from_secs(args.seconds),
        },
        redis_prefix: format!("bench-{run_id}"),
        args,
        store,
        server_bin,
        pgbench_bin,
        run_id,
        dir,
        issued_keys: Mutex::new(Vec::new()),
        failed_checks: Mutex::new(Vec::new()),
    };
    eprintln!(
        "run {}: {} s + {} s warm-up per scenario and mode, concurrency {}, files in {}",
        bench.run_id,
        bench.args.seconds,
        bench.args.warmup_seconds,
        bench.args.concurrency,
        bench.dir.display()
    );

    let scales = bench.args.scales();
    let mut rows = Vec::new();
    let mut failure = None;
    let measure_all = async {
        for &customers in &scales {
            if let Err(e) = bench.scale(customers, &scenarios, &mut rows).await {
                failure = Some(e.context(format!("benchmark at {customers} customers")));
                break;
            }
        }
    };
    // Ctrl-C stops the measuring (dropping it kills the servers and pgbench), but the
    // clean-up and the report of what was measured still happen.
    tokio::select! {
        () = measure_all => {}
        _ = tokio::signal::ctrl_c() => failure = Some(anyhow::anyhow!("interrupted")),
    }
    bench.clean_up(grpc).await;

    // Whatever was measured is reported, even after a failure. Rows come grouped by scale.
    for scale_rows in rows.chunk_by_mut(|a, b| a.customers == b.customers) {
        report::compare_with_ceilings(scale_rows);
    }
    let scale_rows = report::compare_scales(&rows, &scales);
    let checks = report::verdict(
        &rows,
        &scale_rows,
        bench.args.concurrency,
        baseline.as_ref(),
    );
    for row in &rows {
        out.json_line(row);
    }
    for row in &scale_rows {
        out.json_line(row);
    }
    for check in &checks {
        out.json_line(check);
    }
    if !rows.is_empty() {
        out.human(&format!("\n{}", report::table(&rows)));
        if !scale_rows.is_empty() {
            out.human(&format!(
                "scale comparison (closed loop):\n{}",
                report::scale_table(&scale_rows)
            ));
        }
        if rows.iter().any(|r| r.watchers.is_some()) {
            out.human(&format!(
                "watch (closed-loop checkout with WatchEvents streams beside it):\n{}",
                report::watch_table(&rows)
            ));
        }
        out.human(&format!("verdict:\n{}", report::verdict_text(&checks)));
    }
    let failed_checks = std::mem::take(
        &mut *bench
            .failed_checks
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    match failure {
        Some(e) => Err(e),
        None if !failed_checks.is_empty() => Err(anyhow::anyhow!(failed_checks.join("; "))),
        None => Ok(()),
    }
}

/// Most redeem ops (pairs) per second that this bench could drive on any machine it runs on,
/// for sizing the top-up: far above what two transactions per op allow.
const MAX_REDEEM_OPS_PER_SEC: u64 = 20_000;

/// Points every customer must hold before the redeem scenarios of a scale: twice the mean
/// that its three runs (the ceiling, the closed and the open loop) could spend at
/// `MAX_REDEEM_OPS_PER_SEC`, plus a margin, so that no customer runs dry even at random.
fn redeem_floor(customers: u64, window: Window) -> i64 {
    let seconds = (window.warmup + window.measure).as_secs().max(1);
    let spent = MAX_REDEEM_OPS_PER_SEC * seconds * 3 * load::REDEEM_POINTS as u64;
    (2 * spent.div_ceil(customers.max(1)) + 100) as i64
}

/// The server's cache hit ratio since `before` (the proof that `balance` was warm).
async fn hit_ratio(server: &Server, before: Option<CacheReads>) -> Option<f64> {
    let after = CacheReads::scrape(server.metrics).await?;
    after.hit_ratio_since(&before?)
}

/// `pgbench --version`, for the machine line.
async fn version_of(bin: &std::path::Path) -> String {
    match tokio::process::Command::new(bin)
        .arg("--version")
        .output()
        .await
    {
        Ok(output) => String::from_utf8_lossy(&output.stdout).trim().to_string(),
        Err(_) => bin.display().to_string(),
    }
}

impl Bench {
    /// Every scenario at one scale; rows are pushed as they are measured, so an interrupted
    /// run still reports them.
    async fn scale(
        &self,
        customers: u64,
        scenarios: &[Scenario],
        rows: &mut Vec<Row>,
    ) -> Result<()> {
        eprintln!("== {customers} customers ==");
        let merchant =
            setup::bench_merchant(&self.store, customers, self.args.preload_batch).await?;
        if merchant.preloaded > 0 {
            eprintln!(
                "preloaded {} customers into merchant bench-{customers} (id {}) in {:.1} s",
                merchant.preloaded,
                merchant.id,
                merchant.preload_time.as_secs_f64()
            );
        } else {
            eprintln!(
                "reusing merchant bench-{customers} (id {}), preloaded earlier",
                merchant.id
            );
        }
        if scenarios.iter().any(|s| s.spends()) {
            let floor = redeem_floor(customers, self.window);
            let started = std::time::Instant::now();
            let topped = setup::top_up(&self.store, merchant.id, floor, &self.run_id).await?;
            if topped.customers > 0 {
                eprintln!(
                    "topped up {} customers with {} points (an ADJUST entry and lot each) to \
                     at least {floor} available for the redeem scenarios ({:.1} s)",
                    topped.customers,
                    topped.points,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        setup::vacuum(&self.store).await?;
        if let Some(busy) = cpu::background_busy_pct(Duration::from_secs(1)).await
            && busy > BACKGROUND_BUSY_WARNING_PCT
        {
            eprintln!(
                "WARNING: the machine is {busy:.0}% busy before the bench sends anything (other \
                 processes, autovacuum, a checkpoint?); the figures of this scale will be skewed"
            );
        }
        let history = setup::purchases_per_customer(&self.store, &merchant).await?;
        eprintln!(
            "history: {history:.1} purchases per customer (checkout reads those of the look-back)"
        );
        let keys = setup::create_keys(&self.store, merchant.id).await?;
        self.issued_keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(keys.clone());
        let first = rows.len();
        let measured = self.scenarios(&merchant, &keys, scenarios, rows).await;
        for row in &mut rows[first..] {
            row.purchases_per_customer = Some(crate::stats::round3(history));
        }
        measured
    }

    fn settings(&self) -> Result<ServerSettings> {
        Ok(ServerSettings {
            binary: self.server_bin.clone().context("no server binary")?,
            database_url: self.args.database_url.clone(),
            redis_prefix: self.redis_prefix.clone(),
            db_max_connections: self.args.concurrency,
            max_in_flight: self.args.open_max_in_flight + self.args.concurrency + 64,
            log_dir: self.dir.clone(),
        })
    }

    fn redis_url(&self) -> Option<&str> {
        Some(self.args.redis_url.as_str()).filter(|u| !u.trim().is_empty())
    }

    async fn scenarios(
        &self,
        merchant: &BenchMerchant,
        keys: &Keys,
        scenarios: &[Scenario],
        rows: &mut Vec<Row>,
    ) -> Result<()> {
        let n = merchant.customers;
        let needs_cached = scenarios.iter().any(|s| {
            matches!(
                s,
                Scenario::Health
                    | Scenario::Balance
                    | Scenario::Checkout
                    | Scenario::CheckoutNoOutbox
                    | Scenario::Watch
                    | Scenario::Redeem
                    | Scenario::Mixed
            )
        });
        let cached = if needs_cached {
            let settings = self.settings()?;
            Some(Server::start(&settings, &format!("cached-{n}"), self.redis_url()).await?)
        } else {
            None
        };
        let mut warm = false;
        for &scenario in scenarios {
            match scenario {
                Scenario::Pgbench | Scenario::RedeemPgbench => {
                    rows.push(self.pgbench(scenario, merchant).await?);
                    // The next scenario measures the service, not the ceiling's dead rows.
                    setup::vacuum(&self.store).await?;
                }
                Scenario::BalanceCold => {
                    // Its own server without a cache, stopped right after, so its pool does
                    // not count against pgbench's connections.
                    let settings = self.settings()?;
                    let server = Server::start(&settings, &format!("uncached-{n}"), None).await?;
                    let measured = self.measure(&server, scenario, merchant, keys, rows).await;
                    server.stop().await;
                    measured?;
                }
                Scenario::CheckoutNoOutbox => {
                    // Its own server with the outbox off, on the same database and Redis,
                    // stopped right after (the cached server idles meanwhile, as it does
                    // while `checkout` runs). Vacuumed after, as after a ceiling, so that
                    // `checkout` meets the same database.
                    let settings = self.settings()?;
                    let server = Server::start_with(
                        &settings,
                        &format!("no-outbox-{n}"),
                        self.redis_url(),
                        &[("LOYALTY_EVENTS_OUTBOX", "off")],
                    )
                    .await?;
                    let measured = self.measure(&server, scenario, merchant, keys, rows).await;
                    server.stop().await;
                    measured?;
                    setup::vacuum(&self.store).await?;
                }
                Scenario::Watch => {
                    let server = cached
                        .as_ref()
                        .context("the cached server is not running")?;
                    rows.push(self.watch(server, merchant, keys).await?);
                }
                _ => {
                    let server = cached
                        .as_ref()
                        .context("the cached server is not running")?;
                    if matches!(scenario, Scenario::Balance | Scenario::Mixed) && !warm {
                        self.warm_cache(merchant).await?;
                        warm = true;
                    }
                    self.measure(server, scenario, merchant, keys, rows).await?;
                }
            }
        }
        if let Some(server) = cached {
            server.stop().await;
        }
        Ok(())
    }

    async fn warm_cache(&self, merchant: &BenchMerchant) -> Result<()> {
        let Some(url) = self.redis_url() else {
            eprintln!("warning: no --redis-url: `balance` runs without a cache");
            return Ok(());
        };
        let warmed = cache::warm(&self.store, url, &self.redis_prefix, merchant.id).await?;
        eprintln!(
            "warmed the cache with {} customers in {:.2} s{}",
            warmed.stored,
            warmed.took.as_secs_f64(),
            if warmed.failed > 0 {
                format!(
                    " ({} writes FAILED: balance will partly read Postgres)",
                    warmed.failed
                )
            } else {
                String::new()
            }
        );
        Ok(())
    }

    /// The closed loop of a scenario, then its open loop at the chosen rate; pushes a row
    /// for each.
    async fn measure(
        &self,
        server: &Server,
        scenario: Scenario,
        merchant: &BenchMerchant,
        keys: &Keys,
        rows: &mut Vec<Row>,
    ) -> Result<()> {
        let args = &self.args;
        let workload = Workload::of(scenario).context("not a gRPC scenario")?;
        let concurrency = args.concurrency as usize;
        let channels = concurrency.div_ceil(WORKERS_PER_CHANNEL);
        let target = Arc::new(
            Target::connect(&server.endpoint(), channels, keys, merchant.customers).await?,
        );
        let tag = format!("b{}-{}-{scenario}", self.run_id, merchant.customers);
        let row = |mode, recorder: &stats::Recorder| {
            Row::new(
                scenario,
                mode,
                merchant.customers,
                args.concurrency,
                args.seconds,
                &recorder.summary(self.window.measure.as_secs_f64()),
            )
        };

        let sampler = RssSampler::start(server.metrics);
        let cpu = CpuMeter::start(server.pid, true);
        let reads = CacheReads::scrape(server.metrics).await;
        let recorder = load::closed_loop(
            target.clone(),
            &workload,
            concurrency,
            self.window,
            args.seed,
            &tag,
        )
        .await?;
        let closed = row(Mode::Closed, &recorder)
            .with_cpu(cpu.finish())
            .with_cache_hit_ratio(hit_ratio(server, reads).await)
            .with_rss(sampler.finish().await);
        eprintln!("{}", closed.progress());
        let open_rate = args.open_rate.rate_for(closed.rps);
        rows.push(closed);

        if let Some(rate) = open_rate {
            let sampler = RssSampler::start(server.metrics);
            let cpu = CpuMeter::start(server.pid, true);
            let reads = CacheReads::scrape(server.metrics).await;
            let recorder = load::open_loop(
                target.clone(),
                &workload,
                rate,
                self.window,
                args.open_max_in_flight,
                args.seed,
                &tag,
            )
            .await?;
            let open = row(Mode::Open, &recorder)
                .with_cpu(cpu.finish())
                .with_cache_hit_ratio(hit_ratio(server, reads).await)
                .with_rss(sampler.finish().await)
                .with_target_rps(rate);
            eprintln!("{}", open.progress());
            rows.push(open);
        }
        Ok(())
    }

    /// `watch`: checkout's closed loop (same workers, same requests) while `--watchers`
    /// WatchEvents streams follow the merchant's events from the stream's end before the load.
    /// After the load, the watchers get up to `watch::DRAIN_LIMIT` to receive every
    /// acknowledged purchase; a purchase missing or repeated at any watcher fails the run (after
    /// the report). Closed loop only: the open loop adds nothing the delivery delay does not show.
    async fn watch(&self, server: &Server, merchant: &BenchMerchant, keys: &Keys) -> Result<Row> {
        let args = &self.args;
        let scenario = Scenario::Watch;
        let workload = Workload::of(scenario).context("watch runs checkout's load")?;
        let concurrency = args.concurrency as usize;
        let log = Arc::new(Mutex::new(PurchaseLog::default()));
        let target = Arc::new(
            Target::connect(
                &server.endpoint(),
                concurrency.div_ceil(WORKERS_PER_CHANNEL),
                keys,
                merchant.customers,
            )
            .await?
            .with_purchase_log(log.clone()),
        );
        let tag = format!("b{}-{}-{scenario}", self.run_id, merchant.customers);
        let cursor = setup::stream_end(&self.store, merchant.id).await?;
        let now = SystemTime::now();
        let window = WallWindow {
            from: now + self.window.warmup,
            until: now + self.window.warmup + self.window.measure,
        };
        let watchers = Watchers::start(
            &server.endpoint(),
            &keys.scheduler,
            args.watchers,
            cursor,
            format!("{tag}-"),
            window,
        )
        .await?;
        let sampler = RssSampler::start(server.metrics);
        let cpu = CpuMeter::start(server.pid, true);
        let recorder =
            load::closed_loop(target, &workload, concurrency, self.window, args.seed, &tag).await?;
        let cpu = cpu.finish();
        let rss = sampler.finish().await;
        let log = std::mem::take(&mut *log.lock().unwrap_or_else(|e| e.into_inner()));
        let (tallies, drained) = watchers.finish(log.ok.len()).await?;
        let figures = watch::Figures::of(&log, &tallies, &window, drained);
        let row = Row::new(
            scenario,
            Mode::Closed,
            merchant.customers,
            args.concurrency,
            args.seconds,
            &recorder.summary(self.window.measure.as_secs_f64()),
        )
        .with_cpu(cpu)
        .with_rss(rss)
        .with_watch(&figures);
        eprintln!("{}", row.progress());
        if let Some(line) = row.watch_progress() {
            eprintln!("{line}");
        }
        if !figures.exactness.exact() {
            let e = &figures.exactness;
            let message = format!(
                "watch @ {} customers: the watchers did not get every acknowledged purchase \
                 exactly once ({} of {} checkouts OK; missing {}, duplicated {}, unexpected {})",
                merchant.customers,
                log.ok.len(),
                log.ok.len() + log.failed.len(),
                e.missing,
                e.duplicated,
                e.unexpected
            );
            eprintln!("FAILED: {message}");
            self.failed_checks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(message);
        }
        Ok(row)
    }

    async fn pgbench(&self, scenario: Scenario, merchant: &BenchMerchant) -> Result<Row> {
        let binary = self.pgbench_bin.as_deref().context("pgbench not located")?;
        let ceiling = scenario.ceiling().context("not a pgbench scenario")?;
        // pgbench's own CPU is not this process's: only the machine's share is known.
        let cpu = CpuMeter::start(None, false);
        let outcome = PgbenchRun {
            ceiling,
            binary,
            database_url: &self.args.database_url,
            merchant: merchant.id,
            customers: merchant.customers,
            concurrency: self.args.concurrency,
            window: self.window,
            dir: &self.dir,
        }
        .run()
        .await?;
        let mut row = Row::new(
            scenario,
            Mode::Closed,
            merchant.customers,
            self.args.concurrency,
            self.args.seconds,
            &outcome.recorder.summary(self.window.measure.as_secs_f64()),
        );
        row = row.with_cpu(cpu.finish());
        row.pgbench_reported_tps = outcome.reported_tps.map(stats::round3);
        eprintln!("{}", row.progress());
        if let Some(failed) = outcome.reported_failed.filter(|f| *f > 0) {
            eprintln!("  pgbench reports {failed} failed transactions over its whole run");
        }
        Ok(row)
    }

    /// Revokes this run's API keys and removes its cache keys (the data in Postgres stays
    /// for the next run).
    async fn clean_up(&self, grpc: bool) {
        let issued =
            std::mem::take(&mut *self.issued_keys.lock().unwrap_or_else(|e| e.into_inner()));
        for keys in &issued {
            setup::revoke_keys(&self.store, keys).await;
        }
        if let (true, Some(url)) = (grpc, self.redis_url()) {
            match cache::clean(url, &self.redis_prefix).await {
                Ok(n) => eprintln!("removed {n} cache keys of this run"),
                Err(e) => eprintln!(
                    "warning: could not remove the cache keys {}:*: {e:#}",
                    self.redis_prefix
                ),
            }
        }
        self.store.close().await;
    }
}

//! Latency recording (HDR histograms in microseconds) and the arithmetic of the report.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency the histograms resolve: one hour, in microseconds. Larger values are
/// clamped, not dropped.
const MAX_MICROS: u64 = 3_600_000_000;

/// Outcomes of one measurement: latencies of the successful requests, and errors by code.
#[derive(Debug, Clone)]
pub struct Recorder {
    latencies: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            // Three significant digits: 0.1 % resolution at any magnitude.
            latencies: Histogram::new_with_bounds(1, MAX_MICROS, 3)
                .expect("static histogram bounds are valid"),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    pub fn ok(&mut self, latency: Duration) {
        self.ok_micros(latency.as_micros().min(u128::from(MAX_MICROS)) as u64);
    }

    pub fn ok_micros(&mut self, micros: u64) {
        self.ok += 1;
        self.latencies.saturating_record(micros.max(1));
    }

    pub fn error(&mut self, code: &str) {
        self.error_n(code, 1);
    }

    pub fn error_n(&mut self, code: &str, count: u64) {
        if count > 0 {
            *self.errors.entry(code.to_string()).or_default() += count;
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.ok += other.ok;
        // Same bounds on both sides, so adding cannot fail; clamp defensively anyway.
        if self.latencies.add(&other.latencies).is_err() {
            for v in other.latencies.iter_recorded() {
                self.latencies
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        for (code, count) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += count;
        }
    }

    /// The latency at `quantile` (0..=1) in milliseconds; `None` without any sample.
    pub fn quantile_ms(&self, quantile: f64) -> Option<f64> {
        (!self.latencies.is_empty())
            .then(|| self.latencies.value_at_quantile(quantile) as f64 / 1000.0)
    }

    pub fn max_ms(&self) -> Option<f64> {
        (!self.latencies.is_empty()).then(|| self.latencies.max() as f64 / 1000.0)
    }

    /// The figures of the report for a measurement window of `seconds`.
    pub fn summary(&self, seconds: f64) -> Summary {
        Summary {
            ok: self.ok,
            errors: self.error_count(),
            error_codes: self.errors.clone(),
            rps: rate(self.ok, seconds),
            p50_ms: self.quantile_ms(0.50),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
            max_ms: self.max_ms(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub ok: u64,
    pub errors: u64,
    pub error_codes: BTreeMap<String, u64>,
    /// Successful requests per second: failures are not throughput.
    pub rps: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// `count` per second over `seconds`; 0 for an empty window.
pub fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// `value / reference`, when both are known and the reference is positive.
pub fn ratio(value: Option<f64>, reference: Option<f64>) -> Option<f64> {
    match (value, reference) {
        (Some(v), Some(r)) if r > 0.0 && v.is_finite() && r.is_finite() => Some(v / r),
        _ => None,
    }
}

/// Rounds for display and JSON (the measurement noise is far above 0.001).
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut r = Recorder::new();
        for micros in 1..=10_000u64 {
            r.ok_micros(micros);
        }
        let p50 = r.quantile_ms(0.5).unwrap();
        let p99 = r.quantile_ms(0.99).unwrap();
        let p999 = r.quantile_ms(0.999).unwrap();
        // 3 significant digits: within 0.1 % of the exact order statistics.
        assert!((p50 - 5.0).abs() <= 0.01, "{p50}");
        assert!((p99 - 9.9).abs() <= 0.01, "{p99}");
        assert!((p999 - 9.99).abs() <= 0.01, "{p999}");
        assert!((r.max_ms().unwrap() - 10.0).abs() <= 0.01);
    }

    #[test]
    fn merging_keeps_counts_and_errors() {
        let mut a = Recorder::new();
        a.ok(Duration::from_millis(2));
        a.error("UNAVAILABLE");
        let mut b = Recorder::new();
        b.ok(Duration::from_millis(4));
        b.error("UNAVAILABLE");
        b.error_n("CLIENT_OVERLOAD", 3);
        b.error_n("NOTHING", 0);
        a.merge(&b);
        let s = a.summary(2.0);
        assert_eq!(s.ok, 2);
        assert_eq!(s.errors, 5);
        assert_eq!(s.error_codes.get("UNAVAILABLE"), Some(&2));
        assert!(!s.error_codes.contains_key("NOTHING"));
        assert_eq!(s.rps, 1.0);
        assert!((s.max_ms.unwrap() - 4.0).abs() < 0.01);
    }

    #[test]
    fn an_empty_recorder_has_no_latencies() {
        let s = Recorder::new().summary(10.0);
        assert_eq!((s.ok, s.rps, s.p99_ms), (0, 0.0, None));
    }

    #[test]
    fn huge_latencies_are_clamped_not_lost() {
        let mut r = Recorder::new();
        r.ok(Duration::from_secs(10 * 3600));
        assert_eq!(r.ok, 1);
        assert!(r.max_ms().unwrap() >= 3_590_000.0);
    }

    #[test]
    fn ratios_need_a_positive_reference() {
        assert_eq!(ratio(Some(6.0), Some(10.0)), Some(0.6));
        assert_eq!(ratio(Some(6.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
        assert_eq!(rate(30, 10.0), 3.0);
        assert_eq!(rate(30, 0.0), 0.0);
        assert_eq!(round3(0.123456), 0.123);
    }
}

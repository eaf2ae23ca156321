//! Latency percentiles and CDFs.

use serde::Serialize;

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// CDF points `(latency ms, fraction at or below)`, for plots.
    pub cdf: Vec<(f64, f64)>,
}

/// The value at quantile `q` (nearest rank) of sorted samples.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Latency {
    /// Summarises latencies given in nanoseconds.
    pub fn from_ns(mut samples: Vec<u64>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let ms = |ns: u64| ns as f64 / 1e6;
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        // CDF: 100 evenly spaced quantiles, then the tail in finer steps.
        let mut qs: Vec<f64> = (1..=100).map(|i| f64::from(i) / 100.0).collect();
        qs.extend([0.991, 0.993, 0.995, 0.997, 0.998, 0.999, 0.9995, 0.9999]);
        qs.sort_by(f64::total_cmp);
        let cdf = qs
            .into_iter()
            .map(|q| (ms(quantile(&samples, q)), q))
            .collect();
        Latency {
            count: samples.len() as u64,
            p50_ms: ms(quantile(&samples, 0.50)),
            p90_ms: ms(quantile(&samples, 0.90)),
            p99_ms: ms(quantile(&samples, 0.99)),
            p999_ms: ms(quantile(&samples, 0.999)),
            max_ms: ms(*samples.last().unwrap_or(&0)),
            mean_ms: sum as f64 / samples.len() as f64 / 1e6,
            cdf,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&v, 0.5), 500);
        assert_eq!(quantile(&v, 0.99), 990);
        assert_eq!(quantile(&v, 0.999), 999);
        assert_eq!(quantile(&v, 1.0), 1000);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn summary_in_ms() {
        let l = Latency::from_ns((1..=1000).map(|i| i * 1_000_000).collect());
        assert_eq!(l.count, 1000);
        assert_eq!(l.p50_ms, 500.0);
        assert_eq!(l.p999_ms, 999.0);
        assert_eq!(l.max_ms, 1000.0);
        assert!((l.mean_ms - 500.5).abs() < 1e-9);
        assert_eq!(l.cdf.last().unwrap().1, 1.0);
    }
}

//! Summary statistics of measured samples: percentiles (nearest rank) and medians.
//!
//! Nearest-rank percentiles are used because they always return a value that was actually
//! measured, which keeps p99 honest on small sample counts.

use serde::{Deserialize, Serialize};

/// The `p`-th percentile (0..=100) of `samples` by nearest rank; `None` when empty.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.saturating_sub(1).min(v.len() - 1)])
}

/// The median (50th percentile by nearest rank).
pub fn median(samples: &[f64]) -> Option<f64> {
    percentile(samples, 50.0)
}

pub fn mean(samples: &[f64]) -> Option<f64> {
    (!samples.is_empty()).then(|| samples.iter().sum::<f64>() / samples.len() as f64)
}

/// Latency summary in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Latency {
    /// Summarise samples given in microseconds; `None` without samples.
    pub fn from_us(samples: &[f64]) -> Option<Self> {
        Some(Latency {
            samples: samples.len(),
            p50_us: percentile(samples, 50.0)?,
            p99_us: percentile(samples, 99.0)?,
            max_us: percentile(samples, 100.0)?,
        })
    }
}

/// Median and range of a few repeated measurements of one thing (e.g. a mode's connection rate
/// over interleaved rounds): the median is what targets are judged on, the range shows how much
/// a single run could have said otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    /// `None` without samples. The median of an even count is the mean of the middle two
    /// (unlike [`median`], which is nearest rank): with 4-6 rounds, picking the lower middle
    /// would bias every figure downwards.
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let k = v.len();
        let median = if k % 2 == 1 {
            v[k / 2]
        } else {
            (v[k / 2 - 1] + v[k / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[k - 1],
            n: k,
        })
    }
}

/// `a / b`, or `None` when either is missing or `b` is zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        // Order of input does not matter.
        let rev: Vec<f64> = v.iter().rev().copied().collect();
        assert_eq!(percentile(&rev, 99.0), Some(99.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
        // p99 of few samples is the maximum, never an interpolated value.
        assert_eq!(percentile(&[1.0, 2.0, 10.0], 99.0), Some(10.0));
    }

    #[test]
    fn latency_summary_and_ratio() {
        let l = Latency::from_us(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!(
            (l.samples, l.p50_us, l.p99_us, l.max_us),
            (5, 3.0, 5.0, 5.0)
        );
        assert!(Latency::from_us(&[]).is_none());
        assert_eq!(mean(&[1.0, 2.0, 6.0]), Some(3.0));
        assert_eq!(ratio(Some(6.0), Some(3.0)), Some(2.0));
        assert_eq!(ratio(Some(6.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
    }

    #[test]
    fn spread_is_median_and_range() {
        let s = Spread::of(&[12.0, 10.0, 11.0, 30.0, 9.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (11.0, 9.0, 30.0, 5));
        // An outlier moves the range, not the median.
        let even = Spread::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(even.median, 2.5);
        assert!(Spread::of(&[]).is_none());
    }
}

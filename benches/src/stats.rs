//! Latency samples and their summary (percentiles by nearest rank, in microseconds).

use std::time::Duration;

use serde::Serialize;

/// Percentiles of a set of latency samples, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub count: usize,
    pub mean_us: f64,
    pub min_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Collected latency samples, stored as nanoseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<u64>);

impl Samples {
    pub fn with_capacity(n: usize) -> Self {
        Samples(Vec::with_capacity(n))
    }

    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_nanos().min(u64::MAX as u128) as u64);
    }

    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sorts the samples and summarizes them.
    pub fn summary(mut self) -> Summary {
        let v = &mut self.0;
        if v.is_empty() {
            return Summary::default();
        }
        v.sort_unstable();
        let us = |ns: u64| ns as f64 / 1_000.0;
        let at = |q: f64| {
            let rank = (q * v.len() as f64).ceil() as usize;
            us(v[rank.clamp(1, v.len()) - 1])
        };
        let sum: u128 = v.iter().map(|&x| x as u128).sum();
        Summary {
            count: v.len(),
            mean_us: sum as f64 / v.len() as f64 / 1_000.0,
            min_us: us(v[0]),
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: us(v[v.len() - 1]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut s = Samples::default();
        for i in 1..=1000u64 {
            s.push(Duration::from_micros(i));
        }
        let m = s.summary();
        assert_eq!(m.count, 1000);
        assert_eq!(m.p50_us, 500.0);
        assert_eq!(m.p99_us, 990.0);
        assert_eq!(m.p999_us, 999.0);
        assert_eq!(m.max_us, 1000.0);
        assert_eq!(Samples::default().summary().count, 0);
    }
}

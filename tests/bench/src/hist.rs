//! A latency histogram with bounded memory: exact below 64 ns, then 64
//! buckets per power of two (under 1.6 % error), so a client can record
//! every request of a long run in a few kilobytes.

/// Sub-buckets per power of two, as a bit count.
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Groups: one exact group (0..64) plus one per exponent 6..=63.
const BUCKETS: usize = SUB * (64 - SUB_BITS as usize + 1);

#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros();
    let shift = exp - SUB_BITS;
    let sub = ((v >> shift) as usize) & (SUB - 1);
    (exp - SUB_BITS + 1) as usize * SUB + sub
}

/// The smallest value that lands in bucket `i`, and the bucket's width.
fn bounds(i: usize) -> (u64, u64) {
    let group = i / SUB;
    let sub = (i % SUB) as u64;
    if group == 0 {
        return (sub, 1);
    }
    let shift = group as u32 - 1;
    ((SUB as u64 + sub) << shift, 1u64 << shift)
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            sum: 0,
            max: 0,
        }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0..=1): the middle of the bucket holding the
    /// q-th sample, capped at the largest value seen. 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, width) = bounds(i);
                let mid = lo as f64 + (width as f64 - 1.0) / 2.0;
                return mid.min(self.max as f64);
            }
        }
        self.max as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for v in (0..5000u64).chain([u64::MAX / 3, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS, "{v} -> {i}");
            assert!(i >= last || v > 5000, "index not monotonic at {v}");
            last = i;
            let (lo, w) = bounds(i);
            assert!(lo <= v && v - lo < w, "{v} outside bucket {i} = {lo}+{w}");
        }
    }

    #[test]
    fn quantiles_within_two_percent() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (q, want) in [
            (0.5, 50_000_000.0),
            (0.99, 99_000_000.0),
            (1.0, 100_000_000.0),
        ] {
            let got = h.quantile(q);
            assert!((got - want).abs() / want < 0.02, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.count(), 100_000);
        assert!((h.mean() - 50_000_500.0).abs() < 1.0);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        a.record(10);
        b.record(1_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert!((a.quantile(1.0) - 1_000_000.0).abs() < 20_000.0);
        assert_eq!(a.quantile(0.5), 10.0);
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(Histogram::new().quantile(0.5), 0.0);
        assert_eq!(Histogram::new().mean(), 0.0);
    }
}

//! Streaming weighted sums: fold client updates into a float64 accumulator as they arrive.
//!
//! An [`Accumulator`] holds `sum_k w_k x_k` in `f64` for one stream of `dim` values, plus the
//! total weight. Inputs are added one at a time, in the order the caller adds them; each
//! element's sum is therefore taken in that order, whatever the thread count (threads split
//! the elements, never the inputs), and the result is bitwise reproducible. Only the division
//! by the total weight happens at the end (`mean`), so a round needs memory for one
//! accumulator, not for every update.
//!
//! An input is checked for non-finite values before anything is added, so a rejected input
//! leaves the accumulator as it was.

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::error::{Error, Result};

/// Elements per work item.
pub const CHUNK: usize = 1 << 14;
/// Below this many elements (or with one thread) a call runs in the calling thread: handing
/// work to a pool costs more than adding a small vector.
pub const PARALLEL_MIN: usize = 1 << 18;

fn serial(pool: &ThreadPool, len: usize) -> bool {
    pool.current_num_threads() == 1 || len < PARALLEL_MIN
}

/// `sum_k w_k x_k` and `sum_k w_k` of the inputs added so far.
#[derive(Clone, Debug)]
pub struct Accumulator {
    sum: Vec<f64>,
    weight: f64,
    count: usize,
}

fn check_weight(weight: f64, position: usize) -> Result<()> {
    if weight.is_nan() || weight.is_infinite() || weight < 0.0 {
        return Err(Error::InvalidWeights(format!(
            "input {position} has weight {weight}; weights must be finite and >= 0"
        )));
    }
    Ok(())
}

/// The first non-finite value of `x`, as `(index, value)`.
pub fn first_non_finite(x: &[f32], pool: &ThreadPool) -> Option<(usize, f32)> {
    if serial(pool, x.len()) {
        return x.iter().position(|v| !v.is_finite()).map(|i| (i, x[i]));
    }
    pool.install(|| {
        x.par_chunks(CHUNK)
            .enumerate()
            .filter_map(|(c, part)| {
                part.iter()
                    .position(|v| !v.is_finite())
                    .map(|j| (c * CHUNK + j, part[j]))
            })
            .min_by_key(|&(i, _)| i)
    })
}

impl Accumulator {
    /// An empty accumulator for inputs of `dim` values.
    pub fn new(dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(Error::InvalidArgument(
                "an accumulator needs at least one element".into(),
            ));
        }
        Ok(Self {
            sum: vec![0.0; dim],
            weight: 0.0,
            count: 0,
        })
    }

    /// Elements per input.
    pub fn dim(&self) -> usize {
        self.sum.len()
    }

    /// Sum of the weights added so far.
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// Number of inputs added so far (including those of weight zero).
    pub fn count(&self) -> usize {
        self.count
    }

    /// The running `sum_k w_k x_k`.
    pub fn sum(&self) -> &[f64] {
        &self.sum
    }

    /// Forget every input.
    pub fn reset(&mut self) {
        self.sum.iter_mut().for_each(|v| *v = 0.0);
        self.weight = 0.0;
        self.count = 0;
    }

    /// Add `weight * x`. A NaN or infinite value in `x` (or a bad weight) is an error and
    /// changes nothing; `Error::NonFinite::slot` is the input's position (`count()`).
    pub fn add(&mut self, x: &[f32], weight: f64, pool: &ThreadPool) -> Result<()> {
        let position = self.count;
        if x.len() != self.sum.len() {
            return Err(Error::Length {
                what: "the input",
                got: x.len(),
                expected: self.sum.len(),
            });
        }
        check_weight(weight, position)?;
        if let Some((index, value)) = first_non_finite(x, pool) {
            return Err(Error::NonFinite {
                slot: position,
                index,
                value,
            });
        }
        if weight != 0.0 && serial(pool, x.len()) {
            for (a, &v) in self.sum.iter_mut().zip(x) {
                *a += weight * f64::from(v);
            }
        } else if weight != 0.0 {
            pool.install(|| {
                self.sum
                    .par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK))
                    .for_each(|(acc, part)| {
                        for (a, &v) in acc.iter_mut().zip(part) {
                            *a += weight * f64::from(v);
                        }
                    });
            });
        }
        self.weight += weight;
        self.count += 1;
        Ok(())
    }

    /// Add another accumulator's sums (its inputs come after this one's).
    pub fn merge(&mut self, other: &Accumulator, pool: &ThreadPool) -> Result<()> {
        if other.sum.len() != self.sum.len() {
            return Err(Error::Length {
                what: "the other accumulator",
                got: other.sum.len(),
                expected: self.sum.len(),
            });
        }
        pool.install(|| {
            self.sum
                .par_chunks_mut(CHUNK)
                .zip(other.sum.par_chunks(CHUNK))
                .for_each(|(acc, part)| {
                    for (a, &v) in acc.iter_mut().zip(part) {
                        *a += v;
                    }
                });
        });
        self.weight += other.weight;
        self.count += other.count;
        Ok(())
    }

    /// Write `f32(sum / weight)` into `out`.
    pub fn mean_into(&self, out: &mut [f32], pool: &ThreadPool) -> Result<()> {
        if self.weight <= 0.0 {
            return Err(Error::InvalidWeights(format!(
                "the mean of {} input(s) is undefined: their weights sum to zero",
                self.count
            )));
        }
        let w = self.weight;
        self.write(out, pool, |s| s / w)
    }

    /// Write `f32(sum)` into `out`.
    pub fn sum_into(&self, out: &mut [f32], pool: &ThreadPool) -> Result<()> {
        self.write(out, pool, |s| s)
    }

    fn write(
        &self,
        out: &mut [f32],
        pool: &ThreadPool,
        f: impl Fn(f64) -> f64 + Sync,
    ) -> Result<()> {
        if out.len() != self.sum.len() {
            return Err(Error::Length {
                what: "out",
                got: out.len(),
                expected: self.sum.len(),
            });
        }
        if serial(pool, out.len()) {
            let mut first = None;
            for (j, (dst, &v)) in out.iter_mut().zip(&self.sum).enumerate() {
                let r = f(v) as f32;
                if first.is_none() && !r.is_finite() {
                    first = Some(j);
                }
                *dst = r;
            }
            return match first {
                None => Ok(()),
                Some(index) => Err(Error::InvalidArgument(format!(
                    "the accumulated value at parameter index {index} overflows float32"
                ))),
            };
        }
        let bad = pool.install(|| {
            out.par_chunks_mut(CHUNK)
                .zip(self.sum.par_chunks(CHUNK))
                .enumerate()
                .filter_map(|(c, (o, s))| {
                    let mut first = None;
                    for (j, (dst, &v)) in o.iter_mut().zip(s).enumerate() {
                        let r = f(v) as f32;
                        if first.is_none() && !r.is_finite() {
                            first = Some(c * CHUNK + j);
                        }
                        *dst = r;
                    }
                    first
                })
                .min()
        });
        match bad {
            None => Ok(()),
            Some(index) => Err(Error::InvalidArgument(format!(
                "the accumulated value at parameter index {index} overflows float32"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::pool;
    use crate::test_data::data;
    use proptest::prelude::*;

    #[test]
    fn mean_matches_an_ordered_f64_reference() {
        let xs = data(5, 40_000, 3);
        let w = [1.0, 2.0, 0.5, 0.0, 3.0];
        let p = pool(2).unwrap();
        let mut acc = Accumulator::new(40_000).unwrap();
        for (x, &wk) in xs.iter().zip(&w) {
            acc.add(x, wk, &p).unwrap();
        }
        assert_eq!(acc.count(), 5);
        assert_eq!(acc.weight(), 6.5);
        let mut out = vec![0f32; 40_000];
        acc.mean_into(&mut out, &p).unwrap();
        for j in 0..40_000 {
            let mut s = 0f64;
            for k in 0..5 {
                s += w[k] * f64::from(xs[k][j]);
            }
            assert_eq!(out[j].to_bits(), ((s / 6.5) as f32).to_bits());
        }
    }

    #[test]
    fn a_rejected_input_changes_nothing() {
        let xs = data(2, 50_000, 4);
        let p = pool(2).unwrap();
        let mut acc = Accumulator::new(50_000).unwrap();
        acc.add(&xs[0], 1.0, &p).unwrap();
        let before = acc.sum().to_vec();
        let mut bad = xs[1].clone();
        bad[45_000] = f32::NAN;
        bad[47_000] = f32::INFINITY;
        let err = acc.add(&bad, 1.0, &p).unwrap_err();
        assert!(matches!(
            err,
            Error::NonFinite {
                slot: 1,
                index: 45_000,
                ..
            }
        ));
        for w in [f64::NAN, -1.0, f64::INFINITY] {
            assert!(matches!(
                acc.add(&xs[1], w, &p),
                Err(Error::InvalidWeights(_))
            ));
        }
        assert!(matches!(
            acc.add(&xs[1][..10], 1.0, &p),
            Err(Error::Length { .. })
        ));
        assert_eq!(acc.sum(), before.as_slice());
        assert_eq!(acc.count(), 1);
    }

    #[test]
    fn zero_total_weight_has_no_mean() {
        let p = pool(1).unwrap();
        let mut acc = Accumulator::new(3).unwrap();
        acc.add(&[1.0, 2.0, 3.0], 0.0, &p).unwrap();
        let mut out = [0f32; 3];
        assert!(matches!(
            acc.mean_into(&mut out, &p),
            Err(Error::InvalidWeights(_))
        ));
        acc.sum_into(&mut out, &p).unwrap();
        assert_eq!(out, [0.0, 0.0, 0.0]);
        assert!(Accumulator::new(0).is_err());
    }

    #[test]
    fn merge_is_adding_in_sequence() {
        let xs = data(4, 1000, 5);
        let p = pool(1).unwrap();
        let mut a = Accumulator::new(1000).unwrap();
        let mut b = Accumulator::new(1000).unwrap();
        a.add(&xs[0], 1.0, &p).unwrap();
        b.add(&xs[1], 2.0, &p).unwrap();
        a.merge(&b, &p).unwrap();
        assert_eq!(a.count(), 2);
        assert_eq!(a.weight(), 3.0);
        for ((&s, &x0), &x1) in a.sum().iter().zip(&xs[0]).zip(&xs[1]) {
            let r = f64::from(x0) + 2.0 * f64::from(x1);
            assert_eq!(s.to_bits(), r.to_bits());
        }
    }

    #[test]
    fn large_inputs_give_the_same_bits_on_any_thread_count() {
        let n = 2 * PARALLEL_MIN + 12_345;
        let xs = data(3, n, 9);
        let mut base: Option<Vec<u32>> = None;
        for threads in [1, 2, 3, 8] {
            let p = pool(threads).unwrap();
            let mut acc = Accumulator::new(n).unwrap();
            for (i, x) in xs.iter().enumerate() {
                acc.add(x, 0.5 + i as f64, &p).unwrap();
            }
            let mut bad = xs[0].clone();
            bad[n - 7] = f32::NAN;
            assert!(matches!(
                acc.add(&bad, 1.0, &p),
                Err(Error::NonFinite { index, .. }) if index == n - 7
            ));
            let mut out = vec![0f32; n];
            acc.mean_into(&mut out, &p).unwrap();
            let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            match &base {
                None => base = Some(bits),
                Some(b) => assert_eq!(b, &bits),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn thread_count_does_not_change_bits(k in 1usize..6, n in 1usize..70_000, seed in any::<u64>()) {
            let xs = data(k, n, seed);
            let mut base: Option<Vec<u32>> = None;
            for threads in [1, 2, 3, 8] {
                let p = pool(threads).unwrap();
                let mut acc = Accumulator::new(n).unwrap();
                for (i, x) in xs.iter().enumerate() {
                    acc.add(x, 1.0 + i as f64 * 0.25, &p).unwrap();
                }
                let mut out = vec![0f32; n];
                acc.mean_into(&mut out, &p).unwrap();
                let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                match &base {
                    None => base = Some(bits),
                    Some(b) => prop_assert_eq!(b, &bits),
                }
            }
        }
    }
}

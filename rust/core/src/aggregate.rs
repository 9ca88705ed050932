//! Deterministic aggregation kernels over equally long `f32` vectors.
//!
//! Work is cut into fixed-size pieces whose boundaries do not depend on the thread count, and
//! every reduction adds in a fixed order in `f64`; the result is therefore bitwise identical
//! for any number of threads. Elementwise kernels (`weighted_mean`, `median`, `trimmed_mean`)
//! combine the inputs of one element in input order; reductions (`norms`,
//! `pairwise_sq_dists`) sum fixed blocks sequentially, then the block partials in block order.

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::error::{Error, Result};

/// Elements per work item of the elementwise kernels.
pub const CHUNK: usize = 4096;
/// Elements per partial sum of the reductions.
pub const BLOCK: usize = 16384;

fn check_inputs(what: &'static str, inputs: &[&[f32]], dim: Option<usize>) -> Result<usize> {
    let first = inputs.first().ok_or(Error::EmptySlots { what })?;
    let n = dim.unwrap_or(first.len());
    for x in inputs {
        if x.len() != n {
            return Err(Error::Length {
                what: "an input",
                got: x.len(),
                expected: n,
            });
        }
    }
    Ok(n)
}

/// Validate weights and return them normalised to sum to one.
pub fn normalized_weights(weights: &[f64], count: usize) -> Result<Vec<f64>> {
    if weights.len() != count {
        return Err(Error::InvalidWeights(format!(
            "got {} weights for {count} slots; pass one weight per slot",
            weights.len()
        )));
    }
    for (i, &w) in weights.iter().enumerate() {
        if w.is_nan() {
            return Err(Error::InvalidWeights(format!("weight {i} is NaN")));
        }
        if w < 0.0 {
            return Err(Error::InvalidWeights(format!(
                "weight {i} is negative ({w})"
            )));
        }
        if w.is_infinite() {
            return Err(Error::InvalidWeights(format!("weight {i} is infinite")));
        }
    }
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return Err(Error::InvalidWeights(
            "the weights sum to zero; at least one slot needs a positive weight".into(),
        ));
    }
    if !total.is_finite() {
        return Err(Error::InvalidWeights("the weights' sum overflows".into()));
    }
    Ok(weights.iter().map(|w| w / total).collect())
}

fn first_non_finite(inputs: &[&[f32]], start: usize, len: usize, skip: &[bool]) -> Option<Error> {
    for (k, x) in inputs.iter().enumerate() {
        if skip.get(k).copied().unwrap_or(false) {
            continue;
        }
        if let Some(j) = x[start..start + len].iter().position(|v| !v.is_finite()) {
            return Some(Error::NonFinite {
                slot: k,
                index: start + j,
                value: x[start + j],
            });
        }
    }
    None
}

/// `out = sum_k w_k x_k / sum_k w_k` (FedAvg). Inputs with weight zero are skipped.
///
/// `Error::NonFinite::slot` is the position of the offending input in `inputs`.
pub fn weighted_mean(
    inputs: &[&[f32]],
    weights: &[f64],
    out: &mut [f32],
    pool: &ThreadPool,
) -> Result<()> {
    let n = check_inputs("weighted_mean", inputs, Some(out.len()))?;
    let w = normalized_weights(weights, inputs.len())?;
    let skip: Vec<bool> = w.iter().map(|&v| v == 0.0).collect();
    let active: Vec<(&[f32], f64)> = inputs
        .iter()
        .zip(&w)
        .filter(|(_, &wk)| wk != 0.0)
        .map(|(x, &wk)| (*x, wk))
        .collect();
    pool.install(|| {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .try_for_each(|(c, o)| {
                let start = c * CHUNK;
                let len = o.len();
                let mut acc = [0f64; CHUNK];
                let acc = &mut acc[..len];
                // Four inputs per pass keep the accumulator in a register; the additions
                // still happen one input at a time, in input order.
                let mut groups = active.chunks_exact(4);
                for g in &mut groups {
                    let (x0, x1, x2, x3) = (
                        &g[0].0[start..start + len],
                        &g[1].0[start..start + len],
                        &g[2].0[start..start + len],
                        &g[3].0[start..start + len],
                    );
                    let (w0, w1, w2, w3) = (g[0].1, g[1].1, g[2].1, g[3].1);
                    for j in 0..len {
                        let mut a = acc[j];
                        a += w0 * f64::from(x0[j]);
                        a += w1 * f64::from(x1[j]);
                        a += w2 * f64::from(x2[j]);
                        a += w3 * f64::from(x3[j]);
                        acc[j] = a;
                    }
                }
                for &(x, wk) in groups.remainder() {
                    for (a, &v) in acc.iter_mut().zip(&x[start..start + len]) {
                        *a += wk * f64::from(v);
                    }
                }
                let mut bad = false;
                for (dst, &a) in o.iter_mut().zip(acc.iter()) {
                    let v = a as f32;
                    bad |= !v.is_finite();
                    *dst = v;
                }
                if bad {
                    return Err(
                        first_non_finite(inputs, start, len, &skip).unwrap_or_else(|| {
                            Error::InvalidArgument(format!(
                                "the weighted mean overflows float32 near parameter index {start}"
                            ))
                        }),
                    );
                }
                Ok(())
            })
    })?;
    debug_assert_eq!(n, out.len());
    Ok(())
}

/// Gather chunk `[start, start+len)` of all inputs, transposed: `t[j * K + k] = x_k[start + j]`.
fn gather(inputs: &[&[f32]], start: usize, len: usize, t: &mut Vec<f32>) -> Result<()> {
    let k_count = inputs.len();
    t.clear();
    t.resize(len * k_count, 0.0);
    for (k, x) in inputs.iter().enumerate() {
        for (j, &v) in x[start..start + len].iter().enumerate() {
            t[j * k_count + k] = v;
        }
    }
    if t.iter().any(|v| !v.is_finite()) {
        return Err(first_non_finite(inputs, start, len, &[])
            .unwrap_or_else(|| Error::InvalidArgument("non-finite value in the inputs".into())));
    }
    Ok(())
}

const ORDER_CHUNK: usize = 1024;

/// Coordinate-wise median; for an even count, the mean of the two middle values.
pub fn median(inputs: &[&[f32]], out: &mut [f32], pool: &ThreadPool) -> Result<()> {
    check_inputs("median", inputs, Some(out.len()))?;
    let k_count = inputs.len();
    let mid = k_count / 2;
    pool.install(|| {
        out.par_chunks_mut(ORDER_CHUNK)
            .enumerate()
            .try_for_each_init(Vec::new, |t, (c, o)| {
                let start = c * ORDER_CHUNK;
                gather(inputs, start, o.len(), t)?;
                for (j, dst) in o.iter_mut().enumerate() {
                    let v = &mut t[j * k_count..(j + 1) * k_count];
                    let (lower, m, _) = v.select_nth_unstable_by(mid, f32::total_cmp);
                    let hi = *m;
                    *dst = if k_count % 2 == 1 {
                        hi
                    } else {
                        let lo = lower.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        ((f64::from(lo) + f64::from(hi)) / 2.0) as f32
                    };
                }
                Ok(())
            })
    })
}

/// Coordinate-wise trimmed mean: drop the `floor(beta * K)` smallest and largest values of
/// each coordinate and average the rest (as `scipy.stats.trim_mean`).
pub fn trimmed_mean(
    inputs: &[&[f32]],
    out: &mut [f32],
    beta: f64,
    pool: &ThreadPool,
) -> Result<()> {
    check_inputs("trimmed_mean", inputs, Some(out.len()))?;
    let k_count = inputs.len();
    if !(0.0..0.5).contains(&beta) {
        return Err(Error::InvalidArgument(format!(
            "beta={beta} is out of range: use 0 <= beta < 0.5"
        )));
    }
    let cut = (beta * k_count as f64).floor() as usize;
    let kept = k_count - 2 * cut;
    if kept == 0 {
        return Err(Error::InvalidArgument(format!(
            "beta={beta} trims all {k_count} values; lower beta"
        )));
    }
    pool.install(|| {
        out.par_chunks_mut(ORDER_CHUNK)
            .enumerate()
            .try_for_each_init(Vec::new, |t, (c, o)| {
                let start = c * ORDER_CHUNK;
                gather(inputs, start, o.len(), t)?;
                for (j, dst) in o.iter_mut().enumerate() {
                    let v = &mut t[j * k_count..(j + 1) * k_count];
                    // Two selections instead of a sort: the `cut` smallest values end up
                    // before `cut`, the `cut` largest after `cut + kept`; the middle is
                    // summed in the (deterministic) order the selections leave it.
                    if cut > 0 {
                        v.select_nth_unstable_by(cut - 1, f32::total_cmp);
                        v[cut..].select_nth_unstable_by(kept, f32::total_cmp);
                    }
                    let s: f64 = v[cut..cut + kept].iter().map(|&x| f64::from(x)).sum();
                    *dst = (s / kept as f64) as f32;
                }
                Ok(())
            })
    })
}

#[inline]
fn sum_sq(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            let v = f64::from(c[l]);
            acc[l] += v * v;
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        let v = f64::from(v);
        acc[l] += v * v;
    }
    acc.iter().sum()
}

#[inline]
fn sum_sq_diff(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            let d = f64::from(x[l]) - f64::from(y[l]);
            acc[l] += d * d;
        }
    }
    for (l, (&x, &y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        let d = f64::from(x) - f64::from(y);
        acc[l] += d * d;
    }
    acc.iter().sum()
}

/// L2 norm of every input (in `f64`).
pub fn norms(inputs: &[&[f32]], pool: &ThreadPool) -> Result<Vec<f64>> {
    let n = check_inputs("norms", inputs, None)?;
    let blocks = n.div_ceil(BLOCK).max(1);
    let partials: Vec<f64> = pool.install(|| {
        (0..inputs.len() * blocks)
            .into_par_iter()
            .map(|item| {
                let (k, b) = (item / blocks, item % blocks);
                let end = ((b + 1) * BLOCK).min(n);
                sum_sq(&inputs[k][b * BLOCK..end])
            })
            .collect()
    });
    Ok(partials
        .chunks(blocks)
        .map(|p| p.iter().sum::<f64>().sqrt())
        .collect())
}

/// Squared Euclidean distances between all pairs of inputs, as a row-major `K x K` matrix
/// (symmetric, zero diagonal), for Krum and friends.
pub fn pairwise_sq_dists(inputs: &[&[f32]], pool: &ThreadPool) -> Result<Vec<f64>> {
    let n = check_inputs("pairwise_sq_dists", inputs, None)?;
    let k_count = inputs.len();
    let pairs: Vec<(usize, usize)> = (0..k_count)
        .flat_map(|i| (i + 1..k_count).map(move |j| (i, j)))
        .collect();
    let blocks = n.div_ceil(BLOCK).max(1);
    let partials: Vec<Vec<f64>> = pool.install(|| {
        (0..blocks)
            .into_par_iter()
            .map(|b| {
                let (s, e) = (b * BLOCK, ((b + 1) * BLOCK).min(n));
                pairs
                    .iter()
                    .map(|&(i, j)| sum_sq_diff(&inputs[i][s..e], &inputs[j][s..e]))
                    .collect()
            })
            .collect()
    });
    let mut out = vec![0f64; k_count * k_count];
    for (p, &(i, j)) in pairs.iter().enumerate() {
        let d: f64 = partials.iter().map(|block| block[p]).sum();
        out[i * k_count + j] = d;
        out[j * k_count + i] = d;
    }
    Ok(out)
}

/// Squared Euclidean distances from each input to `point`, for the geometric median's
/// Weiszfeld iterations; summed in float64 over fixed blocks, so the bits do not depend on
/// the thread count.
pub fn sq_dists_to(inputs: &[&[f32]], point: &[f32], pool: &ThreadPool) -> Result<Vec<f64>> {
    let n = check_inputs("sq_dists_to", inputs, Some(point.len()))?;
    let blocks = n.div_ceil(BLOCK).max(1);
    let partials: Vec<f64> = pool.install(|| {
        (0..inputs.len() * blocks)
            .into_par_iter()
            .map(|item| {
                let (k, b) = (item / blocks, item % blocks);
                let (s, e) = (b * BLOCK, ((b + 1) * BLOCK).min(n));
                sum_sq_diff(&inputs[k][s..e], &point[s..e])
            })
            .collect()
    });
    Ok(partials
        .chunks(blocks)
        .map(|p| p.iter().sum::<f64>())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::pool;
    use crate::test_data::data;
    use proptest::prelude::*;

    #[test]
    fn weighted_mean_matches_f64_reference() {
        let xs = data(5, 10_000, 1);
        let views: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
        let w = [1.0, 2.0, 0.5, 0.0, 3.0];
        let mut out = vec![0f32; 10_000];
        weighted_mean(&views, &w, &mut out, &pool(2).unwrap()).unwrap();
        let total: f64 = w.iter().sum();
        for j in 0..10_000 {
            let r: f64 = (0..5).map(|k| w[k] * f64::from(xs[k][j])).sum::<f64>() / total;
            assert!((f64::from(out[j]) - r).abs() <= 1e-6 * r.abs().max(1e-6));
        }
    }

    #[test]
    fn bad_weights() {
        let xs = data(2, 4, 1);
        let v: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
        let mut out = vec![0f32; 4];
        let p = pool(1).unwrap();
        for w in [[f64::NAN, 1.0], [-1.0, 1.0], [0.0, 0.0]] {
            assert!(matches!(
                weighted_mean(&v, &w, &mut out, &p),
                Err(Error::InvalidWeights(_))
            ));
        }
        assert!(weighted_mean(&v, &[1.0], &mut out, &p).is_err());
        assert!(matches!(
            weighted_mean(&[], &[], &mut out, &p),
            Err(Error::EmptySlots { .. })
        ));
    }

    #[test]
    fn nan_input_is_named() {
        let mut xs = data(3, 9000, 2);
        xs[2][8000] = f32::NAN;
        let v: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
        let mut out = vec![0f32; 9000];
        let err = weighted_mean(&v, &[1.0, 1.0, 1.0], &mut out, &pool(2).unwrap()).unwrap_err();
        assert!(matches!(
            err,
            Error::NonFinite {
                slot: 2,
                index: 8000,
                ..
            }
        ));
        assert!(matches!(
            median(&v, &mut out, &pool(2).unwrap()),
            Err(Error::NonFinite { slot: 2, .. })
        ));
    }

    #[test]
    fn median_and_trimmed_mean_small() {
        let xs: Vec<Vec<f32>> = vec![vec![1.0], vec![5.0], vec![3.0], vec![100.0]];
        let v: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
        let p = pool(1).unwrap();
        let mut out = vec![0f32; 1];
        median(&v, &mut out, &p).unwrap();
        assert_eq!(out[0], 4.0);
        trimmed_mean(&v, &mut out, 0.25, &p).unwrap();
        assert_eq!(out[0], 4.0);
        trimmed_mean(&v, &mut out, 0.0, &p).unwrap();
        assert_eq!(out[0], 27.25);
        assert!(trimmed_mean(&v, &mut out, 0.5, &p).is_err());
    }

    #[test]
    fn reductions_small() {
        let xs: Vec<Vec<f32>> = vec![vec![3.0, 4.0], vec![0.0, 0.0], vec![3.0, 0.0]];
        let v: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
        let p = pool(1).unwrap();
        assert_eq!(norms(&v, &p).unwrap(), vec![5.0, 0.0, 3.0]);
        let d = pairwise_sq_dists(&v, &p).unwrap();
        assert_eq!(d, vec![0.0, 25.0, 16.0, 25.0, 0.0, 9.0, 16.0, 9.0, 0.0]);
        assert_eq!(
            sq_dists_to(&v, &[3.0, 0.0], &p).unwrap(),
            vec![16.0, 9.0, 0.0]
        );
        assert!(sq_dists_to(&v, &[3.0], &p).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn thread_count_does_not_change_bits(k in 1usize..7, n in 1usize..40_000, seed in any::<u64>()) {
            let xs = data(k, n, seed);
            let v: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
            let w: Vec<f64> = (0..k).map(|i| 1.0 + i as f64 * 0.37).collect();
            let mut base = None;
            for threads in [1, 2, 3, 8] {
                let p = pool(threads).unwrap();
                let mut a = vec![0f32; n];
                weighted_mean(&v, &w, &mut a, &p).unwrap();
                let mut m = vec![0f32; n];
                median(&v, &mut m, &p).unwrap();
                let r = (a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                         m.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                         norms(&v, &p).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                         pairwise_sq_dists(&v, &p).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                         sq_dists_to(&v, v[0], &p).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                match &base {
                    None => base = Some(r),
                    Some(b) => prop_assert_eq!(b, &r),
                }
            }
        }
    }
}

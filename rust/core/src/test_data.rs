//! Random test vectors for the kernels' unit tests.

/// `k` vectors of `n` values in `[-1, 1)`, drawn from the stream `(seed, 0, 0, 0)`.
pub fn data(k: usize, n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut s = crate::rng::Stream::for_client(seed, 0, 0, 0);
    (0..k)
        .map(|_| (0..n).map(|_| (s.next_f64() * 2.0 - 1.0) as f32).collect())
        .collect()
}

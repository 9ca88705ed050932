//! A Philox4x64-10 stream whose output is bit-identical to numpy's `Philox` bit generator.
//!
//! numpy increments the 256-bit counter *before* each block and hands out the block's four
//! words in order; 32-bit draws split one 64-bit word (low half first) and keep the high
//! half for the next 32-bit draw. This module reproduces that state machine exactly, and the
//! derived draws (`random`, `integers`, `permutation`) use numpy's `Generator` algorithms so
//! they match it bit for bit as well.

use std::collections::HashMap;

use super::philox::philox4x64_10;

const BUFFER_SIZE: usize = 4;

/// A double in [0, 1) from the top 53 bits of `word` (numpy's conversion).
#[inline(always)]
fn unit_f64(word: u64) -> f64 {
    (word >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
}

/// Build a vector of `n` values by filling it 256 at a time (no zero-filling pass over `n`).
fn collect_chunked<T: Copy + Default>(n: usize, mut fill: impl FnMut(&mut [T])) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    let mut buf = [T::default(); 256];
    while out.len() < n {
        let chunk = &mut buf[..(n - out.len()).min(256)];
        fill(chunk);
        out.extend_from_slice(chunk);
    }
    out
}

/// The complete state of a [`Stream`]; enough to resume it exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamState {
    /// Philox key.
    pub key: [u64; 2],
    /// Counter of the last generated block.
    pub counter: [u64; 4],
    /// Position in the current block (4 means "the next draw generates a new block").
    pub buffer_pos: usize,
    /// Whether a 32-bit half word is pending.
    pub has_uint32: bool,
    /// The pending 32-bit half word.
    pub uinteger: u32,
}

/// A counter-based random stream (Philox4x64-10), numpy-compatible.
#[derive(Clone, Debug)]
pub struct Stream {
    key: [u64; 2],
    counter: [u64; 4],
    buffer: [u64; BUFFER_SIZE],
    buffer_pos: usize,
    has_uint32: bool,
    uinteger: u32,
}

#[inline(always)]
fn increment(counter: &mut [u64; 4]) {
    for word in counter.iter_mut() {
        *word = word.wrapping_add(1);
        if *word != 0 {
            break;
        }
    }
}

impl Stream {
    /// A stream keyed by `key` whose counter starts at `counter` (numpy's `Philox(key=, counter=)`).
    pub fn new(key: [u64; 2], counter: [u64; 4]) -> Self {
        Self {
            key,
            counter,
            buffer: [0; BUFFER_SIZE],
            buffer_pos: BUFFER_SIZE,
            has_uint32: false,
            uinteger: 0,
        }
    }

    /// emberfl's stream for `(seed, purpose, client, round)`: key `[seed, purpose]`,
    /// counter `[0, client, round, 0]`.
    pub fn for_client(seed: u64, purpose: u64, client: u64, round: u64) -> Self {
        Self::new([seed, purpose], [0, client, round, 0])
    }

    /// The stream's state.
    pub fn state(&self) -> StreamState {
        StreamState {
            key: self.key,
            counter: self.counter,
            buffer_pos: self.buffer_pos,
            has_uint32: self.has_uint32,
            uinteger: self.uinteger,
        }
    }

    /// Rebuild a stream from a saved state.
    pub fn from_state(state: StreamState) -> Self {
        let buffer_pos = state.buffer_pos.min(BUFFER_SIZE);
        let buffer = if buffer_pos < BUFFER_SIZE {
            philox4x64_10(state.counter, state.key)
        } else {
            [0; BUFFER_SIZE]
        };
        Self {
            key: state.key,
            counter: state.counter,
            buffer,
            buffer_pos,
            has_uint32: state.has_uint32,
            uinteger: state.uinteger,
        }
    }

    /// The next raw 64-bit word.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        if self.buffer_pos < BUFFER_SIZE {
            let out = self.buffer[self.buffer_pos];
            self.buffer_pos += 1;
            return out;
        }
        increment(&mut self.counter);
        self.buffer = philox4x64_10(self.counter, self.key);
        self.buffer_pos = 1;
        self.buffer[0]
    }

    /// The next 32-bit word (numpy's `next_uint32`).
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.has_uint32 {
            self.has_uint32 = false;
            return self.uinteger;
        }
        let next = self.next_u64();
        self.has_uint32 = true;
        self.uinteger = (next >> 32) as u32;
        next as u32
    }

    /// A double in [0, 1) with 53 random bits (numpy's `next_double`).
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        unit_f64(self.next_u64())
    }

    /// Fill `out` with raw 64-bit words; the same words `next_u64` would return.
    pub fn fill_u64(&mut self, out: &mut [u64]) {
        let mut i = 0;
        // Drain the current block first.
        while i < out.len() && self.buffer_pos < BUFFER_SIZE {
            out[i] = self.buffer[self.buffer_pos];
            self.buffer_pos += 1;
            i += 1;
        }
        // Whole blocks straight into the output.
        let mut chunks = out[i..].chunks_exact_mut(BUFFER_SIZE);
        for chunk in &mut chunks {
            increment(&mut self.counter);
            chunk.copy_from_slice(&philox4x64_10(self.counter, self.key));
        }
        for slot in chunks.into_remainder() {
            *slot = self.next_u64();
        }
    }

    /// `n` raw words in a new vector (no zero-filling pass).
    pub fn raw_vec(&mut self, n: usize) -> Vec<u64> {
        collect_chunked(n, |chunk| self.fill_u64(chunk))
    }

    /// `n` uniform doubles in [0, 1) in a new vector (numpy's `Generator.random`).
    pub fn random_vec(&mut self, n: usize) -> Vec<f64> {
        collect_chunked(n, |chunk| self.fill_f64(chunk))
    }

    /// Uniform doubles in [0, 1) (numpy's `Generator.random`).
    pub fn fill_f64(&mut self, out: &mut [f64]) {
        // Raw words in bulk, then converted: the same values as repeated `next_f64`.
        let mut words = [0u64; 256];
        for chunk in out.chunks_mut(256) {
            let w = &mut words[..chunk.len()];
            self.fill_u64(w);
            for (x, &word) in chunk.iter_mut().zip(w.iter()) {
                *x = unit_f64(word);
            }
        }
    }

    /// Standard normal doubles (Box-Muller on pairs of `next_f64` draws; not numpy's ziggurat).
    pub fn fill_normal(&mut self, out: &mut [f64]) {
        let mut chunks = out.chunks_mut(2);
        for pair in &mut chunks {
            // 1 - u is in (0, 1], so the logarithm is finite.
            let u1 = 1.0 - self.next_f64();
            let u2 = self.next_f64();
            let radius = (-2.0 * u1.ln()).sqrt();
            let angle = std::f64::consts::TAU * u2;
            pair[0] = radius * angle.cos();
            if pair.len() > 1 {
                pair[1] = radius * angle.sin();
            }
        }
    }

    /// numpy's `random_interval`: a value in `[0, max]` by masked rejection.
    #[inline]
    pub fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        mask |= mask >> 1;
        mask |= mask >> 2;
        mask |= mask >> 4;
        mask |= mask >> 8;
        mask |= mask >> 16;
        mask |= mask >> 32;
        if max <= u64::from(u32::MAX) {
            loop {
                let value = u64::from(self.next_u32()) & mask;
                if value <= max {
                    return value;
                }
            }
        } else {
            loop {
                let value = self.next_u64() & mask;
                if value <= max {
                    return value;
                }
            }
        }
    }

    /// numpy's bounded integer in `[0, rng]` (Lemire's method, 32-bit path for small ranges).
    #[inline]
    pub fn bounded(&mut self, rng: u64) -> u64 {
        if rng == 0 {
            0
        } else if rng <= u64::from(u32::MAX) {
            if rng == u64::from(u32::MAX) {
                return u64::from(self.next_u32());
            }
            let rng = rng as u32;
            let rng_excl = rng + 1;
            let mut m = u64::from(self.next_u32()) * u64::from(rng_excl);
            let mut leftover = m as u32;
            if leftover < rng_excl {
                let threshold = (u32::MAX - rng) % rng_excl;
                while leftover < threshold {
                    m = u64::from(self.next_u32()) * u64::from(rng_excl);
                    leftover = m as u32;
                }
            }
            m >> 32
        } else if rng == u64::MAX {
            self.next_u64()
        } else {
            let rng_excl = rng + 1;
            let mut m = u128::from(self.next_u64()) * u128::from(rng_excl);
            let mut leftover = m as u64;
            if leftover < rng_excl {
                let threshold = (u64::MAX - rng) % rng_excl;
                while leftover < threshold {
                    m = u128::from(self.next_u64()) * u128::from(rng_excl);
                    leftover = m as u64;
                }
            }
            (m >> 64) as u64
        }
    }

    /// Integers uniform in `[low, high)` (numpy's `Generator.integers(low, high, n)` for int64).
    ///
    /// The caller guarantees `low < high`.
    pub fn fill_integers(&mut self, low: i64, high: i64, out: &mut [i64]) {
        let rng = (high as i128 - 1 - low as i128) as u64;
        for x in out.iter_mut() {
            *x = (low as i128 + self.bounded(rng) as i128) as i64;
        }
    }

    /// A random permutation of `0..n` (numpy's `Generator.permutation(n)`).
    pub fn permutation(&mut self, n: usize) -> Vec<i64> {
        let mut out: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            let j = self.interval(i as u64) as usize;
            out.swap(i, j);
        }
        out
    }

    /// `k` distinct values of `0..n` in random order (a partial Fisher-Yates shuffle).
    ///
    /// The caller guarantees `k <= n`.
    pub fn choice(&mut self, n: usize, k: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(k);
        if k.saturating_mul(8) >= n {
            let mut values: Vec<i64> = (0..n as i64).collect();
            for i in 0..k {
                let j = i + self.interval((n - 1 - i) as u64) as usize;
                values.swap(i, j);
                out.push(values[i]);
            }
        } else {
            // Sparse variant: only the swapped positions are stored.
            let mut moved: HashMap<usize, usize> = HashMap::with_capacity(2 * k);
            for i in 0..k {
                let j = i + self.interval((n - 1 - i) as u64) as usize;
                let value_j = *moved.get(&j).unwrap_or(&j);
                let value_i = *moved.get(&i).unwrap_or(&i);
                moved.insert(j, value_i);
                out.push(value_j as i64);
            }
        }
        out
    }

    /// A 64-bit seed for another generator (e.g. `torch.Generator.manual_seed`).
    pub fn seed_u64(&mut self) -> u64 {
        self.next_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_block_uses_incremented_counter() {
        let mut s = Stream::new([0, 0], [0; 4]);
        let block = philox4x64_10([1, 0, 0, 0], [0, 0]);
        let got: Vec<u64> = (0..4).map(|_| s.next_u64()).collect();
        assert_eq!(got, block);
    }

    #[test]
    fn counter_carries() {
        let mut s = Stream::new([5, 6], [u64::MAX, 7, 0, 0]);
        assert_eq!(s.next_u64(), philox4x64_10([0, 8, 0, 0], [5, 6])[0]);
    }

    #[test]
    fn bulk_doubles_match_single_draws() {
        let mut a = Stream::for_client(3, 1, 4, 1);
        let mut b = a.clone();
        a.next_u64();
        b.next_u64();
        let mut out = vec![0f64; 1000];
        a.fill_f64(&mut out);
        let expected: Vec<f64> = (0..1000).map(|_| b.next_f64()).collect();
        assert_eq!(out, expected);
        assert_eq!(a.next_u64(), b.next_u64());
        let mut c = a.clone();
        assert_eq!(a.random_vec(777), {
            let mut v = vec![0f64; 777];
            c.fill_f64(&mut v);
            v
        });
        let mut d = a.clone();
        let raw = a.raw_vec(13);
        assert_eq!(raw, (0..13).map(|_| d.next_u64()).collect::<Vec<_>>());
    }

    #[test]
    fn u32_draws_split_words_low_first() {
        let mut a = Stream::new([1, 2], [0; 4]);
        let mut b = a.clone();
        let w = b.next_u64();
        assert_eq!(a.next_u32(), w as u32);
        assert_eq!(a.next_u32(), (w >> 32) as u32);
    }

    #[test]
    fn choice_sparse_and_dense_are_distinct() {
        for (n, k) in [(10, 10), (1000, 3), (100_000, 50), (7, 0)] {
            let mut s = Stream::for_client(9, 1, 2, 3);
            let c = s.choice(n, k);
            assert_eq!(c.len(), k);
            let mut sorted = c.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), k);
            assert!(c.iter().all(|&v| (v as usize) < n));
        }
    }

    proptest! {
        #[test]
        fn fill_matches_next(key0 in any::<u64>(), skip in 0usize..7, n in 0usize..40) {
            let mut a = Stream::new([key0, 3], [0, 1, 2, 0]);
            let mut b = a.clone();
            for _ in 0..skip { a.next_u64(); b.next_u64(); }
            let mut out = vec![0u64; n];
            a.fill_u64(&mut out);
            let expected: Vec<u64> = (0..n).map(|_| b.next_u64()).collect();
            prop_assert_eq!(out, expected);
            prop_assert_eq!(a.next_u64(), b.next_u64());
        }

        #[test]
        fn state_round_trips(skip in 0usize..9, half in any::<bool>()) {
            let mut a = Stream::for_client(1, 2, 3, 4);
            for _ in 0..skip { a.next_u64(); }
            if half { a.next_u32(); }
            let mut b = Stream::from_state(a.state());
            for _ in 0..10 { prop_assert_eq!(a.next_u32(), b.next_u32()); }
        }

        #[test]
        fn bounded_in_range(rng in any::<u64>(), seed in any::<u64>()) {
            let mut s = Stream::for_client(seed, 0, 0, 0);
            prop_assert!(s.bounded(rng) <= rng);
            prop_assert!(s.interval(rng) <= rng);
        }

        #[test]
        fn permutation_is_a_permutation(n in 0usize..300, seed in any::<u64>()) {
            let mut s = Stream::for_client(seed, 0, 0, 0);
            let mut p = s.permutation(n);
            p.sort_unstable();
            prop_assert_eq!(p, (0..n as i64).collect::<Vec<_>>());
        }
    }
}

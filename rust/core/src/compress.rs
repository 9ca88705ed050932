//! Compression kernels for client updates: top-k selection, bit packing, QSGD.
//!
//! Every kernel is a pure function of its inputs (randomness comes in as an argument), so
//! a compressed update is the same wherever it is computed.

use crate::error::{Error, Result};

fn check_finite(what: &'static str, x: &[f32]) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::InvalidArgument(format!(
            "{what}: element {i} is {} (compress finite updates only)",
            x[i]
        ))),
    }
}

/// Indices of the `k` entries of largest magnitude, ascending; among equal magnitudes the
/// lower index wins. `O(len)` (one selection, then a sort of the `k` chosen).
pub fn top_k(x: &[f32], k: usize) -> Result<Vec<u32>> {
    check_finite("top_k", x)?;
    if k > x.len() {
        return Err(Error::InvalidArgument(format!(
            "top_k: k={k} exceeds the {} elements",
            x.len()
        )));
    }
    if u32::try_from(x.len()).is_err() {
        return Err(Error::InvalidArgument(
            "top_k: more than 2^32 elements".into(),
        ));
    }
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    if k == 0 {
        return Ok(Vec::new());
    }
    if k < idx.len() {
        // Larger magnitude first, then the lower index: a total order, so the selection
        // (and the result) is unique.
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            x[b as usize]
                .abs()
                .total_cmp(&x[a as usize].abs())
                .then(a.cmp(&b))
        });
        idx.truncate(k);
    }
    idx.sort_unstable();
    Ok(idx)
}

/// Bits needed for a level in `0..=levels`.
pub fn level_bits(levels: u32) -> u32 {
    32 - levels.leading_zeros()
}

/// Pack `values`, each below `2^bits` (`bits` in `1..=32`), `bits` bits each, least
/// significant bit first.
pub fn pack(values: &[u32], bits: u32) -> Vec<u8> {
    let total = values.len() * bits as usize;
    let mut out = Vec::with_capacity(total.div_ceil(8));
    let mask = if bits == 32 {
        u64::from(u32::MAX)
    } else {
        (1u64 << bits) - 1
    };
    // At most 7 pending bits before a value is added, so 39 bits fit the accumulator.
    let (mut acc, mut pending) = (0u64, 0u32);
    for &v in values {
        acc |= (u64::from(v) & mask) << pending;
        pending += bits;
        while pending >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            pending -= 8;
        }
    }
    if pending > 0 {
        out.push(acc as u8);
    }
    out
}

/// Unpack `count` values of `bits` bits each (the inverse of [`pack`]).
pub fn unpack(bytes: &[u8], count: usize, bits: u32) -> Result<Vec<u32>> {
    if !(1..=32).contains(&bits) {
        return Err(Error::InvalidArgument(format!(
            "unpack: bits={bits} is outside 1..32"
        )));
    }
    let total = count * bits as usize;
    if bytes.len() != total.div_ceil(8) {
        return Err(Error::InvalidArgument(format!(
            "unpack: {count} values of {bits} bits need {} bytes, got {}",
            total.div_ceil(8),
            bytes.len()
        )));
    }
    let mask = if bits == 32 {
        u64::from(u32::MAX)
    } else {
        (1u64 << bits) - 1
    };
    let mut out = Vec::with_capacity(count);
    let (mut acc, mut available) = (0u64, 0u32);
    let mut next = bytes.iter();
    for _ in 0..count {
        while available < bits {
            // The length check above guarantees the bytes are there.
            acc |= u64::from(*next.next().unwrap_or(&0)) << available;
            available += 8;
        }
        out.push((acc & mask) as u32);
        acc >>= bits;
        available -= bits;
    }
    Ok(out)
}

/// QSGD (Alistarh et al., 2017) with `levels` levels: returns the L2 norm and, per
/// element, `sign << bits | level` with `level = floor(|x_i| (levels / ||x||) + u_i)`
/// (stochastic rounding by the uniforms `u`), packed `bits + 1` bits each.
pub fn qsgd_encode(x: &[f32], levels: u32, uniforms: &[f64]) -> Result<(f32, Vec<u8>)> {
    check_finite("qsgd", x)?;
    if levels == 0 {
        return Err(Error::InvalidArgument("qsgd: levels must be >= 1".into()));
    }
    if uniforms.len() != x.len() {
        return Err(Error::Length {
            what: "the uniforms",
            got: uniforms.len(),
            expected: x.len(),
        });
    }
    let norm = x
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    let bits = level_bits(levels);
    // One division, then a multiplication per element: `|x_i| * (s / ||x||)`.
    let per_unit = if norm > 0.0 {
        f64::from(levels) / norm
    } else {
        0.0
    };
    let codes: Vec<u32> = x
        .iter()
        .zip(uniforms)
        .map(|(&v, &u)| {
            let level = ((f64::from(v).abs() * per_unit + u).floor() as u32).min(levels);
            (u32::from(v.is_sign_negative() && level > 0) << bits) | level
        })
        .collect();
    Ok((norm as f32, pack(&codes, bits + 1)))
}

/// Decode [`qsgd_encode`]'s output: `x_i = norm * sign_i * level_i / levels`.
pub fn qsgd_decode(norm: f32, bytes: &[u8], count: usize, levels: u32) -> Result<Vec<f32>> {
    if levels == 0 {
        return Err(Error::InvalidArgument("qsgd: levels must be >= 1".into()));
    }
    let bits = level_bits(levels);
    let codes = unpack(bytes, count, bits + 1)?;
    let scale = f64::from(norm) / f64::from(levels);
    let level_mask = (1u32 << bits) - 1;
    let mut highest = 0u32;
    let out: Vec<f32> = codes
        .iter()
        .map(|&c| {
            let level = c & level_mask;
            highest = highest.max(level);
            let v = (scale * f64::from(level)) as f32;
            if c >> bits == 1 {
                -v
            } else {
                v
            }
        })
        .collect();
    if highest > levels {
        return Err(Error::InvalidArgument(format!(
            "qsgd: level {highest} above {levels} in the payload"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn top_k_breaks_ties_by_index() {
        let x = [1.0, -3.0, 3.0, 0.5, -1.0];
        assert_eq!(top_k(&x, 2).unwrap(), vec![1, 2]);
        assert_eq!(top_k(&x, 3).unwrap(), vec![0, 1, 2]); // |1| = |-1|: index 0 first
        assert_eq!(top_k(&x, 5).unwrap(), vec![0, 1, 2, 3, 4]);
        assert!(top_k(&x, 6).is_err());
        assert!(top_k(&[f32::NAN], 1).is_err());
    }

    #[test]
    fn qsgd_small() {
        let x = [3.0f32, -4.0, 0.0];
        let (norm, bytes) = qsgd_encode(&x, 1, &[0.0, 0.99, 0.5]).unwrap();
        assert_eq!(norm, 5.0);
        // levels: floor(0.6 + 0) = 0, floor(0.8 + 0.99) = 1, floor(0 + 0.5) = 0.
        assert_eq!(
            qsgd_decode(norm, &bytes, 3, 1).unwrap(),
            vec![0.0, -5.0, 0.0]
        );
        assert_eq!(bytes.len(), 1); // 3 elements x 2 bits
    }

    proptest! {
        #[test]
        fn pack_round_trips(values in prop::collection::vec(any::<u32>(), 0..200), bits in 1u32..=32) {
            let values: Vec<u32> = values.into_iter().map(|v| if bits == 32 { v } else { v & ((1 << bits) - 1) }).collect();
            let bytes = pack(&values, bits);
            prop_assert_eq!(bytes.len(), (values.len() * bits as usize).div_ceil(8));
            prop_assert_eq!(unpack(&bytes, values.len(), bits).unwrap(), values.clone());
            // Bit i of the stream is bit (i % bits) of value i / bits, LSB first.
            for (i, &v) in values.iter().enumerate().take(20) {
                for b in 0..bits {
                    let pos = i * bits as usize + b as usize;
                    prop_assert_eq!((bytes[pos / 8] >> (pos % 8)) & 1, ((v >> b) & 1) as u8);
                }
            }
        }

        #[test]
        fn top_k_is_the_sorted_reference(x in prop::collection::vec(-5i32..5, 1..300), k in 0usize..300) {
            let x: Vec<f32> = x.into_iter().map(|v| v as f32).collect();
            let k = k.min(x.len());
            let mut order: Vec<u32> = (0..x.len() as u32).collect();
            order.sort_by(|&a, &b| x[b as usize].abs().total_cmp(&x[a as usize].abs()).then(a.cmp(&b)));
            let mut expected = order[..k].to_vec();
            expected.sort_unstable();
            prop_assert_eq!(top_k(&x, k).unwrap(), expected);
        }
    }
}

//! 2-D max pooling without padding or dilation: forward with the arg-max of every window,
//! and the backward pass that routes each output gradient to its arg-max.
//!
//! The semantics are PyTorch's CPU `max_pool2d_with_indices` (NCHW, `padding=0`,
//! `dilation=1`, `ceil_mode=False`) element for element: a window's maximum starts at
//! `-inf` with the first element as its arg-max, and an element replaces it when it is
//! greater or NaN (so a NaN propagates, and the last NaN of a window is its arg-max). The
//! backward pass adds the output gradients into a zeroed input gradient in output order,
//! plane by plane, so overlapping windows sum in PyTorch's order. Every plane is
//! independent: the result does not depend on the thread count.
//!
//! The arg-max is stored as the position inside the window (`ky * kw + kx`, one byte), not
//! as a flat index.

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::error::{Error, Result};

/// A pooling window: kernel size and stride, in rows and columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Vertical stride.
    pub sh: usize,
    /// Horizontal stride.
    pub sw: usize,
}

/// The shape of a pooling problem: `planes` images of `h x w` (N * C of an NCHW tensor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planes {
    /// Number of planes.
    pub planes: usize,
    /// Plane height.
    pub h: usize,
    /// Plane width.
    pub w: usize,
}

impl Window {
    /// The output size `(oh, ow)` for an `h x w` plane, after validating the window.
    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        if self.kh == 0 || self.kw == 0 || self.sh == 0 || self.sw == 0 {
            return Err(Error::InvalidArgument(format!(
                "max_pool2d: kernel ({}, {}) and stride ({}, {}) must be positive",
                self.kh, self.kw, self.sh, self.sw
            )));
        }
        if self.kh * self.kw > 256 {
            return Err(Error::InvalidArgument(format!(
                "max_pool2d: a {}x{} kernel has more than 256 positions",
                self.kh, self.kw
            )));
        }
        if h < self.kh || w < self.kw {
            return Err(Error::InvalidArgument(format!(
                "max_pool2d: the {h}x{w} input is smaller than the {}x{} kernel",
                self.kh, self.kw
            )));
        }
        Ok(((h - self.kh) / self.sh + 1, (w - self.kw) / self.sw + 1))
    }
}

/// The 2x2, stride-2 window of LeNet-style CNNs, which has its own unrolled loops.
const SQUARE: Window = Window {
    kh: 2,
    kw: 2,
    sh: 2,
    sw: 2,
};

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            got,
            expected,
        })
    }
}

/// Planes handled by one task: enough work to amortise scheduling, few enough to balance.
fn planes_per_task(plane_len: usize) -> usize {
    (16_384 / plane_len.max(1)).max(1)
}

/// Max-pool every plane of `input` into `out`, writing each window's arg-max to `argmax`.
///
/// `input` holds `shape.planes` planes of `shape.h x shape.w`; `out` and `argmax` hold
/// the same number of `oh x ow` planes ([`Window::output_size`]).
pub fn max_pool2d_forward(
    input: &[f32],
    shape: Planes,
    win: Window,
    out: &mut [f32],
    argmax: &mut [u8],
    pool: &ThreadPool,
) -> Result<()> {
    // Both at least 1: output_size rejects planes smaller than the kernel.
    let (oh, ow) = win.output_size(shape.h, shape.w)?;
    let in_len = shape.h * shape.w;
    let out_len = oh * ow;
    check_len("input", input.len(), shape.planes * in_len)?;
    check_len("out", out.len(), shape.planes * out_len)?;
    check_len("argmax", argmax.len(), shape.planes * out_len)?;
    if shape.planes == 0 {
        return Ok(());
    }
    let square = win == SQUARE;
    let task = |(x, (o, a)): (&[f32], (&mut [f32], &mut [u8]))| {
        for ((x, o), a) in x
            .chunks_exact(in_len)
            .zip(o.chunks_exact_mut(out_len))
            .zip(a.chunks_exact_mut(out_len))
        {
            if square {
                forward_plane_2x2(x, shape.w, oh, ow, o, a);
            } else {
                forward_plane(x, shape.w, win, oh, ow, o, a);
            }
        }
    };
    let per = planes_per_task(in_len);
    if pool.current_num_threads() == 1 {
        // Not through rayon: outside `install` its parallel iterators would use the
        // global pool, i.e. more threads than the caller asked for.
        input
            .chunks(in_len * per)
            .zip(
                out.chunks_mut(out_len * per)
                    .zip(argmax.chunks_mut(out_len * per)),
            )
            .for_each(task);
    } else {
        pool.install(|| {
            input
                .par_chunks(in_len * per)
                .zip(
                    out.par_chunks_mut(out_len * per)
                        .zip(argmax.par_chunks_mut(out_len * per)),
                )
                .for_each(task)
        });
    }
    Ok(())
}

/// One step of the window scan, without a data-dependent branch (random data would
/// mispredict half of them).
#[inline(always)]
fn take(val: f32, pos: u8, best: &mut f32, at: &mut u8) {
    let replace = (val > *best) | val.is_nan();
    *best = if replace { val } else { *best };
    *at = if replace { pos } else { *at };
}

fn forward_plane(
    x: &[f32],
    w: usize,
    win: Window,
    oh: usize,
    ow: usize,
    out: &mut [f32],
    argmax: &mut [u8],
) {
    for oy in 0..oh {
        for ox in 0..ow {
            let mut best = f32::NEG_INFINITY;
            let mut at = 0u8;
            for ky in 0..win.kh {
                let row = &x[(oy * win.sh + ky) * w + ox * win.sw..][..win.kw];
                for (kx, &val) in row.iter().enumerate() {
                    // kh * kw <= 256 was checked, so the position fits in a byte.
                    take(val, (ky * win.kw + kx) as u8, &mut best, &mut at);
                }
            }
            out[oy * ow + ox] = best;
            argmax[oy * ow + ox] = at;
        }
    }
}

/// The common 2x2, stride-2 window, unrolled.
fn forward_plane_2x2(
    x: &[f32],
    w: usize,
    oh: usize,
    ow: usize,
    out: &mut [f32],
    argmax: &mut [u8],
) {
    for oy in 0..oh {
        let top = &x[2 * oy * w..][..2 * ow];
        let bottom = &x[(2 * oy + 1) * w..][..2 * ow];
        let o = &mut out[oy * ow..][..ow];
        let a = &mut argmax[oy * ow..][..ow];
        let rows = top.chunks_exact(2).zip(bottom.chunks_exact(2));
        for ((t, b), (o, a)) in rows.zip(o.iter_mut().zip(a.iter_mut())) {
            let mut best = f32::NEG_INFINITY;
            let mut at = 0u8;
            take(t[0], 0, &mut best, &mut at);
            take(t[1], 1, &mut best, &mut at);
            take(b[0], 2, &mut best, &mut at);
            take(b[1], 3, &mut best, &mut at);
            *o = best;
            *a = at;
        }
    }
}

/// The gradient of [`max_pool2d_forward`]: `grad_in` is zeroed, then each output
/// gradient is added at its window's arg-max, in output order.
pub fn max_pool2d_backward(
    grad_out: &[f32],
    argmax: &[u8],
    shape: Planes,
    win: Window,
    grad_in: &mut [f32],
    pool: &ThreadPool,
) -> Result<()> {
    let (oh, ow) = win.output_size(shape.h, shape.w)?;
    let in_len = shape.h * shape.w;
    let out_len = oh * ow;
    check_len("grad_out", grad_out.len(), shape.planes * out_len)?;
    check_len("argmax", argmax.len(), shape.planes * out_len)?;
    check_len("grad_in", grad_in.len(), shape.planes * in_len)?;
    let limit = win.kh * win.kw;
    if shape.planes == 0 {
        return Ok(());
    }
    // Offset of every window position from the window's corner.
    let offsets: Vec<usize> = (0..limit)
        .map(|k| (k / win.kw) * shape.w + k % win.kw)
        .collect();
    let square = win == SQUARE;
    let task = |(gi, (go, a)): (&mut [f32], (&[f32], &[u8]))| {
        check_argmax(a, limit, win)?;
        for ((gi, go), a) in gi
            .chunks_exact_mut(in_len)
            .zip(go.chunks_exact(out_len))
            .zip(a.chunks_exact(out_len))
        {
            if square {
                backward_plane_2x2(go, a, shape, oh, ow, gi);
                continue;
            }
            gi.fill(0.0);
            for oy in 0..oh {
                for ox in 0..ow {
                    let corner = oy * win.sh * shape.w + ox * win.sw;
                    let o = oy * ow + ox;
                    gi[corner + offsets[usize::from(a[o])]] += go[o];
                }
            }
        }
        Ok(())
    };
    let per = planes_per_task(in_len);
    if pool.current_num_threads() == 1 {
        grad_in
            .chunks_mut(in_len * per)
            .zip(
                grad_out
                    .chunks(out_len * per)
                    .zip(argmax.chunks(out_len * per)),
            )
            .try_for_each(task)
    } else {
        pool.install(|| {
            grad_in
                .par_chunks_mut(in_len * per)
                .zip(
                    grad_out
                        .par_chunks(out_len * per)
                        .zip(argmax.par_chunks(out_len * per)),
                )
                .try_for_each(task)
        })
    }
}

/// The 2x2, stride-2 backward pass: every window is written whole (`0.0 + g` at the
/// arg-max, as a zeroed gradient plus `g` gives, so `-0.0` becomes `+0.0` as it does in
/// PyTorch), and only a leftover last row or column is zeroed separately.
fn backward_plane_2x2(go: &[f32], a: &[u8], shape: Planes, oh: usize, ow: usize, gi: &mut [f32]) {
    let (h, w) = (shape.h, shape.w);
    if h % 2 == 1 {
        gi[(h - 1) * w..].fill(0.0);
    }
    for oy in 0..oh {
        let (top, bottom) = gi[2 * oy * w..][..2 * w].split_at_mut(w);
        if w % 2 == 1 {
            top[w - 1] = 0.0;
            bottom[w - 1] = 0.0;
        }
        let g = &go[oy * ow..][..ow];
        let k = &a[oy * ow..][..ow];
        let rows = top.chunks_exact_mut(2).zip(bottom.chunks_exact_mut(2));
        for ((t, b), (&g, &at)) in rows.zip(g.iter().zip(k)) {
            // Bit masks instead of branches: the arg-max is random.
            let bits = (0.0 + g).to_bits();
            let pick = |pos: u8| f32::from_bits(bits & u32::from(at == pos).wrapping_neg());
            t[0] = pick(0);
            t[1] = pick(1);
            b[0] = pick(2);
            b[1] = pick(3);
        }
    }
}

/// Fail unless every arg-max is a window position (`< limit`). The bitwise OR of the
/// bytes, eight at a time, bounds their maximum and vectorises well; the exact maximum
/// is only computed when that bound is not enough.
fn check_argmax(a: &[u8], limit: usize, win: Window) -> Result<()> {
    let words = a.chunks_exact(8);
    let tail = words.remainder().iter().fold(0u8, |m, &v| m | v);
    let any = words
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8])))
        .fold(0u64, |m, v| m | v);
    let bound = any.to_le_bytes().iter().fold(tail, |m, &v| m | v);
    if usize::from(bound) < limit {
        return Ok(());
    }
    let largest = a.iter().copied().max().unwrap_or(0);
    if usize::from(largest) < limit {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "max_pool2d backward: arg-max {largest} is outside the {}x{} window",
        win.kh, win.kw
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::pool;
    use proptest::prelude::*;

    /// The plain definition, one window at a time.
    fn reference(x: &[f32], s: Planes, win: Window) -> (Vec<f32>, Vec<u8>) {
        let (oh, ow) = win.output_size(s.h, s.w).unwrap();
        let mut out = Vec::new();
        let mut arg = Vec::new();
        for p in 0..s.planes {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best = f32::NEG_INFINITY;
                    let mut at = 0;
                    for ky in 0..win.kh {
                        for kx in 0..win.kw {
                            let v = x[p * s.h * s.w + (oy * win.sh + ky) * s.w + ox * win.sw + kx];
                            if v > best || v.is_nan() {
                                best = v;
                                at = ky * win.kw + kx;
                            }
                        }
                    }
                    out.push(best);
                    arg.push(at as u8);
                }
            }
        }
        (out, arg)
    }

    fn run_forward(x: &[f32], s: Planes, win: Window, threads: usize) -> (Vec<f32>, Vec<u8>) {
        let (oh, ow) = win.output_size(s.h, s.w).unwrap();
        let mut out = vec![0.0; s.planes * oh * ow];
        let mut arg = vec![0; s.planes * oh * ow];
        max_pool2d_forward(x, s, win, &mut out, &mut arg, &pool(threads).unwrap()).unwrap();
        (out, arg)
    }

    #[test]
    fn two_by_two_picks_the_first_maximum_and_propagates_nan() {
        let s = Planes {
            planes: 1,
            h: 2,
            w: 6,
        };
        let win = Window {
            kh: 2,
            kw: 2,
            sh: 2,
            sw: 2,
        };
        #[rustfmt::skip]
        let x = [
            1.0, 3.0,  5.0, 5.0,  f32::NAN, 9.0,
            3.0, 2.0,  5.0, 4.0,  f32::NAN, 1.0,
        ];
        let (out, arg) = run_forward(&x, s, win, 1);
        assert_eq!(&out[..2], &[3.0, 5.0]);
        assert!(out[2].is_nan());
        assert_eq!(arg, vec![1, 0, 2]);
    }

    #[test]
    fn all_negative_infinity_keeps_the_first_position() {
        let s = Planes {
            planes: 1,
            h: 3,
            w: 3,
        };
        let win = Window {
            kh: 3,
            kw: 3,
            sh: 1,
            sw: 1,
        };
        let (out, arg) = run_forward(&[f32::NEG_INFINITY; 9], s, win, 1);
        assert_eq!(out, vec![f32::NEG_INFINITY]);
        assert_eq!(arg, vec![0]);
    }

    #[test]
    fn backward_sums_overlapping_windows() {
        // 3x3 kernel, stride 1 on a 4x4 plane: the centre maximum wins all four windows.
        let s = Planes {
            planes: 1,
            h: 4,
            w: 4,
        };
        let win = Window {
            kh: 3,
            kw: 3,
            sh: 1,
            sw: 1,
        };
        let mut x = vec![0.0f32; 16];
        x[5] = 10.0;
        let (_, arg) = run_forward(&x, s, win, 1);
        let mut gi = vec![7.0f32; 16];
        max_pool2d_backward(
            &[1.0, 2.0, 3.0, 4.0],
            &arg,
            s,
            win,
            &mut gi,
            &pool(1).unwrap(),
        )
        .unwrap();
        let mut want = vec![0.0f32; 16];
        want[5] = 10.0;
        assert_eq!(gi, want);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let p = pool(1).unwrap();
        let s = Planes {
            planes: 1,
            h: 2,
            w: 2,
        };
        let mut o = [0.0f32; 1];
        let mut a = [0u8; 1];
        let bad = [
            Window {
                kh: 0,
                kw: 2,
                sh: 2,
                sw: 2,
            },
            Window {
                kh: 3,
                kw: 2,
                sh: 2,
                sw: 2,
            },
            Window {
                kh: 17,
                kw: 17,
                sh: 1,
                sw: 1,
            },
        ];
        for win in bad {
            assert!(max_pool2d_forward(&[0.0; 4], s, win, &mut o, &mut a, &p).is_err());
        }
        let win = Window {
            kh: 2,
            kw: 2,
            sh: 2,
            sw: 2,
        };
        assert!(matches!(
            max_pool2d_forward(&[0.0; 3], s, win, &mut o, &mut a, &p),
            Err(Error::Length { what: "input", .. })
        ));
        let mut gi = [0.0f32; 4];
        assert!(max_pool2d_backward(&[1.0], &[4], s, win, &mut gi, &p).is_err());
    }

    proptest! {
        #[test]
        fn matches_the_reference_for_any_window_and_thread_count(
            planes in 1usize..40,
            h in 1usize..12,
            w in 1usize..12,
            kh in 1usize..4,
            kw in 1usize..4,
            sh in 1usize..4,
            sw in 1usize..4,
            seed in any::<u64>(),
        ) {
            prop_assume!(h >= kh && w >= kw);
            let s = Planes { planes, h, w };
            let win = Window { kh, kw, sh, sw };
            // Few distinct values, so ties are common; an occasional NaN.
            let mut state = seed | 1;
            let x: Vec<f32> = (0..planes * h * w)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    if state % 97 == 0 { f32::NAN } else { (state % 5) as f32 - 2.0 }
                })
                .collect();
            let (want, want_arg) = reference(&x, s, win);
            for threads in [1, 3] {
                let (out, arg) = run_forward(&x, s, win, threads);
                prop_assert_eq!(&arg, &want_arg);
                for (a, b) in out.iter().zip(&want) {
                    prop_assert!(a == b || (a.is_nan() && b.is_nan()));
                }
                // Negative zeros too: PyTorch's zeroed gradient plus -0.0 is +0.0.
                let go: Vec<f32> = (0..out.len())
                    .map(|i| if i % 7 == 3 { -0.0 } else { i as f32 * 0.5 - 3.0 })
                    .collect();
                let mut gi = vec![f32::NAN; x.len()];
                max_pool2d_backward(&go, &arg, s, win, &mut gi, &pool(threads).unwrap()).unwrap();
                let mut want_gi = vec![0.0f32; x.len()];
                let (oh, ow) = win.output_size(h, w).unwrap();
                for p in 0..planes {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let o = p * oh * ow + oy * ow + ox;
                            let k = usize::from(arg[o]);
                            want_gi[p * h * w + (oy * sh + k / kw) * w + ox * sw + k % kw] += go[o];
                        }
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&gi), bits(&want_gi));
            }
        }
    }
}

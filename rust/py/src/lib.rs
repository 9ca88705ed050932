//! Python bindings of emberfl's Rust core, compiled as `emberfl._core`.
//!
//! Mechanical by design: convert arguments, release the GIL around long calls, call the
//! core, convert results and errors. The Python package wraps these objects.

mod accumulate;
mod arena;
mod compress;
mod errors;
mod kernels;
mod rng;

use pyo3::prelude::*;

/// Run `f` with the GIL released (unless the work is tiny), then surface Ctrl-C.
pub(crate) fn run_detached<T: Send>(
    py: Python<'_>,
    work: usize,
    f: impl FnOnce() -> T + Send,
) -> PyResult<T> {
    const SMALL: usize = 1 << 14;
    let out = if work < SMALL { f() } else { py.detach(f) };
    py.check_signals()?;
    Ok(out)
}

#[pymodule(gil_used = false)]
mod _core {
    #[pymodule_export]
    use crate::accumulate::Accumulator;
    #[pymodule_export]
    use crate::arena::Arena;
    #[pymodule_export]
    use crate::compress::{pack_bits, qsgd_decode, qsgd_encode, top_k, unpack_bits};
    #[pymodule_export]
    use crate::kernels::{
        max_pool2d_backward, max_pool2d_forward, median, norms, pairwise_sq_dists, sq_dists_to,
        trimmed_mean, weighted_mean,
    };
    #[pymodule_export]
    use crate::rng::{philox4x32_10, philox4x64_10, Stream};
}

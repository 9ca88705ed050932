//! Sized, fork-safe rayon thread pools shared by the kernels.
//!
//! Each kernel call names its thread count, so the Rust side never competes with
//! PyTorch's intra-op threads for more cores than the caller asked for. Pools are cached per
//! size and rebuilt after `fork()` (a forked child inherits no threads).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};

struct Cache {
    pid: u32,
    pools: HashMap<usize, Arc<rayon::ThreadPool>>,
}

static POOLS: OnceLock<Mutex<Cache>> = OnceLock::new();

/// Upper bound on the thread count of a kernel call.
pub const MAX_THREADS: usize = 1024;

/// A rayon pool with exactly `num_threads` threads (`num_threads >= 1`).
pub fn pool(num_threads: usize) -> Result<Arc<rayon::ThreadPool>> {
    if num_threads == 0 || num_threads > MAX_THREADS {
        return Err(Error::InvalidArgument(format!(
            "num_threads={num_threads} is out of range: use 1..={MAX_THREADS}"
        )));
    }
    let cache = POOLS.get_or_init(|| {
        Mutex::new(Cache {
            pid: std::process::id(),
            pools: HashMap::new(),
        })
    });
    let mut cache = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let pid = std::process::id();
    if cache.pid != pid {
        // After fork the parent's worker threads do not exist here: forget (leak) the pools
        // rather than drop them, since dropping would try to join threads that are gone.
        let old = std::mem::take(&mut cache.pools);
        std::mem::forget(old);
        cache.pid = pid;
    }
    if let Some(p) = cache.pools.get(&num_threads) {
        return Ok(Arc::clone(p));
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(num_threads)
        .thread_name(|i| format!("emberfl-{i}"))
        .build()
        .map_err(|e| Error::InvalidArgument(format!("cannot start {num_threads} threads: {e}")))?;
    let p = Arc::new(p);
    cache.pools.insert(num_threads, Arc::clone(&p));
    Ok(p)
}

//! emberfl's Rust core: counter-based RNG streams, the shared-memory parameter arena and
//! deterministic aggregation kernels. Plain Rust, no Python: the bindings live in `rust/py`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod accumulate;
pub mod aggregate;
pub mod arena;
pub mod compress;
pub mod error;
pub mod maxpool;
pub mod pool;
pub mod rng;
#[cfg(test)]
mod test_data;

pub use accumulate::Accumulator;
pub use arena::{Arena, Backing, Handle, Location, Out};
pub use error::{Error, Result};

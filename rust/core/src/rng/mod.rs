//! Counter-based random numbers: Philox block functions and numpy-compatible streams.

mod philox;
mod stream;

pub use philox::{philox4x32_10, philox4x64_10};
pub use stream::{Stream, StreamState};

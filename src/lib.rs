#![doc = include_str!("../README.md")]
//!
//! ## Layers
//!
//! Each uses only those above it (see DESIGN.md):
//! 1. [`sync`]: the std/loom switch;
//! 2. [`ring`]: lock-free SPSC rings over a byte region;
//! 3. [`segment`]: named shared-memory segments holding a header and rings;
//! 4. [`fastpath`] and [`codec`]: move records and frames; envelopes, pools, batches
//!    ([`proto`] holds the df.plugin types);
//!    [`jsonl`]: events and moves as JSON Lines (replay input, recorder);
//! 5. [`transport`], [`host`] and [`plugin`]: the transport port and the two runtimes;
//! 6. [`ffi`]: the C ABI for plugins.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

#[cfg(not(target_os = "linux"))]
compile_error!("plugbus uses Linux futexes and /dev/shm; it builds on Linux only");

pub mod clock;
pub mod codec;
pub mod fastpath;
pub mod ffi;
pub mod host;
pub mod jsonl;
pub mod plugin;
pub mod proto;
pub mod ring;
pub mod segment;
pub mod sync;
pub mod transport;

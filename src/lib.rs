//! plugbus: the event bus between a game server and its plugin processes, over shared memory.
//!
//! Layers, each using only those above it (see DESIGN.md):
//! 1. [`sync`]: the std/loom switch;
//! 2. [`ring`]: lock-free SPSC rings over a byte region;
//! 3. [`segment`]: named shared-memory segments holding a header and rings.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

#[cfg(not(target_os = "linux"))]
compile_error!("plugbus uses Linux futexes and /dev/shm; it builds on Linux only");

pub mod codec;
pub mod fastpath;
pub mod host;
pub mod plugin;
pub mod proto;
pub mod ring;
pub mod segment;
pub mod sync;
pub mod transport;

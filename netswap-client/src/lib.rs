//! # netswap-client
//!
//! The Rust client for netswap, "swap space over the network": create a record, get
//! a random 64-bit [`Pointer`], hand the pointer to others over any channel, and let
//! them read, write, watch or take over the record where its [`Access`] bits allow.
//!
//! - [`Client`]: async (tokio). One TCP connection shared by any number of tasks
//!   (`Clone + Send + Sync`); requests are pipelined and their frames interleaved
//!   fairly, so a large upload does not delay a small read issued after it.
//! - It survives the network: a dropped connection is replaced with exponential
//!   backoff and jitter ([`Reconnect`]), watches are registered again (asked again
//!   with backoff while the server answers BUSY) and say what changed meanwhile,
//!   reads in flight are sent again once, and every call has a deadline
//!   ([`Client::with_timeout`]) and stops when its future is dropped.
//!   [`Client::state_changes`] tells when the connection comes and goes.
//! - [`Client::mirror`]: a local copy of a record kept exact by the bytes the server
//!   pushes for every change (a data watch).
//! - [`blocking::Client`]: the same API for synchronous code.
//! - The `netswap` CLI and `netswap-bench` live in the `netswap-cli` crate.
//!
//! ```no_run
//! # async fn demo() -> netswap_client::Result<()> {
//! use netswap_client::{Access, Client, Error, Options};
//!
//! let alice = Client::connect("127.0.0.1:7420").await?;
//! let ptr = alice.create(Access::READ | Access::WRITE, "level 1").await?;
//!
//! // Anyone who is given `ptr` (here from 127.0.0.2, another identity) can use it.
//! let bob = Client::connect_with(
//!     "127.0.0.1:7420",
//!     Options { local_addr: Some("127.0.0.2".parse().unwrap()), ..Options::default() },
//! )
//! .await?;
//! let v = bob.replace_if(ptr, 1, "level 2").await?;
//! match alice.replace_if(ptr, 1, "stale").await {
//!     Err(Error::Conflict { current }) => assert_eq!(current, v),
//!     other => panic!("{other:?}"),
//! }
//! let mut changes = bob.watch(ptr).await?;
//! alice.write_at(ptr, 0, "LEVEL").await?;
//! let event = changes.next().await.unwrap();
//! assert_eq!(event.version, v + 1);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod blocking;
mod client;
mod conn;
mod error;
mod options;
pub mod raw;
mod watch;

pub use client::Client;
pub use error::{Error, Result};
pub use netswap_proto::{
    Access, Event, HelloInfo, Identity, NewOwner, ParsePointerError, Pointer, RecordInfo, Status,
    Version,
};
pub use options::{ConnectionState, Options, Reconnect};
pub use watch::{Mirror, MirrorEvent, MirrorView, Watch, WatchEvent};

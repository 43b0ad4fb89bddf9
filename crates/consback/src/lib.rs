//! The Xen PV console backend (`io/console.h`): libxl's channels and
//! secondary consoles (`backend/console`, as QEMU's `xen_console.c` serves
//! them) and the primary console of every domain (`/local/domain/N/console`,
//! as xenconsoled serves it). One console is one page of two byte rings
//! served on a worker of the backend framework ([`ConsoleRing`]), connected
//! to a pty or a unix socket on the host ([`Host`]). See `docs/console.md`.
#![deny(missing_docs)]

pub mod abi;
pub mod config;
mod device;
mod host;
mod log;
mod primary;
mod ring;

pub use config::{ConfigError, Connection, ConsoleNodes, ConsoleSpec};
pub use device::{ChardevLookup, ConsoleDeviceType, ConsoleOptions, TtyPublished};
pub use host::{Host, HostError, HostRead};
pub use log::LogFile;
pub use primary::{
    decide, running_xenconsoled, Decision, PrimaryConsoles, PrimaryError, PrimaryNodes, PrimaryOptions,
    XENCONSOLED_PID_FILES,
};
pub use ring::{ConsoleRing, HostSlot, Limits, OutputSink, Overflow, BYTES_PER_UNIT, DEFAULT_BURST, DEFAULT_RATE};

//! The library parts of `xenbackd`, so that the fuzz targets and tests
//! reach them: the device-model mode's QEMU command line as libxl writes
//! it ([`dm_args`]) and the QMP subset libxl speaks ([`qmp`]); a running
//! daemon's control socket ([`control`]), what it shows ([`status`]) and
//! its readiness notification to systemd ([`sd_notify`]). The binary
//! (`src/main.rs`) does the rest.
#![deny(missing_docs)]

pub mod control;
pub mod dm_args;
pub mod qmp;
pub mod sd_notify;
pub mod status;

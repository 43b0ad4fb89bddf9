//! The pure parts of `xenbackd`'s device-model mode, as a library so that
//! the fuzz targets and tests reach them: QEMU's command line as libxl
//! writes it ([`dm_args`]) and the QMP subset libxl speaks ([`qmp`]). The
//! binary (`src/main.rs`) does the I/O.
#![deny(missing_docs)]

pub mod dm_args;
pub mod qmp;

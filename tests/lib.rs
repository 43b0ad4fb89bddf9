//! Shared helpers for the scenario tests in this directory.

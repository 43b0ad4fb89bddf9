//! Simulated domains, event channels and grant tables.

//! What postbox's demo, tests and benchmark share and the product does not
//! ship as library API: a throwaway PostgreSQL cluster made from the local
//! server binaries, and a recording HTTP receiver for tests.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod receiver;
pub mod throwaway;

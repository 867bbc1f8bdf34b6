//! Strata's front-end: the QMP protocol layer ([`qmp`]) and the `stratad`
//! daemon ([`daemon`]).

pub mod daemon;
pub mod qmp;

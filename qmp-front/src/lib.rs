//! Strata's user-facing front-end: the QMP protocol layer ([`qmp`]), the
//! `stratad` daemon ([`daemon`]), the NBD server ([`nbd`]) and the
//! `strata-img` tool ([`img`]).

pub mod daemon;
pub mod img;
pub mod nbd;
pub mod qmp;

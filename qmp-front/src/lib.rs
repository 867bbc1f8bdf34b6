//! Strata's user-facing front-end: the QMP protocol layer ([`qmp`]), the
//! NBD server ([`nbd`]) and the `strata-img` tool ([`img`]).

pub mod img;
pub mod nbd;
pub mod qmp;

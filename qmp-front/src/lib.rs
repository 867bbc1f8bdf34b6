//! Strata's front-end (work in progress): the `strata-img` tool lives in
//! [`img`].
pub mod img;

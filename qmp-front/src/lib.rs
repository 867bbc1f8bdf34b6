//! Strata's front-end (work in progress).

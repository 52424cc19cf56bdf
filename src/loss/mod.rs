//! Training objectives.
pub mod cz_nce;

//! Training objectives.

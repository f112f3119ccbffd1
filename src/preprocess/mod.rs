//! preprocessing

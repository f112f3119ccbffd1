//! localisation

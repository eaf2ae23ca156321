//! bad_setup

//! Rotator: keeps a short-lived mesh identity on disk and rotates it atomically.
#![forbid(unsafe_code)]

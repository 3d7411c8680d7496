//! Code shared by the integration tests (and, by path, the examples).

pub mod virtio_rng;

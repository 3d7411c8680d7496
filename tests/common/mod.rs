//! Code shared by the integration tests (and, by path, the examples).

#[allow(dead_code)]
pub mod vhost_backend;
#[allow(dead_code)]
pub mod virtio_rng;

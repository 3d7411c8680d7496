//! Code shared by the integration tests (and, by path, the examples).

#[cfg(feature = "virtio-queue")]
#[allow(dead_code)]
pub mod suppression;
#[allow(dead_code)]
pub mod vhost_backend;
#[allow(dead_code)]
pub mod virtio_rng;

//! virtio-blk (placeholder until written below).

//! Legacy (port I/O) devices: 8250 serial, i8042 reset, boot-done / power-intent marker.

pub mod legacy;
pub mod output;

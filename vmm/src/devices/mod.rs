//! Legacy (port I/O) devices: 8250 serial, i8042 (keyboard for Ctrl-Alt-Del, reset line), boot-done / power-intent marker.

pub mod i8042;
pub mod legacy;
pub mod output;

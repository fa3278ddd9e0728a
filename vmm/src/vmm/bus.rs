//! The virtio-mmio bus: one window per device, dispatched by address.

use std::sync::{Arc, Mutex};

use crate::layout::VIRTIO_MMIO_SIZE;
use crate::virtio::mmio::MmioTransport;

/// One virtio-mmio device on the bus.
#[derive(Debug)]
pub struct MmioSlot {
    /// Window base address.
    pub base: u64,
    /// IRQ (IOAPIC pin / GSI).
    pub irq: u32,
    /// Device name for metrics.
    pub name: String,
    /// The transport.
    pub transport: Mutex<MmioTransport>,
}

/// MMIO dispatch.
#[derive(Debug, Default)]
pub struct MmioBus {
    pub(super) slots: Vec<Arc<MmioSlot>>,
}

impl MmioBus {
    fn find(&self, addr: u64) -> Option<(&MmioSlot, u64)> {
        self.slots
            .iter()
            .find(|s| addr >= s.base && addr < s.base + VIRTIO_MMIO_SIZE)
            .map(|s| (s.as_ref(), addr - s.base))
    }

    /// Guest MMIO read.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((s, off)) => {
                s.transport
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Guest MMIO write.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((s, off)) => {
                s.transport
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }

    /// The devices.
    pub fn slots(&self) -> &[Arc<MmioSlot>] {
        &self.slots
    }
}

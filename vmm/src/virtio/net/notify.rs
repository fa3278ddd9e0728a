//! Notification suppression for the userspace device (VIRTIO_RING_F_EVENT_IDX).
//!
//! With EVENT_IDX the driver says, in the avail ring's `used_event`, after which used entry
//! it wants the next interrupt, and the device says, in the used ring's `avail_event`,
//! after which avail entry it wants the next kick. Each side then signals once per batch
//! instead of once per frame: fewer interrupts into the guest and fewer exits out of it.
//!
//! The device's own bookkeeping is kept here rather than in `virtio_queue::Queue`: RX makes
//! a merged frame's used entries visible with one index update ([`super::rx`]), which the
//! queue's count of added entries does not see, and RX rolls `next_avail` back when a frame
//! does not fit, so the kick it asks for must be at the driver's current avail index, not
//! at `next_avail` (the driver would never cross that again).

use std::sync::atomic::{Ordering, fence};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The avail ring's header (flags, idx) and the used ring's, in bytes.
const RING_HEADER: u64 = 4;

/// Whether an interrupt is due: the driver's `event` lies in `[old, new)`, the used entries
/// added since the last decision (wrapping arithmetic, as the spec's `vring_need_event`).
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

fn used_event(q: &Queue, mem: &GuestMemoryMmap) -> Option<u16> {
    let addr = q
        .avail_ring()
        .checked_add(RING_HEADER + 2 * u64::from(q.size()))?;
    mem.load::<u16>(GuestAddress(addr), Ordering::Acquire)
        .ok()
        .map(u16::from_le)
}

/// Interrupt decisions for one queue.
#[derive(Debug, Clone, Copy)]
pub struct Suppress {
    event_idx: bool,
    /// `next_used` at the last decision.
    old: u16,
}

impl Suppress {
    /// For `q` as activated; `event_idx` when the driver accepted VIRTIO_RING_F_EVENT_IDX.
    pub fn new(q: &mut Queue, event_idx: bool) -> Self {
        q.set_event_idx(event_idx);
        Suppress {
            event_idx,
            old: q.next_used(),
        }
    }

    /// Whether the entries added to `q`'s used ring since the last call need an interrupt.
    /// Without EVENT_IDX: whenever the driver did not turn interrupts off.
    pub fn should_notify(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if !self.event_idx {
            return q.needs_notification(mem).unwrap_or(true);
        }
        let new = q.next_used();
        // The used index was published (release) before `used_event` is read.
        fence(Ordering::SeqCst);
        // An unreadable ring gets the interrupt: never lose one.
        let due = used_event(q, mem).is_none_or(|e| need_event(e, new, self.old));
        self.old = new;
        due
    }
}

/// Asks the driver to kick once its avail index moves past `idx` (EVENT_IDX: the used
/// ring's `avail_event`), then returns whether it already has: the avail index read after
/// a full fence differs from `idx`, so the caller looks again instead of waiting for a
/// kick that was decided before the request was visible. Without EVENT_IDX the driver
/// kicks on every addition anyway; this only reports the index.
pub fn ask_kick_after(
    q: &Queue,
    mem: &GuestMemoryMmap,
    idx: u16,
    event_idx: bool,
) -> Result<bool, virtio_queue::Error> {
    if event_idx {
        let addr = q
            .used_ring()
            .checked_add(RING_HEADER + 8 * u64::from(q.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        mem.store(u16::to_le(idx), GuestAddress(addr), Ordering::Release)
            .map_err(virtio_queue::Error::GuestMemory)?;
        fence(Ordering::SeqCst);
    }
    let now = q.avail_idx(mem, Ordering::Acquire)?;
    Ok(now.0 != idx)
}

/// The driver's avail index now.
pub fn avail_idx(q: &Queue, mem: &GuestMemoryMmap) -> Result<u16, virtio_queue::Error> {
    Ok(q.avail_idx(mem, Ordering::Acquire)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u16 = 16;
    /// Ring addresses, apart (virtio-queue's mock lays the used ring over the avail ring's
    /// tail, where `used_event` lives).
    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    fn setup() -> (GuestMemoryMmap, Queue) {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        (m, q)
    }

    fn set_used_event(m: &GuestMemoryMmap, v: u16) {
        let at = AVAIL + RING_HEADER + 2 * u64::from(SIZE);
        m.write_obj(v.to_le(), GuestAddress(at)).unwrap();
    }

    fn set_avail_idx(m: &GuestMemoryMmap, v: u16) {
        m.write_obj(v.to_le(), GuestAddress(AVAIL + 2)).unwrap();
    }

    fn avail_event(m: &GuestMemoryMmap) -> u16 {
        let at = USED + RING_HEADER + 8 * u64::from(SIZE);
        u16::from_le(m.read_obj(GuestAddress(at)).unwrap())
    }

    #[test]
    fn need_event_is_the_specs_window_with_wrapping() {
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 9, 3));
        assert!(!need_event(7, 6, 5), "the driver wants it later");
        assert!(!need_event(2, 6, 5), "already signalled past it");
        assert!(!need_event(3, 3, 3), "nothing added");
        assert!(need_event(0xffff, 1, 0xfffe), "across the wrap");
        assert!(!need_event(2, 1, 0xfffe));
    }

    #[test]
    fn event_idx_interrupts_once_the_drivers_used_event_is_passed() {
        let (m, mut q) = setup();
        let mut s = Suppress::new(&mut q, true);
        set_used_event(&m, 5);
        for head in 0..3 {
            q.add_used(&m, head, 0).unwrap();
        }
        assert!(
            !s.should_notify(&mut q, &m),
            "entries 0..3 are before used_event 5"
        );
        for head in 3..6 {
            q.add_used(&m, head, 0).unwrap();
        }
        assert!(s.should_notify(&mut q, &m), "entry 5 was added");
        q.add_used(&m, 6, 0).unwrap();
        assert!(
            !s.should_notify(&mut q, &m),
            "the driver has not moved used_event on"
        );
        // entries made visible behind the queue's back (RX's merged frames) still count
        q.set_next_used(9);
        set_used_event(&m, 8);
        assert!(s.should_notify(&mut q, &m));
    }

    #[test]
    fn without_event_idx_every_batch_interrupts() {
        let (m, mut q) = setup();
        let mut s = Suppress::new(&mut q, false);
        set_used_event(&m, 100);
        q.add_used(&m, 0, 0).unwrap();
        assert!(s.should_notify(&mut q, &m));
        assert!(!ask_kick_after(&q, &m, 0, false).unwrap());
        assert_eq!(avail_event(&m), 0, "nothing written without EVENT_IDX");
    }

    #[test]
    fn a_kick_is_asked_at_the_given_index_and_a_moved_ring_is_seen() {
        let (m, q) = setup();
        set_avail_idx(&m, 4);
        // RX rolled next_avail back to 2 but the driver is at 4: ask at 4
        assert_eq!(avail_idx(&q, &m).unwrap(), 4);
        assert!(!ask_kick_after(&q, &m, 4, true).unwrap());
        assert_eq!(avail_event(&m), 4);
        // asked at an index the driver has already passed: look again now
        assert!(ask_kick_after(&q, &m, 2, true).unwrap());
        assert_eq!(avail_event(&m), 2);
    }
}

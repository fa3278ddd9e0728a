//! Which blocks of the hot-plug region are plugged, and the requests that change it.
//!
//! Pure bookkeeping plus the host side of an unplug (the memory goes back to the host):
//! every guest-supplied range is checked here (aligned to the block size, inside the usable
//! region, non-empty, no overflow) before it touches the bitmap, whose size is fixed by
//! region / block at creation.

/// One decoded request from the guest (`struct virtio_mem_req`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// VIRTIO_MEM_REQ_PLUG.
    Plug {
        /// Guest physical address of the first block.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// VIRTIO_MEM_REQ_UNPLUG.
    Unplug {
        /// Guest physical address of the first block.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// VIRTIO_MEM_REQ_UNPLUG_ALL.
    UnplugAll,
    /// VIRTIO_MEM_REQ_STATE.
    State {
        /// Guest physical address of the first block.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// A request type the spec does not define.
    Unknown(u16),
}

/// A block range's state in a STATE answer (`VIRTIO_MEM_STATE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeState {
    /// Every block plugged.
    Plugged,
    /// No block plugged.
    Unplugged,
    /// Some of each.
    Mixed,
}

/// The answer to a request (`struct virtio_mem_resp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// VIRTIO_MEM_RESP_ACK.
    Ack,
    /// VIRTIO_MEM_RESP_ACK with a state (STATE requests).
    AckState(RangeState),
    /// VIRTIO_MEM_RESP_NACK: valid, but refused now (plugging beyond the requested size).
    Nack,
    /// VIRTIO_MEM_RESP_ERROR: the request is invalid (why: for the log).
    Error(&'static str),
}

/// The plugged-block bitmap of a region of `count` blocks.
#[derive(Debug)]
pub struct Blocks {
    bits: Vec<u64>,
    count: u64,
    plugged: u64,
}

impl Blocks {
    /// `count` blocks, all unplugged.
    pub fn new(count: u64) -> Self {
        let words = usize::try_from(count.div_ceil(64)).unwrap_or(usize::MAX);
        Blocks {
            bits: vec![0; words],
            count,
            plugged: 0,
        }
    }

    /// Number of plugged blocks.
    pub fn plugged(&self) -> u64 {
        self.plugged
    }

    /// Number of blocks.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn get(&self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        self.bits.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    fn set(&mut self, i: u64, on: bool) {
        let (w, b) = ((i / 64) as usize, i % 64);
        let Some(x) = self.bits.get_mut(w) else {
            return;
        };
        let was = *x & (1 << b) != 0;
        if on && !was {
            *x |= 1 << b;
            self.plugged += 1;
        } else if !on && was {
            *x &= !(1 << b);
            self.plugged -= 1;
        }
    }

    /// How many of blocks `first..first + n` are plugged (the range must be in bounds).
    pub fn plugged_in(&self, first: u64, n: u64) -> u64 {
        (first..first + n).filter(|&i| self.get(i)).count() as u64
    }

    /// Marks blocks `first..first + n` (in bounds) plugged or not.
    pub fn set_range(&mut self, first: u64, n: u64, on: bool) {
        for i in first..first + n {
            self.set(i, on);
        }
    }

    /// Unplugs every block.
    pub fn clear(&mut self) {
        self.bits.fill(0);
        self.plugged = 0;
    }
}

/// The geometry of the device-managed region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Guest physical address of the region.
    pub addr: u64,
    /// Region size (bytes).
    pub region_size: u64,
    /// Part of the region the guest may plug (bytes, from `addr`).
    pub usable_size: u64,
    /// Block size (bytes, a power of two).
    pub block_size: u64,
}

impl Geometry {
    /// The blocks `(first, n)` of a guest range, or why it is invalid: `addr` aligned to the
    /// block size and inside the usable region, at least one block, the end inside the
    /// usable region (overflow-checked).
    pub fn blocks(&self, addr: u64, nb_blocks: u16) -> Result<(u64, u64), &'static str> {
        if nb_blocks == 0 {
            return Err("zero blocks");
        }
        if !addr.is_multiple_of(self.block_size) {
            return Err("address not aligned to the block size");
        }
        let off = addr
            .checked_sub(self.addr)
            .ok_or("address below the region")?;
        let len = u64::from(nb_blocks)
            .checked_mul(self.block_size)
            .ok_or("length overflows")?;
        let end = off.checked_add(len).ok_or("range overflows")?;
        if off >= self.usable_size || end > self.usable_size {
            return Err("range outside the usable region");
        }
        Ok((off / self.block_size, u64::from(nb_blocks)))
    }
}

/// What executing a request did to host memory: a range to give back to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discard {
    /// Offset in the region (bytes).
    pub offset: u64,
    /// Length (bytes).
    pub len: u64,
}

/// Executes `req` on `blocks` with `requested` the size the host asked for: the answer, and
/// the range to give back to the host (the caller discards it after the bitmap changed).
pub fn execute(
    req: Request,
    geo: &Geometry,
    blocks: &mut Blocks,
    requested: u64,
) -> (Response, Option<Discard>) {
    match req {
        Request::Plug { addr, nb_blocks } => {
            let (first, n) = match geo.blocks(addr, nb_blocks) {
                Ok(r) => r,
                Err(why) => return (Response::Error(why), None),
            };
            if blocks.plugged_in(first, n) != 0 {
                return (Response::Error("plug of an already plugged block"), None);
            }
            let after = (blocks.plugged() + n).saturating_mul(geo.block_size);
            if after > requested {
                return (Response::Nack, None);
            }
            blocks.set_range(first, n, true);
            (Response::Ack, None)
        }
        Request::Unplug { addr, nb_blocks } => {
            let (first, n) = match geo.blocks(addr, nb_blocks) {
                Ok(r) => r,
                Err(why) => return (Response::Error(why), None),
            };
            if blocks.plugged_in(first, n) != n {
                return (
                    Response::Error("unplug of a block that is not plugged"),
                    None,
                );
            }
            blocks.set_range(first, n, false);
            let d = Discard {
                offset: first * geo.block_size,
                len: n * geo.block_size,
            };
            (Response::Ack, Some(d))
        }
        Request::UnplugAll => {
            blocks.clear();
            // The whole region: also what a guest touched without plugging it.
            let d = Discard {
                offset: 0,
                len: geo.region_size,
            };
            (Response::Ack, Some(d))
        }
        Request::State { addr, nb_blocks } => {
            let (first, n) = match geo.blocks(addr, nb_blocks) {
                Ok(r) => r,
                Err(why) => return (Response::Error(why), None),
            };
            let state = match blocks.plugged_in(first, n) {
                0 => RangeState::Unplugged,
                p if p == n => RangeState::Plugged,
                _ => RangeState::Mixed,
            };
            (Response::AckState(state), None)
        }
        Request::Unknown(_) => (Response::Error("unknown request type"), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 4 << 30;

    fn geo() -> Geometry {
        Geometry {
            addr: BASE,
            region_size: 128 * MIB,
            usable_size: 128 * MIB,
            block_size: 2 * MIB,
        }
    }

    #[test]
    fn ranges_are_checked() {
        let g = geo();
        assert_eq!(g.blocks(BASE, 1), Ok((0, 1)));
        assert_eq!(g.blocks(BASE + 126 * MIB, 1), Ok((63, 1)));
        assert_eq!(g.blocks(BASE, 64), Ok((0, 64)));
        for (addr, n) in [
            (BASE, 0),
            (BASE + 4096, 1),
            (BASE - 2 * MIB, 1),
            (BASE + 128 * MIB, 1),
            (BASE + 126 * MIB, 2),
            (BASE, 65),
            (u64::MAX - 2 * MIB + 1, u16::MAX),
            (0, 1),
            (!(2 * MIB - 1), u16::MAX),
        ] {
            assert!(g.blocks(addr, n).is_err(), "{addr:#x}+{n}");
        }
    }

    #[test]
    fn bitmap_counts() {
        let mut b = Blocks::new(130);
        assert_eq!(b.bits.len(), 3);
        b.set_range(60, 10, true);
        assert_eq!(b.plugged(), 10);
        b.set_range(65, 10, true);
        assert_eq!(b.plugged(), 15);
        assert_eq!(b.plugged_in(0, 130), 15);
        assert_eq!(b.plugged_in(64, 2), 2);
        b.set_range(129, 1, true);
        b.set_range(60, 5, false);
        assert_eq!(b.plugged(), 11);
        b.clear();
        assert_eq!(b.plugged_in(0, 130), 0);
        assert_eq!(b.plugged(), 0);
    }

    #[test]
    fn plug_unplug_state_unplug_all() {
        let g = geo();
        let mut b = Blocks::new(64);
        let req = 8 * MIB;
        let plug = |addr, nb_blocks| Request::Plug { addr, nb_blocks };
        let unplug = |addr, nb_blocks| Request::Unplug { addr, nb_blocks };
        let state = |addr, nb_blocks| Request::State { addr, nb_blocks };
        assert_eq!(execute(plug(BASE, 2), &g, &mut b, req).0, Response::Ack);
        // Twice: an error. Beyond the requested size: NACK, nothing plugged.
        assert!(matches!(
            execute(plug(BASE, 1), &g, &mut b, req).0,
            Response::Error(_)
        ));
        assert_eq!(
            execute(plug(BASE + 4 * MIB, 3), &g, &mut b, req).0,
            Response::Nack
        );
        assert_eq!(b.plugged(), 2);
        assert_eq!(
            execute(plug(BASE + 4 * MIB, 2), &g, &mut b, req).0,
            Response::Ack
        );
        assert_eq!(
            execute(state(BASE, 4), &g, &mut b, req).0,
            Response::AckState(RangeState::Plugged)
        );
        assert_eq!(
            execute(state(BASE, 5), &g, &mut b, req).0,
            Response::AckState(RangeState::Mixed)
        );
        assert_eq!(
            execute(state(BASE + 8 * MIB, 56), &g, &mut b, req).0,
            Response::AckState(RangeState::Unplugged)
        );
        // Unplug of a partly unplugged range: an error, nothing changes.
        assert!(matches!(
            execute(unplug(BASE + 6 * MIB, 2), &g, &mut b, req).0,
            Response::Error(_)
        ));
        assert_eq!(b.plugged(), 4);
        assert_eq!(
            execute(unplug(BASE + 2 * MIB, 2), &g, &mut b, req),
            (
                Response::Ack,
                Some(Discard {
                    offset: 2 * MIB,
                    len: 4 * MIB
                })
            )
        );
        assert_eq!(
            execute(state(BASE, 4), &g, &mut b, req).0,
            Response::AckState(RangeState::Mixed)
        );
        assert_eq!(
            execute(Request::UnplugAll, &g, &mut b, req),
            (
                Response::Ack,
                Some(Discard {
                    offset: 0,
                    len: 128 * MIB
                })
            )
        );
        assert_eq!(b.plugged(), 0);
        assert!(matches!(
            execute(Request::Unknown(7), &g, &mut b, req).0,
            Response::Error(_)
        ));
    }
}

//! Interrupts for devices whose rings a vhost backend serves (virtio-fs over vhost-user,
//! virtio-net over vhost-net): the backend signals one call eventfd per queue, and a worker
//! turns each signal into a virtio-mmio interrupt. The call fd cannot be the KVM irqfd
//! itself: the guest's virtio-mmio driver reads InterruptStatus and only looks at the rings
//! when the VRING bit is set, and only the VMM can set that bit ([`Interrupt::notify_queue`]).
//! The same worker runs the lab-only rescue tick for those interrupts.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::event::{EpollSet, EventHandler};
use super::worker::{Worker, rescue_period};
use super::{ActiveQueue, Interrupt, IrqWatch};

/// One non-blocking call eventfd per queue.
pub fn call_fds(n: usize) -> std::io::Result<Vec<EventFd>> {
    (0..n).map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect()
}

/// The worker's handler: call eventfds become virtio-mmio interrupts.
struct CallsToIrq {
    calls: Vec<EventFd>,
    /// The kick fds stay open here for as long as the backend may use them.
    _queues: Vec<ActiveQueue>,
    count: Arc<AtomicU64>,
    interrupt: Arc<Interrupt>,
    watch: IrqWatch,
}

impl EventHandler for CallsToIrq {
    type Error = std::convert::Infallible;

    fn on_event(&mut self, _: &EpollSet, token: u64, _: EventSet) -> Result<(), Self::Error> {
        if let Some(c) = self.calls.get(token as usize) {
            let _ = c.read();
            self.count.fetch_add(1, Ordering::Relaxed);
            self.interrupt.notify_queue();
        }
        Ok(())
    }

    /// The backend's rings are its own to serve; ours is the interrupt it asked for.
    fn on_timer(&mut self, _: &EpollSet) -> Result<(), Self::Error> {
        self.interrupt.rescue(&mut self.watch);
        Ok(())
    }
}

/// Starts the worker named `name` relaying `calls` to `interrupt`, counting in `count`;
/// it keeps `queues` (their kick eventfds) alive until it stops.
pub fn spawn_relay(
    name: &str,
    calls: Vec<EventFd>,
    queues: Vec<ActiveQueue>,
    count: Arc<AtomicU64>,
    interrupt: Arc<Interrupt>,
) -> std::io::Result<Worker> {
    Worker::spawn(name, crate::seccomp::ThreadKind::VhostIrq, move |mut lp| {
        for (i, c) in calls.iter().enumerate() {
            if lp
                .epoll()
                .add(c.as_raw_fd(), i as u64, EventSet::IN)
                .is_err()
            {
                interrupt.fail("epoll");
                return;
            }
        }
        lp.set_timer(rescue_period());
        // The run ends on the stop eventfd or an epoll failure; the handler never fails.
        let _ = lp.run(&mut CallsToIrq {
            calls,
            _queues: queues,
            count,
            interrupt,
            watch: IrqWatch::default(),
        });
    })
}

//! Port-I/O devices and their dispatch: COM1 (8250, vm-superio), the i8042 controller
//! ([`super::i8042`]: keyboard for Ctrl-Alt-Del, reset line) and the marker port.

use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::i8042::{Action, I8042};
use crate::devices::output::BoundedOutput;
use crate::layout::{I8042_PORT, MARKER_PORT, SERIAL_PORT};
use crate::state::{ExitCounters, VmState};

/// Raises an interrupt by signalling an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

const I8042_STATUS: u16 = I8042_PORT + 4;

/// The 8250 UART type we use.
pub type SerialDevice = Serial<IrqTrigger, NoEvents, BoundedOutput>;

/// All port-I/O devices.
pub struct PioBus {
    serial: Mutex<SerialDevice>,
    i8042: Mutex<I8042>,
    kbd_irq: EventFd,
    state: Arc<VmState>,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PioBus").finish_non_exhaustive()
    }
}

impl PioBus {
    /// Creates the bus; `serial_irq` and `kbd_irq` are the eventfds registered for IRQ 4
    /// and IRQ 1.
    pub fn new(
        serial_irq: EventFd,
        kbd_irq: EventFd,
        out: BoundedOutput,
        state: Arc<VmState>,
    ) -> Self {
        PioBus {
            serial: Mutex::new(Serial::new(IrqTrigger(serial_irq), out)),
            i8042: Mutex::new(I8042::new()),
            kbd_irq,
            state,
        }
    }

    fn i8042_action(&self, a: Action) {
        match a {
            Action::None => {}
            Action::Irq => {
                if let Err(e) = self.kbd_irq.write(1) {
                    tracing::warn!(error = %e, "cannot raise the keyboard interrupt");
                }
            }
            Action::Reset => self.state.guest_reset(false),
        }
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard (a shutdown request the guest kernel
    /// turns into a restart, or into SIGINT for PID 1 once it disabled C-A-D).
    pub fn ctrl_alt_del(&self) {
        let a = self
            .i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ctrl_alt_del();
        self.i8042_action(a);
    }

    /// Guest `in` on `port`; `data` is filled (0xff for unclaimed ports).
    pub fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                data[0] = s.read((p - SERIAL_PORT) as u8);
            }
            I8042_STATUS if data.len() == 1 => {
                data[0] = self
                    .i8042
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .status();
            }
            // 0x61..=0x63 sit between the i8042's ports (0x61 is handled by KVM's PIT).
            p if p > I8042_PORT && p < I8042_STATUS => data.fill(0),
            I8042_PORT if data.len() == 1 => {
                let (v, a) = self
                    .i8042
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read_data();
                data[0] = v;
                self.i8042_action(a);
            }
            _ => ExitCounters::bump(&self.state.exits.unhandled),
        }
    }

    /// Guest `out` to `port`.
    pub fn write(&self, port: u16, data: &[u8]) {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = s.write((p - SERIAL_PORT) as u8, data[0]) {
                    tracing::warn!(error = ?e, "serial write failed");
                }
            }
            I8042_STATUS if data.len() == 1 => {
                let a = self
                    .i8042
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_command(data[0]);
                self.i8042_action(a);
            }
            p if p > I8042_PORT && p < I8042_STATUS => {}
            I8042_PORT if data.len() == 1 => {
                let a = self
                    .i8042
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_data(data[0]);
                self.i8042_action(a);
            }
            MARKER_PORT if !data.is_empty() => self.state.marker_write(data[0]),
            _ => ExitCounters::bump(&self.state.exits.unhandled),
        }
    }

    /// The console output (for stats and draining at exit).
    pub fn console(&self) -> BoundedOutput {
        let s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        s.writer().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitReason;
    use std::time::{Duration, Instant};

    #[test]
    fn i8042_reset_and_marker() {
        let state = Arc::new(VmState::new(Instant::now()));
        let out = BoundedOutput::spawn(Box::new(std::io::sink())).unwrap();
        let kbd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let bus = PioBus::new(
            EventFd::new(0).unwrap(),
            kbd.try_clone().unwrap(),
            out,
            state.clone(),
        );
        bus.write(MARKER_PORT, &[123]);
        assert!(state.boot_done().is_some());
        let mut st = [0u8; 1];
        bus.read(I8042_STATUS, &mut st);
        assert_eq!(
            st[0] & 0x02,
            0,
            "input buffer must read empty for the reboot path"
        );
        // Ctrl-Alt-Del: IRQ 1 and the scancodes on the data port.
        bus.ctrl_alt_del();
        assert_eq!(kbd.read().unwrap(), 1);
        bus.read(I8042_STATUS, &mut st);
        assert_eq!(st[0] & 1, 1);
        let mut d = [0u8; 1];
        bus.read(I8042_PORT, &mut d);
        assert_eq!(d[0], crate::devices::i8042::CTRL_ALT_DEL_SET2[0]);
        assert_eq!(kbd.read().unwrap(), 1, "IRQ for the next byte");
        bus.write(MARKER_PORT, &[crate::state::MARKER_POWER_OFF]);
        bus.write(I8042_PORT + 4, &[0xfe]);
        assert_eq!(
            state.wait_exit(Some(Duration::from_secs(1))),
            Some(ExitReason::PowerOff)
        );
    }

    #[test]
    fn serial_output_reaches_destination_and_raises_irq() {
        #[derive(Clone)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(d);
                Ok(d.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let got = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(VmState::new(Instant::now()));
        let out = BoundedOutput::spawn(Box::new(Sink(got.clone()))).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let bus = PioBus::new(
            irq.try_clone().unwrap(),
            EventFd::new(0).unwrap(),
            out,
            state,
        );
        bus.write(SERIAL_PORT + 1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi\n" {
            bus.write(SERIAL_PORT, &[*b]);
        }
        bus.console().drain(Duration::from_secs(2));
        assert_eq!(&*got.lock().unwrap(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
        let mut d = [0u8; 1];
        bus.read(0x1234, &mut d);
        assert_eq!(d[0], 0xff);
    }
}

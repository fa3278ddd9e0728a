//! A minimal i8042 keyboard controller: enough for Linux's `i8042` + `atkbd` drivers to
//! find a keyboard (so the VMM can press Ctrl-Alt-Del), and the CPU reset line (`reboot=k`).
//!
//! Ports: 0x60 data, 0x64 status (read) / command (write). The controller answers the
//! commands Linux sends at probe and reboot (read/write the command byte, self tests,
//! enable/disable the keyboard, output port, null command, pulse reset), and the keyboard
//! behind it ACKs commands (`GET ID` answers a standard MF2 keyboard). Keyboard bytes wait in
//! a small bounded queue; IRQ 1 is raised per byte while the keyboard interrupt is enabled in
//! the command byte. There is no AUX (mouse) port: the VMM's command line has `i8042.noaux`.
//! vm-superio's `I8042Device` is not used: it does not answer the probe's self tests, so the
//! guest's probe ran into timeouts, and its command byte handling cannot be observed.

use std::collections::VecDeque;

/// Status register: output buffer full.
pub const STR_OBF: u8 = 0x01;
/// Status register: input buffer full (never set: we consume writes at once).
pub const STR_IBF: u8 = 0x02;
/// Status register: system flag (self test passed).
const STR_SYS: u8 = 0x04;
/// Status register: keyboard not inhibited (no keylock).
const STR_KEYLOCK: u8 = 0x10;
/// Command byte: keyboard interrupt enabled.
pub const CTR_KBDINT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
/// Command byte: keyboard interface disabled.
pub const CTR_KBDDIS: u8 = 0x10;
/// Command byte: translate scancodes to set 1.
pub const CTR_XLATE: u8 = 0x40;

/// Most keyboard bytes kept for the guest; more are dropped (the guest is not reading).
const QUEUE_MAX: usize = 32;

/// Ctrl, Alt, Del pressed then released, scancode set 2 (the keyboard's native set).
pub const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
/// The same through the controller's translation to set 1 (when the guest enables it).
pub const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// What a port write asks the VMM to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond the device's own state.
    None,
    /// Raise IRQ 1.
    Irq,
    /// The guest pulsed the CPU reset line.
    Reset,
}

/// Controller state.
#[derive(Debug)]
pub struct I8042 {
    ctr: u8,
    outp: u8,
    /// A controller command waiting for its data byte (0x60 write command byte, 0xd1 write
    /// output port, 0xd2 write keyboard output buffer).
    pending: Option<u8>,
    /// A controller command's answer (read before keyboard bytes).
    reply: Option<u8>,
    kbd: VecDeque<u8>,
    dropped: u64,
}

impl Default for I8042 {
    fn default() -> Self {
        I8042 {
            ctr: CTR_KBDINT | CTR_SYS,
            outp: 0x03,
            pending: None,
            reply: None,
            kbd: VecDeque::new(),
            dropped: 0,
        }
    }
}

impl I8042 {
    /// New controller (keyboard interrupt enabled, no translation).
    pub fn new() -> Self {
        Self::default()
    }

    fn kbd_irq_enabled(&self) -> bool {
        self.ctr & CTR_KBDINT != 0 && self.ctr & CTR_KBDDIS == 0
    }

    /// Queues keyboard bytes; returns whether IRQ 1 should be raised now.
    fn push_kbd(&mut self, bytes: &[u8]) -> Action {
        let was_empty = self.kbd.is_empty() && self.reply.is_none();
        for &b in bytes {
            if self.kbd.len() < QUEUE_MAX {
                self.kbd.push_back(b);
            } else {
                self.dropped += 1;
            }
        }
        if was_empty && !self.kbd.is_empty() && self.kbd_irq_enabled() {
            Action::Irq
        } else {
            Action::None
        }
    }

    /// Presses and releases Ctrl-Alt-Del on the keyboard.
    pub fn ctrl_alt_del(&mut self) -> Action {
        if self.ctr & CTR_XLATE != 0 {
            self.push_kbd(&CTRL_ALT_DEL_SET1)
        } else {
            self.push_kbd(&CTRL_ALT_DEL_SET2)
        }
    }

    /// Keyboard bytes dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The command byte (for tests and diagnostics).
    pub fn command_byte(&self) -> u8 {
        self.ctr
    }

    /// Status register.
    pub fn status(&self) -> u8 {
        let obf = if self.reply.is_some() || !self.kbd.is_empty() {
            STR_OBF
        } else {
            0
        };
        obf | STR_SYS | STR_KEYLOCK
    }

    /// Reads the data port; the second value says whether IRQ 1 must be raised for the next
    /// queued keyboard byte.
    pub fn read_data(&mut self) -> (u8, Action) {
        if let Some(r) = self.reply.take() {
            return (r, Action::None);
        }
        match self.kbd.pop_front() {
            Some(b) => {
                let next = if !self.kbd.is_empty() && self.kbd_irq_enabled() {
                    Action::Irq
                } else {
                    Action::None
                };
                (b, next)
            }
            None => (0, Action::None),
        }
    }

    /// Writes the command port.
    pub fn write_command(&mut self, cmd: u8) -> Action {
        self.pending = None;
        match cmd {
            0x20 => self.reply = Some(self.ctr),
            0x60 | 0xd1 | 0xd2 => self.pending = Some(cmd),
            0xa7 | 0xa8 => {} // AUX disable/enable: there is no AUX port
            0xa9 => self.reply = Some(0xff), // AUX interface test: no AUX port
            0xaa => self.reply = Some(0x55), // controller self test passed
            0xab => self.reply = Some(0x00), // keyboard interface test passed
            0xad => self.ctr |= CTR_KBDDIS,
            0xae => self.ctr &= !CTR_KBDDIS,
            0xd0 => self.reply = Some(self.outp),
            // Pulse output lines; bit 0 low pulses the CPU reset line.
            0xf0..=0xff if cmd & 1 == 0 => return Action::Reset,
            other => tracing::debug!(cmd = other, "i8042: ignored command"),
        }
        Action::None
    }

    /// Writes the data port: a controller command's parameter, or a byte for the keyboard.
    pub fn write_data(&mut self, v: u8) -> Action {
        match self.pending.take() {
            Some(0x60) => {
                self.ctr = v;
                if !self.kbd.is_empty() && self.kbd_irq_enabled() {
                    return Action::Irq;
                }
                Action::None
            }
            Some(0xd1) => {
                self.outp = v;
                if v & 1 == 0 {
                    Action::Reset
                } else {
                    Action::None
                }
            }
            Some(_) => self.push_kbd(&[v]),
            None => {
                // A keyboard command: ACK it; GET ID answers an MF2 keyboard, RESET passes
                // the basic assurance test.
                match v {
                    0xf2 => self.push_kbd(&[0xfa, 0xab, 0x83]),
                    0xff => self.push_kbd(&[0xfa, 0xaa]),
                    0xee => self.push_kbd(&[0xee]), // echo
                    _ => self.push_kbd(&[0xfa]),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_probe_sequence() {
        let mut k = I8042::new();
        // flush: nothing pending
        assert_eq!(k.status() & STR_OBF, 0);
        assert_eq!(k.status() & STR_IBF, 0);
        assert_ne!(k.status() & STR_KEYLOCK, 0);
        // read the command byte twice (stable)
        for _ in 0..2 {
            k.write_command(0x20);
            assert_ne!(k.status() & STR_OBF, 0);
            assert_eq!(k.read_data().0, CTR_KBDINT | CTR_SYS);
        }
        // self test
        k.write_command(0xaa);
        assert_eq!(k.read_data().0, 0x55);
        // disable kbd + interrupt, write back
        k.write_command(0x60);
        assert_eq!(k.write_data(CTR_KBDDIS | CTR_SYS), Action::None);
        assert_eq!(k.command_byte(), CTR_KBDDIS | CTR_SYS);
        // A20 through the output port, null command
        k.write_command(0xd1);
        assert_eq!(k.write_data(0xdf), Action::None);
        assert_eq!(k.write_command(0xff), Action::None);
        // keys while disabled are queued but raise no interrupt
        assert_eq!(k.ctrl_alt_del(), Action::None);
        // enabling the keyboard interrupt raises it for the queued bytes
        k.write_command(0x60);
        assert_eq!(k.write_data(CTR_KBDINT | CTR_SYS), Action::Irq);
        let mut got = Vec::new();
        loop {
            let (b, a) = k.read_data();
            got.push(b);
            if a != Action::Irq {
                break;
            }
        }
        assert_eq!(got, CTRL_ALT_DEL_SET2);
        assert_eq!(k.status() & STR_OBF, 0);
    }

    #[test]
    fn ctrl_alt_del_raises_irq_per_byte_and_translates() {
        let mut k = I8042::new();
        assert_eq!(k.ctrl_alt_del(), Action::Irq);
        for (i, &want) in CTRL_ALT_DEL_SET2.iter().enumerate() {
            let (b, a) = k.read_data();
            assert_eq!(b, want);
            let last = i + 1 == CTRL_ALT_DEL_SET2.len();
            assert_eq!(a, if last { Action::None } else { Action::Irq });
        }
        k.write_command(0x60);
        k.write_data(CTR_KBDINT | CTR_SYS | CTR_XLATE);
        assert_eq!(k.ctrl_alt_del(), Action::Irq);
        let got: Vec<u8> = (0..CTRL_ALT_DEL_SET1.len())
            .map(|_| k.read_data().0)
            .collect();
        assert_eq!(got, CTRL_ALT_DEL_SET1);
    }

    #[test]
    fn queue_is_bounded_and_reset_line_pulses() {
        let mut k = I8042::new();
        k.write_command(0xad);
        for _ in 0..10 {
            k.ctrl_alt_del();
        }
        assert_eq!(k.kbd.len(), QUEUE_MAX);
        assert_eq!(
            k.dropped(),
            (10 * CTRL_ALT_DEL_SET2.len() - QUEUE_MAX) as u64
        );
        assert_eq!(k.write_command(0xfe), Action::Reset);
        assert_eq!(k.write_command(0xff), Action::None);
        k.write_command(0xd1);
        assert_eq!(k.write_data(0xde), Action::Reset);
    }

    #[test]
    fn keyboard_commands_are_acked() {
        let mut k = I8042::new();
        assert_eq!(k.write_data(0xf2), Action::Irq);
        let got: Vec<u8> = (0..3).map(|_| k.read_data().0).collect();
        assert_eq!(got, [0xfa, 0xab, 0x83]);
        k.write_data(0xed);
        assert_eq!(k.read_data().0, 0xfa);
    }
}

//! How the VM ended, and the process exit code each outcome maps to.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | guest powered off (power-off intent marker, then reset) or shutdown through the API |
//! | 1 | VMM runtime error (device setup, KVM ioctl failure, ...) |
//! | 2 | invalid command line / configuration (also clap's usage errors) |
//! | 3 | KVM missing or unable to run a Linux guest (e.g. software KVM) |
//! | 4 | kernel / initrd image unusable |
//! | 32 | guest asked for a reboot (i8042 reset without power-off intent) |
//! | 33 | guest triple fault (KVM shutdown exit without power-off intent) |
//! | 34 | guest could not be run (KVM internal error, emulation failure, failed entry) |

use std::fmt;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (power-off intent marker then reset), or the API shut it down.
    PowerOff,
    /// The guest reset the machine through the i8042 without announcing power-off.
    Reboot,
    /// KVM reported a shutdown (triple fault) without a power-off announcement.
    TripleFault,
    /// KVM could not run the guest.
    GuestCrash(String),
    /// The VMM itself failed while running.
    VmmError(String),
}

impl ExitReason {
    /// Process exit code for this outcome (see module docs).
    pub fn code(&self) -> i32 {
        match self {
            ExitReason::PowerOff => 0,
            ExitReason::VmmError(_) => 1,
            ExitReason::Reboot => 32,
            ExitReason::TripleFault => 33,
            ExitReason::GuestCrash(_) => 34,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reboot => write!(f, "guest requested a reboot"),
            ExitReason::TripleFault => write!(f, "guest triple fault (KVM shutdown exit)"),
            ExitReason::GuestCrash(why) => write!(f, "guest could not be run: {why}"),
            ExitReason::VmmError(why) => write!(f, "VMM error: {why}"),
        }
    }
}

/// Exit code for configuration / usage errors.
pub const EXIT_CONFIG: i32 = 2;
/// Exit code when KVM is missing or cannot run a Linux guest.
pub const EXIT_KVM: i32 = 3;
/// Exit code when the kernel or initrd cannot be used.
pub const EXIT_IMAGE: i32 = 4;
/// Exit code for runtime VMM errors.
pub const EXIT_VMM: i32 = 1;

//! Exit codes of `carapace` itself and the mapping from error chains to them.

use carapace_config::ConfigError;
use carapace_runtime::agent::AgentError;
use carapace_runtime::containerd_config::ContainerdConfigError;
use carapace_runtime::events::EventsError;
use carapace_runtime::exec_identity::IdentityError;
use carapace_runtime::keeper::KeeperError;
use carapace_runtime::oci;
use carapace_runtime::sandbox::SandboxError;
use carapace_runtime::state::StateError;

/// Exit codes of `carapace` itself (`run`/`exec` exit with the container process's status).
pub(crate) mod code {
    pub(crate) const FAILURE: u8 = 1;
    pub(crate) const USAGE: u8 = 2;
    pub(crate) const CONFIG: u8 = 3;
    pub(crate) const NOT_FOUND: u8 = 4;
    pub(crate) const CONFLICT: u8 = 5;
    pub(crate) const BAD_SPEC: u8 = 6;
    pub(crate) const HOST: u8 = 7;
    pub(crate) const HELPER: u8 = 8;
    pub(crate) const AGENT: u8 = 9;
    pub(crate) const MOUNT: u8 = 10;
    pub(crate) const TEARDOWN: u8 = 11;
    pub(crate) const CHECK_FAILED: u8 = 12;
    pub(crate) const NETWORK: u8 = 13;
    pub(crate) const HOOK: u8 = 14;
}

/// A failed `check`, carried to `main` for its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{failed} host check(s) failed")]
pub(crate) struct ChecksFailed {
    pub(crate) failed: usize,
}

fn state_exit_code(e: &StateError) -> u8 {
    match e {
        StateError::NotFound { .. } => code::NOT_FOUND,
        StateError::Exists { .. } | StateError::InvalidId { .. } => code::CONFLICT,
        StateError::RootTooLong { .. } => code::CONFIG,
        StateError::Io { .. } | StateError::Corrupt { .. } => code::FAILURE,
    }
}

fn sandbox_exit_code(e: &SandboxError) -> u8 {
    match e {
        SandboxError::State(s) => state_exit_code(s),
        SandboxError::Io { .. } => code::FAILURE,
        SandboxError::WrongStatus { .. } => code::CONFLICT,
        SandboxError::Spec(_) | SandboxError::Sizing(_) => code::BAD_SPEC,
        SandboxError::Image(_) => code::HOST,
        SandboxError::Process(_)
        | SandboxError::VmmExited { .. }
        | SandboxError::FsDaemonExited { .. }
        | SandboxError::Vmm(_)
        | SandboxError::Resize { .. } => code::HELPER,
        SandboxError::Agent(_) | SandboxError::AgentTimeout { .. } => code::AGENT,
        SandboxError::Mount(_) => code::MOUNT,
        SandboxError::Teardown { .. } => code::TEARDOWN,
        SandboxError::WithTeardown { error, .. } => sandbox_exit_code(error),
        SandboxError::Network(_) => code::NETWORK,
        SandboxError::Hook(_) => code::HOOK,
        SandboxError::Cgroup(_) | SandboxError::Jail(_) => code::HOST,
        SandboxError::Blocking(_) => code::FAILURE,
    }
}

fn keeper_exit_code(e: &KeeperError) -> u8 {
    match e {
        KeeperError::Sandbox(s) => sandbox_exit_code(s),
        KeeperError::State(s) => state_exit_code(s),
        KeeperError::Agent(_) => code::AGENT,
        // the keeper printed its own error; its exit code is that error's
        KeeperError::KeeperFailed { code, .. } => u8::try_from(*code).unwrap_or(code::FAILURE),
        KeeperError::Catch { .. }
        | KeeperError::Spawn { .. }
        | KeeperError::ReadyFd { .. }
        | KeeperError::Io { .. }
        | KeeperError::Blocking(_) => code::FAILURE,
    }
}

/// Maps an error chain to the exit code of its most specific known kind.
pub(crate) fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(k) = cause.downcast_ref::<KeeperError>() {
            return keeper_exit_code(k);
        }
        if cause.downcast_ref::<IdentityError>().is_some() {
            return code::USAGE;
        }
        if let Some(e) = cause.downcast_ref::<EventsError>() {
            return match e {
                EventsError::Sandbox(s) => sandbox_exit_code(s),
                EventsError::Agent(_) => code::AGENT,
                EventsError::Write(_) => code::FAILURE,
            };
        }
        if let Some(s) = cause.downcast_ref::<SandboxError>() {
            return sandbox_exit_code(s);
        }
        if let Some(s) = cause.downcast_ref::<StateError>() {
            return state_exit_code(s);
        }
        if cause.downcast_ref::<oci::SpecError>().is_some() {
            return code::BAD_SPEC;
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return code::CONFIG;
        }
        if cause.downcast_ref::<AgentError>().is_some() {
            return code::AGENT;
        }
        if cause.downcast_ref::<ChecksFailed>().is_some() {
            return code::CHECK_FAILED;
        }
        if let Some(e) = cause.downcast_ref::<ContainerdConfigError>() {
            return match e {
                ContainerdConfigError::Read { .. } | ContainerdConfigError::Render(_) => {
                    code::FAILURE
                }
                _ => code::CONFIG,
            };
        }
    }
    code::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_map_to_distinct_exit_codes() {
        let nf: anyhow::Error = SandboxError::State(StateError::NotFound {
            id: "x".into(),
            path: "/r/x/state.json".into(),
        })
        .into();
        assert_eq!(exit_code(&nf), code::NOT_FOUND);
        let wrapped = nf.context("deleting");
        assert_eq!(exit_code(&wrapped), code::NOT_FOUND);
        let spec: anyhow::Error = oci::SpecError::Exists {
            path: "/b/config.json".into(),
        }
        .into();
        assert_eq!(exit_code(&spec), code::BAD_SPEC);
        let ws: anyhow::Error = SandboxError::WrongStatus {
            id: "x".into(),
            status: "running",
            op: "delete",
        }
        .into();
        assert_eq!(exit_code(&ws), code::CONFLICT);
        let kf: anyhow::Error = KeeperError::KeeperFailed {
            exec_id: "e".into(),
            code: 9,
        }
        .into();
        assert_eq!(exit_code(&kf), code::AGENT);
        let ks: anyhow::Error = KeeperError::Sandbox(SandboxError::WrongStatus {
            id: "x".into(),
            status: "stopped",
            op: "exec a process",
        })
        .into();
        assert_eq!(exit_code(&ks.context("exec")), code::CONFLICT);
        let cf: anyhow::Error = ChecksFailed { failed: 2 }.into();
        assert_eq!(exit_code(&cf), code::CHECK_FAILED);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), code::FAILURE);
    }
}

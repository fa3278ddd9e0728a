//! `carapace features`: the runc-style features document (OCI runtime-spec
//! `features.md`), describing what the guest agent implements for containers.

use serde_json::{Value, json};

use crate::state::OCI_VERSION;

/// Mount options passed through to mount(2) in the guest.
use carapace_protocol::MOUNT_OPTIONS;

/// Namespaces the agent creates for each container in the guest (the network is the VM's,
/// shared by the sandbox's containers).
const NAMESPACES: &[&str] = &["cgroup", "ipc", "mount", "pid", "uts"];

/// Linux capabilities, in kernel order (0 ..= 40), all known to the guest kernel.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// seccomp actions the agent compiles (its profile compiler refuses the others).
const SECCOMP_ACTIONS: &[&str] = &[
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_LOG",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_TRAP",
];

/// seccomp argument operators.
const SECCOMP_OPERATORS: &[&str] = &[
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_LE",
    "SCMP_CMP_LT",
    "SCMP_CMP_MASKED_EQ",
    "SCMP_CMP_NE",
];

/// The features document.
pub fn document() -> Value {
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        // On the host (crate::hooks), startContainer in the container, inside the VM.
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": MOUNT_OPTIONS,
        "linux": {
            "namespaces": NAMESPACES,
            "capabilities": CAPABILITIES,
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false, "rdma": false},
            "seccomp": {
                "enabled": true,
                "actions": SECCOMP_ACTIONS,
                "operators": SECCOMP_OPERATORS,
                "archs": ["SCMP_ARCH_X86_64"],
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false},
        },
        "annotations": {
            "io.carapace.runtime.version": env!("CARGO_PKG_VERSION"),
            "io.carapace.runtime.isolation": "microvm",
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_parses_as_oci_features() {
        let v = document();
        let f: oci_spec::runtime::Features = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(f.oci_version_max(), OCI_VERSION);
        let hooks = f.hooks().clone().unwrap_or_default();
        assert!(hooks.iter().any(|h| h == "createRuntime"), "{hooks:?}");
        assert!(hooks.iter().any(|h| h == "startContainer"), "{hooks:?}");
        // what the guest agent creates (guest-agent/src/namespaces.rs); not the network
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns, &["cgroup", "ipc", "mount", "pid", "uts"]);
        let caps = v["linux"]["capabilities"].as_array().unwrap();
        assert_eq!(caps.len(), 41);
        for c in caps {
            // Every name is one oci-spec knows.
            serde_json::from_value::<oci_spec::runtime::Capability>(c.clone()).unwrap();
        }
        assert!(
            f.mount_options()
                .as_ref()
                .unwrap()
                .iter()
                .any(|o| o == "ro")
        );
    }
}

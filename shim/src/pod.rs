//! Pod semantics from the CRI annotations in a bundle's `config.json`.
//!
//! One VM per pod: the CRI plugin creates the pod's sandbox (pause) container with
//! `io.kubernetes.cri.container-type=sandbox`, then each workload container with
//! `container-type=container` and `io.kubernetes.cri.sandbox-id=<the sandbox's id>`.
//! Without those annotations (`ctr run`, nerdctl, docker) a container gets a VM of its own.

use std::path::Path;

/// CRI annotation naming the container's type.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI annotation naming the pod sandbox a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Errors reading a bundle's pod role.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// `config.json` could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not JSON.
    #[error("{path} is not valid JSON")]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The annotations are inconsistent.
    #[error("annotation {key}: {reason}")]
    Annotation {
        /// The annotation.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// What a container is in its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not part of a CRI pod: it gets a VM of its own.
    Standalone,
    /// The pod's sandbox container: it creates the pod's VM, whose id is this container's.
    Sandbox,
    /// A workload container joining the VM of pod sandbox `sandbox_id`.
    Container {
        /// The pod sandbox's container id.
        sandbox_id: String,
    },
}

impl Role {
    /// Whether creating this container boots a VM.
    pub fn owns_vm(&self) -> bool {
        !matches!(self, Role::Container { .. })
    }

    /// The id of the VM this container lives in, given its own id.
    pub fn vm_id<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            Role::Container { sandbox_id } => sandbox_id,
            _ => id,
        }
    }

    /// The role the annotations of a spec give.
    pub fn from_spec(spec: &serde_json::Value) -> Result<Self, PodError> {
        let ann = |k: &str| {
            spec.get("annotations")
                .and_then(|a| a.get(k))
                .and_then(|v| v.as_str())
        };
        match ann(CONTAINER_TYPE) {
            None => Ok(Role::Standalone),
            Some("sandbox") => Ok(Role::Sandbox),
            Some("container") => match ann(SANDBOX_ID) {
                Some(id) if !id.is_empty() => Ok(Role::Container {
                    sandbox_id: id.to_owned(),
                }),
                _ => Err(PodError::Annotation {
                    key: SANDBOX_ID,
                    reason: "missing for a container of type \"container\"".into(),
                }),
            },
            Some(other) => Err(PodError::Annotation {
                key: CONTAINER_TYPE,
                reason: format!("unknown type {other:?} (expected \"sandbox\" or \"container\")"),
            }),
        }
    }

    /// Reads the role from `<bundle>/config.json`.
    pub fn from_bundle(bundle: &Path) -> Result<Self, PodError> {
        let path = bundle.join("config.json");
        let text = std::fs::read(&path).map_err(|source| PodError::Read {
            path: path.clone(),
            source,
        })?;
        let spec = serde_json::from_slice(&text).map_err(|source| PodError::Parse {
            path: path.clone(),
            source,
        })?;
        Self::from_spec(&spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn roles_follow_the_cri_annotations() {
        assert_eq!(Role::from_spec(&json!({})).expect("none"), Role::Standalone);
        let sandbox = json!({"annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_ID: "p1"}});
        assert_eq!(Role::from_spec(&sandbox).expect("sandbox"), Role::Sandbox);
        let c = json!({"annotations": {CONTAINER_TYPE: "container", SANDBOX_ID: "p1"}});
        let role = Role::from_spec(&c).expect("container");
        assert_eq!(
            role,
            Role::Container {
                sandbox_id: "p1".into()
            }
        );
        assert_eq!(role.vm_id("c1"), "p1");
        assert!(!role.owns_vm());
        assert_eq!(Role::Sandbox.vm_id("p1"), "p1");
        assert!(Role::Standalone.owns_vm());
    }

    #[test]
    fn inconsistent_annotations_are_named() {
        let c = json!({"annotations": {CONTAINER_TYPE: "container"}});
        let err = Role::from_spec(&c).expect_err("no sandbox id");
        assert!(err.to_string().contains(SANDBOX_ID), "{err}");
        let odd = json!({"annotations": {CONTAINER_TYPE: "podlet"}});
        let err = Role::from_spec(&odd).expect_err("unknown type");
        assert!(err.to_string().contains("podlet"), "{err}");
    }

    #[test]
    fn bundle_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Role::from_bundle(dir.path()).expect_err("missing");
        assert!(err.to_string().contains("config.json"), "{err}");
        std::fs::write(dir.path().join("config.json"), "{").expect("write");
        assert!(matches!(
            Role::from_bundle(dir.path()),
            Err(PodError::Parse { .. })
        ));
    }
}

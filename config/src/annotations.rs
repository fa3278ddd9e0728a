//! Per-pod VM settings from the sandbox's annotations — only those the configuration allows.
//!
//! A pod may carry `io.carapace.config.<key>` annotations naming a configuration key of
//! [`ANNOTATABLE`] (its VM's vCPUs, memory, extra kernel parameters). The pod's author is
//! not the node's administrator: an annotation takes effect only when `<key>` is listed in
//! `[runtime] enable_annotations` (default: none), and the result is validated as a whole
//! configuration would be (bounds, `max_*`). Anything else under the prefix — an unknown
//! key, one not enabled, a value out of range — refuses the sandbox, naming the annotation;
//! it is never silently ignored. Annotations outside the prefix are not ours.

use std::collections::BTreeMap;

use crate::{Config, ConfigError, Origin};

/// The prefix of Carapace's annotations.
pub const ANNOTATION_PREFIX: &str = "io.carapace.config.";

/// The keys an annotation may set, when `[runtime] enable_annotations` lists them.
pub const ANNOTATABLE: [&str; 3] = [
    "hypervisor.default_vcpus",
    "hypervisor.default_memory_mib",
    "hypervisor.kernel_params",
];

/// An annotation that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum AnnotationError {
    /// Not a key an annotation can set.
    #[error("annotation {annotation}: {key:?} is not a setting annotations can change (these are: {known})", known = ANNOTATABLE.join(", "))]
    Unknown {
        /// The annotation.
        annotation: String,
        /// The key it names.
        key: String,
    },
    /// A key the configuration does not allow annotations to set.
    #[error(
        "annotation {annotation}: not allowed by this node's configuration ({key} is not in [runtime] enable_annotations)"
    )]
    NotEnabled {
        /// The annotation.
        annotation: String,
        /// The key it names.
        key: String,
    },
    /// The value does not parse.
    #[error("annotation {annotation}: {value:?} is not {expected}")]
    BadValue {
        /// The annotation.
        annotation: String,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// The value parses but the configuration it makes is invalid (out of bounds).
    #[error("annotation {annotation}")]
    Invalid {
        /// The annotation.
        annotation: String,
        /// What the configuration check said.
        #[source]
        source: ConfigError,
    },
}

impl AnnotationError {
    /// The annotation at fault.
    pub fn annotation(&self) -> &str {
        match self {
            Self::Unknown { annotation, .. }
            | Self::NotEnabled { annotation, .. }
            | Self::BadValue { annotation, .. }
            | Self::Invalid { annotation, .. } => annotation,
        }
    }
}

impl Config {
    /// This configuration with the sandbox's allowed `io.carapace.config.*` annotations
    /// applied; an error for any of them that cannot be (see the module doc).
    pub fn with_annotations(
        &self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Config, AnnotationError> {
        let mut config = self.clone();
        for (annotation, value) in annotations {
            let Some(key) = annotation.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let (annotation, value) = (annotation.clone(), value.clone());
            if !ANNOTATABLE.contains(&key) {
                return Err(AnnotationError::Unknown {
                    annotation,
                    key: key.to_owned(),
                });
            }
            if !self.runtime.enable_annotations.iter().any(|k| k == key) {
                return Err(AnnotationError::NotEnabled {
                    annotation,
                    key: key.to_owned(),
                });
            }
            let number = |expected| {
                value
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| AnnotationError::BadValue {
                        annotation: annotation.clone(),
                        value: value.clone(),
                        expected,
                    })
            };
            let h = &mut config.hypervisor;
            match key {
                "hypervisor.default_vcpus" => h.default_vcpus = number("a number of vCPUs")?,
                "hypervisor.default_memory_mib" => {
                    h.default_memory_mib = number("a size in MiB")?;
                }
                _ => {
                    if !h.kernel_params.is_empty() {
                        h.kernel_params.push(' ');
                    }
                    h.kernel_params.push_str(&value);
                }
            }
            config
                .validate(&Origin::Annotations)
                .map_err(|source| AnnotationError::Invalid { annotation, source })?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotated(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{ANNOTATION_PREFIX}{k}"), v.to_string()))
            .chain([("io.kubernetes.cri.sandbox-id".to_owned(), "x".to_owned())])
            .collect()
    }

    fn allowing(keys: &[&str]) -> Config {
        let mut c = Config::default();
        c.runtime.enable_annotations = keys.iter().map(|s| s.to_string()).collect();
        c
    }

    #[test]
    fn allowed_annotations_change_the_vm() {
        let c = allowing(&ANNOTATABLE);
        let got = c
            .with_annotations(&annotated(&[
                ("hypervisor.default_vcpus", "2"),
                ("hypervisor.default_memory_mib", "1024"),
                ("hypervisor.kernel_params", "mitigations=auto"),
            ]))
            .unwrap();
        assert_eq!(got.hypervisor.default_vcpus, 2);
        assert_eq!(got.hypervisor.default_memory_mib, 1024);
        assert_eq!(got.hypervisor.kernel_params, "mitigations=auto");
        // none of ours: unchanged
        assert_eq!(
            Config::default().with_annotations(&annotated(&[])).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn by_default_no_annotation_is_allowed() {
        let e = Config::default()
            .with_annotations(&annotated(&[("hypervisor.default_vcpus", "2")]))
            .unwrap_err();
        assert!(matches!(e, AnnotationError::NotEnabled { .. }), "{e}");
        assert_eq!(
            e.annotation(),
            "io.carapace.config.hypervisor.default_vcpus"
        );
        assert!(e.to_string().contains("enable_annotations"), "{e}");
    }

    #[test]
    fn only_annotatable_keys_can_be_enabled() {
        let e = allowing(&["hypervisor.path"])
            .validate(&Origin::Defaults)
            .unwrap_err();
        assert!(e.to_string().contains("runtime.enable_annotations"), "{e}");
        assert!(allowing(&ANNOTATABLE).validate(&Origin::Defaults).is_ok());
    }

    #[test]
    fn bad_annotations_are_refused_naming_them() {
        let c = allowing(&ANNOTATABLE);
        let e = c
            .with_annotations(&annotated(&[("hypervisor.path", "/bin/sh")]))
            .unwrap_err();
        assert!(matches!(e, AnnotationError::Unknown { .. }), "{e}");
        let e = c
            .with_annotations(&annotated(&[("hypervisor.default_vcpus", "two")]))
            .unwrap_err();
        assert!(matches!(e, AnnotationError::BadValue { .. }), "{e}");
        let e = c
            .with_annotations(&annotated(&[("hypervisor.default_vcpus", "99")]))
            .unwrap_err();
        assert!(matches!(e, AnnotationError::Invalid { .. }), "{e}");
        let chain = std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(chain.contains("max_vcpus"), "{chain}");
        let e = c
            .with_annotations(&annotated(&[("hypervisor.kernel_params", "a\ninit=/x")]))
            .unwrap_err();
        assert!(matches!(e, AnnotationError::Invalid { .. }), "{e}");
    }
}

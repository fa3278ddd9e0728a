//! Runtime options: which Carapace configuration a container's VM is built from.
//!
//! containerd hands every CreateTask the `options` of the runtime handler the container
//! runs under (CRI: `[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.<handler>.options]`).
//! For a runtime type that is not runc's, containerd's CRI encodes them as
//! `runtimeoptions.v1.Options { type_url, config_path, config_body }` — the message Kata
//! reads `ConfigPath` from. A handler with `ConfigPath = "/etc/carapace/big.toml"` thus
//! gets VMs of that file's shape, so one RuntimeClass per VM shape needs only containerd
//! configuration. Without options the shim uses `CARAPACE_CONFIG` or the default path.
//!
//! The choice is written to `<bundle>/carapace-options.json` at create (as containerd's runc
//! shim keeps its options in the bundle), so a later `shim delete` — a new process, told
//! only the bundle — cleans up with the same configuration.

use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{CodedInputStream, rt::WireType};

/// Name of the file in the bundle recording the choice.
pub const OPTIONS_FILE: &str = "carapace-options.json";
/// The message name CRI uses for a non-runc runtime's options.
const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";
/// Largest options message accepted.
const MAX_OPTIONS_BYTES: usize = 64 << 10;

/// Options the shim cannot use.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// A message of another type (say, runc's options under a Carapace handler).
    #[error(
        "runtime options of type {0:?} are not Carapace's: configure the handler's options as \
         `ConfigPath = \"/path/to/configuration.toml\"` (runtimeoptions.v1.Options)"
    )]
    WrongType(String),
    /// The message does not decode.
    #[error("runtime options ({RUNTIME_OPTIONS}) do not decode")]
    Decode(#[source] containerd_shim::protos::protobuf::Error),
    /// Too big to be options.
    #[error("runtime options are {0} bytes, more than the {MAX_OPTIONS_BYTES} accepted")]
    TooLarge(usize),
    /// An inline configuration (not supported: a file can be checked with `carapace check`).
    #[error(
        "runtime option ConfigBody is not supported: put the configuration in a file and name \
         it with ConfigPath"
    )]
    ConfigBody,
    /// The path is not absolute.
    #[error("runtime option ConfigPath {0:?} is not an absolute path")]
    NotAbsolute(String),
    /// Writing or reading the record in the bundle failed.
    #[error("{what} {path}")]
    Record {
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The configuration file a handler's options name, if any.
pub fn config_path(options: Option<&Any>) -> Result<Option<PathBuf>, OptionsError> {
    let Some(any) = options else {
        return Ok(None);
    };
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(None);
    }
    // containerd writes the bare message name; tolerate the googleapis prefix too
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != RUNTIME_OPTIONS {
        return Err(OptionsError::WrongType(any.type_url.clone()));
    }
    if any.value.len() > MAX_OPTIONS_BYTES {
        return Err(OptionsError::TooLarge(any.value.len()));
    }
    let (path, body) = decode(&any.value).map_err(OptionsError::Decode)?;
    if !body.is_empty() {
        return Err(OptionsError::ConfigBody);
    }
    if path.is_empty() {
        return Ok(None);
    }
    if !Path::new(&path).is_absolute() {
        return Err(OptionsError::NotAbsolute(path));
    }
    Ok(Some(PathBuf::from(path)))
}

/// `config_path` (field 2) and `config_body` (field 3) of a `runtimeoptions.v1.Options`;
/// other fields (`type_url`, unknown ones) are skipped.
fn decode(bytes: &[u8]) -> Result<(String, String), containerd_shim::protos::protobuf::Error> {
    let mut is = CodedInputStream::from_bytes(bytes);
    let (mut path, mut body) = (String::new(), String::new());
    while let Some(tag) = is.read_raw_tag_or_eof()? {
        let (field, wire) = (tag >> 3, tag & 7);
        match (field, wire) {
            (2, 2) => path = is.read_string()?,
            (3, 2) => body = is.read_string()?,
            _ => {
                let wire = WireType::new(wire).ok_or_else(|| {
                    containerd_shim::protos::protobuf::Error::from(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("wire type {wire} of field {field}"),
                    ))
                })?;
                is.skip_field(wire)?;
            }
        }
    }
    Ok((path, body))
}

/// What `<bundle>/carapace-options.json` holds.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recorded {
    /// The configuration file the handler's options named (`None`: the default one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_path: Option<PathBuf>,
}

/// Records the choice in `bundle`.
pub fn record(bundle: &Path, choice: &Recorded) -> Result<(), OptionsError> {
    let path = bundle.join(OPTIONS_FILE);
    let json = serde_json::to_vec(choice).unwrap_or_default();
    std::fs::write(&path, json).map_err(|source| OptionsError::Record {
        what: "writing",
        path,
        source,
    })
}

/// The choice recorded in `bundle` (the default when none was: a bundle from before, or one
/// whose create never got that far).
pub fn recorded(bundle: &Path) -> Result<Recorded, OptionsError> {
    let path = bundle.join(OPTIONS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| OptionsError::Record {
            what: "reading",
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Recorded::default()),
        Err(source) => Err(OptionsError::Record {
            what: "reading",
            path,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim::protos::protobuf::CodedOutputStream;

    use super::*;

    fn encoded(fields: &[(u32, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut os = CodedOutputStream::vec(&mut out);
            for (n, v) in fields {
                os.write_string(*n, v).unwrap();
            }
            os.flush().unwrap();
        }
        out
    }

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn config_path_of_runtimeoptions() {
        let v = encoded(&[(1, "ignored"), (2, "/etc/carapace/big.toml")]);
        assert_eq!(
            config_path(Some(&any("runtimeoptions.v1.Options", v.clone()))).unwrap(),
            Some(PathBuf::from("/etc/carapace/big.toml"))
        );
        let prefixed = any("type.googleapis.com/runtimeoptions.v1.Options", v);
        assert!(config_path(Some(&prefixed)).unwrap().is_some());
        // none, empty, or an empty path: the default configuration
        assert_eq!(config_path(None).unwrap(), None);
        assert_eq!(config_path(Some(&Any::default())).unwrap(), None);
        let empty = any("runtimeoptions.v1.Options", encoded(&[(1, "x")]));
        assert_eq!(config_path(Some(&empty)).unwrap(), None);
    }

    #[test]
    fn options_the_shim_cannot_use_are_named() {
        let runc = any("containerd.runc.v1.Options", vec![]);
        let e = config_path(Some(&runc)).unwrap_err().to_string();
        assert!(
            e.contains("containerd.runc.v1.Options") && e.contains("ConfigPath"),
            "{e}"
        );
        let body = any(
            "runtimeoptions.v1.Options",
            encoded(&[(3, "[hypervisor]\n")]),
        );
        assert!(matches!(
            config_path(Some(&body)),
            Err(OptionsError::ConfigBody)
        ));
        let rel = any("runtimeoptions.v1.Options", encoded(&[(2, "big.toml")]));
        assert!(matches!(
            config_path(Some(&rel)),
            Err(OptionsError::NotAbsolute(_))
        ));
        let garbage = any("runtimeoptions.v1.Options", vec![0x12, 0xff, 0xff, 0xff]);
        assert!(matches!(
            config_path(Some(&garbage)),
            Err(OptionsError::Decode(_))
        ));
        let big = any("runtimeoptions.v1.Options", vec![0; MAX_OPTIONS_BYTES + 1]);
        assert!(matches!(
            config_path(Some(&big)),
            Err(OptionsError::TooLarge(_))
        ));
    }

    #[test]
    fn the_choice_survives_in_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(recorded(dir.path()).unwrap(), Recorded::default());
        let choice = Recorded {
            config_path: Some("/etc/carapace/big.toml".into()),
        };
        record(dir.path(), &choice).unwrap();
        assert_eq!(recorded(dir.path()).unwrap(), choice);
        std::fs::write(dir.path().join(OPTIONS_FILE), "{\"nope\": 1}").unwrap();
        assert!(recorded(dir.path()).is_err());
    }
}

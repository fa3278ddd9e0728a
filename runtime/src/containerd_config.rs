//! containerd's configuration for Carapace: the CRI runtime entry (a handler whose
//! `runtime_type` is Carapace's shim and whose `ConfigPath` option names the Carapace
//! configuration), as a drop-in file the node's containerd imports.
//!
//! containerd 1.6 (Debian bookworm's) merges an imported file into its configuration by
//! **replacing** every plugin section the file names, not key by key (its
//! `services/server/config` merge copies `from.Plugins[k]` over `to.Plugins[k]`). A drop-in
//! holding only `plugins."io.containerd.grpc.v1.cri".containerd.runtimes.carapace` would
//! therefore reset every other CRI setting of the node to containerd's defaults (Debian's
//! own `config.toml` sets the CNI `bin_dir`; kubeadm nodes set `SystemdCgroup`). The drop-in
//! written here carries the node's effective CRI section — the one of the last file, among
//! the main file and its imports, that has one — with the Carapace handler added. It must be
//! written again after that section changes elsewhere: `carapace containerd-config` does it,
//! and says which files the section came from.
//!
//! The main file gets the drop-in's path in its `imports` unless an existing import pattern
//! already covers it; that edit keeps the file's formatting and comments (`toml_edit`).
//! [`remove`] undoes both.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use toml_edit::{Array, DocumentMut, Item, Value};

/// containerd's CRI plugin id (configuration version 2).
pub const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";
/// The runtime type of Carapace's shim (`containerd-shim-carapace-v2`).
pub const RUNTIME_TYPE: &str = "io.containerd.carapace.v2";
/// containerd's default CRI runtime (handler) and its type.
const DEFAULT_RUNTIME: &str = "runc";
const DEFAULT_RUNTIME_TYPE: &str = "io.containerd.runc.v2";
/// Where the node's containerd reads its configuration.
pub const DEFAULT_MAIN: &str = "/etc/containerd/config.toml";
/// Where the drop-in goes by default.
pub const DEFAULT_DROP_IN: &str = "/etc/containerd/conf.d/carapace.toml";

/// Errors of reading or planning containerd's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    /// A configuration file could not be read.
    #[error("cannot read containerd configuration {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A configuration file is not TOML.
    #[error("containerd configuration {path} is not valid TOML")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why (the TOML parser's error, with the position).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The drop-in could not be written as TOML (a value TOML cannot hold).
    #[error("cannot render the containerd drop-in")]
    Render(#[source] toml::ser::Error),
    /// The main file is not a version 2 configuration.
    #[error(
        "containerd configuration {path} has {found}; Carapace's drop-in needs `version = 2` \
         (containerd 1.5 to 1.7; `containerd config migrate` converts older files)"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// What it has instead.
        found: String,
    },
    /// A key that must be a table (or an array of strings) is something else.
    #[error("containerd configuration {path}: `{key}` is not {expected}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What it must be.
        expected: &'static str,
    },
    /// An import pattern has a wildcard before its last path component.
    #[error(
        "containerd configuration {path}: import pattern {pattern:?} has a wildcard in a \
         directory name, which this tool does not expand"
    )]
    Pattern {
        /// The file.
        path: PathBuf,
        /// The pattern.
        pattern: String,
    },
    /// A path argument is not usable.
    #[error("{what} {path} must be an absolute path")]
    NotAbsolute {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// The handler name is empty or not a plain TOML key.
    #[error("CRI handler name {0:?} must be non-empty letters, digits, '-' or '_'")]
    Handler(String),
}

/// What to write: the drop-in and, when it must change, the main file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The drop-in's whole text.
    pub drop_in: String,
    /// The main file's new text when its `imports` must gain the drop-in (None: unchanged).
    pub main: Option<String>,
    /// Whether the main file does not exist yet (then `main` is its whole new text).
    pub main_created: bool,
    /// The files the CRI section was taken from, in merge order (empty: none had one).
    pub sources: Vec<PathBuf>,
}

/// The Carapace handler to register.
#[derive(Debug, Clone)]
pub struct Handler<'a> {
    /// CRI handler name (a RuntimeClass's `handler`), e.g. `carapace`.
    pub name: &'a str,
    /// The Carapace configuration its VMs are built from (the `ConfigPath` option; None:
    /// the shim's default, `/etc/carapace/configuration.toml` or the built-in defaults).
    pub config_path: Option<&'a Path>,
}

/// Plans the drop-in at `drop_in` registering `handler` with the node's containerd whose
/// main configuration file is `main` (which may not exist yet).
pub fn plan(main: &Path, drop_in: &Path, handler: &Handler) -> Result<Plan, ContainerdConfigError> {
    check_args(main, drop_in, handler)?;
    let (main_text, main_created) = match fs::read_to_string(main) {
        Ok(text) => (text, false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => ("version = 2\n".to_owned(), true),
        Err(source) => {
            return Err(ContainerdConfigError::Read {
                path: main.to_path_buf(),
                source,
            });
        }
    };
    let mut doc = parse(main, &main_text)?;
    check_version(main, &doc)?;
    let patterns = imports(main, &doc)?;
    // The effective CRI section: the main file's, replaced by each import's in order.
    let mut cri: Option<toml::Table> = None;
    let mut sources = Vec::new();
    if let Some(t) = cri_section(main, &main_text)? {
        cri = Some(t);
        sources.push(main.to_path_buf());
    }
    for file in expand(main, &patterns)? {
        if file == drop_in {
            continue;
        }
        let text = fs::read_to_string(&file).map_err(|source| ContainerdConfigError::Read {
            path: file.clone(),
            source,
        })?;
        if let Some(t) = cri_section(&file, &text)? {
            cri = Some(t);
            sources.push(file);
        }
    }
    let drop_in_text = render(cri.unwrap_or_default(), handler, &sources, main)?;
    let covered = patterns
        .iter()
        .any(|p| matches_pattern(&resolve(main, p), drop_in));
    let new_main = if covered {
        None
    } else {
        add_import(main, &mut doc, drop_in)?;
        Some(doc.to_string())
    };
    Ok(Plan {
        drop_in: drop_in_text,
        main: new_main,
        main_created,
        sources,
    })
}

/// The main file's new text without the drop-in's own `imports` entry (None: nothing to
/// change, or the file does not exist).
pub fn remove(main: &Path, drop_in: &Path) -> Result<Option<String>, ContainerdConfigError> {
    let text = match fs::read_to_string(main) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ContainerdConfigError::Read {
                path: main.to_path_buf(),
                source,
            });
        }
    };
    let mut doc = parse(main, &text)?;
    let own = drop_in.to_string_lossy();
    let Some(arr) = doc.get_mut("imports").and_then(Item::as_array_mut) else {
        return Ok(None);
    };
    let before = arr.len();
    arr.retain(|v| v.as_str() != Some(&*own));
    if arr.len() == before {
        return Ok(None);
    }
    // an `imports` left empty goes: the file is back to what it was before [`plan`]
    if arr.is_empty() {
        doc.remove("imports");
    }
    Ok(Some(doc.to_string()))
}

fn check_args(main: &Path, drop_in: &Path, handler: &Handler) -> Result<(), ContainerdConfigError> {
    let paths = [
        ("the containerd configuration", Some(main)),
        ("the drop-in", Some(drop_in)),
        (
            "the Carapace configuration (ConfigPath)",
            handler.config_path,
        ),
    ];
    for (what, path) in paths.into_iter().filter_map(|(w, p)| Some((w, p?))) {
        if !path.is_absolute() {
            return Err(ContainerdConfigError::NotAbsolute {
                what,
                path: path.to_path_buf(),
            });
        }
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if handler.name.is_empty() || !handler.name.chars().all(ok) {
        return Err(ContainerdConfigError::Handler(handler.name.to_owned()));
    }
    Ok(())
}

fn parse(path: &Path, text: &str) -> Result<DocumentMut, ContainerdConfigError> {
    text.parse::<DocumentMut>()
        .map_err(|source| ContainerdConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
}

fn check_version(path: &Path, doc: &DocumentMut) -> Result<(), ContainerdConfigError> {
    match doc.get("version").map(|v| v.as_integer()) {
        Some(Some(2)) => Ok(()),
        Some(Some(n)) => Err(ContainerdConfigError::Version {
            path: path.to_path_buf(),
            found: format!("version = {n}"),
        }),
        Some(None) => Err(ContainerdConfigError::Shape {
            path: path.to_path_buf(),
            key: "version".into(),
            expected: "an integer",
        }),
        None => Err(ContainerdConfigError::Version {
            path: path.to_path_buf(),
            found: "no `version` (a version 1 configuration)".into(),
        }),
    }
}

fn imports(path: &Path, doc: &DocumentMut) -> Result<Vec<String>, ContainerdConfigError> {
    let shape = || ContainerdConfigError::Shape {
        path: path.to_path_buf(),
        key: "imports".into(),
        expected: "an array of strings",
    };
    match doc.get("imports") {
        None => Ok(Vec::new()),
        Some(item) => item
            .as_array()
            .ok_or_else(shape)?
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(shape))
            .collect(),
    }
}

/// An import pattern as containerd resolves it: relative to the main file's directory.
fn resolve(main: &Path, pattern: &str) -> PathBuf {
    let p = Path::new(pattern);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        main.parent().unwrap_or(Path::new("/")).join(p)
    }
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The files the patterns name, each pattern's matches sorted (as Go's `filepath.Glob`);
/// a plain path is kept whether or not it exists (containerd fails on a missing one).
fn expand(main: &Path, patterns: &[String]) -> Result<Vec<PathBuf>, ContainerdConfigError> {
    let mut out = Vec::new();
    for pattern in patterns {
        let full = resolve(main, pattern);
        let dir = full.parent().unwrap_or(Path::new("/"));
        if has_wildcard(&dir.to_string_lossy()) {
            return Err(ContainerdConfigError::Pattern {
                path: main.to_path_buf(),
                pattern: pattern.clone(),
            });
        }
        let name = full.file_name().map(|n| n.to_string_lossy().into_owned());
        match name {
            Some(name) if has_wildcard(&name) => {
                let mut found: Vec<PathBuf> = fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| matches_pattern(&full, p))
                    .collect();
                found.sort();
                out.extend(found);
            }
            _ => out.push(full),
        }
    }
    Ok(out)
}

/// Whether `path` is named by `pattern` (wildcards `*` and `?` in its last component).
fn matches_pattern(pattern: &Path, path: &Path) -> bool {
    if pattern.parent() != path.parent() {
        return false;
    }
    match (pattern.file_name(), path.file_name()) {
        (Some(p), Some(n)) => wildcard(
            p.to_string_lossy().as_bytes(),
            n.to_string_lossy().as_bytes(),
        ),
        _ => false,
    }
}

fn wildcard(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => wildcard(&p[1..], s) || (!s.is_empty() && wildcard(p, &s[1..])),
        (Some(b'?'), Some(_)) => wildcard(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => wildcard(&p[1..], &s[1..]),
        _ => false,
    }
}

/// The CRI plugin's section of a file, if it has one.
fn cri_section(path: &Path, text: &str) -> Result<Option<toml::Table>, ContainerdConfigError> {
    let shape = |key: &str| ContainerdConfigError::Shape {
        path: path.to_path_buf(),
        key: key.to_owned(),
        expected: "a table",
    };
    let doc = text
        .parse::<toml::Table>()
        .map_err(|source| ContainerdConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
    let Some(plugins) = doc.get("plugins") else {
        return Ok(None);
    };
    let plugins = plugins.as_table().ok_or_else(|| shape("plugins"))?;
    match plugins.get(CRI_PLUGIN) {
        None => Ok(None),
        Some(v) => v
            .as_table()
            .cloned()
            .map(Some)
            .ok_or_else(|| shape(&format!("plugins.\"{CRI_PLUGIN}\""))),
    }
}

fn render(
    mut cri: toml::Table,
    handler: &Handler,
    sources: &[PathBuf],
    main: &Path,
) -> Result<String, ContainerdConfigError> {
    let shape = |key: &str| ContainerdConfigError::Shape {
        path: sources
            .last()
            .cloned()
            .unwrap_or_else(|| main.to_path_buf()),
        key: format!("plugins.\"{CRI_PLUGIN}\".{key}"),
        expected: "a table",
    };
    let containerd = cri
        .entry("containerd")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| shape("containerd"))?;
    let default_name = containerd
        .get("default_runtime_name")
        .and_then(toml::Value::as_str)
        .unwrap_or(DEFAULT_RUNTIME)
        .to_owned();
    let runtimes = containerd
        .entry("runtimes")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| shape("containerd.runtimes"))?;
    // containerd fills its default runtime (runc) in only when the configuration names no
    // runtime at all: a runtimes table holding just ours would leave the node without runc
    // (and the CRI plugin without its default_runtime_name).
    if runtimes.is_empty() && default_name == DEFAULT_RUNTIME {
        let mut runc = toml::Table::new();
        runc.insert(
            "runtime_type".into(),
            toml::Value::String(DEFAULT_RUNTIME_TYPE.into()),
        );
        runtimes.insert(DEFAULT_RUNTIME.into(), toml::Value::Table(runc));
    }
    let mut entry = toml::Table::new();
    entry.insert(
        "runtime_type".into(),
        toml::Value::String(RUNTIME_TYPE.into()),
    );
    // a privileged pod gets the VM's devices, never the host's
    entry.insert(
        "privileged_without_host_devices".into(),
        toml::Value::Boolean(true),
    );
    if let Some(path) = handler.config_path {
        let mut options = toml::Table::new();
        options.insert(
            "ConfigPath".into(),
            toml::Value::String(path.to_string_lossy().into_owned()),
        );
        entry.insert("options".into(), toml::Value::Table(options));
    }
    runtimes.insert(handler.name.to_owned(), toml::Value::Table(entry));

    let mut plugins = toml::Table::new();
    plugins.insert(CRI_PLUGIN.into(), toml::Value::Table(cri));
    let mut root = toml::Table::new();
    root.insert("version".into(), toml::Value::Integer(2));
    root.insert("plugins".into(), toml::Value::Table(plugins));
    let from = if sources.is_empty() {
        "containerd's defaults (no file had a CRI section)".to_owned()
    } else {
        sources
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", then ")
    };
    let body = toml::to_string(&root).map_err(ContainerdConfigError::Render)?;
    Ok(format!(
        "# Written by `carapace containerd-config`: the CRI handler {name:?} runs pods in\n\
         # Carapace microVMs. containerd 1.6 replaces a whole plugin section with an imported\n\
         # one, so this file carries the node's CRI section (from {from}) with the handler\n\
         # added: run `carapace containerd-config` again after changing that section there.\n\
         {body}",
        name = handler.name,
    ))
}

fn add_import(
    main: &Path,
    doc: &mut DocumentMut,
    drop_in: &Path,
) -> Result<(), ContainerdConfigError> {
    let own = Value::from(drop_in.to_string_lossy().into_owned());
    let empty = doc
        .get("imports")
        .and_then(Item::as_array)
        .is_none_or(Array::is_empty);
    match doc.get_mut("imports") {
        Some(item) => item
            .as_array_mut()
            .ok_or_else(|| ContainerdConfigError::Shape {
                path: main.to_path_buf(),
                key: "imports".into(),
                expected: "an array of strings",
            })?
            .push_formatted(own.decorated(if empty { "" } else { " " }, "")),
        None => {
            let mut arr = Array::new();
            arr.push(own);
            doc.insert("imports", toml_edit::value(arr));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

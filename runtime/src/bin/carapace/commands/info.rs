//! `features`, `spec` and `env`: documents about the runtime, no container involved.

use std::path::Path;

use carapace_runtime::sandbox::Runtime;
use carapace_runtime::{features, oci};

use super::print_json;

/// `features`: what this runtime implements (runc's document).
pub(super) fn features() -> anyhow::Result<()> {
    print_json(&features::document())
}

/// `spec`: write a default config.json into the bundle.
pub(super) fn spec(bundle: &Path) -> anyhow::Result<()> {
    oci::write_default_spec(bundle)?;
    Ok(())
}

/// `env`: the effective configuration and where it came from.
pub(super) fn env(rt: &Runtime, loaded: &carapace_config::Loaded) -> anyhow::Result<()> {
    println!("# configuration: {}", loaded.origin);
    println!("# state root: {}", rt.store.root().display());
    print!("{}", toml::to_string_pretty(&loaded.config)?);
    Ok(())
}

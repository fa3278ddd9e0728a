//! `check`: can this host run sandboxes (KVM, guest image, helpers); a fix per failure.

use carapace_runtime::check;

use super::print_json;
use crate::cli::Format;

pub(super) fn check(loaded: &carapace_config::Loaded, format: Format) -> anyhow::Result<()> {
    let results = check::run(&loaded.config, &check::HostFiles::default());
    let failed = results.iter().filter(|c| !c.ok).count();
    match format {
        Format::Json => print_json(&results)?,
        Format::Table => {
            println!("configuration: {}", loaded.origin);
            for c in &results {
                let mark = if c.ok { "ok  " } else { "FAIL" };
                println!("[{mark}] {}: {}", c.name, c.detail);
                if let Some(h) = &c.hint {
                    println!("       fix: {h}");
                }
            }
        }
    }
    if failed > 0 {
        return Err(crate::exit::ChecksFailed { failed }.into());
    }
    Ok(())
}

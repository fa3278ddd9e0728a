//! `list`: the containers under the state root, as a table or JSON.

use carapace_runtime::sandbox::Runtime;

use super::print_json;
use crate::cli::Format;

pub(super) fn list(rt: &Runtime, format: Format, quiet: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for id in rt.store.ids()? {
        let Ok(st) = rt.store.load(&id) else {
            continue;
        };
        let oci = st.oci(rt.live_status(&st), st.vmm.is_some_and(|v| v.is_alive()));
        rows.push((st, oci));
    }
    if quiet {
        for (st, _) in &rows {
            println!("{}", st.id);
        }
        return Ok(());
    }
    match format {
        Format::Json => {
            let v: Vec<_> = rows
                .iter()
                .map(|(st, oci)| {
                    serde_json::json!({
                        "ociVersion": oci.oci_version,
                        "id": oci.id,
                        "pid": oci.pid,
                        "status": oci.status,
                        "bundle": oci.bundle,
                        "created": carapace_runtime::state::rfc3339_utc(st.created_unix),
                        "annotations": oci.annotations,
                    })
                })
                .collect();
            print_json(&v)
        }
        Format::Table => {
            println!(
                "{:<24} {:<8} {:<10} {:<40} CREATED",
                "ID", "PID", "STATUS", "BUNDLE"
            );
            for (st, oci) in &rows {
                println!(
                    "{:<24} {:<8} {:<10} {:<40} {}",
                    oci.id,
                    oci.pid,
                    oci.status,
                    oci.bundle,
                    carapace_runtime::state::rfc3339_utc(st.created_unix)
                );
            }
            Ok(())
        }
    }
}

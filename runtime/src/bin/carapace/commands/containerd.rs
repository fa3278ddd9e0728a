//! `containerd-config`: register Carapace with the node's containerd (a CRI drop-in and
//! its import), or take it out again; the logic is `carapace_runtime::containerd_config`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use carapace_config::{Loaded, Origin};
use carapace_runtime::containerd_config::{self, Handler};

use crate::cli::ContainerdConfigArgs;

pub(super) fn containerd_config(loaded: &Loaded, a: &ContainerdConfigArgs) -> anyhow::Result<()> {
    let main = absolute(&a.containerd_config)?;
    let drop_in = absolute(&a.drop_in)?;
    if a.remove {
        return remove(&main, &drop_in, a.dry_run);
    }
    let config_path = match &loaded.origin {
        Origin::File(p) => Some(absolute(p)?),
        _ => None,
    };
    let plan = containerd_config::plan(
        &main,
        &drop_in,
        &Handler {
            name: &a.handler,
            config_path: config_path.as_deref(),
        },
    )?;
    if a.dry_run {
        println!("# {} would be:\n{}", drop_in.display(), plan.drop_in);
        if let Some(m) = &plan.main {
            println!("# {} would be:\n{m}", main.display());
        }
        return Ok(());
    }
    let from = if plan.sources.is_empty() {
        "containerd's defaults".to_owned()
    } else {
        plan.sources
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let changed = write_if_changed(&drop_in, &plan.drop_in)?;
    println!(
        "containerd-config: {} {} (handler {:?} -> {}, ConfigPath {}; the CRI section of {from})",
        if changed { "wrote" } else { "unchanged" },
        drop_in.display(),
        a.handler,
        containerd_config::RUNTIME_TYPE,
        config_path.map_or("none (the shim's default)".into(), |p| p
            .display()
            .to_string()),
    );
    match &plan.main {
        Some(text) => {
            write_if_changed(&main, text)?;
            println!(
                "containerd-config: {} {} importing {}",
                if plan.main_created {
                    "created"
                } else {
                    "updated"
                },
                main.display(),
                drop_in.display()
            );
        }
        None => println!(
            "containerd-config: unchanged {} (its imports cover the drop-in)",
            main.display()
        ),
    }
    if changed || plan.main.is_some() {
        println!("containerd-config: restart containerd to apply (systemctl restart containerd)");
    }
    Ok(())
}

fn remove(main: &Path, drop_in: &Path, dry_run: bool) -> anyhow::Result<()> {
    let new_main = containerd_config::remove(main, drop_in)?;
    if dry_run {
        println!("# would remove {}", drop_in.display());
        if let Some(m) = &new_main {
            println!("# {} would be:\n{m}", main.display());
        }
        return Ok(());
    }
    match fs::remove_file(drop_in) {
        Ok(()) => println!("containerd-config: removed {}", drop_in.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("containerd-config: {} was not there", drop_in.display())
        }
        Err(e) => return Err(e).with_context(|| format!("removing {}", drop_in.display())),
    }
    if let Some(text) = new_main {
        write_if_changed(main, &text)?;
        println!(
            "containerd-config: took {} out of the imports of {}",
            drop_in.display(),
            main.display()
        );
    }
    println!("containerd-config: restart containerd to apply (systemctl restart containerd)");
    Ok(())
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// Writes `text` to `path` atomically (a temporary file beside it, then a rename) unless the
/// file already holds exactly that; creates the parent directory and keeps the mode of the
/// file it replaces. Returns whether it wrote; a failed write leaves no temporary file.
fn write_if_changed(path: &Path, text: &str) -> anyhow::Result<bool> {
    let old = fs::metadata(path).ok();
    if old.is_some() && fs::read_to_string(path).is_ok_and(|o| o == text) {
        return Ok(false);
    }
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.carapace-{}", std::process::id()));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            if let Some(m) = &old {
                f.set_permissions(m.permissions())?;
            }
            f.sync_all()
        })
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
        });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map(|()| true)
}

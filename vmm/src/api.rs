//! Control API: newline-delimited JSON over a unix socket.
//!
//! Requests (one JSON object per line), each answered by one JSON line:
//! - `{"cmd":"info"}` → state, vCPUs, memory, command line, boot-done time, devices, and
//!   `memory_hotplug`: `{"region_mib","block_mib","plugged_mib","requested_mib"}` (`null`
//!   without memory hot-plug);
//! - `{"cmd":"metrics"}` → VM exits by kind, console counters, per-device counters;
//! - `{"cmd":"pause"}` / `{"cmd":"resume"}` → stop / restart the vCPUs;
//! - `{"cmd":"shutdown","grace_secs":N}` → when N > 0, press Ctrl-Alt-Del on the guest's
//!   i8042 keyboard (the guest has no ACPI power button) and give it N seconds (default: the
//!   VM's `shutdown_timeout_secs`) to stop — a guest reset or power-off then counts as
//!   powered off — then force the VM off. The VMM exits 0;
//! - `{"cmd":"memory","requested_mib":N}` → sets the virtio-mem device's requested size to
//!   N MiB of hot-plugged memory (a multiple of `block_mib`, at most `region_mib`; an error
//!   otherwise, and on a VM without `memory_hotplug`) and answers at once with
//!   `{"ok":true,"block_mib":B,"requested_mib":N,"plugged_mib":P,"region_mib":R}` (the shared type `carapace_vm_config::api::MemoryHotplugInfo`): the guest driver plugs
//!   or unplugs asynchronously, `info`'s `memory_hotplug.plugged_mib` shows how far it got.
//!
//! Answers are `{"ok":true,...}` or `{"ok":false,"error":"..."}`. Lines are capped at 4 KiB.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::exit::ExitReason;
use crate::vmm::VmHandle;

const MAX_LINE: u64 = 4096;

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be bound.
    #[error("cannot listen on API socket {path}")]
    Bind {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The server thread could not be started.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// One request (the contract is `carapace_vm_config::api`, shared with the runtime).
pub use carapace_vm_config::api::Request;

/// Executes a request against the VM.
pub fn handle(vm: &VmHandle, req: Request) -> serde_json::Value {
    match req {
        Request::Info {} => ok_typed(&vm.info()),
        Request::Metrics {} => ok_typed(&vm.metrics()),
        Request::Pause {} => {
            if vm.pause() {
                ok(serde_json::json!({"state": "paused"}))
            } else {
                err("the vCPUs did not stop running guest code within 1 s of the pause".into())
            }
        }
        Request::Resume {} => {
            vm.resume();
            ok(serde_json::json!({"state": "running"}))
        }
        Request::Shutdown { grace_secs } => {
            let grace = grace_secs.unwrap_or(vm.config.shutdown_timeout_secs);
            vm.state.request_shutdown();
            vm.resume();
            let asked = grace > 0;
            if asked {
                tracing::info!(
                    grace_secs = grace,
                    "asking the guest to shut down (Ctrl-Alt-Del)"
                );
                vm.pio.ctrl_alt_del();
            }
            let forced = vm
                .state
                .wait_exit(Some(Duration::from_secs(u64::from(grace))))
                .is_none();
            if forced {
                tracing::info!(
                    grace_secs = grace,
                    "guest did not stop in time, forcing it off"
                );
                vm.state.request_exit(ExitReason::PowerOff);
            }
            ok(serde_json::json!({"forced": forced, "asked_guest": asked}))
        }
        Request::Memory { requested_mib } => {
            let Some(ctl) = &vm.memory_hotplug else {
                return err(
                    "this VM has no memory hot-plug (no memory_hotplug in its description)".into(),
                );
            };
            match ctl.set_requested(u64::from(requested_mib)) {
                Ok(s) => ok_typed(&s.info()),
                Err(e) => err(e.to_string()),
            }
        }
    }
}

fn ok(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.insert("ok".into(), true.into());
        v
    } else {
        serde_json::json!({"ok": true, "result": v})
    }
}

/// [`ok`] for a typed answer. Through `serde_json::Value`, whose map sorts its keys: the
/// line on the socket lists fields in name order, as it always did.
fn ok_typed(v: &impl serde::Serialize) -> serde_json::Value {
    match serde_json::to_value(v) {
        Ok(v) => ok(v),
        Err(e) => err(format!("cannot encode the answer: {e}")),
    }
}

fn err(msg: String) -> serde_json::Value {
    serde_json::json!({"ok": false, "error": msg})
}

fn serve_conn(vm: &VmHandle, stream: UnixStream) {
    let Ok(w) = stream.try_clone() else {
        return;
    };
    let mut w = w;
    let mut r = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut r).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') {
            let _ = w.write_all(
                format!("{}\n", err("request line too long or unterminated".into())).as_bytes(),
            );
            return;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(vm, req),
            Err(e) => err(format!("invalid request: {e}")),
        };
        // One write per answer: clients may read a whole line with a single recv.
        if w.write_all(format!("{resp}\n").as_bytes()).is_err() {
            return;
        }
    }
}

/// Binds `path` (replacing a stale socket) and serves requests on a thread.
pub fn spawn(vm: VmHandle, path: &Path) -> Result<(), ApiError> {
    serve(vm, bind(path)?)
}

/// Binds the API socket at `path` (replacing a stale socket). A jailed VMM binds before
/// it enters its jail, where the path is out of reach, and serves later ([`serve`]).
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    if let Ok(m) = std::fs::symlink_metadata(path)
        && std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())
    {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Serves requests arriving on `listener` on a thread (one more per client).
pub fn serve(vm: VmHandle, listener: UnixListener) -> Result<(), ApiError> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // Before the first client; client threads inherit the list.
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Api);
            for s in listener.incoming().flatten() {
                let vm = vm.clone();
                // One thread per client: a slow client cannot block others.
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || serve_conn(&vm, s));
            }
        })
        .map_err(ApiError::Thread)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_answers_keep_the_line_format() {
        let info = crate::vmm::VmInfo {
            boot_done_ms: None,
            cmdline: "console=ttyS0".into(),
            devices: vec![crate::vmm::DeviceInfo {
                irq: 5,
                mmio_base: 0xd000_0000,
                name: "vsock".into(),
            }],
            kernel: "/k".into(),
            memory_hotplug: None,
            memory_mib: 64,
            state: "running",
            uptime_ms: 7,
            vcpus: 1,
        };
        assert_eq!(
            ok_typed(&info).to_string(),
            r#"{"boot_done_ms":null,"cmdline":"console=ttyS0","devices":[{"irq":5,"mmio_base":3489660928,"name":"vsock"}],"kernel":"/k","memory_hotplug":null,"memory_mib":64,"ok":true,"state":"running","uptime_ms":7,"vcpus":1}"#
        );
    }

    #[test]
    fn parses_requests_strictly() {
        let p = |s: &str| serde_json::from_str::<Request>(s);
        assert_eq!(p(r#"{"cmd":"info"}"#).unwrap(), Request::Info {});
        assert_eq!(
            p(r#"{"cmd":"shutdown","grace_secs":3}"#).unwrap(),
            Request::Shutdown {
                grace_secs: Some(3)
            }
        );
        assert_eq!(
            p(r#"{"cmd":"memory","requested_mib":256}"#).unwrap(),
            Request::Memory { requested_mib: 256 }
        );
        assert!(p(r#"{"cmd":"memory"}"#).is_err());
        assert!(p(r#"{"cmd":"memory","requested_mib":-2}"#).is_err());
        assert!(p(r#"{"cmd":"memory","requested_mib":2,"x":1}"#).is_err());
        assert!(p(r#"{"cmd":"info","x":1}"#).is_err());
        assert!(p(r#"{"cmd":"explode"}"#).is_err());
    }
}

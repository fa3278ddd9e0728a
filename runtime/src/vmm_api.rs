//! A typed client for the VMM's control API (`api.sock`; protocol at the top of
//! `vmm/src/api.rs`): one JSON request per line, one JSON answer per line,
//! `{"ok":true,...}` or `{"ok":false,"error":"..."}`. The runtime uses `info` and the
//! virtio-mem `memory` request: hot-plugging is asynchronous, so [`VmmClient::resize_memory`]
//! asks, then polls `info` until the guest has taken (or given back) the memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, de::DeserializeOwned};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Largest answer line read (the `info` answer lists every device).
const MAX_ANSWER: u64 = 256 * 1024;

/// Errors of the VMM API.
#[derive(Debug, thiserror::Error)]
pub enum VmmApiError {
    /// The socket could not be reached or the exchange broke.
    #[error("VMM API {socket}: {op}")]
    Io {
        /// The API socket.
        socket: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("VMM API {socket}: no answer to {cmd} within {timeout:?}")]
    Timeout {
        /// The API socket.
        socket: PathBuf,
        /// The request.
        cmd: &'static str,
        /// The deadline.
        timeout: Duration,
    },
    /// The VMM refused the request.
    #[error("the VMM refused {cmd}: {error}")]
    Refused {
        /// The request.
        cmd: &'static str,
        /// Its error text.
        error: String,
    },
    /// The answer is not what the protocol says.
    #[error("VMM API {socket}: unexpected answer to {cmd}")]
    BadAnswer {
        /// The API socket.
        socket: PathBuf,
        /// The request.
        cmd: &'static str,
        /// Why it did not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The VM has no memory hot-plug device.
    #[error("the VM has no memory hot-plug device (its VMM reports no memory_hotplug)")]
    NoHotplug,
    /// The guest did not take or give back the memory in time.
    #[error(
        "the guest did not reach {requested_mib} MiB of hot-plugged memory within {waited:?} \
         (plugged: {plugged_mib} MiB)"
    )]
    PlugTimeout {
        /// What was requested.
        requested_mib: u32,
        /// What was plugged at the deadline.
        plugged_mib: u32,
        /// How long it was waited for.
        waited: Duration,
    },
}

pub use carapace_vm_config::api::{MemoryHotplugInfo, Request};

/// The part of the `info` answer the runtime reads (the rest is ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Info {
    /// The memory hot-plug device, when the VM has one.
    #[serde(default)]
    pub memory_hotplug: Option<MemoryHotplugInfo>,
}

/// The `ok`/`error` envelope of every answer.
#[derive(Debug, Deserialize)]
struct Envelope {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
}

/// A client of one VM's API socket; every request is one short connection.
#[derive(Debug, Clone)]
pub struct VmmClient {
    socket: PathBuf,
    timeout: Duration,
    poll: Duration,
}

impl VmmClient {
    /// A client of `socket`, each exchange bounded by `timeout`.
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        Self {
            socket: socket.to_path_buf(),
            timeout,
            poll: Duration::from_millis(50),
        }
    }

    /// The same client polling `info` every `poll` while memory is being plugged.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Sends `req` and returns its answer as `T`.
    pub async fn call<T: DeserializeOwned>(&self, req: &Request) -> Result<T, VmmApiError> {
        let cmd = req.name();
        match tokio::time::timeout(self.timeout, self.exchange(req)).await {
            Ok(line) => self.parse(cmd, &line?),
            Err(_) => Err(VmmApiError::Timeout {
                socket: self.socket.clone(),
                cmd,
                timeout: self.timeout,
            }),
        }
    }

    async fn exchange(&self, req: &Request) -> Result<String, VmmApiError> {
        let io = |op| {
            let socket = self.socket.clone();
            move |source| VmmApiError::Io { socket, op, source }
        };
        let mut stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(io("connecting"))?;
        let mut line = serde_json::to_vec(req).map_err(|e| VmmApiError::Io {
            socket: self.socket.clone(),
            op: "encoding the request",
            source: e.into(),
        })?;
        line.push(b'\n');
        stream.write_all(&line).await.map_err(io("writing"))?;
        let mut answer = String::new();
        let mut reader = BufReader::new(stream).take(MAX_ANSWER);
        reader
            .read_line(&mut answer)
            .await
            .map_err(io("reading the answer"))?;
        if !answer.ends_with('\n') {
            return Err(io("reading the answer")(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("no complete line (read {} bytes)", answer.len()),
            )));
        }
        Ok(answer)
    }

    fn parse<T: DeserializeOwned>(&self, cmd: &'static str, line: &str) -> Result<T, VmmApiError> {
        let bad = |source| VmmApiError::BadAnswer {
            socket: self.socket.clone(),
            cmd,
            source,
        };
        let envelope: Envelope = serde_json::from_str(line).map_err(bad)?;
        if !envelope.ok {
            return Err(VmmApiError::Refused {
                cmd,
                error: envelope
                    .error
                    .unwrap_or_else(|| "(no error text)".into())
                    .chars()
                    .take(1024)
                    .collect(),
            });
        }
        serde_json::from_str(line).map_err(bad)
    }

    /// `info`.
    pub async fn info(&self) -> Result<Info, VmmApiError> {
        self.call(&Request::Info {}).await
    }

    /// Asks for `requested_mib` of hot-plugged memory and waits, polling `info`, until the
    /// guest has exactly that much plugged, for at most `deadline`.
    pub async fn resize_memory(
        &self,
        requested_mib: u32,
        deadline: Duration,
    ) -> Result<MemoryHotplugInfo, VmmApiError> {
        let answer: MemoryHotplugInfo = self.call(&Request::Memory { requested_mib }).await?;
        tracing::debug!(?answer, "memory hot-plug requested");
        let start = Instant::now();
        loop {
            let hp = self
                .info()
                .await?
                .memory_hotplug
                .ok_or(VmmApiError::NoHotplug)?;
            if hp.plugged_mib == requested_mib {
                return Ok(hp);
            }
            if start.elapsed() >= deadline {
                return Err(VmmApiError::PlugTimeout {
                    requested_mib,
                    plugged_mib: hp.plugged_mib,
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A fake VMM API: answers each request line with the next scripted answer (the last
    /// one repeats), recording the requests.
    fn fake(dir: &Path, answers: Vec<String>) -> Arc<Mutex<Vec<serde_json::Value>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::UnixListener::bind(dir.join("api.sock")).unwrap();
        let log = seen.clone();
        tokio::spawn(async move {
            let mut i = 0;
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let mut r = BufReader::new(stream);
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                log.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
                let a = &answers[i.min(answers.len() - 1)];
                i += 1;
                if a == "silence" {
                    let mut rest = Vec::new();
                    let _ = r.read_to_end(&mut rest).await;
                    continue;
                }
                r.get_mut().write_all(a.as_bytes()).await.unwrap();
            }
        });
        seen
    }

    fn info_line(plugged: u32, requested: u32) -> String {
        format!(
            "{{\"ok\":true,\"state\":\"running\",\"vcpus\":4,\"memory_hotplug\":{{\"region_mib\":1024,\
             \"block_mib\":2,\"plugged_mib\":{plugged},\"requested_mib\":{requested}}}}}\n"
        )
    }

    #[tokio::test]
    async fn memory_is_requested_then_info_polled_until_plugged() {
        let dir = tempfile::tempdir().unwrap();
        let seen = fake(
            dir.path(),
            vec![
                "{\"ok\":true,\"block_mib\":2,\"requested_mib\":512,\"plugged_mib\":0,\"region_mib\":1024}\n"
                    .into(),
                info_line(0, 512),
                info_line(256, 512),
                info_line(512, 512),
            ],
        );
        let c = VmmClient::new(&dir.path().join("api.sock"), Duration::from_secs(5))
            .with_poll(Duration::from_millis(1));
        let hp = c.resize_memory(512, Duration::from_secs(5)).await.unwrap();
        assert_eq!(hp.plugged_mib, 512);
        assert_eq!(hp.block_mib, 2);
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen[0],
            serde_json::json!({"cmd":"memory","requested_mib":512})
        );
        assert_eq!(seen.len(), 4);
        assert!(
            seen[1..]
                .iter()
                .all(|r| r == &serde_json::json!({"cmd":"info"}))
        );
    }

    #[tokio::test]
    async fn a_guest_that_never_plugs_times_out_naming_both_sizes() {
        let dir = tempfile::tempdir().unwrap();
        fake(
            dir.path(),
            vec![
                "{\"ok\":true,\"block_mib\":2,\"requested_mib\":512,\"plugged_mib\":0,\"region_mib\":1024}\n"
                    .into(),
                info_line(128, 512),
            ],
        );
        let c = VmmClient::new(&dir.path().join("api.sock"), Duration::from_secs(5))
            .with_poll(Duration::from_millis(5));
        let e = c
            .resize_memory(512, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                VmmApiError::PlugTimeout {
                    requested_mib: 512,
                    plugged_mib: 128,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("512 MiB"), "{e}");
    }

    #[tokio::test]
    async fn refusals_bad_answers_no_device_and_silence_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        fake(
            dir.path(),
            vec![
                "{\"ok\":false,\"error\":\"1000 MiB is past the region (512 MiB)\"}\n".into(),
                "{\"ok\":true,\"requested_mib\":\"many\"}\n".into(),
                "{\"ok\":true,\"state\":\"running\"}\n".into(),
                "silence".into(),
            ],
        );
        let c = VmmClient::new(&dir.path().join("api.sock"), Duration::from_millis(300));
        let e = c
            .resize_memory(1000, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, VmmApiError::Refused { cmd: "memory", error } if error.contains("past the region")),
            "{e:?}"
        );
        let e = c
            .call::<MemoryHotplugInfo>(&Request::Memory { requested_mib: 2 })
            .await
            .unwrap_err();
        assert!(
            matches!(e, VmmApiError::BadAnswer { cmd: "memory", .. }),
            "{e:?}"
        );
        assert_eq!(c.info().await.unwrap().memory_hotplug, None);
        let e = c.info().await.unwrap_err();
        assert!(
            matches!(e, VmmApiError::Timeout { cmd: "info", .. }),
            "{e:?}"
        );
        let gone = VmmClient::new(&dir.path().join("none.sock"), Duration::from_secs(1));
        assert!(matches!(
            gone.info().await.unwrap_err(),
            VmmApiError::Io {
                op: "connecting",
                ..
            }
        ));
    }
}

//! `pod_start`: what a kubelet waits for when it starts a pod — CRI RunPodSandbox,
//! CreateContainer, StartContainer — until the container's first line shows in its CRI log.
//! One pod at a time, or many at once from separate clients (as many kubelet workers do).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::cri::{ContainerSpec, Cri, CriError, PodNetwork, PodSpec, log_text};

/// Errors of one pod start.
#[derive(Debug, thiserror::Error)]
pub enum PodBenchError {
    /// A CRI call failed.
    #[error("pod {pod}")]
    Cri {
        /// The pod.
        pod: String,
        /// The failed call.
        #[source]
        source: CriError,
    },
    /// The container's output never appeared in its log.
    #[error("pod {pod}: no output in {log} within {secs} s")]
    NoOutput {
        /// The pod.
        pod: String,
        /// The log file watched.
        log: PathBuf,
        /// How long we waited.
        secs: u64,
    },
    /// A measuring thread died.
    #[error("the thread measuring pod {pod} panicked")]
    Thread {
        /// The pod.
        pod: String,
    },
}

/// What a measured pod runs and where.
#[derive(Debug, Clone)]
pub struct PodRun {
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// CRI runtime handler, e.g. `carapace` or `runc`.
    pub handler: String,
    /// The container image (present for CRI).
    pub image: String,
    /// Where pod logs go (a subdirectory per pod).
    pub log_root: PathBuf,
    /// How long to wait for the output.
    pub timeout: Duration,
}

const MARK: &str = "pod-ready";

impl PodRun {
    /// Starts pod `name` with one container that prints a line; returns the time from
    /// RunPodSandbox to that line in the container's log (ms). The pod is removed
    /// afterwards (not timed), also when the start failed.
    pub fn start_once(&self, cri: &mut Cri, name: &str) -> Result<f64, PodBenchError> {
        let pod = PodSpec {
            name: name.to_owned(),
            namespace: "bench".into(),
            handler: self.handler.clone(),
            log_dir: self.log_root.join(name),
            privileged: false,
            network: PodNetwork::Cni { ports: vec![] },
        };
        let cri_err = |source| PodBenchError::Cri {
            pod: name.to_owned(),
            source,
        };
        let container = ContainerSpec {
            name: "main".into(),
            image: self.image.clone(),
            command: vec!["echo".into(), MARK.into()],
            ..Default::default()
        };
        let start = Instant::now();
        let pod_id = cri.run_pod(&pod).map_err(cri_err)?;
        let result = (|| {
            let id = cri
                .create_container(&pod_id, &pod, &container)
                .map_err(cri_err)?;
            cri.start_container(&id).map_err(cri_err)?;
            let log = pod.log_dir.join("main.log");
            loop {
                if log_text(&log).is_ok_and(|t| t.contains(MARK)) {
                    return Ok(start.elapsed().as_secs_f64() * 1000.0);
                }
                if start.elapsed() > self.timeout {
                    return Err(PodBenchError::NoOutput {
                        pod: name.to_owned(),
                        log,
                        secs: self.timeout.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })();
        let removed = cri.remove_pod(&pod_id).map_err(cri_err);
        let ms = result?;
        removed?;
        Ok(ms)
    }

    /// Starts `count` pods at once, each from its own CRI connection, released together;
    /// returns each pod's start time (ms) or its error.
    pub fn start_parallel(&self, prefix: &str, count: usize) -> Vec<Result<f64, PodBenchError>> {
        let barrier = Arc::new(Barrier::new(count));
        let threads: Vec<_> = (0..count)
            .map(|i| {
                let me = self.clone();
                let barrier = Arc::clone(&barrier);
                let name = format!("{prefix}-{i}");
                let thread_name = name.clone();
                (
                    thread_name,
                    std::thread::spawn(move || {
                        let cri = Cri::connect(&me.socket);
                        barrier.wait();
                        let mut cri = cri.map_err(|source| PodBenchError::Cri {
                            pod: name.clone(),
                            source,
                        })?;
                        me.start_once(&mut cri, &name)
                    }),
                )
            })
            .collect();
        threads
            .into_iter()
            .map(|(pod, t)| t.join().unwrap_or(Err(PodBenchError::Thread { pod })))
            .collect()
    }
}

/// The log root for pods of `handler` under `work`.
pub fn log_root(work: &Path, handler: &str) -> PathBuf {
    work.join("pod-logs").join(handler)
}

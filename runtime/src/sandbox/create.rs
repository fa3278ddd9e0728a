//! Creating sandboxes and pod containers: the host steps (state directory, mounts, fs
//! daemon, VMM) run as blocking work, the guest steps (reaching the agent, CreateSandbox,
//! CreateContainer) on the caller's async runtime over one [`Session`], which the caller
//! keeps. A failure in either half tears down everything recorded so far.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::resize::Direction;
use super::{AGENT_RETRY, FSD_SOCKET_TIMEOUT, Placement, Runtime, SandboxError, SandboxPaths};
use super::{blocking, io_err};
use crate::agent::{AgentError, Session, Share};
use crate::faults::Point;
use crate::hooks::HookKind;
use crate::launcher::{FsRequest, VmPaths, VmRequest, check_image, vm_description};
use crate::network::AttachedTap;
use crate::oci::{self, Bundle, GUEST_SHARED_DIR, SHARED_FS_TAG};
use crate::process::{ProcessRecord, log_tail, wait_for_socket};
use crate::sizing::{self, Bounds, DEFAULT_BLOCK_MIB, Demand, Size};
use crate::state::{MountRecord, SandboxNetwork, SandboxState, Status, VmRecord};
use std::os::fd::AsFd;

/// A VM cannot share the host's network: a spec without a network namespace (`docker run
/// --net=host`, a Kubernetes `hostNetwork` pod) is refused, as Kata Containers does, rather
/// than run with a network that is not the one asked for. (Joining a pod's VM is decided by
/// its sandbox: a container of the pod shares the guest's network whatever its spec says.)
fn refuse_host_network(bundle: &Bundle, guest: &oci::GuestSpec) -> Result<(), SandboxError> {
    if !guest.host_network {
        return Ok(());
    }
    Err(oci::SpecError::Invalid {
        path: bundle.spec_path.clone(),
        field: "linux.namespaces".into(),
        reason: "no network namespace: the spec asks for the host's network, which a \
                 virtual machine cannot share; give the container a network namespace of \
                 its own (no --net=host, no hostNetwork: true)"
            .into(),
    }
    .into())
}

/// How long a create whose fs daemon exited waits for the VMM to follow (the daemon ends
/// when the VMM disconnects, so a dying VMM is usually the cause).
const VMM_FOLLOWS: Duration = Duration::from_secs(2);

/// A sandbox whose host side is up: its VMM is booting the guest.
#[derive(Debug)]
struct Booting {
    st: SandboxState,
    paths: SandboxPaths,
    vmm: ProcessRecord,
    hostname: String,
    spec_bytes: Vec<u8>,
    started: Instant,
}

/// A pod container whose binds are in place and whose guest spec is written.
#[derive(Debug)]
struct Joining {
    st: SandboxState,
    sandbox: SandboxState,
    spec_bytes: Vec<u8>,
}

/// Runs `steps` unless the fs daemon `fsd` exits first: a guest whose files went with it
/// would wait on them for ever (mounting the share, creating the container).
async fn unless_fs_daemon_exits<T>(
    fsd: Option<ProcessRecord>,
    log: &Path,
    steps: impl std::future::Future<Output = Result<T, SandboxError>>,
) -> Result<T, SandboxError> {
    let Some(fsd) = fsd else { return steps.await };
    let gone = async {
        if crate::exitwatch::exited(fsd).await.is_err() {
            // cannot watch it (no pidfd): the steps decide alone
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        biased; // a daemon gone already fails the create at once
        () = gone => Err(SandboxError::FsDaemonExited {
            pid: fsd.pid,
            log: log.to_path_buf(),
            tail: log_tail(log),
        }),
        r = steps => r,
    }
}

impl Runtime {
    /// Creates sandbox and container `id` from `bundle`; returns its state and the session
    /// to its agent, which the caller keeps for every later request to this VM. On error
    /// nothing is left behind.
    pub async fn create(
        &self,
        id: &str,
        bundle: &Bundle,
    ) -> Result<(SandboxState, Session), SandboxError> {
        let rt = self.clone();
        let (id_owned, bundle) = (id.to_owned(), bundle.clone());
        let mut booting = blocking(move || rt.create_host(&id_owned, &bundle)).await?;
        self.fault(Point::CreateVmmStarted, &booting.st);
        let (fsd, fsd_log) = (booting.st.fsd, booting.paths.fsd_log.clone());
        let guest = self.create_guest(&mut booting);
        let created = match unless_fs_daemon_exits(fsd, &fsd_log, guest).await {
            Ok(session) => {
                self.fault(Point::CreateContainerCreated, &booting.st);
                self.creation_hooks(&booting.st).await.map(|()| session)
            }
            // The fs daemon ends when its frontend, the VMM, goes: a VMM that is gone too
            // (or goes within a moment) is the cause, and its log says why.
            Err(error @ SandboxError::FsDaemonExited { .. }) => {
                let deadline = Instant::now() + VMM_FOLLOWS;
                while booting.vmm.is_alive() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if booting.vmm.is_alive() {
                    Err(error)
                } else {
                    Err(self.vmm_exited(&booting.vmm, &booting.paths))
                }
            }
            Err(error) => Err(error),
        };
        match created {
            Ok(session) => Ok((booting.st, session)),
            Err(error) => {
                let rt = self.clone();
                let st = booting.st;
                Err(blocking(move || Ok(rt.torn_down(&st, error))).await?)
            }
        }
    }

    /// The host half of a create: everything up to a started VMM.
    fn create_host(&self, id: &str, bundle: &Bundle) -> Result<Booting, SandboxError> {
        crate::state::validate_id(id)?;
        let paths = self.paths(id)?;
        let guest_shared = match self.placement {
            Placement::Vm => PathBuf::from(GUEST_SHARED_DIR),
            Placement::HostAgent => paths.shared.clone(),
        };
        let guest = oci::translate(bundle, id, &guest_shared, None)?;
        if self.placement == Placement::Vm {
            refuse_host_network(bundle, &guest)?;
            check_image(&self.config)?;
        }
        // The VM's own settings: the configuration with the pod's allowed annotations.
        let vm_config = self
            .config
            .with_annotations(&guest.annotations)
            .map_err(|e| oci::SpecError::Invalid {
                path: bundle.spec_path.clone(),
                field: format!("annotations.{}", e.annotation()),
                reason: carapace_errors::chain(&e),
            })?;
        // The VM's size at boot: refused here, before anything exists, when too large.
        let demand = Demand::of(&guest.limits, guest.cpuset_cpus, DEFAULT_BLOCK_MIB);
        let h = &vm_config.hypervisor;
        let boot = sizing::size(h, &Bounds::new(h, None), &[(id.to_owned(), demand)], id)?;
        self.store.create_dir(id)?;
        let mut st = SandboxState::new(id, &bundle.dir, guest.annotations.clone());
        st.hooks = guest.hooks.clone();
        st.demand = Some(demand);
        match self.host_steps(&mut st, &guest, &paths, &vm_config, boot) {
            Ok((vmm, spec_bytes, started)) => Ok(Booting {
                hostname: guest.hostname.clone().unwrap_or_else(|| id.to_owned()),
                st,
                paths,
                vmm,
                spec_bytes,
                started,
            }),
            Err(error) => Err(self.torn_down(&st, error)),
        }
    }

    /// Tears `st` down after `error`; returns the error to report.
    fn torn_down(&self, st: &SandboxState, error: SandboxError) -> SandboxError {
        tracing::error!(id = st.id, %error, "create failed, tearing down");
        error.with_teardown(self.teardown(st))
    }

    fn host_steps(
        &self,
        st: &mut SandboxState,
        guest: &oci::GuestSpec,
        paths: &SandboxPaths,
        vm_config: &carapace_config::Config,
        boot: Size,
    ) -> Result<(ProcessRecord, Vec<u8>, Instant), SandboxError> {
        let id = st.id.clone();
        self.store.save(st)?;
        self.prepare_jail(st, paths)?;
        // Recorded before they exist, so that a crash in between still tears them down.
        st.mounts.push(MountRecord {
            source: PathBuf::from("tmpfs"),
            target: paths.stage.clone(),
            read_only: false,
            scratch: None,
        });
        st.mounts.push(MountRecord {
            source: paths.stage.clone(),
            target: paths.shared.clone(),
            read_only: true,
            scratch: None,
        });
        self.store.save(st)?;
        self.mounter.prepare_export(&paths.stage, &paths.shared)?;
        let idmap = st.jail.as_ref().and_then(|j| j.fs).map(|b| b.idmap());
        self.bind_all(st, guest, paths, idmap)?;
        let taps = self.attach_network(st, guest)?;
        let spec_bytes = serde_json::to_vec_pretty(&guest.json).unwrap_or_default();
        std::fs::write(&paths.guest_spec, &spec_bytes)
            .map_err(io_err("writing", &paths.guest_spec))?;

        // With a host-mode agent (testing without a VM) the containers themselves run on the
        // host in that cgroup, which the agent manages: the helpers stay out of it.
        let cgroups_path = guest
            .cgroups_path
            .as_ref()
            .filter(|_| self.placement == Placement::Vm);
        let cgroup = match cgroups_path {
            Some(path) => {
                let cg = crate::cgroup::create(Path::new(crate::cgroup::CGROUP_ROOT), path)?;
                st.host_cgroup = Some(cg.clone());
                self.store.save(st)?;
                tracing::info!(id, dirs = ?cg.dirs, "host cgroup for the VMM and fs daemon");
                Some(std::sync::Arc::new(crate::cgroup::Joined::open(&cg)?))
            }
            None => None,
        };
        tracing::info!(id, "starting fs daemon");
        let fsd = self.launcher.start_fs_daemon(&FsRequest {
            shared_dir: paths.shared.clone(),
            socket: paths.fsd_socket.clone(),
            log: paths.fsd_log.clone(),
            cgroup: cgroup.clone(),
            idmap: st.jail.as_ref().and_then(|j| j.fs).map(|b| b.idmap()),
        })?;
        st.fsd = Some(fsd);
        self.store.save(st)?;
        wait_for_socket(
            "fs daemon",
            &fsd,
            &paths.fsd_socket,
            &paths.fsd_log,
            FSD_SOCKET_TIMEOUT,
        )?;

        let resources = carapace_config::VmResources {
            vcpus: boot.vcpus,
            memory_mib: boot.memory_mib,
        };
        let mut desc = vm_description(
            vm_config,
            resources,
            &VmPaths {
                vsock: paths.vsock.clone(),
                api: paths.api.clone(),
                fs_socket: paths.fsd_socket.clone(),
                console: self.config.debug.console.then(|| paths.console.clone()),
                nics: st
                    .network
                    .iter()
                    .flat_map(|n| n.plan.interfaces.iter().map(|i| i.mac))
                    .collect(),
            },
        );
        desc.jail = st
            .jail
            .as_ref()
            .map(|j| crate::jail::vm_section(&vm_config.jail, j));
        std::fs::write(
            &paths.vm_json,
            serde_json::to_vec_pretty(&desc).unwrap_or_default(),
        )
        .map_err(io_err("writing", &paths.vm_json))?;
        let hotplug = desc.memory_hotplug.as_ref();
        st.vm = Some(VmRecord {
            created_vcpus: u32::from(desc.vcpus),
            boot_memory_mib: desc.memory_mib,
            hotplug_region_mib: hotplug.map_or(0, |h| h.region_mib),
            hotplug_block_mib: hotplug.map_or(DEFAULT_BLOCK_MIB, |h| h.block_mib),
            base: Size {
                vcpus: vm_config.hypervisor.default_vcpus,
                memory_mib: vm_config.hypervisor.default_memory_mib,
            },
            size: boot,
        });
        self.store.save(st)?;
        tracing::info!(
            id,
            ?resources,
            created_vcpus = desc.vcpus,
            hotplug_mib = hotplug.map_or(0, |h| h.region_mib),
            "starting VMM"
        );
        let started = Instant::now();
        let vmm = self.launcher.start_vmm(&VmRequest {
            description: paths.vm_json.clone(),
            vsock: paths.vsock.clone(),
            log: paths.vmm_log.clone(),
            taps: &taps.iter().map(|t| t.fd.as_fd()).collect::<Vec<_>>(),
            cgroup,
            // the jail's PID namespace: made by the launcher, since a process can only
            // start in one, never move into it
            pid_namespace: st.jail.is_some(),
        })?;
        // The VMM holds the taps now; ours close here.
        drop(taps);
        st.vmm = Some(vmm);
        self.store.save(st)?;
        Ok((vmm, spec_bytes, started))
    }

    /// Makes the jail directory (for every sandbox: the vsock socket lives there) and, for
    /// a VM under `[jail] enabled`, claims the VMM's uid and records it before anything
    /// else starts, so that every failure after this gives it back ([`crate::jail`]). No
    /// free uid fails the create: never a VMM without its jail.
    fn prepare_jail(
        &self,
        st: &mut SandboxState,
        paths: &SandboxPaths,
    ) -> Result<(), SandboxError> {
        let root = crate::jail::make_root(&paths.dir)?;
        if self.placement != Placement::Vm {
            return Ok(());
        }
        if !self.config.jail.enabled {
            tracing::warn!(
                id = st.id,
                "jail.enabled = false: the VMM runs as root with the host's view"
            );
            return Ok(());
        }
        let claims = self.jail_claims();
        let range = crate::jail::UidRange::of(&self.config.jail);
        let uid = claims.claim(range, &st.id, &paths.dir)?;
        let jail = &self.config.jail;
        let fs = if jail.fs_daemon {
            // The claim lies in the range, which validation keeps within the blocks.
            jail.fs_block(uid)
                .map(|(base, count)| crate::jail::FsBlock { base, count })
        } else {
            tracing::warn!(
                id = st.id,
                "jail.fs_daemon = false: the fs daemon runs as root (in its own namespaces)"
            );
            None
        };
        st.jail = Some(crate::jail::JailRecord {
            uid,
            gid: uid,
            root,
            fs,
        });
        self.store.save(st)?;
        tracing::info!(id = st.id, uid, "the VMM runs jailed as uid and gid {uid}");
        if let Some(b) = fs {
            tracing::info!(
                id = st.id,
                base = b.base,
                count = b.count,
                "the fs daemon serves as uid {} (root of ids {}..{})",
                b.base,
                b.base,
                u64::from(b.base) + u64::from(b.count) - 1
            );
        }
        Ok(())
    }

    /// When the spec names a network namespace (CRI: the pod's, set up by CNI): reads its
    /// interfaces, routes and neighbours, records them, makes a tap per interface with the
    /// traffic redirected both ways, records that, and returns the taps for the VMM. The
    /// host-mode agent (tests without a VM) gets no network: it runs on the host's.
    fn attach_network(
        &self,
        st: &mut SandboxState,
        guest: &oci::GuestSpec,
    ) -> Result<Vec<AttachedTap>, SandboxError> {
        let Some(netns) = &guest.netns else {
            tracing::info!(
                id = st.id,
                "the spec names no network namespace: the VM gets no network interface"
            );
            return Ok(Vec::new());
        };
        if self.placement == Placement::HostAgent {
            tracing::info!(id = st.id, netns = %netns.display(), "host-mode agent: no VM network");
            return Ok(Vec::new());
        }
        let plan = self.network.inspect(netns)?;
        tracing::info!(
            id = st.id,
            netns = %netns.display(),
            interfaces = plan.interfaces.len(),
            routes = plan.routes.len(),
            "mirroring the pod's network into the VM"
        );
        st.network = Some(SandboxNetwork {
            plan: plan.clone(),
            attached: None,
        });
        self.store.save(st)?;
        let attached = self.network.attach(netns, &plan, &st.id)?;
        if let Some(n) = st.network.as_mut() {
            n.attached = Some(attached.record);
        }
        self.store.save(st)?;
        Ok(attached.taps)
    }

    /// The guest half of a create: reach the agent, set the sandbox up, create the container.
    async fn create_guest(&self, b: &mut Booting) -> Result<Session, SandboxError> {
        let id = b.st.id.clone();
        let timeout = Duration::from_millis(self.config.agent.boot_timeout_ms);
        let agent = self.connect_until(&b.vmm, &b.paths, timeout).await?;
        let agent_ms = b.started.elapsed().as_millis() as u64;
        match self.placement {
            Placement::Vm => {
                let share = Share {
                    tag: SHARED_FS_TAG.to_owned(),
                    mount_point: GUEST_SHARED_DIR.to_owned(),
                    read_only: false,
                };
                agent.create_sandbox(&id, &b.hostname, &[share]).await?;
            }
            Placement::HostAgent => agent.create_sandbox(&id, "", &[]).await?,
        }
        if let Some(network) = &b.st.network {
            agent.configure_network(&network.plan).await?;
        }
        let sandbox_ms = b.started.elapsed().as_millis() as u64 - agent_ms;
        agent.create_container(&id, &b.spec_bytes).await?;
        b.st.status = Status::Created;
        self.store.save(&b.st)?;
        tracing::info!(
            id,
            agent_ms,
            sandbox_ms,
            container_ms = b.started.elapsed().as_millis() as u64 - agent_ms - sandbox_ms,
            "created (VMM start -> agent answering, CreateSandbox, CreateContainer)"
        );
        Ok(agent)
    }

    /// Retries connecting until the agent answers, the VMM dies or `timeout` passes.
    pub(super) async fn connect_until(
        &self,
        vmm: &ProcessRecord,
        paths: &SandboxPaths,
        timeout: Duration,
    ) -> Result<Session, SandboxError> {
        let deadline = Instant::now() + timeout;
        loop {
            if !vmm.is_alive() {
                return Err(self.vmm_exited(vmm, paths));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = remaining.min(Duration::from_secs(1));
            let last = match self.connector.connect(&paths.vsock, attempt).await {
                Ok(agent) => return Ok(agent),
                Err(AgentError::Connect {
                    source:
                        source @ carapace_protocol::client::ClientError::IncompatibleAgent { .. },
                    socket,
                }) => return Err(AgentError::Connect { socket, source }.into()),
                Err(e) => e,
            };
            if Instant::now() + AGENT_RETRY >= deadline {
                if !vmm.is_alive() {
                    return Err(self.vmm_exited(vmm, paths));
                }
                return Err(SandboxError::AgentTimeout {
                    socket: paths.vsock.clone(),
                    timeout,
                    log: if self.config.debug.console {
                        paths.console.clone()
                    } else {
                        paths.vmm_log.clone()
                    },
                    last: Box::new(last),
                });
            }
            tracing::trace!(error = %last, "agent not answering yet");
            tokio::time::sleep(AGENT_RETRY).await;
        }
    }

    fn vmm_exited(&self, vmm: &ProcessRecord, paths: &SandboxPaths) -> SandboxError {
        SandboxError::VmmExited {
            pid: vmm.pid,
            log: paths.vmm_log.clone(),
            tail: log_tail(&paths.vmm_log),
        }
    }

    /// Creates container `cid` from `bundle` inside the running VM of pod sandbox
    /// `sandbox_id` (a sandbox made by [`Runtime::create`]): its rootfs and bind-mount
    /// sources are bound under `<sandbox>/stage/<cid>/`, appear in the `shared/` the
    /// sandbox's fs daemon already exports, and the agent of that VM creates the container,
    /// through `session` when the caller holds the pod's session, else through a new one.
    /// The container gets a state directory of its own (`sandbox_id` set, no fs daemon or
    /// VMM). Returns its state and the session used. On error nothing of it is left
    /// behind; the sandbox is untouched.
    pub async fn create_in_sandbox(
        &self,
        sandbox_id: &str,
        cid: &str,
        bundle: &Bundle,
        session: Option<&Session>,
    ) -> Result<(SandboxState, Session), SandboxError> {
        let rt = self.clone();
        let (sid, id, b) = (sandbox_id.to_owned(), cid.to_owned(), bundle.clone());
        let mut joining = blocking(move || rt.join_host(&sid, &id, &b)).await?;
        let joined = match self.join_guest(&mut joining, session).await {
            Ok(session) => match self.creation_hooks(&joining.st).await {
                Ok(()) => Ok(session),
                Err(error) => {
                    // the guest has the container: it goes first, then the host side
                    if let Err(e) = session.remove_container(&joining.st.id).await {
                        tracing::warn!(id = joining.st.id, error = %carapace_errors::Chain(&e), "RemoveContainer after a failed hook");
                    }
                    Err(error)
                }
            },
            Err(error) => Err(error),
        };
        match joined {
            Ok(session) => Ok((joining.st, session)),
            Err(error) => {
                let rt = self.clone();
                let (st, sid) = (joining.st, sandbox_id.to_owned());
                let error = blocking(move || Ok(rt.member_torn_down(&st, &sid, error))).await?;
                // The VM may have grown for it: back to what the others need.
                let agent = match session {
                    Some(s) => Some(s.clone()),
                    None => self.connect(&joining.sandbox).await.ok(),
                };
                if let Some(agent) = agent {
                    self.shrink_after_removal(sandbox_id, &agent).await;
                }
                Err(error)
            }
        }
    }

    /// The hooks that run while `create` is in progress (`prestart`, `createRuntime`,
    /// `createContainer`, in that order; [`crate::hooks`]), once the guest has the
    /// container; each gets the state with status `creating`.
    async fn creation_hooks(&self, st: &SandboxState) -> Result<(), SandboxError> {
        let Some(hooks) = st.hooks.clone() else {
            return Ok(());
        };
        let mut state = self.state(&st.id)?;
        state.status = Status::Creating.as_str().to_owned();
        // (a host-mode agent runs containers on the host, no isolation at all: tests only)
        if self.placement == Placement::Vm
            && [
                HookKind::Prestart,
                HookKind::CreateRuntime,
                HookKind::CreateContainer,
            ]
            .iter()
            .any(|k| !k.of(&hooks).is_empty())
        {
            crate::hooks::check_pid_isolated(&state)?;
        }
        blocking(move || {
            for kind in [
                HookKind::Prestart,
                HookKind::CreateRuntime,
                HookKind::CreateContainer,
            ] {
                crate::hooks::run(kind, &hooks, &state)?;
            }
            Ok(())
        })
        .await
    }

    /// Tears pod container `st` down after `error`; returns the error to report.
    fn member_torn_down(
        &self,
        st: &SandboxState,
        sandbox_id: &str,
        error: SandboxError,
    ) -> SandboxError {
        tracing::error!(cid = st.id, sandbox_id, %error, "create in sandbox failed, tearing down");
        error.with_teardown(self.teardown_member(st, sandbox_id))
    }

    fn join_host(
        &self,
        sandbox_id: &str,
        cid: &str,
        bundle: &Bundle,
    ) -> Result<Joining, SandboxError> {
        crate::state::validate_id(cid)?;
        let sandbox = self.store.load(sandbox_id)?;
        let vm_alive = sandbox.vmm.is_some_and(|v| v.is_alive());
        if sandbox.sandbox_id.is_some() || sandbox.status == Status::Creating || !vm_alive {
            return Err(SandboxError::WrongStatus {
                id: sandbox_id.to_owned(),
                status: if sandbox.sandbox_id.is_some() {
                    "a container of another sandbox"
                } else if vm_alive {
                    "still being created"
                } else {
                    "without a running VM"
                },
                op: "host another container",
            });
        }
        let sandbox_paths = self.paths(sandbox_id)?;
        let guest_shared = match self.placement {
            Placement::Vm => PathBuf::from(GUEST_SHARED_DIR),
            Placement::HostAgent => sandbox_paths.shared.clone(),
        };
        let guest = oci::translate(bundle, cid, &guest_shared, sandbox.guest_pid)?;
        // Refused here, before anything exists, when the pod would not fit its VM.
        let block = sandbox
            .vm
            .map_or(DEFAULT_BLOCK_MIB, |v| v.hotplug_block_mib);
        let demand = Demand::of(&guest.limits, guest.cpuset_cpus, block);
        self.check_fits(sandbox_id, cid, Some(demand))?;
        self.store.create_dir(cid)?;
        let mut st = SandboxState::new(cid, &bundle.dir, guest.annotations.clone());
        st.sandbox_id = Some(sandbox_id.to_owned());
        st.demand = Some(demand);
        st.hooks = guest.hooks.clone();
        let bound = (|| {
            self.store.save(&st)?;
            // The pod's fs daemon serves the member's files through the pod's id block.
            let idmap = sandbox.jail.as_ref().and_then(|j| j.fs).map(|b| b.idmap());
            self.bind_all(&mut st, &guest, &sandbox_paths, idmap)?;
            let spec_bytes = serde_json::to_vec_pretty(&guest.json).unwrap_or_default();
            let spec_path = self.paths(&st.id)?.guest_spec;
            std::fs::write(&spec_path, &spec_bytes).map_err(io_err("writing", &spec_path))?;
            Ok(spec_bytes)
        })();
        match bound {
            Ok(spec_bytes) => Ok(Joining {
                st,
                sandbox,
                spec_bytes,
            }),
            Err(error) => Err(self.member_torn_down(&st, sandbox_id, error)),
        }
    }

    async fn join_guest(
        &self,
        j: &mut Joining,
        session: Option<&Session>,
    ) -> Result<Session, SandboxError> {
        let agent = match session {
            Some(s) => s.clone(),
            None => self.connect(&j.sandbox).await?,
        };
        // The VM grows before the guest creates the container.
        self.resize_vm(&j.sandbox.id, &j.st.id, &agent, Direction::Grow)
            .await?;
        agent.create_container(&j.st.id, &j.spec_bytes).await?;
        j.st.status = Status::Created;
        self.store.save(&j.st)?;
        tracing::info!(id = j.st.id, sandbox = ?j.st.sandbox_id, "created in the pod's VM");
        Ok(agent)
    }

    /// Binds every source of `guest` under the sandbox's stage (recorded first), idmapped
    /// with the pod's fs daemon block when it has one.
    fn bind_all(
        &self,
        st: &mut SandboxState,
        guest: &oci::GuestSpec,
        sandbox_paths: &SandboxPaths,
        idmap: Option<carapace_idmap::IdMap>,
    ) -> Result<(), SandboxError> {
        for bind in &guest.binds {
            st.mounts.push(MountRecord {
                source: bind.source.clone(),
                target: sandbox_paths.stage.join(&bind.target),
                read_only: bind.read_only,
                scratch: None,
            });
            self.store.save(st)?;
            let bound = self.mounter.bind(
                &bind.source,
                &sandbox_paths.stage,
                &bind.target,
                bind.options(idmap),
            )?;
            if bound.scratch.is_some()
                && let Some(rec) = st.mounts.last_mut()
            {
                rec.scratch = bound.scratch;
                self.store.save(st)?;
            }
        }
        Ok(())
    }
}
